"""How an augmenting tokenizer reads each prefix text[:end] of a text, given its reading F of the whole text:
exactly (the reference: one tokenizer call over the whole prefix, O(T) calls of O(T) characters per row), or
through a window (the same readings, each call over a few tokens of text only).

Tokenizers read text locally: a merge across the cut at `end` changes the last tokens before it (BPE within a word,
a word-level token cut in two), never the ones far before it, so the prefix's reading is F's tokens up to a few
tokens before the cut, then the reading of the text from there to the cut. The window starts `window` tokens of
F before the first token that the cut touches (the first one ending after it), at a token boundary of F. A
boundary does not always restart the tokenizer as the whole text's reading does there (the middle of a word
under BPE, SentencePiece's dummy prefix before a word): within its first few tokens the window's reading must
rejoin F's, `window // 2` tokens in a row with the same ids and spans, all before the cut, and from there on it is
the prefix's reading; otherwise the window doubles, and from F's first text token on the prefix is read whole.
tests/unit/test_cross_tokenizer_windowed.py compares both on many random texts, with merges across cuts, for the
tokenizer families calm_dist is tested with: a property of tokenizers that read text locally, not a proof.

A reading here is `PrefixReading`: F's first `shared` tokens, then `ids`/`spans` (the window's, in the text's
characters): a windowed reading never materialises the prefix, and costs O(window) per cut.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

Span = tuple[int, int]
WINDOW = 8  # tokens of F re-read before the first token a cut touches; 4 in a row must read as in F


@dataclass
class PrefixReading:
    """text[:end]'s reading: F's first `shared` tokens, then `ids` with their character `spans`."""

    shared: int
    ids: list[int]
    spans: list[Span]


def read(tokenizer, text: str) -> tuple[list[int], list[Span]]:
    """The tokens a model reads for `text`, and their character spans: its bos (span (0, 0)) when it has one, then
    the text's tokens."""
    ids, spans = tokenizer.encode_with_spans(text)
    bos = getattr(tokenizer, "bos_id", None)
    head_ids, head_spans = ([bos], [(0, 0)]) if bos is not None else ([], [])
    return head_ids + list(ids), head_spans + [tuple(s) for s in spans]


def encode_many(tokenizer, texts: list[str]) -> list[tuple[list[int], list[Span]]]:
    """encode_with_spans of each text: in one call into the library when the tokenizer has a batched form
    (calm_dist.data.tokenizer.Tokenizer's `encode_batch_with_spans`; per-call overhead dominates short windows)."""
    batched = getattr(tokenizer, "encode_batch_with_spans", None)
    if batched is not None and texts:
        return [(list(ids), [tuple(s) for s in spans]) for ids, spans in batched(texts)]
    return [tokenizer.encode_with_spans(t) for t in texts]


def exact_readings(text: str, ends: list[int], tokenizer, whole: tuple[list[int], list[Span]]
                   ) -> dict[int, PrefixReading]:
    """The reference: each distinct end's prefix read whole (the whole text's reading `whole` at its end)."""
    out = {}
    for end in dict.fromkeys(ends):
        ids, spans = whole if end >= len(text) else read(tokenizer, text[:end])
        out[end] = PrefixReading(0, list(ids), list(spans))
    return out


def windowed_readings(text: str, ends: list[int], tokenizer, whole: tuple[list[int], list[Span]],
                      window: int = WINDOW) -> dict[int, PrefixReading]:
    """The readings of exact_readings, each re-read from `window` tokens of F before the cut (see the module
    docstring); the windows of one round are tokenized in one batched call."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    ids, spans = whole
    head = 1 if getattr(tokenizer, "bos_id", None) is not None else 0  # F's bos, never re-read
    ends_of_f = [e for _, e in spans]
    out: dict[int, PrefixReading] = {}
    todo = {}  # end -> tokens of F re-read before the first token the cut touches
    for end in dict.fromkeys(ends):
        if end >= len(text):
            out[end] = PrefixReading(len(ids), [], [])
        else:
            todo[end] = window
    while todo:
        starts, exact = {}, []
        for end, back in todo.items():
            touched = bisect.bisect_right(ends_of_f, end, lo=head)  # F's first token ending after the cut
            first = touched - back
            if first > head:
                starts[end] = first
            else:
                exact.append(end)
        # from F's first text token on: the whole prefix, read as the reference does (bos, then the text's tokens)
        for end, (prefix_ids, prefix_spans) in zip(exact, encode_many(tokenizer, [text[:end] for end in exact])):
            out[end] = PrefixReading(head, list(prefix_ids), [tuple(s) for s in prefix_spans])
            del todo[end]
        windows = list(starts.items())
        readings = encode_many(tokenizer, [text[spans[first][0]:end] for end, first in windows])
        for (end, first), (w_ids, w_spans) in zip(windows, readings):
            offset = spans[first][0]
            w_spans = [(s + offset, e + offset) for s, e in w_spans]
            joined = _rejoin(ids, spans, first, w_ids, w_spans, todo[end] // 2)
            if joined is not None:
                shared, m = joined
                out[end] = PrefixReading(shared, list(w_ids[m:]), w_spans[m:])
                del todo[end]
            else:  # the window never reads as F does before the cut: start further back
                todo[end] *= 2
    return out


def _rejoin(ids: list[int], spans: list[Span], first: int, w_ids: list[int], w_spans: list[Span], sync: int
            ) -> tuple[int, int] | None:
    """(j, m): the window's token m is F's token j, and the `sync` tokens from there agree in ids and spans, all
    ending before the cut (F's tokens from `first` to j + sync all precede the first one it touches, which the
    window starts `2 * sync` tokens before). None when no such token exists. The window's first tokens may read
    otherwise than F's (SentencePiece reads a leading space as its dummy prefix, '▁' of no width)."""
    where = {tuple(spans[j]): j for j in range(first, first + sync + 1)}  # F's tokens a sync run may start at
    for m, span in enumerate(w_spans[:sync + 1]):
        j = where.get(tuple(span))
        if j is not None and w_ids[m:m + sync] == ids[j:j + sync] and \
                w_spans[m:m + sync] == [tuple(s) for s in spans[j:j + sync]]:
            return j, m
    return None
