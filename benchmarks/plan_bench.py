#!/usr/bin/env python
"""P9p, P9 and P10: the planner's predictions against measured ZeRO-3 and ZeRO-2 steps on this CPU, scaling over
ranks, and a long sequence.

    python benchmarks/plan_bench.py [--size quick|full] [--only P9p,P9,P10] [--repeats 5] [--out benchmarks/results]
                                    [--profile shipped|fresh|PATH]

  P9p  every option `calm-dist plan --recommend --hardware cpu` scores for the benchmark composition
       (benchmarks/common.py sizes; one rank: activation checkpointing x cached/recomputed states x every
       micro-batch dividing the batch, and the frozen models whole under ZeRO-2 at the full micro-batch; two
       ranks, at the full micro-batch: frozen blocks sharded, replicated or whole), each run as the trainer
       runs it (benchmarks/plan_worker.py), its predicted step time beside the measured median        within 15%
  P9   tokens/s of 2 ranks (the configuration the planner recommends for 2 ranks) / 2 x tokens/s of 1 rank   >= 0.85
  P10  seq 2,048 x 1 row with activation checkpointing against seq 256 x 1 row: the peak-RSS increase against
       the cost model's activation bytes (within 10%), and tokens/s / the seq-256 step's               >= 0.7
       (the RSS from processes under a fixed glibc mmap threshold, the steps' time from processes without it)

The options that share an engine (checkpointing, states) are timed round-robin inside one process; each micro-
batch size and each DeepSpeed JSON needs a process of its own, run one after another. One rank's time basis is
its CPU time (process_time: one thread, so the time its work took, less the time other jobs held the core); two
ranks wait on each other in every collective, so their basis is wall time, the slower rank's. The cores other jobs
kept busy during each process (`others_cores`) are recorded beside its figures: on this 2-core machine, a second
rank has no spare core, and any other job takes time from one of the two ranks.

The predictions come from a CPU profile: the one `--hardware cpu` ships (default), one measured at the start of this
run (`--profile fresh`: benchmarks/cpu_profile.py into --out, so predicted and measured share the machine's state
of the hour; this machine's speed drifts by 10-20% between hours), or a profile JSON's path. Every P9p process also
times benchmarks/speed_probe.py's workload in its round-robin (rank 0): the table's `speed` column, that probe against
the one the profile recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
import common  # noqa: E402
from data_bench import Usage  # noqa: E402
from machine import machine_info  # noqa: E402
from speed_probe import reference_seconds  # noqa: E402

from calm_dist.training.dist_env import free_port  # noqa: E402

VARIANTS = "off:recompute,on:recompute,off:cached,on:cached"
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def launch(work: Path, size: common.Size, *, world: int, rows: int, micro_batch: int, ds_config: str,
           variants: str, repeats: int, seq: int | None = None, tag: str, env_extra: dict | None = None,
           speed_probe: bool = False) -> dict:
    """One plan_worker process per rank (torchrun for 2); returns each rank's report and the others' load."""
    report = work / tag
    cmd = [str(HERE / "plan_worker.py"), "--anchor", str(work / "anchor"), "--augmenting", str(work / "augmenting"),
           "--pairs", json.dumps([list(p) for p in size.pairs]), "--seq", str(seq or size.seq), "--rows", str(rows),
           "--micro-batch", str(micro_batch), "--ds-config", ds_config, "--variants", variants,
           "--repeats", str(repeats), "--report", str(report)] + (["--speed-probe"] if speed_probe else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=f"{common.REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env_extra or {}))
    if world == 1:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()))
        cmd = [sys.executable, *cmd]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "--local_addr=127.0.0.1", *cmd]
    log = work / f"{tag}.log"
    with open(log, "w") as out, Usage() as usage:
        proc = subprocess.run(cmd, cwd=common.REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"{tag} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
    ranks = [json.loads((work / f"{tag}.rank{r}.json").read_text()) for r in range(world)]
    return {"tag": tag, "world": world, "rows": rows, "micro_batch": micro_batch, "ds_config": ds_config,
            "seq": seq or size.seq, "ranks": ranks, "usage": usage.as_dict()}


def step_time(run: dict, variant: str, basis: str = "measured") -> float:
    """The run's step time for a variant. measured: CPU time with one rank, the slower rank's wall time with more
    (ranks wait on each other); cpu: the slower rank's CPU time, i.e. the step with a core to itself and nothing
    else running (gloo's loopback transfers are CPU work, so they stay in it; waiting for a core does not)."""
    per_rank = [r["times"][variant] for r in run["ranks"]]
    if run["world"] == 1 or basis == "cpu":
        return max(t["median_s"] for t in per_rank)
    return max(t["wall_median_s"] for t in per_rank)


def plan_options(size: common.Size, world: int, rows: int, seq: int | None = None, profile: str = "cpu"):
    """What the planner says of every option, on a CPU profile ("cpu": the shipped calm_dist/planning/cpu_profile.json;
    else a profile JSON's path)."""
    from calm_dist.planning.hardware import hardware
    from calm_dist.planning.recommend import recommend

    a, g = common.anchor_config(size), common.augmenting_config(size)
    return recommend(a.to_dict(), g.to_dict(), size.pairs, rows_per_rank=rows, nodes=1, gpus_per_node=world,
                     seq_len=seq or size.seq, dtype="fp32", hardware=hardware(profile),
                     states=("recompute", "cached"))


def ds_for(frozen: str) -> str:
    # the benchmark models' block tensors are all below zero3_small_models' persistence threshold (1e6 elements)
    return {"shard": "zero3", "replicate": "zero3_small_models", "whole": "zero2"}[frozen]


def variant_of(option) -> str:
    return f"ckpt_{'on' if option.activation_checkpointing else 'off'}:{option.states}"


def measure_p9p(work: Path, size: common.Size, repeats: int, log, worlds=(1, 2), profile: str = "cpu") -> dict:
    from calm_dist.planning.hardware import shipped_cpu_profile

    rows, out = size.batch, {"runs": [], "options": []}
    # the profile's own speed probe (None for a profile measured without one: no speed column then)
    out["speed_probe_reference_s"] = reference_seconds(json.loads(
        Path(shipped_cpu_profile() if profile == "cpu" else profile).read_text()))
    # P9 sets the planner's 2-rank choice beside the same option on one rank: both run, whatever their micro-batch
    choice = plan_options(size, 2, rows, profile=profile).best
    for_p9 = set() if choice is None else {(choice.option.micro_batch, choice.option.frozen.replace("replicate", f))
                                            for f in ("replicate", "shard")}
    for world in worlds:
        rec = plan_options(size, world, rows, profile=profile)
        groups = {}
        for s in rec.scored:
            if world == 1 and s.option.frozen == "replicate":
                continue  # one rank: replicating is sharding over a world of one
            if ((world == 2 or s.option.frozen == "whole") and s.option.micro_batch != rows
                    and (s.option.micro_batch, s.option.frozen) not in for_p9):
                continue  # the frozen-weight choice at the full micro-batch only (each process costs minutes)
            groups.setdefault((s.option.micro_batch, s.option.frozen), []).append(s)
        for (mb, frozen), scored in sorted(groups.items()):
            tag = f"p9p_w{world}_mb{mb}_{frozen}"
            run = launch(work, size, world=world, rows=rows, micro_batch=mb, ds_config=ds_for(frozen),
                         variants=VARIANTS, repeats=repeats, tag=tag, speed_probe=True)
            out["runs"].append({k: v for k, v in run.items() if k != "ranks"} | {"ranks": run["ranks"]})
            for s in scored:
                out["options"].append({"world": world, "label": s.option.label(), "predicted_s": s.step_s,
                                       "tag": tag, "variant": variant_of(s.option), "fits": s.fits,
                                       "others_cores": run["usage"]["others_cores"],
                                       "terms": s.plan.time["cpu_terms"]})
            derive(out)
            log(f"  {tag}: " + ", ".join(f"{o['label'].split(', mb')[0]} {o['measured_s']:.3f}/{o['predicted_s']:.3f}"
                                         for o in out["options"][-len(scored):])
                + f" s (other jobs {run['usage']['others_cores']:.2f} cores"
                + (f", speed {out['options'][-1]['speed']:.2f} x the profile's)" if "speed" in out["options"][-1]
                   else ")"))
        out[f"recommended_world{world}"] = rec.best.option.label() if rec.best else None
        out[f"predicted_world{world}"] = [{"label": s.option.label(), "step_s": s.step_s, "fits": s.fits}
                                          for s in rec.scored]
    return out


def derive(p9p: dict) -> None:
    """Each option's measured step times from its run's rank reports (also for --from-json). Where the run timed the
    speed probe and the profile recorded it, `speed` = probe in this run / probe at profile time (above 1: the
    machine's kernels ran slower beside these steps than when it was profiled). A diagnostic beside the errors, not a
    correction of them: in some processes it reads slow while their steps do not (benchmarks/README.md, P9p)."""
    runs = {r["tag"]: r for r in p9p["runs"]}
    reference = p9p.get("speed_probe_reference_s")
    for o in p9p["options"]:
        run = runs[o["tag"]]
        o["measured_s"] = step_time(run, o["variant"])
        o["measured_cpu_s"] = step_time(run, o["variant"], "cpu")
        o["error"] = o["measured_s"] / o["predicted_s"] - 1
        o["error_cpu"] = o["measured_cpu_s"] / o["predicted_s"] - 1
        probe = run["ranks"][0]["times"].get("speed_probe")
        if reference and probe:
            o["speed"] = probe["median_s"] / reference


def measure_p9(p9p: dict, size: common.Size) -> dict:
    """2 ranks (the planner's choice among the measured 2-rank options) vs 1 rank, the same option otherwise;
    wall time (what this shared machine gave) and each process's CPU time (a core per rank, nothing else)."""
    two = [o for o in p9p["options"] if o["world"] == 2]
    chosen = next(o for o in two if o["label"] == p9p["recommended_world2"]) if p9p["recommended_world2"] in \
        [o["label"] for o in two] else min(two, key=lambda o: o["measured_s"])
    same = chosen["label"].replace("replicate", "shard")
    one = next(o for o in p9p["options"] if o["world"] == 1 and o["label"] == same)
    tokens = size.batch * size.seq
    out = {"world2_option": chosen["label"], "world1_option": one["label"],
           "others_cores": [one["others_cores"], chosen["others_cores"]]}
    for basis, key in (("wall", "measured_s"), ("cpu", "measured_cpu_s")):
        tok1, tok2 = tokens / one[key], 2 * tokens / chosen[key]
        out[basis] = {"tokens_per_s_world1": tok1, "tokens_per_s_world2": tok2, "scaling": tok2 / (2 * tok1)}
    out["scaling"] = out["wall"]["scaling"]
    return out


def measure_p10(work: Path, size: common.Size, repeats: int, log) -> dict:
    from calm_dist.planning import activation_memory

    out = {}
    for seq in (256, 2048):
        # glibc serves a large allocation from its heap once the dynamic mmap threshold has grown, and keeps it
        # when freed: the peak RSS would then count freed tensors. A fixed threshold maps each tensor above 128 KiB
        # on its own and unmaps it when freed, so the peak RSS follows the live tensors (both runs alike). It also
        # makes every such tensor fault its pages in again (a step ~30% slower, benchmarks/README.md), so the steps
        # are timed in a process of their own under glibc's default, as the trainer runs.
        run = launch(work, size, world=1, rows=1, micro_batch=1, ds_config="zero3", variants="on:recompute",
                     repeats=repeats, seq=seq, tag=f"p10_seq{seq}", env_extra=MALLOC_ENV)
        timed = launch(work, size, world=1, rows=1, micro_batch=1, ds_config="zero3", variants="on:recompute",
                       repeats=repeats, seq=seq, tag=f"p10_seq{seq}_default_allocator")
        r = run["ranks"][0]
        out[f"seq{seq}"] = {"step_s": timed["ranks"][0]["times"]["ckpt_on:recompute"]["median_s"],
                            "step_s_fixed_mmap_threshold": r["times"]["ckpt_on:recompute"]["median_s"],
                            "peak_rss_bytes": r["peak_rss_bytes"], "step_rss_peak_bytes": r["step_rss_peak_bytes"],
                            "step_rss_start_bytes": r["step_rss_start_bytes"],
                            "others_cores": max(run["usage"]["others_cores"], timed["usage"]["others_cores"])}
        log(f"  P10 seq {seq}: step {out[f'seq{seq}']['step_s']:.3f} s "
            f"({out[f'seq{seq}']['step_s_fixed_mmap_threshold']:.3f} s under the fixed mmap threshold), RSS during a "
            f"step {r['step_rss_start_bytes'] / 2**20:.0f} -> {r['step_rss_peak_bytes'] / 2**20:.0f} MiB, process "
            f"peak {r['peak_rss_bytes'] / 2**20:.0f} MiB")
    a, g = common.anchor_config(size), common.augmenting_config(size)
    # the peak of the step (the larger of its forward and backward moments); zero3: the models load under
    # zero.Init, whose F.linear keeps every Linear's input
    act = {seq: activation_memory.activation_memory(a.to_dict(), g.to_dict(), size.pairs, tokens=seq, dtype="fp32",
                                                    activation_checkpointing=True, zero3_linear=True)
           for seq in (256, 2048)}
    for seq, am in act.items():
        out[f"seq{seq}"]["predicted_activations"] = am.as_dict()
    measured = out["seq2048"]["step_rss_peak_bytes"] - out["seq256"]["step_rss_peak_bytes"]
    out["process_peak_increase_bytes"] = out["seq2048"]["peak_rss_bytes"] - out["seq256"]["peak_rss_bytes"]
    predicted = act[2048].total - act[256].total
    # each step's own rise above the RSS before it, beside the peaks' difference: the two processes start their
    # steps from different RSS, and a seq-256 step peaks in the optimizer (AdamW's temporaries over the blocks'
    # weights), not in its activations
    rise = {seq: out[f"seq{seq}"]["step_rss_peak_bytes"] - out[f"seq{seq}"]["step_rss_start_bytes"]
            for seq in (256, 2048)}
    out.update(step_rss_rise_bytes={str(k): v for k, v in rise.items()},
               predicted_peak_bytes={str(k): am.total for k, am in act.items()},
               seq2048_rise_vs_predicted_peak=rise[2048] / act[2048].total - 1)
    out.update(rss_increase_bytes=measured, predicted_activation_increase_bytes=predicted,
               rss_vs_predicted=measured / predicted - 1,
               tokens_per_s_ratio=(2048 / out["seq2048"]["step_s"]) / (256 / out["seq256"]["step_s"]),
               tokens_per_s_ratio_fixed_mmap_threshold=(2048 / out["seq2048"]["step_s_fixed_mmap_threshold"])
               / (256 / out["seq256"]["step_s_fixed_mmap_threshold"]))
    return out


def markdown(size: common.Size, res: dict) -> str:
    lines = [f"# P9p / P9 / P10 ({size.name} size), {res['machine']['date_utc']}", "",
             f"Load average at start {res['machine'].get('loadavg_at_start')}; `others` = cores other jobs kept "
             "busy during that process.", ""]
    if "profile" in res:
        lines += [f"Predictions from the CPU profile {res['profile']['source']} (`{res['profile']['path']}`, measured "
                  f"{res['profile']['measured']}).", ""]
    if "P9p" in res:
        probed = all("speed" in o for o in res["P9p"]["options"])
        if probed:
            lines += [f"Speed probe (benchmarks/speed_probe.py) at profile time "
                      f"{res['P9p']['speed_probe_reference_s'] * 1e3:.1f} ms; `speed` = the probe timed beside "
                      "these steps (rank 0) / that: above 1, the kernels ran slower than when profiled.", ""]
        lines += ["| ranks | option | predicted s | measured s | measured / predicted - 1 | slower rank's CPU s "
                  "| CPU / predicted - 1 | others |" + (" speed |" if probed else ""),
                  "|---:|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if probed else "")]
        for o in res["P9p"]["options"]:
            lines.append(f"| {o['world']} | {o['label']} | {o['predicted_s']:.3f} | {o['measured_s']:.3f} | "
                         f"{o['error']:+.1%} | {o['measured_cpu_s']:.3f} | {o['error_cpu']:+.1%} | "
                         f"{o['others_cores']:.2f} |" + (f" {o['speed']:.3f} |" if probed else ""))
        for world in (1, 2):
            opts = [o for o in res["P9p"]["options"] if o["world"] == world]
            if not opts:
                continue
            for key, basis in (("error", "measured"), ("error_cpu", "CPU time")):
                errs = [abs(o[key]) for o in opts]
                lines.append(f"- {world} rank(s), {basis}: {sum(e <= 0.15 for e in errs)} of {len(errs)} options "
                             f"within 15%, largest {max(errs):.1%}")
        lines += ["", f"Recommended: 1 rank {res['P9p'].get('recommended_world1')}; 2 ranks "
                      f"{res['P9p'].get('recommended_world2')}.", ""]
    if "P9" in res:
        p = res["P9"]
        for basis in ("wall", "cpu"):
            q = p[basis]
            lines.append(f"- P9 ({basis} time): 2 ranks ({p['world2_option']}) {q['tokens_per_s_world2']:.0f} "
                         f"tokens/s, 1 rank ({p['world1_option']}) {q['tokens_per_s_world1']:.0f} tokens/s: scaling "
                         f"{q['scaling']:.2f}")
        lines += [f"  (other jobs took {p['others_cores'][0]:.2f} / {p['others_cores'][1]:.2f} cores)", ""]
    if "P10" in res:
        p = res["P10"]
        fixed = p.get("tokens_per_s_ratio_fixed_mmap_threshold")  # absent from the runs before it was measured apart
        lines += [f"P10: peak RSS during a step +{p['rss_increase_bytes'] / 2**20:.0f} MiB from seq 256 to 2048 against "
                  f"{p['predicted_activation_increase_bytes'] / 2**20:.0f} MiB of activations predicted "
                  f"({p['rss_vs_predicted']:+.1%}); tokens/s ratio {p['tokens_per_s_ratio']:.2f}"
                  + (f" (under the RSS runs' fixed mmap threshold: {fixed:.2f})" if fixed is not None else "") + "."]
        if "step_rss_rise_bytes" in p:
            rise, peak = p["step_rss_rise_bytes"], p["predicted_peak_bytes"]
            lines.append(f"The seq-2,048 step alone: +{rise['2048'] / 2**20:.0f} MiB above the RSS before it against a "
                         f"predicted activation peak of {peak['2048'] / 2**20:.0f} MiB "
                         f"({p['seq2048_rise_vs_predicted_peak']:+.1%}); the seq-256 step +{rise['256'] / 2**20:.0f} "
                         f"MiB (activations predicted {peak['256'] / 2**20:.0f} MiB; the optimizer's step peaks higher "
                         "at that length).")
        lines.append("")
    return "\n".join(lines)


def cpu_profile(source: str, out: Path, log) -> dict:
    """The profile the predictions use: {source, path, measured (its date)}; "fresh" runs cpu_profile.py first."""
    from calm_dist.planning.hardware import shipped_cpu_profile

    if source == "shipped":
        path = shipped_cpu_profile()
    elif source == "fresh":
        path = str(out / "cpu_profile_fresh.json")
        log("measuring the CPU profile (benchmarks/cpu_profile.py)")
        subprocess.run([sys.executable, str(HERE / "cpu_profile.py"), "--out", path], cwd=common.REPO, check=True,
                       stdout=subprocess.DEVNULL)
    else:
        path = source
    measured = json.loads(Path(path).read_text()).get("machine", {}).get("date_utc")
    return {"source": source, "path": path, "measured": measured}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="quick", choices=sorted(common.SIZES))
    ap.add_argument("--only", default="P9p,P9,P10")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--world", type=int, choices=[1, 2], default=None, help="P9p alone: one world size only")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--from-json", help="redo the derived figures and the table of a results JSON, no measurement")
    ap.add_argument("--profile", default="shipped",
                    help="the CPU profile of the predictions: shipped (what --hardware cpu reads), fresh (measured by "
                         "benchmarks/cpu_profile.py at the start of this run, into --out) or a profile JSON's path")
    args = ap.parse_args()
    size = common.SIZES[args.size]
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        if "P9p" in res:
            derive(res["P9p"])
            if "P9" in res:
                res["P9"] = measure_p9(res["P9p"], size)
        common.write_json(args.from_json, res)
        Path(args.from_json).with_suffix(".md").write_text(markdown(size, res))
        print(markdown(size, res))
        return 0
    only = set(args.only.split(","))
    started = __import__("time").perf_counter()

    def log(msg):
        print(f"[{__import__('time').perf_counter() - started:5.0f} s] {msg}", flush=True)

    res = {"machine": machine_info(), "size": size.as_dict(), "repeats": args.repeats}
    out = Path(args.out)
    res["profile"] = profile = cpu_profile(args.profile, out, log)
    work = Path(tempfile.mkdtemp(prefix="calm_plan_bench_"))
    try:
        anchor, aug = common.build_models(size)
        anchor.save_pretrained(work / "anchor")
        aug.save_pretrained(work / "augmenting")
        del anchor, aug
        if only & {"P9p", "P9"}:
            worlds = (1, 2) if "P9" in only or args.world is None else (args.world,)
            res["P9p"] = measure_p9p(work, size, args.repeats, log, worlds, profile["path"])
            if "P9" in only:
                res["P9"] = measure_p9(res["P9p"], size)
                log(f"  P9 scaling {res['P9']['scaling']:.2f}")
        if "P10" in only:
            res["P10"] = measure_p10(work, size, args.repeats, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["loadavg_at_end"] = open("/proc/loadavg").read().split()[:3]
    common.write_json(out / f"plan_bench_{size.name}.json", res)
    (out / f"plan_bench_{size.name}.md").write_text(markdown(size, res))
    print(markdown(size, res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
