"""`calm-dist plan`: memory, communication, FLOPs and cache economics of a CALM run before launching it.

`plan(...)` takes the models (named sizes, config dicts, PretrainedConfigs or ModelSpecs), the layer pairs,
the cluster shape and the DeepSpeed ZeRO options, and returns a `Plan`: per-rank GPU memory term by term,
CPU memory per node (offload), all-gather / reduce-scatter volume per micro-step and per step, FLOPs per step
and the step time at a given MFU, the augmenting-state cache size and its break-even. `main(argv)` is the CLI.
docs/plan.md explains every formula and walks through a 70B + 7B plan.

Pure Python: imports only the other calm_dist.planning modules (and, through costs, the torch-free
calm_dist.model.layer_pairs).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from calm_dist.model import shapes
from calm_dist.planning import activation_memory, costs, cpu_time, model_sizes
from calm_dist.planning.hardware import Hardware
from calm_dist.planning.report import GB, GiB, Plan, format_plan

__all__ = ["ZeroOptions", "Hardware", "Plan", "plan", "resolve_model", "format_plan"]


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


# ---------------------------------------------------------------------------------------------------- plan

def plan(anchor: Any, augmenting: Any, layer_pairs: Any = None, *, nodes: int = 1, gpus_per_node: int = 8,
         seq_len: int = 4096, micro_batch: int = 1, grad_accum: int = 1, zero: ZeroOptions | None = None,
         dtype: str = "bf16", states: str = "recompute", activation_checkpointing: bool = False,
         tokens: float | None = None, mfu: float = 0.4, hfu: float | None = None, hardware: Hardware | None = None,
         causal: bool = True, every: int = 4, truncate_augmenting: bool = True,
         augmenting_seq_len: int | None = None, tail_fraction: float | None = None) -> Plan:
    """Plan one CALM training configuration (see the module docstring and docs/plan.md).

    anchor / augmenting: named sizes, config.json paths, dicts, PretrainedConfigs or ModelSpecs (augmenting may
    be a list). layer_pairs: None (costs.default_layer_pairs for each augmenting model), one list of
    (aug_layer, anchor_layer) pairs, or one list per augmenting model. states: 'recompute' (augmenting models
    loaded and run every micro-step) or 'cached' (states read from disk; augmenting models not loaded).
    tokens: training tokens, for the cache size and the run time. mfu: the model-FLOPs utilisation the step
    compute time is computed at (model FLOPs / (mfu * peak)); or hfu: the hardware-FLOPs utilisation
    (recomputation included), which compares runs with and without activation checkpointing fairly.
    truncate_augmenting: the augmenting models keep only blocks 0..deepest composed layer (as
    composition.ComposedModel does by default; embeddings, final norm and LM head stay loaded).
    augmenting_seq_len: models of different tokenizers (docs/cross_tokenizer.md): the augmenting models read
    rows of their own length, plus `tail_fraction` of it in tails (None: costs.estimated_tail_fraction); None:
    one tokenizer, every model reads the anchor's seq_len tokens."""
    zero = zero or ZeroOptions()
    hw = hardware or Hardware()
    if states not in ("recompute", "cached"):
        raise ValueError("states must be 'recompute' or 'cached'")
    if zero.stage not in (0, 1, 2, 3):
        raise ValueError("zero stage must be 0, 1, 2 or 3")
    run = _resolve(anchor, augmenting, layer_pairs, every, zero=zero, hw=hw, nodes=nodes,
                   gpus_per_node=gpus_per_node, seq_len=seq_len, micro_batch=micro_batch, grad_accum=grad_accum,
                   dtype=dtype, states=states, activation_checkpointing=activation_checkpointing, causal=causal,
                   truncate_augmenting=truncate_augmenting, augmenting_seq_len=augmenting_seq_len,
                   tail_fraction=tail_fraction)
    warnings = _input_warnings(run)
    if zero.offload_params and zero.stage != 3:
        raise ValueError("parameter offload needs ZeRO stage 3")

    counts = _count_parameters(run)
    gpu, cpu_per_node, act = _memory(run, counts)
    gpu_total = sum(gpu.values())
    headroom = hw.rank_mem_bytes(gpus_per_node) - gpu_total
    if headroom < 0:
        warnings.append(_out_of_memory_warning(run, gpu_total, act))
    comm_micro, comm_step = _communication(run, counts)
    sc = _step_cost(run)
    mfu = _model_flops_utilisation(sc, mfu, hfu)
    flops = _flops(run, sc)
    time = _time(run, sc, flops, comm_step, mfu=mfu, hfu=hfu, tokens=tokens)
    if time["comm_s"] > time["compute_s"]:
        warnings.append(_communication_bound_warning(run, time))
    cache = _cache(run, counts, time, tokens=tokens,
                   other_mode_step_s=_step_s_in_other_mode(run, mfu=mfu, hfu=hfu, tokens=tokens))
    if states == "cached" and cache["read_GBps_needed_per_node"] > hw.disk_read_GBps:
        warnings.append(f"reading cached states needs {cache['read_GBps_needed_per_node']:.1f} GB/s per node at "
                        f"this throughput; the file system gives {hw.disk_read_GBps:.1f}")

    return Plan(inputs=_inputs(run, tokens=tokens, mfu=mfu), models=_models(run, counts),
                layer_pairs=[[list(x) for x in p] for p in run.pairs], params=_params(run, counts),
                memory_gpu=gpu, memory_gpu_total=gpu_total, memory_gpu_headroom=headroom,
                memory_cpu_per_node=cpu_per_node, activations=act.as_dict(), comm_per_micro_step=comm_micro,
                comm_per_step=comm_step, flops=flops, step_cost=sc.as_dict(), time=time, cache=cache,
                warnings=warnings)


