"""The composition core: identity at init, causality, padding, frozen weights, save/load, refusals."""
import pytest
import torch

from calm_dist import ComposedModel, CompositionError, default_layer_pairs
from calm_dist.model.backbones import UnsupportedArchitecture
from calm_dist.model.cross_attention import block_parameter_count
from calm_dist.model.layer_pairs import MappingError
from tests.helpers.reference import composed_logits, ref_block_like
from tests.helpers.tiny import FAMILIES, VOCAB, composed, ids, randomize_composition, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_init(family):
    anchor = tiny_model(family, seed=1, hidden=48, layers=4)
    reference = tiny_model(family, seed=1, hidden=48, layers=4)
    aug = tiny_model("llama" if family != "llama" else "gpt2", seed=2, hidden=32, layers=4)
    model = ComposedModel.from_pretrained(anchor, [aug], layer_pairs=[[(1, 0), (3, 2)]])
    x = ids()
    torch.testing.assert_close(model(x).logits, reference(x).logits, atol=1e-5, rtol=0)


# Every family as the anchor and as an augmenting model, at other widths and depths than its partner. The
# augmenting models run deeper than their deepest composed block (reference.composed_logits reads
# hidden_states, whose last entry is after the final norm).
REFERENCE_CASES = {  # id: (anchor (family, width, depth), augmenting [(family, width, depth)], layer pairs)
    "llama<-mistral": (("llama", 48, 6), [("mistral", 32, 9)], [[(3, 2), (7, 5)]]),
    "mistral<-qwen2": (("mistral", 32, 4), [("qwen2", 64, 9)], [[(3, 1), (7, 3)]]),
    "qwen2<-qwen3": (("qwen2", 48, 6), [("qwen3", 32, 9)], [[(3, 2), (7, 5)]]),
    "qwen3<-gpt2": (("qwen3", 32, 5), [("gpt2", 48, 9)], [[(3, 1), (7, 4)]]),
    "gpt2<-gpt_neox": (("gpt2", 48, 6), [("gpt_neox", 32, 9)], [[(3, 2), (7, 5)]]),
    "gpt_neox<-llama": (("gpt_neox", 48, 6), [("llama", 32, 9)], [[(3, 2), (7, 5)]]),
    # two augmenting models on one anchor block, one augmenting block feeding several, pairs out of order
    "llama<-gpt2+qwen3": (("llama", 48, 6), [("gpt2", 32, 8), ("qwen3", 64, 6)],
                          [[(1, 0), (1, 3), (5, 5)], [(4, 3), (2, 1)]]),
}


def reference_models(anchor_spec, augmenting_specs):
    """Fresh, seeded models: the same weights on every call."""
    family, width, depth = anchor_spec
    anchor = tiny_model(family, seed=1, hidden=width, layers=depth, heads=4)
    return anchor, [tiny_model(f, seed=2 + i, hidden=w, layers=d, heads=4)
                    for i, (f, w, d) in enumerate(augmenting_specs)]


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_every_family_on_either_side_composes_like_the_reference(case):
    """Randomised blocks: ComposedModel's logits = the paper's block on plain models (tests/helpers/reference.py)."""
    anchor_spec, augmenting_specs, pairs = REFERENCE_CASES[case]
    model = ComposedModel.from_pretrained(*reference_models(anchor_spec, augmenting_specs), layer_pairs=pairs)
    randomize_composition(model)
    anchor, augmenting = reference_models(anchor_spec, augmenting_specs)
    blocks = [[ref_block_like(b, n_heads=4) for b in model_blocks] for model_blocks in model.blocks]
    x = ids(batch=3, length=14)
    logits = model(x).logits
    torch.testing.assert_close(logits, composed_logits(anchor, augmenting, pairs, blocks, x), atol=1e-5, rtol=0)
    assert (logits - anchor(x).logits).abs().amax() > 0.1  # the blocks act: not the anchor against itself


def test_causal_later_tokens_do_not_change_earlier_logits():
    model = composed("llama", ("gpt2", "qwen2"))
    x = ids(batch=1, length=16)
    k = 9
    y = x.clone()
    y[0, k] = (x[0, k] + 1 - 3) % (VOCAB - 3) + 3
    a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :k], b[:, :k], atol=1e-6, rtol=0)
    assert (a[:, k:] - b[:, k:]).abs().amax(-1).min() > 1e-4  # every later position changes


def test_causal_through_the_cross_attention_alone():
    """The augmenting path alone must be causal: feed augmenting states that differ only after k."""
    model = composed("llama", ("gpt2",))
    x = ids(batch=1, length=16)
    mask = torch.ones_like(x)
    states = model.run_augmenting(x, mask, torch.arange(16)[None])
    k = 7
    changed = [{i: s.clone() for i, s in d.items()} for d in states]
    for s in changed[0].values():
        s[:, k:] += 1.0
    a = model(x, augmenting_states=states).logits
    b = model(x, augmenting_states=changed).logits
    torch.testing.assert_close(a[:, :k], b[:, :k], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, k:], b[:, k:], atol=1e-4)


