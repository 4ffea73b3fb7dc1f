"""The parts of a data source (calm_dist/data/sources.py): one file, one saved dataset or one hub split each,
read record by record in constant memory. Row numbers and errors: sources.py's docstring."""
from __future__ import annotations

import codecs
import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterator

from calm_dist.config import ConfigError
from calm_dist.files import sha256_file, write_atomic



KINDS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


SAVED = "saved dataset"
MEMO_FILE = "fingerprints.json"


SUPPORTED = ("use .jsonl, .json, .parquet or .arrow files, a directory or glob of them, a directory written by "
             "save_to_disk, or hf:org/name")


class RecordError(ConfigError):
    """A malformed record: the message names the source key, the part and the row (see the module docstring)."""

    @classmethod
    def at(cls, part: "Part", row: int, problem: str) -> "RecordError":
        return cls(f"{part.key}: {part.name} row {row}: {problem}")


def _one_line(e: BaseException) -> str:
    """A library's exception as one line: its type, then its message's lines joined."""
    text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


_JSON_TYPES = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), "number")


class HashMemo:
    """Content hashes of files keyed by absolute path, valid while the file's size, mtime and inode stay; kept in
    <directory>/fingerprints.json. With `hashing` off, a file not in it is not hashed (its hash is None)."""

    def __init__(self, directory: Path | None, hashing: bool = True):
        self.path = None if directory is None else Path(directory) / MEMO_FILE
        self.hashing, self.changed = hashing, False
        self.entries = self._read()

    def _read(self) -> dict:
        try:
            entries = json.loads(self.path.read_text()) if self.path is not None else {}
        except (OSError, ValueError):  # none yet, or damaged: hashing again costs time, never a wrong answer
            return {}
        return entries if isinstance(entries, dict) else {}

    def file_hash(self, path: Path) -> str | None:
        st = os.stat(path)
        stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
        key = os.path.abspath(path)
        entry = self.entries.get(key)
        if isinstance(entry, dict) and {k: entry.get(k) for k in stamp} == stamp and "sha256" in entry:
            return entry["sha256"]
        if not self.hashing:
            return None
        digest = sha256_file(path)
        self.entries[key] = {**stamp, "sha256": digest}
        self.changed = True
        return digest

    def save(self) -> None:
        """Write the new hashes, keeping what other writers added meanwhile and dropping files now gone."""
        if self.path is None or not self.changed:
            return
        merged = {**self._read(), **self.entries}
        merged = {k: v for k, v in sorted(merged.items()) if os.path.exists(k)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(merged, indent=1))


class Part:
    """One ordered piece of a source: one file, one saved dataset, one hub split."""

    kind = ""
    batch_rows = 1024  # records converted to Python at a time (Parquet, Arrow, datasets)

    def __init__(self, key: str, name: str):
        self.key, self.name = key, name
        self._num_rows: int | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def num_rows(self) -> int:
        """The number of records (computed once: a JSON file is read through); an empty part is refused."""
        if self._num_rows is None:
            n = self._count()
            if n == 0:
                raise ConfigError(f"{self.key}: {self.name} is empty: it holds no records")
            self._num_rows = n
        return self._num_rows

    def records(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, dict]]:
        """(row, record) of the records [start, stop) in order (0-based positions; `row` is 1-based, see the
        module docstring); a stop past the end ends with the last record."""
        if start < 0 or (stop is not None and stop < start):
            raise ValueError(f"records({start}, {stop}) of {self.name}: need 0 <= start <= stop")
        return self._records(start, stop)

    def fingerprint(self) -> str:
        """A hash of the part's content (not its name), 16 hex characters."""
        return self._fingerprint(HashMemo(None))

    def _count(self) -> int:
        raise NotImplementedError

    def _records(self, start: int, stop: int | None) -> Iterator[tuple[int, dict]]:
        raise NotImplementedError

    def _fingerprint(self, memo: "HashMemo") -> str | None:
        raise NotImplementedError


