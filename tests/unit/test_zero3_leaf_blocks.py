"""ZeRO-3 gathers each frozen decoder block whole: every family's blocks, and nothing else, are leaves."""
import pytest
from deepspeed.utils import z3_leaf_module

from calm_dist.model.backbones import decoder_blocks
from calm_dist.model.baselines import LoRAAnchor
from calm_dist.training.parallelize import mark_zero3_leaf_blocks

from tests.helpers.tiny import tiny_model


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox"])
def test_every_decoder_block_and_only_blocks_become_leaves(family):
    model = tiny_model(family, layers=3).requires_grad_(False)  # frozen, as in a composition
    assert mark_zero3_leaf_blocks([model]) == 3
    blocks = {id(b) for b in decoder_blocks(model)}
    leaves = {id(m) for m in model.modules() if z3_leaf_module(m)}
    assert leaves == blocks


def test_blocks_with_trainable_parameters_keep_per_module_hooks():
    lora = LoRAAnchor(tiny_model("llama", layers=3), rank=2, targets=["q_proj"])
    assert mark_zero3_leaf_blocks([lora.model]) == 0