# ------------------------------------------------------------------------------------------ the resolved run

@dataclass(frozen=True)
class _Run:
    """`plan`'s arguments with the models resolved and the layer pairs checked: what every step reads."""

    anchor: costs.ModelSpec
    groups: list                # [(augmenting ModelSpec, [(aug_layer, anchor_layer), ...]), ...]
    elem_bytes: int             # bytes per parameter / activation element in `dtype`
    zero: ZeroOptions
    hw: Hardware
    nodes: int
    gpus_per_node: int
    seq_len: int
    micro_batch: int
    grad_accum: int
    dtype: str
    states: str
    activation_checkpointing: bool
    causal: bool
    every: int
    truncate_augmenting: bool
    augmenting_seq_len: int | None  # different tokenizers: the augmenting rows' own length (None: seq_len)
    tail_fraction: float | None     # the tails' extra augmenting tokens, a fraction of augmenting_seq_len

    @property
    def aug_per_token(self) -> float:
        """Augmenting tokens computed (and cached) per anchor token."""
        return costs.augmenting_tokens_per_token(self.seq_len, self.augmenting_seq_len, self.tail_fraction)

    @property
    def augs(self) -> list[costs.ModelSpec]:
        return [s for s, _ in self.groups]

    @property
    def pairs(self) -> list[list[tuple[int, int]]]:
        return [p for _, p in self.groups]

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def j0(self) -> int:
        """The first (lowest) composed anchor layer: nothing below it needs a backward."""
        return min(bb for _, p in self.groups for _, bb in p)

    @property
    def tokens_micro(self) -> int:
        """Tokens per micro-step and rank."""
        return self.micro_batch * self.seq_len

    @property
    def tokens_step(self) -> int:
        """Tokens per optimizer step over all ranks."""
        return self.tokens_micro * self.grad_accum * self.world

    @property
    def hpz(self) -> int:
        """The hpZ group size (1: no secondary partition; hpZ exists at ZeRO stage 3 only)."""
        return self.zero.hpz_partition_size if self.zero.stage == 3 else 1

    @property
    def aug_loaded(self) -> bool:
        """Whether the augmenting models are loaded and run (not when their states are read from the cache)."""
        return self.states == "recompute"


