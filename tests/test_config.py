"""The config tree: YAML + overrides, types, and the up-front refusals (one line, exit code 2)."""
import subprocess
import sys

import pytest

from calm_dist.config import Config, ConfigError, flatten, load_config
from launch import REPO, base_env


def test_defaults_overrides_and_types(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  steps: 5\noptim:\n  lr: 1e-3\n")
    cfg = load_config(recipe, ["train.steps=7", "model.layer_pairs=[[[0, 1]]]", "optim.betas=[0.8, 0.9]",
                               "train.resume=null", "tracking.tags={team: x}"])
    assert isinstance(cfg, Config)
    assert cfg.train.steps == 7 and cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.model.layer_pairs == [[[0, 1]]] and cfg.optim.betas == [0.8, 0.9]
    assert cfg.tracking.tags == {"team": "x"}
    assert flatten(cfg.to_dict())["train.steps"] == 7
    assert load_config(None, []).to_dict() == Config().to_dict()


@pytest.mark.parametrize("override,message", [
    (["train.stepz=3"], "unknown key train.stepz"),
    (["bogus.x=1"], "unknown key bogus"),
    (["train.steps=abc"], "train.steps: expected an integer, got 'abc'"),
    (["train.precision=fp8"], "train.precision: expected one of 'fp32', 'bf16'"),
    (["optim.lr=fast"], "optim.lr: expected a number"),
    (["train.steps"], "is not key=value"),
])
def test_bad_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny import tiny_setup

    return tiny_setup(tmp_path_factory.mktemp("tiny"), n_train=32, n_eval=8)


def run_train(tiny, tmp_path, *extra, world=1):
    out = tmp_path / "out"
    base = [f"model.anchor={tiny / 'anchor'}", f"model.augmenting=[{tiny / 'augmenting'}]",
            f"data.train={tiny / 'train.jsonl'}", f"data.eval={tiny / 'eval.jsonl'}",
            f"data.tokenizer={tiny / 'tokenizer.model'}",
            f"train.output_dir={out}", "tracking.enabled=false"]
    env = base_env(RANK=0, WORLD_SIZE=world, LOCAL_RANK=0)
    proc = subprocess.run([sys.executable, str(REPO / "calm_dist" / "train.py"), "--config",
                           str(REPO / "recipes" / "tiny.yaml"), *base, *extra],
                          env=env, capture_output=True, text=True, timeout=120)
    return proc, out


@pytest.mark.parametrize("extra,world,message", [
    (["model.anchor=/nonexistent/anchor"], 1, "model.anchor: /nonexistent/anchor does not exist"),
    (["data.train=/nonexistent/train.jsonl"], 1, "data.train: /nonexistent/train.jsonl does not exist"),
    (["model.layer_pairs=[[[1,9]]]"], 1, "anchor layer 9 is out of range"),
    (["model.layer_pairs=[[[7,1]]]"], 1, "augmenting layer 7 is out of range"),
    (["train.micro_batch_size=4", "train.global_batch_size=12"], 2,
     "global_batch_size=12 is not a multiple of micro_batch_size x world size = 4 x 2"),
    (["train.sptes=3"], 1, "unknown key train.sptes"),
    (["distributed.deepspeed_config=/nonexistent.json"], 1, "/nonexistent.json does not exist"),
    (["train.resume=/nonexistent/step_3"], 1, "not a checkpoint directory"),
    (["train.compile=true", "distributed.zero3_leaf_blocks=false"], 1, "train.compile needs distributed.zero3_leaf"),
])
def test_config_errors_exit_2_with_one_line_before_loading_models(tiny, tmp_path, extra, world, message):
    proc, out = run_train(tiny, tmp_path, *extra, world=world)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("calm_dist:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert not out.exists()  # nothing heavy ran, nothing was written
