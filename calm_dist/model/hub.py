"""Models and tokenizers named by a local path or a hub id (`org/name`, with a revision): a hub id resolves to its
snapshot directory in the Hugging Face cache, fetched there by huggingface_hub.snapshot_download, and everything
after reads that directory as it reads a local one.

- A snapshot already complete in the cache is used without asking the hub: every rank of a job must read the
  commit rank 0 fetched, and the cache is what they share (pin `revision` to a commit to choose one; `hf download
  ID --revision BRANCH` refreshes a branch). `HF_HUB_OFFLINE=1` reads the cache alone.
- In a job, rank 0 fetches and the other ranks wait on its heartbeat, outside the collective timeout
  (`fetch_on_rank_zero`, calm_dist/rank_zero.py); the cache must then lie where every rank sees it, as the data
  cache does.
- Pickled weights (.bin, .pt, ...) are neither fetched nor unpickled (a pickle runs code when it loads): a
  model without safetensors weights is refused, saying how to convert it.
- Every failure (an id not cached while offline, a repository or revision the hub does not know) is one line
  naming the config key: a ConfigError, exit code 2.

huggingface_hub is imported where it is used: prepare's tokenizing workers import this module's importers.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from calm_dist.config import ConfigError
from calm_dist.rank_zero import run_on_rank_zero

# Never fetched: pickles (calm_dist loads safetensors only) and other frameworks' copies of the weights.
NOT_FETCHED = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt", "*.msgpack", "*.h5", "*.ot", "*.onnx", "*.gguf",
               "*.tflite", "original/*"]
# What a tokenizer may read of a repository, fetched alone when only the tokenizer is asked for.
TOKENIZER_FILES = ["tokenizer*", "*.model", "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                   "*.tiktoken", "config.json"]
# Any of these in a directory: a tokenizer was saved with the model.
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


class FetchFailed(RuntimeError):
    """A fetch that failed on rank 0. Not a ConfigError: its cause (the network, the cache) may be gone at the
    next attempt, so the other ranks must not take an earlier attempt's failure for this one's
    (calm_dist/rank_zero.py believes a recorded ConfigError at once)."""


def is_hub_id(name: str) -> bool:
    """`org/name` that is no existing path. Anything else (a path that exists, or that is written as a path, or a
    bare name) is local."""
    return (bool(name) and name.count("/") == 1 and not name.startswith((".", "/", "~"))
            and not Path(name).expanduser().exists())


def has_tokenizer(directory: str | Path) -> bool:
    return Path(directory).is_dir() and any((Path(directory) / f).is_file() for f in TOKENIZER_MARKERS)


def _patterns(weights: bool) -> dict:
    return {"ignore_patterns": NOT_FETCHED} if weights else {"allow_patterns": TOKENIZER_FILES}


def _described(name: str, revision: str | None) -> str:
    return f"{name} (revision {revision})" if revision else name


def cached(name: str, revision: str | None = None, weights: bool = True) -> Path | None:
    """The snapshot of a hub id in the HF cache when it is complete (huggingface_hub checks that against the file
    listing it cached with the download), else None. Never asks the hub."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision, local_files_only=True, **_patterns(weights)))
    except (LocalEntryNotFoundError, HFValidationError):  # IncompleteSnapshotError is a LocalEntryNotFoundError
        return None


def fetch(name: str, revision: str | None, key: str, weights: bool = True) -> Path:
    """snapshot_download of a hub id into the HF cache (what is there already is not fetched again); every way it
    can fail is one line naming `key`."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    what = f"{key}: {_described(name, revision)}"
    try:
        return Path(snapshot_download(name, revision=revision, **_patterns(weights)))
    except HFValidationError as e:
        raise ConfigError(f"{what} is neither an existing path nor a valid hub id: {_first_line(e)}") from None
    except RevisionNotFoundError:
        raise ConfigError(f"{what}: the hub has no such revision (a branch, tag or commit)") from None
    except GatedRepoError:
        raise ConfigError(f"{what} is gated: accept its conditions on the hub, then log in (hf auth login, or "
                          "HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{what}: the hub has no such repository, or it is private (log in: hf auth login, or "
                          "HF_TOKEN)") from None
    except LocalEntryNotFoundError as e:
        if constants.is_offline_mode():
            raise ConfigError(f"{what} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub is "
                              f"offline (HF_HUB_OFFLINE=1): fetch it once with network access (hf download {name}"
                              f"{f' --revision {revision}' if revision else ''}), or point HF_HUB_CACHE at a cache "
                              "that holds it") from None
        raise ConfigError(f"{what} is not in the Hugging Face cache and the hub cannot be reached: "
                          f"{_first_line(e)}") from None
    except OSError as e:  # the hub answered with an error, or the cache cannot be written
        raise ConfigError(f"{what}: fetching from the hub failed: {_first_line(e)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def local_path(name: str, revision: str | None, key: str, weights: bool = True) -> Path:
    """The local path of a model or tokenizer: the path itself, or the hub id's snapshot in the HF cache (fetched
    when it is not complete there). `weights`: a model, whose directory must hold safetensors weights."""
    if not name:
        raise ConfigError(f"{key} is not set")
    if is_hub_id(name):
        path = cached(name, revision, weights) or fetch(name, revision, key, weights)
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise ConfigError(f"{key}: {name} does not exist (a hub id is written org/name)")
    if weights:
        check_safetensors(path, name, key)
    return path


def check_safetensors(directory: Path, name: str, key: str) -> None:
    """calm_dist loads safetensors only: a model whose weights are pickles is refused, never unpickled."""
    if directory.is_dir() and not any(directory.glob("*.safetensors")):
        what = f"the hub repository {name}" if is_hub_id(name) else name
        raise ConfigError(
            f"{key}: {what} holds no safetensors weights. Pickled checkpoints "
            "(pytorch_model.bin, *.pt) are refused: unpickling runs whatever code the file carries. Convert it "
            "once where you trust it, AutoModelForCausalLM.from_pretrained(...).save_pretrained(DIR, "
            "safe_serialization=True), and name DIR (or a hub revision holding model.safetensors)")


def fetch_on_rank_zero(name: str, revision: str | None, key: str, *, weights: bool, is_rank_zero: bool,
                       silence_s: float, status_dir: str | Path) -> None:
    """Rank 0 fetches a hub id into the HF cache while the other ranks wait on its heartbeat (`status_dir`: a
    directory every rank sees); nothing happens when the snapshot is complete in the cache already. A local
    path is left to the caller."""
    if not is_hub_id(name):
        return
    failure: list[ConfigError] = []

    def work() -> None:
        try:
            fetch(name, revision, key, weights)
        except ConfigError as e:
            failure.append(e)
            raise FetchFailed(str(e)) from None
    tag = hashlib.sha256(f"{name}@{revision}@{weights}".encode()).hexdigest()[:16]
    try:
        run_on_rank_zero(f"fetching {_described(name, revision)} into the Hugging Face cache", is_rank_zero, work,
                         done=lambda: cached(name, revision, weights) is not None,
                         status_file=Path(status_dir) / f"hub-{tag}.status", silence_s=silence_s)
    except FetchFailed:
        raise failure[0] from None