def _resolve(anchor: Any, augmenting: Any, layer_pairs: Any, every: int, *, dtype: str, **options: Any) -> _Run:
    anchor_s = resolve_model(anchor)
    aug_in = augmenting if isinstance(augmenting, (list, tuple)) else [augmenting]
    aug_specs = [resolve_model(a) for a in aug_in]
    anchor_s, groups = costs.normalize_layer_pairs(anchor_s, aug_specs, layer_pairs, every)
    return _Run(anchor=anchor_s, groups=groups, elem_bytes=costs.dtype_bytes(dtype), every=every, dtype=dtype,
                **options)


def _input_warnings(run: _Run) -> list[str]:
    """What in the configuration itself looks wrong (the run may still work)."""
    warnings = []
    lengths = [("seq_len", run.seq_len)] + [("augmenting_seq_len", run.augmenting_seq_len) if run.augmenting_seq_len
                                            else ("seq_len", run.seq_len)] * len(run.augs)
    for s, (name, length) in zip([run.anchor] + run.augs, lengths):
        if s.learned_positions and length > s.learned_positions:
            warnings.append(f"{s.name} has {s.learned_positions} learned positions, fewer than {name} {length}")
    for s in run.augs:
        if s.vocab_size != run.anchor.vocab_size:
            warnings.append(f"vocabulary sizes differ ({run.anchor.name}: {run.anchor.vocab_size}, {s.name}: "
                            f"{s.vocab_size}): CALM feeds the same token ids to both models, so they need one "
                            "tokenizer (one padded to other table sizes is fine; preflight asks the tokenizers)")
    hpz = run.hpz
    if hpz > 1 and (run.world % hpz or run.gpus_per_node % hpz):
        warnings.append(f"hpZ partition size {hpz} should divide gpus_per_node ({run.gpus_per_node}) so that its "
                        f"groups stay inside a node")
    return warnings


# ------------------------------------------------------------------------------------------------ parameters

@dataclass(frozen=True)
class _Counts:
    """Parameter counts of the run: what is loaded, what trains, what ZeRO-3 keeps whole on every rank."""

    anchor: costs.ParamCounts
    augs: list[costs.ParamCounts]
    trainable: int
    aug_kept: list[int]         # each augmenting model without the blocks above its deepest pair, nor its head
    frozen: int                 # loaded frozen parameters: the anchor + the kept augmenting models (if loaded)
    persistent_frozen: int      # frozen parameters in tensors at or below the persistence threshold
    persistent_trainable: int   # trainable parameters in tensors at or below the persistence threshold


def _count_parameters(run: _Run) -> _Counts:
    pc_anchor = costs.param_counts(run.anchor)
    pc_augs = [costs.param_counts(s) for s in run.augs]
    n_train = shapes.composition_parameter_count(run.anchor.hidden_size, [(s.hidden_size, p) for s, p in run.groups])
    kept_blocks = [max(a for a, _ in p) + 1 if run.truncate_augmenting else s.num_layers for s, p in run.groups]
    # truncated, an augmenting model is held without its LM head (composition.drop_output_layer; 0 when tied)
    cut = run.truncate_augmenting
    aug_kept = [pc.total - (s.num_layers - k) * pc.per_block - (pc.lm_head if cut else 0)
                for s, pc, k in zip(run.augs, pc_augs, kept_blocks)]
    p_aug = sum(aug_kept) if run.aug_loaded else 0
    thr = run.zero.param_persistence_threshold
    persist_frozen = _persistent_numel(run.anchor, thr) + (
        sum(_persistent_numel(s, thr, k, lm_head=not cut) for s, k in zip(run.augs, kept_blocks))
        if run.aug_loaded else 0)
    persist_train = sum(len(p) * sum(k for k in _block_tensor_sizes(s, run.anchor) if k <= thr)
                        for s, p in run.groups)
    return _Counts(anchor=pc_anchor, augs=pc_augs, trainable=n_train, aug_kept=aug_kept,
                   frozen=pc_anchor.total + p_aug, persistent_frozen=persist_frozen,
                   persistent_trainable=persist_train)


