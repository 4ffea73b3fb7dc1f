"""Fault injection for the reliability tests: `CALM_DIST_FAULT=<point>:<step>[:<rank>]`.

Points: `kill_in_checkpoint` (SIGKILL this process after its checkpoint files are written, before the
checkpoint is published), `kill_after_step` (SIGKILL at the end of a step). Unset in normal runs.
"""
from __future__ import annotations

import os
import signal


def maybe_fail(point: str, step: int, rank: int) -> None:
    spec = os.environ.get("CALM_DIST_FAULT")
    if not spec:
        return
    name, at_step, *at_rank = spec.split(":")
    if name == point and int(at_step) == step and int(at_rank[0] if at_rank else 0) == rank:
        os.kill(os.getpid(), signal.SIGKILL)
