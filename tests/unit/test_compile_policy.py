"""train.compile=auto (the default): compile when the run earns the ~20 s of compilation back, never for the short
runs of tests and smoke runs."""
from types import SimpleNamespace

import pytest

from calm_dist.config import ConfigError, load_config
from calm_dist.training import compile_policy


def llama(d, layers, vocab):
    return {"model_type": "llama", "hidden_size": d, "intermediate_size": 3 * d, "num_hidden_layers": layers,
            "num_attention_heads": d // 64, "num_key_value_heads": d // 64, "vocab_size": vocab}


# the 49M benchmark composition (benchmarks/common.py, size full) and the tiny recipe's shape (recipes/tiny.yaml)
BENCH = SimpleNamespace(anchor_config=llama(512, 8, 8192), augmenting_configs=[llama(256, 8, 8192)],
                        layer_pairs=[[(3, 3), (7, 7)]], accumulation=1,
                        ds_config={"zero_optimization": {"stage": 3}})
TINY = SimpleNamespace(anchor_config=llama(64, 4, 128), augmenting_configs=[llama(64, 4, 128)],
                       layer_pairs=[[(1, 1), (3, 3)]], accumulation=1,
                       ds_config={"zero_optimization": {"stage": 3}})
CPU_PEAK = ["train.peak_tflops_per_rank=0.15"]  # the 1-thread fp32 matmul peak here, not measured in a test


def cfg(*overrides):
    return load_config(None, [*CPU_PEAK, *overrides])


def test_default_is_auto_and_values_are_checked():
    assert load_config(None, []).train.compile == "auto"
    assert cfg("train.compile=true").train.compile is True
    assert cfg("train.compile=false").train.compile is False
    with pytest.raises(ConfigError, match="train.compile: expected true, false or 'auto'"):
        cfg("train.compile=sometimes")


def test_short_runs_stay_eager():
    on, why = compile_policy.decide(cfg("train.steps=20", "train.micro_batch_size=8", "data.seq_len=32"), TINY)
    assert not on and "off" in why
    # the benchmark model, but a smoke run's length
    assert not compile_policy.decide(cfg("train.steps=10", "data.seq_len=256"), BENCH)[0]


def test_long_runs_compile():
    on, why = compile_policy.decide(cfg("train.steps=1000", "train.micro_batch_size=8", "data.seq_len=256"), BENCH)
    assert on and "on (1000 steps" in why
    # the rule: the expected saving against the compilation
    step_s = compile_policy.expected_step_s(cfg("data.seq_len=256"), BENCH, 0.15e12)
    assert 0.5 < step_s < 5  # ~2.5 s measured for this step (benchmarks/README.md)
    needed = compile_policy.COMPILE_S / (compile_policy.STEP_GAIN * step_s)
    assert compile_policy.decide(cfg(f"train.steps={int(needed) + 1}", "data.seq_len=256"), BENCH)[0]
    assert not compile_policy.decide(cfg(f"train.steps={int(needed) - 1}", "data.seq_len=256"), BENCH)[0]


def test_auto_stays_off_where_compiling_cannot_work(monkeypatch):
    long = ["train.steps=5000", "data.seq_len=256"]
    assert not compile_policy.decide(cfg(*long, "distributed.zero3_leaf_blocks=false"), BENCH)[0]
    # ZeRO-2 hooks no frozen block: leaf blocks do not matter there
    zero2 = SimpleNamespace(**{**vars(BENCH), "ds_config": {"zero_optimization": {"stage": 2}}})
    assert compile_policy.decide(cfg(*long, "distributed.zero3_leaf_blocks=false"), zero2)[0]
    assert not compile_policy.decide(cfg(*long, "model.method=lora"), BENCH)[0]
    monkeypatch.setattr(compile_policy.shutil, "which", lambda name: None)
    on, why = compile_policy.decide(cfg(*long), BENCH)
    assert not on and "no compiler" in why


def test_explicit_settings_are_obeyed():
    assert compile_policy.decide(cfg("train.compile=true", "train.steps=1"), TINY) == (True, "train.compile=true")
    assert compile_policy.decide(cfg("train.compile=false", "train.steps=10000"), BENCH)[0] is False
