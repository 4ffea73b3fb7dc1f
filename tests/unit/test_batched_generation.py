"""Batched generation with left padding: every row of a batch decodes exactly what it decodes alone, for several
families on either side, ragged prompt lengths and rows that finish at different steps."""
import pytest

from tests.helpers.tiny import an_eos_the_rows_reach_apart, first_stop, left_padded, random_prompts, \
    sharpened_composition

PAIRS = [("llama", ("gpt2", "qwen2")), ("gpt2", ("llama",)), ("qwen2", ("gpt_neox",)), ("gpt_neox", ("mistral",))]
LENGTHS = [9, 3, 6, 1, 8, 5]  # ragged prompts: the batch left-pads all but the first to 9


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cached", "recomputed"])
@pytest.mark.parametrize("anchor,augmenting", PAIRS, ids=[f"{a}+{'+'.join(b)}" for a, b in PAIRS])
def test_each_row_of_a_batch_decodes_what_it_decodes_alone(anchor, augmenting, use_cache):
    model = sharpened_composition(anchor, augmenting)
    rows, n = random_prompts(5, LENGTHS), 12
    alone = [model.generate(r[None], max_new_tokens=n, eos_token_id=-1, pad_token_id=0, use_cache=use_cache)[0, len(r):]
             for r in rows]
    # an eos the rows reach at different steps, one row never: rows finish apart and are padded after
    eos = an_eos_the_rows_reach_apart([a.tolist() for a in alone])
    ids, mask = left_padded(rows)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=eos, pad_token_id=0,
                           use_cache=use_cache)[:, ids.shape[1]:]
    for i, a in enumerate(alone):
        stop = first_stop(a.tolist(), eos)
        want = a.tolist() if stop is None else a[:stop + 1].tolist() + [0] * (n - stop - 1)
        assert batch[i].tolist() == want, (i, LENGTHS[i])
    stops = [first_stop(a.tolist(), eos) for a in alone]
    assert len({s for s in stops if s is not None}) >= 2 and None in stops, stops
    assert len({tuple(a.tolist()) for a in alone}) == len(alone)  # the rows decode different tokens
