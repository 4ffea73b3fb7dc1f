"""Rank-0-only steps (calm_dist/rank_zero.py): the other ranks wait as long as rank 0 works, not the collective
timeout, and stop with one line when rank 0 fails or dies. Real processes: plain ones for the helper, then a
2-rank ZeRO-3 training run whose rank-0 steps (tokenizing, writing the random augmenting model) outlast
distributed.timeout_s."""
import json
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from calm_dist.config import load_config
from calm_dist.data.prepare import load_rows
from calm_dist.data.tokenizer import Tokenizer
from calm_dist.model.io import load_causal_lm

from tests.helpers.launch import REPO, Ranks, describe
from tests.helpers.tiny import tiny_setup

WORKER = str(REPO / "tests" / "helpers" / "workers" / "rank_zero_worker.py")


def run_step(directory: Path, *, world: int = 3, silence_s: float, work_s: float, outcome: str = "ok",
             rank0_delay_s: float = 0.0):
    ranks = Ranks([WORKER, str(directory), str(silence_s), str(work_s), outcome, str(rank0_delay_s)], world=world)
    return ranks.wait(timeout=120, kill_peers=False)


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("calm_dist:")]


def test_a_step_far_longer_than_the_silence_bound_succeeds_on_every_rank(tmp_path):
    results = run_step(tmp_path, world=4, silence_s=1, work_s=5)
    assert [r.returncode for r in results] == [0] * 4, describe(results)
    assert all(f"rank {r.rank} read: written by rank 0" in r.output for r in results), describe(results)
    assert json.loads((tmp_path / "step.status").read_text())["state"] == "done"


@pytest.mark.parametrize("outcome, rank0_code, expected", [
    ("raise", 1, "calm_dist: error: rank 0 failed the test step: RuntimeError: the disk caught fire"),
    ("config_error", 2, "calm_dist: error: data row 7: field 'completion' is missing or not a string"),
])
def test_rank_zero_failing_stops_every_rank_with_its_message(tmp_path, outcome, rank0_code, expected):
    """A ConfigError reads the same on every rank; any other error keeps its traceback on rank 0, and the others
    name it in one line."""
    results = run_step(tmp_path, silence_s=30, work_s=2, outcome=outcome)
    assert [r.returncode for r in results] == [rank0_code, 2, 2], describe(results)
    assert all(error_lines(r) == [expected] for r in results[1:]), describe(results)
    if outcome == "raise":
        assert "RuntimeError: the disk caught fire" in results[0].output, describe(results)
    else:
        assert error_lines(results[0]) == [expected], describe(results)


def test_rank_zero_killed_in_the_step_stops_the_others_naming_its_stale_heartbeat(tmp_path):
    silence_s = 3
    ranks = Ranks([WORKER, str(tmp_path), str(silence_s), "600", "ok"], world=3)
    status = tmp_path / "step.status"
    while not (status.exists() and json.loads(status.read_text())["beat"] >= 1):  # rank 0 is beating
        assert ranks.procs[0].poll() is None, describe(ranks.wait(timeout=1, kill_peers=False))
        time.sleep(0.1)
    ranks.procs[0].send_signal(signal.SIGKILL)
    results = ranks.wait(timeout=60, kill_peers=False)  # a peer still waiting then is killed: returncode -9
    assert [r.returncode for r in results] == [-signal.SIGKILL, 2, 2], describe(results)
    for r in results[1:]:
        (line,) = error_lines(r)
        found = re.fullmatch(rf"calm_dist: error: rank 0 stopped the test step: its heartbeat {status} \(beat \d+, "
                             r".+ pid \d+\) last changed (\d+) s ago; it died or cannot write there", line)
        assert found and int(found[1]) >= silence_s, describe(results)


def test_an_earlier_attempts_failure_does_not_fail_a_retry(tmp_path):
    """A status left by a failed attempt (a full disk, say) is read by the waiting ranks before the new rank 0
    rewrites it: they wait to see this attempt's rank 0 at work, and the retry succeeds."""
    (tmp_path / "step.status").write_text(json.dumps({"what": "the test step", "state": "failed", "beat": 3,
                                                      "message": "OSError: no space left", "lasting": False}))
    results = run_step(tmp_path, silence_s=20, work_s=1, rank0_delay_s=3)
    assert [r.returncode for r in results] == [0, 0, 0], describe(results)


TRAIN = str(REPO / "calm_dist" / "train.py")
TIMEOUT_S = 10  # distributed.timeout_s of the run: every collective's bound
STALL_S = 16    # each rank-0 step takes at least this long


@pytest.mark.slow
def test_rank_zero_steps_of_a_training_run_outlast_the_collective_timeout(tmp_path):
    """Tokenizing (in validation) and writing the random augmenting model each take longer than
    distributed.timeout_s on rank 0; both ranks train and agree with the references."""
    setup, out = tiny_setup(tmp_path / "tiny", n_train=16, n_eval=4), tmp_path / "run"
    overrides = [f"{k}={v}" for k, v in {
        "model.anchor": setup / "anchor", "model.augmenting": f"[{setup / 'augmenting'}]",
        "model.augmenting_init": "random", "data.train": setup / "train.jsonl", "data.eval": "null",
        "data.tokenizer": setup / "tokenizer.model", "data.cache_dir": tmp_path / "data_cache",
        "train.output_dir": out, "train.steps": 2, "train.micro_batch_size": 4, "train.global_batch_size": 8,
        "train.checkpoint_every": 0, "tracking.enabled": "false", "distributed.timeout_s": TIMEOUT_S}.items()]
    recipe = REPO / "recipes" / "tiny.yaml"
    ranks = Ranks([TRAIN, "--config", str(recipe), *overrides], world=2,
                  env={"CALM_DIST_FAULT": f"stall_rank_zero:{STALL_S}"})
    results = ranks.wait(timeout=600)
    assert [r.returncode for r in results] == [0, 0], describe(results)
    assert "done: step 2" in results[0].output, describe(results)

    cfg = load_config(recipe, overrides)
    (status,) = (tmp_path / "data_cache").glob("prepare-*.status")
    assert json.loads(status.read_text())["state"] == "done"
    tokenizer = Tokenizer(cfg.data.tokenizer)
    written = load_rows(cfg.data, cfg.data.train, "data.train", tokenizer, tmp_path / "data_cache", is_writer=False)
    expected = load_rows(cfg.data, cfg.data.train, "data.train", tokenizer, tmp_path / "fresh_cache", workers=1)
    rows = list(range(len(expected)))
    assert len(written) == len(expected) and all(torch.equal(written.batch(rows)[k], v)
                                                 for k, v in expected.batch(rows).items())

    assert json.loads((out / "random_augmenting" / "0.status").read_text())["state"] == "done"
    torch.manual_seed(cfg.train.seed + 1)  # the seeded initialisation, built here from the config alone
    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(setup / "augmenting")).state_dict()
    model = load_causal_lm(str(out / "random_augmenting" / "0")).state_dict()
    assert model.keys() == reference.keys() and all(torch.equal(model[k], reference[k]) for k in reference)
