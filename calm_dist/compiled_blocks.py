"""`torch.compile` of the frozen decoder blocks (`train.compile`).

HF decoder blocks spend a large share of their time outside matmuls (RMSNorm in fp32, RoPE, SwiGLU and
their backwards, each a separate pass over memory in eager mode); inductor fuses them. Only each block's
`forward` is compiled, not its `__call__`: the module hooks stay eager around the compiled graph, so
ZeRO-3 gathers a leaf block's weights before the graph runs (the graph sees whole tensors) and the
composition's capture and injection hooks run as they do without compilation. Hooks inside a block
(DeepSpeed's per-module ZeRO-3 hooks, LoRA adapters) would be traced into the graph, so blocks with a
trainable parameter are left eager and ZeRO-3 must gather whole blocks (`distributed.zero3_leaf_blocks`).

Shapes are left to dynamo's default: one graph per grad mode, and a dynamic one if the shape changes
(the last eval batch), so a run compiles a handful of graphs once, shared by all blocks of one model.
"""
from __future__ import annotations

import torch

from . import backbones


def compile_frozen_blocks(models) -> int:
    """Compile the forward of every decoder block of `models` without a trainable parameter; returns how many."""
    blocks = backbones.frozen_decoder_blocks(models)
    for block in blocks:
        block.forward = torch.compile(block.forward)
    return len(blocks)
