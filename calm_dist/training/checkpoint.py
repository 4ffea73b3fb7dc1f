"""Atomic checkpoints of what trains, without pickle, and the protocol every rank follows to write and resume them.

Layout of `<output_dir>/checkpoints/step_N/`:
    composition.safetensors + composition.json   the full composition weights (the export format)
    optimizer.rank{r}.safetensors / .json        rank r's ZeRO partition of the optimizer (fp32 master + moments)
    rng.rank{r}.safetensors / .json              rank r's RNG states
    trainer_state.json                           step, data position, scheduler, world size, data fingerprint,
                                                 MLflow run id
    config.yaml                                  the resolved config tree
    checksums.json                               the sha256 of every other file
Every rank writes into `step_N.tmp/`, hashes the files it wrote into its part of the index
(`checksums.rank{r}.json`) and fsyncs them, so no rank ever hashes or syncs another rank's shards. After the
ranks agree that all parts are written, rank 0 merges the parts into `checksums.json`, moves a previous
`step_N` aside (`step_N.replaced`: the step is being saved again), renames the new directory to `step_N`,
replaces `latest` (a one-line file naming the step directory), deletes what it moved aside and prunes all
but the last K. A crash at any point leaves `latest` resolving to an intact checkpoint: the step directory
it names or, in the moment between the two renames, that directory moved aside (resolve_latest).

Resuming verifies before loading: every rank checks the small shared files (trainer_state.json,
config.yaml) against the index, then its own files and a share of the large shared ones, and the ranks agree
on the newest checkpoint that is intact everywhere (`calm_dist.training.checkpointer.Checkpointer.choose`).

Nested state (optimizer and scheduler state dicts, RNG tuples) is stored as tensors in safetensors
plus a JSON skeleton; loading never unpickles anything.

This module is the format and the publishing on disk, light enough for preflight to read checkpoints before
anything heavy loads; `calm_dist.training.checkpointer` is the collective protocol of a training job built on it.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from calm_dist.config import ConfigError
from calm_dist.files import fsync_dir, fsync_file, save_safetensors, sha256_file, write_atomic, write_file

LATEST = "latest"
INDEX = "checksums.json"
STEP_DIR = re.compile(r"^step_(\d+)$")
RANK_FILE = re.compile(r"\.rank(\d+)\.")
INDEX_PART = "checksums.rank{rank}.json"
SMALL_SHARED_FILES = ("trainer_state.json", "config.yaml")  # every rank reads them, so every rank verifies them
REQUIRED_STATE = {"step": int, "world_size": int, "scheduler": dict, "data_fingerprint": str}


class CheckpointError(RuntimeError):
    pass


class DamagedCheckpoint(CheckpointError, ConfigError):
    """A checkpoint that fails its checksums or lacks what resuming needs: bad input to this run, refused like
    a ConfigError (one line, exit code 2) before anything is loaded from it."""


# ---- nested state <-> (tensors, JSON skeleton) ------------------------------------------------------
def to_skeleton(obj, tensors: dict[str, torch.Tensor], path: str = "s"):
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(obj.copy())
        return {"__ndarray__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[to_skeleton(k, tensors, f"{path}.k{i}"), to_skeleton(v, tensors, f"{path}.{i}")]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [to_skeleton(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot store a {type(obj).__name__} at {path} without pickle")


def from_skeleton(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [from_skeleton(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__tuple__" in obj:
            return tuple(from_skeleton(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {from_skeleton(k, tensors): from_skeleton(v, tensors) for k, v in obj["__dict__"]}
    return obj


def save_state(state, directory: Path, name: str) -> dict[str, str]:
    """Write `name`.safetensors + `name`.json; returns {file name: sha256} of both."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = to_skeleton(state, tensors)
    save_safetensors(tensors, directory / f"{name}.safetensors")
    return {**file_hashes(directory, [f"{name}.safetensors"]),
            f"{name}.json": write_file(directory / f"{name}.json", json.dumps(skeleton))}


