"""model.attn_implementation: checked when the config loads, and what every frozen model is loaded with."""
import importlib.util

import pytest
import transformers as T

from calm_dist.config import ConfigError, load_config
from calm_dist.model.io import load_causal_lm


def test_default_is_sdpa_and_choices_are_checked():
    assert load_config(None, []).model.attn_implementation == "sdpa"
    assert load_config(None, ["model.attn_implementation=eager"]).model.attn_implementation == "eager"
    with pytest.raises(ConfigError, match="model.attn_implementation: expected one of 'sdpa'"):
        load_config(None, ["model.attn_implementation=fastest"])


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_without_its_package_is_refused_up_front():
    with pytest.raises(ConfigError, match="needs the flash_attn package"):
        load_config(None, ["model.attn_implementation=flash_attention_2"])


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_the_loaded_model_uses_the_configured_kernel(tmp_path, impl):
    """Whatever the checkpoint's config.json says (eager saved here), the configured kernel runs."""
    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        vocab_size=64, attn_implementation="eager" if impl == "sdpa" else "sdpa")
    T.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    assert load_causal_lm(str(tmp_path), attn_implementation=impl).config._attn_implementation == impl
