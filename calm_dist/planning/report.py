"""What `calm_dist.planning.plan.plan` returns: the `Plan` record, its JSON form and its human-readable table.

The record lives here, beside its table, so that `plan` imports this module and nothing imports back.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["GiB", "GB", "Plan", "format_plan", "human_count"]

GiB = 1024 ** 3
GB = 1e9


@dataclass
class Plan:
    """Everything `plan` computed. Bytes are bytes, FLOPs are FLOPs, times are seconds (see `format_plan`)."""

    inputs: dict
    models: dict
    layer_pairs: list
    params: dict
    memory_gpu: dict
    memory_gpu_total: float
    memory_gpu_headroom: float
    memory_cpu_per_node: dict
    activations: dict
    comm_per_micro_step: dict
    comm_per_step: dict
    flops: dict
    step_cost: dict
    time: dict
    cache: dict
    warnings: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-safe dict: infinite floats become "inf" / "-inf", NaN becomes None."""
        return _jsonable(asdict(self))


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _gib(x: float) -> str:
    return f"{x / GiB:9.2f} GiB"


def _gb(x: float) -> str:
    return f"{x / GB:9.2f} GB"


def _secs(x: float) -> str:
    if x >= 1:
        return f"{x:.2f} s"
    if x >= 1e-3:
        return f"{x * 1e3:.1f} ms"
    return f"{x * 1e6:.1f} us"


def _scaled(x: float, units, base: str, digits: int = 2, sep: str = " ") -> str:
    """`x` in the largest of `units` ((name, divisor), largest first) that it reaches, else in `base`."""
    for unit, div in units:
        if abs(x) >= div:
            return f"{x / div:.{digits}f}{sep}{unit}"
    return f"{x:.0f}{sep}{base}".rstrip()


def _duration(seconds: float) -> str:
    return _scaled(seconds, (("days", 86400), ("hours", 3600), ("minutes", 60)), "s", digits=1)


def _flops_h(x: float) -> str:
    return _scaled(x, (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)), "FLOP")


def human_count(n: float) -> str:
    """1234567 -> '1.23M'."""
    return _scaled(n, (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)), "", sep="")


def _bytes_h(x: float) -> str:
    return _scaled(x, (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)), "B")