def load_state(directory: Path, name: str):
    tensors_path, skeleton_path = directory / f"{name}.safetensors", directory / f"{name}.json"
    if not tensors_path.is_file() or not skeleton_path.is_file():
        raise DamagedCheckpoint(f"checkpoint {directory} lacks {name} (written with another world size?)")
    return from_skeleton(json.loads(skeleton_path.read_text()), load_file(str(tensors_path)))


# ---- checksums -------------------------------------------------------------------------------------
def file_hashes(directory: Path, names) -> dict[str, str]:
    """{name: sha256} of files this rank has just written (read back from the page cache, one file at a time:
    a large optimizer shard is never held twice in memory)."""
    return {name: sha256_file(directory / name) for name in names}


def write_index_part(directory: Path, rank: int, hashes: dict[str, str]) -> None:
    """This rank's share of the index, written once its files are on disk; publish() merges the parts. Each rank
    syncs the files it wrote, so the work is spread over the ranks, before the agreement that publishes them."""
    for name in hashes:
        fsync_file(directory / name)
    write_file(directory / INDEX_PART.format(rank=rank), json.dumps(hashes, indent=1, sort_keys=True), fsync=True)


def write_index(directory: Path) -> None:
    """Rank 0 at publish: merge every rank's part into checksums.json (reading small JSON, hashing nothing)."""
    parts = sorted(directory.glob(INDEX_PART.format(rank="*")))
    files: dict[str, str] = {}
    for part in parts:
        files.update(json.loads(part.read_text()))
    write_file(directory / INDEX, json.dumps({"files": dict(sorted(files.items()))}, indent=1), fsync=True)
    for part in parts:
        part.unlink()


def read_index(directory: Path) -> dict[str, str]:
    """{file name: sha256} from checksums.json; a checkpoint without one cannot be verified and is refused."""
    path = directory / INDEX
    if not path.is_file():
        raise DamagedCheckpoint(f"{directory} has no {INDEX}: it was written before checkpoints carried checksums "
                                "(or is incomplete), so it cannot be verified and is not resumed")
    try:
        files = json.loads(path.read_text())["files"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise TypeError("names and hashes must be strings")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DamagedCheckpoint(f"{path} is damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                                ) from None
    return files


def verify_files(directory: Path, index: dict[str, str], names) -> None:
    for name in names:
        path = directory / name
        if name not in index:
            raise DamagedCheckpoint(f"{path} is not listed in its {INDEX}")
        if not path.is_file():
            raise DamagedCheckpoint(f"{path} is missing")
        if sha256_file(path) != index[name]:
            raise DamagedCheckpoint(f"{path} does not match its sha256 in {INDEX} (damaged or truncated)")


def read_checkpoint_state(directory: Path) -> dict:
    """trainer_state.json, after the small shared files passed their checksums and it holds what resuming reads."""
    verify_files(directory, read_index(directory), SMALL_SHARED_FILES)
    path = directory / "trainer_state.json"
    try:
        state = json.loads(path.read_text())
    except ValueError as e:
        raise DamagedCheckpoint(f"{path} is not valid JSON: {e}") from None
    for key, kind in REQUIRED_STATE.items():
        if not isinstance(state, dict) or not isinstance(state.get(key), kind):
            raise DamagedCheckpoint(f"{path} lacks {key} (a {kind.__name__})")
    return state


def verify_rank_share(directory: Path, rank: int, world_size: int) -> None:
    """This rank's own files and every world_size-th large shared file (the composition): each file of the
    checkpoint is hashed by exactly one rank."""
    index = read_index(directory)
    own = [name for name in index if (m := RANK_FILE.search(name)) and int(m.group(1)) == rank]
    if not own:
        raise DamagedCheckpoint(f"{directory}/{INDEX} lists no file of rank {rank}")
    shared = sorted(name for name in index if not RANK_FILE.search(name) and name not in SMALL_SHARED_FILES)
    verify_files(directory, index, own + shared[rank::world_size])


# ---- RNG -------------------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- directories -----------------------------------------------------------------------------------
def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir(output_dir, step: int) -> Path:
    return checkpoints_dir(output_dir) / f"step_{step}"


def staging_dir(output_dir, step: int) -> Path:
    return checkpoints_dir(output_dir) / f"step_{step}.tmp"


def new_staging_dir(staged: Path) -> None:
    """Rank 0: an empty staging directory. One left by an earlier attempt at this step is this job's own (the
    output directory's lock keeps other jobs out), so it is removed."""
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)


def aside_dir(step_directory: Path) -> Path:
    """Where publish() moves a step directory that is being saved again, until the new one is in place."""
    return step_directory.with_name(step_directory.name + ".replaced")


def publish(output_dir, step: int, keep_last: int) -> Path:
    """Rank 0, once every rank has written and synced its files into the staging dir: index, rename, point
    `latest`, prune. A step saved again (a finished run resumed, a crash between rename and `latest`) is moved
    aside, never deleted, until `latest` names its replacement."""
    root = checkpoints_dir(output_dir)
    staged, final = staging_dir(output_dir, step), step_dir(output_dir, step)
    aside = aside_dir(final)
    write_index(staged)
    fsync_dir(staged)
    if final.exists():
        if aside.exists():  # left by a crash after an earlier rename in: `latest` can only resolve to final
            shutil.rmtree(aside)
        final.rename(aside)
    staged.rename(final)
    fsync_dir(root)
    point_latest(root, final.name)
    if aside.exists():
        shutil.rmtree(aside)
    prune(root, keep_last, protect=final.name)
    return final


def point_latest(root: Path, name: str) -> None:
    """Replace `latest` atomically: it names the old step directory or the new one, never a partial file."""
    write_atomic(root / LATEST, name + "\n", aside=f".{LATEST}.tmp")  # one writer: rank 0, under the job's lock
    fsync_dir(root)


def prune(root: Path, keep_last: int, protect: str) -> None:
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)))
    for _, p in steps[: max(0, len(steps) - keep_last)]:
        if p.name != protect:
            shutil.rmtree(p, ignore_errors=True)
    # Staging and moved-aside directories left by a crash: `latest` names `protect`, which exists, so none is read.
    for p in [*root.glob("step_*.tmp"), *root.glob("step_*.replaced")]:
        shutil.rmtree(p, ignore_errors=True)


