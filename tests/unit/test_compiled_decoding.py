"""Decoding with one compiled graph per step (calm_dist/model/compiled_decoding.py) gives exactly the tokens of the
eager KV-cached steps: left-padded ragged prompts, rows that finish at different steps, two augmenting models of
other families, the prefix-encoder ablation; one graph serves later generations of the same shapes, and a model
whose graphs run out (dynamo's recompile limit) or whose caches cannot compile (sliding windows) decodes eagerly
over the same static caches."""
import pytest
import torch
import torch._dynamo
import torch._dynamo.utils

from calm_dist.model import compiled_decoding
from tests.helpers.tiny import an_eos_the_rows_reach_apart, left_padded, random_prompts, \
    sharpened_composition

PAIRS = [("llama", ("gpt2", "qwen2")), ("gpt_neox", ("llama",))]
LENGTHS = [9, 3, 6, 1, 8, 5]
NEW = 12


def ragged_batch(seed=5, lengths=LENGTHS):
    """Random prompts of `lengths`, left-padded into one batch: (ids, mask)."""
    return left_padded(random_prompts(seed, lengths))


@pytest.mark.parametrize("anchor,augmenting", PAIRS, ids=[f"{a}+{'+'.join(b)}" for a, b in PAIRS])
def test_compiled_steps_decode_the_eager_tokens(anchor, augmenting):
    model = sharpened_composition(anchor, augmenting)
    ids, mask = ragged_batch()
    free = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=-1, pad_token_id=0)
    eos = an_eos_the_rows_reach_apart(free[:, ids.shape[1]:].tolist())
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    eager = model.generate(ids, **kwargs)
    compiled = model.generate(ids, compile_step=True, **kwargs)
    assert compiled.tolist() == eager.tolist()
    finished = (eager[:, ids.shape[1]:] == eos).int().argmax(1)
    assert len(set(finished.tolist())) >= 3  # rows stop at different steps (and one never: argmax 0)
    if anchor != "llama":
        return
    # the prefix encoder: the blocks read the prompt's augmenting states only
    prefix_eager = model.generate(ids, refresh_augmenting=False, **kwargs)
    prefix_compiled = model.generate(ids, refresh_augmenting=False, compile_step=True, **kwargs)
    assert prefix_compiled.tolist() == prefix_eager.tolist()
    assert prefix_eager.tolist() != eager.tolist()


def test_one_graph_serves_later_generations_of_the_same_shapes_and_past_the_limit_steps_run_eagerly():
    model = sharpened_composition("llama", ("gpt2",))
    first, mask = ragged_batch(seed=1, lengths=[7, 4])
    model.generate(first, attention_mask=mask, max_new_tokens=4, eos_token_id=-1, compile_step=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # other prompts, another length within the same rounded capacity
    second, mask = ragged_batch(seed=2, lengths=[3, 9])
    out = model.generate(second, attention_mask=mask, max_new_tokens=20, eos_token_id=-1, compile_step=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert out.tolist() == model.generate(second, attention_mask=mask, max_new_tokens=20, eos_token_id=-1).tolist()

    # a new shape once dynamo's recompile limit is reached: the steps run eagerly over the same static caches
    # (config.patch, not monkeypatch: setting the option back by setattr leaves it hidden to later compilations)
    third, mask = ragged_batch(seed=4, lengths=[6, 2, 5])
    with torch._dynamo.config.patch(recompile_limit=1), pytest.warns(UserWarning, match="recompile limit"):
        out = model.generate(third, attention_mask=mask, max_new_tokens=6, eos_token_id=-1, compile_step=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert out.tolist() == model.generate(third, attention_mask=mask, max_new_tokens=6, eos_token_id=-1).tolist()


def test_sliding_window_caches_decode_eagerly_with_the_same_tokens():
    model = sharpened_composition("mistral", ("llama",))  # Mistral's configs set a sliding window
    ids, mask = ragged_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, eos_token_id=-1, pad_token_id=0)
    with pytest.warns(UserWarning, match="sliding-window"):
        out = model.generate(ids, compile_step=True, **kwargs)
    assert out.tolist() == model.generate(ids, **kwargs).tolist()


def test_capacities_round_up_to_a_few_shapes():
    step = compiled_decoding.CAPACITY_STEP
    assert [compiled_decoding.capacity_for(n) for n in (1, step, step + 1, 3 * step)] == [step, step, 2 * step, 3 * step]
