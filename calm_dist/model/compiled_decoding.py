"""Decoding with one compiled graph per step: static caches, so that every step has the same shapes (issue #22).

`generation.CachedStepper` runs each step eagerly, as many small ops per decoder layer, and at batch 1 their fixed
cost is a large part of a step (benchmarks/README.md, P4r). Here every cache has a fixed size (`capacity` tokens: the
prompt and the new ones), transformers' StaticCache for each model and one static buffer per composition block for
its projected keys and values, and the whole step (every augmenting model, the blocks' projections, the anchor with
its cross-attention, the LM head) is one `torch.compile` graph: inductor fuses the elementwise work around the
matmuls and the step's Python runs once, at tracing. The prompt runs eagerly (its shapes differ per call).

A step writes its token's keys and values at the caches' next slot; attention reads the whole buffer under a mask
(slots past the current token, and padding, hidden), as StaticCache does. Dynamo keeps one graph per batch size,
capacity and dtype; the weights are the graph's inputs, so another model of the same shapes reuses it, and
`capacity_for` rounds the capacity up, so that generations of similar lengths share one graph.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch._dynamo
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from calm_dist.model.backbones import cache_kwarg
from calm_dist.model.composition import ComposedModel, position_ids_from_mask
from calm_dist.model.cross_attention import cross_attention_mask

CAPACITY_STEP = 64  # tokens: capacities are rounded up to a multiple of this, so that one graph serves many lengths


def capacity_for(tokens: int) -> int:
    return -(-tokens // CAPACITY_STEP) * CAPACITY_STEP


class _StepState:
    """What one generation's compiled steps read and update in place: caches, block buffers, mask and positions."""

    def __init__(self, model: ComposedModel, batch: int, capacity: int, dtype: torch.dtype, device):
        self.refresh = True
        self.anchor_cache = StaticCache(config=model.anchor.config, max_cache_len=capacity)
        self.augmenting_caches = [StaticCache(config=m.config, max_cache_len=capacity) for m in model.augmenting]
        heads, width = model.num_heads, model.anchor.config.hidden_size
        self.buffers = [[tuple(torch.zeros(batch, heads, capacity, width // heads, dtype=dtype, device=device)
                               for _ in range(2)) for _ in pairs] for pairs in model.layer_pairs]
        # [B, capacity]: 1 for the prompt's real tokens and for every slot after the prompt (causality hides the
        # slots not yet written)
        self.mask = torch.ones(batch, capacity, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)  # the next token's position
        self.length = torch.zeros((), dtype=torch.long, device=device)  # tokens in the caches
        self.keys_end = torch.full((), capacity, dtype=torch.long, device=device)  # blocks' keys visible below this


def _decode_step(model: ComposedModel, state: _StepState, ids: torch.Tensor) -> torch.Tensor:
    """One new token per row ([B, 1]) through every model; the anchor's logits [B, V]. Traced once by torch.compile."""
    slot = state.length.view(1)
    if state.refresh:
        states = model.run_augmenting(ids, state.mask, state.positions, caches=state.augmenting_caches)
        for pairs, buffers in zip(model.keys_values(states), state.buffers):
            for (k, v), (kb, vb) in zip(pairs, buffers):
                kb.index_copy_(2, slot, k)
                vb.index_copy_(2, slot, v)
    capacity = state.mask.shape[1]
    readable = state.mask.bool() & (torch.arange(capacity, device=ids.device) < state.keys_end)
    cross_mask = cross_attention_mask(slot, readable, capacity)  # the new token sees the slots up to its own
    cache = {cache_kwarg(model.anchor): state.anchor_cache}
    out = model.run_anchor(state.buffers, cross_mask, input_ids=ids, attention_mask=state.mask,
                           position_ids=state.positions, use_cache=True, **cache)
    state.positions.add_(1)
    state.length.add_(1)
    return out.logits[:, -1]


class CompiledStepper:
    """generation.CachedStepper's interface (prefill, next) over static caches, each step one compiled graph."""

    def __init__(self, model: ComposedModel, refresh_augmenting: bool, capacity: int):
        self.model, self.refresh, self.capacity = model, refresh_augmenting, capacity_for(capacity)
        self.eager, self.guarded = False, False

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        model, (batch, prompt) = self.model, input_ids.shape
        dtype = next(model.blocks.parameters()).dtype
        self.state = state = _StepState(model, batch, self.capacity, dtype, input_ids.device)
        state.refresh = self.refresh
        sliding = [type(layer).__name__ for cache in (state.anchor_cache, *state.augmenting_caches)
                   for layer in cache.layers if type(layer) is not StaticLayer]
        if sliding and not self.eager:
            # transformers' static sliding-window layer keeps its length as a Python int, which dynamo would guard
            # on (a new graph every step): such models decode eagerly over the same static caches
            warnings.warn(f"compiled decoding: {sliding[0]} caches (sliding-window attention) recompile at every "
                          "step; decoding eagerly", stacklevel=3)
            self.eager = True
        state.mask[:, :prompt] = mask
        positions = position_ids_from_mask(mask)
        states = model.run_augmenting(input_ids, state.mask, positions, caches=state.augmenting_caches)
        for pairs, buffers in zip(model.keys_values(states), state.buffers):
            for (k, v), (kb, vb) in zip(pairs, buffers):
                kb[:, :, :prompt], vb[:, :, :prompt] = k, v
        views = [[(kb[:, :, :prompt], vb[:, :, :prompt]) for kb, vb in buffers] for buffers in state.buffers]
        cross_mask = cross_attention_mask(torch.arange(prompt, device=input_ids.device), mask, prompt)
        out = model.run_anchor(views, cross_mask, input_ids=input_ids, attention_mask=state.mask,
                               position_ids=positions, use_cache=True,
                               **{cache_kwarg(model.anchor): state.anchor_cache})
        state.positions.copy_(positions[:, -1:] + 1)
        state.length.fill_(prompt)
        if not self.refresh:  # the prefix encoder: the blocks read the prompt's states only
            state.keys_end.fill_(prompt)
        return out.logits[:, -1]

    def next(self, sequences: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # a fresh [B, 1] tensor each step: a view into `sequences` has a stride that changes, which would recompile
        new_ids = torch.empty((sequences.shape[0], 1), dtype=sequences.dtype, device=sequences.device)
        new_ids.copy_(sequences[:, -1:])
        if self.eager:
            return _decode_step(self.model, self.state, new_ids)
        try:
            if not self.guarded:  # the generation's first step: dynamo checks every guard and picks the graph
                self.guarded = True
                return compiled_step()(self.model, self.state, new_ids)
            # Later steps pass the same model and state objects with the same shapes, so the graph the first step
            # chose still applies; checking its guards (every parameter's) again would cost a share of each step
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return compiled_step()(self.model, self.state, new_ids)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            # Too many shapes in one process (batch sizes, capacities, dtypes): dynamo stops at its recompile limit
            # before it traces anything, so the state is untouched and the step runs eagerly over the same caches.
            warnings.warn("compiled decoding: torch._dynamo's recompile limit is reached for this shape; decoding "
                          "on eagerly (fewer distinct batch sizes or lengths per process avoid it)", stacklevel=2)
            self.eager = True
            return _decode_step(self.model, self.state, new_ids)


@functools.cache
def compiled_step():
    """The compiled decoding step (one per process: dynamo keeps its graphs on `_decode_step`'s code).

    cpp_wrapper: the graph calls its kernels from C++ rather than from a Python wrapper, for a faster step at a longer
    compilation when inductor's cache is cold (benchmarks/README.md, P4r)."""
    return torch.compile(_decode_step, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})
