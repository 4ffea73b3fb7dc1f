"""Checkpoints carry checksums and a resume compares the config, on checkpoints written by a real 2-rank run.

Damage of every kind (a flipped bit, a truncated shard or trainer_state.json, a missing key, file or index)
is one DamagedCheckpoint line; a config that changes the run is refused naming the keys, unless they are
listed in train.resume_allow_changes. The 2-rank fall-back past a damaged shard is in test_reliability.py.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers as T

import calm_dist.training.checkpoint as ckpt
from calm_dist.config import ConfigError, load_config
from calm_dist.files import sha256_file
from calm_dist.train import main
from calm_dist.training.checkpoint import (INDEX, CheckpointError, DamagedCheckpoint, read_checkpoint_state,
                                           verify_rank_share)
from calm_dist.training.dist_env import DistEnv
from calm_dist.training.preflight import config_changes, preflight

from tests.helpers.launch import REPO, run_ranks
from tests.helpers.tiny import tiny_setup

TRAIN = str(REPO / "calm_dist" / "train.py")
RECIPE = str(REPO / "recipes" / "tiny.yaml")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("tiny"), n_train=64, n_eval=8)


@pytest.fixture(scope="module")
def written(tiny, tmp_path_factory) -> Path:
    """The output directory of a real 4-step, 2-rank run: checkpoints step_2 and step_4."""
    out = tmp_path_factory.mktemp("written") / "run"
    items = {"model.anchor": tiny / "anchor", "model.augmenting": f"[{tiny / 'augmenting'}]",
             "data.train": tiny / "train.jsonl", "data.eval": "null", "data.tokenizer": tiny / "tokenizer.model",
             "data.cache_dir": tiny / "data_cache", "train.output_dir": out, "train.steps": 4,
             "train.micro_batch_size": 4, "train.global_batch_size": 8, "train.checkpoint_every": 2,
             "tracking.enabled": "false"}
    run_ranks([TRAIN, "--config", RECIPE, *[f"{k}={v}" for k, v in items.items()]])
    return out


@pytest.fixture
def run_copy(written, tmp_path) -> Path:
    """A copy of the written run to damage; its config.yaml files still name the original output_dir."""
    copy = tmp_path / "run"
    shutil.copytree(written / "checkpoints", copy / "checkpoints")
    return copy


def flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def drop_world_size_and_reindex(step: Path) -> None:
    """trainer_state.json without world_size, the index updated to match (as another writer would leave it)."""
    state = json.loads((step / "trainer_state.json").read_text())
    del state["world_size"]
    (step / "trainer_state.json").write_text(json.dumps(state))
    index = json.loads((step / INDEX).read_text())
    index["files"]["trainer_state.json"] = sha256_file(step / "trainer_state.json")
    (step / INDEX).write_text(json.dumps(index))


def check(step: Path, rank: int) -> None:
    """What resuming checks on `rank` of 2: the small shared files, then its share of the rest."""
    read_checkpoint_state(step)
    verify_rank_share(step, rank, 2)


def test_the_index_lists_every_file_and_each_rank_hashes_only_its_share(written, monkeypatch):
    for step in ("step_2", "step_4"):
        directory = written / "checkpoints" / step
        index = ckpt.read_index(directory)
        assert sorted(index) == sorted(p.name for p in directory.iterdir() if p.name != ckpt.INDEX)  # no part left
        assert all(ckpt.sha256_file(directory / name) == sha for name, sha in index.items())
        assert {"optimizer.rank1.safetensors", "rng.rank1.json", "composition.safetensors"} <= index.keys()
    hashed: dict[int, list[str]] = {0: [], 1: []}
    real_sha256 = ckpt.sha256_file
    for rank in (0, 1):
        monkeypatch.setattr(ckpt, "sha256_file", lambda path, r=rank: hashed[r].append(path.name) or real_sha256(path))
        ckpt.verify_rank_share(written / "checkpoints" / "step_4", rank, 2)
    assert {n for n in hashed[0] if ".rank" in n} == {"optimizer.rank0.safetensors", "optimizer.rank0.json",
                                                     "rng.rank0.safetensors", "rng.rank0.json"}
    assert not set(hashed[0]) & set(hashed[1])  # a file is hashed by one rank only
    assert sorted(hashed[0] + hashed[1]) == sorted(n for n in index if n not in ckpt.SMALL_SHARED_FILES)


DAMAGE = {  # name: (damage done to step_4, the rank that finds it, words of the one line)
    "bit flip in an optimizer shard": (lambda s: flip_bit(s / "optimizer.rank1.safetensors", -9), 1,
                                       "optimizer.rank1.safetensors does not match its sha256"),
    "truncated optimizer shard": (lambda s: truncate(s / "optimizer.rank0.safetensors"), 0,
                                  "optimizer.rank0.safetensors does not match its sha256"),
    "truncated trainer_state.json": (lambda s: truncate(s / "trainer_state.json"), 0,
                                     "trainer_state.json does not match its sha256"),
    "missing world_size": (drop_world_size_and_reindex, 0, "trainer_state.json lacks world_size"),
    "missing file": (lambda s: (s / "rng.rank1.json").unlink(), 1, "rng.rank1.json is missing"),
    "missing index (written before checksums)": (lambda s: (s / "checksums.json").unlink(), 0,
                                                 "was written before checkpoints carried checksums"),
    "damaged index": (lambda s: truncate(s / "checksums.json"), 0, "checksums.json is damaged"),
}


@pytest.mark.parametrize("name", DAMAGE)
def test_damage_is_one_checkpoint_error_line(run_copy, name):
    damage, finder, words = DAMAGE[name]
    step = run_copy / "checkpoints" / "step_4"
    damage(step)
    with pytest.raises(DamagedCheckpoint) as caught:
        check(step, finder)
    message = str(caught.value)
    assert isinstance(caught.value, CheckpointError) and words in message and "\n" not in message
    check(run_copy / "checkpoints" / "step_2", finder)  # the previous checkpoint is untouched


def test_a_damaged_resume_path_exits_2_with_one_line(run_copy, tiny, monkeypatch, capsys):
    """Through train.py's error mapping: a damaged checkpoint is bad input, exit 2 before anything loads."""
    step = run_copy / "checkpoints" / "step_4"
    truncate(step / "trainer_state.json")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    code = main(["--config", str(step / "config.yaml"), f"train.resume={step}",
                 f"train.output_dir={run_copy.parent / 'elsewhere'}"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("calm_dist:")]
    assert code == 2 and len(lines) == 1 and "trainer_state.json does not match its sha256" in lines[0], lines


# ---- resume=auto: the candidates and their known problems ---------------------------------------------
def resolved_resume(run: Path, env_world: int = 2, **overrides):
    """preflight() of the written run's own config, resumed with `overrides`, as rank 0 of `env_world`."""
    step = run / "checkpoints" / "step_4"
    items = {"train.resume": "auto", "train.output_dir": run, **overrides}
    cfg = load_config(step / "config.yaml", [f"{k}={v}" for k, v in items.items()])
    return preflight(cfg, DistEnv(0, 0, env_world, env_world))


def test_auto_falls_back_past_damaged_shared_files_and_refuses_when_none_is_intact(run_copy):
    truncate(run_copy / "checkpoints" / "step_4" / "trainer_state.json")
    (latest, problem), (previous, none) = resolved_resume(run_copy).resume_candidates
    assert latest.name == "step_4" and "trainer_state.json does not match" in problem
    assert previous.name == "step_2" and none is None
    (run_copy / "checkpoints" / "step_2" / "checksums.json").unlink()
    with pytest.raises(DamagedCheckpoint, match="no intact checkpoint to resume .*step_4.*step_2"):
        resolved_resume(run_copy)


# ---- resume compares the config --------------------------------------------------------------------------
def other_data(tiny: Path, tmp: Path) -> Path:
    rows = (tiny / "train.jsonl").read_text().splitlines()
    path = tmp / "other_train.jsonl"
    path.write_text("\n".join(rows[::-1]) + "\n")  # the same rows in another order: another run
    return path


def other_anchor(tiny: Path, tmp: Path) -> Path:
    """A model of the anchor's shape with other weights."""
    path = tmp / "other_anchor"
    torch.manual_seed(123)
    T.AutoModelForCausalLM.from_config(T.AutoConfig.from_pretrained(tiny / "anchor")).save_pretrained(path)
    return path


def test_a_config_that_changes_the_run_is_refused_naming_each_key(written, tiny, tmp_path):
    changed = {"train.seed": 1, "optim.lr": 0.006, "train.micro_batch_size": 2, "train.global_batch_size": 16,
               "optim.weight_decay": 0.1, "train.steps": 8, "data.train": other_data(tiny, tmp_path),
               "model.anchor": other_anchor(tiny, tmp_path), "model.layer_pairs": "[[[1,2]]]"}
    for key, value in changed.items():
        with pytest.raises(ConfigError) as caught:
            resolved_resume(written, **{key: value})
        message = str(caught.value)
        assert f"in {key} (" in message and f"resume_allow_changes=[{key}]" in message and "\n" not in message
    both = r"optim\.lr .*; train\.seed .*resume_allow_changes=\[optim\.lr,train\.seed\]"
    with pytest.raises(ConfigError, match=both):
        resolved_resume(written, **{"optim.lr": 0.006, "train.seed": 1})
    with pytest.raises(ConfigError, match="written by 2 ranks; resume it with the same world size"):
        resolved_resume(written, env_world=1)


def test_allowed_and_never_compared_changes_resume(written, tiny, tmp_path):
    plan = resolved_resume(written, **{"optim.lr": 0.006, "train.seed": 1,
                                   "train.resume_allow_changes": "[optim.lr,train.seed]"})
    assert [(p.name, problem) for p, problem in plan.resume_candidates] == [("step_4", None), ("step_2", None)]
    moved = tmp_path / "moved_train.jsonl"  # the same bytes elsewhere: the same tokenized data
    shutil.copy(tiny / "train.jsonl", moved)
    harmless = {"train.log_every": 3, "train.checkpoint_every": 5, "train.keep_last": 4, "train.stop_after_step": 2,
                "tracking.enabled": "true", "tracking.experiment": "other", "distributed.timeout_s": 60,
                "train.activation_checkpointing": "true", "data.train": moved,
                "train.resume": written / "checkpoints" / "step_4", "train.output_dir": tmp_path / "elsewhere"}
    assert resolved_resume(written, **harmless).resume_candidates[0][1] is None
    with pytest.raises(ConfigError, match="train.resume_allow_changes: unknown key optim.lrr"):
        resolved_resume(written, **{"train.resume_allow_changes": "[optim.lrr]"})


def test_train_steps_is_compared_only_where_the_schedule_depends_on_it():
    saved = load_config(None, ["optim.schedule=constant", "train.steps=10"])
    assert config_changes(saved, load_config(None, ["optim.schedule=constant", "train.steps=20"]), "f", "f") == {}
    cosine = load_config(None, ["train.steps=10"])
    assert config_changes(cosine, load_config(None, ["train.steps=20"]), "f", "f") == {"train.steps": "10 -> 20"}
