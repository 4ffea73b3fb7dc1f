"""Decoding a composed model: every new token goes to every model, each with its own KV cache.

With `use_cache=True` the anchor and each augmenting model keep a transformers cache, and each
composition block keeps the keys/values it projected from the augmenting states so far; a step
costs one token per model. `use_cache=False` recomputes the whole sequence every step. Both give
the same tokens under greedy decoding. `refresh_augmenting=False` is the paper's "prefix encoder"
ablation: the augmenting models see the prompt only.
"""
from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from calm_dist.model.backbones import cache_kwarg
from calm_dist.model.compiled_decoding import CompiledStepper
from calm_dist.model.composition import ComposedModel, position_ids_from_mask
from calm_dist.model.cross_attention import cross_attention_mask
from calm_dist.model.kv_buffers import Growing, growing_cache


def _warpers(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None) -> LogitsProcessorList:
    warpers = LogitsProcessorList()
    if not do_sample:
        return warpers
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


def eos_ids(*values) -> list[int]:
    """The end-of-sequence ids among `values`, each an id, a list of ids (Llama-3's configs list several) or None:
    each id once, in order of appearance."""
    out: list[int] = []
    for value in values:
        for i in (value if isinstance(value, (list, tuple)) else [value]):
            if i is not None and int(i) not in out:
                out.append(int(i))
    return out


@torch.no_grad()
def generate(model: ComposedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 32, use_cache: bool = True, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None, refresh_augmenting: bool = True,
             generator: torch.Generator | None = None, compile_step: bool = False) -> torch.Tensor:
    """Prompt + new tokens [B, T + max_new_tokens] (finished rows padded with pad_token_id), like transformers.
    `eos_token_id` may list several ids (a row ends at any of them); None: the anchor config's. `compile_step` (with
    use_cache) runs each step as one compiled graph over static caches (compiled_decoding.py): the same tokens in
    fp32, after a compilation that long generations earn back."""
    config = model.anchor.config
    eos = eos_ids(config.eos_token_id if eos_token_id is None else eos_token_id)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
    stops = torch.tensor(eos, device=input_ids.device) if eos else None
    # Every decoded id goes back into every model: none may name a row past the smallest embedding table (a padded
    # anchor head has rows the augmenting models lack, as Qwen2.5-7B's 152,064 against 0.5B's 151,936)
    rows = min(c.vocab_size for c in [config, *model.augmenting_configs])
    warpers = _warpers(do_sample, temperature, top_k, top_p)
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    capacity = input_ids.shape[1] + max_new_tokens
    if use_cache and compile_step:
        step = CompiledStepper(model, refresh_augmenting, capacity)
    elif use_cache:
        step = CachedStepper(model, refresh_augmenting, capacity=capacity)
    else:
        step = RecomputingStepper(model, refresh_augmenting)

    sequences = input_ids
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    logits = step.prefill(input_ids, mask)
    for _ in range(max_new_tokens):
        logits = logits.float()
        logits[:, rows:] = float("-inf")
        scores = warpers(sequences, logits)
        if do_sample:
            next_tokens = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)
        else:
            next_tokens = scores.argmax(dim=-1)
        if pad_token_id is not None:
            next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_token_id))
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
        if stops is not None:
            unfinished &= ~torch.isin(next_tokens, stops)
        if not unfinished.any() or sequences.shape[1] == input_ids.shape[1] + max_new_tokens:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits = step.next(sequences, mask)
    if sequences.shape[1] < input_ids.shape[1] + max_new_tokens and pad_token_id is not None:
        missing = input_ids.shape[1] + max_new_tokens - sequences.shape[1]
        fill = sequences.new_full((sequences.shape[0], missing), pad_token_id)
        sequences = torch.cat([sequences, fill], dim=1)
    return sequences


class RecomputingStepper:
    """Every step runs every model over the whole sequence."""

    def __init__(self, model: ComposedModel, refresh_augmenting: bool):
        self.model, self.refresh = model, refresh_augmenting

    def prefill(self, input_ids, mask):
        self.prompt_ids, self.prompt_mask = input_ids, mask
        return self.next(input_ids, mask)

    def next(self, sequences, mask):
        if self.refresh:
            return self.model(sequences, attention_mask=mask).logits[:, -1]
        # prefix encoder: augmenting states of the prompt only, the anchor over everything
        states = self.model.run_augmenting(self.prompt_ids, self.prompt_mask, position_ids_from_mask(self.prompt_mask))
        t = sequences.shape[1]
        cross_mask = cross_attention_mask(torch.arange(t, device=sequences.device), self.prompt_mask,
                                          self.prompt_ids.shape[1])
        out = self.model.run_anchor(self.model.keys_values(states), cross_mask, input_ids=sequences,
                                    attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
        return out.logits[:, -1]


class CachedStepper:
    """One KV cache per model, plus the composition blocks' keys/values so far; one token per step. Every cache
    grows in place (kv_buffers.py: buffers for `capacity` tokens, the prompt and the new ones), so a step copies
    its own token's keys and values, not the caches."""

    def __init__(self, model: ComposedModel, refresh_augmenting: bool, capacity: int = 0):
        self.model, self.refresh, self.capacity = model, refresh_augmenting, capacity
        self.anchor_cache = growing_cache(model.anchor.config, capacity)
        self.augmenting_caches = [growing_cache(m.config, capacity) for m in model.augmenting]

    def prefill(self, input_ids, mask):
        self.key_mask = mask
        projected = self._project(input_ids, mask, position_ids_from_mask(mask))
        # [augmenting model][pair] -> (K, V) buffers, growing along the token dimension
        self.buffers = [[(Growing(2, self.capacity), Growing(2, self.capacity)) for _ in pairs] for pairs in projected]
        self.keys_values = self._append(projected)
        return self._anchor(input_ids, mask, position_ids_from_mask(mask))

    def next(self, sequences, mask):
        new_ids, new_positions = sequences[:, -1:], position_ids_from_mask(mask)[:, -1:]
        if self.refresh:
            self.keys_values = self._append(self._project(new_ids, mask, new_positions))
            self.key_mask = mask
        return self._anchor(new_ids, mask, new_positions)

    def _append(self, projected):
        return [[(kb.append(k), vb.append(v)) for (k, v), (kb, vb) in zip(pairs, buffers)]
                for pairs, buffers in zip(projected, self.buffers)]

    def _project(self, ids, mask, positions):
        states = self.model.run_augmenting(ids, mask, positions, caches=self.augmenting_caches)
        return self.model.keys_values(states)

    def _anchor(self, ids, mask, positions):
        total = mask.shape[1]
        query_positions = torch.arange(total - ids.shape[1], total, device=ids.device)
        cross_mask = cross_attention_mask(query_positions, self.key_mask, self.key_mask.shape[1])
        out = self.model.run_anchor(self.keys_values, cross_mask, input_ids=ids, attention_mask=mask,
                                    position_ids=positions, use_cache=True,
                                    **{cache_kwarg(self.model.anchor): self.anchor_cache})
        return out.logits[:, -1]