def format_plan(p: Plan) -> str:
    i = p.inputs
    z = i["zero"]
    lines = []
    w = lines.append
    offload = [k for k in ("optimizer", "params") if z[f"offload_{k}"]]
    w(f"CALM plan: anchor {i['anchor']} + augmenting {', '.join(i['augmenting'])}")
    w(f"  cluster   {i['nodes']} node(s) x {i['gpus_per_node']} GPU = {i['world_size']} ranks; ZeRO-{z['stage']}"
      f"{', hpZ ' + str(z['hpz_partition_size']) if z['hpz_partition_size'] > 1 and z['stage'] == 3 else ''}"
      f"{', offload ' + '+'.join(offload) if offload else ''}; {i['dtype']}")
    w(f"  batch     seq {i['seq_len']} x micro-batch {i['micro_batch']} x grad-accum {i['grad_accum']} x "
      f"{i['world_size']} ranks = {p.flops['tokens_per_step']:,} tokens/step")
    w(f"  states    {i['states']}; activation checkpointing {'on' if i['activation_checkpointing'] else 'off'}")
    w("")
    pr = p.params
    w("Parameters")
    w(f"  anchor            {pr['anchor']:>17,}  ({human_count(pr['anchor'])})")
    for name, n, kept in zip(i["augmenting"], pr["augmenting"], pr["augmenting_loaded"]):
        dropped = " (its LM head and the blocks above the deepest pair dropped)" if kept != n else ""
        w(f"  augmenting        {n:>17,}  ({human_count(n)}) {name}; loaded {human_count(kept)}"
          + (" (cached states: not loaded)" if i["states"] == "cached" else dropped))
    w(f"  trainable blocks  {pr['trainable']:>17,}  ({human_count(pr['trainable'])}; {pr['pairs']} pairs, "
      f"{', '.join(f'{human_count(x)}' for x in pr['per_block'])} per block)")
    for name, pairs in zip(i["augmenting"], p.layer_pairs):
        w(f"  layer pairs (aug->anchor) {name}: " + ", ".join(f"{a}->{b}" for a, b in pairs))
    w(f"  first composed anchor layer j0 = {pr['first_composed_anchor_layer']}")
    w("")
    w(f"{'GPU' if i['hardware'].get('kind', 'gpu') == 'gpu' else 'CPU'} memory per rank")
    for k, v in p.memory_gpu.items():
        w(f"  {k:28s}{_gib(v)}")
    w(f"  {'total':28s}{_gib(p.memory_gpu_total)}   (headroom {p.memory_gpu_headroom / GiB:.2f} GiB of "
      f"{p.memory_gpu_total / GiB + p.memory_gpu_headroom / GiB:.0f})")
    a = p.activations
    # the peak is the larger moment, not a sum: the kept bytes first, then what the phases hold besides
    kept = ("anchor_saved", "blocks_saved", "aug_states", "final_norm")
    working = ("loss", "transient", "recompute_working", "backward_working")
    w("  activations kept for backward: " + ", ".join(f"{k} {a[k] / GiB:.2f}" for k in kept)
      + f" (saved {a['saved'] / GiB:.2f}) GiB")
    w("  activations' working sets: " + ", ".join(f"{k} {a[k] / GiB:.2f}" for k in working)
      + f"; peak: forward {a['forward_peak'] / GiB:.2f}, backward {a['backward_peak'] / GiB:.2f} GiB")
    if p.memory_cpu_per_node:
        w("CPU memory per node (offload)")
        for k, v in p.memory_cpu_per_node.items():
            w(f"  {k:28s}{_gib(v)}")
    w("")
    w("Communication per rank (bytes received by all-gathers, sent by reduce-scatters)")
    w(f"  {'':30s}{'micro-step':>13s}{'step':>13s}")
    for k in ("allgather_frozen_forward", "allgather_frozen_backward", "allgather_trainable_forward",
              "allgather_trainable_backward", "reduce_scatter_gradients"):
        w(f"  {k:30s}{_gb(p.comm_per_micro_step[k])}{_gb(p.comm_per_step[k])}")
    for k in (k for k in p.comm_per_step if k.endswith("_after_step")):  # once per step, after the optimizer
        w(f"  {k:30s}{'':12s}{_gb(p.comm_per_step[k])}")
    for k in ("inter_node", "intra_node", "total"):
        w(f"  {k:30s}{_gb(p.comm_per_micro_step[k])}{_gb(p.comm_per_step[k])}")
    t_micro, t_step = _secs(p.comm_per_micro_step["time_s"]), _secs(p.comm_per_step["time_s"])
    w(f"  {'time at link rates':30s}{t_micro:>13s}{t_step:>13s}"
      f"   (inter-node {i['hardware']['net_GBps']:.0f} GB/s, NVLink {i['hardware']['nvlink_GBps']:.0f} GB/s per GPU)")
    w("")
    sc = p.step_cost
    w(f"FLOPs per token ({'causal' if i['causal_attention_flops'] else 'full'} attention)")
    for k in ("aug_forward", "anchor_forward", "blocks_forward", "anchor_backward", "blocks_backward", "total",
              "recompute", "total_hardware"):
        w(f"  {k:28s}{sc[k] / 1e9:12.2f} GFLOP")
    w(f"  {'per step (model)':28s}{_flops_h(p.flops['per_step_model']):>18s}")
    t = p.time
    w("")
    if t.get("cpu_terms"):
        c = t["cpu_terms"]
        w(f"Time per step on {i['hardware']['name']} (measured rates and fixed costs, one thread per rank; "
          f"implied MFU {t['mfu_assumed']:.0%} of {i['hardware']['gpu_peak_tflops'] * 1e3:.0f} GFLOP/s)")
        w("  " + ", ".join(f"{k[:-2]} {_secs(c[k])}" for k in ("matmul_s", "attention_s", "elementwise_s", "loss_s",
                                                               "gather_s", "fixed_s", "optimizer_s"))
          + f" -> compute {_secs(t['compute_s'])}, + communication {_secs(t['comm_s'])} -> step "
            f"{_secs(t['step_s_overlapped'])}")
    else:
        w(f"Time per step at MFU {t['mfu_assumed']:.0%} (HFU {t['hfu_implied']:.0%}) of "
          f"{i['hardware']['gpu_peak_tflops']:.0f} TFLOP/s per GPU")
        w(f"  compute {_secs(t['compute_s'])}, communication {_secs(t['comm_s'])} -> step "
          f"{_secs(t['step_s_overlapped'])} overlapped ({_secs(t['step_s_serial'])} serial)")
    w(f"  {t['tokens_per_s']:,.0f} tokens/s ({t['tokens_per_s_per_gpu']:,.0f} per GPU)"
      + (f"; {i['tokens']:.3g} tokens in {_duration(t['train_days'] * 86400)}" if t["train_days"] else "")
      + ("" if t["comm_s"] <= t["compute_s"] else f"; comm-bound: MFU would drop to {t['mfu_if_comm_bound']:.0%}"))
    c = p.cache
    w("")
    w("Augmenting-state cache")
    w(f"  {c['bytes_per_token']:,.0f} bytes/token (layers {c['distinct_aug_layers']})"
      + (f"; {_bytes_h(c['disk_bytes'])} for {i['tokens']:.3g} tokens" if c["disk_bytes"] else ""))
    w(f"  augmenting forward = {c['aug_forward_flops_per_token'] / 1e9:.2f} GFLOP/token = "
      f"{c['aug_share_of_step_flops']:.1%} of a recompute step")
    be = c["break_even_epochs"]
    if be is not None:
        w(f"  break-even: caching pays back after {be:.2f} epochs over the data "
          f"(caching pass {c['cache_pass_s_per_token'] * 1e6:.3f} us/token once vs "
          f"{c['recompute_s_per_token_epoch'] * 1e6:.3f} us/token saved per epoch"
          + (f", reads cost {c['read_s_per_token_epoch'] * 1e6:.3f}" if c['read_s_per_token_epoch'] else "") + ")"
          if math.isfinite(be) else "  break-even: never (reading the cache costs more than recomputing it)")
    w(f"  reading at the cached throughput needs {c['read_GBps_needed_per_node']:.2f} GB/s per node; caching frees "
      f"{c['gpu_bytes_saved_per_rank'] / GiB:.2f} GiB per rank and "
      f"{c['allgather_bytes_saved_per_micro_step'] / GB:.2f} GB of all-gather per micro-step")
    if p.warnings:
        w("")
        w("Warnings")
        for msg in p.warnings:
            w(f"  ! {msg}")
    return "\n".join(lines)


