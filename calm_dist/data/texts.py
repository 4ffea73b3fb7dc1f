"""Each document's text and its anchor tokens' character spans, stored beside the token shards when the models
read through different tokenizers (data.different_tokenizers, docs/cross_tokenizer.md): the augmenting models
read a row's text, aligned to the anchor's tokens by those spans, when its micro-batch is built.

Shard i's text files (beside its token files, shards.py):

    shard-00000.text.bin        every document's text back to back, UTF-8
    shard-00000.text_index.npy  int64 [n_docs + 1]: each document's first byte in text.bin, then its size
    shard-00000.spans.bin       int32 [n_tokens, 2]: each token's (start, end) in its document's text, characters
    shard-00000.text.json       the sidecar, written last: counts, and each file's size and sha256

A shard's texts are held in memory until it closes (ROWS_PER_SHARD documents, not the corpus) and written
atomically, the sidecar last; `completed_texts` is what a resumed prepare checks. `TextReader` reads a document's
text and spans with pread, so a rank's resident memory does not grow with the corpus.
"""
from __future__ import annotations

import io
import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from calm_dist.files import write_atomic
from calm_dist.data.shards import shard_name

_SPAN_DTYPE, _INDEX_DTYPE = np.dtype("<i4"), np.dtype("<i8")


def _files(directory: Path, index: int) -> dict[str, Path]:
    stem = shard_name(index)
    return {part: Path(directory) / f"{stem}.{part}" for part in ("text.bin", "text_index.npy", "spans.bin",
                                                                   "text.json")}


class TextWriter:
    """The text files of one shard: `add` each document's text and its tokens' spans, then `close`."""

    def __init__(self, directory: Path, index: int):
        self.directory, self.index = Path(directory), index
        self._paths = _files(self.directory, index)
        self._paths["text.json"].unlink(missing_ok=True)
        self._texts: list[bytes] = []
        self._spans: list[np.ndarray] = []

    def add(self, text: str, spans) -> None:
        self._texts.append(text.encode())
        self._spans.append(np.asarray(spans, dtype=_SPAN_DTYPE).reshape(-1, 2))

    def close(self) -> dict:
        offsets = np.cumsum([0, *(len(t) for t in self._texts)], dtype=_INDEX_DTYPE)
        spans = np.concatenate(self._spans) if self._spans else np.zeros((0, 2), _SPAN_DTYPE)
        index = io.BytesIO()
        np.save(index, offsets)
        files = {}
        for part, data in (("text.bin", b"".join(self._texts)), ("text_index.npy", index.getvalue()),
                           ("spans.bin", spans.astype(_SPAN_DTYPE).tobytes())):
            files[self._paths[part].name] = {"bytes": len(data), "sha256": write_atomic(self._paths[part], data)}
        sidecar = {"shard": self.index, "n_docs": len(self._texts), "n_tokens": int(len(spans)), "files": files}
        write_atomic(self._paths["text.json"], json.dumps(sidecar, indent=1) + "\n")
        return sidecar


def completed_texts(directory: Path, index: int, n_docs: int, n_tokens: int) -> bool:
    """Whether shard `index`'s text files are complete for a token shard of `n_docs` documents and `n_tokens`
    tokens: the sidecar parses, agrees on the counts, and every file has the size it records."""
    paths = _files(Path(directory), index)
    try:
        sidecar = json.loads(paths["text.json"].read_text())
        if (sidecar.get("shard"), sidecar.get("n_docs"), sidecar.get("n_tokens")) != (index, n_docs, n_tokens):
            return False
        return all(paths[part].stat().st_size == sidecar["files"][paths[part].name]["bytes"]
                   for part in ("text.bin", "text_index.npy", "spans.bin"))
    except (OSError, ValueError, KeyError, TypeError):
        return False


class TextReader:
    """Documents' texts and spans, by (shard, document within it, first token of the document in the shard)."""

    def __init__(self, directory: Path, max_open: int = 64):
        self.directory = Path(directory)
        self._open: OrderedDict[int, tuple] = OrderedDict()
        self._max_open = max(1, max_open)

    def _shard(self, k: int):
        if k in self._open:
            self._open.move_to_end(k)
        else:
            if len(self._open) >= self._max_open:
                _, (text_fd, spans_fd, _) = self._open.popitem(last=False)
                os.close(text_fd)
                os.close(spans_fd)
            paths = _files(self.directory, k)
            self._open[k] = (os.open(paths["text.bin"], os.O_RDONLY), os.open(paths["spans.bin"], os.O_RDONLY),
                             np.load(paths["text_index.npy"], mmap_mode="r"))
        return self._open[k]

    def document(self, k: int, doc: int, first_token: int, n_tokens: int) -> tuple[str, np.ndarray]:
        """(text, spans int64 [n_tokens, 2]) of document `doc` of shard `k`, its first `n_tokens` tokens' spans."""
        text_fd, spans_fd, index = self._shard(k)
        start, stop = (int(x) for x in index[doc:doc + 2])
        text = os.pread(text_fd, stop - start, start)
        spans = np.empty((n_tokens, 2), dtype=_SPAN_DTYPE)
        if spans.nbytes and os.preadv(spans_fd, [spans], first_token * 2 * _SPAN_DTYPE.itemsize) != spans.nbytes:
            raise ValueError(f"{self.directory}: shard {k}'s spans are shorter than its sidecar says")
        return text.decode(), spans.astype(np.int64)

    def close(self) -> None:
        while self._open:
            text_fd, spans_fd, _ = self._open.popitem()[1]
            os.close(text_fd)
            os.close(spans_fd)
