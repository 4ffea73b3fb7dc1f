"""Rows for models of different tokenizers (data.different_tokenizers): the anchor's rows, and per augmenting
model its reading of each row's text aligned to the anchor's tokens (token_alignment.align), built when a
micro-batch is read.

Why in the collate and not stored at prepare time: the shards hold each document's text and the anchor's spans
(texts.py: the text's UTF-8 bytes and 8 bytes of spans per anchor token), never an augmenting model's tokens or
tails, whose count per row is not bounded by the row length (a tail per anchor token that ends inside an
augmenting token); a rank reads only its micro-batch's rows with pread, and nothing at start-up grows with the
corpus. What alignment costs is paid per micro-batch on the CPU (the windowed reading, linear in the row:
docs/cross_tokenizer.md gives its measured cost), by every rank for its own rows only.

The prepared rows' fingerprint covers the augmenting tokenizers (the rows are fitted to data.augmenting_seq_len
with them), so a checkpoint or states cache that names it names both tokenizers.
"""
from __future__ import annotations

import numpy as np

from calm_dist.config import Config, ConfigError
from calm_dist.model.prefix_reading import WINDOW


class AlignedRows:
    """`rows` (TokenRows or MixedRows) whose batches also carry `augmenting_inputs`: one AugmentingInputs per
    tokenizer of `tokenizers`. Everything else (len, fingerprint, labelled_tokens, ...) is the rows'.

    `prefetch(indices)` reads the next micro-batch's rows and texts here, in the caller's thread (the rows' open
    files are not shared with another thread), and aligns them in a background one, where the tokenizer's loop
    overlaps the step; `get(indices)` returns that batch, or builds it when none was prefetched."""

    def __init__(self, rows, tokenizers: list, augmenting_len: int, window: int | None = WINDOW):
        self.rows, self.tokenizers, self.augmenting_len, self.window = rows, list(tokenizers), augmenting_len, window
        self._pool, self._pending = None, {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getattr__(self, name):
        if name == "rows":  # not set yet (unpickling): never recurse
            raise AttributeError(name)
        return getattr(self.rows, name)

    def batch(self, indices) -> dict:
        return self._aligned(*self._read(indices))

    def prefetch(self, indices) -> None:
        key = tuple(int(i) for i in indices)
        if key not in self._pending:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="align-prefetch")
            self._pending[key] = self._pool.submit(self._aligned, *self._read(key))

    def get(self, indices) -> dict:
        future = self._pending.pop(tuple(int(i) for i in indices), None)
        return future.result() if future is not None else self.batch(indices)

    def _read(self, indices) -> tuple[dict, list]:
        """The rows' tensors and their (text, spans): the file reads of a batch."""
        return self.rows.batch(indices), self.rows.texts(indices)

    def _aligned(self, out: dict, docs: list) -> dict:
        """`out` with augmenting_inputs: each tokenizer's reading of the rows' texts, aligned (no file read)."""
        import torch

        from calm_dist.model.token_alignment import align

        mask = out["attention_mask"]
        spans = torch.zeros(*mask.shape, 2, dtype=torch.long)
        for i, (_, doc_spans) in enumerate(docs):
            spans[i, :len(doc_spans)] = torch.from_numpy(np.asarray(doc_spans, dtype=np.int64)).view(-1, 2)
        texts = [text for text, _ in docs]
        aligned = []
        for a, tokenizer in enumerate(self.tokenizers):
            inputs = align(texts, spans, mask, tokenizer, pad_id=tokenizer.pad_id or 0, window=self.window)
            longest = int(inputs.position_ids.max()) + 1 if inputs.position_ids.numel() else 0
            if longest > self.augmenting_len:  # prepare fitted each row's reading; a prefix read longer is rare
                raise ConfigError(f"augmenting model {a} reads a prefix of a row of {longest} tokens, more than "
                                  f"data.augmenting_seq_len={self.augmenting_len}: raise it")
            aligned.append(inputs)
        out["augmenting_inputs"] = aligned
        return out


def reading_tokenizers(cfg: Config) -> list:
    """The augmenting models' tokenizers when they read the text themselves (data.different_tokenizers), else
    none: every model reads the anchor's ids."""
    if not cfg.data.different_tokenizers:
        return []
    from calm_dist.data.tokenizer import model_tokenizers

    return model_tokenizers(cfg).augmenting


def with_alignment(rows, cfg: Config, tokenizers: list):
    """`rows` as the trainer reads them: AlignedRows with different tokenizers, else the rows themselves (the LoRA
    baseline, model.method=lora, reads the anchor's rows alone)."""
    if rows is None or not cfg.data.different_tokenizers or cfg.model.method != "calm":
        return rows
    return AlignedRows(rows, tokenizers, cfg.data.augmenting_len)
