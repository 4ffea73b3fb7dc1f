"""The config tree: YAML + overrides, types, and the up-front refusals (one line, exit code 2)."""
import importlib.util
import subprocess
import sys
import types
import typing

import pytest

from calm_dist.config import Config, ConfigError, TrainConfig, flatten, load_config
from calm_dist.config_checks import literal_choices
from calm_dist.training.dist_env import DistEnv
from calm_dist.training.preflight import preflight
from tests.helpers.launch import REPO, base_env
from tests.helpers.tiny import tiny_setup


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


def numeric_keys() -> list[str]:
    """Every int or float field of the config tree (optional or not) as a dotted key, read from the dataclasses
    themselves, so a field added later is covered without editing this test. Lists of numbers (optim.betas,
    model.layer_pairs) have their own rows in test_reliability.py's table."""
    keys = []
    for section, cls in typing.get_type_hints(Config).items():
        for name, annotation in typing.get_type_hints(cls).items():
            optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
            kinds = set(typing.get_args(annotation)) - {type(None)} if optional else {annotation}
            if kinds <= {int, float}:
                keys.append(f"{section}.{name}")
    return keys


def test_every_numeric_field_is_range_checked():
    """No field of the tree takes -10^9 (each has a floor of 0 or above): each refusal names its key and value."""
    keys = numeric_keys()
    assert {"optim.min_lr_ratio", "train.seed", "distributed.timeout_s", "tracking.flush_budget_s"} <= set(keys)
    unchecked = []
    for key in keys:
        try:
            load_config(None, [f"{key}=-1000000000"])
            unchecked.append(key)
        except ConfigError as e:
            assert str(e).startswith(f"{key} must be") and "got -1000000000" in str(e), str(e)
    assert not unchecked, f"accepted -10^9: {unchecked}"


def test_every_choice_field_is_checked_however_the_section_is_built():
    """Each field annotated with Literal choices refuses another value, loaded or built in code, in one line
    naming the key and the choices."""
    keys = {f"{section}.{name}": literal_choices(annotation)
            for section, cls in typing.get_type_hints(Config).items()
            for name, annotation in typing.get_type_hints(cls).items() if literal_choices(annotation)}
    assert {"train.precision", "model.method", "data.format", "optim.schedule"} <= set(keys)
    for key, choices in keys.items():
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"{key}=bogus"])
        assert str(e.value) == f"{key}: expected one of {', '.join(map(repr, choices))}, got 'bogus'"
    with pytest.raises(ConfigError, match="train.precision: expected one of 'fp32', 'bf16', got 'fp8'"):
        TrainConfig(precision="fp8")


def test_resume_allow_changes_names_known_keys():
    assert load_config(None, ["train.resume_allow_changes=[optim.lr,tracking.tags]"])
    with pytest.raises(ConfigError, match=r"train.resume_allow_changes: unknown key optim.lrr \(keys are dotted"):
        load_config(None, ["train.resume_allow_changes=[optim.lrr]"])


@pytest.mark.parametrize("environ,expected", [
    ({}, DistEnv(0, 0, 1, 1)),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, DistEnv(1, 1, 4, 2)),
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "2(x2)"},
     DistEnv(3, 1, 4, 2)),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, DistEnv(0, 0, 1, 1)),
])
def test_rank_layout_from_the_launchers_variables(environ, expected):
    assert DistEnv.from_environ(environ) == expected


@pytest.mark.parametrize("environ,message", [
    ({"RANK": "abc"}, "RANK='abc' is not a non-negative integer"),
    ({"RANK": "0", "WORLD_SIZE": ""}, "WORLD_SIZE='' is not a non-negative integer"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK='-1' is not a non-negative integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not a non-negative integer"),
    ({"RANK": "4", "WORLD_SIZE": "4"}, "RANK=4 is outside the world of WORLD_SIZE=4 ranks"),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "4"}, "SLURM_PROCID=5 is outside the world of SLURM_NTASKS=4 ranks"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "four"}, "SLURM_NTASKS='four' is not a non-negative integer"),
])
def test_bad_rank_variables_are_config_errors_naming_them(environ, message):
    with pytest.raises(ConfigError) as e:
        DistEnv.from_environ(environ)
    assert str(e.value) == message


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("tiny"), n_train=32, n_eval=8)


def tiny_overrides(tiny, out) -> list[str]:
    """recipes/tiny.yaml pointed at the module's tiny set-up, writing under `out`."""
    return [f"model.anchor={tiny / 'anchor'}", f"model.augmenting=[{tiny / 'augmenting'}]",
            f"data.train={tiny / 'train.jsonl'}", f"data.eval={tiny / 'eval.jsonl'}",
            f"data.tokenizer={tiny / 'tokenizer.model'}", f"train.output_dir={out}", "tracking.enabled=false"]


def run_train(tiny, tmp_path, *extra, world=1):
    out = tmp_path / "out"
    env = base_env(RANK=0, WORLD_SIZE=world, LOCAL_RANK=0)
    proc = subprocess.run([sys.executable, str(REPO / "calm_dist" / "train.py"), "--config",
                           str(REPO / "recipes" / "tiny.yaml"), *tiny_overrides(tiny, out), *extra],
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
    (["optim.warmup_steps=21"], 1, "optim.warmup_steps=21 is more than train.steps=20: the learning rate would never"),
    (["train.compile=sometimes"], 1, "train.compile: expected true, false or 'auto'"),
    (["model.attn_implementation=fastest"], 1, "model.attn_implementation: expected one of 'sdpa'"),
    pytest.param(["model.attn_implementation=flash_attention_2"], 1, "needs the flash_attn package",
                 marks=pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None,
                                          reason="flash-attn is installed here")),
    pytest.param(["train.loss_kernel=liger"], 1, "train.loss_kernel=liger needs the liger-kernel package",
                 marks=pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None,
                                          reason="liger-kernel is installed here")),
    pytest.param(["model.fused_kernels=liger"], 1, "model.fused_kernels=liger needs the liger-kernel package",
                 marks=pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None,
                                          reason="liger-kernel is installed here")),
    (["model.fused_kernels=triton"], 1, "model.fused_kernels: expected one of 'none'"),
])
def test_config_errors_exit_2_with_one_line_before_loading_models(tiny, tmp_path, extra, world, message):
    proc, out = run_train(tiny, tmp_path, *extra, world=world)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("calm_dist:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert not out.exists()  # nothing heavy ran, nothing was written


def test_a_warmup_as_long_as_the_run_is_accepted(tiny, tmp_path):
    """The learning rate reaches optim.lr on the last step; one warmup step more is refused (above)."""
    recipe = REPO / "recipes" / "tiny.yaml"
    cfg = load_config(recipe, [*tiny_overrides(tiny, tmp_path / "out"), "optim.warmup_steps=20"])
    assert cfg.train.steps == 20 and preflight(cfg, DistEnv(0, 0, 1, 1)).accumulation == 1
