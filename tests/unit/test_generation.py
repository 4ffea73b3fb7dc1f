"""Decoding: one KV cache per model; cached == recomputed; sampling; the prefix-encoder ablation."""
import pytest
import torch

from calm_dist import ComposedModel
from calm_dist.model.generation import CachedStepper, RecomputingStepper
from tests.helpers.tiny import VOCAB, randomize_composition, tiny_model


def build(aug_families=("gpt2",)):
    anchor = tiny_model("llama", seed=1, hidden=48, layers=6, heads=4)
    aug = [tiny_model(f, seed=2 + i, hidden=32 if i == 0 else 40, layers=8 if i == 0 else 4, heads=4)
           for i, f in enumerate(aug_families)]
    model = ComposedModel.from_pretrained(anchor, aug, layer_pairs=[[(3, 1), (7, 4)], [(1, 2), (3, 5)]][: len(aug)])
    randomize_composition(model, scale=1.0)
    return model


def left_padded_prompts(pads=(0, 4, 2)):
    """Prompts of 9 positions, row r left-padded with pads[r] pad tokens."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(3, VOCAB, (len(pads), 9), generator=g)
    mask = torch.ones_like(x)
    for row, pad in enumerate(pads):
        x[row, :pad], mask[row, :pad] = 0, 0
    return x, mask


@pytest.mark.parametrize("aug_families", [("gpt2",), ("gpt2", "qwen2")], ids=["one-augmenting", "two-augmenting"])
def test_cached_and_recomputed_greedy_decoding_agree(aug_families):
    model = build(aug_families)
    x, mask = left_padded_prompts()
    kw = dict(max_new_tokens=32, eos_token_id=-1, pad_token_id=0)
    cached = model.generate(x, attention_mask=mask, use_cache=True, **kw)
    recomputed = model.generate(x, attention_mask=mask, use_cache=False, **kw)
    assert cached.shape == (3, 9 + 32)
    assert torch.equal(cached[:, :9], x)
    assert torch.equal(cached, recomputed)
    # the composition matters: the anchor alone decodes something else
    anchor_only = model.anchor.generate(x, attention_mask=mask, max_new_tokens=32, do_sample=False,
                                        eos_token_id=-1, pad_token_id=0)
    assert not torch.equal(cached, anchor_only)


def _step_logits(stepper, x, mask, continuation):
    """Logits a stepper gives for the last position after each continuation token."""
    out = [stepper.prefill(x, mask)]
    seq = x
    for t in range(continuation.shape[1]):
        seq = torch.cat([seq, continuation[:, t:t + 1]], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out.append(stepper.next(seq, mask))
    return out, seq, mask


@pytest.mark.parametrize("use_cache", [True, False])
def test_each_step_refreshes_the_augmenting_models(use_cache):
    model = build()
    x, mask = left_padded_prompts()
    continuation = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(9))
    stepper = CachedStepper if use_cache else RecomputingStepper
    refreshed, seq, full_mask = _step_logits(stepper(model, True), x, mask, continuation)
    prefix_only, _, _ = _step_logits(stepper(model, False), x, mask, continuation)
    for t, logits in enumerate(refreshed):  # each step equals the full composed forward over the sequence so far
        upto = 9 + t
        torch.testing.assert_close(logits, model(seq[:, :upto], attention_mask=full_mask[:, :upto]).logits[:, -1],
                                   atol=1e-5, rtol=0)
    torch.testing.assert_close(prefix_only[0], refreshed[0])  # same prompt, same first logits
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(refreshed[1:], prefix_only[1:]))


def test_at_init_generation_equals_the_anchor():
    anchor = tiny_model("llama", seed=1, hidden=48, layers=6)
    reference = tiny_model("llama", seed=1, hidden=48, layers=6)
    model = ComposedModel.from_pretrained(anchor, [tiny_model("gpt2", hidden=32, layers=4)])
    x, mask = left_padded_prompts()
    ours = model.generate(x, attention_mask=mask, max_new_tokens=12, eos_token_id=-1, pad_token_id=0)
    theirs = reference.generate(x, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=-1,
                                pad_token_id=0)
    assert torch.equal(ours, theirs)


def stop_steps(new_tokens: torch.Tensor, eos: int) -> list[int | None]:
    """Per row, the step at which `eos` first appears among the new tokens (None: never)."""
    return [row.index(eos) if eos in row else None for row in new_tokens.tolist()]


def eos_setup():
    """A composition at init (its anchor), the anchor's twin under transformers, eight left-padded prompts, the
    reference's generate arguments, and the 10 tokens it decodes with no eos."""
    anchor = tiny_model("llama", seed=1, hidden=48, layers=6)
    reference = tiny_model("llama", seed=1, hidden=48, layers=6)
    model = ComposedModel.from_pretrained(anchor, [tiny_model("gpt2", hidden=32, layers=4)])
    x, mask = left_padded_prompts(pads=(0, 4, 2, 0, 5, 1, 3, 0))
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    return model, reference, x, mask, kw, reference.generate(x, eos_token_id=-1, **kw)[:, 9:]


