"""One rank of the P9p / P9 / P10 measurements: ZeRO-3 or ZeRO-2 training steps of the benchmark composition under
the options `calm-dist plan --recommend` scores, timed round-robin inside one process.

Started by benchmarks/plan_bench.py (torchrun on loopback, or directly for one rank) with RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT set. As the trainer does: under a stage-3 JSON the models load straight into ZeRO-3 shards
(HfDeepSpeedConfig alive during from_pretrained) and frozen decoder blocks are ZeRO-3 leaves
(calm_dist.training.parallelize); under stage 2 they load whole and nothing marks them; `deepspeed.initialize` gets
the shipped JSON named by --ds-config with this run's batch sizes. One process serves every option that needs no
other engine: activation checkpointing is switched per call (the anchor blocks' forwards swapped, as
`checkpoint_anchor_blocks` wraps them), and the cached option passes the augmenting states computed once beforehand
(`augmenting_states=`), so the augmenting weights are never gathered in its steps. Micro-batch size and the
DeepSpeed JSON need an engine of their own: plan_bench.py starts one process per pair.

    python benchmarks/plan_worker.py --anchor DIR --augmenting DIR --pairs '[[3,1],[7,3]]' --seq 128 \
        --rows 4 --micro-batch 2 --ds-config zero3 --variants off:recompute,on:cached --repeats 5 --report OUT

Every rank writes OUT.rank<r>.json: per variant the CPU and wall seconds of each timed optimizer step, and
the peak RSS of the process. With --speed-probe, benchmarks/speed_probe.py's workload runs as one more entry of
the round-robin, on rank 0 alone while the other ranks wait (one busy core, as when a CPU profile records it):
rank 0's `speed_probe` times are the machine's speed while these steps ran.
"""
from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import common  # noqa: E402  (pins threads, DS_ACCELERATOR=cpu)

import torch  # noqa: E402


def parse_variants(text: str) -> list[tuple[bool, str]]:
    """'off:recompute,on:cached' -> [(False, 'recompute'), (True, 'cached')]"""
    out = []
    for item in text.split(","):
        ckpt, _, states = item.partition(":")
        out.append((ckpt == "on", states))
    return out


def variant_name(ckpt: bool, states: str) -> str:
    return f"ckpt_{'on' if ckpt else 'off'}:{states}"


