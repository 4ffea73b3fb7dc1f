"""Publishing a checkpoint: a crash between any two of its steps leaves `latest` resolving to an intact
checkpoint, each rank syncs its own files, and an error of any kind on one rank stops every rank at once.

The unit tests stage checkpoints as two ranks would (each rank's files and its part of the index) and
crash publish() by making the n-th rename, replace or delete raise; a delete that crashes has removed one
file first. The last test is a real 2-rank run whose rank 1 raises a RuntimeError while writing.
"""
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

import calm_dist.training.checkpoint as ckpt
from calm_dist.files import write_file

from tests.helpers.launch import REPO, Ranks, describe
from tests.helpers.tiny import tiny_setup

WORLD = 2


def stage(out: Path, step: int, marker: float) -> None:
    """step_N.tmp as `WORLD` ranks leave it before publish; every tensor holds `marker`."""
    staged = ckpt.staging_dir(out, step)
    ckpt.new_staging_dir(staged)
    for rank in range(WORLD):
        hashes = ckpt.save_state({"exp_avg": torch.full((4,), marker)}, staged, f"optimizer.rank{rank}")
        if rank == 0:
            state = {"step": step, "world_size": WORLD, "scheduler": {}, "data_fingerprint": "f", "marker": marker}
            hashes["trainer_state.json"] = write_file(staged / "trainer_state.json", json.dumps(state))
            hashes["config.yaml"] = write_file(staged / "config.yaml", "train: {}\n")
        ckpt.write_index_part(staged, rank, hashes)


def resume_point(out: Path) -> Path:
    """The checkpoint a 2-rank resume would start from, after every check that resume makes."""
    directory = ckpt.resume_candidates("auto", out)[0]
    assert ckpt.latest_checkpoint(out) == directory
    ckpt.read_checkpoint_state(directory)
    for rank in range(WORLD):
        ckpt.verify_rank_share(directory, rank, WORLD)
    return directory


def resumed_marker(out: Path) -> float:
    """The marker of resume_point's checkpoint, the same in every file of it."""
    directory = resume_point(out)
    marker = ckpt.read_trainer_state(directory)["marker"]
    for rank in range(WORLD):
        assert (ckpt.load_state(directory, f"optimizer.rank{rank}")["exp_avg"] == marker).all()
    return marker


class CrashAt:
    """Count the filesystem changes publish() makes (Path.rename, os.replace, shutil.rmtree); the n-th raises,
    as a crash right before it would leave the disk. A crashing rmtree removes one file first."""

    def __init__(self, monkeypatch, n: int | None):
        self.n, self.calls = n, []
        real_rename, real_replace, real_rmtree = Path.rename, os.replace, shutil.rmtree

        def counted(name, real, partial=None):
            def op(*args, **kwargs):
                self.calls.append(f"{name}({', '.join(Path(a).name for a in args[:2])})")
                if len(self.calls) == self.n:
                    if partial:
                        partial(args[0])
                    raise OSError(f"crash before {self.calls[-1]}")
                return real(*args, **kwargs)
            return op

        def remove_one_file(directory):
            next(p for p in sorted(Path(directory).rglob("*")) if p.is_file()).unlink()

        monkeypatch.setattr(Path, "rename", counted("rename", real_rename))
        monkeypatch.setattr(os, "replace", counted("replace", real_replace))
        monkeypatch.setattr(shutil, "rmtree", counted("rmtree", real_rmtree, partial=remove_one_file))


SCENARIOS = {  # name: (the step published, keep_last): before it, step_2 (marker 2) and step_4 (marker 4, latest)
    "step 4 saved again": (4, 3),
    "a new step that prunes step 2": (6, 2),
}


def two_checkpoints(out: Path) -> None:
    for step in (2, 4):
        stage(out, step, marker=float(step))
        ckpt.publish(out, step, keep_last=3)


def leftovers(out: Path) -> list[str]:
    root = ckpt.checkpoints_dir(out)
    return sorted(p.name for p in root.iterdir() if p.name.endswith((".tmp", ".replaced")))


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("recovery", ["step 4 saved again", "step 8"])
def test_a_crash_between_any_two_steps_of_publish_leaves_latest_intact(tmp_path, monkeypatch, scenario, recovery):
    step, keep_last = SCENARIOS[scenario]
    with monkeypatch.context() as m:  # a clean publish, to count its filesystem changes
        two_checkpoints(tmp_path / "count")
        stage(tmp_path / "count", step, marker=100.0)
        ops = CrashAt(m, None)
        ckpt.publish(tmp_path / "count", step, keep_last)
    assert len(ops.calls) >= 3, ops.calls
    problems = []
    for n in range(1, len(ops.calls) + 1):
        out = tmp_path / f"crash{n}"
        two_checkpoints(out)
        stage(out, step, marker=100.0)
        with monkeypatch.context() as m:
            crash = CrashAt(m, n)
            with pytest.raises(OSError, match="crash before"):
                ckpt.publish(out, step, keep_last)
        try:
            marker = resumed_marker(out)  # the old latest or the new checkpoint, whole, never a damaged one
            assert marker in (4.0, 100.0), marker
            again = 4 if recovery == "step 4 saved again" else 8
            stage(out, again, marker=200.0)  # what the resumed run saves next
            ckpt.publish(out, again, keep_last)
            assert resumed_marker(out) == 200.0
            assert not leftovers(out), leftovers(out)  # the later publish cleaned what the crash left
        except Exception as e:
            problems.append(f"crash before {crash.calls[-1]} (change {n} of {ops.calls}): {type(e).__name__}: {e}")
    assert not problems, "\n".join(problems)


