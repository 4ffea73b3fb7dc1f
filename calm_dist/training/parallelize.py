"""Everything applied to the models for distributed training, in one place: frozen models loaded straight into
ZeRO-3 shards, decoder blocks as ZeRO-3 leaves, `torch.compile` of frozen blocks, activation checkpointing.

`torch.compile` (`train.compile`): HF decoder blocks spend a large share of their time outside matmuls (RMSNorm
in fp32, RoPE, SwiGLU and their backwards, each a separate pass over memory in eager mode); inductor fuses them.
Only each block's `forward` is compiled, not its `__call__`: the module hooks stay eager around the compiled
graph, so ZeRO-3 gathers a leaf block's weights before the graph runs (the graph sees whole tensors) and the
composition's capture and injection hooks run as they do without compilation. Hooks inside a block (DeepSpeed's
per-module ZeRO-3 hooks, LoRA adapters) would be traced into the graph, so blocks with a trainable parameter are
left eager and ZeRO-3 must gather whole blocks (`distributed.zero3_leaf_blocks`). Shapes are left to dynamo's
default: one graph per grad mode, and a dynamic one if the shape changes (the last eval batch), so a run compiles
a handful of graphs once, shared by all blocks of one model.

Activation checkpointing (`train.activation_checkpointing`): nothing below the first composed anchor block needs
gradients (frozen weights, no trainable input), so only the blocks above it are wrapped: their activations are
dropped in the forward and recomputed in the backward (non-reentrant torch.utils.checkpoint, which ZeRO-3's
parameter hooks handle). The composition hooks stay outside the checkpointed region, so the blocks' own
activations are kept.
"""
from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from calm_dist.config import Config
from calm_dist.model import backbones
from calm_dist.model.io import materialize_random_augmenting
from calm_dist.training.ds_config import zero_stage


def augmenting_compute_dtype(cfg: Config) -> str:
    """The dtype the frozen augmenting models compute their states in ("fp32" / "bf16"), whether the trainer
    recomputes them or `calm-dist cache` stores them: one rule, so cached states equal recomputed ones.
    model.augmenting_dtype, where auto follows train.precision (never the checkpoint's own dtype)."""
    choice = cfg.model.augmenting_dtype
    return cfg.train.precision if choice == "auto" else choice


def load_frozen_models(cfg: Config, ds_config: dict, dtype, load_anchor: bool = True, load_augmenting: bool = True,
                       is_main: bool = True):
    """Load the anchor and augmenting LMs straight into ZeRO-3 shards when stage 3 is on.

    HfDeepSpeedConfig must exist (and stay referenced) while from_pretrained runs; it is returned so the
    caller keeps it alive as long as the models. With `model.augmenting_init=random` the random models are
    first written to <output_dir>/random_augmenting/<i> (rank 0, outside ZeRO, the other ranks waiting for them)
    and then loaded like any other, so the export names a model that evaluation can load bit for bit.
    """
    import torch
    from transformers.integrations import HfDeepSpeedConfig

    from calm_dist.model.composition import load_causal_lm

    m = cfg.model
    revisions = m.augmenting_revisions or [None] * len(m.augmenting)
    paths = list(m.augmenting)
    if load_augmenting and m.augmenting_init == "random":
        paths = materialize_random_augmenting(cfg, is_main)
        revisions = [None] * len(paths)
    keep_alive = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None
    anchor = load_causal_lm(m.anchor, m.anchor_revision, dtype, m.trust_remote_code) if load_anchor else None
    aug_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[augmenting_compute_dtype(cfg)]
    augmenting = [load_causal_lm(p, r, aug_dtype, m.trust_remote_code) for p, r in zip(paths, revisions)] \
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
    from deepspeed.utils import set_z3_leaf_module

    from calm_dist.model.backbones import frozen_decoder_blocks

    blocks = frozen_decoder_blocks(models)
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