def resolve_latest(root: Path) -> Path | None:
    """The step directory `latest` names; when it is missing because publish() stopped between moving it aside
    and renaming its replacement in, the one moved aside. None when there is no `latest`."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    target = root / pointer.read_text().strip()
    if not target.exists() and aside_dir(target).is_dir():
        return aside_dir(target)
    return target


def latest_checkpoint(output_dir) -> Path | None:
    root = checkpoints_dir(output_dir)
    pointer = root / LATEST
    target = resolve_latest(root)
    if target is None:
        return None
    if not (target / "trainer_state.json").is_file():
        raise CheckpointError(f"{pointer} names {target.name}, which is missing or incomplete")
    return target


def resume_candidates(resume: str | None, output_dir) -> list[Path]:
    """Where a resume may start, best first. `auto`: the step directory `latest` names, then the older ones
    (the fallbacks when it is damaged); a path: that step directory alone; None or no `latest`: []."""
    if resume is None:
        return []
    if resume != "auto":
        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            raise CheckpointError(f"train.resume={resume}: not a checkpoint directory "
                                  "(expected .../checkpoints/step_N)")
        return [path]
    root = checkpoints_dir(output_dir)
    pointer = root / LATEST
    latest = resolve_latest(root)
    if latest is None:
        return []
    newest = int(m.group(1)) if (m := STEP_DIR.match(pointer.read_text().strip())) else None
    if newest is None:
        raise DamagedCheckpoint(f"{pointer} names {latest.name}, which is not a step directory")
    older = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir())
    return [latest] + [p for step, p in reversed(older) if step < newest]


def read_trainer_state(directory: Path) -> dict:
    return json.loads((directory / "trainer_state.json").read_text())
