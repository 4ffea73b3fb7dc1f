#!/usr/bin/env python
"""Every calm_dist performance measurement, side by side, in one run: JSON + a markdown table.

    python benchmarks/run.py [--quick] [--out benchmarks/results] [--only P1,P3,...] [--no-peer]

Each measurement runs in its own child process (so its peak RSS is its own), one thread per process
(OMP_NUM_THREADS=1, torch.set_num_threads(1)); variants compared by a ratio run in the same process,
round-robin after a warm-up, and the medians are compared. Nothing here asserts a time: every goal is a
ratio measured in the same run (benchmarks/README.md explains each one).

  P1  composed training step, cached augmenting states  /  anchor alone fwd+bwd (input grads)   goal <= 1.10
  P2  cached / recompute step time, vs the cost model's ratio (calm_dist.planning.costs.step_cost)        within 10%
  P3  our training step / CALM-pytorch's (x-transformers models of the same shapes)              goal <= 0.8
  P3d P3 with the trainer's defaults (train.compile=auto) for a 1,000-step run of that model       goal <= 0.7
  P4  greedy decoding tokens/s, ours (KV caches) / CALM-pytorch's; ours cached / uncached        goal >= 5x
  P4c P4 with one compiled graph per decoding step (fp32);  P4h / P4hc  frozen models bf16         goal >= 5x / 10x
  P5  ZeRO-3 per-rank resident frozen-parameter bytes, world 2 / world 1                         goal <= 0.55
  P6  MFU of the ~50M-parameter composed step: cost-model FLOPs / measured fp32 matmul peak      goal >= 30%
  P7  augmenting-state cache reader rows/s / the training step's consumption rows/s               goal >= 5x

The peer (P3, P4) runs from benchmarks/.venv-peer, created on demand: a venv whose .pth file puts the main
venv's site-packages on its path (torch is never reinstalled; a constraint pins it), with `calm-pytorch` and
`x-transformers` pip-installed into it.
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
import common  # noqa: E402
from machine import machine_info as base_machine_info  # noqa: E402  (pins threads before torch; benchmarks/ is on sys.path as the script's folder)

REPO = common.REPO
PEER_VENV = HERE / ".venv-peer"
PEER_PINS = ["calm-pytorch==0.2.2", "x-transformers==2.31.10"]


# =========================================================================================== child processes

def child_steps(size: common.Size, out: Path) -> dict:
    """P1, P2 (and P6's step): anchor-alone fwd+bwd, composed step with cached states, composed step with
    recomputed states, interleaved; then one profiled call of each."""
    import torch

    from calm_dist.model.backbones import decoder
    from calm_dist.model.composition import position_ids_from_mask
    from calm_dist.model.lm_loss import head_loss

    torch.set_num_threads(1)
    model = common.build_composed(size)
    model.train()
    ids, mask = common.batch(size)
    pos = position_ids_from_mask(mask)
    states = model.run_augmenting(ids, mask, pos)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    embed = model.anchor.get_input_embeddings()

    def anchor_alone():
        # the frozen anchor's forward + a backward of input gradients only (no weight gradients), with the
        # loss computed as the composed step computes it (no logits tensor)
        e = embed(ids).detach().requires_grad_(True)
        hidden = decoder(model.anchor)(inputs_embeds=e, attention_mask=mask, position_ids=pos,
                                       use_cache=False).last_hidden_state
        head_loss(hidden, model.anchor.get_output_embeddings(), ids).backward()

    composed_cached = common.composed_training_step(model, ids, mask, opt, augmenting_states=states)
    composed_recompute = common.composed_training_step(model, ids, mask, opt)

    # the MFU denominator, timed in the same rounds (a shared machine's speed drifts: only ratios of
    # measurements taken back to back are trusted)
    n = matmul_n(size)
    a, b, c = (torch.randn(n, n) for _ in range(3))

    def matmul():
        torch.mm(a, b, out=c)

    fns = {"anchor_alone": anchor_alone, "cached": composed_cached, "recompute": composed_recompute,
           "matmul": matmul}
    times = common.interleaved(fns, repeats=size.repeats)
    result = {k: common.summary(v) for k, v in times.items()}
    result["matmul"]["n"] = n
    result["matmul"]["flops_per_s_median"] = 2 * n ** 3 / result["matmul"]["median_s"]
    result["profile"] = common.profile_ops({k: fns[k] for k in ("anchor_alone", "cached")}, out,
                                    filename="profile_p1.md" if size.name == "full" else f"profile_p1_{size.name}.md")
    result["peak_rss_bytes"] = common.peak_rss_bytes()
    return result


def matmul_n(size: common.Size) -> int:
    return 2048 if size.name == "quick" else 4096


def child_matmul(size: common.Size, out: Path) -> dict:
    """The MFU denominator: a large square fp32 matmul, 1 and 2 threads (median of several after warm-up);
    bf16 (AMX where the CPU has it) for reference."""
    import torch

    n = matmul_n(size)
    res = {"n": n}
    for dtype, threads in (("float32", 1), ("float32", 2), ("bfloat16", 1)):
        torch.set_num_threads(threads)
        a = torch.randn(n, n, dtype=getattr(torch, dtype))
        b = torch.randn(n, n, dtype=getattr(torch, dtype))
        c = torch.empty(n, n, dtype=getattr(torch, dtype))
        t = common.interleaved({"mm": lambda: torch.mm(a, b, out=c)}, repeats=7 if dtype == "float32" else 5,
                               warmup=2)["mm"]
        basis = t["cpu"] if threads == 1 else t["wall"]  # CPU time adds up over threads: 2 threads use wall time
        res[f"{dtype}_{threads}t"] = {**common.summary(t), "basis": "cpu" if threads == 1 else "wall",
                                      "flops_per_s_median": 2 * n ** 3 / common.median(basis),
                                      "flops_per_s_best": 2 * n ** 3 / min(basis)}
    torch.set_num_threads(1)
    try:  # the trainer's own MFU denominator (calm_dist.planning.hardware.measured_matmul_peak)
        from calm_dist.planning.hardware import measured_matmul_peak

        res["calm_dist_measured_matmul_peak_1t"] = measured_matmul_peak()
    except Exception as e:  # noqa: BLE001
        res["calm_dist_measured_matmul_peak_error"] = repr(e)
    res["peak_rss_bytes"] = common.peak_rss_bytes()
    return res


def child_cache(size: common.Size, out: Path) -> dict:
    """P7: write an augmenting-state cache with the real writer, then time StatesCache.read of micro-batches
    of random rows, cold (pages evicted with posix_fadvise) and warm."""
    import random

    import torch

    from calm_dist.training.states_cache import StatesCache, build_cache

    torch.set_num_threads(1)
    _, aug = common.build_models(size)
    layers = sorted({i for i, _ in size.pairs})
    ids_all, mask_all = common.batch(size, seed=5, rows=size.cache_rows)

    class Rows:
        def __len__(self):
            return size.cache_rows

        def batch(self, idx):
            return {"input_ids": ids_all[idx], "attention_mask": mask_all[idx]}

    comps = {"format": 1, "benchmark": size.name, "layers": [layers], "seq_len": size.seq, "dtype": "fp32",
             "compute_dtype": "fp32"}
    tmp = Path(tempfile.mkdtemp(prefix="calm_bench_cache_", dir=os.environ.get("CALM_BENCH_TMP")))
    try:
        t0 = time.perf_counter()
        build_cache(tmp / "train", comps, [aug], [layers], Rows(), rows_per_shard=32, batch_size=8, progress=False)
        build_s = time.perf_counter() - t0
        shards = sorted((tmp / "train").glob("shard-*.safetensors"))
        disk_bytes = sum(p.stat().st_size for p in shards)

        def evict():
            for p in shards:
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)

        rng = random.Random(0)
        order = list(range(size.cache_rows))
        res = {"rows": size.cache_rows, "build_s": build_s, "disk_bytes": disk_bytes,
               "bytes_per_row": disk_bytes / size.cache_rows, "micro_batch_rows": size.batch}
        t0 = time.perf_counter()
        StatesCache(tmp / "train", comps).verify()
        res["verify_s"] = time.perf_counter() - t0
        for mode in ("cold", "warm", "warm2"):
            if mode == "cold":
                evict()
            cache = StatesCache(tmp / "train", comps)
            rng.shuffle(order)
            times = {"cpu": [], "wall": []}
            for s in range(0, size.cache_rows - size.batch + 1, size.batch):
                rows = order[s:s + size.batch]
                with common.Timer() as t:
                    st = cache.read(rows)
                times["cpu"].append(t.cpu)
                times["wall"].append(t.wall)
            assert st[0][layers[0]].shape == (size.batch, size.seq, size.aug_d)
            # reads wait on the disk: wall time is their basis (waiting included)
            res[mode] = {**common.summary(times), "rows_per_s": size.batch / common.median(times["wall"]),
                         "rows_per_s_mean": size.batch * len(times["wall"]) / sum(times["wall"])}
        res["peak_rss_bytes"] = common.peak_rss_bytes()
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def child_memory(size: common.Size, variant: str, out: Path) -> dict:
    """Peak RSS of one variant alone in a process: build, two training steps (AdamW state exists after one)."""
    import torch

    torch.set_num_threads(1)
    base = common.peak_rss_bytes()
    ids, mask = common.batch(size)
    if variant == "cached":
        # cached training never loads the augmenting weights: the composition gets its config only, and
        # states of the right shape stand in for the ones read from disk
        import transformers as T

        from calm_dist import ComposedModel

        anchor = T.LlamaForCausalLM(common.anchor_config(size)).eval()
        model = ComposedModel(anchor, [common.augmenting_config(size)], layer_pairs=[size.pairs])
        states = [{i: torch.randn(size.batch, size.seq, size.aug_d) for i in model.augmenting_layers[0]}]
    else:
        model = common.build_composed(size)
        states = None
    step = common.composed_training_step(model, ids, mask, augmenting_states=states)
    for _ in range(2):
        step()
    return {"variant": variant, "peak_rss_bytes": common.peak_rss_bytes(), "rss_after_import_bytes": base}


CHILDREN = {"steps": child_steps, "matmul": child_matmul, "cache": child_cache}


# ================================================================================================ the parent

def run_child(args: list[str], python: str = sys.executable, timeout: float = 1200) -> dict:
    """Run `python <args> --json F` and return F's JSON; stderr is kept in the error when it fails."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "out.json"
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DS_ACCELERATOR="cpu",
                   TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1",
                   PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        proc = subprocess.run([python, *args, "--json", str(path)], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode != 0 or not path.exists():
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(path.read_text())


def ensure_peer_venv(log) -> str:
    """benchmarks/.venv-peer with calm-pytorch + x-transformers, on top of the main venv's packages."""
    py = PEER_VENV / "bin" / "python"
    probe = "import CALM_pytorch, x_transformers, torch, calm_dist; print(torch.__file__)"
    if py.exists():
        ok = subprocess.run([str(py), "-c", probe], capture_output=True, text=True)
        if ok.returncode == 0:
            return str(py)
    log(f"creating {PEER_VENV.relative_to(REPO)} (calm-pytorch, x-transformers; torch from the main venv)")
    import site
    import torch

    subprocess.run([sys.executable, "-m", "venv", "--clear", str(PEER_VENV)], check=True)
    site_dir = next(Path(p) for p in (PEER_VENV / "lib").glob("python*/site-packages"))
    main_sites = [p for p in site.getsitepackages() if Path(p).exists()]
    (site_dir / "_calm_dist_main_venv.pth").write_text("\n".join(main_sites) + "\n")
    constraints = PEER_VENV / "constraints.txt"
    constraints.write_text(f"torch=={torch.__version__}\n")  # the main venv's torch satisfies it: never replaced
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", str(constraints),
                    *PEER_PINS], check=True)
    ok = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, check=True)
    if not ok.stdout.strip().startswith(str(Path(torch.__file__).parents[1])):
        raise RuntimeError(f"the peer venv resolved another torch: {ok.stdout.strip()}")
    return str(py)


