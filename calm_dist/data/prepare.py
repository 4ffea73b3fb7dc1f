"""`calm-dist prepare`: a data set tokenized once, by N worker processes, into memory-mapped token shards.

`<data cache>/tokens-<fingerprint>/` holds the shards (calm_dist/data/shards.py) and `manifest.json`, written
last: a directory without a manifest is a prepare in progress or interrupted, and the next one resumes it,
skipping the shards already complete. Shard i always holds the same rows (ROWS_PER_SHARD records of one input
part, in order), and its bytes are a pure function of those rows, the tokenizer and the settings, so a resumed
prepare writes what an uninterrupted one would, with any number of workers.

The fingerprint hashes the sources' bytes (memoised by path, size and mtime: a start-up costs one stat per file),
the tokenizer's files and the settings that change the rows; it names the directory, and a resume compares it.

Training and `calm-dist cache` call `load_rows`: when the shards are missing, rank 0 prepares them while the
other ranks wait for its heartbeat, outside any collective timeout (calm_dist/rank_zero.py); then every rank
memory-maps them and reads only the rows of its micro-batches.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import multiprocessing
import os
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from functools import lru_cache
from pathlib import Path

import numpy as np

from calm_dist.config import ConfigError, DataConfig
from calm_dist.data.mixture import MixedRows
from calm_dist.data.shards import ShardWriter, TokenRows, completed_shard, token_dtype
from calm_dist.data.sources import open_source, source_fingerprint
from calm_dist.data.text_records import record_field, tokenize_with_spans
from calm_dist.data.texts import TextWriter, completed_texts
from calm_dist.data.tokenizer import BackendTokenizer, Tokenizer
from calm_dist.files import write_atomic
from calm_dist.rank_zero import run_on_rank_zero

MANIFEST = "manifest.json"
BACKEND_FILE = "tokenizer.backend.json"  # the fast tokenizer the workers load (_worker_backend)
FORMAT_VERSION = 1
ROWS_PER_SHARD = 2048  # records per shard: enough shards for the workers to share a corpus of a few thousand rows
ENCODE_BATCH = 256     # records per call into the tokenizer library
SETTINGS = ("format", "prompt_field", "completion_field", "text_field", "seq_len", "packing", "overlong")


def settings_of(data_cfg: DataConfig) -> dict:
    """The data settings that change the prepared tokens or the rows read from them (the different-tokenizer
    ones only when on: the same-tokenizer data keeps its fingerprint)."""
    settings = {k: getattr(data_cfg, k) for k in SETTINGS}
    if data_cfg.different_tokenizers:
        settings.update(different_tokenizers=True, augmenting_seq_len=data_cfg.augmenting_len)
    return settings


def fingerprint(data_cfg: DataConfig, spec: str, key: str, tokenizer: Tokenizer, memo_dir: Path,
                hashing: bool = True, augmenting: list[Tokenizer] = ()) -> str | None:
    """What the prepared tokens depend on, hashed; None when `hashing` is off and a source file's hash is not
    memoised yet (rank 0 has not fingerprinted it). `augmenting`: the augmenting models' tokenizers when they read
    the text themselves (data.different_tokenizers), whose lengths fit the rows."""
    source = source_fingerprint(spec, key, memo_dir=memo_dir, hashing=hashing)
    if source is None:
        return None
    prints = [source, tokenizer.fingerprint(), settings_of(data_cfg)]
    if augmenting:
        prints.append([t.fingerprint() for t in augmenting])
    text = json.dumps(prints, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepared_dir(cache_dir: Path, fp: str) -> Path:
    return Path(cache_dir) / f"tokens-{fp}"


def read_manifest(directory: Path) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format version {manifest.get('format_version')}, expected {FORMAT_VERSION}")
        return manifest
    except (ValueError, OSError) as e:
        raise ConfigError(f"{path}: a damaged manifest ({e}); delete {directory} to prepare the data again") from None


# ---- tokenizing records -------------------------------------------------------------------------------------
def tokenize_records(batch: list[tuple[str, dict]], data_cfg: DataConfig, tok: Tokenizer):
    """(token ids, position of the first labelled token) of each (where, record): prompt/completion records are
    bos + prompt, then completion + eos with the loss on the completion only; text records are bos + text + eos
    with the loss on every token. Over-long records are refused here when data.overlong=error."""
    bos = [tok.bos_id] if tok.bos_id is not None else []
    eos = [tok.eos_id] if tok.eos_id is not None else []
    if data_cfg.format == "prompt_completion":
        prompts, completions = [], []
        for where, record in batch:
            prompts.append(record_field(record, data_cfg.prompt_field, where))
            completions.append(record_field(record, data_cfg.completion_field, where))
            if not completions[-1]:
                raise ConfigError(f"{where}: field {data_cfg.completion_field!r} is empty (nothing to learn)")
        out = [(bos + p + c + eos, len(bos) + len(p))
               for p, c in zip(tok.encode_batch(prompts), tok.encode_batch(completions))]
    else:
        texts = [record_field(record, data_cfg.text_field, where) for where, record in batch]
        out = [(bos + t + eos, 0) for t in tok.encode_batch(texts)]
    if not data_cfg.packing and data_cfg.overlong == "error":
        for (where, _), (ids, _) in zip(batch, out):
            if len(ids) > data_cfg.seq_len:
                raise ConfigError(f"{where} has {len(ids)} tokens, more than data.seq_len={data_cfg.seq_len} "
                                  "(raise seq_len or set data.overlong=truncate)")
    return out


@lru_cache(maxsize=4)
def _tokenizer(path: str, backend: tuple | None):
    """A worker's tokenizer: the fast backend alone when the parent checked it (`backend`: file, bos, eos), else
    the full Tokenizer."""
    return BackendTokenizer(*backend) if backend is not None else Tokenizer(path)


def _worker_backend(tokenizer: Tokenizer, parts, data_cfg: DataConfig, directory: Path) -> tuple | None:
    """(file, bos, eos) of the backend the workers load, written into `directory`, when it tokenizes the first
    records of the data exactly as `tokenizer` does; else None (the workers load the full tokenizer). A bad row
    among the first records raises here, as the worker of its shard would."""
    backend = tokenizer.backend_json()
    if backend is None or not parts:
        return None
    path = directory / BACKEND_FILE
    write_atomic(path, backend)
    fast = BackendTokenizer(path, tokenizer.bos_id, tokenizer.eos_id)
    sample = [(f"{parts[0].key}: {parts[0].name} row {row}", record)
              for row, record in parts[0].records(0, min(ENCODE_BATCH, parts[0].num_rows()))]
    same = tokenize_records(sample, data_cfg, fast) == tokenize_records(sample, data_cfg, tokenizer)
    return (str(path), tokenizer.bos_id, tokenizer.eos_id) if same else None


@lru_cache(maxsize=4)
def _parts(spec: str, key: str):
    return open_source(spec, key)


def write_shard(job: dict) -> dict:
    """One worker's job: the records [start, stop) of one part, tokenized into shard `index` (and, for models of
    different tokenizers, its texts and spans: texts.py). Runs in a worker process (everything it needs is in
    `job`, reopened there), or inline for a single job."""
    data_cfg = DataConfig(**job["data"])
    tok = _tokenizer(job["tokenizer"], job["backend"])
    augmenting = [_tokenizer(path, None) for path in job["augmenting"]]
    part = _parts(job["spec"], job["key"])[job["part"]]
    batch: list[tuple[str, dict]] = []
    texts = TextWriter(Path(job["directory"]), job["index"]) if data_cfg.different_tokenizers else None
    with ShardWriter(Path(job["directory"]), job["index"], np.dtype(job["dtype"])) as writer:  # a bad row: no files

        def flush():
            if batch and texts is not None:
                for ids, loss_start, text, spans in tokenize_with_spans(batch, data_cfg, tok, augmenting):
                    writer.add(ids, loss_start)
                    texts.add(text, spans)
            elif batch:
                for ids, loss_start in tokenize_records(batch, data_cfg, tok):
                    writer.add(ids, loss_start)
            batch.clear()
        for row, record in part.records(job["start"], job["stop"]):
            batch.append((f"{part.key}: {part.name} row {row}", record))
            if len(batch) == ENCODE_BATCH:
                flush()
        flush()
        if texts is not None:  # before the token shard's sidecar, which marks the shard complete
            texts.close()
        return writer.close()


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def prepare(data_cfg: DataConfig, spec: str, key: str, tokenizer: Tokenizer, directory: Path, fp: str,
            workers: int = 0, augmenting: list[Tokenizer] = ()) -> dict:
    """Tokenize `spec` into shards under `directory` with `workers` processes (0: every core), resuming what a
    previous prepare left; returns the manifest (written last)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Two jobs sharing a data cache may prepare the same data at once: the second waits for the first, then
    # finds its manifest (shard files have fixed names, so two writers of one shard would collide).
    with open(directory.with_name(directory.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = read_manifest(directory)
        if manifest is not None:
            return manifest
        return _prepare_locked(data_cfg, spec, key, tokenizer, directory, fp, workers, augmenting)


def _prepare_locked(data_cfg: DataConfig, spec: str, key: str, tokenizer: Tokenizer, directory: Path, fp: str,
                    workers: int, augmenting: list[Tokenizer]) -> dict:
    parts = open_source(spec, key)
    directory.mkdir(parents=True, exist_ok=True)
    # the backend alone gives no character offsets, which models of different tokenizers are aligned by
    backend = None if data_cfg.different_tokenizers else _worker_backend(tokenizer, parts, data_cfg, directory)
    jobs = []
    for p, part in enumerate(parts):
        n = part.num_rows()
        for start in range(0, n, ROWS_PER_SHARD):
            jobs.append({"spec": spec, "key": key, "part": p, "start": start, "stop": min(n, start + ROWS_PER_SHARD),
                         "index": len(jobs), "directory": str(directory), "tokenizer": str(tokenizer.path),
                         "backend": backend, "augmenting": [str(t.path) for t in augmenting],
                         "dtype": token_dtype(tokenizer.vocab_size).str, "data": dataclasses.asdict(data_cfg)})
    todo = [job for job in jobs if not _complete(directory, job["index"], data_cfg)]
    workers = min(workers or available_cores(), len(todo))
    if workers <= 1:
        for job in todo:
            write_shard(job)
    elif todo:
        _run_in_workers(todo, workers)
    shards = [completed_shard(directory, job["index"]) for job in jobs]
    return _write_manifest(directory, data_cfg, spec, key, tokenizer, fp, shards)


def _complete(directory: Path, index: int, data_cfg: DataConfig) -> bool:
    """Shard `index` is written, and its texts too when the models read through different tokenizers."""
    sidecar = completed_shard(directory, index)
    return sidecar is not None and (not data_cfg.different_tokenizers or completed_texts(
        directory, index, sidecar["n_docs"], sidecar["n_tokens"]))


def _run_in_workers(jobs: list[dict], workers: int) -> None:
    """The jobs in `workers` fresh processes (spawned: the parent may hold threads and a process group, which
    fork would copy half-alive). On a failure the jobs not yet started are cancelled, the running ones finish,
    and the failure of the earliest shard among those that failed is raised."""
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(write_shard, job) for job in jobs]
        wait(futures, return_when=FIRST_EXCEPTION)
        if any(f.done() and f.exception() is not None for f in futures):
            pool.shutdown(wait=True, cancel_futures=True)
            raise next(f.exception() for f in futures if f.done() and not f.cancelled() and f.exception())


def _write_manifest(directory: Path, data_cfg: DataConfig, spec: str, key: str, tokenizer: Tokenizer, fp: str,
                    shards: list[dict]) -> dict:
    n_docs = sum(s["n_docs"] for s in shards)
    n_tokens = sum(s["n_tokens"] for s in shards)
    rows = TokenRows(directory, shards, seq_len=data_cfg.seq_len, packing=data_cfg.packing, pad_id=tokenizer.pad_id,
                     fingerprint=fp)
    if len(rows) == 0:
        raise ConfigError(f"{key}: {spec}: fewer tokens ({n_tokens}) than one packed row of {data_cfg.seq_len}")
    if not rows.any_labelled():
        raise ConfigError(f"{key}: {spec}: no token carries a loss")
    manifest = {"format_version": FORMAT_VERSION, "fingerprint": fp, "source": spec,
                "settings": settings_of(data_cfg), "tokenizer": tokenizer.fingerprint(),
                "vocab_size": tokenizer.vocab_size, "dtype": token_dtype(tokenizer.vocab_size).str,
                "rows_per_shard": ROWS_PER_SHARD, "n_docs": n_docs, "n_tokens": n_tokens, "n_rows": len(rows),
                "shards": shards}
    write_atomic(directory / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def load_rows(data_cfg: DataConfig, spec: str, key: str, tokenizer: Tokenizer, cache_dir: str | Path, *,
              is_writer: bool = True, silence_s: float = 0.0, workers: int = 0,
              augmenting: list[Tokenizer] = ()) -> TokenRows:
    """The rows of `spec`, prepared once: the writer (rank 0) fingerprints and prepares under a heartbeat; every
    other rank waits until the manifest exists, however long that takes, and stops when the writer's heartbeat
    has been silent for `silence_s` or it records an error (a bad row's ConfigError, which they raise too)."""
    cache_dir = Path(cache_dir)

    def current() -> Path | None:
        fp = fingerprint(data_cfg, spec, key, tokenizer, cache_dir, hashing=False, augmenting=augmenting)
        return None if fp is None else prepared_dir(cache_dir, fp)

    def work() -> None:
        fp = fingerprint(data_cfg, spec, key, tokenizer, cache_dir, augmenting=augmenting)
        prepare(data_cfg, spec, key, tokenizer, prepared_dir(cache_dir, fp), fp, workers, augmenting)

    def done() -> bool:
        directory = current()
        return directory is not None and (directory / MANIFEST).exists()

    job = hashlib.sha256(json.dumps([spec, key, str(tokenizer.path), settings_of(data_cfg)]).encode()).hexdigest()
    run_on_rank_zero(f"preparing {key} ({spec})", is_writer, work, done=done,
                     status_file=cache_dir / f"prepare-{job[:16]}.status", silence_s=silence_s)
    directory = current()
    manifest = read_manifest(directory)
    return TokenRows(directory, manifest["shards"], seq_len=data_cfg.seq_len, packing=data_cfg.packing,
                     pad_id=tokenizer.pad_id, fingerprint=manifest["fingerprint"])


def load_training_rows(data_cfg: DataConfig, tokenizer: Tokenizer, cache_dir: str | Path, **prepared):
    """data.train's rows: one source's TokenRows, or a mixture's MixedRows (each source prepared on its own)."""
    sources = data_cfg.train_sources()
    if not isinstance(data_cfg.train, list):
        (key, spec, _), = sources
        return load_rows(data_cfg, spec, key, tokenizer, cache_dir, **prepared)
    parts = [load_rows(data_cfg, spec, key, tokenizer, cache_dir, **prepared) for key, spec, _ in sources]
    return MixedRows(parts, [weight for *_, weight in sources], [f"{key} ({spec})" for key, spec, _ in sources])