def _persistent_numel(spec: costs.ModelSpec, threshold: int, n_layers: int | None = None,
                      with_head: bool = True, lm_head: bool = True) -> int:
    """Parameters in tensors small enough (<= threshold) to stay unpartitioned under ZeRO-3. `with_head`: the final
    norm and the LM head too (`lm_head=False`: the norm only, as a truncated augmenting model is held)."""
    t = costs.param_tensors(spec)
    n = spec.num_layers if n_layers is None else n_layers
    small = lambda group: sum(k for _, k, _ in group if k <= threshold)  # noqa: E731
    out = small(t["embedding"]) + n * small(t["block"])
    if with_head:
        out += small(t["final_norm"]) + (small(t["lm_head"]) if lm_head else 0)
    return out


def _largest_module(spec: costs.ModelSpec) -> int:
    """Largest parameter tensor (ZeRO-3 gathers module by module; every module here has one big weight)."""
    t = costs.param_tensors(spec)
    return max(k for group in t.values() for _, k, _ in group)


def _block_tensor_sizes(aug: costs.ModelSpec, anchor: costs.ModelSpec) -> list[int]:
    """numel of each parameter tensor of one composition block joining `aug` to `anchor`."""
    return [n for _, n, _ in shapes.block_tensors(aug.hidden_size, anchor.hidden_size)]


def _gathered_augmenting_numel(spec: costs.ModelSpec, pairs: list, pc: costs.ParamCounts, threshold: int) -> int:
    """What ZeRO-3 gathers of one augmenting model per forward: its embedding and blocks up to the deepest pair
    (no head), less what persists."""
    deep = max(a for a, _ in pairs) + 1
    return pc.embedding + deep * pc.per_block - _persistent_numel(spec, threshold, deep, with_head=False)


# ---------------------------------------------------------------------------------------------------- memory

def _memory(run: _Run, counts: _Counts) -> tuple[dict, dict, activation_memory.ActivationMemory]:
    """Bytes per rank on the GPU and per node on the CPU (offload), term by term, and the activations."""
    zero, b = run.zero, run.elem_bytes
    n_train = counts.trainable
    shard = 1 / run.world
    gpu: dict[str, float] = {}
    cpu: dict[str, float] = {}
    params_home = cpu if zero.offload_params else gpu
    params_home["frozen_params"] = counts.frozen * b * (shard if zero.stage == 3 else 1)
    params_home["trainable_params"] = n_train * b * (shard if zero.stage == 3 else 1)
    if zero.stage == 3:
        gpu["persistent_params"] = (counts.persistent_frozen + counts.persistent_trainable) * b
        if run.hpz > 1:
            params_home["hpz_secondary"] = (counts.frozen + n_train) * b / run.hpz
        gpu["gathered_working_set"] = _gathered_working_set(run) * b
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
        # contiguous gradients: DeepSpeed allocates the whole bucket, torch.empty(reduce_bucket_size) (stage 2 at
        # each backward, stage 3 at start-up), however few weights train. A GPU allocator hands it out whole; on a
        # CPU its pages stay unmapped until the gradients (at most N_blocks of them) are copied in
        bucket = zero.reduce_bucket_size if run.hw.kind != "cpu" else min(zero.reduce_bucket_size, n_train)
        gpu["reduce_bucket"] = bucket * b
    act = _activations(run, run.activation_checkpointing)
    gpu["activations"] = act.total
    gpu["reserve"] = run.hw.reserve_gib * GiB
    return gpu, {k: v * run.gpus_per_node for k, v in cpu.items()}, act


def _gathered_working_set(run: _Run) -> int:
    """Parameters ZeRO-3 holds gathered at once: the prefetch window, at least the largest single tensor."""
    zero = run.zero
    live = min(zero.max_live_parameters, _largest_module(run.anchor) + zero.prefetch_bucket_size)
    largest = [_largest_module(run.anchor)] + [max(_block_tensor_sizes(s, run.anchor)) for s in run.augs]
    if run.aug_loaded:
        largest += [_largest_module(s) for s in run.augs]
    return max(live, *largest)


