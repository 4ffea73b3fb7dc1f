"""One job per output or cache directory (calm_dist/training/locks.py): real processes holding real flocks.

A second job is refused with one line naming the holder, exit 2 on every rank, nothing in the directory
touched; once the holder is gone (SIGKILL: its lock file stays behind), the next job goes through.
"""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from calm_dist.config import ConfigError
from calm_dist.training.locks import LOCK_FILE, DirectoryInUse, lock_directory

from tests.helpers.launch import REPO, Ranks, base_env, describe, run_ranks
from tests.helpers.tiny import tiny_setup

HOLD = ("import sys; from calm_dist.training.locks import lock_directory\n"
        "for d in sys.argv[1:]: lock_directory(d, 'held by the test')\n"
        "print('held', flush=True); sys.stdin.read()")
SLURM_JOB_ID = "4242"


def hold(*directories: Path) -> subprocess.Popen:
    """Another job's rank 0: a process that holds the directories' locks until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, *map(str, directories)], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=base_env(SLURM_JOB_ID=SLURM_JOB_ID))
    assert proc.stdout.readline().strip() == "held"
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)  # no clean-up of any kind: the lock file stays
    proc.wait()


def snapshot(*directories: Path) -> dict:
    """Every path under the directories with its bytes and modification time."""
    return {p: (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for d in directories for p in [d, *d.rglob("*")]}


def names_holder(line: str, holder: subprocess.Popen) -> bool:
    return ("in use by another job" in line and f"host {socket.gethostname()}, pid {holder.pid}, Slurm job "
            f"{SLURM_JOB_ID}" in line)


def test_a_held_directory_is_refused_naming_the_holder_and_a_dead_holders_file_is_no_lock(tmp_path):
    directory = tmp_path / "out"
    holder = hold(directory)
    try:
        before = snapshot(directory)
        with pytest.raises(DirectoryInUse) as refused:
            lock_directory(directory, "train.output_dir")
        assert isinstance(refused.value, ConfigError)  # one line, exit 2
        message = str(refused.value)
        assert names_holder(message, holder) and str(directory) in message and "\n" not in message, message
        assert snapshot(directory) == before
    finally:
        kill(holder)
    assert (directory / LOCK_FILE).is_file()  # what the dead holder left: not a lock
    lock_directory(directory, "train.output_dir")
    assert json.loads((directory / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock_directory(directory, "train.output_dir")  # this process holds it already: nothing to do


@pytest.mark.slow
def test_train_and_cache_jobs_on_held_directories_exit_2_on_every_rank_and_go_through_once_it_is_gone(tmp_path):
    tiny = tiny_setup(tmp_path / "tiny", n_train=32, n_eval=8)
    out, cache = tmp_path / "run", tmp_path / "cache"
    items = {"model.anchor": tiny / "anchor", "model.augmenting": f"[{tiny / 'augmenting'}]",
             "data.train": tiny / "train.jsonl", "data.eval": "null", "data.tokenizer": tiny / "tokenizer.model",
             "data.cache_dir": tiny / "data_cache", "train.output_dir": out, "train.states_cache_dir": cache,
             "train.steps": 2, "train.micro_batch_size": 4,
             "train.global_batch_size": 8, "train.checkpoint_every": 0, "tracking.enabled": "false"}
    config = ["--config", str(REPO / "recipes" / "tiny.yaml"), *[f"{k}={v}" for k, v in items.items()]]
    train = [str(REPO / "calm_dist" / "train.py"), *config]
    cache_job = ["-m", "calm_dist.cli", "cache", "--rows-per-shard", "8", *config]

    holder = hold(out, cache)
    try:
        for directory in (out, cache):
            (directory / "keep.txt").write_text("the holder's data")
        before = snapshot(out, cache)
        for argv, prefix in ((train, "calm_dist:"), (cache_job, "calm-dist:")):
            results = Ranks(argv).wait(timeout=300, kill_peers=False)
            assert [r.returncode for r in results] == [2, 2], describe(results)  # every rank, by itself
            for r in results:
                lines = [line for line in r.output.splitlines() if line.startswith(prefix)]
                assert len(lines) == 1 and names_holder(lines[0], holder), describe(results)
        assert snapshot(out, cache) == before  # nothing touched
    finally:
        kill(holder)

    run_ranks(cache_job, world=1)
    run_ranks(train, world=1)
    assert (out / "final" / "composition.safetensors").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_2"
    for directory in (out, cache):
        assert json.loads((directory / LOCK_FILE).read_text())["pid"] != holder.pid  # the jobs took it over
