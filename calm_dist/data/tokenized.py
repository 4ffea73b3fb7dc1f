"""Data: records from local files, one tokenizer for every model, fixed-length rows, a resumable sampler.

Records are prompt/completion pairs (loss on the completion and the closing eos only) or plain text.
Tokenization runs once; its result is saved with `datasets` under a fingerprint of (data file bytes,
tokenizer file bytes, settings) and memory-mapped on later runs. Rows are right-padded (or packed) to
`seq_len`, so the composition's causal mask alone keeps padding out of the real tokens.

sentencepiece, transformers and datasets are imported where they are used: validation imports this module.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from calm_dist.config import ConfigError, DataConfig
from calm_dist.model.lm_loss import IGNORE


class Tokenizer:
    """A SentencePiece model file or a transformers tokenizer directory, behind one small interface."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_file() and self.path.suffix == ".model":
            import sentencepiece as spm

            if self.path.stat().st_size == 0:
                raise ConfigError(f"data.tokenizer: {path} is an empty file")
            with _named_load_failure(path, "a SentencePiece model"):
                self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
            self.vocab_size = self._sp.get_piece_size()
            ids = (self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id())
            self.bos_id, self.eos_id, self.pad_id = (i if i >= 0 else None for i in ids)
        elif self.path.is_dir():
            from transformers import AutoTokenizer

            if not any(self.path.iterdir()):
                raise ConfigError(f"data.tokenizer: {path} is an empty directory")
            with _named_load_failure(path, "a tokenizer"):
                self._hf = AutoTokenizer.from_pretrained(str(self.path), trust_remote_code=False)
            self._sp = None
            self.vocab_size = len(self._hf)
            self.bos_id, self.eos_id, self.pad_id = self._hf.bos_token_id, self._hf.eos_token_id, self._hf.pad_token_id
        else:
            raise ConfigError(f"data.tokenizer: {path} is neither a SentencePiece .model file nor a tokenizer directory")
        if self.pad_id is None:
            self.pad_id = self.eos_id if self.eos_id is not None else 0

    def encode(self, text: str) -> list[int]:
        if self._sp is not None:
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return self._sp.decode(ids) if self._sp is not None else self._hf.decode(ids, skip_special_tokens=True)

    def fingerprint(self) -> str:
        """A hash of the tokenizer's file names and bytes: the same files in another directory, the same value."""
        files = [self.path] if self.path.is_file() else sorted(p for p in self.path.iterdir() if p.is_file())
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode())
            h.update(f.read_bytes())
        return h.hexdigest()[:16]


@contextlib.contextmanager
def _named_load_failure(path, what: str):
    """A tokenizer file the library cannot parse becomes one line naming the path, not a library traceback."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"data.tokenizer: cannot load {what} from {path}: {first}") from None


def check_tokenizer_matches(tokenizer: Tokenizer, model_config, who: str) -> None:
    """The tokenizer must fit the model's embedding table and agree on the special ids."""
    problems = []
    if tokenizer.vocab_size > model_config.vocab_size:
        problems.append(f"tokenizer has {tokenizer.vocab_size} tokens, the model's vocabulary {model_config.vocab_size}")
    for name in ("bos", "eos"):
        ours, theirs = getattr(tokenizer, f"{name}_id"), getattr(model_config, f"{name}_token_id", None)
        if ours is not None and theirs is not None and ours != theirs:
            problems.append(f"{name} id {ours} in the tokenizer, {theirs} in the model")
    if problems:
        raise ConfigError(f"data.tokenizer does not match the {who}: {'; '.join(problems)}")


def check_data_path(key: str, path: str) -> None:
    """`path` names data load_records can read: an existing file, or a directory `Dataset.save_to_disk`
    wrote (its state.json). An empty value would otherwise name the working directory."""
    if not path:
        raise ConfigError(f"{key} is not set")
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{key}: {path} does not exist")
    if p.is_dir() and not (p / "state.json").is_file():
        hint = ("a DatasetDict: name one split's directory" if (p / "dataset_dict.json").is_file() else
                "no state.json: use a .jsonl, .json or .parquet file, or a directory written by save_to_disk")
        raise ConfigError(f"{key}: {path} is a directory that holds no saved dataset ({hint})")


