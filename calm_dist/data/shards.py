"""Token shards: the prepared tokens of one split on disk, and the fixed-length rows training reads from them.

One shard is four files in the split's directory (`shard_name(i)` is their stem):

    shard-00000.tokens.bin      every document's token ids back to back, little-endian uint16 (vocabulary
                                <= 65,536) or uint32; nothing else is stored per token
    shard-00000.index.npy       int64 [n_docs + 1]: each document's first token offset in tokens.bin, then n_tokens
    shard-00000.loss_start.npy  int32 [n_docs]: the position within its document of the first labelled token
                                (the prompt's length for prompt/completion, 0 for text)
    shard-00000.json            the sidecar, written last: counts, dtype, and each file's size and sha256

`ShardWriter` streams the files to aside names, so its memory does not grow with the shard, and renames them
into place before it writes the sidecar: a shard with a sidecar whose sizes match (`completed_shard`) is
complete, which is what a resumed prepare skips.

`TokenRows` memory-maps the offsets, reads the tokens of the rows it is asked for with pread and builds only
those rows, so a rank's resident memory does not depend on the corpus size. Its rows:
  - unpacked: document i truncated to seq_len and right-padded with pad_id;
  - packed: the documents back to back, cut into rows of seq_len that overlap by one token (row r starts at
    r * (seq_len - 1)): the last token of a row is the first of the next, where it is context only, so every
    token of a document split across rows is predicted once (a row's first token never is: nothing precedes
    it). A row may span documents and shards; the remainder is dropped. `position_ids` restart at 0 at each
    document's first token and at the row's first: the models keep the documents apart by them
    (calm_dist.model.composition.backbone_inputs).
Labels are the ids from each document's loss_start on, IGNORE before it and on padding, and IGNORE on a
document's first token (in a packed row it follows another document); attention_mask is 1 on real tokens.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from calm_dist.files import fsync_dir, sha256_file, write_atomic
from calm_dist.model.shapes import IGNORE

if TYPE_CHECKING:
    import torch

TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_INDEX_DTYPE, _LOSS_START_DTYPE = np.dtype("<i8"), np.dtype("<i4")
_FLUSH_DOCS = 1 << 16  # documents whose offsets are buffered before they are written
PACKED_LAYOUT = "overlap-1/doc-positions"  # packed rows: one token of overlap, positions per document


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest stored token type that holds every id below `vocab_size`: uint16 or uint32, little-endian."""
    if not 0 < vocab_size <= 1 << 32:
        raise ValueError(f"vocab_size {vocab_size} does not fit a uint32 token id")
    return TOKEN_DTYPES["uint16" if vocab_size <= 1 << 16 else "uint32"]


def _stored_dtype(dtype) -> np.dtype:
    name = np.dtype(dtype).name
    if name not in TOKEN_DTYPES:
        raise ValueError(f"token shards store uint16 or uint32 ids, not {name}")
    return TOKEN_DTYPES[name]


def shard_name(index: int) -> str:
    """The stem of shard `index`'s files: shard-00000."""
    return f"shard-{index:05d}"


def _files(directory: Path, index: int) -> dict[str, Path]:
    stem = shard_name(index)
    return {part: directory / f"{stem}.{part}" for part in ("tokens.bin", "index.npy", "loss_start.npy", "json")}