def _activations(run: _Run, checkpointing: bool) -> activation_memory.ActivationMemory:
    # the trainer loads stage-3 models under zero.Init, whose F.linear keeps every Linear's input
    return activation_memory.activation_memory(run.anchor, run.augs, run.pairs, tokens=run.tokens_micro,
                                               dtype=run.dtype, activation_checkpointing=checkpointing,
                                               augmenting_per_token=run.aug_per_token,
                                               zero3_linear=run.zero.stage == 3)


def _out_of_memory_warning(run: _Run, gpu_total: float, act: activation_memory.ActivationMemory) -> str:
    msg = (f"{'GPU' if run.hw.kind == 'gpu' else 'CPU'} memory: {gpu_total / GiB:.1f} GiB per rank needed, "
           f"{run.hw.rank_mem_bytes(run.gpus_per_node) / GiB:.1f} GiB available")
    if not run.activation_checkpointing:
        ckpt = _activations(run, True)
        msg += f" (activation checkpointing would save {(act.total - ckpt.total) / GiB:.1f} GiB)"
    return msg


# ------------------------------------------------------------------------------------------- communication

def _gather(numel: float, group: int, b: int) -> float:
    """Bytes one rank receives in a ring all-gather of `numel` elements over `group` ranks."""
    return numel * b * (group - 1) / group if group > 1 else 0.0


def _communication(run: _Run, counts: _Counts) -> tuple[dict, dict]:
    """Bytes each rank receives (all-gathers) or sends (reduce-scatters) per micro-step and per step, by
    collective and by link, and their time at the link rates."""
    zero, b, world, hpz = run.zero, run.elem_bytes, run.world, run.hpz
    thr = zero.param_persistence_threshold
    anchor, pc_anchor = run.anchor, counts.anchor
    big_block = sum(k for _, k, _ in costs.param_tensors(anchor)["block"] if k > thr)
    head = pc_anchor.lm_head if pc_anchor.lm_head else anchor.vocab_size * anchor.hidden_size
    frozen_bwd = (anchor.num_layers - 1 - run.j0) * big_block + head   # blocks above j0 + lm_head (or tied embedding)
    train_big = counts.trainable - counts.persistent_trainable   # what ZeRO-3 partitions and gathers
    if zero.stage == 3:
        frozen_fwd = pc_anchor.total - _persistent_numel(anchor, thr)
        if run.aug_loaded:
            for (s, p), pc in zip(run.groups, counts.augs):
                frozen_fwd += _gathered_augmenting_numel(s, p, pc, thr)
        g_frozen = hpz if hpz > 1 else world
        inter_frozen = g_frozen > run.gpus_per_node
        fwd_frozen = _gather(frozen_fwd, g_frozen, b)
        bwd_frozen = _gather(frozen_bwd, g_frozen, b)
        # trainable: the secondary partition is rebuilt after every optimizer step, so the first forward of a
        # step gathers over the whole world, later gathers inside the hpZ group
        fwd_train_first = _gather(train_big, world, b)
        fwd_train_later = _gather(train_big, g_frozen, b)
        bwd_train = _gather(train_big, g_frozen, b)
        # What the gathers materialise whole (allocated, filled, read by the kernels). A group of one rank gathers
        # nothing: DeepSpeed's NoGatherHandle points each parameter at its partition, which is the whole tensor
        materialised = ((frozen_fwd + frozen_bwd) * (g_frozen > 1) + 2 * train_big * (world > 1)) * b
    else:
        inter_frozen = run.nodes > 1
        fwd_frozen = bwd_frozen = fwd_train_first = fwd_train_later = bwd_train = materialised = 0.0
    if zero.stage >= 2:
        grad_comm = counts.trainable * b * (world - 1) / world            # reduce-scatter, every micro-step
    else:
        grad_comm = 2 * counts.trainable * b * (world - 1) / world        # all-reduce (once per step in practice)
    inter_world = run.nodes > 1

    def micro_step(first: bool) -> list:
        """(collective, bytes, whether it crosses nodes) for the step's first micro-step or a later one."""
        return [
            ("allgather_frozen_forward", fwd_frozen, inter_frozen),
            ("allgather_frozen_backward", bwd_frozen, inter_frozen),
            ("allgather_trainable_forward", fwd_train_first if first else fwd_train_later,
             inter_world if (first or hpz == 1) else inter_frozen),
            ("allgather_trainable_backward", bwd_train, inter_frozen),
            ("reduce_scatter_gradients", grad_comm, inter_world),
        ]

    # after the optimizer step each rank's updated partition goes to every rank: under ZeRO-3 only the persistent
    # (whole) trainable tensors, under stages 1-2 every trainable weight (the model holds them whole)
    if zero.stage == 3:
        after_step = [("allgather_persistent_after_step", _gather(counts.persistent_trainable, world, b), inter_world)]
    elif zero.stage in (1, 2):
        after_step = [("allgather_trainable_after_step", _gather(counts.trainable, world, b), inter_world)]
    else:
        after_step = []
    first, later = micro_step(True), micro_step(False)
    per_micro_step = _on_links(later if run.grad_accum > 1 else first, run.hw)
    per_step = _on_links(first + [(k, (run.grad_accum - 1) * v, x) for k, v, x in later] + after_step, run.hw)
    per_micro_step["gathered_bytes"] = materialised
    per_step["gathered_bytes"] = run.grad_accum * materialised
    return per_micro_step, per_step


