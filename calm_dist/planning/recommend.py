"""`calm-dist plan --recommend`: score every way of running one CALM job and recommend the fastest that fits.

The job is fixed (models, layer pairs, cluster, sequence length, the rows each rank contributes to a step, so
the global batch and the optimisation stay the same); the options are how it runs:
  frozen weights   shard: ZeRO-3 partitions them over the world and gathers them every micro-step;
                   hpz: a secondary partition inside each node (ZeRO++ hpZ), so the gathers stay on NVLink
                   (only with more than one node: inside one node it is the world's partition again);
                   replicate: every decoder-block tensor stays whole on every rank (DeepSpeed's
                   stage3_param_persistence_threshold above the largest one): no gathers of blocks, their memory
                   on every rank
                   whole: ZeRO stage 2 (ds_configs/zero2.json): the frozen models whole on every rank, never
                   gathered and without DeepSpeed's hooks; only the composition's gradients (reduce-scattered every
                   micro-step) and optimizer state are sharded, its updated weights all-gathered after each
                   optimizer step. It fits only where the whole frozen models do
  activation checkpointing   off, or on (less memory, one more forward of the anchor blocks above j0)
  augmenting states   recompute, or cached (only when the training tokens are known: a cache costs a caching
                   pass, `plan`'s cache economics, which is charged to the option)
  micro-batch      every divisor of the rows per rank, the rest as gradient accumulation
Each option is a `plan(...)`, all timed at one hardware-FLOPs utilisation on GPUs (recomputation costs time)
or with the measured CPU model; one that needs more memory per rank than the hardware has does not fit. The
recommendation is the fastest that fits: by the training run's time when the tokens are known (a cached
option's caching pass included), else by the step time; among equally fast ones (within 0.5%), one whose
communication takes at most half its compute (it relies less on overlapping the two), then the one that leaves
more memory.
Pure Python, like the rest of calm_dist.planning.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from calm_dist.planning import costs
from calm_dist.planning.plan import ZeroOptions, plan, resolve_model
from calm_dist.planning.report import GiB, Plan

__all__ = ["Option", "Scored", "Recommendation", "candidates", "recommend", "format_recommendation"]

FROZEN_CHOICES = ("shard", "hpz", "replicate", "whole")


@dataclass(frozen=True)
class Option:
    """One way to run the job."""

    frozen: str                    # "shard", "hpz", "replicate" or "whole" (module docstring)
    activation_checkpointing: bool
    states: str                    # "recompute" or "cached"
    micro_batch: int
    grad_accum: int

    def label(self) -> str:
        return (f"{self.frozen}, ckpt {'on' if self.activation_checkpointing else 'off'}, {self.states}, "
                f"mb {self.micro_batch} x {self.grad_accum}")

    def overrides(self, gpus_per_node: int, persistence_threshold: int, world: int) -> list[str]:
        """The training config's settings for this option (calm_dist/config.py keys)."""
        out = [f"train.micro_batch_size={self.micro_batch}",
               f"train.global_batch_size={self.micro_batch * self.grad_accum * world}",
               f"train.activation_checkpointing={str(self.activation_checkpointing).lower()}",
               f"train.augmenting_states={self.states}"]
        if self.frozen == "hpz":
            out.append(f"distributed.deepspeed_config=zero3_hpz  (zero_hpz_partition_size {gpus_per_node})")
        elif self.frozen == "whole":
            out.append("distributed.deepspeed_config=zero2")
        elif self.frozen == "replicate":
            shipped = "zero3_small_models" if persistence_threshold <= 1_000_000 else "a copy of zero3"
            out.append(f"distributed.deepspeed_config={shipped}  (stage3_param_persistence_threshold >= "
                       f"{persistence_threshold:,})")
        else:
            out.append("distributed.deepspeed_config=zero3")
        return out


@dataclass
class Scored:
    """An option and what the planner says of it."""

    option: Option
    plan: Plan
    fits: bool
    step_s: float                  # one optimizer step
    run_s: float | None            # the whole run (tokens known): steps, plus the caching pass when cached

    @property
    def memory_gib(self) -> float:
        return self.plan.memory_gpu_total / GiB

    @property
    def sort_key(self) -> tuple:
        # times within 0.5% are equal; then an option whose communication is at most half its compute (the
        # overlap it relies on is an assumption: with that margin an imperfect one still hides it), then the one
        # that leaves more memory
        t = self.run_s if self.run_s is not None else self.step_s
        time = self.plan.time
        return (not self.fits, round(math.log(t) / 0.005) if t > 0 else 0,
                time["comm_s"] > 0.5 * time["compute_s"], self.memory_gib)


