"""One job per output or cache directory.

Two jobs writing one directory would delete each other's staging directories (a checkpoint's step_N.tmp, a
cache's partial shards). So global rank 0 takes an exclusive `flock` on `<directory>/.calm_dist.lock` before
anything is written in the directory, writes the holder (host, pid, Slurm job id) into it, and keeps it open
until the process exits. A second job is refused with one line naming the holder (a ConfigError: exit 2); the
other ranks learn of the refusal through calm_dist.training.agreement, so every rank exits 2.

The kernel drops an flock when its process dies, SIGKILL included: the file a dead job leaves behind is not a
lock, and the next job takes it and rewrites the holder. The file is never deleted (deleting a lock file lets
two processes hold locks on two different files of one name).

Only rank 0 locks: ranks on other nodes share the filesystem, and one holder per job is enough. How far a lock
reaches depends on that filesystem:
- local filesystems: every process of the machine;
- NFS: Linux emulates flock with whole-file NFS byte-range locks, seen by every client, when the server's lock
  manager works (NFSv3 needs lockd and statd); a mount with `local_lock=flock` or `local_lock=all` locks for
  its own node only; a client that crashes can leave its lock with the server until its lease or lock
  recovery ends;
- Lustre: locks across nodes only when mounted with `flock`; `localflock` locks within one node; without
  either, flock fails (ENOSYS).
Where the filesystem cannot lock at all, the job warns and runs unlocked: two jobs on one directory are then
not refused.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from functools import partial
from pathlib import Path

from calm_dist.config import ConfigError
from calm_dist.training.agreement import run_everywhere

LOCK_FILE = ".calm_dist.lock"
UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}

log = logging.getLogger(__name__)
_held: dict[Path, int] = {}  # directory -> open descriptor: closing it would drop the lock, so none is closed


class DirectoryInUse(ConfigError):
    """Another live process holds the directory's lock."""


def holder() -> dict:
    """Who holds a lock: enough for a user to find the job that has the directory."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        job = f", Slurm job {h['slurm_job_id']}" if h.get("slurm_job_id") else ""
        return f"host {h['host']}, pid {h['pid']}{job}, since {h['since']}"
    except (ValueError, KeyError, TypeError):  # the holder took the lock and has not written itself yet
        return "a process that has not recorded itself yet"


def lock_directory(directory: str | Path, key: str) -> None:
    """Hold `directory`'s lock until this process exits (again in the same process: nothing to do).
    DirectoryInUse names the holder; a refused call changes nothing on disk."""
    directory = Path(directory).resolve()  # one key per directory, however a config spells it
    if directory in _held:
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # an existing file is opened unchanged
    except OSError as e:
        raise ConfigError(f"{key}={directory}: cannot open its lock file {path} ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 4096, 0).decode(errors="replace")
        os.close(fd)
        raise DirectoryInUse(f"{key}={directory} is in use by another job ({describe_holder(text)}; lock file "
                             f"{path}): wait for it to end, or choose another directory") from None
    except OSError as e:
        os.close(fd)
        if e.errno not in UNSUPPORTED:
            raise ConfigError(f"{key}={directory}: cannot lock {path} ({e.strerror})") from None
        log.warning("%s=%s: the filesystem cannot lock %s (%s): a second job on this directory is not refused",
                    key, directory, path, e.strerror)
        return
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder()) + "\n").encode(), 0)
    _held[directory] = fd


def lock_for_job(directory: str | Path, key: str, is_main: bool, device="cpu") -> None:
    """Global rank 0 locks `directory`; every rank raises when it could not (collective: every rank calls it).
    Any failure reaches the agreement, or the other ranks would wait for the timeout."""
    agreed = run_everywhere(partial(lock_directory, directory, key) if is_main else None, device)
    agreed.raise_failure(DirectoryInUse)
