#!/usr/bin/env python
"""Measure this CPU once for `calm-dist plan --hardware cpu`: the rates and fixed costs of the planner's CPU step
model (calm_dist/planning/cpu_time.py), written as a hardware profile JSON.

    python benchmarks/cpu_profile.py [--out benchmarks/results/cpu_profile.json] [--quick] [--install]

One thread per process (as every rank runs), fp32, CPU time (time.process_time) as the basis, medians:
  matmul_gflops        F.linear(x[T, D], W[3D, D]) for T in 128..2048 tokens and D in 64..4096, cycling through
                       enough (x, W) pairs to leave the caches: the rate a transformer's projections reach, by
                       width and tokens (a table; the planner interpolates)
  attention_gflops     causal F.scaled_dot_product_attention forward + backward (head dim 64), FLOPs counted as
                       calm_dist.planning.costs counts them (causal, backward 2x forward), by sequence length
  elementwise_GBps     a + b into a fresh tensor (allocation and first touch included), 3 tensors' bytes moved,
                       cycling through a 64 MiB working set, by tensor size
  collective           gloo all_gather_into_tensor between 2 processes on 127.0.0.1: latency and GB/s received
  in_situ_efficiency   ZeRO-3 steps of a calibration composition (anchor 384 wide, augmenting 192, seq 192),
                       profiled (the median of five, kind by kind): their matmul, attention and elementwise ops'
                       own time against what the tables say (a real step's kernels reach less than a kernel
                       timed alone: other jobs' and the step's own cache traffic, allocation)
  fixed costs          block_call_s (one decoder or composition block call, forward or backward, with its
                       ZeRO-3 leaf hooks), micro_step_s and optimizer_step_s: what a ZeRO-3 step of a composition
                       of 32-wide models (benchmarks/plan_worker.py, world 1) costs beyond its kernels, fitted
                       by least squares from four such steps (2 and 8 anchor blocks x 1 and 2 micro-steps);
                       and the same three fitted on ZeRO-2 steps of those compositions (`stage2`: no hook on any
                       frozen block, DeepSpeed's gradient hooks and partitioned optimizer step instead); each
                       step measured twice, first and last, and the faster of the two fitted
  speed_probe          benchmarks/speed_probe.py's fixed workload, timed at the start and at the end: the
                       machine's speed while this profile was measured, which plan_bench.py compares with the
                       same probe timed beside the steps it predicts

The machine is shared: the load of other jobs (cores they kept busy) is recorded beside each phase. `--install`
also writes the planner's copy, calm_dist/planning/cpu_profile.json (what `--hardware cpu` reads).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
import common  # noqa: E402  (pins threads before torch is imported)
from data_bench import Usage  # noqa: E402  (others_cores: the cores other jobs kept busy meanwhile)
from machine import machine_info  # noqa: E402
from speed_probe import SpeedProbe, measure as measure_speed  # noqa: E402


def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median CPU seconds of `fn`."""
    return common.median(common.interleaved({"f": fn}, repeats=repeats, warmup=warmup)["f"]["cpu"])


