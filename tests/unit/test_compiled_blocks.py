"""`train.compile`: compiled frozen blocks give the eager numbers, with the composition's hooks left outside."""
import pytest
import torch

from calm_dist import ComposedModel
from calm_dist.model.backbones import decoder_blocks
from calm_dist.model.baselines import LoRAAnchor
from calm_dist.training.parallelize import compile_frozen_blocks

from tests.helpers.tiny import VOCAB, randomize_composition, tiny_model


def loss_and_grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    loss = model(ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.trainable_parameters()]


@pytest.mark.parametrize("anchor_family,aug_family", [("llama", "gpt2"), ("gpt_neox", "qwen2")])
def test_compiled_blocks_give_the_eager_loss_and_gradients(anchor_family, aug_family):
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()

    def build():
        anchor = tiny_model(anchor_family, seed=1, hidden=48, layers=6)
        augmenting = tiny_model(aug_family, seed=2, hidden=32, layers=6)
        model = ComposedModel.from_pretrained(anchor, [augmenting], layer_pairs=[[(1, 2), (5, 4)]])
        randomize_composition(model)
        return model

    eager, compiled = build(), build()
    frozen = [compiled.anchor, *compiled.augmenting]
    assert compile_frozen_blocks(frozen) == sum(len(decoder_blocks(m)) for m in frozen)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding: the composition's mask handling runs around the compiled graphs
    for _ in range(2):  # the second call runs the cached graphs
        loss_e, grads_e = loss_and_grads(eager, ids, mask)
        loss_c, grads_c = loss_and_grads(compiled, ids, mask)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads_c, grads_e):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the blocks really ran compiled, each as one graph with the hooks outside it, and the blocks of a model
    # share their graphs (one per grad mode), so a deep model stays far below dynamo's recompile limit (8),
    # past which blocks would silently run eager
    assert 0 < counters["stats"]["unique_graphs"] <= 3
    assert not counters["graph_break"]


def test_blocks_with_a_trainable_parameter_stay_eager():
    lora = LoRAAnchor(tiny_model("llama", layers=3), rank=2, targets=["q_proj"])
    assert compile_frozen_blocks([lora.model]) == 0