def machine_info() -> dict:
    """benchmarks/machine.py's record, with the versions of the libraries these benchmarks time."""
    import deepspeed
    import torch
    import transformers

    return {**base_machine_info(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "threads_per_process": 1}


def run_zero3(size: common.Size, log) -> dict:
    """P5: the composed model under ZeRO-3 with world 1 and world 2, each rank started by torchrun on loopback."""
    from calm_dist.training.dist_env import free_port

    tmp = Path(tempfile.mkdtemp(prefix="calm_bench_zero3_", dir=os.environ.get("CALM_BENCH_TMP")))
    try:
        anchor, aug = common.build_models(size)
        anchor.save_pretrained(tmp / "anchor")
        aug.save_pretrained(tmp / "augmenting")
        del anchor, aug
        out = {}
        for world in (1, 2):
            report = tmp / f"world{world}"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
                            "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--local_addr=127.0.0.1",
                            str(HERE / "zero3_worker.py"), "--anchor", str(tmp / "anchor"), "--augmenting",
                            str(tmp / "augmenting"), "--pairs", json.dumps([list(p) for p in size.pairs]),
                            "--seq", str(size.seq), "--micro-batch", str(size.zero_batch), "--steps",
                            str(size.zero_steps), "--report", str(report)], check=True, timeout=900, cwd=REPO)
            out[f"world{world}"] = [json.loads((tmp / f"world{world}.rank{r}.json").read_text()) for r in range(world)]
            log(f"  ZeRO-3 world {world}: {time.perf_counter() - t0:.0f} s")
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cost_model(size: common.Size) -> dict:
    from calm_dist.planning import costs
    a, g = common.anchor_config(size), common.augmenting_config(size)
    cached = costs.step_cost(a, g, size.pairs, seq_len=size.seq, states="cached")
    recompute = costs.step_cost(a, g, size.pairs, seq_len=size.seq, states="recompute")
    spec = costs.model_spec(a)
    pc = costs.param_counts(spec)
    attn = costs.attention_flops_per_token(size.seq, spec.d_attn)
    # the P1 baseline: the anchor's forward + input gradients through every block and the head
    anchor_alone = (costs.anchor_forward_flops(spec, size.seq)
                    + spec.num_layers * (2 * pc.matmul_per_block + 2 * attn) + 2 * spec.vocab_size * spec.hidden_size)
    return {"cached": cached.as_dict(), "recompute": recompute.as_dict(), "anchor_alone_per_token": anchor_alone,
            "params": {"anchor": pc.total, "augmenting": costs.param_counts(costs.model_spec(g)).total,
                       "blocks": cached.n_blocks_params}}


