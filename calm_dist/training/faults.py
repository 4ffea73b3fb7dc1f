"""Fault injection for the reliability tests: `CALM_DIST_FAULT=<point>:<step>[:<rank>]`.

Points: `kill_in_checkpoint` (SIGKILL this process after its checkpoint files are written, before the
checkpoint is published), `kill_after_step` (SIGKILL at the end of a step), `raise_in_checkpoint` (raise a
RuntimeError, not an OSError, while this rank writes its checkpoint files). Unset in normal runs.
`CALM_DIST_FAULT=stall_rank_zero:<seconds>` makes every rank-0-only step (calm_dist/training/rank_zero.py) sleep that
long first: a step outlasting `distributed.timeout_s`.
"""
from __future__ import annotations

import os
import signal
import time


def maybe_fail(point: str, step: int, rank: int) -> None:
    spec = os.environ.get("CALM_DIST_FAULT")
    if not spec:
        return
    name, at_step, *at_rank = spec.split(":")
    if name == point and int(at_step) == step and int(at_rank[0] if at_rank else 0) == rank:
        if point.startswith("raise_"):
            raise RuntimeError(f"injected fault {spec} on rank {rank}")
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_stall(point: str) -> None:
    """Sleep when `CALM_DIST_FAULT=<point>:<seconds>` names this point."""
    spec = os.environ.get("CALM_DIST_FAULT")
    if spec and spec.split(":")[0] == point:
        time.sleep(float(spec.split(":")[1]))
