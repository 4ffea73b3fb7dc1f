"""Data sources: the records of data.train / data.eval, read in order and in constant memory.

A source is one string:
- a file: .jsonl (one JSON object per line), .json (a JSON list of objects, or one object per line), .parquet,
  .arrow (an Arrow IPC stream or file, as `datasets` writes them);
- a directory `Dataset.save_to_disk` wrote (it holds state.json);
- a directory of data files of one kind, read in name order. Names starting with "." or "_" are skipped (Spark's
  _SUCCESS and .crc files); subdirectories are refused rather than skipped: a glob names their files;
- a glob (`data/*.jsonl`, `data/**/*.parquet`): its matches in sorted order, files of one kind (or directories
  save_to_disk wrote; other directories that `**` matches are passed over);
- `hf:NAME?split=S&config=C&revision=R` (query optional, split "train" by default): `datasets.load_dataset(NAME,
  C, split=S, revision=R)` through the Hugging Face cache. Offline (HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1) only
  a cached name loads, and a revision given as a commit hash must be the cached one.

`open_source` splits a source into `Part`s, one per file, saved dataset or hub split, and checks only what a stat
shows (every rank calls it at start-up); a part's contents are read by `num_rows` and `records`, streamed: JSON
line by line (a JSON list a chunk at a time), Parquet by row group, Arrow files and `datasets` through memory maps.
The record is the raw object; its fields are checked by the tokenizing code.

Row numbers: `records(start, stop)` takes 0-based record positions and yields `(row, record)`, where `row` is the
1-based number a message prints as "row N". In a JSONL file (or a .json file of JSON lines) it is the line number:
blank lines are skipped but counted, so an editor's go-to-line finds the record. In a JSON list it is the
element's position, in Parquet, Arrow and `datasets` the row's position.

`source_fingerprint` hashes the parts' bytes, memoised per file by (path, size, mtime, inode) in
<memo_dir>/fingerprints.json: a start-up with nothing changed costs one stat per file.
"""
from __future__ import annotations

import glob
import hashlib
import json
import urllib.parse
from collections import Counter
from pathlib import Path

from calm_dist.config import ConfigError
from calm_dist.data.parts import KINDS, PART_CLASSES, SAVED, SUPPORTED, HashMemo, HubPart, Part, SavedDatasetPart





HUB_QUERY = ("split", "config", "revision")


def _kind(path: Path) -> str | None:
    if path.is_dir():
        return SAVED if (path / "state.json").is_file() else None
    return KINDS.get(path.suffix.lower())


def _part(path: Path, key: str) -> Part:
    kind = _kind(path)
    if kind == SAVED:
        return SavedDatasetPart(key, str(path), path)
    if kind is None:
        raise ConfigError(f"{key}: {path}: unsupported data file ({SUPPORTED})")
    if path.stat().st_size == 0:
        raise ConfigError(f"{key}: {path} is empty: it holds no records")
    return PART_CLASSES[kind](key, str(path), path)


def _one_kind(paths: list[Path], key: str, where: str) -> None:
    """Every path of a directory or glob is of one supported kind."""
    kinds = Counter(_kind(p) or (p.suffix.lower() or "no suffix") for p in paths)
    if len(kinds) > 1:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        raise ConfigError(f"{key}: {where} mixes kinds of files ({counts}): one source holds one kind")
    (kind,) = kinds
    if kind not in KINDS.values() and kind != SAVED:
        raise ConfigError(f"{key}: {where} holds {kind} files, which are not data files ({SUPPORTED})")


def _directory_parts(path: Path, key: str) -> list[Part]:
    if (path / "state.json").is_file():
        return [SavedDatasetPart(key, str(path), path)]
    if (path / "dataset_dict.json").is_file():
        raise ConfigError(f"{key}: {path} is a DatasetDict written by save_to_disk: name one split's directory")
    entries = sorted(p for p in path.iterdir() if not p.name.startswith((".", "_")))
    subdirectories = [p.name for p in entries if p.is_dir()]
    if subdirectories:
        raise ConfigError(f"{key}: {path} holds subdirectories ({', '.join(subdirectories[:3])}"
                          f"{', ...' if len(subdirectories) > 3 else ''}): name its files with a glob, "
                          f"e.g. {path}/**/*.parquet")
    if not entries:
        raise ConfigError(f"{key}: {path} is a directory without data files or a saved dataset ({SUPPORTED})")
    _one_kind(entries, key, str(path))
    return [_part(p, key) for p in entries]


def _glob_parts(pattern: str, key: str) -> list[Part]:
    matches = [Path(m) for m in sorted(glob.glob(pattern, recursive=True))]
    paths = [p for p in matches if p.is_file() or _kind(p) == SAVED]
    if not paths:
        raise ConfigError(f"{key}: the glob {pattern} matches " + ("only directories" if matches else "nothing"))
    _one_kind(paths, key, f"the glob {pattern}")
    return [_part(p, key) for p in paths]


def _hub_part(spec: str, key: str) -> HubPart:
    name, _, query = spec[len("hf:"):].partition("?")
    if not name:
        raise ConfigError(f"{key}: {spec}: name a dataset, e.g. hf:org/name?split=train")
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        pairs = [("", "")]
    fields = dict(pairs)
    if len(fields) != len(pairs) or set(fields) - set(HUB_QUERY) or not all(fields.values()):
        raise ConfigError(f"{key}: {spec}: the query takes each of {', '.join(HUB_QUERY)} at most once, with a "
                          "value (hf:org/name?split=train&config=NAME&revision=REV)")
    part = HubPart(key, name, split=fields.get("split", "train"), config=fields.get("config"),
                   revision=fields.get("revision"))
    part._dataset()  # an unknown or (offline) uncached dataset is refused here, when the source is opened
    return part


def open_source(spec: str, key: str) -> list[Part]:
    """The parts of a source, in order (see the module docstring); `key` ("data.train") starts every message.
    Files are only stat-ed here; a hub dataset is loaded (downloaded into the cache on its first use)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"{key} is not set")
    if spec.startswith("hf:"):
        return [_hub_part(spec, key)]
    path = Path(spec)
    if path.is_dir():
        return _directory_parts(path, key)
    if path.is_file():
        return [_part(path, key)]
    if path.exists():
        raise ConfigError(f"{key}: {spec} is neither a file nor a directory")
    if any(c in spec for c in "*?["):
        return _glob_parts(spec, key)
    raise ConfigError(f"{key}: {spec} does not exist")


def source_fingerprint(spec: str, key: str, memo_dir: Path | None = None, hashing: bool = True) -> str | None:
    """A hash of the parts' contents in order, 16 hex characters. File hashes are memoised in `memo_dir`: a call
    with nothing changed costs one stat per file. With `hashing` off, a file whose hash is not memoised yet makes
    the answer None instead of being read (ranks that wait for rank 0 to fingerprint and prepare)."""
    memo = HashMemo(memo_dir, hashing)
    prints = []
    for part in open_source(spec, key):
        fp = part._fingerprint(memo)
        if fp is None:
            return None
        prints.append(fp)
    memo.save()
    return hashlib.sha256(json.dumps(prints).encode()).hexdigest()[:16]
