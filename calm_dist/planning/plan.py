"""`calm-dist plan`: memory, communication, FLOPs and cache economics of a CALM run before launching it.

`plan(...)` takes the models (named sizes, config dicts, PretrainedConfigs or ModelSpecs), the layer pairs,
the cluster shape and the DeepSpeed ZeRO options, and returns a `Plan`: per-rank GPU memory term by term,
CPU memory per node (offload), all-gather / reduce-scatter volume per micro-step and per step, FLOPs per step
and the step time at a given MFU, the augmenting-state cache size and its break-even. `main(argv)` is the CLI.
docs/plan.md explains every formula and walks through a 70B + 7B plan.

Pure Python (imports only calm_dist.planning.costs and calm_dist.planning.model_sizes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from calm_dist.planning import activation_memory

from calm_dist.planning import costs

from calm_dist.planning import model_sizes
__all__ = ["ZeroOptions", "Hardware", "Plan", "plan", "resolve_model", "format_plan", "main"]

GiB = 1024 ** 3
GB = 1e9


@dataclass(frozen=True)
class ZeroOptions:
    """The DeepSpeed ZeRO knobs that change memory or traffic (DeepSpeed 0.19 defaults)."""

    stage: int = 3
    offload_optimizer: bool = False       # fp32 master weights, Adam moments, fp32 gradients on the CPU
    offload_params: bool = False          # ZeRO-Infinity: parameter partitions on the CPU (stage 3 only)
    hpz_partition_size: int = 1           # ZeRO++ hpZ: secondary parameter partition within groups of this size
    prefetch_bucket_size: int = 50_000_000      # stage3_prefetch_bucket_size (elements)
    max_live_parameters: int = 1_000_000_000    # stage3_max_live_parameters
    param_persistence_threshold: int = 100_000  # stage3_param_persistence_threshold: smaller tensors stay whole
    reduce_bucket_size: int = 500_000_000       # reduce_bucket_size (elements)
    sub_group_size: int = 1_000_000_000         # stage-3 optimizer step granularity (elements)


@dataclass(frozen=True)
class Hardware:
    """Per-GPU figures; defaults are an H100 SXM node (8 GPUs on NVLink, one 400 Gb/s NIC per GPU)."""

    gpu_peak_tflops: float = 989.0   # dense bf16 tensor-core peak
    gpu_mem_gib: float = 80.0
    net_GBps: float = 50.0           # inter-node bandwidth per GPU (400 Gb/s InfiniBand NDR)
    nvlink_GBps: float = 450.0       # intra-node bandwidth per GPU, one direction (NVLink 4: 900 GB/s both ways)
    disk_write_GBps: float = 2.0     # per node, to the cache's file system
    disk_read_GBps: float = 2.0      # per node
    reserve_gib: float = 4.0         # CUDA context, NCCL buffers, allocator fragmentation (a rule of thumb)


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
        return _jsonable(asdict(self))


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def resolve_model(arg: Any) -> costs.ModelSpec:
    """A ModelSpec from a named size, a path to a config.json, a directory holding one, or anything
    `costs.model_spec` takes."""
    if isinstance(arg, str):
        if os.path.isdir(arg):
            path = os.path.join(arg, "config.json")
            if not os.path.exists(path):
                raise FileNotFoundError(f"{arg} has no config.json")
            arg = path
        if os.path.isfile(arg):
            with open(arg) as f:
                cfg = json.load(f)
            name = os.path.basename(os.path.dirname(os.path.abspath(arg))) or arg
            return costs.model_spec(cfg, name=cfg.get("_name_or_path") or name)
        try:
            cfg = model_sizes.get(arg)
        except KeyError as e:
            raise ValueError(f"{arg!r} is neither a config.json / model directory nor a named size. "
                             f"{e.args[0]}") from None
        return costs.model_spec(cfg, name=arg.lower())
    return costs.model_spec(arg)


# ----------------------------------------------------------------------------------------- helper counts

def _persistent_numel(spec: costs.ModelSpec, threshold: int, n_layers: int | None = None,
                      with_head: bool = True) -> int:
    """Parameters in tensors small enough (<= threshold) to stay unpartitioned under ZeRO-3."""
    t = costs.param_tensors(spec)
    n = spec.num_layers if n_layers is None else n_layers
    small = lambda group: sum(k for _, k, _ in group if k <= threshold)  # noqa: E731
    out = small(t["embedding"]) + n * small(t["block"])
    if with_head:
        out += small(t["final_norm"]) + small(t["lm_head"])
    return out


def _largest_module(spec: costs.ModelSpec) -> int:
    """Largest parameter tensor (ZeRO-3 gathers module by module; every module here has one big weight)."""
    t = costs.param_tensors(spec)
    return max(k for group in t.values() for _, k, _ in group)


def _composition_tensors(d_aug: int, d_anchor: int) -> list[int]:
    """Parameter tensor sizes of one composition block: proj weight, proj bias, 2 LayerNorms (weight, bias),
    W^Q, W^K, W^V, W^O."""
    return [d_aug * d_anchor, d_anchor] + [d_anchor] * 4 + [d_anchor * d_anchor] * 4


def _gather(numel: float, group: int, b: int) -> float:
    """Bytes one rank receives in a ring all-gather of `numel` elements over `group` ranks."""
    return numel * b * (group - 1) / group if group > 1 else 0.0


# ---------------------------------------------------------------------------------------------------- plan

def plan(anchor: Any, augmenting: Any, layer_pairs: Any = None, *, nodes: int = 1, gpus_per_node: int = 8,
         seq_len: int = 4096, micro_batch: int = 1, grad_accum: int = 1, zero: ZeroOptions | None = None,
         dtype: str = "bf16", states: str = "recompute", activation_checkpointing: bool = False,
         tokens: float | None = None, mfu: float = 0.4, hfu: float | None = None, hardware: Hardware | None = None,
         causal: bool = True, every: int = 4, truncate_augmenting: bool = True,
         _cache_economics: bool = True) -> Plan:
    """Plan one CALM training configuration (see the module docstring and docs/plan.md).

    anchor / augmenting: named sizes, config.json paths, dicts, PretrainedConfigs or ModelSpecs (augmenting may
    be a list). layer_pairs: None (costs.default_layer_pairs for each augmenting model), one list of
    (aug_layer, anchor_layer) pairs, or one list per augmenting model. states: 'recompute' (augmenting models
    loaded and run every micro-step) or 'cached' (states read from disk; augmenting models not loaded).
    tokens: training tokens, for the cache size and the run time. mfu: the model-FLOPs utilisation the step
    compute time is computed at (model FLOPs / (mfu * peak)); or hfu: the hardware-FLOPs utilisation
    (recomputation included), which compares runs with and without activation checkpointing fairly.
    truncate_augmenting: the augmenting models keep only blocks 0..deepest composed layer (as
    composition.ComposedModel does by default; embeddings, final norm and LM head stay loaded)."""
    zero = zero or ZeroOptions()
    hw = hardware or Hardware()
    if states not in ("recompute", "cached"):
        raise ValueError("states must be 'recompute' or 'cached'")
    if zero.stage not in (0, 1, 2, 3):
        raise ValueError("zero stage must be 0, 1, 2 or 3")
    warnings: list[str] = []
    anchor_s = resolve_model(anchor)
    aug_in = augmenting if isinstance(augmenting, (list, tuple)) else [augmenting]
    aug_specs = [resolve_model(a) for a in aug_in]
    anchor_s, groups = costs.normalize_layer_pairs(anchor_s, aug_specs, layer_pairs, every)
    world = nodes * gpus_per_node
    b = costs.dtype_bytes(dtype)
    L = anchor_s.num_layers
    j0 = min(bb for _, p in groups for _, bb in p)
    tokens_micro = micro_batch * seq_len
    tokens_step = tokens_micro * grad_accum * world

    for s in [anchor_s] + [g for g, _ in groups]:
        if s.learned_positions and seq_len > s.learned_positions:
            warnings.append(f"{s.name} has {s.learned_positions} learned positions, fewer than seq_len {seq_len}")
    for s, _ in groups:
        if s.vocab_size != anchor_s.vocab_size:
            warnings.append(f"vocabulary sizes differ ({anchor_s.name}: {anchor_s.vocab_size}, {s.name}: "
                            f"{s.vocab_size}): CALM feeds the same token ids to both models")
    hpz = zero.hpz_partition_size if zero.stage == 3 else 1
    if hpz > 1 and (world % hpz or gpus_per_node % hpz):
        warnings.append(f"hpZ partition size {hpz} should divide gpus_per_node ({gpus_per_node}) so that its "
                        f"groups stay inside a node")
    if zero.offload_params and zero.stage != 3:
        raise ValueError("parameter offload needs ZeRO stage 3")

    # ---------------------------------------------------------------- parameters
    pc_anchor = costs.param_counts(anchor_s)
    pc_augs = [costs.param_counts(s) for s, _ in groups]
    n_train = sum(len(p) * costs.composition_block_params(s.hidden_size, anchor_s.hidden_size) for s, p in groups)
    aug_loaded = states == "recompute"
    kept_blocks = [max(a for a, _ in p) + 1 if truncate_augmenting else s.num_layers for s, p in groups]
    aug_kept = [pc.total - (s.num_layers - k) * pc.per_block for (s, _), pc, k in zip(groups, pc_augs, kept_blocks)]
    p_aug = sum(aug_kept) if aug_loaded else 0
    p_frozen = pc_anchor.total + p_aug
    thr = zero.param_persistence_threshold
    persist_frozen = _persistent_numel(anchor_s, thr) + (
        sum(_persistent_numel(s, thr, k) for (s, _), k in zip(groups, kept_blocks)) if aug_loaded else 0)
    persist_train = sum(len(p) * sum(k for k in _composition_tensors(s.hidden_size, anchor_s.hidden_size)
                                     if k <= thr) for s, p in groups)
    assert all(sum(_composition_tensors(s.hidden_size, anchor_s.hidden_size)) ==
               costs.composition_block_params(s.hidden_size, anchor_s.hidden_size) for s, _ in groups)

    # ---------------------------------------------------------------- memory per rank
    shard = 1 / world
    gpu: dict[str, float] = {}
    cpu: dict[str, float] = {}
    frozen_bytes = p_frozen * b * (shard if zero.stage == 3 else 1)
    train_bytes = n_train * b * (shard if zero.stage == 3 else 1)
    (cpu if zero.offload_params else gpu)["frozen_params"] = frozen_bytes
    (cpu if zero.offload_params else gpu)["trainable_params"] = train_bytes
    if zero.stage == 3:
        gpu["persistent_params"] = (persist_frozen + persist_train) * b
        if hpz > 1:
            (cpu if zero.offload_params else gpu)["hpz_secondary"] = (p_frozen + n_train) * b / hpz
        live = min(zero.max_live_parameters, _largest_module(anchor_s) + zero.prefetch_bucket_size)
        largest = [_largest_module(anchor_s)] + [max(_composition_tensors(s.hidden_size, anchor_s.hidden_size))
                                                 for s, _ in groups]
        if aug_loaded:
            largest += [_largest_module(s) for s, _ in groups]
        live = max(live, *largest)
        gpu["gathered_working_set"] = live * b
    grad_shard = shard if zero.stage >= 2 else 1
    opt_shard = shard if zero.stage >= 1 else 1
    if zero.offload_optimizer:
        cpu["gradients_fp32"] = n_train * 4 * grad_shard
        cpu["optimizer_fp32"] = n_train * 12 * opt_shard
    else:
        gpu["gradients"] = n_train * b * grad_shard
        gpu["optimizer_fp32"] = n_train * 12 * opt_shard
        gpu["optimizer_step_fp32_grads"] = min(zero.sub_group_size, n_train * opt_shard) * 4
    if zero.stage >= 2:
        gpu["reduce_bucket"] = min(zero.reduce_bucket_size, n_train) * b
    act_args = (anchor_s, [s for s, _ in groups], [p for _, p in groups])
    act = activation_memory.activation_memory(*act_args, tokens=tokens_micro, dtype=dtype,
                                  activation_checkpointing=activation_checkpointing)
    gpu["activations"] = act.total
    gpu["reserve"] = hw.reserve_gib * GiB
    gpu_total = sum(gpu.values())
    headroom = hw.gpu_mem_gib * GiB - gpu_total
    if headroom < 0:
        msg = f"GPU memory: {gpu_total / GiB:.1f} GiB per rank needed, {hw.gpu_mem_gib:.0f} GiB available"
        if not activation_checkpointing:
            ckpt = activation_memory.activation_memory(*act_args, tokens=tokens_micro, dtype=dtype, activation_checkpointing=True)
            msg += f" (activation checkpointing would save {(act.total - ckpt.total) / GiB:.1f} GiB)"
        warnings.append(msg)
    cpu_node = {k: v * gpus_per_node for k, v in cpu.items()}

    # ---------------------------------------------------------------- communication per micro-step, per rank
    def frozen_fwd_numel() -> float:
        n = pc_anchor.total - _persistent_numel(anchor_s, thr)
        if aug_loaded:
            for (s, p), pc in zip(groups, pc_augs):
                deep = max(a for a, _ in p) + 1
                n += pc.embedding + deep * pc.per_block - _persistent_numel(s, thr, deep, with_head=False)
        return n

    t_anchor = costs.param_tensors(anchor_s)
    big_block = sum(k for _, k, _ in t_anchor["block"] if k > thr)
    head = pc_anchor.lm_head if pc_anchor.lm_head else anchor_s.vocab_size * anchor_s.hidden_size
    frozen_bwd = (L - 1 - j0) * big_block + head      # blocks above j0 + lm_head (or the tied embedding)
    train_big = n_train - persist_train   # what ZeRO-3 partitions and gathers
    if zero.stage == 3:
        g_frozen = hpz if hpz > 1 else world
        inter_frozen = g_frozen > gpus_per_node
        fwd_frozen = _gather(frozen_fwd_numel(), g_frozen, b)
        bwd_frozen = _gather(frozen_bwd, g_frozen, b)
        # trainable: the secondary partition is rebuilt after every optimizer step, so the first forward of a
        # step gathers over the whole world, later gathers inside the hpZ group
        fwd_train_first = _gather(train_big, world, b)
        fwd_train_later = _gather(train_big, g_frozen, b)
        bwd_train = _gather(train_big, g_frozen, b)
    else:
        g_frozen, inter_frozen = world, nodes > 1
        fwd_frozen = bwd_frozen = fwd_train_first = fwd_train_later = bwd_train = 0.0
    if zero.stage >= 2:
        grad_comm = n_train * b * (world - 1) / world            # reduce-scatter, every micro-step
    else:
        grad_comm = 2 * n_train * b * (world - 1) / world        # all-reduce (once per step in practice)
    inter_world = nodes > 1

    def split(first: bool) -> dict:
        d = {
            "allgather_frozen_forward": fwd_frozen,
            "allgather_frozen_backward": bwd_frozen,
            "allgather_trainable_forward": fwd_train_first if first else fwd_train_later,
            "allgather_trainable_backward": bwd_train,
            "reduce_scatter_gradients": grad_comm,
        }
        inter = intra = 0.0
        for k, v in d.items():
            if k.endswith("frozen_forward") or k.endswith("frozen_backward"):
                is_inter = inter_frozen
            elif k == "allgather_trainable_forward":
                is_inter = inter_world if (first or hpz == 1) else inter_frozen
            elif k == "allgather_trainable_backward":
                is_inter = inter_frozen
            else:
                is_inter = inter_world
            if is_inter:
                inter += v
            else:
                intra += v
        d["inter_node"] = inter
        d["intra_node"] = intra
        d["total"] = inter + intra
        d["time_s"] = inter / (hw.net_GBps * GB) + intra / (hw.nvlink_GBps * GB)
        return d

    comm_first = split(True)
    comm_later = split(False)
    comm_micro = comm_later if grad_accum > 1 else comm_first
    comm_step = {k: comm_first[k] + (grad_accum - 1) * comm_later[k] for k in comm_first}
    if zero.stage == 3:
        comm_step["allgather_persistent_after_step"] = _gather(persist_train, world, b)

    # ---------------------------------------------------------------- FLOPs and time
    sc = costs.step_cost(anchor_s, [s for s, _ in groups], [p for _, p in groups], seq_len=seq_len, states=states,
                         activation_checkpointing=activation_checkpointing, causal=causal)
    peak = hw.gpu_peak_tflops * 1e12
    flops_step = sc.total * tokens_step
    flops_rank = sc.total * tokens_micro * grad_accum
    if hfu is not None:
        mfu = hfu * sc.total / sc.total_hardware
    t_compute = flops_rank / (peak * mfu)
    t_comm = comm_step["time_s"]
    t_step = max(t_compute, t_comm)
    tok_s = tokens_step / t_step
    time = {
        "compute_s": t_compute,
        "comm_s": t_comm,
        "step_s_overlapped": t_step,
        "step_s_serial": t_compute + t_comm,
        "tokens_per_s": tok_s,
        "tokens_per_s_per_gpu": tok_s / world,
        "mfu_assumed": mfu,
        "hfu_assumed": hfu,
        "hfu_implied": mfu * sc.total_hardware / sc.total,
        "mfu_if_comm_bound": mfu * t_compute / t_step,
        "train_days": (tokens / tok_s / 86400) if tokens else None,
    }
    if t_comm > t_compute:
        warnings.append(f"communication-bound: {t_comm:.2f} s of all-gathers / reduce-scatters per step vs "
                        f"{t_compute:.2f} s of compute at MFU {mfu:.0%}; ZeRO-3 gathers every frozen weight on "
                        f"every micro-step whatever its size: raise micro_batch, or use hpZ "
                        f"(--hpz {gpus_per_node}) to keep the gathers on NVLink")
    flops = {
        "per_token_model": sc.total,
        "per_token_hardware": sc.total_hardware,
        "per_step_model": flops_step,
        "per_step_hardware": sc.total_hardware * tokens_step,
        "per_rank_per_step_model": flops_rank,
        "tokens_per_micro_step_per_rank": tokens_micro,
        "tokens_per_step": tokens_step,
    }

    # ---------------------------------------------------------------- cache
    cache_bpt = costs.cache_bytes_per_token([s for s, _ in groups], [p for _, p in groups], dtype)
    aug_flops = sum(costs.augmenting_forward_flops(s, seq_len, max(a for a, _ in p), causal) for s, p in groups)
    econ = None
    tok_s_cached = tok_s
    if _cache_economics:
        # the same run in the other mode: the per-token step-time difference is what recomputing costs
        other = plan(anchor_s, [s for s, _ in groups], [p for _, p in groups], nodes=nodes,
                     gpus_per_node=gpus_per_node, seq_len=seq_len, micro_batch=micro_batch, grad_accum=grad_accum,
                     zero=zero, dtype=dtype, states="cached" if states == "recompute" else "recompute",
                     activation_checkpointing=activation_checkpointing, tokens=tokens, mfu=mfu, hfu=hfu,
                     hardware=hw, causal=causal, every=every, truncate_augmenting=truncate_augmenting,
                     _cache_economics=False)
        t_other = other.time["step_s_overlapped"]
        t_rec, t_cac = (t_step, t_other) if states == "recompute" else (t_other, t_step)
        tok_s_cached = tokens_step / t_cac
        rate = world * peak * mfu
        econ = costs.cache_economics(
            aug_flops, cache_bpt, flops_per_s=rate, write_bytes_per_s=hw.disk_write_GBps * GB * nodes,
            read_bytes_per_s=hw.disk_read_GBps * GB * nodes, overlap_s_per_token=t_cac / tokens_step,
            recompute_extra_s_per_token=(t_rec - t_cac) / tokens_step - aug_flops / rate, tokens=tokens)
    sc_rec = costs.step_cost(anchor_s, [s for s, _ in groups], [p for _, p in groups], seq_len=seq_len,
                               states="recompute", activation_checkpointing=activation_checkpointing, causal=causal)
    aug_gather_micro = 0.0
    if zero.stage == 3:
        for (s, p), pc in zip(groups, pc_augs):
            deep = max(a for a, _ in p) + 1
            n = pc.embedding + deep * pc.per_block - _persistent_numel(s, thr, deep, with_head=False)
            aug_gather_micro += _gather(n, hpz if hpz > 1 else world, b)
    cache = {
        "bytes_per_token": cache_bpt,
        "disk_bytes": costs.cache_disk_bytes(cache_bpt, tokens) if tokens else None,
        "distinct_aug_layers": [sorted({a for a, _ in p}) for _, p in groups],
        "aug_forward_flops_per_token": aug_flops,
        "aug_share_of_step_flops": aug_flops / sc_rec.total,
        "break_even_epochs": econ.break_even_epochs if econ else None,
        "cache_pass_s_per_token": econ.cache_pass_s if econ else None,
        "recompute_s_per_token_epoch": econ.recompute_s_per_epoch if econ else None,
        "read_s_per_token_epoch": econ.read_s_per_epoch if econ else None,
        "read_GBps_needed_per_node": cache_bpt * tok_s_cached / nodes / GB,
        "gpu_bytes_saved_per_rank": sum(aug_kept) * b * (
            (shard if zero.stage == 3 else 1) + (1 / hpz if hpz > 1 else 0)) * (0 if zero.offload_params else 1),
        "allgather_bytes_saved_per_micro_step": aug_gather_micro,
    }
    if states == "cached" and cache["read_GBps_needed_per_node"] > hw.disk_read_GBps:
        warnings.append(f"reading cached states needs {cache['read_GBps_needed_per_node']:.1f} GB/s per node at "
                        f"this throughput; the file system gives {hw.disk_read_GBps:.1f}")

    models = {"anchor": {"name": anchor_s.name, **asdict(pc_anchor), "spec": asdict(anchor_s)}}
    models["augmenting"] = [{"name": s.name, **asdict(pc), "spec": asdict(s)} for (s, _), pc in zip(groups, pc_augs)]
    inputs = {
        "anchor": anchor_s.name, "augmenting": [s.name for s, _ in groups], "nodes": nodes,
        "gpus_per_node": gpus_per_node, "world_size": world, "seq_len": seq_len, "micro_batch": micro_batch,
        "grad_accum": grad_accum, "zero": asdict(zero), "dtype": dtype, "states": states,
        "activation_checkpointing": activation_checkpointing, "tokens": tokens, "mfu": mfu,
        "hardware": asdict(hw), "causal_attention_flops": causal, "every": every,
        "truncate_augmenting": truncate_augmenting,
    }
    params = {
        "anchor": pc_anchor.total, "augmenting": [pc.total for pc in pc_augs],
        "augmenting_loaded": aug_kept if aug_loaded else [0] * len(groups), "frozen_loaded": p_frozen,
        "trainable": n_train, "pairs": sum(len(p) for _, p in groups), "first_composed_anchor_layer": j0,
        "per_block": [costs.composition_block_params(s.hidden_size, anchor_s.hidden_size) for s, _ in groups],
    }
    return Plan(inputs=inputs, models=models, layer_pairs=[[list(x) for x in p] for _, p in groups], params=params,
                memory_gpu=gpu, memory_gpu_total=gpu_total, memory_gpu_headroom=headroom,
                memory_cpu_per_node=cpu_node, activations=act.as_dict(), comm_per_micro_step=comm_micro,
                comm_per_step=comm_step, flops=flops, step_cost=sc.as_dict(), time=time, cache=cache,
                warnings=warnings)


from calm_dist.planning.report import _human_count, format_plan  # noqa: E402  (the human-readable table)


# ---------------------------------------------------------------------------------------------------- CLI

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
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3])
    ap.add_argument("--zero-offload", choices=["none", "optimizer", "params", "both"], default="none")
    ap.add_argument("--hpz", type=int, default=1, help="ZeRO++ hpZ partition size (1: off; usually GPUs per node)")
    ap.add_argument("--prefetch-bucket-size", type=_parse_count, default=5e7)
    ap.add_argument("--reduce-bucket-size", type=_parse_count, default=5e8)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--states", choices=["recompute", "cached"], default="recompute")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--tokens", type=_parse_count, default=None, help="training tokens, e.g. 2e9 or 2B")
    ap.add_argument("--gpu-peak-tflops", type=float, default=989.0, help="per GPU (H100 SXM dense bf16: 989)")
    ap.add_argument("--mfu", type=float, default=0.4, help="model-FLOPs utilisation to time the step at")
    ap.add_argument("--hfu", type=float, default=None,
                    help="time the step at this hardware-FLOPs utilisation instead (recomputation counted)")
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0)
    ap.add_argument("--net-gbps", type=float, default=50.0, help="inter-node GB/s per GPU (400 Gb/s NIC: 50)")
    ap.add_argument("--nvlink-gbps", type=float, default=450.0, help="intra-node GB/s per GPU, one direction")
    ap.add_argument("--disk-write-gbps", type=float, default=2.0, help="cache write GB/s per node")
    ap.add_argument("--disk-read-gbps", type=float, default=2.0, help="cache read GB/s per node")
    ap.add_argument("--reserve-gib", type=float, default=4.0, help="per-GPU reserve (CUDA context, NCCL, fragments)")
    ap.add_argument("--no-truncate-augmenting", action="store_true",
                    help="count the augmenting models' blocks above the deepest composed layer as loaded")
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
            print(f"{name:14s} {_human_count(pc.total):>8s}  {model_sizes.SOURCES.get(name, '')}")
        return 0
    if not args.anchor or not args.augmenting:
        ap.error("--anchor and --augmenting are required")
    if args.pairs is not None and len(args.pairs) != len(args.augmenting):
        ap.error("give one --pairs per --augmenting")
    zero = ZeroOptions(stage=args.zero_stage, offload_optimizer=args.zero_offload in ("optimizer", "both"),
                       offload_params=args.zero_offload in ("params", "both"), hpz_partition_size=args.hpz,
                       prefetch_bucket_size=int(args.prefetch_bucket_size),
                       reduce_bucket_size=int(args.reduce_bucket_size))
    hw = Hardware(gpu_peak_tflops=args.gpu_peak_tflops, gpu_mem_gib=args.gpu_mem_gib, net_GBps=args.net_gbps,
                  nvlink_GBps=args.nvlink_gbps, disk_write_GBps=args.disk_write_gbps,
                  disk_read_GBps=args.disk_read_gbps, reserve_gib=args.reserve_gib)
    try:
        p = plan(args.anchor, args.augmenting, args.pairs, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                 seq_len=args.seq_len, micro_batch=args.micro_batch, grad_accum=args.grad_accum, zero=zero,
                 dtype=args.dtype, states=args.states, activation_checkpointing=args.activation_checkpointing,
                 tokens=args.tokens, mfu=args.mfu, hfu=args.hfu, hardware=hw, causal=not args.full_attention_flops,
                 every=args.every, truncate_augmenting=not args.no_truncate_augmenting)
    except (ValueError, FileNotFoundError) as e:
        print(f"calm-dist plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(p.to_dict(), indent=2))
    else:
        print(format_plan(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