def load_records(path: str | Path):
    """A `datasets.Dataset` from JSONL / JSON, Parquet, or a save_to_disk directory."""
    import datasets

    path = Path(path)
    if path.is_dir():
        try:
            return datasets.load_from_disk(str(path))
        except Exception as e:  # a damaged saved dataset: name the directory, not a datasets traceback
            raise ConfigError(f"{path}: cannot read it as a saved dataset: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
    if kind is None:
        raise ConfigError(f"{path}: unsupported data file (use .jsonl, .json, .parquet or a saved dataset directory)")
    if path.stat().st_size == 0 or (kind == "json" and not path.read_text().strip()):
        raise ConfigError(f"{path}: the data set is empty")
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # malformed JSON / Parquet: name the file, not a datasets traceback
        raise ConfigError(f"{path}: cannot read it as {kind}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _file_fingerprint(path: Path) -> str:
    """A hash of the bytes of a data file, or of every file under a saved dataset's directory."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def data_fingerprint(cfg: DataConfig, path: str | Path, tokenizer: Tokenizer) -> str:
    """What the tokenized rows depend on, hashed: the data's bytes, the tokenizer's, and the data settings that
    change the rows. It names the saved arrays, and a resume compares it instead of the paths."""
    settings = {k: getattr(cfg, k) for k in ("format", "prompt_field", "completion_field", "text_field",
                                             "seq_len", "packing", "overlong")}
    key = json.dumps([_file_fingerprint(Path(path)), tokenizer.fingerprint(), settings], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def prompt_ids(tok: Tokenizer, prompt: str) -> list[int]:
    """A prompt as training and evaluation feed it: bos (when the tokenizer has one), then its tokens."""
    return ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(prompt)


def completion_ids(tok: Tokenizer, completion: str) -> list[int]:
    """A completion as training labels it and exact match requires it: its tokens, then eos."""
    return tok.encode(completion) + ([tok.eos_id] if tok.eos_id is not None else [])


def _tokenize_record(record: dict, index: int, cfg: DataConfig, tok: Tokenizer) -> tuple[list[int], list[int]]:
    """One record's token ids and labels (IGNORE where no loss), before padding or packing."""
    bos = [tok.bos_id] if tok.bos_id is not None else []
    eos = [tok.eos_id] if tok.eos_id is not None else []
    if cfg.format == "prompt_completion":
        for name in (cfg.prompt_field, cfg.completion_field):
            if not isinstance(record.get(name), str):
                raise ConfigError(f"data row {index}: field {name!r} is missing or not a string")
        prompt = prompt_ids(tok, record[cfg.prompt_field])
        completion = completion_ids(tok, record[cfg.completion_field])
        return prompt + completion, [IGNORE] * len(prompt) + completion
    if not isinstance(record.get(cfg.text_field), str):
        raise ConfigError(f"data row {index}: field {cfg.text_field!r} is missing or not a string")
    ids = bos + tok.encode(record[cfg.text_field]) + eos
    return ids, list(ids)


def _rows(records, batch_size: int = 4096):
    """Rows as dicts, read in Arrow batches (iterating a Dataset formats every row on its own: far slower)."""
    for batch in records.iter(batch_size=batch_size):
        for values in zip(*batch.values()):
            yield dict(zip(batch, values))


def tokenize(cfg: DataConfig, path: str | Path, tok: Tokenizer) -> dict[str, np.ndarray]:
    """Rows of exactly seq_len: input_ids, labels (-100 where no loss), attention_mask."""
    records = load_records(path)
    if len(records) == 0:
        raise ConfigError(f"{path}: the data set is empty")
    L = cfg.seq_len
    ids_rows, label_rows = [], []
    for i, record in enumerate(_rows(records)):
        ids, labels = _tokenize_record(record, i, cfg, tok)
        if len(ids) > L and not cfg.packing:
            if cfg.overlong == "error":
                raise ConfigError(f"data row {i} of {path} has {len(ids)} tokens, more than data.seq_len={L} "
                                  "(raise seq_len or set data.overlong=truncate)")
            ids, labels = ids[:L], labels[:L]
        ids_rows.append(ids)
        label_rows.append(labels)
    if cfg.packing:
        flat_ids = np.fromiter((t for r in ids_rows for t in r), dtype=np.int64)
        flat_labels = np.fromiter((t for r in label_rows for t in r), dtype=np.int64)
        n = len(flat_ids) // L
        if n == 0:
            raise ConfigError(f"{path}: fewer tokens than one packed row of {L}")
        input_ids, labels = flat_ids[: n * L].reshape(n, L), flat_labels[: n * L].reshape(n, L)
        mask = np.ones_like(input_ids)
    else:
        input_ids = np.full((len(ids_rows), L), tok.pad_id, dtype=np.int64)
        labels = np.full((len(ids_rows), L), IGNORE, dtype=np.int64)
        mask = np.zeros((len(ids_rows), L), dtype=np.int64)
        for r, (ids, lab) in enumerate(zip(ids_rows, label_rows)):
            input_ids[r, : len(ids)], labels[r, : len(lab)], mask[r, : len(ids)] = ids, lab, 1
    if not (labels != IGNORE).any():
        raise ConfigError(f"{path}: no token carries a loss (empty completions?)")
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


@dataclass
class TokenizedData:
    """A tokenized split as [rows, seq_len] int64 tensors, and the fingerprint it was saved under."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    fingerprint: str

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, indices) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {"input_ids": self.input_ids[idx], "labels": self.labels[idx], "attention_mask": self.attention_mask[idx]}


def load_tokenized(cfg: DataConfig, path: str | Path, tok: Tokenizer, cache_dir: str | Path,
                   is_writer: bool = True, silence_s: float = 0.0) -> TokenizedData:
    """Tokenize once per fingerprint; later runs (and the other ranks) read the saved arrays.

    The writer (rank 0) tokenizes under a heartbeat; the others wait for its arrays however long that takes
    (calm_dist/rank_zero.py), and stop when its heartbeat has been silent for `silence_s` or it records an
    error: a bad row's ConfigError, which they raise too, so every rank stops with the same message.
    """
    import datasets

    from calm_dist.rank_zero import run_on_rank_zero

    fp = data_fingerprint(cfg, path, tok)
    target = Path(cache_dir) / f"tokens-{fp}"
    run_on_rank_zero(f"tokenizing {path}", is_writer, lambda: _write_tokenized(cfg, path, tok, target),
                     done=lambda: (target / "dataset_info.json").exists(),
                     status_file=target.with_name(target.name + ".status"), silence_s=silence_s)
    # One batch read of every row: `ds[column]` formats row by row, which is slow for large sets.
    rows = datasets.load_from_disk(str(target)).with_format("numpy")[:]
    cols = {k: torch.from_numpy(np.asarray(rows[k], dtype=np.int64)) for k in ("input_ids", "labels", "attention_mask")}
    return TokenizedData(**cols, fingerprint=fp)


def _write_tokenized(cfg: DataConfig, path, tok: Tokenizer, target: Path) -> None:
    """Tokenize and save under a temporary name, then rename: a reader sees the arrays complete or not at all."""
    import datasets

    target.parent.mkdir(parents=True, exist_ok=True)
    arrays = tokenize(cfg, path, tok)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    datasets.Dataset.from_dict(arrays).save_to_disk(str(tmp))
    try:
        tmp.rename(target)
    except OSError:  # another job wrote it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)


class GlobalBatchSampler:
    """Global batch `step` as a pure function of (seed, step): resuming at any step needs nothing else.

    Each epoch is a fresh seeded permutation; a global batch never spans two epochs (the remainder of an
    epoch is dropped). Rank r, micro-step k of the accumulation takes the slice k*world + r of the batch.
    """

    def __init__(self, num_examples: int, global_batch_size: int, seed: int):
        if num_examples < global_batch_size:
            raise ConfigError(f"the training set has {num_examples} rows, fewer than one global batch "
                              f"of {global_batch_size}")
        self.n, self.global_batch, self.seed = num_examples, global_batch_size, seed
        self.batches_per_epoch = num_examples // global_batch_size
        self._perm_epoch, self._perm = -1, None

    def global_batch_indices(self, step: int) -> np.ndarray:
        epoch, within = divmod(step, self.batches_per_epoch)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm[within * self.global_batch:(within + 1) * self.global_batch]

    def micro_batch_indices(self, step: int, micro_step: int, rank: int, world: int, micro_batch_size: int) -> np.ndarray:
        start = (micro_step * world + rank) * micro_batch_size
        return self.global_batch_indices(step)[start:start + micro_batch_size]
