"""The DeepSpeed JSON as users write it for HF Trainer: "auto" filled from the config tree and the models' widths
exactly as transformers fills it, conflicts and optimizer/scheduler blocks refused in one line."""
import json
from pathlib import Path

import pytest
from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM, TrainingArguments
from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

from calm_dist.config import ConfigError, load_config
from calm_dist.training.ds_config import build_ds_config

HF_JSON = Path(__file__).resolve().parents[1] / "fixtures" / "hf_trainer_zero3.json"
ANCHOR = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128)
AUGMENTING = GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=128)


def config(ds_json: Path, **items):
    items = {"distributed.deepspeed_config": ds_json, "train.micro_batch_size": 8, **items}
    return load_config("tiny", [f"{k}={v}" for k, v in items.items()])


def write_json(tmp_path: Path, **changes) -> Path:
    """The HF Trainer fixture with top-level keys changed (None: removed)."""
    ds = json.loads(HF_JSON.read_text())
    for key, value in changes.items():
        if value is None:
            ds.pop(key)
        else:
            ds[key] = value
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return path


def refusal(cfg, world_size=2) -> str:
    with pytest.raises(ConfigError) as e:
        build_ds_config(cfg, world_size, [ANCHOR, AUGMENTING])
    assert "\n" not in str(e.value)
    return str(e.value)


def test_an_hf_trainer_json_is_filled_as_transformers_fills_it(tmp_path):
    """The same JSON, the same batch and the widest model's width: our result equals the one transformers'
    HfTrainerDeepSpeedConfig writes (trainer_config_process, then trainer_config_finalize), key for key."""
    ours = build_ds_config(config(HF_JSON, **{"train.global_batch_size": 16}), 1, [ANCHOR, AUGMENTING])

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=2,
                             max_grad_norm=1.0, report_to=[])
    hf = HfTrainerDeepSpeedConfig(json.loads(HF_JSON.read_text()))
    try:
        hf.trainer_config_process(args)
        hf.trainer_config_finalize(args, LlamaForCausalLM(ANCHOR), num_training_steps=20)  # the wider model: 64
    finally:
        unset_hf_deepspeed_config()
    assert ours == hf.config
    assert ours["zero_optimization"]["reduce_bucket_size"] == 64 * 64  # the anchor's width, not the augmenting 48
    assert ours["steps_per_print"] == 2000 and ours["wall_clock_breakdown"] is False  # harmless keys are kept


def test_the_tree_fills_what_the_json_leaves_out(tmp_path):
    path = write_json(tmp_path, bf16=None, fp16=None, gradient_clipping=None, steps_per_print=None)
    cfg = config(path, **{"train.precision": "bf16", "optim.grad_clip": 0.5, "train.global_batch_size": 32})
    ds = build_ds_config(cfg, 2, [ANCHOR])
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        8, 2, 32)
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False} and ds["gradient_clipping"] == 0.5
    assert ds["steps_per_print"] == 10**9  # DeepSpeed's own progress lines stay off unless asked for


def test_explicit_values_that_agree_with_the_tree_are_accepted(tmp_path):
    path = write_json(tmp_path, train_batch_size=16, train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=1,
                      gradient_clipping=1.0, bf16={"enabled": False})
    assert build_ds_config(config(path), 2, [ANCHOR])["train_batch_size"] == 16


def test_explicit_zero_sizes_are_the_users_and_kept(tmp_path):
    zero = {**json.loads(HF_JSON.read_text())["zero_optimization"], "reduce_bucket_size": 5e7}
    ds = build_ds_config(config(write_json(tmp_path, zero_optimization=zero)), 2, [ANCHOR])
    assert ds["zero_optimization"]["reduce_bucket_size"] == 5e7
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 640


@pytest.mark.parametrize("changes, items, message", [
    ({"train_batch_size": 64}, {},
     "sets train_batch_size=64, but the calm_dist config gives 16 (train.micro_batch_size=8 x 1 micro-steps x 2 "
     "ranks): set it to \"auto\" or leave it out"),
    ({"gradient_accumulation_steps": 4}, {"train.global_batch_size": 32},
     "sets gradient_accumulation_steps=4, but the calm_dist config gives 2 (train.global_batch_size=32 / "
     "(train.micro_batch_size=8 x 2 ranks))"),
    ({"gradient_clipping": 1.0}, {"optim.grad_clip": 0.5},
     "sets gradient_clipping=1.0, but the calm_dist config gives 0.5 (optim.grad_clip)"),
    ({"bf16": {"enabled": True}}, {},
     "sets bf16.enabled=true, but the calm_dist config gives false (train.precision=fp32)"),
    ({"fp16": {"enabled": True}}, {"train.precision": "bf16"},
     "sets fp16.enabled=true, but the calm_dist config gives false (train.precision=bf16)"),
])
def test_an_explicit_value_that_conflicts_with_the_tree_is_refused_naming_both(tmp_path, changes, items, message):
    assert message in refusal(config(write_json(tmp_path, **changes), **items))


@pytest.mark.parametrize("block, keys", [
    ("optimizer", "AdamW is set by optim.lr, optim.betas, optim.eps and optim.weight_decay"),
    ("scheduler", "the schedule is set by optim.schedule, optim.warmup_steps and optim.min_lr_ratio"),
])
def test_an_optimizer_or_scheduler_block_is_refused_saying_where_they_are_set(tmp_path, block, keys):
    path = write_json(tmp_path, **{block: {"type": "AdamW", "params": {"lr": "auto"}}})
    assert refusal(config(path)) == (f"{path} has a '{block}' block: calm_dist does not take it from the DeepSpeed "
                                     f"JSON; {keys} in the calm_dist config. Remove the block")


def test_an_auto_calm_dist_cannot_fill_is_refused_before_deepspeed_sees_it(tmp_path):
    zero = {**json.loads(HF_JSON.read_text())["zero_optimization"], "sub_group_size": "auto"}
    message = refusal(config(write_json(tmp_path, zero_optimization=zero)))
    assert 'zero_optimization.sub_group_size is "auto", which calm_dist does not fill' in message


def test_unknown_keys_are_still_refused(tmp_path):
    assert "unexpected DeepSpeed keys amp" in refusal(config(write_json(tmp_path, amp={"enabled": True})))


def test_the_json_is_not_modified_on_disk_and_each_build_starts_from_it(tmp_path):
    path = write_json(tmp_path)
    before = path.read_text()
    first = build_ds_config(config(path), 2, [ANCHOR])
    second = build_ds_config(config(path), 1, [AUGMENTING])
    assert path.read_text() == before
    assert (first["train_batch_size"], first["zero_optimization"]["reduce_bucket_size"]) == (16, 64 * 64)
    assert (second["train_batch_size"], second["zero_optimization"]["reduce_bucket_size"]) == (8, 48 * 48)
