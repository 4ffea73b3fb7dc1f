"""KV caches that grow in place (calm_dist/model/kv_buffers.py): against transformers' DynamicLayer, which grows
by concatenation, over updates that cross several growths of the buffer, rollbacks, and batch selections; and in
use: generation builds them for every model."""
import pytest
import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from calm_dist.model import kv_buffers
from calm_dist.model.generation import CachedStepper
from calm_dist.model.kv_buffers import Growing, GrowingLayer, growing_cache
from tests.helpers.tiny import composed, tiny_config


def kv(tokens: int, seed: int, rows: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, tokens, 4, generator=g), torch.randn(rows, 2, tokens, 4, generator=g)


@pytest.mark.parametrize("capacity", [0, 5, 300])
def test_a_growing_layer_holds_what_concatenation_holds(capacity):
    """A prefill, then single tokens and chunks past several doublings (MIN_CAPACITY 64), rollbacks of a few
    tokens in between (the cross-tokenizer decoding's), then a batch selection and a repeat."""
    ours, theirs = GrowingLayer(capacity), DynamicLayer()
    steps = [7] + [1] * 70 + [3, -2, 1, -5, 40, 1, -1, 90, 1]
    for i, n in enumerate(steps):
        if n < 0:
            ours.crop(n)
            theirs.crop(n)
        else:
            k, v = kv(n, seed=i)
            got, expected = ours.update(k, v), theirs.update(k, v)
            assert all(torch.equal(a, b) for a, b in zip(got, expected))
        assert ours.get_seq_length() == theirs.get_seq_length()
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
    assert ours._keys.buffer.shape[-2] >= 128  # it grew past the minimum at least once
    for layer in (ours, theirs):
        layer.batch_select_indices(torch.tensor([2, 0]))
        layer.batch_repeat_interleave(2)
    assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
    k, v = kv(1, seed=99, rows=4)
    assert torch.equal(ours.update(k, v)[0], theirs.update(k, v)[0])


def test_a_step_writes_into_spare_room_without_moving_the_cache():
    """Within its capacity a buffer keeps its storage: the tokens so far are never copied again."""
    growing = Growing(dim=2, capacity=100)
    first = growing.append(torch.ones(1, 2, 10, 4))
    storage = first.untyped_storage().data_ptr()
    for _ in range(50):
        view = growing.append(torch.zeros(1, 2, 1, 4))
    assert view.untyped_storage().data_ptr() == storage and view.shape == (1, 2, 60, 4)
    assert torch.equal(view[:, :, :10], first) and view[:, :, 10:].abs().sum() == 0


def test_growing_cache_replaces_full_attention_layers_only():
    config = tiny_config("mistral")
    config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    config.sliding_window = 8
    cache = growing_cache(config, capacity=40)
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [GrowingLayer, DynamicSlidingWindowLayer, GrowingLayer, DynamicSlidingWindowLayer]
    assert cache.layers[0].capacity == 40
    lazy = growing_cache(None, capacity=40)  # no layer list known up front: layers appear on first use
    k, v = kv(3, seed=0)
    lazy.update(k, v, 1)
    assert [type(layer) for layer in lazy.layers] == [GrowingLayer, GrowingLayer]
    assert lazy.layers[1].get_seq_length() == 3 and lazy.layers[1].capacity == 40


def test_generation_decodes_through_growing_caches(monkeypatch):
    """Every model's cache and the blocks' keys/values grow in place, sized for prompt + new tokens; decoding
    through them gives the tokens of full recomputation (the families: tests/unit/test_generation.py)."""
    model = composed("llama", ("gpt2",)).eval()
    steppers = []
    monkeypatch.setattr(CachedStepper, "__init__", _recording(CachedStepper.__init__, steppers))
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    cached = model.generate(ids, max_new_tokens=12, eos_token_id=-1)
    assert torch.equal(cached, model.generate(ids, max_new_tokens=12, eos_token_id=-1, use_cache=False))
    (stepper,) = steppers
    assert stepper.capacity == 21
    caches = [stepper.anchor_cache, *stepper.augmenting_caches]
    assert all(isinstance(layer, GrowingLayer) for cache in caches for layer in cache.layers)
    assert all(isinstance(b, Growing) for pairs in stepper.buffers for kv_pair in pairs for b in kv_pair)
    assert stepper.anchor_cache.layers[0]._keys.buffer.shape[-2] == max(21, kv_buffers.MIN_CAPACITY)


def _recording(init, into: list):
    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        into.append(self)
    return wrapped
