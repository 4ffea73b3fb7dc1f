"""Rank 0 does a step alone; the other ranks wait for its result for as long as rank 0 is alive and working.

Some steps run on global rank 0 only and leave their result where every rank reads it: tokenizing the data,
writing the random augmenting models. Their length grows with the
corpus or the model, so no fixed bound fits them: a barrier gives up after `distributed.timeout_s`, and a job
whose data takes longer than that to tokenize would fail on every retry. So the other ranks never wait in a
collective here; they watch a status file that rank 0 keeps fresh while it works (a heartbeat), and give up only
when rank 0 reports a failure or falls silent.

Contract of `run_on_rank_zero(what, is_rank_zero, work, done, status_file, silence_s)`:
- Every rank calls it with the same arguments except `is_rank_zero`; `status_file` and the result lie on a
  filesystem every rank sees (a shared one across nodes). No collective runs: it needs no process group.
- `work()` runs on rank 0 only and publishes its result atomically (written aside, then renamed), so `done()`
  holds only for a complete result. `done()` is cheap (a stat). A result already there is reused: when
  `done()` holds at the start, nobody works and nobody waits.
- While `work()` runs, a thread of rank 0 rewrites `status_file` (atomically) every few seconds with a new beat
  number; at the end rank 0 records "done", or "failed" with its error's message, and re-raises the error.
- The other ranks poll `done()` and `status_file` with backoff (0.1 s growing to 2 s: at 64 ranks about 60
  small metadata reads a second on the filesystem, nothing busy). They return once `done()` holds, and raise
  RankZeroFailed (a ConfigError: one line, exit 2) when rank 0 records a failure, or when `status_file` has not
  changed for `silence_s` seconds: rank 0 died, never started the step, or finished but its result stays
  invisible here. The message says which, and for how long rank 0 has been silent.
- A status written before this wait began may be an earlier attempt's. Its failure is believed once rank 0 has
  been seen beating during this wait (or once `silence_s` has passed without a new attempt), except a
  ConfigError, which depends only on the inputs: `status_file`'s name must identify them (a fingerprint), so an
  earlier attempt's ConfigError is this attempt's too, and is reported at once.
- Rank 0 alive but hung with its heartbeat thread still running keeps the others waiting: only a step that
  reports progress could tell that apart from slow work.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable

from calm_dist.config import ConfigError
from calm_dist.files import write_atomic
from calm_dist.faults import maybe_stall

BEAT_S = 5.0  # rank 0's heartbeat period, shortened to a quarter of a smaller silence bound
FIRST_POLL_S, MAX_POLL_S = 0.1, 2.0


class RankZeroFailed(ConfigError):
    """Rank 0 reported a failure in its step, or fell silent: every other rank stops with this one line."""


def run_on_rank_zero(what: str, is_rank_zero: bool, work: Callable[[], None], done: Callable[[], bool],
                     status_file: str | Path, silence_s: float) -> None:
    """Rank 0 runs `work` under a heartbeat; the others wait for `done()` (the module's docstring: the contract).
    `what` names the step in messages ("tokenizing data/train.jsonl")."""
    status_file = Path(status_file)
    if done():
        return
    if is_rank_zero:
        _work_with_heartbeat(what, work, status_file, beat_s=min(BEAT_S, max(0.25, silence_s / 4)))
    else:
        _wait_for_rank_zero(what, done, status_file, silence_s)


def _work_with_heartbeat(what: str, work: Callable[[], None], status_file: Path, beat_s: float) -> None:
    status_file.parent.mkdir(parents=True, exist_ok=True)
    status = {"what": what, "state": "working", "beat": 0, "host": socket.gethostname(), "pid": os.getpid()}
    _write_status(status_file, status)
    stop = threading.Event()
    beating = threading.Thread(target=_beat, args=(status_file, status, beat_s, stop), daemon=True,
                               name="rank-zero-heartbeat")
    beating.start()
    try:
        maybe_stall("stall_rank_zero")
        work()
    except BaseException as e:
        _finish(stop, beating, status_file, {**status, "state": "failed", "message": _describe(e),
                                             "lasting": isinstance(e, ConfigError)})
        raise
    _finish(stop, beating, status_file, {**status, "state": "done"})


def _beat(status_file: Path, status: dict, beat_s: float, stop: threading.Event) -> None:
    beat = 0
    while not stop.wait(beat_s):
        beat += 1
        try:
            _write_status(status_file, {**status, "beat": beat})
        except OSError:  # a filesystem hiccup: the next beat tries again; the waiters tolerate silence_s
            pass


def _finish(stop: threading.Event, beating: threading.Thread, status_file: Path, final: dict) -> None:
    stop.set()
    beating.join()  # no beat may overwrite the final status
    try:
        _write_status(status_file, final)
    except OSError:  # rank 0's own outcome stands; the waiters see done(), or a silent rank 0
        pass


def _describe(error: BaseException) -> str:
    if isinstance(error, ConfigError):
        return str(error)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _write_status(path: Path, status: dict) -> None:
    """Readers on any node see the old status or the new one, never a part. Not synced: a beat every few
    seconds must stay cheap, and a status lost in a crash reads as silence, which the waiters handle."""
    write_atomic(path, json.dumps({**status, "time": time.time()}), fsync=False)


def _read_status(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:  # absent, or replaced while being opened (ESTALE on NFS): no news this poll
        return None


def _wait_for_rank_zero(what: str, done: Callable[[], bool], status_file: Path, silence_s: float) -> None:
    seen = _read_status(status_file)
    changed_at = time.monotonic()  # silence is timed on this rank's clock: node clocks may disagree
    seen_beating, poll = False, FIRST_POLL_S
    while not done():
        latest = _read_status(status_file)
        if latest is not None and latest != seen:
            seen, changed_at, seen_beating = latest, time.monotonic(), True
        status = _parse(seen)
        if status.get("state") == "failed" and (seen_beating or status.get("lasting")):
            raise RankZeroFailed(_failure_message(what, status))
        silent_s = time.monotonic() - changed_at
        if silent_s >= silence_s:
            raise RankZeroFailed(_silence_message(what, status_file, status, silent_s))
        time.sleep(min(poll, max(0.0, silence_s - silent_s)))
        poll = min(MAX_POLL_S, poll * 1.5)


def _parse(raw: bytes | None) -> dict:
    if raw is None:
        return {}
    try:
        status = json.loads(raw)
    except ValueError:
        return {}
    return status if isinstance(status, dict) else {}


def _failure_message(what: str, status: dict) -> str:
    # A ConfigError reads the same on every rank, as if each had found it.
    return status["message"] if status.get("lasting") else f"rank 0 failed {what}: {status.get('message')}"


def _silence_message(what: str, status_file: Path, status: dict, silent_s: float) -> str:
    state = status.get("state")
    if state == "failed":
        return _failure_message(what, status)
    if state == "done":
        return (f"rank 0 finished {what}, but its result is still not visible on this rank {silent_s:.0f} s later "
                f"(status {status_file})")
    if state is None:
        return (f"rank 0 has not started {what}: no heartbeat at {status_file} after {silent_s:.0f} s "
                "(it failed or stopped before this step)")
    return (f"rank 0 stopped {what}: its heartbeat {status_file} (beat {status.get('beat')}, {status.get('host')} "
            f"pid {status.get('pid')}) last changed {silent_s:.0f} s ago; it died or cannot write there")
