"""Spawn N ranks of a Python command on this machine (loopback rendezvous), as torchrun would."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from calm_dist.training.dist_env import free_port

REPO = Path(__file__).resolve().parents[2]


def base_env(**extra) -> dict:
    """This environment for a rank or a job: DeepSpeed on the CPU, one thread, the repository importable, no
    injected fault; `extra` on top."""
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}{os.pathsep}{env.get('PYTHONPATH', '')}")
    env.pop("CALM_DIST_FAULT", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


@dataclass
class RankResult:
    rank: int
    returncode: int
    output: str
    exited_at: float  # time.monotonic() when the launcher saw it exit


class Ranks:
    """Running ranks: poll, signal, wait. `kill_peers`: stop the others once one fails, as torchrun does."""

    def __init__(self, args: list[str], world: int = 2, cwd=REPO, env: dict | None = None,
                 rank_env: dict[int, dict] | None = None):
        port = free_port()
        self.procs, self.logs = [], []
        for rank in range(world):
            layout = dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world, LOCAL_WORLD_SIZE=world, LOCAL_SIZE=world,
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            e = base_env(**{**layout, **(env or {}), **(rank_env or {}).get(rank, {})})  # rank_env may change the layout
            log = tempfile.TemporaryFile("w+")
            self.logs.append(log)
            self.procs.append(subprocess.Popen([sys.executable, *args], cwd=cwd, env=e, stdout=log,
                                               stderr=subprocess.STDOUT))
        self.exited_at: dict[int, float] = {}

    def poll(self) -> None:
        for rank, p in enumerate(self.procs):
            if p.poll() is not None and rank not in self.exited_at:
                self.exited_at[rank] = time.monotonic()

    def wait(self, timeout: float = 300, kill_peers: bool = True) -> list[RankResult]:
        deadline = time.monotonic() + timeout
        try:
            while True:
                self.poll()
                if len(self.exited_at) == len(self.procs) or time.monotonic() > deadline:
                    break
                if kill_peers and any(p.returncode not in (None, 0) for p in self.procs):
                    time.sleep(2)  # let a failing rank's peers report, then stop them
                    break
                time.sleep(0.1)
        finally:
            for p in self.procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
            self.poll()
        results = []
        for rank, (p, log) in enumerate(zip(self.procs, self.logs)):
            log.seek(0)
            results.append(RankResult(rank, p.returncode, log.read(), self.exited_at.get(rank, float("inf"))))
            log.close()
        return results


def describe(results: list[RankResult]) -> str:
    return "\n".join(f"--- rank {r.rank} exited {r.returncode}:\n{r.output[-4000:]}" for r in results)


def run_ranks(args: list[str], world: int = 2, timeout: float = 300, cwd=REPO, env: dict | None = None,
              check: bool = True) -> list[RankResult]:
    """Run `python args...` as `world` ranks; when one fails the others are killed (as torchrun does)."""
    results = Ranks(args, world, cwd, env).wait(timeout)
    if check and any(r.returncode != 0 for r in results):
        raise AssertionError(describe(results))
    return results
