"""Truncating an augmenting model above its last used block leaves every other model's config alone."""
import torch
import transformers as T

from calm_dist import ComposedModel
from tests.helpers.tiny import randomize_composition, tiny_config


def test_a_config_shared_with_the_anchor_is_not_truncated():
    config = tiny_config("llama", layers=4)
    torch.manual_seed(0)
    anchor = T.LlamaForCausalLM(config).eval()
    augmenting = T.LlamaForCausalLM(config).eval()  # the same config object, other weights
    model = ComposedModel(anchor, [augmenting], layer_pairs=[[(1, 3)]])
    randomize_composition(model)
    assert anchor.config.num_hidden_layers == 4 and config.num_hidden_layers == 4
    assert augmenting.config.num_hidden_layers == 2 and len(augmenting.model.layers) == 2
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    cached = model.generate(ids, max_new_tokens=6, use_cache=True)
    assert torch.equal(cached, model.generate(ids, max_new_tokens=6, use_cache=False))
    # the anchor alone still decodes with all 4 layers of its KV cache
    alone = anchor.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert alone.shape[1] == ids.shape[1] + 6