class FilePart(Part):
    """A part that is one file; its fingerprint is the hash of the file's bytes."""

    def __init__(self, key: str, name: str, path: Path):
        super().__init__(key, name)
        self.path = Path(path)

    def _fingerprint(self, memo: "HashMemo") -> str | None:
        digest = memo.file_hash(self.path)
        return None if digest is None else digest[:16]


class JsonlPart(FilePart):
    """One JSON object per line. Reading from record `start` seeks to the nearest mark at or below it: a mark
    (record position, byte offset, line number) is noted every `stride` records as the file is read."""

    kind = "jsonl"
    stride = 4096

    def __init__(self, key: str, name: str, path: Path):
        super().__init__(key, name, path)
        self._marks = [(0, 0, 1)]

    def _lines(self, start: int) -> Iterator[tuple[int, int, bytes]]:
        """(record position, line number, line) of the non-blank lines from about record `start` on."""
        index, offset, line_no = self._marks[min(start // self.stride, len(self._marks) - 1)]
        with open(self.path, "rb") as f:
            f.seek(offset)
            for line in f:
                if not line.isspace():
                    if index % self.stride == 0 and index // self.stride == len(self._marks):
                        self._marks.append((index, offset, line_no))
                    yield index, line_no, line
                    index += 1
                offset += len(line)
                line_no += 1

    def _count(self) -> int:
        n = self._marks[-1][0]
        for index, _, _ in self._lines(n):
            n = index + 1
        return n

    def _records(self, start: int, stop: int | None) -> Iterator[tuple[int, dict]]:
        for index, line_no, line in self._lines(start):
            if stop is not None and index >= stop:
                return
            if index >= start:
                yield line_no, self._parse(line, line_no)

    def _parse(self, line: bytes, row: int) -> dict:
        try:
            text = line.decode("utf-8-sig" if row == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise RecordError.at(self, row, f"invalid UTF-8 (byte {e.start + 1} of the line)") from None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            hint = " (a .json file holds a JSON list of objects or one object per line)" if self.kind == "json" else ""
            raise RecordError.at(self, row, f"invalid JSON ({e.msg} at column {e.colno}){hint}") from None
        if not isinstance(value, dict):
            raise RecordError.at(self, row, f"a JSON {_json_type(value)}, not an object")
        return value


class JsonPart(JsonlPart):
    """A .json file: a JSON list of objects (its first character is "["), else JSON lines like JsonlPart."""

    kind = "json"
    chunk_chars = 1 << 20

    def __init__(self, key: str, name: str, path: Path):
        super().__init__(key, name, path)
        self._is_list: bool | None = None

    def _list(self) -> bool:
        if self._is_list is None:
            with open(self.path, "rb") as f:
                self._is_list = _ListReader(f, self.chunk_chars).peek() == "["
        return self._is_list

    def _count(self) -> int:
        if not self._list():
            return super()._count()
        return sum(1 for _ in self._elements())

    def _records(self, start: int, stop: int | None) -> Iterator[tuple[int, dict]]:
        if not self._list():
            yield from super()._records(start, stop)
            return
        for index, value, raw in self._elements():
            if stop is not None and index >= stop:
                return
            if index >= start:
                if _BAD_UTF8.search(raw):
                    raise RecordError.at(self, index + 1, "invalid UTF-8")
                if not isinstance(value, dict):
                    raise RecordError.at(self, index + 1, f"a JSON {_json_type(value)}, not an object")
                yield index + 1, value

    def _elements(self) -> Iterator[tuple[int, object, str]]:
        """(position, value, its JSON text) of each element of the list, parsed a chunk at a time."""
        with open(self.path, "rb") as f:
            reader = _ListReader(f, self.chunk_chars)
            reader.expect("[", self, "invalid JSON (the file does not start with a list)")
            if reader.peek() == "]":
                reader.pos += 1
            else:
                index = 0
                while True:
                    value, raw = reader.value(self, index + 1)
                    yield index, value, raw
                    index += 1
                    c = reader.peek()
                    if c == "]":
                        reader.pos += 1
                        break
                    if c != ",":
                        what = "the list ends without ']'" if c == "" else f"{c!r} where ',' or ']' belongs"
                        raise RecordError.at(self, index, f"invalid JSON ({what} after this record)")
                    reader.pos += 1
            if reader.peek() != "":
                raise ConfigError(f"{self.key}: {self.name}: invalid JSON (data after the list's closing ']')")


_WHITESPACE = re.compile(r"[ \t\n\r]*")


class _ListReader:
    """JSON text read a chunk at a time: a value is parsed once the text holding it is in the buffer, and the
    buffer keeps only the text from the current value on."""

    max_chars = 64 << 20  # a value this long that still does not parse is invalid, not unfinished

    def __init__(self, f, chunk_chars: int):
        self.f, self.chunk_chars = f, chunk_chars
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")("surrogateescape")
        self.buf, self.pos, self.eof = "", 0, False

    def _fill(self) -> bool:
        """Read on; False at the end of the file."""
        if self.eof:
            return False
        data = self.f.read(self.chunk_chars)
        self.eof = not data
        self.buf = self.buf[self.pos:] + self.decoder.decode(data, final=self.eof)
        self.pos = 0
        return True

    def peek(self) -> str:
        """The next character that is not whitespace ("" at the end of the file)."""
        while True:
            self.pos = _WHITESPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or not self._fill():
                return self.buf[self.pos:self.pos + 1]

    def expect(self, char: str, part: Part, problem: str) -> None:
        if self.peek() != char:
            raise ConfigError(f"{part.key}: {part.name}: {problem}")
        self.pos += 1

    def value(self, part: Part, row: int) -> tuple[object, str]:
        self.peek()
        decoder = json.JSONDecoder()
        while True:
            try:
                value, end = decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                unfinished = e.pos >= len(self.buf) - 8 or e.msg.startswith("Unterminated string")
                if unfinished and len(self.buf) - self.pos < self.max_chars and self._fill():
                    continue
                if _BAD_UTF8.search(self.buf, self.pos, e.pos + 1):
                    raise RecordError.at(part, row, "invalid UTF-8") from None
                raise RecordError.at(part, row, f"invalid JSON ({e.msg})") from None
            if end == len(self.buf) and self._fill():  # a number may go on in the next chunk
                continue
            raw, self.pos = self.buf[self.pos:end], end
            return value, raw


_BAD_UTF8 = re.compile("[\udc80-\udcff]")  # undecodable bytes, as the "surrogateescape" handler keeps them


class ParquetPart(FilePart):
    """A Parquet file: row groups before `start` cost no reading beyond the footer, and a row group is decoded
    page by page (buffered reads, no pre-buffering), so memory holds a batch, not a whole row group."""

    kind = "parquet"

    def _file(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(self.path, buffer_size=1 << 20, pre_buffer=False)
        except (pa.ArrowException, OSError) as e:
            raise ConfigError(f"{self.key}: {self.name}: cannot read it as Parquet: {_one_line(e)}") from None

    def _count(self) -> int:
        return self._file().metadata.num_rows

    def _records(self, start: int, stop: int | None) -> Iterator[tuple[int, dict]]:
        import pyarrow as pa

        pf = self._file()
        meta = pf.metadata
        stop = meta.num_rows if stop is None else min(stop, meta.num_rows)
        groups, first, row = [], None, 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if row + n > start and row < stop:
                groups.append(g)
                first = row if first is None else first
            row += n
        if not groups:
            return
        row = first
        try:
            for batch in pf.iter_batches(batch_size=self.batch_rows, row_groups=groups):
                yield from _batch_rows(self, batch, row, start, stop)
                row += batch.num_rows
                if row >= stop:
                    return
        except (pa.ArrowException, OSError) as e:
            raise ConfigError(f"{self.key}: {self.name}: cannot read it as Parquet (from row {row + 1} on): "
                              f"{_one_line(e)}") from None


def _batch_rows(part: Part, batch, row: int, start: int, stop: int) -> Iterator[tuple[int, dict]]:
    """(1-based row, record) of the rows of `batch` (whose first row is at position `row`) in [start, stop),
    checked first: neither reader checks UTF-8, and a memory-mapped Arrow file is not checked at all."""
    import pyarrow as pa

    lo, hi = max(start - row, 0), min(stop - row, batch.num_rows)
    if lo >= hi:
        return
    chunk = batch.slice(lo, hi - lo)
    try:
        chunk.validate(full=True)
    except pa.ArrowInvalid as e:
        problem = "invalid UTF-8" if "utf8" in str(e).lower() else f"invalid data ({_one_line(e)})"
        for i in range(chunk.num_rows):
            try:
                chunk.slice(i, 1).validate(full=True)
            except pa.ArrowInvalid:
                raise RecordError.at(part, row + lo + i + 1, problem) from None
        raise ConfigError(f"{part.key}: {part.name} rows {row + lo + 1}-{row + hi}: {problem}") from None
    for i, record in enumerate(chunk.to_pylist()):
        yield row + lo + i + 1, record


class ArrowPart(FilePart):
    """An Arrow IPC file or stream (`datasets` writes streams), memory-mapped: batches before `start` are passed
    over without reading their data."""

    kind = "arrow"

    def _batches(self, source):
        import pyarrow as pa

        try:
            reader = pa.ipc.open_file(source)
            return (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:  # not the file format: the stream format, or no Arrow at all
            source.seek(0)
            return iter(pa.ipc.open_stream(source))

    def _count(self) -> int:
        import pyarrow as pa

        with pa.memory_map(str(self.path)) as source:
            try:
                return sum(batch.num_rows for batch in self._batches(source))
            except (pa.ArrowException, OSError) as e:
                raise ConfigError(f"{self.key}: {self.name}: cannot read it as Arrow IPC: {_one_line(e)}") from None

    def _records(self, start: int, stop: int | None) -> Iterator[tuple[int, dict]]:
        import pyarrow as pa

        stop = float("inf") if stop is None else stop
        with pa.memory_map(str(self.path)) as source:
            row = 0
            try:
                for batch in self._batches(source):
                    if row >= stop:
                        return
                    if row + batch.num_rows > start:
                        for lo in range(0, batch.num_rows, self.batch_rows):
                            yield from _batch_rows(self, batch.slice(lo, self.batch_rows), row + lo, start, stop)
                    row += batch.num_rows
            except (pa.ArrowException, OSError) as e:
                raise ConfigError(f"{self.key}: {self.name}: cannot read it as Arrow IPC: {_one_line(e)}") from None


class DatasetPart(Part):
    """A `datasets.Dataset` (memory-mapped Arrow), read `batch_rows` records at a time as plain Python values
    (Arrow's, without the features' decoding: an image column stays bytes, never decoded for a text record)."""

    def _dataset(self):
        raise NotImplementedError

    def __getstate__(self):  # a pickled part (to a worker process) reopens its dataset there
        return {**self.__dict__, "_ds": None}

    def _count(self) -> int:
        return self._dataset().num_rows

    def _records(self, start: int, stop: int | None) -> Iterator[tuple[int, dict]]:
        ds = self._dataset()
        stop = ds.num_rows if stop is None else min(stop, ds.num_rows)
        if start >= stop:
            return
        row = start
        for table in ds.select(range(start, stop)).with_format("arrow").iter(batch_size=self.batch_rows):
            yield from _batch_rows(self, table, row, start, stop)
            row += table.num_rows


class SavedDatasetPart(DatasetPart):
    """A directory `Dataset.save_to_disk` wrote; its fingerprint hashes every file under it."""

    kind = SAVED

    def __init__(self, key: str, name: str, path: Path):
        super().__init__(key, name)
        self.path, self._ds = Path(path), None

    def _dataset(self):
        if self._ds is None:
            import datasets

            try:
                self._ds = datasets.load_from_disk(str(self.path))
            except Exception as e:  # a damaged saved dataset: name the directory, not a datasets traceback
                if self._no_shards():  # datasets cannot load the 0 shards it saves for an empty dataset
                    raise ConfigError(f"{self.key}: {self.name} is empty: it holds no records") from None
                raise ConfigError(f"{self.key}: {self.name}: cannot read it as a saved dataset: "
                                  f"{_one_line(e)}") from None
        return self._ds

    def _no_shards(self) -> bool:
        try:
            return json.loads((self.path / "state.json").read_text()).get("_data_files") == []
        except (OSError, ValueError, AttributeError):
            return False

    def _fingerprint(self, memo: "HashMemo") -> str | None:
        files = sorted(p for p in self.path.rglob("*") if p.is_file())
        hashes = [(f.relative_to(self.path).as_posix(), memo.file_hash(f)) for f in files]
        if any(h is None for _, h in hashes):
            return None
        return hashlib.sha256(json.dumps(hashes).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=8)
def _load_hub(name: str, config: str | None, split: str, revision: str | None):
    """One load per process: every rank, and each poll of a waiting rank, fingerprints the source."""
    import datasets

    return datasets.load_dataset(name, config, split=split, revision=revision)


class HubPart(DatasetPart):
    """One split of a Hugging Face dataset, loaded by `datasets.load_dataset` through its cache. Its fingerprint
    hashes the name, config, split and revision with the names and sizes of the cache's Arrow files, whose
    directory is named by the dataset's commit (for a hub dataset) or the data files' hash (for a local one)."""

    kind = "hf"

    def __init__(self, key: str, dataset: str, split: str = "train", config: str | None = None,
                 revision: str | None = None):
        details = ", ".join(f"{k} {v}" for k, v in (("config", config), ("split", split), ("revision", revision)) if v)
        super().__init__(key, f"hf:{dataset} ({details})")
        self.dataset, self.split, self.config, self.revision = dataset, split, config, revision
        self._ds = None

    def _dataset(self):
        if self._ds is None:
            import datasets

            try:
                ds = _load_hub(self.dataset, self.config, self.split, self.revision)
            except ConnectionError as e:
                if datasets.config.HF_HUB_OFFLINE:
                    raise ConfigError(f"{self.key}: hf:{self.dataset} is not in the Hugging Face cache "
                                      f"({datasets.config.HF_DATASETS_CACHE}) and the hub is offline "
                                      "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): load it once with network access, "
                                      "or name a cached dataset") from None
                raise ConfigError(f"{self.key}: {self.name}: cannot load it: {_one_line(e)}") from None
            except Exception as e:  # unknown name, config or split; a damaged cache: one line, not a traceback
                raise ConfigError(f"{self.key}: {self.name}: cannot load it: {_one_line(e)}") from None
            cached = {Path(f["filename"]).parent.name for f in ds.cache_files}
            pinned = self.revision and re.fullmatch(r"[0-9a-f]{40}", self.revision)
            if pinned and datasets.config.HF_HUB_OFFLINE and cached and cached != {self.revision}:
                raise ConfigError(f"{self.key}: {self.name}: the Hugging Face cache holds revision "
                                  f"{', '.join(sorted(cached))}, not {self.revision}, and the hub is offline")
            self._ds = ds
        return self._ds

    def _fingerprint(self, memo: "HashMemo") -> str | None:
        files = [Path(f["filename"]) for f in self._dataset().cache_files]
        identity = [self.dataset, self.config, self.split, self.revision,
                    [(f.parent.name, f.name, f.stat().st_size) for f in files]]
        return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


PART_CLASSES = {"jsonl": JsonlPart, "json": JsonPart, "parquet": ParquetPart, "arrow": ArrowPart}
