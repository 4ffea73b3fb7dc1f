"""The cost model and `calm-dist plan` with augmenting models of other tokenizers: the augmenting side computes its
own row (data.augmenting_seq_len) plus the tails per anchor row, term by term as written out plainly here; the
same-tokenizer terms are unchanged; the tails' estimate is within 2x of what alignment gives on the tested pairs."""
import json

import pytest

from calm_dist.model.token_alignment import align, read_batch
from calm_dist.planning import costs
from calm_dist.planning.plan import plan
from calm_dist.planning.plan_cli import main
from calm_dist.model import shapes
from calm_dist.tiny_setup import make_records
from tests.helpers.tokenizers import byte_level_bpe, sentencepiece, word_level

PAIRS = [[(3, 4), (7, 12)]]


def test_one_tokenizer_keeps_its_terms_and_an_augmenting_row_of_the_anchors_length_without_tails_equals_it():
    same = costs.step_cost("llama-7b", "llama-1b", PAIRS, seq_len=2048)
    own = costs.step_cost("llama-7b", "llama-1b", PAIRS, seq_len=2048, augmenting_seq_len=2048, tail_fraction=0.0)
    assert own.as_dict() == pytest.approx(same.as_dict())


def test_the_augmenting_side_computes_its_own_row_and_the_tails_per_anchor_token():
    anchor, aug = costs.model_spec("llama-7b"), costs.model_spec("llama-1b")
    seq, aug_len, tails = 2048, 1024, 0.75
    r = aug_len * (1 + tails) / seq  # augmenting tokens per anchor token
    got = costs.step_cost(anchor, aug, PAIRS, seq_len=seq, augmenting_seq_len=aug_len, tail_fraction=tails)
    same = costs.step_cost(anchor, aug, PAIRS, seq_len=seq)
    assert got.aug_forward == pytest.approx(r * 8 * (2 * costs.param_counts(aug).matmul_per_block
                                                      + 4 * aug.d_attn * (aug_len + 1) / 2))
    da, db = aug.hidden_size, anchor.hidden_size
    keys = 4 * db * (aug_len + 1) / 2  # the cross attention reads the augmenting positions
    per_block = 2 * (r * (da * db + 2 * db * db) + 2 * db * db) + keys
    assert got.blocks_forward == pytest.approx(2 * per_block)
    assert got.blocks_backward == pytest.approx(2 * (2 * (r * (da * db + 2 * db * db) + 2 * db * db)
                                                     + 4 * db * db * (1 + r) + 2 * keys))
    assert shapes.block_matmul_parameter_count(da, db) == da * db + 4 * db * db
    for term in ("anchor_forward", "anchor_backward", "recompute"):
        assert getattr(got, term) == getattr(same, term), term


def test_plan_counts_the_augmenting_rows_in_its_flops_and_cache_and_the_cli_takes_them(capsys):
    kw = dict(seq_len=2048, tokens=1e9)
    same = plan("llama-7b", "llama-1b", PAIRS, **kw)
    own = plan("llama-7b", "llama-1b", PAIRS, augmenting_seq_len=1024, tail_fraction=1.0, **kw)
    assert own.cache["bytes_per_token"] == pytest.approx(same.cache["bytes_per_token"])  # 1024 * 2 per 2048
    assert own.step_cost["aug_forward"] < same.step_cost["aug_forward"]  # a shorter context per token
    estimated = plan("llama-7b", "llama-1b", PAIRS, augmenting_seq_len=1024, **kw)
    r = 1024 * (1 + costs.estimated_tail_fraction(2048, 1024)) / 2048
    assert estimated.cache["bytes_per_token"] == pytest.approx(r * same.cache["bytes_per_token"])
    assert main(["--anchor", "llama-7b", "--augmenting", "llama-1b", "--pairs", "3:4,7:12", "--seq-len", "2048",
                 "--augmenting-seq-len", "1024", "--tail-fraction", "1.0", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["inputs"]["augmenting_seq_len"] == 1024 and printed["inputs"]["tail_fraction"] == 1.0
    assert printed["step_cost"]["aug_forward"] == pytest.approx(own.step_cost["aug_forward"])


def test_the_augmenting_rows_activations_scale_with_their_tokens_per_anchor_token():
    """The composed layers' states and the blocks' augmenting-side tensors (proj and LN out, k, v: 4 of the 8
    D_B-wide tensors a block keeps per token) grow with the augmenting tokens per anchor token; the anchor's do
    not. The plan passes its r."""
    from calm_dist.planning.activation_memory import activation_memory

    kw = dict(tokens=4096, dtype="bf16")
    same = activation_memory("llama-7b", "llama-1b", PAIRS, **kw)
    own = activation_memory("llama-7b", "llama-1b", PAIRS, augmenting_per_token=2.5, **kw)
    assert own.aug_states == pytest.approx(2.5 * same.aug_states)
    assert own.blocks_saved == pytest.approx(same.blocks_saved * (4 + 4 * 2.5) / 8)
    assert (own.anchor_saved, own.loss, own.transient) == (same.anchor_saved, same.loss, same.transient)
    p = plan("llama-7b", "llama-1b", PAIRS, seq_len=4096, augmenting_seq_len=2048, tail_fraction=4.0)
    assert p.activations["aug_states"] == pytest.approx(2.5 * same.aug_states)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizers")
    return {"word": word_level(d / "word"), "bpe": byte_level_bpe(d / "bpe", 250),
            "small_bpe": byte_level_bpe(d / "small_bpe", 60), "sentencepiece": sentencepiece(d / "sp.model", 40)}


@pytest.mark.parametrize("anchor,augmenting", [("small_bpe", "word"), ("sentencepiece", "bpe"),
                                               ("sentencepiece", "small_bpe"), ("bpe", "sentencepiece")])
def test_the_tails_estimate_is_within_2x_of_the_tails_alignment_gives(tokenizers, anchor, augmenting):
    """Rows of the same texts: the anchor's tokens over the augmenting reading's give the lengths' ratio; the
    tails the alignment builds, over the augmenting reading's tokens, are what the estimate stands for."""
    texts = [r["prompt"] + r["completion"] for r in make_records(100, seed=9)]
    ids, mask, spans = read_batch(texts, tokenizers[anchor])
    aligned = align(texts, spans, mask, tokenizers[augmenting])
    real = aligned.attention_mask.bool()
    whole, tails = int((real & (aligned.reading == 0)).sum()), int((real & (aligned.reading > 0)).sum())
    estimate = costs.estimated_tail_fraction(int(mask.sum()), whole)
    measured = tails / whole
    assert (estimate == 0 and measured < 0.05) or 0.5 < estimate / measured < 2, (estimate, measured)