def test_eos_stops_and_pads_like_transformers():
    """At init the composition is its anchor: with an eos that rows reach at different steps (one never), every
    row equals transformers' own generate, padding after the eos included."""
    model, reference, x, mask, kw, free = eos_setup()
    # the token whose first appearances are spread over the most steps, some row never reaching it
    eos = max(free.unique().tolist(), key=lambda t: (None in stop_steps(free, t), len(set(stop_steps(free, t)))))
    steps = stop_steps(free, eos)
    assert None in steps and len({s for s in steps if s is not None}) >= 2, steps
    ours = model.generate(x, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    theirs = reference.generate(x, eos_token_id=eos, **kw)
    assert torch.equal(ours, theirs)
    for row, step in zip(ours[:, 9:].tolist(), steps):
        if step is not None:
            assert row[step] == eos and all(t == 0 for t in row[step + 1:])


def test_a_list_of_eos_ids_stops_each_row_at_any_of_them_like_transformers():
    """Llama-3's configs give eos_token_id as a list: a row ends at whichever of them comes first, passed
    explicitly or read from the anchor's config, exactly as transformers' generate ends it."""
    model, reference, x, mask, kw, free = eos_setup()
    first, second = free[0, 2].item(), free[1, 1].item()  # two tokens some rows reach at different steps
    eos = [VOCAB - 1 if VOCAB - 1 not in (first, second) else VOCAB - 2, first, second]
    theirs = reference.generate(x, eos_token_id=eos, **kw)
    assert not torch.equal(theirs, reference.generate(x, eos_token_id=eos[0], **kw))  # the list's later ids act
    assert torch.equal(model.generate(x, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0),
                       theirs)
    model.anchor.config.eos_token_id = eos  # read from the config, as a Llama-3 checkpoint gives it
    assert torch.equal(model.generate(x, attention_mask=mask, max_new_tokens=10, pad_token_id=0), theirs)


def test_decoding_never_emits_an_id_past_the_smallest_embedding_table():
    """An anchor head padded past an augmenting model's table (Qwen2.5-7B: 152,064 rows, 0.5B: 151,936) would
    otherwise decode ids the augmenting model has no row for, and feed them back to it: here its padded rows
    score highest."""
    anchor = tiny_model("llama", seed=1, hidden=48, layers=6, vocab=VOCAB + 32)
    with torch.no_grad():
        anchor.get_output_embeddings().weight[VOCAB:] = 10.0
    model = ComposedModel.from_pretrained(anchor, [tiny_model("gpt2", hidden=32, layers=4)])
    randomize_composition(model)
    x, mask = left_padded_prompts()
    assert int(model(x, attention_mask=mask).logits[:, -1].argmax(-1).min()) >= VOCAB  # unmasked: a padded row
    for kw in (dict(use_cache=True), dict(use_cache=False), dict(do_sample=True, top_p=0.9)):
        out = model.generate(x, attention_mask=mask, max_new_tokens=6, eos_token_id=-1, pad_token_id=0,
                             generator=torch.Generator().manual_seed(0), **kw)
        assert int(out.max()) < VOCAB, kw


def test_sampling_is_seeded_and_respects_top_k():
    model = build()
    x, mask = left_padded_prompts()
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=1, eos_token_id=-1, pad_token_id=0)
    greedy = model.generate(x, attention_mask=mask, max_new_tokens=10, eos_token_id=-1, pad_token_id=0)
    assert torch.equal(model.generate(x, attention_mask=mask, **kw), greedy)  # top_k=1 is greedy
    kw.update(top_k=None, top_p=0.9, temperature=1.5)
    a = model.generate(x, attention_mask=mask, generator=torch.Generator().manual_seed(0), **kw)
    b = model.generate(x, attention_mask=mask, generator=torch.Generator().manual_seed(0), **kw)
    c = model.generate(x, attention_mask=mask, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