@dataclass
class Recommendation:
    """Every option scored, fastest first among those that fit; `best` is None when none fits."""

    scored: list[Scored]
    rows_per_rank: int
    gpus_per_node: int
    persistence_threshold: int     # what `replicate` needs (the largest frozen block tensor)
    tokens: float | None
    epochs: float

    def settings(self, scored: Scored) -> list[str]:
        return scored.option.overrides(self.gpus_per_node, self.persistence_threshold,
                                       scored.plan.inputs["world_size"])

    @property
    def best(self) -> Scored | None:
        return self.scored[0] if self.scored and self.scored[0].fits else None

    def to_dict(self) -> dict:
        return {"best": None if self.best is None else self.best.option.label(),
                "overrides": [] if self.best is None else self.settings(self.best),
                "options": [{"option": dataclasses.asdict(s.option), "label": s.option.label(), "fits": s.fits,
                             "memory_gib": s.memory_gib, "step_s": s.step_s, "run_s": s.run_s,
                             "tokens_per_s": s.plan.time["tokens_per_s"]} for s in self.scored]}


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(*, rows_per_rank: int, nodes: int, states: tuple[str, ...] = ("recompute",),
               frozen: tuple[str, ...] = FROZEN_CHOICES) -> list[Option]:
    """Every option for a job whose ranks each contribute `rows_per_rank` rows to a step."""
    out = []
    for fr in frozen:
        if fr == "hpz" and nodes == 1:
            continue  # inside one node the hpZ group is the world: the same gathers over the same links
        for ckpt in (False, True):
            for st in states:
                for mb in divisors(rows_per_rank):
                    out.append(Option(fr, ckpt, st, mb, rows_per_rank // mb))
    return out


def largest_block_tensor(specs: list[costs.ModelSpec]) -> int:
    """The largest decoder-block tensor of the frozen models: `replicate` keeps every block tensor up to it whole."""
    return max(n for s in specs for _, n, _ in costs.param_tensors(s)["block"])


def zero_for(option: Option, base: ZeroOptions, gpus_per_node: int, threshold: int) -> ZeroOptions:
    if option.frozen == "whole":  # parameter offload exists at stage 3 only
        return dataclasses.replace(base, stage=2, hpz_partition_size=1, offload_params=False)
    if option.frozen == "hpz":
        return dataclasses.replace(base, hpz_partition_size=gpus_per_node)
    if option.frozen == "replicate":
        return dataclasses.replace(base, hpz_partition_size=1,
                                   param_persistence_threshold=max(base.param_persistence_threshold, threshold))
    return dataclasses.replace(base, hpz_partition_size=1)


def recommend(anchor: Any, augmenting: Any, layer_pairs: Any = None, *, rows_per_rank: int = 1, nodes: int = 1,
              gpus_per_node: int = 8, zero: ZeroOptions | None = None, tokens: float | None = None,
              epochs: float = 1.0, states: tuple[str, ...] | None = None,
              frozen: tuple[str, ...] = FROZEN_CHOICES, **plan_kwargs: Any) -> Recommendation:
    """Score `candidates(...)` with `plan` and sort them (module docstring). `plan_kwargs` are `plan`'s other
    arguments (seq_len, dtype, hardware, mfu, every, ...); `epochs` is how many times the run reads its data
    (the cache is built once for them). `states` defaults to both modes when `tokens` is known, else recompute."""
    if rows_per_rank < 1:
        raise ValueError("rows_per_rank must be >= 1")
    if epochs <= 0:
        raise ValueError("epochs must be > 0")
    base = zero or ZeroOptions()
    if base.stage != 3:
        # stages 0-2 keep whole frozen weights on every rank: nothing to choose, and of them calm_dist trains
        # under stage 2 only
        frozen = ("whole",)
    states = states or (("recompute", "cached") if tokens else ("recompute",))
    # one hardware-FLOPs utilisation for every option: checkpointing's recomputation then costs time (at one MFU
    # it would be free); --mfu's value stands for it unless --hfu is given
    plan_kwargs["hfu"] = plan_kwargs.get("hfu") or plan_kwargs.pop("mfu", 0.4)
    aug_in = augmenting if isinstance(augmenting, (list, tuple)) else [augmenting]
    specs = [resolve_model(anchor)] + [resolve_model(a) for a in aug_in]
    threshold = largest_block_tensor(specs)
    scored = []
    for opt in candidates(rows_per_rank=rows_per_rank, nodes=nodes, states=states, frozen=frozen):
        p = plan(specs[0], specs[1:], layer_pairs, nodes=nodes, gpus_per_node=gpus_per_node,
                 micro_batch=opt.micro_batch, grad_accum=opt.grad_accum, states=opt.states,
                 activation_checkpointing=opt.activation_checkpointing, tokens=tokens,
                 zero=zero_for(opt, base, gpus_per_node, threshold), **plan_kwargs)
        step_s = p.time["step_s_overlapped"]
        run_s = None
        if tokens:
            run_s = tokens / p.time["tokens_per_s"]
            if opt.states == "cached":  # the cache holds one epoch of states, written once
                run_s += p.cache["cache_pass_s_per_token"] * tokens / epochs
        scored.append(Scored(opt, p, p.memory_gpu_headroom >= 0, step_s, run_s))
    scored.sort(key=lambda s: s.sort_key)
    return Recommendation(scored=scored, rows_per_rank=rows_per_rank, gpus_per_node=gpus_per_node,
                          persistence_threshold=threshold, tokens=tokens, epochs=epochs)


def _secs(x: float) -> str:
    if x >= 3600:
        return f"{x / 3600:.1f} h"
    return f"{x:.3f} s" if x < 10 else f"{x:.1f} s"


def format_recommendation(rec: Recommendation, limit: int | None = None) -> str:
    lines = []
    w = lines.append
    first = rec.scored[0].plan
    i = first.inputs
    w(f"CALM recommendation: anchor {i['anchor']} + augmenting {', '.join(i['augmenting'])}")
    w(f"  {i['nodes']} node(s) x {i['gpus_per_node']} ranks on {i['hardware']['name']}, seq {i['seq_len']}, "
      f"{rec.rows_per_rank} row(s) per rank per step ({first.flops['tokens_per_step']:,} tokens/step), {i['dtype']}"
      + (f"; {rec.tokens:.3g} tokens, {rec.epochs:g} epoch(s)" if rec.tokens else "; cached states not scored "
         "(give --tokens: a cache costs a caching pass)"))
    w("")
    run_col = rec.tokens is not None
    w(f"  {'option':44s} {'GiB/rank':>9s} {'fits':>5s} {'step':>10s} {'tokens/s':>11s}"
      + (f" {'run':>9s}" if run_col else ""))
    shown = rec.scored if limit is None else rec.scored[:limit]
    for s in shown:
        w(f"  {s.option.label():44s} {s.memory_gib:9.2f} {'yes' if s.fits else 'NO':>5s} {_secs(s.step_s):>10s} "
          f"{s.plan.time['tokens_per_s']:11,.0f}" + (f" {_secs(s.run_s):>9s}" if run_col else ""))
    if limit is not None and len(rec.scored) > limit:
        w(f"  ... {len(rec.scored) - limit} more (--json lists all)")
    w("")
    best = rec.best
    if best is None:
        least = min(rec.scored, key=lambda s: s.memory_gib)
        w(f"No option fits: the smallest, {least.option.label()}, needs {least.memory_gib:.1f} GiB per rank "
          f"({least.plan.memory_gpu_headroom / GiB:+.1f} GiB headroom). More ranks, a shorter sequence or "
          f"parameter offload (--zero-offload) may.")
        return "\n".join(lines)
    t = best.plan.time
    w(f"Recommended: {best.option.label()}")
    w(f"  predicted step {_secs(best.step_s)} ({t['tokens_per_s']:,.0f} tokens/s), {best.memory_gib:.1f} GiB per "
      f"rank (headroom {best.plan.memory_gpu_headroom / GiB:.1f} GiB)"
      + (f", run {_secs(best.run_s)}" if best.run_s is not None else ""))
    runner_up = next((s for s in rec.scored[1:] if s.fits), None)
    if runner_up is not None:
        a, b = (best.run_s, runner_up.run_s) if best.run_s is not None else (best.step_s, runner_up.step_s)
        w(f"  next: {runner_up.option.label()}, {b / a - 1:+.1%}")
    unfit = [s for s in rec.scored if not s.fits]
    if unfit and math.isfinite(unfit[0].step_s) and unfit[0].step_s < best.step_s:
        w(f"  faster but too big: {unfit[0].option.label()} ({_secs(unfit[0].step_s)}, {unfit[0].memory_gib:.1f} GiB)")
    settings = rec.settings(best)
    w("  settings: " + " ".join(settings[:2]))
    w("            " + " ".join(settings[2:4]))
    w("            " + settings[4])
    return "\n".join(lines)
