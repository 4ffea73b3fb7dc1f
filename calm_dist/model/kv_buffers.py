"""KV caches that grow in place: a decoding step writes its new keys and values into spare room and reads views.

transformers' DynamicCache grows every layer by `torch.cat`, which copies the whole cache at every step: at batch
16 that copying is about 40% of a decoding step on a CPU (benchmarks/README.md, P4b16). Here each layer keeps a
buffer with room for the expected length (capacity doubling beyond it), writes the new tokens into it and
returns views of the filled part, so attention reads exactly the tokens so far (no mask over empty slots, unlike
StaticCache) and a step copies only its own tokens. Rolling back (`crop`, the cross-tokenizer decoding) shortens
the filled part. `Growing` is the same buffer for one tensor (the composition blocks' projected keys/values).
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_CAPACITY = 64  # tokens: a buffer smaller than this would double again within a few steps


class Growing:
    """One tensor growing along `dim` without copying what it holds: `append` returns a view of everything so far."""

    def __init__(self, dim: int = -2, capacity: int = 0):
        self.dim, self.capacity_hint, self.buffer, self.length = dim, capacity, None, 0

    def append(self, new: torch.Tensor) -> torch.Tensor:
        dim = self.dim % new.dim()
        need = self.length + new.shape[dim]
        if self.buffer is None or need > self.buffer.shape[dim]:
            capacity = max(need, self.capacity_hint, MIN_CAPACITY,
                           2 * (self.buffer.shape[dim] if self.buffer is not None else 0))
            shape = list(new.shape)
            shape[dim] = capacity
            grown = new.new_empty(shape)
            if self.length:
                grown.narrow(dim, 0, self.length).copy_(self.view())
            self.buffer = grown
        self.buffer.narrow(dim, self.length, new.shape[dim]).copy_(new)
        self.length = need
        return self.view()

    def view(self) -> torch.Tensor:
        return self.buffer.narrow(self.dim % self.buffer.dim(), 0, self.length)

    def shorten(self, tokens: int) -> None:
        self.length = max(0, self.length - tokens)

    def select_rows(self, index_fn) -> None:
        """Apply a batch-dimension selection (index_select, indexing, repeat_interleave) to what the buffer holds."""
        if self.buffer is not None:
            self.buffer = index_fn(self.view()).contiguous()
            self.length = self.buffer.shape[self.dim % self.buffer.dim()]


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of Growing buffers ([batch, heads, tokens, head_dim])."""

    def __init__(self, capacity: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.capacity = capacity

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._keys, self._values = Growing(-2, self.capacity), Growing(-2, self.capacity)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = self._keys.append(key_states), self._values.append(value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._keys.length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of tokens to remove")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        for growing in (self._keys, self._values):
            growing.shorten(-tokens_to_remove)
        self.keys, self.values = self._keys.view(), self._values.view()

    def _rows(self, index_fn) -> None:
        if self.get_seq_length() > 0:
            for growing in (self._keys, self._values):
                growing.select_rows(index_fn)
            self.keys, self.values = self._keys.view(), self._values.view()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rows(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))


def growing_cache(config, capacity: int = 0) -> DynamicCache:
    """A DynamicCache for `config`'s model whose full-attention layers grow in place (GrowingLayer, buffers sized
    for `capacity` tokens); other layer kinds (sliding windows) keep transformers' own."""
    cache = DynamicCache(config=config)
    if not cache.layers:  # a config whose layer kinds transformers does not list: layers appear on first use
        cache.layer_class_to_replicate = lambda: GrowingLayer(capacity)
    cache.layers = [GrowingLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