def _on_links(collectives: list[tuple[str, float, bool]], hw: Hardware) -> dict:
    """Bytes by collective (summed over repeats), summed by link (inter-node, NVLink), and the time they take at
    the link rates."""
    d: dict[str, float] = {}
    for name, v, _ in collectives:
        d[name] = d.get(name, 0.0) + v
    inter = intra = 0.0
    for _, v, crosses_nodes in collectives:
        if crosses_nodes:
            inter += v
        else:
            intra += v
    d["inter_node"] = inter
    d["intra_node"] = intra
    d["total"] = inter + intra
    d["time_s"] = inter / (hw.net_GBps * GB) + intra / (hw.nvlink_GBps * GB)
    return d


# ------------------------------------------------------------------------------------------- FLOPs and time

def _step_cost(run: _Run, states: str | None = None) -> costs.StepCost:
    return costs.step_cost(run.anchor, run.augs, run.pairs, seq_len=run.seq_len, states=states or run.states,
                           activation_checkpointing=run.activation_checkpointing, causal=run.causal,
                           augmenting_seq_len=run.augmenting_seq_len, tail_fraction=run.tail_fraction)


def _model_flops_utilisation(sc: costs.StepCost, mfu: float, hfu: float | None) -> float:
    """The MFU the step is timed at: `mfu`, or the one `hfu` implies (recomputation counted) when given."""
    return hfu * sc.total / sc.total_hardware if hfu is not None else mfu


def _flops(run: _Run, sc: costs.StepCost) -> dict:
    tokens_step = run.tokens_step
    return {
        "per_token_model": sc.total,
        "per_token_hardware": sc.total_hardware,
        "per_step_model": sc.total * tokens_step,
        "per_step_hardware": sc.total_hardware * tokens_step,
        "per_rank_per_step_model": sc.total * run.tokens_micro * run.grad_accum,
        "tokens_per_micro_step_per_rank": run.tokens_micro,
        "tokens_per_step": tokens_step,
    }


