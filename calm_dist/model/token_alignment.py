"""Models of different tokenizers, aligned by character spans: which augmenting tokens each anchor token reads.

Both models read the same text, each through its own tokenizer, and every token carries its character span
(start, end) in the text. Anchor token t has read the text up to end(t), so it reads the augmenting model's reading
of that prefix, text[:end(t)]: tokens that all end at or before end(t). That reading is usually the first k tokens
of the whole text's reading F, but not always, because a tokenizer merges across the boundary: "x a" reads
["x", " a"], "x ab" reads ["x", " ab"]. F's tokens that end by end(t) are no substitute: whether " a" survived in
F tells the anchor that the next character is not "b" (the text after end(t) would leak into its logits), and
decoding, where the text really ends at end(t), would see something else.

So each augmenting row holds F, then one *tail* per prefix whose reading departs from F: the prefix's tokens
after the k it shares with F. A tail token attends F's first k tokens and its tail up to itself, at positions
k, k+1, ..., which gives it exactly its state in the prefix's own reading; anchor token t attends F's first k_t
tokens and its tail. Causality then holds in characters: the anchor logits of a token that ends at or before
character c never depend on the text after c. An anchor token whose prefix reads to nothing (an augmenting
tokenizer without bos, at character 0) attends nothing, and the block adds exactly zero there
(CrossAttentionBlock).

A tokenizer here is duck-typed (calm_dist/data/tokenizer.py's `Tokenizer` is one): `encode_with_spans(text)`
gives (ids, [(start, end), ...]) without special tokens, and `bos_id` (None: no bos) the token put first, with
span (0, 0). `align` reads each distinct anchor token end's prefix through a window of a few tokens before the
cut (calm_dist/model/prefix_reading.py), or whole with window=None, the reference.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch

from calm_dist.model.cross_attention import cross_attention_mask
from calm_dist.model.prefix_reading import WINDOW, exact_readings, read, windowed_readings

Span = tuple[int, int]


class SpanTokenizer(Protocol):
    bos_id: int | None

    def encode_with_spans(self, text: str) -> tuple[list[int], list[Span]]: ...


def common_prefix(ids: list[int], spans: list[Span], other_ids: list[int], other_spans: list[Span]) -> int:
    """How many leading tokens two readings share, same id and same span: a causal model gives them the same
    states in both."""
    n = 0
    for a, sa, b, sb in zip(ids, spans, other_ids, other_spans):
        if a != b or tuple(sa) != tuple(sb):
            break
        n += 1
    return n


@dataclass
class AugmentingInputs:
    """One augmenting model's reading of a batch of texts, aligned to the anchor's tokens (built by `align`)."""

    input_ids: torch.Tensor  # [B, S] F's tokens, then the tails; padding on either side
    attention_mask: torch.Tensor  # [B, S] 1: a token, 0: padding
    position_ids: torch.Tensor  # [B, S] F's i-th token: i; a tail's j-th token after F's first k: k + j
    reading: torch.Tensor  # [B, S] 0: F's tokens; r >= 1: the tokens of the row's tail r
    prefix: torch.Tensor  # [B, S] how many of F's tokens each token reads: F's i-th: i + 1 (itself), a tail's: k
    spans: torch.Tensor  # [B, S, 2] each token's character (start, end); (0, 0) for padding
    anchor_prefix: torch.Tensor  # [B, T] how many of F's tokens each anchor token reads
    anchor_reading: torch.Tensor  # [B, T] the tail each anchor token reads after them (0: none)

    @property
    def has_tails(self) -> bool:
        return bool(self.reading.any())

    def to(self, device, non_blocking: bool = False) -> "AugmentingInputs":
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                                            for f in dataclasses.fields(self)})

    def _visible(self, prefix: torch.Tensor, reading: torch.Tensor, position: torch.Tensor | None) -> torch.Tensor:
        """[B, 1, Tq, S]: queries that read `prefix` of F's tokens, then their tail `reading` up to `position`
        (None: the whole tail)."""
        f_keys = self.attention_mask.bool() & (self.reading == 0)
        settled = cross_attention_mask(prefix - 1, f_keys, self.input_ids.shape[1], key_positions=self.position_ids)
        tail = ((self.reading[:, None, :] == reading[:, :, None]) & (reading[:, :, None] > 0)
                & self.attention_mask.bool()[:, None, :])  # [B, Tq, S]
        if position is not None:
            tail = tail & (self.position_ids[:, None, :] <= position[:, :, None])
        return settled | tail[:, None]

    def self_attention_mask(self) -> torch.Tensor:
        """[B, 1, S, S] boolean (True: attend): the augmenting model's own attention, causal over F, a tail token
        over F's first k tokens and its tail up to itself."""
        visible = self._visible(self.prefix, self.reading, self.position_ids)
        # Padding attends itself: a row with no visible key gives NaN states, and NaN survives even a zero attention
        # weight (0 * NaN) in the real tokens' outputs.
        return visible | torch.eye(visible.shape[-1], dtype=torch.bool, device=visible.device)

    def cross_attention_mask(self, anchor_mask: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, S] boolean: which augmenting tokens each anchor token reads; anchor padding reads none."""
        visible = self._visible(self.anchor_prefix, self.anchor_reading, None)
        return visible & anchor_mask.bool()[:, None, :, None]

    def model_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, position_ids) for the augmenting model: without tails the plain padding mask
        (the model's own causal path), with them self_attention_mask()."""
        mask = self.self_attention_mask() if self.has_tails else self.attention_mask
        return self.input_ids, mask, self.position_ids


