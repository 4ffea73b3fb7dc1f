"""Decoding a composition whose augmenting models read the text through their own tokenizers.

Each generated anchor token extends the text (the anchor's new ids, decoded); each augmenting tokenizer re-reads
the whole text. Where its reading's last tokens change (a merge across the boundary: "x a" read ["x", " a"],
"x ab" reads ["x", " ab"]), the augmenting model's KV cache and its blocks' projected keys/values roll back to the
last token both readings share (the cache's crop), and the model reads on from there. The newest anchor token has
read the whole text, so it attends every augmenting token; earlier ones keep what they attended when they were
newest, which is what token_alignment.align gives every anchor token in one forward. `use_cache=False`
recomputes that forward over the whole text every step; both give the same tokens under greedy decoding.

Rows decode one at a time (each row's readings roll back by their own amounts), greedily. The tokenizers are
duck-typed (calm_dist/data/tokenizer.py's `Tokenizer` is one): token_alignment's `encode_with_spans` and `bos_id`,
and for the anchor's also `decode(ids)` (special tokens skipped), `eos_id` and `vocab_size` (None / absent:
the model's). generation.py keeps the same-tokenizer path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from calm_dist.model.backbones import cache_kwarg
from calm_dist.model.completion_text import decoded_completion
from calm_dist.model.composition import ComposedModel
from calm_dist.model.generation import eos_ids
from calm_dist.model.kv_buffers import growing_cache
from calm_dist.model.token_alignment import align, common_prefix, read

# An unfinished multi-byte character decodes to this; its text waits for the next token
REPLACEMENT = "\ufffd"


@dataclass
class Decoded:
    ids: list[list[int]]  # per row, the new anchor ids (its eos included when reached)
    texts: list[str]  # per row, the text they add to the prompt
    rollbacks: int  # how often an augmenting reading's last tokens changed (with use_cache=True)


@torch.no_grad()
def generate_across_tokenizers(model: ComposedModel, prompts: list[str], anchor_tokenizer,
                               augmenting_tokenizers: list, *, max_new_tokens: int = 32, use_cache: bool = True,
                               eos_token_id: int | list[int] | None = None,
                               decoding: str = "after_prompt") -> Decoded:
    """Greedy decoding of each prompt; `eos_token_id` may list several ids (None: the anchor tokenizer's, else its
    config's). `decoding` turns the new ids into the text the augmenting models read (`Text`): as the training
    records' completions read (text_records.completion_decoding), or "after_prompt" for a text read on."""
    if len(augmenting_tokenizers) != len(model.augmenting):
        raise ValueError(f"{len(augmenting_tokenizers)} augmenting tokenizers for {len(model.augmenting)} models")
    if eos_token_id is None:
        eos_token_id = getattr(anchor_tokenizer, "eos_id", None)
    stops = eos_ids(eos_token_id if eos_token_id is not None else model.anchor.config.eos_token_id)
    vocabulary = getattr(anchor_tokenizer, "vocab_size", None)
    out = Decoded([], [], 0)
    for prompt in prompts:
        reader = (CachedReader if use_cache else RecomputingReader)(model, augmenting_tokenizers)
        ids, spans = read(anchor_tokenizer, prompt)
        text = Text(prompt, anchor_tokenizer, ids, decoding)
        new: list[int] = []
        logits = reader.prefill(text.value, ids, spans)
        for step in range(max_new_tokens):
            logits = logits.float()
            if vocabulary is not None:
                logits[vocabulary:] = float("-inf")  # a padded head's rows decode to no text
            token = int(logits.argmax())
            new.append(token)
            start = len(text.value)
            text.extend(new)
            if token in stops or step == max_new_tokens - 1:
                break
            ids, spans = ids + [token], spans + [(start, len(text.value))]
            logits = reader.next(text.value, ids, spans)
        out.ids.append(new)
        out.texts.append(text.value[len(prompt):])
        out.rollbacks += getattr(reader, "rollbacks", 0)
    return out


class Text:
    """The text so far: the prompt, then what the anchor's new ids decode to, as a whole, so that a token's text can
    depend on the one before (`decoding`: calm_dist.model.completion_text.decoded_completion)."""

    def __init__(self, prompt: str, tokenizer, prompt_ids: list[int], decoding: str = "after_prompt"):
        self.value, self.prompt, self.tokenizer = prompt, prompt, tokenizer
        self.prompt_ids, self.decoding = prompt_ids, decoding

    def extend(self, new_ids: list[int]) -> None:
        text = self.prompt + decoded_completion(self.tokenizer, self.prompt_ids, new_ids,
                                                self.decoding).rstrip(REPLACEMENT)
        if not text.startswith(self.value):
            raise ValueError(f"the anchor's tokenizer rewrote text already read: {self.value!r}, then {text!r}")
        self.value = text


def _tensors(ids: list[int], spans: list, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.tensor([ids], device=device), torch.ones(1, len(ids), dtype=torch.long, device=device),
            torch.tensor([spans], dtype=torch.long, device=device).view(1, -1, 2))


class RecomputingReader:
    """Every step, the composed forward over the whole text (every anchor token reading its prefix's tokens)."""

    def __init__(self, model: ComposedModel, tokenizers: list):
        self.model, self.tokenizers = model, tokenizers
        self.device = next(model.parameters()).device

    def prefill(self, text: str, ids: list[int], spans: list) -> torch.Tensor:
        return self.next(text, ids, spans)

    def next(self, text: str, ids: list[int], spans: list) -> torch.Tensor:
        input_ids, mask, span_tensor = _tensors(ids, spans, self.device)
        inputs = [align([text], span_tensor, mask, tok).to(self.device) for tok in self.tokenizers]
        return self.model(input_ids, attention_mask=mask, augmenting_inputs=inputs).logits[0, -1]


class CachedReader:
    """One KV cache per model and the blocks' projected keys/values of each augmenting reading; a step runs one
    anchor token and, per augmenting model, the tokens its reading changed."""

    def __init__(self, model: ComposedModel, tokenizers: list):
        self.model, self.tokenizers = model, tokenizers
        self.device = next(model.parameters()).device
        self.anchor_cache = growing_cache(model.anchor.config)
        self.caches = [growing_cache(m.config) for m in model.augmenting]  # crop rolls a reading back
        self.rollbacks = 0

    def prefill(self, text: str, ids: list[int], spans: list) -> torch.Tensor:
        """The prompt in one forward, as RecomputingReader's; the caches then keep the whole text's reading F, and
        drop the tails that only the prompt's anchor tokens read (they come after F)."""
        input_ids, mask, span_tensor = _tensors(ids, spans, self.device)
        aligned = [align([text], span_tensor, mask, tok).to(self.device) for tok in self.tokenizers]
        states = self.model.run_augmenting_each([a.model_inputs() for a in aligned], caches=self.caches)
        self.keys_values = self.model.keys_values(states)
        logits = self._anchor(input_ids, mask, [a.cross_attention_mask(mask) for a in aligned])
        self.readings = [read(tok, text) for tok in self.tokenizers]
        for a, (reading_ids, _) in enumerate(self.readings):
            self._crop(a, len(reading_ids))
        return logits

    def next(self, text: str, ids: list[int], spans: list) -> torch.Tensor:
        runs: list[tuple | None] = []
        for a, tok in enumerate(self.tokenizers):
            new_ids, new_spans = read(tok, text)
            kept = common_prefix(*self.readings[a], new_ids, new_spans)
            if kept < len(self.readings[a][0]):
                self._crop(a, kept)
                self.rollbacks += 1
            self.readings[a] = (new_ids, new_spans)
            runs.append(None if kept == len(new_ids) else (
                torch.tensor([new_ids[kept:]], device=self.device),
                torch.ones(1, len(new_ids), dtype=torch.long, device=self.device),
                torch.arange(kept, len(new_ids), device=self.device)[None]))
        if any(r is not None for r in runs):
            states = self.model.run_augmenting_each(runs, caches=self.caches)
            for a, pairs in enumerate(self.model.layer_pairs):
                if runs[a] is not None:
                    self.keys_values[a] = [
                        tuple(torch.cat([old, fresh], dim=2) for old, fresh in
                              zip(self.keys_values[a][p], self.model.blocks[a][p].keys_values(states[a][i])))
                        for p, (i, _) in enumerate(pairs)]
        # the newest anchor token has read the whole text: it attends every augmenting token
        every = [torch.ones(1, 1, 1, len(r[0]), dtype=torch.bool, device=self.device) for r in self.readings]
        mask = torch.ones(1, len(ids), dtype=torch.long, device=self.device)
        return self._anchor(torch.tensor([ids[-1:]], device=self.device), mask, every)

    def _crop(self, a: int, length: int) -> None:
        """Augmenting model `a`'s cache and projected keys/values, back to its first `length` tokens."""
        surplus = self.caches[a].get_seq_length() - length
        if surplus > 0:
            self.caches[a].crop(-surplus)  # transformers 5: a negative count removes that many tokens
        self.keys_values[a] = [(k[:, :, :length], v[:, :, :length]) for k, v in self.keys_values[a]]

    def _anchor(self, input_ids: torch.Tensor, mask: torch.Tensor, cross_masks: list[torch.Tensor]) -> torch.Tensor:
        positions = torch.arange(mask.shape[1] - input_ids.shape[1], mask.shape[1], device=self.device)[None]
        out = self.model.run_anchor(self.keys_values, cross_masks, input_ids=input_ids, attention_mask=mask,
                                    position_ids=positions, use_cache=True,
                                    **{cache_kwarg(self.model.anchor): self.anchor_cache})
        return out.logits[0, -1]
