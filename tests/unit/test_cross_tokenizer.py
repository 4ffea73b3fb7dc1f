"""Composing models of different tokenizers (calm_dist/model/token_alignment.py, cross_tokenizer_generation.py): a
Llama anchor and a GPT-2 augmenting model read the same text through their own tokenizers, built here: a small
byte-level BPE anchor with a word-level augmenting tokenizer, and a small SentencePiece anchor with a larger
byte-level BPE. Each anchor token reads the augmenting model's reading of the text up to its end; the tests check that
definition, causality in characters, padding, identity at init, save/load and cached decoding."""
import pytest
import torch

from calm_dist import ComposedModel
from calm_dist.model.cross_tokenizer_generation import generate_across_tokenizers
from calm_dist.model.token_alignment import align, read, read_batch
from tests.helpers.tiny import randomize_composition, sharpened, tiny_model
from tests.helpers.tokenizers import byte_level_bpe, sentencepiece, word_level

PAIRS = [("small_bpe", "word"), ("sentencepiece", "bpe")]  # (anchor's tokenizer, augmenting model's)
IDS = [f"{a}+{b}" for a, b in PAIRS]
TEXTS = ["reverse: alpha beta = beta alpha", "reverse: red = red", "reverse: theta iota mu = mu iota theta"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizers")
    return {"word": word_level(d / "word"), "bpe": byte_level_bpe(d / "bpe", 250),
            "small_bpe": byte_level_bpe(d / "small_bpe", 60), "sentencepiece": sentencepiece(d / "sp.model", 40)}


def build(anchor_tok, augmenting_tok, randomize=True, sharpen=1.0, seed=1):
    anchor = tiny_model("llama", seed=seed, hidden=48, layers=4, heads=4, vocab=anchor_tok.vocab_size)
    augmenting = tiny_model("gpt2", seed=seed + 1, hidden=32, layers=4, heads=4, vocab=augmenting_tok.vocab_size)
    if sharpen != 1.0:
        sharpened(anchor, sharpen)
        sharpened(augmenting, sharpen)
    model = ComposedModel.from_pretrained(anchor, [augmenting], layer_pairs=[[(1, 1), (3, 3)]])
    if randomize:
        randomize_composition(model, scale=0.5)
    return model.eval()


def composed_logits(model, texts, anchor_tok, augmenting_tok, anchor_side="right", augmenting_side="right"):
    ids, mask, spans = read_batch(texts, anchor_tok, padding_side=anchor_side)
    aligned = align(texts, spans, mask, augmenting_tok, padding_side=augmenting_side)
    with torch.no_grad():
        return model(ids, attention_mask=mask, augmenting_inputs=[aligned]).logits, mask


@pytest.mark.parametrize("anchor,augmenting", PAIRS, ids=IDS)
def test_each_anchor_token_reads_the_augmenting_reading_of_the_text_up_to_its_end(tokenizers, anchor, augmenting):
    """Against the definition: anchor token t reads exactly the tokens (ids, spans, positions) the augmenting
    tokenizer gives text[:end(t)], with the states the augmenting model gives them reading that prefix alone;
    some prefixes read otherwise than the whole text (merges across the boundary), so tails are exercised."""
    atok, gtok = tokenizers[anchor], tokenizers[augmenting]
    model = build(atok, gtok)
    ids, mask, spans = read_batch(TEXTS, atok, padding_side="left")
    aligned = align(TEXTS, spans, mask, gtok, padding_side="left")
    visible = aligned.cross_attention_mask(mask)[:, 0]
    states = model.run_augmenting_each([aligned.model_inputs()])[0]
    assert aligned.has_tails
    for b, text in enumerate(TEXTS):
        for t in range(ids.shape[1]):
            seen = visible[b, t].nonzero().flatten()
            if not mask[b, t]:
                assert len(seen) == 0
                continue
            want_ids, want_spans = read(gtok, text[:int(spans[b, t, 1])])
            assert aligned.input_ids[b, seen].tolist() == want_ids
            assert aligned.spans[b, seen].tolist() == [list(s) for s in want_spans]
            assert aligned.position_ids[b, seen].tolist() == list(range(len(want_ids)))
            alone = model.run_augmenting_each([(torch.tensor([want_ids]), torch.ones(1, len(want_ids)), None)])[0]
            for layer, state in states.items():
                torch.testing.assert_close(state[b, seen], alone[layer][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("anchor,augmenting", PAIRS, ids=IDS)
def test_text_after_a_character_never_changes_the_logits_of_anchor_tokens_ending_before_it(tokenizers, anchor,
                                                                                             augmenting):
    """Every cut c of a text, continued otherwise (a letter that merges, a new word, another text's end): anchor
    tokens that both readings share and that end at or before c keep their logits. The continuations change the
    augmenting tokens that end before c in the whole text's reading (what a rule over it would leak)."""
    atok, gtok = tokenizers[anchor], tokenizers[augmenting]
    model = build(atok, gtok)
    text, other = TEXTS[2], "reverse: theta iota pi = pi iota theta"
    variants = [(c, text[:c] + rest) for c in range(1, len(text)) for rest in ("a", " nu", other[c:]) if
                text[:c] + rest != text]
    reference, _ = composed_logits(model, [text], atok, gtok)
    logits, _ = composed_logits(model, [v for _, v in variants], atok, gtok)
    ref_ids, ref_spans = read(atok, text)
    whole = list(zip(*read(gtok, text)))
    checked, leaky = 0, 0
    for row, (c, variant) in enumerate(variants):
        var_ids, var_spans = read(atok, variant)
        var_whole = list(zip(*read(gtok, variant)))
        for t in range(len(ref_ids)):
            if t >= len(var_ids) or (ref_ids[t], ref_spans[t]) != (var_ids[t], var_spans[t]) or ref_spans[t][1] > c:
                break
            torch.testing.assert_close(logits[row, t], reference[0, t], atol=1e-5, rtol=0)
            end = ref_spans[t][1]
            leaky += [s for s in whole if s[1][1] <= end] != [s for s in var_whole if s[1][1] <= end]
            checked += 1
    assert checked > 100 and leaky > 0, (checked, leaky)


@pytest.mark.parametrize("anchor_side,augmenting_side", [("left", "left"), ("left", "right"), ("right", "left")])
@pytest.mark.parametrize("anchor,augmenting", PAIRS, ids=IDS)
def test_padding_on_either_side_changes_nothing(tokenizers, anchor, augmenting, anchor_side, augmenting_side):
    atok, gtok = tokenizers[anchor], tokenizers[augmenting]
    model = build(atok, gtok)
    logits, mask = composed_logits(model, TEXTS, atok, gtok, anchor_side, augmenting_side)
    assert not bool(mask.all())
    for b, text in enumerate(TEXTS):
        alone, _ = composed_logits(model, [text], atok, gtok)
        torch.testing.assert_close(logits[b][mask[b].bool()], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("anchor,augmenting", PAIRS, ids=IDS)
def test_at_init_the_composition_is_the_anchor(tokenizers, anchor, augmenting):
    atok, gtok = tokenizers[anchor], tokenizers[augmenting]
    model = build(atok, gtok, randomize=False)
    ids, mask, spans = read_batch(TEXTS, atok, padding_side="left")
    aligned = align(TEXTS, spans, mask, gtok, padding_side="left")
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels, return_logits=True, augmenting_inputs=[aligned])
        anchor_logits = model.anchor_logits(ids, attention_mask=mask)
    assert aligned.has_tails
    assert torch.equal(out.logits, anchor_logits)
    randomize_composition(model)
    with torch.no_grad():
        assert not torch.allclose(model(ids, attention_mask=mask, augmenting_inputs=[aligned]).logits, anchor_logits)


class WithoutBos:
    """An augmenting tokenizer that puts no bos first: at character 0 its reading is empty."""

    bos_id = None

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode_with_spans(self, text):
        return self.tokenizer.encode_with_spans(text)


def test_an_anchor_token_with_no_augmenting_token_read_yet_keeps_the_anchors_logits_exactly(tokenizers):
    """The anchor's bos ends at character 0, where an augmenting tokenizer without bos has read nothing: the
    block adds exactly zero there, and real updates everywhere else."""
    atok, gtok = tokenizers["sentencepiece"], tokenizers["bpe"]
    model = build(atok, gtok)
    ids, mask, spans = read_batch(TEXTS, atok, padding_side="left")
    aligned = align(TEXTS, spans, mask, WithoutBos(gtok), padding_side="left")
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, augmenting_inputs=[aligned]).logits
        anchor_logits = model.anchor_logits(ids, attention_mask=mask)
    first = mask.argmax(dim=1)  # each row's bos
    rows = torch.arange(len(TEXTS))
    assert torch.equal(logits[rows, first], anchor_logits[rows, first])
    assert not torch.allclose(logits[rows, first + 1], anchor_logits[rows, first + 1], atol=1e-3)


@pytest.mark.parametrize("decoding", ["after_prompt", "alone"])
@pytest.mark.parametrize("anchor,augmenting", PAIRS, ids=IDS)
def test_cached_decoding_gives_the_tokens_of_full_recomputation(tokenizers, anchor, augmenting, decoding):
    """Greedy decoding with one KV cache per model, rolled back where the augmenting reading's last tokens change
    (it happens here), gives exactly the tokens of recomputing the composed forward over the whole text each step,
    the new ids decoded after the prompt's or alone (model/completion_text.decoded_completion); and the augmenting model matters
    (without the blocks the tokens differ)."""
    atok, gtok = tokenizers[anchor], tokenizers[augmenting]
    model = build(atok, gtok, sharpen=2.0, seed=2)  # a seed whose tokens merge across the boundary
    prompts = ["reverse: alpha", "reverse: red green =", "reverse: mu"]
    kw = dict(max_new_tokens=16, eos_token_id=-1, decoding=decoding)
    cached = generate_across_tokenizers(model, prompts, atok, [gtok], use_cache=True, **kw)
    recomputed = generate_across_tokenizers(model, prompts, atok, [gtok], use_cache=False, **kw)
    assert cached.ids == recomputed.ids and cached.texts == recomputed.texts
    assert all(len(ids) == 16 for ids in cached.ids)
    assert cached.rollbacks > 0, cached.texts
    with torch.no_grad():
        for block in model.blocks[0]:
            block.o_proj.weight.zero_()
    assert generate_across_tokenizers(model, prompts, atok, [gtok], **kw).ids != cached.ids


def test_a_saved_composition_loads_and_reads_across_tokenizers_unchanged(tokenizers, tmp_path):
    atok, gtok = tokenizers["sentencepiece"], tokenizers["bpe"]
    model = build(atok, gtok)
    model.save_composition(tmp_path / "composition")
    fresh = build(atok, gtok, randomize=False)
    loaded = ComposedModel.from_composition(tmp_path / "composition", anchor=fresh.anchor,
                                            augmenting=list(fresh.augmenting))
    assert torch.equal(composed_logits(loaded, TEXTS, atok, gtok)[0], composed_logits(model, TEXTS, atok, gtok)[0])


def test_spans_are_character_offsets_for_every_kind_of_tokenizer(tokenizers):
    """SentencePiece reports UTF-8 byte offsets and transformers' fast tokenizers character offsets: both come out
    in characters, with the ids encode() gives."""
    text = "reverse: ü alpha =  beta"
    for tok in tokenizers.values():
        ids, spans = tok.encode_with_spans(text)
        assert ids == tok.encode(text)
        assert all(0 <= s <= e <= len(text) for s, e in spans)
        assert [s for s, _ in spans] == sorted(s for s, _ in spans)
    _, spans = tokenizers["sentencepiece"].encode_with_spans(text)
    assert spans[-1][1] == len(text) and any(text[s:e] == " alpha" for s, e in spans)  # past "ü": not bytes


def test_eager_attention_reads_the_tails_as_sdpa_does(tokenizers):
    """The tails need a custom 4D mask in the augmenting model: booleans for SDPA, an additive float mask for eager
    attention (backbones.custom_attention_mask)."""
    atok, gtok = tokenizers["sentencepiece"], tokenizers["bpe"]
    model = build(atok, gtok)
    ids, mask, spans = read_batch(TEXTS, atok, padding_side="left")
    aligned = align(TEXTS, spans, mask, gtok, padding_side="left")
    assert aligned.has_tails
    sdpa = model.run_augmenting_each([aligned.model_inputs()])[0]
    model.augmenting[0].set_attn_implementation("eager")
    assert model.augmenting[0].config._attn_implementation == "eager"
    eager = model.run_augmenting_each([aligned.model_inputs()])[0]
    real = aligned.attention_mask.bool()
    for layer in sdpa:
        torch.testing.assert_close(eager[layer][real], sdpa[layer][real], atol=1e-5, rtol=0)