def analyse(size: common.Size, r: dict) -> list[dict]:
    """One row per measurement: value, goal, ratio to goal, met?, tokens/s, peak memory."""
    rows = []
    tokens = size.batch * size.seq
    cm = r.get("cost_model", {})
    mib = lambda b: b / 2 ** 20 if b else None  # noqa: E731

    def add(pid, what, value, goal, sense, unit="", tok_s=None, mem=None, note="", predicted=None):
        met = None
        if value is not None and goal is not None:
            met = value <= goal if sense == "<=" else value >= goal
        rows.append({"id": pid, "what": what, "value": value, "goal": f"{sense} {goal}{unit}" if goal is not None
                     else "", "goal_value": goal, "sense": sense,
                     "ratio_to_goal": (value / goal if sense == "<=" else goal / value) if value and goal else None,
                     "met": met, "tokens_per_s": tok_s, "peak_rss_mib": mem, "note": note, "predicted": predicted})

    st = r.get("steps")
    if st:
        a, c, rc = st["anchor_alone"]["median_s"], st["cached"]["median_s"], st["recompute"]["median_s"]
        mem = r.get("memory", {})
        pred1 = cm["cached"]["total"] / cm["anchor_alone_per_token"] if cm else None
        add("P1", "composed step (cached states) / anchor fwd+bwd (input grads)", c / a, 1.10, "<=",
            tok_s=tokens / c, mem=mib(mem.get("cached", {}).get("peak_rss_bytes")), predicted=pred1,
            note=f"step {c:.3f} s vs anchor {a:.3f} s; cost model predicts {pred1:.3f}" if pred1 else "")
        pred2 = cm["cached"]["total"] / cm["recompute"]["total"] if cm else None
        ratio2 = c / rc
        within = abs(ratio2 / pred2 - 1) if pred2 else None
        add("P2", "cached / recompute step time (vs cost model)", ratio2, None, "~", predicted=pred2,
            tok_s=tokens / rc, mem=mib(mem.get("recompute", {}).get("peak_rss_bytes")),
            note=f"predicted {pred2:.3f}; measured/predicted - 1 = {within:+.1%} "
                 f"({'within' if within is not None and within <= 0.10 else 'NOT within'} 10%)" if pred2 else "")
        rows[-1]["met"] = within is not None and within <= 0.10
        rows[-1]["goal"] = "within 10% of the cost model"
        rows[-1]["ratio_to_goal"] = (ratio2 / pred2) if pred2 else None
    def paired(a: dict, b: dict) -> str:
        """The spread of the per-round ratios a/b (the two were timed back to back in each round)."""
        ratios = sorted(x / y for x, y in zip(a["cpu_s"], b["cpu_s"]))
        return (f"per-round ratios: median {common.median(ratios):.3f}, "
                f"middle half {ratios[len(ratios) // 4]:.3f}-{ratios[(3 * len(ratios)) // 4]:.3f}")

    p = r.get("peer")
    if p:
        o, q = p["p3"]["ours"]["median_s"], p["p3"]["peer"]["median_s"]
        pm = r.get("memory", {})
        add("P3", "our training step / CALM-pytorch's (recompute, same shapes)", o / q, 0.8, "<=",
            tok_s=tokens / o, mem=mib(pm.get("recompute", {}).get("peak_rss_bytes")),
            note=f"ours {o:.3f} s ({tokens / o:,.0f} tok/s), peer {q:.3f} s ({tokens / q:,.0f} tok/s, "
                 f"peak RSS {mib(pm.get('peer', {}).get('peak_rss_bytes')) or 0:,.0f} MiB); "
                 + paired(p["p3"]["ours"], p["p3"]["peer"]))
        if "ours_bf16_augmenting" in p["p3"]:
            b = p["p3"]["ours_bf16_augmenting"]["median_s"]
            add("P3b", "P3 with our frozen augmenting forward in bf16 (`model.augmenting_dtype=bf16`)", b / q, 0.8,
                "<=", tok_s=tokens / b, note=f"ours {b:.3f} s ({tokens / b:,.0f} tok/s); the peer stays fp32, "
                                               "so this row is not like for like; "
                                               + paired(p["p3"]["ours_bf16_augmenting"], p["p3"]["peer"]))
        if "ours_compiled" in p["p3"]:
            c = p["p3"]["ours_compiled"]["median_s"]
            add("P3c", "P3 with our frozen decoder blocks compiled (`train.compile=true`), fp32 like the peer",
                c / q, 0.8, "<=", tok_s=tokens / c,
                note=f"ours {c:.3f} s ({tokens / c:,.0f} tok/s); compiled in the untimed warm-up; "
                     + paired(p["p3"]["ours_compiled"], p["p3"]["peer"]))
        if "default" in p["p3"] and "ours_compiled" in p["p3"]:
            default = p["p3"]["default"]
            timed = p["p3"]["ours_compiled" if default["compile"] else "ours"]
            c = timed["median_s"]
            add("P3d", f"P3 with the trainer's defaults for a {default['steps']:,}-step run (`train.compile=auto`: "
                       f"{'on, P3c' if default['compile'] else 'off, P3'})", c / q, 0.7, "<=", tok_s=tokens / c,
                note=f"{default['why']}; " + paired(timed, p["p3"]["peer"]))
        d = p["p4"]
        add("P4", f"greedy decode tok/s ours (KV caches) / CALM-pytorch, {size.new_tokens} new tokens",
            d["ours_cached"]["tokens_per_s"] / d["peer"]["tokens_per_s"], 5.0, ">=", unit="x",
            tok_s=d["ours_cached"]["tokens_per_s"],
            note=f"ours {d['ours_cached']['tokens_per_s']:.1f} tok/s, peer {d['peer']['tokens_per_s']:.1f} tok/s; "
                 + paired(d["peer"], d["ours_cached"]))
        fp32, peer = d["ours_cached"]["tokens_per_s"], d["peer"]["tokens_per_s"]
        compilation = lambda key: f"compilation {d['compile_s'][key]:.1f} s, not in the rounds; "  # noqa: E731
        variants = (  # id, key, goal, what, how its tokens compare
            ("P4h", "ours_bf16", 10.0, "P4 with our frozen models in bf16 (blocks fp32), the peer fp32 as its users "
             "run it", lambda: agreed("bf16_tokens")),
            ("P4c", "ours_compiled", 5.0, "P4 with one compiled graph per decoding step (`compile_step=True`), fp32 "
             "like the peer", lambda: f"tokens equal to the eager steps': {d['ours_compiled_equals_cached']}; "
             + compilation("ours_compiled")),
            ("P4hc", "ours_bf16_compiled", 10.0, "P4h with one compiled graph per decoding step", lambda:
             agreed("bf16_compiled_tokens") + compilation("ours_bf16_compiled")))

        def agreed(key: str) -> str:
            t = d.get(key)
            if t is None:  # a run that did not compare them
                return ""
            return (f"new tokens equal to fp32: {t['equal_to_fp32']} (first difference at {t['first_difference']}, "
                    f"{100 * t['equal_fraction']:.0f}% equal); ")
        for row, key, goal, what, tokens in variants:
            if key in d:
                tok_s = d[key]["tokens_per_s"]
                add(row, what, tok_s / peer, goal, ">=", unit="x", tok_s=tok_s,
                    note=f"{tok_s:.1f} tok/s ({tok_s / fp32:.2f}x our fp32 eager steps); {tokens()}"
                         + paired(d["peer"], d[key]))
        add("P4b", "greedy decode tok/s ours cached / ours uncached", d["ours_cached"]["tokens_per_s"] /
            d["ours_uncached"]["tokens_per_s"], None, ">=", tok_s=d["ours_uncached"]["tokens_per_s"],
            note=f"uncached {d['ours_uncached']['tokens_per_s']:.1f} tok/s; same tokens: "
                 f"{d['ours_cached_equals_uncached']}")
    z = r.get("zero3")
    if z:
        f1 = max(x["frozen"]["resident_bytes"] for x in z["world1"])
        f2 = max(x["frozen"]["resident_bytes"] for x in z["world2"])
        t2 = sum(x["tokens_per_s_per_rank"] for x in z["world2"])
        t1 = sum(x["tokens_per_s_per_rank"] for x in z["world1"])
        add("P5", "ZeRO-3 per-rank resident frozen bytes, world 2 / world 1", f2 / f1, 0.55, "<=",
            tok_s=t2, mem=mib(max(x["peak_rss_bytes"] for x in z["world2"])),
            note=f"{f1 / 2**20:.1f} MiB -> {f2 / 2**20:.1f} MiB per rank; world 1 peak RSS "
                 f"{mib(z['world1'][0]['peak_rss_bytes']):,.0f} MiB; ZeRO-3 tokens/s world 1 {t1:,.0f}, "
                 f"world 2 {t2:,.0f}")
    mm = r.get("matmul") or {}
    if st and cm:
        peak1 = st["matmul"]["flops_per_s_median"]  # timed in the same rounds as the steps
        peak2 = mm.get("float32_2t", {}).get("flops_per_s_median", float("nan"))
        flops_rec = cm["recompute"]["total"] * tokens
        mfu = flops_rec / rc / peak1
        bf16_1t = mm.get("bfloat16_1t", {}).get("flops_per_s_median", float("nan"))
        add("P6", "MFU, composed step (recompute) / fp32 matmul peak (1 thread)", mfu, 0.30, ">=",
            tok_s=tokens / rc,
            note=f"{flops_rec / rc / 1e9:.1f} GFLOP/s of {peak1 / 1e9:.1f} (1-thread {matmul_n(size)}^3 "
                 f"fp32 matmul timed in the same rounds; separately: 2 threads {peak2 / 1e9:.1f}, "
                 f"bf16 1 thread {bf16_1t / 1e9:.0f}); cached step MFU "
                 f"{cm['cached']['total'] * tokens / c / peak1:.1%}")
        if z and peak2 == peak2:
            zt = sum(x["tokens_per_s_per_rank"] for x in z["world2"])
            zmfu = zt * cm["recompute"]["total"] / peak2
            add("P6b", "MFU, ZeRO-3 2 ranks / fp32 matmul peak (2 threads)", zmfu, None, ">=", tok_s=zt,
                note=f"wall clock, micro-batch {size.zero_batch} x {size.seq} per rank; the 2-thread peak is "
                     f"timed in its own phase, not interleaved: indicative only")
    ca = r.get("cache")
    if ca and st:
        consume = size.batch / st["cached"]["median_s"]
        # cold: the mean over one pass (the first reads after eviction wait on the disk), not the median
        add("P7", "cache reader rows/s (cold) / training consumption rows/s", ca["cold"]["rows_per_s_mean"] / consume,
            5.0, ">=", unit="x", mem=mib(ca.get("peak_rss_bytes")),
            note=f"read cold {ca['cold']['rows_per_s_mean']:,.0f} rows/s (pass mean), "
                 f"warm {ca['warm']['rows_per_s']:,.0f} rows/s "
                 f"({ca['bytes_per_row'] / 2**20:.2f} MiB/row); step consumes {consume:.2f} rows/s")
    return rows