def _time(run: _Run, sc: costs.StepCost, flops: dict, comm_step: dict, *, mfu: float, hfu: float | None,
          tokens: float | None) -> dict:
    """Step time: on a GPU compute at `mfu` of the peak and communication at the link rates, overlapped; on a CPU
    (hardware kind "cpu") compute from the measured rates and fixed costs of `cpu_time`, and communication in
    series, the MFU then following from the time."""
    t_comm = comm_step["time_s"]
    terms = None
    if run.hw.kind == "cpu":
        work = cpu_time.micro_step_work(run.anchor, run.groups, seq_len=run.seq_len, micro_batch=run.micro_batch,
                                        states=run.states, activation_checkpointing=run.activation_checkpointing,
                                        elem_bytes=run.elem_bytes, causal=run.causal)
        shard = run.world if run.zero.stage >= 1 else 1
        terms = cpu_time.step_seconds(work, run.hw, grad_accum=run.grad_accum,
                                      trainable_per_rank=sc.n_blocks_params / shard, comm_s=t_comm,
                                      gathered_bytes=comm_step["gathered_bytes"] / run.grad_accum,
                                      zero_stage=run.zero.stage)
        t_compute = terms["compute_s"]
        mfu = flops["per_rank_per_step_model"] / t_compute / (run.hw.gpu_peak_tflops * 1e12)
    else:
        t_compute = flops["per_rank_per_step_model"] / (run.hw.gpu_peak_tflops * 1e12 * mfu)
    t_step = max(t_compute, t_comm) if run.hw.overlap_comm else t_compute + t_comm
    tok_s = run.tokens_step / t_step
    return {
        "compute_s": t_compute,
        "comm_s": t_comm,
        "step_s_overlapped": t_step,   # the step time: overlapped on GPUs, compute + communication on a CPU
        "step_s_serial": t_compute + t_comm,
        "tokens_per_s": tok_s,
        "tokens_per_s_per_gpu": tok_s / run.world,
        "mfu_assumed": mfu,
        "hfu_assumed": hfu,
        "hfu_implied": mfu * sc.total_hardware / sc.total,
        "mfu_if_comm_bound": mfu * t_compute / t_step,
        "overlapped": run.hw.overlap_comm,
        "train_days": (tokens / tok_s / 86400) if tokens else None,
        "cpu_terms": terms,
    }


def _communication_bound_warning(run: _Run, time: dict) -> str:
    return (f"communication-bound: {time['comm_s']:.2f} s of all-gathers / reduce-scatters per step vs "
            f"{time['compute_s']:.2f} s of compute at MFU {time['mfu_assumed']:.0%}; ZeRO-3 gathers every frozen "
            f"weight on every micro-step whatever its size: raise micro_batch, or use hpZ "
            f"(--hpz {run.gpus_per_node}) to keep the gathers on NVLink")


# ----------------------------------------------------------------------------------------------------- cache

def _step_s_in_other_mode(run: _Run, *, mfu: float, hfu: float | None, tokens: float | None) -> float:
    """The step time of the same run with the augmenting states in the other mode (recomputed <-> cached):
    the difference is what recomputing them costs."""
    other = dataclasses.replace(run, states="cached" if run.states == "recompute" else "recompute")
    _, comm_step = _communication(other, _count_parameters(other))
    sc = _step_cost(other)
    mfu = _model_flops_utilisation(sc, mfu, hfu)
    return _time(other, sc, _flops(other, sc), comm_step, mfu=mfu, hfu=hfu, tokens=tokens)["step_s_overlapped"]


