"""Fault injection for the reliability tests; unset in normal runs.

Two sources name the faults, and `Faults.at(point, step)` serves both, so the trainer calls one thing per point:
- `CALM_DIST_FAULT=<point>:<step>[:<rank>]` (rank 0 when omitted). Points: `kill_in_checkpoint` (SIGKILL this
  process after its checkpoint files are written, before the checkpoint is published), `kill_after_step`
  (SIGKILL at the end of a step), `raise_in_checkpoint` (raise a RuntimeError, not an OSError, while this rank
  writes its checkpoint files), `raise_in_step` (raise before the step's first micro-batch). A point named
  `raise_*` raises, any other kills.
- `train.fail_at_step=K` (the config, so a Slurm test can set it on the command line): rank 1 (rank 0 alone in
  a single process) raises at the `raise_in_step` point of step K.
`CALM_DIST_FAULT=stall_rank_zero:<seconds>` makes every rank-0-only step (calm_dist/rank_zero.py) sleep
that long first: a step outlasting `distributed.timeout_s`.
"""
from __future__ import annotations

import os
import signal
import time

ENV = "CALM_DIST_FAULT"


class Faults:
    """The faults this rank injects."""

    def __init__(self, rank: int, world_size: int, fail_at_step: int | None = None, spec: str | None = None):
        self.rank, self.fail_at_step = rank, fail_at_step
        self.fail_at_rank = min(1, world_size - 1)
        self.spec = os.environ.get(ENV) if spec is None else spec

    def at(self, point: str, step: int) -> None:
        """Raise or kill this process when a fault names `point` at `step` on this rank."""
        if point == "raise_in_step" and self.fail_at_step == step and self.rank == self.fail_at_rank:
            raise RuntimeError(f"train.fail_at_step={step}: injected failure on rank {self.rank}")
        if not self.spec:
            return
        name, at_step, *at_rank = self.spec.split(":")
        if name == point and int(at_step) == step and int(at_rank[0] if at_rank else 0) == self.rank:
            if point.startswith("raise_"):
                raise RuntimeError(f"injected fault {self.spec} on rank {self.rank}")
            os.kill(os.getpid(), signal.SIGKILL)


def maybe_stall(point: str) -> None:
    """Sleep when `CALM_DIST_FAULT=<point>:<seconds>` names this point."""
    spec = os.environ.get(ENV)
    if spec and spec.split(":")[0] == point:
        time.sleep(float(spec.split(":")[1]))
