"""`calm-dist plan` (also `python -m calm_dist.planning.plan_cli`): the planner's command line.

Pure Python, like the rest of calm_dist.planning: it runs where torch is not installed.
"""
from __future__ import annotations

import argparse
import json
import sys

from calm_dist.planning import costs, model_sizes
from calm_dist.planning.hardware import PROFILES, hardware
from calm_dist.planning.plan import ZeroOptions, plan
from calm_dist.planning.recommend import format_recommendation, recommend
from calm_dist.planning.report import format_plan, human_count


def _parse_count(text: str) -> float:
    t = text.strip().upper().replace("_", "").replace(",", "")
    mult = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
    if t and t[-1] in mult:
        return float(t[:-1]) * mult[t[-1]]
    return float(t)


def _parse_pairs(text: str) -> list[tuple[int, int]]:
    """'3:9,7:19' -> [(3, 9), (7, 19)]"""
    out = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        a, _, bb = item.partition(":")
        if not bb:
            raise argparse.ArgumentTypeError(f"layer pair {item!r} is not AUG:ANCHOR")
        out.append((int(a), int(bb)))
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="calm-dist plan",
        description="Memory, communication, FLOPs and cache economics of a CALM run (docs/plan.md).")
    ap.add_argument("--anchor", help="named size (see --list-models) or a config.json / model directory")
    ap.add_argument("--augmenting", action="append", help="same forms; repeat for several augmenting models")
    ap.add_argument("--pairs", action="append", type=_parse_pairs, metavar="AUG:ANCHOR,...",
                    help="explicit 0-based layer pairs, one --pairs per --augmenting (default: every 4th "
                         "augmenting layer to evenly spaced anchor layers)")
    ap.add_argument("--every", type=int, default=4, help="default rule: every N-th augmenting layer (4)")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--augmenting-seq-len", type=int, default=None,
                    help="augmenting models of other tokenizers: their own row length (data.augmenting_seq_len)")
    ap.add_argument("--tail-fraction", type=float, default=None,
                    help="with --augmenting-seq-len: the tails' extra augmenting tokens per token (default: "
                         "estimated from seq-len / augmenting-seq-len)")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3])
    ap.add_argument("--zero-offload", choices=["none", "optimizer", "params", "both"], default="none")
    ap.add_argument("--hpz", type=int, default=1, help="ZeRO++ hpZ partition size (1: off; usually GPUs per node)")
    ap.add_argument("--prefetch-bucket-size", type=_parse_count, default=ZeroOptions.prefetch_bucket_size)
    ap.add_argument("--reduce-bucket-size", type=_parse_count, default=ZeroOptions.reduce_bucket_size)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--states", choices=["recompute", "cached"], default="recompute")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--tokens", type=_parse_count, default=None, help="training tokens, e.g. 2e9 or 2B")
    ap.add_argument("--hardware", default="h100",
                    help=f"a named profile ({', '.join(PROFILES)}, or cpu: this project's CPU as measured by "
                         "benchmarks/cpu_profile.py) or a profile JSON it wrote; the flags below override single "
                         "figures")
    ap.add_argument("--gpu-peak-tflops", type=float, default=None, help="per GPU (H100 SXM dense bf16: 989)")
    ap.add_argument("--mfu", type=float, default=0.4, help="model-FLOPs utilisation to time the step at (GPUs)")
    ap.add_argument("--hfu", type=float, default=None,
                    help="time the step at this hardware-FLOPs utilisation instead (recomputation counted)")
    ap.add_argument("--gpu-mem-gib", type=float, default=None, help="memory per rank (H100: 80; a CPU: the node's)")
    ap.add_argument("--net-gbps", type=float, default=None, help="inter-node GB/s per GPU (400 Gb/s NIC: 50)")
    ap.add_argument("--nvlink-gbps", type=float, default=None, help="intra-node GB/s per GPU, one direction (450)")
    ap.add_argument("--disk-write-gbps", type=float, default=None, help="cache write GB/s per node (2)")
    ap.add_argument("--disk-read-gbps", type=float, default=None, help="cache read GB/s per node (2)")
    ap.add_argument("--reserve-gib", type=float, default=None,
                    help="per-rank reserve (GPU: CUDA context, NCCL, fragments: 4)")
    ap.add_argument("--recommend", action="store_true",
                    help="score the ways to run this job (frozen weights sharded / hpZ / replicated, or whole "
                         "under ZeRO-2; activation checkpointing, cached or recomputed states, micro-batch) and "
                         "recommend the fastest that fits; the rows per rank per step are --micro-batch x "
                         "--grad-accum")
    ap.add_argument("--epochs", type=float, default=1.0,
                    help="--recommend: passes over the data in --tokens (a states cache is written once)")
    ap.add_argument("--no-truncate-augmenting", action="store_true",
                    help="count the augmenting models' blocks above the deepest composed layer and their LM heads as "
                         "loaded")
    ap.add_argument("--full-attention-flops", action="store_true",
                    help="count attention FLOPs for every (query, key) pair instead of the causal half")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    ap.add_argument("--list-models", action="store_true", help="list the named sizes and exit")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.list_models:
        for name in model_sizes.names():
            pc = costs.param_counts(model_sizes.get(name))
            print(f"{name:14s} {human_count(pc.total):>8s}  {model_sizes.SOURCES.get(name, '')}")
        return 0
    if not args.anchor or not args.augmenting:
        ap.error("--anchor and --augmenting are required")
    if args.pairs is not None and len(args.pairs) != len(args.augmenting):
        ap.error("give one --pairs per --augmenting")
    zero = ZeroOptions(stage=args.zero_stage, offload_optimizer=args.zero_offload in ("optimizer", "both"),
                       offload_params=args.zero_offload in ("params", "both"), hpz_partition_size=args.hpz,
                       prefetch_bucket_size=int(args.prefetch_bucket_size),
                       reduce_bucket_size=int(args.reduce_bucket_size))
    common = dict(nodes=args.nodes, gpus_per_node=args.gpus_per_node, seq_len=args.seq_len, zero=zero,
                  dtype=args.dtype, tokens=args.tokens, mfu=args.mfu, hfu=args.hfu,
                  causal=not args.full_attention_flops, every=args.every,
                  truncate_augmenting=not args.no_truncate_augmenting, augmenting_seq_len=args.augmenting_seq_len,
                  tail_fraction=args.tail_fraction)
    try:
        common["hardware"] = hardware(
            args.hardware, gpu_peak_tflops=args.gpu_peak_tflops, gpu_mem_gib=args.gpu_mem_gib,
            net_GBps=args.net_gbps, nvlink_GBps=args.nvlink_gbps, disk_write_GBps=args.disk_write_gbps,
            disk_read_GBps=args.disk_read_gbps, reserve_gib=args.reserve_gib)
        if args.recommend:
            rec = recommend(args.anchor, args.augmenting, args.pairs, rows_per_rank=args.micro_batch * args.grad_accum,
                            epochs=args.epochs, **common)
        else:
            p = plan(args.anchor, args.augmenting, args.pairs, micro_batch=args.micro_batch,
                     grad_accum=args.grad_accum, states=args.states,
                     activation_checkpointing=args.activation_checkpointing, **common)
    except (ValueError, FileNotFoundError) as e:
        print(f"calm-dist plan: error: {e}", file=sys.stderr)
        return 2
    if args.recommend:
        print(json.dumps(rec.to_dict(), indent=2) if args.json else format_recommendation(rec, limit=16))
        return 0 if rec.best is not None else 1
    if args.json:
        print(json.dumps(p.to_dict(), indent=2))
    else:
        print(format_plan(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
