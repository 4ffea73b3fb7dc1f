"""Everything applied to the models for distributed training, in one place: frozen models loaded straight into
ZeRO-3 shards (under ZeRO-2 they load whole, and DeepSpeed hooks none of their modules), decoder blocks as ZeRO-3
leaves, `torch.compile` of frozen blocks, activation checkpointing, and `build_distributed_model`, which applies
them in order around the composition (or the LoRA baseline) and hands the result to `deepspeed.initialize`.

`torch.compile` (`train.compile`): HF decoder blocks spend a large share of their time outside matmuls (RMSNorm in
fp32, RoPE, SwiGLU and their backwards, each a separate pass over memory in eager mode); inductor fuses them. Only
each block's `forward` is compiled, not its `__call__`: the module hooks stay eager around the compiled graph, so
ZeRO-3 gathers a leaf block's weights before the graph runs (the graph sees whole tensors) and the composition's
capture and injection hooks run as they do without compilation. Hooks inside a block (DeepSpeed's per-module ZeRO-3
hooks, LoRA adapters) would be traced into the graph, so blocks with a trainable parameter are left eager and ZeRO-3
must gather whole blocks (`distributed.zero3_leaf_blocks`; ZeRO-2 hooks no frozen block). Shapes are left to
dynamo's default: one graph per grad mode, and a dynamic one if the shape changes (the last eval batch), so a run
compiles a handful of graphs once, shared by all blocks of one model.

Activation checkpointing (`train.activation_checkpointing`): nothing below the first composed anchor block needs
gradients (frozen weights, no trainable input), so only the blocks above it are wrapped: their activations are
dropped in the forward and recomputed in the backward (non-reentrant torch.utils.checkpoint, which ZeRO-3's
parameter hooks handle). The composition hooks stay outside the checkpointed region, so the blocks' own
activations are kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint
from transformers.integrations import HfDeepSpeedConfig

from calm_dist.config import Config
from calm_dist.console import say
from calm_dist.model import backbones
from calm_dist.model.baselines import LoRAAnchor, default_lora_targets, matched_lora_rank, prompt_key_mask
from calm_dist.model.composition import ComposedModel
from calm_dist.model.io import load_causal_lm, write_random_augmenting
from calm_dist.planning.costs import composition_params
from calm_dist.training import compile_policy
from calm_dist.training.ds_config import zero_stage
from calm_dist.training.preflight import ResolvedRun
from calm_dist.rank_zero import run_on_rank_zero


def augmenting_compute_dtype(cfg: Config) -> str:
    """The dtype the frozen augmenting models compute their states in ("fp32" / "bf16"), whether the trainer
    recomputes them or `calm-dist cache` stores them: one rule, so cached states equal recomputed ones.
    model.augmenting_dtype, where auto follows train.precision (never the checkpoint's own dtype)."""
    choice = cfg.model.augmenting_dtype
    return cfg.train.precision if choice == "auto" else choice


def materialize_random_augmenting(cfg: Config, is_main: bool) -> list[str]:
    """Randomly initialised copies of the augmenting architectures, seeded, saved once per output_dir.

    Rank 0 writes them while the other ranks wait, however long a large model takes to write, until rank 0
    fails or its heartbeat has been silent for distributed.timeout_s (calm_dist/rank_zero.py)."""
    out = []
    revisions = cfg.model.augmenting_revisions or [None] * len(cfg.model.augmenting)
    for i, (path, revision) in enumerate(zip(cfg.model.augmenting, revisions)):
        target = Path(cfg.train.output_dir) / "random_augmenting" / str(i)
        run_on_rank_zero(f"writing the random augmenting model {target}", is_main,
                         partial(write_random_augmenting, path, cfg.train.seed + 1 + i, target, revision),
                         done=(target / "config.json").exists, status_file=target.with_name(f"{i}.status"),
                         silence_s=cfg.distributed.timeout_s)
        out.append(str(target))
    return out


def load_frozen_models(cfg: Config, ds_config: dict, dtype, load_anchor: bool = True, load_augmenting: bool = True,
                       is_main: bool = True):
    """Load the anchor and augmenting LMs straight into ZeRO-3 shards when stage 3 is on.

    HfDeepSpeedConfig must exist (and stay referenced) while from_pretrained runs; it is returned so the
    caller keeps it alive as long as the models. With `model.augmenting_init=random` the random models are
    first written to <output_dir>/random_augmenting/<i> (rank 0, outside ZeRO, the other ranks waiting for them)
    and then loaded like any other, so the export names a model that evaluation can load bit for bit.
    """
    m = cfg.model
    revisions = m.augmenting_revisions or [None] * len(m.augmenting)
    paths = list(m.augmenting)
    if load_augmenting and m.augmenting_init == "random":
        paths = materialize_random_augmenting(cfg, is_main)
        revisions = [None] * len(paths)
    keep_alive = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None
    anchor = load_causal_lm(m.anchor, m.anchor_revision, dtype, m.trust_remote_code,
                            m.attn_implementation, m.fused_kernels) if load_anchor else None
    aug_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[augmenting_compute_dtype(cfg)]
    augmenting = [load_causal_lm(p, r, aug_dtype, m.trust_remote_code, m.attn_implementation, m.fused_kernels)
                  for p, r in zip(paths, revisions)] \
        if load_augmenting else []
    return anchor, augmenting, keep_alive


def mark_zero3_leaf_blocks(models) -> int:
    """Make every decoder block of `models` a ZeRO-3 leaf: its weights are gathered in one go at its entry.

    DeepSpeed otherwise hooks each submodule (about ten per block), and those Python hooks, not the
    all-gathers, dominate the step time of small models. A block is the unit FSDP wraps too, so the peak
    of gathered weights stays one block. Blocks holding a trainable parameter (LoRA adapters) keep the
    per-module hooks: DeepSpeed 0.19 frees a leaf's weights before the gradients of those are reduced.
    Returns how many blocks were marked.
    """
    from deepspeed.utils import set_z3_leaf_module  # imported here, as in build_distributed_model

    blocks = backbones.frozen_decoder_blocks(models)
    for block in blocks:
        set_z3_leaf_module(block, True)
    return len(blocks)


def compile_frozen_blocks(models) -> int:
    """Compile the forward of every decoder block of `models` without a trainable parameter; returns how many."""
    blocks = backbones.frozen_decoder_blocks(models)
    for block in blocks:
        block.forward = torch.compile(block.forward)
    return len(blocks)


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_anchor_blocks(model) -> list[int]:
    """Wrap the anchor blocks above the first composed one; returns their indices."""
    blocks = backbones.decoder_blocks(model.anchor)
    first = min(j for pairs in model.layer_pairs for _, j in pairs)
    wrapped = list(range(first + 1, len(blocks)))
    for j in wrapped:
        blocks[j].forward = partial(_checkpointed, blocks[j].forward)
    return wrapped


@dataclass
class DistributedModel:
    """What the loop drives: the composition (or the LoRA baseline) as `module`, DeepSpeed's engine around it,
    and the optimizer and scheduler DeepSpeed returned."""

    module: torch.nn.Module
    engine: object
    optimizer: object
    scheduler: object
    hf_ds_config: HfDeepSpeedConfig | None  # referenced for as long as the models live (load_frozen_models)
    prompt_keys_only: bool  # model.augmenting_sees=prompt: the prefix-encoder ablation's key mask

    def summed_loss(self, batch: dict, states) -> torch.Tensor:
        """One forward of the engine: the micro-batch's summed next-token loss (the composition computes it
        without materialising the logits)."""
        key_mask = prompt_key_mask(batch["labels"], batch.get("position_ids")) if self.prompt_keys_only else None
        # each augmenting model's own tokens: with different tokenizers only (the LoRA baseline never takes them)
        own = {"augmenting_inputs": batch["augmenting_inputs"]} if "augmenting_inputs" in batch else {}
        return self.engine(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                           augmenting_states=states, augmenting_key_mask=key_mask, loss_reduction="sum",
                           position_ids=batch.get("position_ids"), **own).loss  # position_ids: packed rows only


def frozen_models(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The frozen LMs held in this process (the anchor, and the augmenting models unless cached)."""
    if isinstance(model, ComposedModel):
        return [model.anchor, *model.augmenting]
    return [model.model]  # the LoRA baseline: the anchor under PEFT


def build_module(cfg: Config, resolved: ResolvedRun, dtype: torch.dtype, is_main: bool):
    """The composition (or, for the LoRA baseline, the anchor with adapters) with its frozen weights in shards;
    returns it and the HfDeepSpeedConfig to keep alive."""
    m = cfg.model
    cached = cfg.train.augmenting_states == "cached"
    anchor, augmenting, hf_ds_config = load_frozen_models(
        cfg, resolved.ds_config, dtype, load_augmenting=not cached and m.method == "calm", is_main=is_main)
    torch.manual_seed(cfg.train.seed)  # the trainable weights' initial values depend on the seed alone
    if cached:  # the augmenting weights are never loaded: their states come from disk
        augmenting = resolved.augmenting_configs
    budget = None
    if m.method == "lora":  # as many trainable parameters as the composition it is compared with
        targets = m.lora_targets or default_lora_targets(anchor.config)
        budget = composition_params(resolved.anchor_config, resolved.augmenting_configs, resolved.layer_pairs)
        module = LoRAAnchor(anchor, m.lora_rank or matched_lora_rank(anchor, targets, budget), targets,
                            revision=m.anchor_revision)
    else:
        module = ComposedModel(anchor, augmenting, layer_pairs=resolved.layer_pairs, num_heads=m.num_heads,
                               sources={"anchor_revision": m.anchor_revision,
                                        "augmenting_revisions": m.augmenting_revisions or [None] * len(augmenting)},
                               loss_kernel=cfg.train.loss_kernel)
        module.blocks.to(dtype)
    n = sum(p.numel() for p in module.trainable_parameters())
    say(is_main, f"{m.method}: {n:,} trainable parameters" + (f" (composition budget {budget:,})" if budget else ""))
    return module, hf_ds_config


def lr_lambda(cfg: Config) -> Callable[[int], float]:
    """The learning-rate factor of each optimizer step: linear warm-up, then constant or a cosine decay to
    optim.min_lr_ratio at train.steps."""
    o, total = cfg.optim, cfg.train.steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def build_distributed_model(cfg: Config, resolved: ResolvedRun, is_main: bool) -> DistributedModel:
    """The module built, compiled, checkpointed and marked in that order, then DeepSpeed's engine, AdamW and a
    LambdaLR of `lr_lambda` around it. Reads no states cache: in cached mode the caller opens and verifies it
    first, so a bad cache is refused before any weight loads."""
    import deepspeed  # imported here: deepspeed takes seconds to import, and `calm-dist cache` never needs it

    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    module, hf_ds_config = build_module(cfg, resolved, dtype, is_main)
    compile_on, why = compile_policy.decide(cfg, resolved, "cuda" if torch.cuda.is_available() else "cpu")
    if cfg.train.compile == "auto":
        say(is_main, why)
    if compile_on:  # before checkpointing wraps the blocks, so the recompute runs the compiled graph
        n = compile_frozen_blocks(frozen_models(module))
        say(is_main, f"compiling {n} frozen decoder blocks (torch.compile, on their first call)")
    if cfg.train.activation_checkpointing:
        checkpoint_anchor_blocks(module)
    o = cfg.optim
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  weight_decay=o.weight_decay)
    if cfg.distributed.zero3_leaf_blocks and zero_stage(resolved.ds_config) == 3:
        mark_zero3_leaf_blocks(frozen_models(module))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, config=resolved.ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
    return DistributedModel(module, engine, optimizer, scheduler, hf_ds_config,
                            prompt_keys_only=cfg.model.augmenting_sees == "prompt")
