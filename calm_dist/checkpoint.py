"""Atomic checkpoints of what trains, without pickle.

Layout of `<output_dir>/checkpoints/step_N/`:
    composition.safetensors + composition.json   the full composition weights (the export format)
    optimizer.rank{r}.safetensors / .json        rank r's ZeRO partition of the optimizer (fp32 master + moments)
    rng.rank{r}.safetensors / .json              rank r's RNG states
    trainer_state.json                           step, data position, scheduler, world size, MLflow run id
    config.yaml                                  the resolved config tree
Every rank writes into `step_N.tmp/`; after a barrier rank 0 renames it to `step_N`, then replaces
`latest` (a one-line file naming the step directory), then prunes all but the last K. A crash at any
point leaves the previous `latest` and its directory intact.

Nested state (optimizer and scheduler state dicts, RNG tuples) is stored as tensors in safetensors
plus a JSON skeleton; loading never unpickles anything.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"
STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    pass


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


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, with its I/O errors (a full disk) raised as OSError like every other write."""
    from safetensors import SafetensorError

    try:
        save_file(tensors, str(path))
    except SafetensorError as e:
        raise OSError(f"{e} ({path})") from None


def save_state(state, directory: Path, name: str) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = to_skeleton(state, tensors)
    save_safetensors(tensors, directory / f"{name}.safetensors")
    (directory / f"{name}.json").write_text(json.dumps(skeleton))


def load_state(directory: Path, name: str):
    tensors_path, skeleton_path = directory / f"{name}.safetensors", directory / f"{name}.json"
    if not tensors_path.is_file() or not skeleton_path.is_file():
        raise CheckpointError(f"checkpoint {directory} lacks {name} (written with another world size?)")
    return from_skeleton(json.loads(skeleton_path.read_text()), load_file(str(tensors_path)))


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


def fsync_tree(directory: Path) -> None:
    for f in directory.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(directory)


def publish(output_dir, step: int, keep_last: int) -> Path:
    """Rank 0, after every rank has written into the staging dir: rename, point `latest`, prune."""
    root = checkpoints_dir(output_dir)
    staged, final = staging_dir(output_dir, step), step_dir(output_dir, step)
    fsync_tree(staged)
    if final.exists():  # a re-run of the same step after a crash between rename and `latest`
        shutil.rmtree(final)
    staged.rename(final)
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(final.name + "\n")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)
    prune(root, keep_last, protect=final.name)
    return final


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(root: Path, keep_last: int, protect: str) -> None:
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)))
    for _, p in steps[: max(0, len(steps) - keep_last)]:
        if p.name != protect:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob("step_*.tmp"):  # staging left by a crash
        shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(output_dir) -> Path | None:
    root = checkpoints_dir(output_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    target = root / pointer.read_text().strip()
    if not (target / "trainer_state.json").is_file():
        raise CheckpointError(f"{pointer} names {target.name}, which is missing or incomplete")
    return target


def resolve_resume(resume: str | None, output_dir) -> Path | None:
    """`auto`: the latest checkpoint of output_dir if any; a path: that step directory; None: fresh start."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise CheckpointError(f"train.resume={resume}: not a checkpoint directory (expected .../checkpoints/step_N)")
    return path


def read_trainer_state(directory: Path) -> dict:
    return json.loads((directory / "trainer_state.json").read_text())