OP_KINDS = (("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
            ("attention", ("scaled_dot_product", "flash_attention")),
            ("optimizer", ("_foreach", "aten::lerp", "aten::addcdiv", "aten::addcmul", "aten::sqrt")))


# ops that move no data (views, allocation): their cost is dispatch, a fixed cost per call, not bandwidth
METADATA_OPS = {"view", "_unsafe_view", "reshape", "transpose", "t", "as_strided", "expand", "permute", "slice",
                "select", "unsqueeze", "squeeze", "detach", "alias", "empty", "empty_like", "empty_strided", "split",
                "chunk", "narrow", "unbind", "lift_fresh", "resolve_conj", "resolve_neg", "_reshape_alias",
                "contiguous", "to", "_to_copy_view", "matmul", "linear", "flatten", "result_type"}


def profile_step(fn) -> dict:
    """Self CPU seconds of one call's aten ops, by kind (matmul, attention, optimizer, the rest: elementwise), and
    of everything else (autograd and DeepSpeed bookkeeping, Python): `other`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with common.Timer() as t:
            fn()
    out = {"matmul": 0.0, "attention": 0.0, "optimizer": 0.0, "elementwise": 0.0, "other": 0.0}
    for e in prof.key_averages():
        kind = next((k for k, keys in OP_KINDS if any(x in e.key for x in keys)),
                    "elementwise" if e.key.startswith("aten::") and e.key[6:] not in METADATA_OPS else "other")
        out[kind] += e.self_cpu_time_total / 1e6
    out["cpu_s"] = t.cpu
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--anchor", required=True)
    ap.add_argument("--augmenting", required=True)
    ap.add_argument("--pairs", required=True, help="JSON list of [augmenting_layer, anchor_layer]")
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--rows", type=int, required=True, help="rows per rank per optimizer step")
    ap.add_argument("--micro-batch", type=int, required=True)
    ap.add_argument("--ds-config", default="zero3", help="a shipped DeepSpeed JSON's name or a path")
    ap.add_argument("--variants", default="off:recompute,on:recompute,off:cached,on:cached")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--profile", action="store_true",
                    help="also profile steps of the first variant: self CPU seconds of their aten ops by kind, the "
                         "median over --profile-repeats steps")
    ap.add_argument("--profile-repeats", type=int, default=5)
    ap.add_argument("--speed-probe", action="store_true",
                    help="also time benchmarks/speed_probe.py's workload in the round-robin (rank 0)")
    ap.add_argument("--report", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.rows % args.micro_batch:
        raise SystemExit(f"--rows {args.rows} is not a multiple of --micro-batch {args.micro_batch}")
    accum = args.rows // args.micro_batch

    import deepspeed
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    from calm_dist.model import backbones
    from calm_dist.model.composition import ComposedModel, position_ids_from_mask
    from calm_dist.model.io import load_causal_lm
    from calm_dist.shipped import find_shipped
    from calm_dist.training.dist_env import DistEnv, init_process_group, shut_down_process_group
    from calm_dist.training.ds_config import zero_stage
    from calm_dist.training.parallelize import mark_zero3_leaf_blocks

    env = DistEnv.from_environ()
    init_process_group(env, 600)
    world = env.world_size
    ds = json.loads(find_shipped(args.ds_config, "ds_configs").read_text())
    ds.update({"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": accum,
               "train_batch_size": args.rows * world, "gradient_clipping": 1.0, "bf16": {"enabled": False},
               "steps_per_print": 10 ** 9, "wall_clock_breakdown": False})
    stage3 = zero_stage(ds) == 3
    hf_ds_config = HfDeepSpeedConfig(ds) if stage3 else None  # referenced until the end: ZeRO-3 loading needs it
    anchor = load_causal_lm(args.anchor)
    augmenting = load_causal_lm(args.augmenting)
    torch.manual_seed(0)
    pairs = [tuple(p) for p in json.loads(args.pairs)]
    model = ComposedModel(anchor, [augmenting], layer_pairs=[pairs])
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    if stage3:
        mark_zero3_leaf_blocks([model.anchor, *model.augmenting])
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)

    # activation checkpointing as the trainer applies it (parallelize.checkpoint_anchor_blocks), switchable
    blocks = backbones.decoder_blocks(model.anchor)
    first = min(j for _, j in pairs)
    eager = {j: blocks[j].forward for j in range(first + 1, len(blocks))}
    wrapped = {j: partial(torch.utils.checkpoint.checkpoint, f, use_reentrant=False) for j, f in eager.items()}

    def checkpointing(on: bool) -> None:
        for j in eager:
            blocks[j].forward = wrapped[j] if on else eager[j]

    g = torch.Generator().manual_seed(100 + env.rank)
    vocab = anchor.config.vocab_size
    micro = []
    for _ in range(accum):
        ids = torch.randint(3, vocab, (args.micro_batch, args.seq), generator=g)
        mask = torch.ones_like(ids)
        micro.append((ids, mask))
    states = []
    variants = parse_variants(args.variants)
    if any(s == "cached" for _, s in variants):
        with torch.no_grad():  # what the cache would return: computed once, outside every timed step
            for ids, mask in micro:
                st = engine.module.run_augmenting(ids, mask, position_ids_from_mask(mask))
                states.append([{k: v.detach().clone() for k, v in per_model.items()} for per_model in st])

    def step(ckpt: bool, cached: bool) -> None:
        checkpointing(ckpt)
        for i, (ids, mask) in enumerate(micro):
            out = engine(ids, attention_mask=mask, labels=ids, augmenting_states=states[i] if cached else None)
            engine.backward(out.loss)
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only

    fns = {}
    for ckpt, st in variants:
        name = variant_name(ckpt, st)

        def fn(ckpt=ckpt, cached=(st == "cached")):
            dist.barrier()  # every rank starts the step together: wall time is one step of the slowest rank
            step(ckpt, cached)
            dist.barrier()
        fns[name] = fn
    if args.speed_probe:
        from speed_probe import SpeedProbe

        probe = SpeedProbe()

        def speed_probe():
            dist.barrier()
            if env.rank == 0:
                probe()
            dist.barrier()
        fns["speed_probe"] = speed_probe  # last: the RSS and profile calls below take the first variant
    t0 = time.perf_counter()
    times = common.interleaved(fns, repeats=args.repeats, warmup=args.warmup)
    report = {"rank": env.rank, "world_size": world, "seq": args.seq, "rows": args.rows,
              "micro_batch": args.micro_batch, "accum": accum, "ds_config": args.ds_config,
              "times": {k: common.summary(v) for k, v in times.items()}, "timed_s": time.perf_counter() - t0,
              "peak_rss_bytes": common.peak_rss_bytes()}
    # the resident memory one more step of the first variant adds, sampled while it runs (the process's peak RSS
    # may come from loading the models instead)
    with common.RssSampler() as rss:
        next(iter(fns.values()))()
    report["step_rss_start_bytes"], report["step_rss_peak_bytes"] = rss.start_rss, rss.peak
    if args.profile:
        # kind by kind, the median of several profiled steps: one step can fall in a slow moment of this machine
        # (benchmarks/README.md, P9p)
        calls = [profile_step(next(iter(fns.values()))) for _ in range(args.profile_repeats)]
        report["profile_s"] = {k: common.median([c[k] for c in calls]) for k in calls[0]}
        report["profile_calls_s"] = calls
    out_path = Path(args.report)
    common.write_json(out_path.with_name(f"{out_path.name}.rank{env.rank}.json"), report)
    shut_down_process_group()  # not exiting with gloo's threads alive (pytorch#179291)
    del hf_ds_config


if __name__ == "__main__":
    from calm_dist.training.dist_env import run_then_exit

    run_then_exit(main)