def _npy_header(dtype: np.dtype, length: int) -> bytes:
    """A .npy header for a 1-D array. numpy pads the shape so the header's size does not depend on `length`:
    a header written before the data is rewritten in place once the length is known."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(dtype),
                                               "fortran_order": False, "shape": (length,)})
    return buf.getvalue()


class ShardWriter:
    """Writes one shard: `add` each document, then `close` (or use it as a context manager, which closes on
    success and aborts on an exception). The files are written under aside names (.shard-00000.*.partial) and
    renamed on close, the sidecar last; a stale sidecar of the same shard is removed first, so an interrupted
    rewrite never leaves a sidecar beside other files. One writer per shard at a time: the aside names are fixed,
    so a crashed attempt's leftovers are overwritten by the next one instead of piling up."""

    def __init__(self, directory: Path, index: int, dtype, *, fsync: bool = True):
        self.directory, self.index, self.dtype, self.fsync = Path(directory), index, _stored_dtype(dtype), fsync
        self.directory.mkdir(parents=True, exist_ok=True)
        self._final = _files(self.directory, index)
        self._final["json"].unlink(missing_ok=True)
        self._aside = {part: p.with_name(f".{p.name}.partial") for part, p in self._final.items() if part != "json"}
        self._tokens = open(self._aside["tokens.bin"], "wb", buffering=1 << 20)
        self._index = open(self._aside["index.npy"], "wb", buffering=1 << 20)
        self._loss_start = open(self._aside["loss_start.npy"], "wb", buffering=1 << 20)
        self._index.write(_npy_header(_INDEX_DTYPE, 0))
        self._loss_start.write(_npy_header(_LOSS_START_DTYPE, 0))
        self._offsets, self._starts = [0], []  # buffered, written every _FLUSH_DOCS documents
        self.n_docs = self.n_tokens = self.n_labelled = 0
        self._closed = False

    def add(self, ids: Sequence[int], loss_start: int) -> None:
        """Append one document: its token ids, and the position of its first labelled token (0..len(ids))."""
        if self._closed:
            raise ValueError(f"shard {self.index} is already closed")
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"a document's ids must be one sequence, got shape {arr.shape}")
        if arr.size and arr.dtype != self.dtype:
            if arr.dtype.kind not in "iu":
                raise ValueError(f"token ids must be integers, got {arr.dtype}")
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi > np.iinfo(self.dtype).max:
                raise ValueError(f"token id {lo if lo < 0 else hi} does not fit the shard's {self.dtype.name}")
        n = int(arr.size)
        if not 0 <= loss_start <= n:
            raise ValueError(f"loss_start {loss_start} is outside the document's {n} tokens")
        self._tokens.write(arr.astype(self.dtype, copy=False).tobytes())
        self.n_docs += 1
        self.n_tokens += n
        self.n_labelled += n - int(loss_start)
        self._offsets.append(self.n_tokens)
        self._starts.append(int(loss_start))
        if len(self._starts) >= _FLUSH_DOCS:
            self._flush()

    def _flush(self) -> None:
        self._index.write(np.asarray(self._offsets, dtype=_INDEX_DTYPE).tobytes())
        self._loss_start.write(np.asarray(self._starts, dtype=_LOSS_START_DTYPE).tobytes())
        self._offsets, self._starts = [], []

    def close(self) -> dict:
        """Finish the files, rename them into place, write the sidecar last; returns the sidecar."""
        if self._closed:
            raise ValueError(f"shard {self.index} is already closed")
        self._flush()
        for fh, dtype, length in ((self._index, _INDEX_DTYPE, self.n_docs + 1),
                                  (self._loss_start, _LOSS_START_DTYPE, self.n_docs)):
            header = _npy_header(dtype, length)
            if len(header) != len(_npy_header(dtype, 0)):  # numpy's padding keeps it fixed; never rewrite data
                raise RuntimeError(f"the .npy header of {length} entries changed size")
            fh.seek(0)
            fh.write(header)
        for fh in (self._tokens, self._index, self._loss_start):
            fh.flush()
            if self.fsync:
                os.fsync(fh.fileno())
            fh.close()
        self._closed = True
        files = {}
        for part, aside in self._aside.items():
            files[self._final[part].name] = {"bytes": aside.stat().st_size, "sha256": sha256_file(aside)}
            os.replace(aside, self._final[part])
        if self.fsync:  # the data files' names are durable before the sidecar that vouches for them
            fsync_dir(self.directory)
        sidecar = {"shard": self.index, "n_docs": self.n_docs, "n_tokens": self.n_tokens,
                   "n_labelled": self.n_labelled, "dtype": self.dtype.name, "files": files}
        write_atomic(self._final["json"], json.dumps(sidecar, indent=1) + "\n", fsync=self.fsync,
                     aside=f".{self._final['json'].name}.partial")
        if self.fsync:
            fsync_dir(self.directory)
        return sidecar

    def abort(self) -> None:
        """Close and remove the aside files; the shard stays absent (its sidecar was removed at the start)."""
        for fh in (self._tokens, self._index, self._loss_start):
            fh.close()
        self._closed = True
        for aside in self._aside.values():
            aside.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if not self._closed:
                self.abort()
        elif not self._closed:
            self.close()