def measure_matmul(tokens: list[int], widths: list[int], repeats: int) -> list[list]:
    import torch
    import torch.nn.functional as F

    rows = []
    for t in tokens:
        for d in widths:
            # a step's matmuls each read another weight and another input: cycle through enough pairs that
            # they do not stay in the caches (a 24 MiB-or-more working set), as a warm loop over one pair would
            n = max(2, min(16, (24 << 20) // (4 * (t * d + 3 * d * d))))
            pairs = [(torch.randn(t, d), torch.randn(3 * d, d)) for _ in range(n)]

            def linear():
                for x, w in pairs:
                    F.linear(x, w)
            rows.append([t, d, n * 2 * t * d * 3 * d / timed(linear, repeats) / 1e9])
    return rows


def measure_attention(seqs: list[int], repeats: int) -> list[list]:
    import torch
    import torch.nn.functional as F

    from calm_dist.planning.costs import attention_flops_per_token

    heads, hd = 8, 64
    rows = []
    for s in seqs:
        q, k, v = (torch.randn(1, heads, s, hd, requires_grad=True) for _ in range(3))

        def fwd_bwd():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        flops = 3 * s * attention_flops_per_token(s, heads * hd)  # forward + a backward counted at 2x
        rows.append([s, flops / timed(fwd_bwd, repeats) / 1e9])
    return rows


def measure_elementwise(sizes_bytes: list[int], repeats: int) -> list[list]:
    import torch

    rows = []
    for n_bytes in sizes_bytes:
        n = n_bytes // 4
        # out of place, each result a fresh tensor, on inputs cycled through a 64 MiB-or-more working set: what the
        # eager ops of a block (and autograd's saved results) do, allocation and first touch of the output included
        k = max(2, (64 << 20) // n_bytes)
        inputs = [torch.randn(n) for _ in range(k + 1)]

        def add():
            for i in range(k):
                inputs[i] + inputs[i + 1]
        rows.append([n_bytes, 3 * n_bytes * k / timed(add, repeats) / 1e9])
    return rows


def collective_rank(rank: int, port: int, sizes: list[int], repeats: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    res = []
    for n_bytes in sizes:
        shard = torch.randn(n_bytes // 8)  # each rank holds half of the gathered tensor
        full = torch.empty(2 * shard.numel())
        times = []
        for r in range(repeats + 1):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_gather_into_tensor(full, shard)
            if r:
                times.append(time.perf_counter() - t0)
        res.append([n_bytes, common.median(times)])
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def measure_collective(repeats: int) -> dict:
    """Wall time of a 2-rank gloo all-gather by size; fitted as latency + bytes received / GB/s."""
    import torch.multiprocessing as mp

    from calm_dist.training.dist_env import free_port

    sizes = [1 << 12, 1 << 20, 1 << 24, 1 << 26]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "coll.json")
        mp.spawn(collective_rank, args=(free_port(), sizes, repeats, out), nprocs=2, join=True)
        rows = json.loads(Path(out).read_text())
    import numpy as np

    received = np.array([b / 2 for b, _ in rows])  # each rank receives the other half
    seconds = np.array([t for _, t in rows])
    slope, latency = np.polyfit(received, seconds, 1)
    return {"by_bytes_s": rows, "latency_s": max(0.0, float(latency)), "GBps": float(1 / slope / 1e9)}


# ----------------------------------------------------------------------------------------------- fixed costs

def llama(d: int, layers: int, heads: int = 2, vocab: int = 128):
    import transformers as T

    return T.LlamaForCausalLM(T.LlamaConfig(
        hidden_size=d, intermediate_size=3 * d if d > 32 else 2 * d, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=512,
        tie_word_embeddings=False, attn_implementation="sdpa"))


def run_worker(work: Path, name: str, anchor, augmenting, pairs, *, seq: int, rows: int, repeats: int,
               profile: bool = False, ds_config: str = "zero3") -> dict:
    """Steps of a composition of the two models (built on first use) under the shipped DeepSpeed JSON `ds_config`,
    one rank, recompute, no checkpointing."""
    from calm_dist.training.dist_env import free_port

    models = work / name
    if not models.exists():
        anchor().save_pretrained(models / "anchor")
        augmenting().save_pretrained(models / "augmenting")
    report = work / f"{name}_r{rows}_{ds_config}"
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               PYTHONPATH=f"{common.REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    subprocess.run([sys.executable, str(HERE / "plan_worker.py"), "--anchor", str(models / "anchor"),
                    "--augmenting", str(models / "augmenting"), "--pairs", json.dumps(pairs), "--seq", str(seq),
                    "--rows", str(rows), "--micro-batch", "1" if not profile else str(rows), "--ds-config", ds_config,
                    "--variants", "off:recompute", "--repeats", str(repeats), "--warmup", "2", "--report", str(report)]
                   + (["--profile"] if profile else []),
                   check=True, env=env, cwd=common.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    r = json.loads(report.with_name(report.name + ".rank0.json").read_text())
    return {"name": name, "ds_config": ds_config, "rows": rows, "seq": seq, "pairs": pairs,
            "micro_batch": r["micro_batch"],
            "step_s": r["times"]["ckpt_off:recompute"]["median_s"], "profile_s": r.get("profile_s"),
            "anchor": (models / "anchor").as_posix(), "augmenting": (models / "augmenting").as_posix()}


def fixed_cost_runs(work: Path, repeats: int, ds_config: str = "zero3") -> list[dict]:
    """32-wide compositions (augmenting: 2x the anchor's blocks), 8 tokens: their steps are almost all fixed cost."""
    import torch

    out = []
    for layers in (2, 8):
        for rows in (1, 2):
            torch.manual_seed(0)
            out.append(run_worker(work, f"a{layers}", lambda: llama(32, layers), lambda: llama(32, 2 * layers),
                                  [[2 * layers - 1, layers - 1], [1, 0]], seq=8, rows=rows, repeats=repeats,
                                  ds_config=ds_config))
    return out


def in_situ_efficiency(work: Path, kernels: dict, repeats: int) -> dict:
    """Profiled ZeRO-3 steps (the median of five) of a calibration composition of its own size (anchor 384 wide,
    augmenting 192, seq 192, 2 rows): what its matmul, attention and elementwise ops took against the table's
    rates."""
    import torch

    from calm_dist.planning import cpu_time
    from calm_dist.planning.hardware import Hardware
    from calm_dist.planning.plan import resolve_model

    torch.manual_seed(0)
    r = run_worker(work, "in_situ", lambda: llama(384, 4, heads=6, vocab=2048),
                   lambda: llama(192, 4, heads=3, vocab=2048), [[1, 1], [3, 3]], seq=192, rows=2, repeats=repeats,
                   profile=True)
    anchor, aug = resolve_model(r["anchor"]), resolve_model(r["augmenting"])
    work_ = cpu_time.micro_step_work(anchor, [(aug, [(1, 1), (3, 3)])], seq_len=192, micro_batch=2,
                                     states="recompute", activation_checkpointing=False, elem_bytes=4)
    k = cpu_time.kernel_seconds(work_, Hardware(kind="cpu", **kernels))
    p = r["profile_s"]
    return {"matmul": k["matmul"] / p["matmul"], "attention": k["attention"] / p["attention"],
            "elementwise": (k["elementwise"] + k["loss"]) / p["elementwise"], "profile_s": p,
            "model_s": {key: v for key, v in k.items()}}


def fastest_of_passes(runs: list[dict]) -> list[dict]:
    """Per composition and row count, the pass whose step was fastest: what disturbs these short steps (another
    process on the core, a slow quarter-hour) only ever adds time (benchmarks/README.md, P9p)."""
    best = {}
    for r in runs:
        key = (r["name"], r["rows"], r["ds_config"])
        if key not in best or r["step_s"] < best[key]["step_s"]:
            best[key] = r
    return list(best.values())


def fit_fixed_costs(runs: list[dict], kernels: dict) -> dict:
    """block_call_s, micro_step_s, optimizer_step_s: least squares over steps of different depths and
    micro-step counts, each less what the CPU model says its kernels take (`kernels` rates, same formulas)."""
    import numpy as np

    from calm_dist.planning import cpu_time
    from calm_dist.planning.hardware import Hardware
    from calm_dist.planning.plan import resolve_model

    hw = Hardware(kind="cpu", **kernels)  # kernels: rates and in-situ efficiencies
    rest, design = [], []
    for r in runs:
        anchor, aug = resolve_model(r["anchor"]), resolve_model(r["augmenting"])
        work = cpu_time.micro_step_work(anchor, [(aug, [tuple(p) for p in r["pairs"]])], seq_len=r["seq"],
                                        micro_batch=r["micro_batch"],
                                        states="recompute", activation_checkpointing=False, elem_bytes=4)
        rest.append(r["step_s"] - cpu_time.kernel_seconds(work, hw)["total"] * r["rows"])
        design.append([r["rows"] * work.block_calls, r["rows"], 1.0])
    coef, *_ = np.linalg.lstsq(np.array(design), np.array(rest), rcond=None)
    block_call, micro, step = (max(0.0, float(c)) for c in coef)
    return {"block_call_s": block_call, "micro_step_s": micro, "optimizer_step_s": step, "rest_s": rest,
            "design": design}


SHIPPED = common.REPO / "calm_dist" / "planning" / "cpu_profile.json"
SHIPPED_KEYS = ("machine", "matmul_gflops", "attention_gflops", "elementwise_GBps", "in_situ_efficiency",
                "collective", "fixed_costs", "reserve_gib", "phases", "speed_probe")


def baseline_rss_gib() -> float:
    """The resident memory of a rank before its models load: torch, transformers and DeepSpeed imported (the
    planner's `reserve` on a CPU)."""
    code = ("import deepspeed, transformers, torch, calm_dist.model.composition; "
            "print(open('/proc/self/statm').read().split()[1])")
    pages = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=common.REPO,
                           env=dict(os.environ, DS_ACCELERATOR="cpu")).stdout.split()[-1]
    return int(pages) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(HERE / "results" / "cpu_profile.json"))
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats (a smoke run)")
    ap.add_argument("--install", action="store_true",
                    help=f"also write the planner's copy, {SHIPPED.relative_to(common.REPO)} (--hardware cpu)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    reps = 3 if args.quick else 7
    result = {"machine": {**machine_info(), "torch": torch.__version__, "threads_per_rank": 1, "dtype": "fp32",
                          "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}}
    phases = {}

    def phase(name, fn):
        with Usage() as u:
            value = fn()
        phases[name] = {"wall_s": u.wall, "others_cores": u.others_cores}
        print(f"{name}: {u.wall:.0f} s, other jobs took {u.others_cores:.2f} cores", flush=True)
        return value

    probe = SpeedProbe()
    speed_start = measure_speed(reps, probe)
    work = Path(tempfile.mkdtemp(prefix="calm_cpu_profile_"))
    try:
        # the fixed costs in two passes, one at each end of the profile, the faster of the two fitted: these short
        # steps are the most disturbed measurement of the profile (benchmarks/README.md, P9p)
        runs = phase("fixed_costs", lambda: fixed_cost_runs(work, reps))
        runs2 = phase("fixed_costs_stage2", lambda: fixed_cost_runs(work, reps, "zero2"))
        tokens = [128, 512, 2048]
        widths = [64, 128, 256, 512, 1024] if args.quick else [64, 128, 256, 512, 1024, 2048, 4096]
        result["matmul_gflops"] = phase("matmul", lambda: measure_matmul(tokens, widths, reps))
        result["attention_gflops"] = phase("attention", lambda: measure_attention([128, 512, 2048], reps))
        result["elementwise_GBps"] = phase("elementwise", lambda: measure_elementwise(
            [1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24, 1 << 26, 1 << 28][: 5 if args.quick else 7], reps))
        result["collective"] = phase("collective", lambda: measure_collective(reps))
        kernels = {"matmul_gflops": tuple(map(tuple, result["matmul_gflops"])),
                   "attention_gflops": tuple(map(tuple, result["attention_gflops"])),
                   "elementwise_GBps": tuple(map(tuple, result["elementwise_GBps"]))}
        eff = phase("in_situ", lambda: in_situ_efficiency(work, kernels, reps))
        result["in_situ"] = eff
        result["in_situ_efficiency"] = {k: round(eff[k], 4) for k in ("matmul", "attention", "elementwise")}
        kernels.update({f"{k}_efficiency": v for k, v in result["in_situ_efficiency"].items()})
        runs += phase("fixed_costs_second_pass", lambda: fixed_cost_runs(work, reps))
        runs2 += phase("fixed_costs_stage2_second_pass", lambda: fixed_cost_runs(work, reps, "zero2"))
        result["fixed_cost_runs"] = [{k: v for k, v in r.items() if k not in ("anchor", "augmenting")}
                                     for r in runs + runs2]
        result["fixed_costs"] = fit_fixed_costs(fastest_of_passes(runs), kernels)
        result["fixed_costs"]["stage2"] = fit_fixed_costs(fastest_of_passes(runs2), kernels)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["phases"] = phases
    speed_end = measure_speed(reps, probe)
    # the speed the whole profile stands for: the median over both ends (they differ where the machine drifted)
    result["speed_probe"] = {"median_s": common.median(speed_start["cpu_s"] + speed_end["cpu_s"]),
                             "start": speed_start, "end": speed_end}
    result["reserve_gib"] = round(baseline_rss_gib(), 2)
    result["loadavg_at_end"] = open("/proc/loadavg").read().split()[:3]
    common.write_json(args.out, result)
    if args.install:
        common.write_json(SHIPPED, {k: result[k] for k in SHIPPED_KEYS})
    drift = speed_end["median_s"] / speed_start["median_s"] - 1
    print(f"speed probe {speed_start['median_s'] * 1e3:.1f} ms at the start, {speed_end['median_s'] * 1e3:.1f} ms at "
          f"the end ({drift:+.1%})" + ("; the machine's speed moved during the profile: measure it again before "
                                       "trusting it" if abs(drift) > 0.05 else ""))
    print(f"wrote {args.out}: collective {result['collective']['GBps']:.2f} GB/s + "
          f"{result['collective']['latency_s'] * 1e6:.0f} us")
    for stage, fc in (("ZeRO-3", result["fixed_costs"]), ("ZeRO-2", result["fixed_costs"]["stage2"])):
        print(f"  {stage}: block call {fc['block_call_s'] * 1e3:.2f} ms, micro-step {fc['micro_step_s'] * 1e3:.2f} "
              f"ms, optimizer step {fc['optimizer_step_s'] * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