def test_saving_the_latest_step_again_replaces_it(tmp_path):
    two_checkpoints(tmp_path)
    stage(tmp_path, 4, marker=100.0)
    ckpt.publish(tmp_path, 4, keep_last=3)
    assert resumed_marker(tmp_path) == 100.0 and not leftovers(tmp_path)
    assert sorted(p.name for p in ckpt.checkpoints_dir(tmp_path).iterdir()) == ["latest", "step_2", "step_4"]


def test_each_rank_syncs_its_own_files_and_publish_syncs_none_of_them(tmp_path, monkeypatch):
    """At 64 ranks, rank 0 syncing every shard would be rank-0 work inside a collective timeout."""
    synced: list[Path] = []  # the files synced, not directories
    real_fsync = os.fsync

    def recording_fsync(fd):
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    staged = ckpt.staging_dir(tmp_path, 2)
    ckpt.new_staging_dir(staged)
    hashes = ckpt.save_state({"exp_avg": torch.ones(4)}, staged, "optimizer.rank1")
    synced.clear()
    ckpt.write_index_part(staged, 1, hashes)  # what rank 1 does before the agreement
    assert sorted(p.name for p in synced) == ["checksums.rank1.json", "optimizer.rank1.json",
                                              "optimizer.rank1.safetensors"]

    hashes = ckpt.save_state({"exp_avg": torch.ones(4)}, staged, "optimizer.rank0")
    state = {"step": 2, "world_size": WORLD, "scheduler": {}, "data_fingerprint": "f"}
    hashes["trainer_state.json"] = write_file(staged / "trainer_state.json", json.dumps(state))
    ckpt.write_index_part(staged, 0, hashes)
    synced.clear()
    ckpt.publish(tmp_path, 2, keep_last=1)
    files = sorted(p.name for p in synced)
    assert files == [f".{ckpt.LATEST}.tmp", ckpt.INDEX], files  # the pointer and the index it writes; no shard


@pytest.mark.slow
def test_a_runtime_error_on_rank_1_while_checkpointing_stops_both_ranks_and_rank_0_names_it(tmp_path):
    """Not an OSError: rank 1 raises its own error, rank 0 a CheckpointError naming it, both by themselves
    (distributed.timeout_s=600: a rank left waiting in a collective would outlive the harness' 300 s)."""
    tiny = tiny_setup(tmp_path / "tiny", n_train=32, n_eval=8)
    out = tmp_path / "run"
    items = {"model.anchor": tiny / "anchor", "model.augmenting": f"[{tiny / 'augmenting'}]",
             "data.train": tiny / "train.jsonl", "data.eval": "null", "data.tokenizer": tiny / "tokenizer.model",
             "data.cache_dir": tiny / "data_cache", "train.output_dir": out, "train.steps": 4,
             "train.micro_batch_size": 4, "train.global_batch_size": 8, "train.checkpoint_every": 2,
             "distributed.timeout_s": 600, "tracking.enabled": "false"}
    argv = [str(REPO / "calm_dist" / "train.py"), "--config", str(REPO / "recipes" / "tiny.yaml"),
            *[f"{k}={v}" for k, v in items.items()]]
    fault = "raise_in_checkpoint:4:1"
    results = Ranks(argv, env={"CALM_DIST_FAULT": fault}).wait(timeout=300, kill_peers=False)
    assert [r.returncode for r in results] == [1, 1], describe(results)  # each exited on its own
    assert f"RuntimeError: injected fault {fault} on rank 1" in results[1].output, describe(results)
    lines = [line for line in results[0].output.splitlines() if line.startswith("calm_dist:")]
    assert lines == [f"calm_dist: checkpoint error: writing checkpoint step_4 under {out} failed on rank 1: "
                     f"injected fault {fault} on rank 1; the last published checkpoint (step_2) is intact"
                     ], describe(results)
    assert resume_point(out).name == "step_2"
    assert sorted(p.name for p in ckpt.checkpoints_dir(out).iterdir()) == ["latest", "step_2"]  # step_4.tmp removed

