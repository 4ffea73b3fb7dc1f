"""Batched generation with left padding: every row of a batch decodes exactly what it decodes alone, for several
families on either side, ragged prompt lengths and rows that finish at different steps."""
import pytest
import torch

from tests.helpers.tiny import VOCAB, sharpened_composition

PAIRS = [("llama", ("gpt2", "qwen2")), ("gpt2", ("llama",)), ("qwen2", ("gpt_neox",)), ("gpt_neox", ("mistral",))]
LENGTHS = [9, 3, 6, 1, 8, 5]  # ragged prompts: the batch left-pads all but the first to 9


def prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in LENGTHS]


def left_padded(rows, pad=0):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return ids, mask


def first_stop(tokens: list[int], eos: int) -> int | None:
    return tokens.index(eos) if eos in tokens else None


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cached", "recomputed"])
@pytest.mark.parametrize("anchor,augmenting", PAIRS, ids=[f"{a}+{'+'.join(b)}" for a, b in PAIRS])
def test_each_row_of_a_batch_decodes_what_it_decodes_alone(anchor, augmenting, use_cache):
    model = sharpened_composition(anchor, augmenting)
    rows, n = prompts(), 12
    alone = [model.generate(r[None], max_new_tokens=n, eos_token_id=-1, pad_token_id=0, use_cache=use_cache)[0, len(r):]
             for r in rows]
    # an eos the rows reach at different steps, one row never: rows finish apart and are padded after
    stops = {t: [first_stop(a.tolist(), t) for a in alone] for t in torch.cat(alone).unique().tolist()}
    eos = max(stops, key=lambda t: (None in stops[t], len({s for s in stops[t] if s is not None})))
    ids, mask = left_padded(rows)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=eos, pad_token_id=0,
                           use_cache=use_cache)[:, ids.shape[1]:]
    for i, a in enumerate(alone):
        stop = first_stop(a.tolist(), eos)
        want = a.tolist() if stop is None else a[:stop + 1].tolist() + [0] * (n - stop - 1)
        assert batch[i].tolist() == want, (i, LENGTHS[i])
    assert len({s for s in stops[eos] if s is not None}) >= 2 and None in stops[eos], stops[eos]
    assert len({tuple(a.tolist()) for a in alone}) == len(alone)  # the rows decode different tokens