@dataclass
class _Row:
    ids: list[int]
    spans: list[Span]
    positions: list[int]
    reading: list[int]
    prefix: list[int]


def _align_row(text: str, anchor_ends: list[int], tokenizer: SpanTokenizer, window: int | None
               ) -> tuple[_Row, list[tuple[int, int]]]:
    """Row `text`'s augmenting tokens (F, then the tails) and, per anchor end, (F tokens read, tail read)."""
    ids, spans = read(tokenizer, text)
    row = _Row(list(ids), list(spans), list(range(len(ids))), [0] * len(ids), list(range(1, len(ids) + 1)))
    readings = (exact_readings(text, anchor_ends, tokenizer, (ids, spans)) if window is None
                else windowed_readings(text, anchor_ends, tokenizer, (ids, spans), window))
    reads: dict[int, tuple[int, int]] = {}
    tails = 0
    for end in anchor_ends:
        if end in reads:
            continue
        prefix = readings[end]
        k = prefix.shared + common_prefix(ids[prefix.shared:], spans[prefix.shared:], prefix.ids, prefix.spans)
        tail = prefix.shared + len(prefix.ids) - k
        if tail == 0:
            reads[end] = (k, 0)
            continue
        new = slice(k - prefix.shared, None)
        tails += 1
        r = tails
        row.ids += prefix.ids[new]
        row.spans += prefix.spans[new]
        row.positions += list(range(k, k + tail))
        row.reading += [r] * tail
        row.prefix += [k] * tail
        reads[end] = (k, r)
    return row, [reads[end] for end in anchor_ends]


def align(texts: list[str], anchor_spans: torch.Tensor, anchor_mask: torch.Tensor, tokenizer: SpanTokenizer,
          pad_id: int = 0, padding_side: str = "right", window: int | None = WINDOW) -> AugmentingInputs:
    """One augmenting model's reading of `texts`, aligned to the anchor's tokens: `anchor_spans` [B, T, 2] are
    the character spans of the anchor tokens where `anchor_mask` [B, T] is 1 (padding's are ignored). The
    augmenting rows are padded with `pad_id` on `padding_side`; the anchor's layout is kept. Each prefix is read
    through a window of `window` tokens (prefix_reading.py); None reads each prefix whole, the reference."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    b, t = anchor_mask.shape
    anchor_prefix = torch.zeros(b, t, dtype=torch.long)
    anchor_reading = torch.zeros(b, t, dtype=torch.long)
    rows = []
    for i, text in enumerate(texts):
        real = anchor_mask[i].bool().cpu()
        ends = anchor_spans[i, :, 1].cpu()[real].tolist()
        row, reads = _align_row(text, ends, tokenizer, window)
        rows.append(row)
        if reads:
            anchor_prefix[i, real], anchor_reading[i, real] = torch.tensor(reads, dtype=torch.long).unbind(-1)
    width = max(len(r.ids) for r in rows)

    def padded(values: list, fill) -> torch.Tensor:
        pad = [fill] * (width - len(values))
        return torch.tensor(pad + values if padding_side == "left" else values + pad, dtype=torch.long)

    def stack(field: str, fill) -> torch.Tensor:
        return torch.stack([padded(getattr(r, field), fill) for r in rows])

    return AugmentingInputs(
        input_ids=stack("ids", pad_id),
        attention_mask=torch.stack([padded([1] * len(r.ids), 0) for r in rows]),
        position_ids=stack("positions", 0), reading=stack("reading", 0), prefix=stack("prefix", 0),
        spans=torch.stack([padded([list(s) for s in r.spans], [0, 0]) for r in rows]),
        anchor_prefix=anchor_prefix.to(anchor_mask.device), anchor_reading=anchor_reading.to(anchor_mask.device))


def read_batch(texts: list[str], tokenizer: SpanTokenizer, pad_id: int = 0, padding_side: str = "right"
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The anchor's side: (input_ids [B, T], attention_mask [B, T], spans [B, T, 2]) of each text's `read`, padded
    with `pad_id` on `padding_side`."""
    readings = [read(tokenizer, text) for text in texts]
    width = max(len(ids) for ids, _ in readings)
    out_ids = torch.full((len(texts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(texts), width, dtype=torch.long)
    spans = torch.zeros(len(texts), width, 2, dtype=torch.long)
    for i, (ids, row_spans) in enumerate(readings):
        cols = slice(width - len(ids), width) if padding_side == "left" else slice(0, len(ids))
        out_ids[i, cols] = torch.tensor(ids, dtype=torch.long)
        mask[i, cols] = 1
        spans[i, cols] = torch.tensor(row_spans, dtype=torch.long).view(-1, 2)
    return out_ids, mask, spans
