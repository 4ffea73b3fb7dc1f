"""Writing files that readers and crashes never see half-written, and the checksums that prove it.

Two kinds of write:
- `write_file`: in place. For files inside a directory that becomes visible only by a rename of the whole
  directory (a checkpoint's staging directory), so nobody reads them while they are written.
- `write_atomic` / `replacing`: written aside, then renamed over the target, so readers (on any node of a
  shared filesystem) see the old file or the new one, never a part. With `fsync`, the data is on disk before
  the rename: a crash cannot leave the name pointing at an empty or short file.
A rename is durable only once its directory is synced (`fsync_dir`); callers sync it where a crash must not
undo the rename.

No torch at import: the tracker, which runs without it, writes through this module too.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else data


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file, read in chunks: a large shard is never held twice in memory."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(directory: str | Path) -> None:
    """Make the renames and new names in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str | Path, data: bytes | str, *, fsync: bool = False) -> str:
    """Write `data` in place (a str as UTF-8); returns the sha256 of the bytes written."""
    data = _as_bytes(data)
    Path(path).write_bytes(data)
    if fsync:
        fsync_file(path)
    return hashlib.sha256(data).hexdigest()


@contextmanager
def replacing(path: str | Path, *, fsync: bool = True, aside: str | None = None) -> Iterator[Path]:
    """Yields the path to write instead of `path`; when the block ends, that file (synced first with `fsync`)
    is renamed over `path`. A block that raises leaves `path` as it was and removes the aside file.

    `aside` names the file written aside. By default the name carries host and pid, so writers that may run at
    once (two attempts of a job, ranks on several nodes) never share one; a single writer (under the job's lock)
    passes a fixed name, so the leftover of a crashed attempt is overwritten by the next instead of piling up."""
    path = Path(path)
    tmp = path.with_name(aside or f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        yield tmp
        if fsync:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: bytes | str, *, fsync: bool = True, aside: str | None = None) -> str:
    """Replace `path` with `data` through `replacing`; returns the sha256 of the bytes written."""
    data = _as_bytes(data)
    with replacing(path, fsync=fsync, aside=aside) as tmp:
        tmp.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def replace_directory(directory: str | Path, fill: Callable[[Path], None]) -> Path:
    """`fill` writes the directory's files into a temporary sibling; they are synced, then the sibling is renamed
    into place (a previous `directory` moved aside first, then removed): a reader sees the old directory or the
    complete new one, and a `fill` that raises leaves `directory` as it was."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        fill(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_file(f)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def save_safetensors(tensors: dict, path: str | Path) -> None:
    """safetensors' save_file, with its I/O errors (a full disk) raised as OSError like every other write."""
    # imported here: safetensors.torch imports torch, which this module's torch-free callers never need
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path))
    except SafetensorError as e:
        raise OSError(f"{e} ({path})") from None