def _cache(run: _Run, counts: _Counts, time: dict, *, tokens: float | None, other_mode_step_s: float) -> dict:
    """The augmenting-state cache: its size, what caching saves, and after how many epochs it pays back."""
    zero, hw, b, world, hpz = run.zero, run.hw, run.elem_bytes, run.world, run.hpz
    # per anchor token: each augmenting token's states (r of them with different tokenizers) and forward
    cache_bpt = costs.cache_bytes_per_token(run.augs, run.pairs, run.dtype) * run.aug_per_token
    aug_flops = run.aug_per_token * sum(
        costs.augmenting_forward_flops(s, run.augmenting_seq_len or run.seq_len, max(a for a, _ in p), run.causal)
        for s, p in run.groups)
    t_step = time["step_s_overlapped"]
    t_rec, t_cac = (t_step, other_mode_step_s) if run.states == "recompute" else (other_mode_step_s, t_step)
    tok_s_cached = run.tokens_step / t_cac
    rate = world * (hw.gpu_peak_tflops * 1e12) * time["mfu_assumed"]
    econ = costs.cache_economics(
        aug_flops, cache_bpt, flops_per_s=rate, write_bytes_per_s=hw.disk_write_GBps * GB * run.nodes,
        read_bytes_per_s=hw.disk_read_GBps * GB * run.nodes, overlap_s_per_token=t_cac / run.tokens_step,
        recompute_extra_s_per_token=(t_rec - t_cac) / run.tokens_step - aug_flops / rate, tokens=tokens)
    aug_gather_micro = 0.0
    if zero.stage == 3:
        for (s, p), pc in zip(run.groups, counts.augs):
            numel = _gathered_augmenting_numel(s, p, pc, zero.param_persistence_threshold)
            aug_gather_micro += _gather(numel, hpz if hpz > 1 else world, b)
    shard = 1 / world
    return {
        "bytes_per_token": cache_bpt,
        "disk_bytes": costs.cache_disk_bytes(cache_bpt, tokens) if tokens else None,
        "distinct_aug_layers": [sorted({a for a, _ in p}) for p in run.pairs],
        "aug_forward_flops_per_token": aug_flops,
        "aug_share_of_step_flops": aug_flops / _step_cost(run, "recompute").total,
        "break_even_epochs": econ.break_even_epochs,
        "cache_pass_s_per_token": econ.cache_pass_s,
        "recompute_s_per_token_epoch": econ.recompute_s_per_epoch,
        "read_s_per_token_epoch": econ.read_s_per_epoch,
        "read_GBps_needed_per_node": cache_bpt * tok_s_cached / run.nodes / GB,
        "gpu_bytes_saved_per_rank": sum(counts.aug_kept) * b * (
            (shard if zero.stage == 3 else 1) + (1 / hpz if hpz > 1 else 0)) * (0 if zero.offload_params else 1),
        "allgather_bytes_saved_per_micro_step": aug_gather_micro,
    }


# --------------------------------------------------------------------------------------------- the record

def _inputs(run: _Run, *, tokens: float | None, mfu: float) -> dict:
    return {
        "anchor": run.anchor.name, "augmenting": [s.name for s in run.augs], "nodes": run.nodes,
        "gpus_per_node": run.gpus_per_node, "world_size": run.world, "seq_len": run.seq_len,
        "micro_batch": run.micro_batch, "grad_accum": run.grad_accum, "zero": asdict(run.zero), "dtype": run.dtype,
        "states": run.states, "activation_checkpointing": run.activation_checkpointing, "tokens": tokens,
        "mfu": mfu, "hardware": asdict(run.hw), "causal_attention_flops": run.causal, "every": run.every,
        "truncate_augmenting": run.truncate_augmenting, "augmenting_seq_len": run.augmenting_seq_len,
        "tail_fraction": run.tail_fraction if run.augmenting_seq_len else None,
    }


def _models(run: _Run, counts: _Counts) -> dict:
    return {
        "anchor": {"name": run.anchor.name, **asdict(counts.anchor), "spec": asdict(run.anchor)},
        "augmenting": [{"name": s.name, **asdict(pc), "spec": asdict(s)} for s, pc in zip(run.augs, counts.augs)],
    }


def _params(run: _Run, counts: _Counts) -> dict:
    return {
        "anchor": counts.anchor.total, "augmenting": [pc.total for pc in counts.augs],
        "augmenting_loaded": counts.aug_kept if run.aug_loaded else [0] * len(run.groups),
        "frozen_loaded": counts.frozen, "trainable": counts.trainable, "pairs": sum(len(p) for p in run.pairs),
        "first_composed_anchor_layer": run.j0,
        "per_block": [shapes.block_parameter_count(s.hidden_size, run.anchor.hidden_size) for s in run.augs],
    }