@pytest.mark.parametrize("anchor_family,aug_family", [("llama", "gpt2"), ("gpt_neox", "qwen2"), ("gpt2", "mistral")])
def test_left_padding_gives_the_unpadded_logits(anchor_family, aug_family):
    model = composed(anchor_family, (aug_family,))
    long, short = ids(1, 12, seed=1), ids(1, 7, seed=2)
    batch = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    batch[0], mask[0] = long[0], 1
    batch[1, 5:], mask[1, 5:] = short[0], 1
    out = model(batch, attention_mask=mask).logits
    torch.testing.assert_close(out[0], model(long).logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, 5:], model(short).logits[0], atol=1e-5, rtol=0)
    assert torch.isfinite(out).all()


def test_loss_ignores_minus_100_and_matches_cross_entropy():
    model = composed()
    x = ids()
    labels = x.clone()
    labels[:, :5] = -100
    out = model(x, labels=labels)
    assert out.logits is None  # the loss went through lm_loss.head_loss
    manual = torch.nn.functional.cross_entropy(model(x).logits[:, 4:-1].reshape(-1, VOCAB), x[:, 5:].reshape(-1))
    torch.testing.assert_close(out.loss, manual)
    both = model(x, labels=labels, return_logits=True)
    torch.testing.assert_close(both.loss, manual)
    torch.testing.assert_close(both.logits, model(x).logits)


def test_frozen_and_trainable_count_matches_formula():
    model = composed("llama", ("gpt2", "qwen2"), randomize=False)
    trainable = model.trainable_parameters()
    assert all(p.requires_grad for p in trainable)
    trainable_ids = {id(p) for p in trainable}
    assert not any(p.requires_grad for p in model.parameters() if id(p) not in trainable_ids)
    n = sum(p.numel() for p in trainable)
    # default rule: 8-block augmenting -> 2 pairs each; D_A = 32, D_B = 48
    assert model.layer_pairs == [[(3, 2), (7, 5)], [(3, 2), (7, 5)]]
    assert n == model.expected_trainable_count() == 4 * block_parameter_count(32, 48)
    assert block_parameter_count(32, 48) == 32 * 48 + 4 * 48 * 48 + 5 * 48


def test_only_blocks_get_gradients():
    model = composed()
    model.train()
    model(ids(), labels=ids()).loss.backward()
    assert all(p.grad is not None for p in model.trainable_parameters())
    assert all(p.grad is None for p in model.anchor.parameters())
    assert not model.anchor.training


def test_default_layer_pairs_rule():
    assert default_layer_pairs(8, 12) == [(3, 5), (7, 11)]
    assert default_layer_pairs(4, 4) == [(3, 3)]
    assert default_layer_pairs(16, 32) == [(3, 7), (7, 15), (11, 23), (15, 31)]
    assert [j for _, j in default_layer_pairs(22, 32)] == [5, 12, 18, 25, 31]  # round half up, not floor
    from calm_dist.planning import costs
    assert costs.default_layer_pairs is default_layer_pairs  # the cost model plans the same mapping
    with pytest.raises(MappingError, match="fewer than every"):
        default_layer_pairs(3, 8)


def test_layer_index_out_of_range_is_refused():
    with pytest.raises(MappingError, match="anchor layer 6 is out of range"):
        composed(layer_pairs=[[(1, 6)]])
    with pytest.raises(MappingError, match="augmenting layer 8 is out of range"):
        composed(layer_pairs=[[(8, 1)]])


def test_augmenting_model_is_truncated_after_its_deepest_layer():
    full = composed(layer_pairs=[[(2, 1), (4, 3)]], truncate_augmenting=False)
    cut = composed(layer_pairs=[[(2, 1), (4, 3)]])
    assert len(cut.augmenting[0].transformer.h) == 5
    x = ids()
    torch.testing.assert_close(cut(x).logits, full(x).logits, atol=1e-6, rtol=0)


def test_augmenting_model_is_held_without_its_lm_head():
    # an untied head never runs (the blocks read hidden states): dropped, and the logits do not change
    full = composed("gpt2", ("llama", "qwen2"), truncate_augmenting=False)
    cut = composed("gpt2", ("llama", "qwen2"))
    for model in cut.augmenting:
        assert model.get_output_embeddings() is None
        assert not any("lm_head" in name for name, _ in model.named_parameters())
    head = full.augmenting[0].get_output_embeddings().weight
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert params(full) - params(cut) >= 2 * head.numel()  # both heads, besides the upper blocks
    x = ids()
    torch.testing.assert_close(cut(x).logits, full(x).logits, atol=1e-6, rtol=0)
    # a head tied to its embedding table (GPT-2's) stays: the table is the embedding
    tied = composed("llama", ("gpt2",)).augmenting[0]
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight


def test_padded_embedding_tables_and_other_pad_ids_compose():
    """One tokenizer may come with tables of other sizes (Qwen2.5-0.5B 151,936 rows, 7B 152,064) and configs that
    set pad differently: configs cannot decide the vocabulary (preflight's tokenizers do,
    tests/integration/test_hub_models.py), so the composition takes them and reads the shared ids."""
    anchor = tiny_model("llama", vocab=128)
    augmenting = tiny_model("gpt2", vocab=VOCAB)
    anchor.config.pad_token_id = None
    model = ComposedModel.from_pretrained(anchor, [augmenting])
    randomize_composition(model)
    x = ids()  # ids < VOCAB: within both tables
    assert model(x).logits.shape == (*x.shape, 128)


def test_unsupported_architecture_names_the_supported_ones():
    import transformers as T

    opt = T.AutoModelForCausalLM.from_config(T.OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=4,
                                                         ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16))
    with pytest.raises(UnsupportedArchitecture, match="supported: gpt2, gpt_neox, llama"):
        ComposedModel.from_pretrained(tiny_model("llama"), [opt])


def _save_models(tmp_path, anchor_family="llama", aug_family="gpt2"):
    anchor = tiny_model(anchor_family, seed=1, hidden=48, layers=6)
    aug = tiny_model(aug_family, seed=2, hidden=32, layers=8)
    anchor.save_pretrained(tmp_path / "anchor")
    aug.save_pretrained(tmp_path / "aug")
    return tmp_path / "anchor", tmp_path / "aug"


def test_save_load_roundtrip_gives_identical_logits(tmp_path):
    anchor, aug = _save_models(tmp_path)
    model = ComposedModel.from_pretrained(anchor, [aug])
    randomize_composition(model)
    model.save_composition(tmp_path / "comp")
    assert sorted(p.name for p in (tmp_path / "comp").iterdir()) == ["README.md", "composition.json",
                                                                     "composition.safetensors"]
    loaded = ComposedModel.from_composition(tmp_path / "comp")
    x = ids()
    torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)
    # paths given explicitly override the recorded ones
    moved = tmp_path / "moved_anchor"
    anchor.rename(moved)
    again = ComposedModel.from_composition(tmp_path / "comp", anchor=moved)
    torch.testing.assert_close(again(x).logits, model(x).logits, atol=0, rtol=0)


def test_loading_onto_mismatched_models_is_refused(tmp_path):
    anchor, aug = _save_models(tmp_path)
    model = ComposedModel.from_pretrained(anchor, [aug])
    model.save_composition(tmp_path / "comp")
    wider = tiny_model("llama", hidden=64, layers=6)
    with pytest.raises(CompositionError, match="anchor hidden_size: saved 48, given 64"):
        ComposedModel.from_composition(tmp_path / "comp", anchor=wider)
    with pytest.raises(CompositionError, match="not a saved composition"):
        ComposedModel.from_composition(tmp_path)


def test_bf16_augmenting_model_under_fp32_training_stays_close():
    """model.augmenting_dtype=bf16: the blocks cast the states to their own dtype and compute in fp32."""
    fp32 = composed("llama", ("gpt2",))
    bf16 = composed("llama", ("gpt2",))
    bf16.augmenting.to(torch.bfloat16)
    x = ids()
    a, b = fp32(x).logits, bf16(x).logits
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    # The bf16 states alone move these logits (|logit| < 0.4) by 4.1e-4 at most; the bound is ~5x that. Blocks
    # that compute in bf16 too (cast along with the augmenting model) move them by 2.5e-3.
    torch.testing.assert_close(b, a, atol=2e-3, rtol=0)


def test_a_deep_copy_composes_with_its_own_blocks():
    """copy.deepcopy(model) (an EMA, a copy cast to bf16 for decoding) is a composition of its own: its hooks read its
    own blocks and its own augmenting states. Hooks that close over the original composed the copy's anchor with the
    original's blocks, or not at all (the original's context is empty while the copy runs)."""
    import copy

    model = composed("llama", ("gpt2", "qwen2")).eval()
    x = ids()
    before = model(x).logits
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(x).logits, before, atol=0, rtol=0)
    randomize_composition(twin, seed=5)
    changed = twin(x).logits
    assert not torch.allclose(changed, before, atol=1e-3)  # the copy reads its own blocks
    torch.testing.assert_close(model(x).logits, before, atol=0, rtol=0)  # and the original still its own
    randomize_composition(model, seed=5)
    torch.testing.assert_close(model(x).logits, changed, atol=1e-6, rtol=0)
    torch.testing.assert_close(twin.generate(x[:1], max_new_tokens=4, eos_token_id=-1),
                               model.generate(x[:1], max_new_tokens=4, eos_token_id=-1))
