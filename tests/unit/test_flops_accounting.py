"""The training-step FLOP accounting (calm_dist.planning.costs.step_cost, what MFU and TFLOP/s are computed from)
against torch's FlopCounterMode on a real ComposedModel forward + backward, with cached and recomputed
augmenting states.

Conventions of the comparison: FlopCounterMode counts every query against every key (causal=False) and a
fused SDPA backward as 2.5x its forward (attn_backward_factor=2.5); it knows only the CUDA SDPA kernels, so
tests/helpers/flop_counter.py maps the CPU flash kernel to the same formulas.
"""
import pytest
import torch
import transformers

from calm_dist import ComposedModel
from calm_dist.planning import costs
from tests.helpers.flop_counter import counted

torch.set_num_threads(1)
BATCH, SEQ, VOCAB = 2, 24, 96
SPECIAL = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def anchor_config():
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=5, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=64, **SPECIAL)


def augmenting_config(family):
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=48, n_layer=4, n_head=4, n_positions=64, **SPECIAL)
    return transformers.LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=4, num_attention_heads=4,
                                    num_key_value_heads=4, max_position_embeddings=64, **SPECIAL)


def composed(family, pairs):
    torch.manual_seed(0)
    anchor = transformers.AutoModelForCausalLM.from_config(anchor_config(), attn_implementation="sdpa")
    aug = transformers.AutoModelForCausalLM.from_config(augmenting_config(family), attn_implementation="sdpa")
    return ComposedModel(anchor, [aug], layer_pairs=[pairs])


def counted_step(model, ids, states=None):
    return counted(lambda: model(ids, labels=ids, augmenting_states=states).loss.backward())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("states", ["recompute", "cached"])
@pytest.mark.parametrize("pairs", [[(1, 1), (3, 3)], [(3, 0), (3, 2), (1, 4)], [(2, 3)]])
def test_step_flops_match_flop_counter(family, states, pairs):
    model = composed(family, pairs)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    cached = None
    if states == "cached":
        mask = torch.ones_like(ids)
        cached = model.run_augmenting(ids, mask, torch.arange(SEQ).expand(BATCH, SEQ))
    measured = counted_step(model, ids, cached)
    assert all(p.grad is not None for p in model.trainable_parameters())
    assert all(p.grad is None for p in model.anchor.parameters())

    sc = costs.step_cost(anchor_config(), augmenting_config(family), pairs, seq_len=SEQ, states=states,
                         causal=False, attn_backward_factor=2.5)
    assert measured == pytest.approx(sc.total * BATCH * SEQ, rel=0.01)
    assert sc.n_blocks_params == sum(p.numel() for p in model.trainable_parameters())
    if states == "cached":
        assert sc.aug_forward == 0


def test_cached_saves_exactly_the_augmenting_forward():
    pairs = [(1, 1), (3, 3)]
    model = composed("llama", pairs)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    recompute = counted_step(model, ids)
    model.zero_grad(set_to_none=True)
    states = model.run_augmenting(ids, torch.ones_like(ids), torch.arange(SEQ).expand(BATCH, SEQ))
    cached = counted_step(model, ids, states)
    aug = costs.augmenting_forward_flops(augmenting_config("llama"), SEQ, deepest_layer=3, causal=False)
    assert recompute - cached == pytest.approx(aug * BATCH * SEQ, rel=1e-6)


def test_causal_accounting_is_below_all_pairs_by_the_attention_terms_only():
    """MFU counts causal attention (each query against the keys up to it); what the trainer logs as train/tflops
    and train/mfu is checked against step_cost on a real 2-rank run in test_distributed_training.py."""
    sc = costs.step_cost(anchor_config(), augmenting_config("llama"), [(1, 1), (3, 3)], seq_len=SEQ)
    full = costs.step_cost(anchor_config(), augmenting_config("llama"), [(1, 1), (3, 3)], seq_len=SEQ, causal=False)
    assert sc.total < full.total and full.total - sc.total < 0.2 * full.total