def fmt(x, digits=3):
    if x is None:
        return ""
    if isinstance(x, bool):
        return "yes" if x else "**no**"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def markdown(size: common.Size, info: dict, rows: list[dict], command: str) -> str:
    head = (f"Machine: {info.get('cpu_model')} ({info.get('cpus')} CPUs, {info.get('isa')}), "
            f"load average at start {' '.join(info.get('loadavg_at_start', []))}; {info.get('date_utc')}; "
            f"torch {info.get('torch')}, deepspeed {info.get('deepspeed')}, transformers {info.get('transformers')}; "
            f"1 thread per process.\n\nCommand: `{command}`\n\n"
            f"Size `{size.name}`: anchor Llama d={size.anchor_d} x {size.anchor_layers} layers ({size.anchor_heads} "
            f"heads), augmenting Llama d={size.aug_d} x {size.aug_layers} ({size.aug_heads} heads), SwiGLU "
            f"{size.ffn_mult}x, vocab {size.vocab}, pairs {size.pairs}, batch {size.batch} x seq {size.seq}, fp32; "
            f"medians of {size.repeats} interleaved repeats after warm-up, of process CPU time (one thread per "
            f"process: time spent waiting for the shared cores is excluded; wall-clock medians are in the JSON).\n\n")
    lines = ["| id | measurement | value | goal | met | tokens/s | peak RSS MiB | notes |",
             "|---|---|---:|---|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['id']} | {r['what']} | {fmt(r['value'])} | {r['goal']} | {fmt(r['met'])} | "
                     f"{fmt(r['tokens_per_s'])} | {fmt(r['peak_rss_mib'])} | {r['note']} |")
    return head + "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small models, fewer repeats (a smoke run, ~2 min)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--only", default="", help="comma-separated subset of P1..P7 (P1/P2/P6 share one child)")
    ap.add_argument("--no-peer", action="store_true", help="skip P3/P4 (no pip install)")
    ap.add_argument("--from-json", help="redo the table of a saved results JSON (no measurement)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--size", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    size = common.SIZES[args.size or ("quick" if args.quick else "full")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.from_json:  # rebuild the table from a saved run (no measurement)
        results = json.loads(Path(args.from_json).read_text())
        size = common.SIZES[results["size"]["name"]]
        results["rows"] = rows = analyse(size, results)
        md = markdown(size, results["machine"], rows, results["command"])
        common.write_json(args.from_json, results)
        Path(args.from_json).with_suffix(".md").write_text(md)
        print(md)
        return 0

    if args.child:  # inside a child process
        result = child_memory(size, args.variant, out) if args.child == "memory" else CHILDREN[args.child](size, out)
        common.write_json(args.json, result)
        return 0

    only = {s.strip().upper() for s in args.only.split(",") if s.strip()}
    want = lambda *ids: not only or bool(only & set(ids))  # noqa: E731
    started = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - started:6.0f} s] {msg}", flush=True)  # noqa: E731
    command = "python benchmarks/run.py" + (" --quick" if args.quick else "") + \
        (f" --only {args.only}" if args.only else "") + (" --no-peer" if args.no_peer else "")
    results: dict = {"size": size.as_dict(), "machine": machine_info(), "command": command,
                     "cost_model": cost_model(size), "errors": {}}
    base = [str(HERE / "run.py"), "--size", size.name, "--out", str(out)]

    def attempt(key, fn):
        try:
            results[key] = fn()
        except Exception as e:  # noqa: BLE001  (one failed measurement must not lose the others)
            results["errors"][key] = f"{type(e).__name__}: {e}"
            log(f"  {key} FAILED: {str(e).splitlines()[0] if str(e) else type(e).__name__}")

    if want("P1", "P2", "P6", "P7"):
        log("P1/P2/P6: anchor alone, cached and recompute steps, interleaved")
        attempt("steps", lambda: run_child(base + ["--child", "steps"]))
    if want("P6"):
        log("P6: matmul peak")
        attempt("matmul", lambda: run_child(base + ["--child", "matmul"]))
    peer_py = None
    if want("P3", "P4") and not args.no_peer:
        log("P3/P4: peer venv")
        attempt("peer_venv", lambda: ensure_peer_venv(log))
        peer_py = results.get("peer_venv")
        if peer_py:
            log("P3/P4: ours vs CALM-pytorch, interleaved")
            attempt("peer", lambda: run_child([str(HERE / "peer_bench.py"), "--size", size.name, "--out", str(out)],
                                              python=peer_py))
    if want("P1", "P3"):
        log("peak RSS of each variant alone")
        mem = {}
        for variant in ("cached", "recompute"):
            try:
                mem[variant] = run_child(base + ["--child", "memory", "--variant", variant])
            except Exception as e:  # noqa: BLE001
                results["errors"][f"memory_{variant}"] = str(e)
        if peer_py:
            try:
                mem["peer"] = run_child([str(HERE / "peer_bench.py"), "--size", size.name, "--memory-only"],
                                        python=peer_py)
            except Exception as e:  # noqa: BLE001
                results["errors"]["memory_peer"] = str(e)
        results["memory"] = mem
    if want("P5", "P6"):
        log("P5: ZeRO-3 world 1 and world 2")
        attempt("zero3", lambda: run_zero3(size, log))
    if want("P7"):
        log("P7: augmenting-state cache reader")
        attempt("cache", lambda: run_child(base + ["--child", "cache"]))

    rows = analyse(size, results)
    results["rows"] = results_rows = rows
    results["wall_s"] = time.perf_counter() - started
    stem = "results_quick" if size.name == "quick" else "results"
    common.write_json(out / f"{stem}.json", results)
    md = markdown(size, results["machine"], results_rows, command)
    if results["errors"]:
        md += "\nErrors:\n" + "\n".join(f"- {k}: {v.splitlines()[0]}" for k, v in results["errors"].items()) + "\n"
    (out / f"{stem}.md").write_text(md)
    print("\n" + md)
    log(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
