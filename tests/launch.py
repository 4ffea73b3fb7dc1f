"""Spawn N ranks of a Python command on this machine (loopback rendezvous), as torchrun would."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}{os.pathsep}{env.get('PYTHONPATH', '')}")
    env.update({k: str(v) for k, v in extra.items()})
    return env


@dataclass
class RankResult:
    rank: int
    returncode: int
    output: str


def run_ranks(args: list[str], world: int = 2, timeout: float = 300, cwd=REPO, env: dict | None = None,
              check: bool = True) -> list[RankResult]:
    """Run `python args...` as `world` ranks; when one fails the others are killed (as torchrun does)."""
    port = free_port()
    procs, logs = [], []
    for rank in range(world):
        rank_env = base_env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world, LOCAL_WORLD_SIZE=world, LOCAL_SIZE=world,
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **(env or {}))
        log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"calm_rank{rank}_{port}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, *args], cwd=cwd, env=rank_env, stdout=log,
                                      stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
        if any(p.poll() not in (None, 0) for p in procs):
            time.sleep(2)  # let a failing rank's peers report, then stop them
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    results = []
    for rank, (p, log) in enumerate(zip(procs, logs)):
        log.seek(0)
        results.append(RankResult(rank, p.returncode, log.read()))
        log.close()
        os.unlink(log.name)
    if check and any(r.returncode != 0 for r in results):
        raise AssertionError("\n".join(f"--- rank {r.rank} exited {r.returncode}:\n{r.output[-4000:]}" for r in results))
    return results