def _expected_bytes(sidecar: dict) -> dict[str, int]:
    """Each file's size as the sidecar's counts imply it."""
    stem = shard_name(sidecar["shard"])
    return {f"{stem}.tokens.bin": sidecar["n_tokens"] * TOKEN_DTYPES[sidecar["dtype"]].itemsize,
            f"{stem}.index.npy": len(_npy_header(_INDEX_DTYPE, 0)) + _INDEX_DTYPE.itemsize * (sidecar["n_docs"] + 1),
            f"{stem}.loss_start.npy": len(_npy_header(_LOSS_START_DTYPE, 0)) + _LOSS_START_DTYPE.itemsize
            * sidecar["n_docs"]}


def completed_shard(directory: Path, index: int, *, verify: bool = False) -> dict | None:
    """The sidecar of shard `index` if the shard is complete: the sidecar parses, names this shard, and every
    file has the size the sidecar records and its counts imply. Otherwise None: the shard is to be written
    (again). `verify` also compares each file's sha256 with the sidecar's (reads every byte)."""
    paths = _files(Path(directory), index)
    try:
        sidecar = json.loads(paths["json"].read_text())
        if sidecar.get("shard") != index or sidecar.get("dtype") not in TOKEN_DTYPES:
            return None
        expected = _expected_bytes(sidecar)
        if set(sidecar["files"]) != set(expected):
            return None
        for name, size in expected.items():
            path = Path(directory) / name
            if sidecar["files"][name]["bytes"] != size or path.stat().st_size != size:
                return None
            if verify and sha256_file(path) != sidecar["files"][name]["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return sidecar


class _OpenShard:
    """One shard as TokenRows reads it: its tokens through an open file, its offsets memory-mapped."""

    def __init__(self, directory: Path, sidecar: dict):
        paths = _files(directory, sidecar["shard"])
        self.dtype, n_tokens, n_docs = TOKEN_DTYPES[sidecar["dtype"]], sidecar["n_tokens"], sidecar["n_docs"]
        self.path = paths["tokens.bin"]
        size = self.path.stat().st_size
        if size != n_tokens * self.dtype.itemsize:
            raise ValueError(f"{self.path}: {size} bytes, its sidecar says {n_tokens} {self.dtype.name} ids")
        self.index = np.load(paths["index.npy"], mmap_mode="r")
        self.loss_start = np.load(paths["loss_start.npy"], mmap_mode="r")
        if self.index.shape != (n_docs + 1,) or self.loss_start.shape != (n_docs,):
            raise ValueError(f"{paths['index.npy']}: {self.index.shape[0]} offsets and {self.loss_start.shape[0]} "
                             f"loss starts, its sidecar says {n_docs} documents")
        self.fd = os.open(self.path, os.O_RDONLY)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop), read with pread: a mapping of tokens.bin would leave every page a rank ever read
        in its resident memory (the kernel maps whole folios, up to ~1 MB, around each page read), which over a
        run grows to the corpus; pread leaves them in the page cache only."""
        out = np.empty(stop - start, dtype=self.dtype)
        if out.nbytes and os.preadv(self.fd, [out], start * self.dtype.itemsize) != out.nbytes:
            raise ValueError(f"{self.path}: shorter than its sidecar says (truncated while in use?)")
        return out

    def close(self) -> None:
        os.close(self.fd)


class TokenRows:
    """Fixed-length training rows read from token shards; what TokenizedData was, without the RAM.

    `shards` are the sidecars in order (the manifest's list). Only the per-shard counts are held in memory; a
    shard is opened on first use (at most `max_open` at once, least recently used closed first: each holds three
    file descriptors), and a batch reads the offsets and tokens of its rows only."""

    def __init__(self, directory: Path, shards: list[dict], *, seq_len: int, packing: bool, pad_id: int,
                 fingerprint: str, max_open: int = 64):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.directory, self.shards = Path(directory), list(shards)
        self.seq_len, self.packing, self.pad_id = seq_len, packing, pad_id
        # what the rows are: the shards' fingerprint, and for packed rows how they are cut from the stream
        # (PACKED_LAYOUT), which the shards do not record; a states cache or checkpoint names this value
        self.fingerprint = (hashlib.sha256(f"{fingerprint}:{PACKED_LAYOUT}".encode()).hexdigest()[:16] if packing
                            else fingerprint)
        # cumulative counts: global document / stream position -> shard by searchsorted
        self._doc_starts = np.cumsum([0] + [s["n_docs"] for s in self.shards], dtype=np.int64)
        self._token_starts = np.cumsum([0] + [s["n_tokens"] for s in self.shards], dtype=np.int64)
        self._open: OrderedDict[int, _OpenShard] = OrderedDict()
        self._max_open = max(1, max_open)
        if packing and seq_len < 2:
            raise ValueError(f"packed rows overlap by one token: seq_len must be at least 2, got {seq_len}")
        n_tokens = int(self._token_starts[-1])
        self._len = (max(0, n_tokens - 1) // (seq_len - 1) if packing else int(self._doc_starts[-1]))

    def __len__(self) -> int:
        return self._len

    def _shard(self, k: int) -> _OpenShard:
        if k in self._open:
            self._open.move_to_end(k)
        else:
            if len(self._open) >= self._max_open:
                self._open.popitem(last=False)[1].close()
            self._open[k] = _OpenShard(self.directory, self.shards[k])
        return self._open[k]

    def close(self) -> None:
        """Close the open shards' files (reading again reopens them)."""
        while self._open:
            self._open.popitem()[1].close()
        if getattr(self, "_texts", None) is not None:
            self._texts.close()

    def _rows(self, indices, with_tokens: bool):
        """(input_ids int64 or None, labelled bool, attention_mask int64, position_ids int64 or None: packed rows
        only), each [len(indices), seq_len]."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self._len):
            bad = int(idx.min() if idx.min() < 0 else idx.max())
            raise IndexError(f"row {bad} is outside the {self._len} rows")
        L = self.seq_len
        ids = np.full((idx.size, L), self.pad_id, dtype=np.int64) if with_tokens else None
        labelled = np.zeros((idx.size, L), dtype=bool)
        if self.packing:
            mask = np.ones((idx.size, L), dtype=np.int64)
            positions = np.empty((idx.size, L), dtype=np.int64)
            for r, row in enumerate(idx.tolist()):
                self._packed_row(row, ids[r] if with_tokens else None, labelled[r], positions[r])
            return ids, labelled, mask, positions
        mask = np.zeros((idx.size, L), dtype=np.int64)
        shard_of = np.searchsorted(self._doc_starts, idx, side="right") - 1
        for r, (row, k) in enumerate(zip(idx.tolist(), shard_of.tolist())):
            shard = self._shard(k)
            doc = row - int(self._doc_starts[k])
            start, stop = (int(x) for x in shard.index[doc:doc + 2])
            n = min(stop - start, L)
            if with_tokens:
                ids[r, :n] = shard.tokens(start, start + n)
            mask[r, :n] = 1
            labelled[r, max(1, int(shard.loss_start[doc])):n] = True
        return ids, labelled, mask, None

    def _packed_row(self, row: int, ids: np.ndarray | None, labelled: np.ndarray, positions: np.ndarray) -> None:
        """Fill row `row` of the stream of all documents: stream positions [row*(L-1), row*(L-1) + L), across
        shards; `positions` gets each token's position in its document, counted from the row's start."""
        L = self.seq_len
        first_pos = pos = row * (L - 1)
        end = pos + L
        in_doc = np.empty(L, dtype=np.int64)
        while pos < end:
            k = int(np.searchsorted(self._token_starts, pos, side="right")) - 1  # skips shards without tokens
            shard = self._shard(k)
            base = int(self._token_starts[k])
            u, v = pos - base, min(end, int(self._token_starts[k + 1])) - base  # local range in shard k
            out = slice(pos - first_pos, pos - first_pos + (v - u))
            if ids is not None:
                ids[out] = shard.tokens(u, v)
            # the documents covering [u, v): their starts and loss starts (a few entries of the index)
            first = int(np.searchsorted(shard.index, np.int64(u), side="right")) - 1
            last = int(np.searchsorted(shard.index, np.int64(v - 1), side="right")) - 1
            starts = np.asarray(shard.index[first:last + 1])
            stream = np.arange(u, v, dtype=np.int64)
            doc = np.searchsorted(starts, stream, side="right") - 1
            in_doc[out] = stream - starts[doc]
            labelled[out] = (in_doc[out] >= np.asarray(shard.loss_start[first:last + 1])[doc]) & (in_doc[out] > 0)
            pos += v - u
        # positions restart at each document's first token and at the row's first
        column = np.arange(L, dtype=np.int64)
        restart = np.maximum.accumulate(np.where((in_doc == 0) | (column == 0), column, 0))
        positions[:] = column - restart

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """Rows `indices` (any order, repeats allowed): input_ids, labels, attention_mask, and for packed rows
        position_ids, int64 [B, seq_len]."""
        ids, labelled, mask, positions = self._rows(indices, with_tokens=True)
        labels = np.where(labelled, ids, IGNORE)
        import torch  # here: the tokenizing workers import this module and never make a tensor

        out = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
               "attention_mask": torch.from_numpy(mask)}
        if positions is not None:
            out["position_ids"] = torch.from_numpy(positions)
        return out

    def texts(self, indices) -> list[tuple[str, np.ndarray]]:
        """(text, spans int64 [n, 2]) of each row's document, its n tokens' character spans, for data prepared
        for models of different tokenizers (calm_dist/data/texts.py); unpacked rows only."""
        from calm_dist.data.texts import TextReader  # texts.py names its files after this module's shards

        if self.packing:
            raise ValueError("packed rows hold no single text: models of different tokenizers read unpacked rows")
        if getattr(self, "_texts", None) is None:
            self._texts = TextReader(self.directory)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        shard_of = np.searchsorted(self._doc_starts, idx, side="right") - 1
        out = []
        for row, k in zip(idx.tolist(), shard_of.tolist()):
            doc = row - int(self._doc_starts[k])
            start, stop = (int(x) for x in self._shard(k).index[doc:doc + 2])
            out.append(self._texts.document(k, doc, start, min(stop - start, self.seq_len)))
        return out

    def labelled_tokens(self, indices) -> int:
        """`lm_loss.labelled_tokens` of those rows' labels (positions 1.. with a label: each has a next-token
        target), without reading their tokens: the trainer's n_global."""
        return int(self._rows(indices, with_tokens=False)[1][:, 1:].sum())

    def any_labelled(self, chunk_rows: int = 4096) -> bool:
        """Whether any row has a labelled token (past its first position), read a chunk of rows at a time and
        stopping at the first: prepare's "no token carries a loss" check, without a [rows, seq_len] array."""
        return any(self.labelled_tokens(np.arange(start, min(start + chunk_rows, self._len)))
                   for start in range(0, self._len, chunk_rows))
