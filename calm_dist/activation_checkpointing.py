"""Activation checkpointing of the anchor blocks the backward pass goes through.

Nothing below the first composed anchor block needs gradients (frozen weights, no trainable input),
so only the blocks above it are wrapped: their activations are dropped in the forward and recomputed
in the backward (non-reentrant torch.utils.checkpoint, which ZeRO-3's parameter hooks handle). The
composition hooks stay outside the checkpointed region, so the blocks' own activations are kept.
"""
from __future__ import annotations

from functools import partial

from torch.utils.checkpoint import checkpoint

from . import backbones


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
