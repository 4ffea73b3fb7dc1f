"""`calm-dist eval` of a composition across tokenizers (calm_dist/cross_tokenizer_eval.py through
task_eval.evaluate_set): in batches with left padding and ragged prompts, its answers, exact match and completion
loss equal a reference computed record by record, with decoding that recomputes the whole text each step and the
reference alignment (every prefix read whole)."""
import warnings

import pytest
import torch

from calm_dist.config import DataConfig
from calm_dist.cross_tokenizer_eval import across_tokenizer_fns
from calm_dist.data.text_records import anchor_reading, completion_decoding
from calm_dist.model.cross_tokenizer_generation import RecomputingReader, Text, generate_across_tokenizers
from calm_dist.model.token_alignment import align, read
from calm_dist.task_eval import answer_text, evaluate_set, is_exact_match
from tests.unit.test_cross_tokenizer import PAIRS, IDS, build, tokenizers  # noqa: F401 (a fixture)

PROMPTS = ["reverse: alpha beta =", "reverse: red =", "reverse: theta iota mu =", "reverse: a =",
           "reverse: mu nu xi omicron =", "reverse: beta ="]
NEW = 6


def reference_loss(model, atok, gtok, record) -> tuple[float, int]:
    prompt, completion = record["prompt"], record["completion"]
    p_ids, p_spans = atok.encode_with_spans(prompt)
    c_ids, c_spans = atok.encode_with_spans(completion)
    text = prompt + completion
    ids = torch.tensor([[atok.bos_id, *p_ids, *c_ids, atok.eos_id]])
    spans = torch.tensor([[(0, 0), *p_spans, *((s + len(prompt), e + len(prompt)) for s, e in c_spans),
                           (len(text), len(text))]])
    mask = torch.ones_like(ids)
    aligned = align([text], spans, mask, gtok, pad_id=gtok.pad_id, window=None)
    logits = model(ids, attention_mask=mask, augmenting_inputs=[aligned]).logits[0]
    start = 1 + len(p_ids)  # the completion and eos are labelled
    targets = ids[0, start:]
    loss = torch.nn.functional.cross_entropy(logits[start - 1:-1].float(), targets, reduction="sum")
    return float(loss), len(targets)


@pytest.mark.parametrize("anchor,augmenting", PAIRS, ids=IDS)
def test_eval_across_tokenizers_equals_a_record_by_record_reference(tokenizers, anchor, augmenting):
    atok, gtok = tokenizers[anchor], tokenizers[augmenting]
    model = build(atok, gtok, sharpen=6.0)
    stops = [atok.eos_id]
    with torch.no_grad():
        decoded = [generate_across_tokenizers(model, [p], atok, [gtok], max_new_tokens=NEW, use_cache=False,
                                              eos_token_id=stops).ids[0] for p in PROMPTS]
    # half the records' completions are what the model says, the others are not
    records = [{"prompt": p, "completion": atok.decode([t for t in d if t not in stops]) if i % 2 == 0
                else " beta alpha"} for i, (p, d) in enumerate(zip(PROMPTS, decoded))]
    result = evaluate_set(*across_tokenizer_fns(model, DataConfig(), atok, [gtok], stops), atok, records,
                          batch_size=4, max_new_tokens=NEW, stops=stops)

    references = [atok.encode(r["completion"]) + [atok.eos_id] for r in records]
    hits = sum(is_exact_match(d + [atok.pad_id] * NEW, ref) for d, ref in zip(decoded, references))
    assert len({len(atok.encode(p)) for p in PROMPTS}) > 1 and len({tuple(d) for d in decoded}) > 1
    assert result.exact_match == pytest.approx(hits / len(records))
    assert [e["got"] for e in result.examples] == [answer_text(atok, d, stops) for d in decoded[:5]]
    with torch.no_grad():
        losses = [reference_loss(model, atok, gtok, r) for r in records]
    assert result.loss == pytest.approx(sum(s for s, _ in losses) / sum(n for _, n in losses), rel=1e-5)


# the key-value task's records (no space between a prompt and its completion) and lm-evaluation-harness's (the
# completion starts with the space); each with the decoding that rebuilds its completions from the anchor's ids
GLUED = [{"prompt": "reverse: alpha beta =", "completion": "beta alpha"},
         {"prompt": "reverse: red =", "completion": "red"},
         {"prompt": "reverse: theta iota mu = mu", "completion": "iota theta"}]
SPACED = [dict(r, completion=" " + r["completion"]) for r in GLUED]


def decoded_step_by_step(model, atok, gtok, record, decoding):
    """The prompt, then the record's completion ids one at a time as the anchor would emit them, read as
    generate_across_tokenizers reads them: the text, each token's span and the logits at every step."""
    ids, start, _, _ = anchor_reading(record, "record", DataConfig(), atok)
    step_ids, step_spans = read(atok, record["prompt"])
    assert step_ids == ids[:start]
    text, reader = Text(record["prompt"], atok, step_ids, decoding), RecomputingReader(model, [gtok])
    steps = [reader.prefill(text.value, step_ids, step_spans)]
    for token in ids[start:-1]:  # the completion's ids (eos ends the text)
        begins = len(text.value)
        text.extend(ids[start:len(step_ids) + 1])
        step_ids, step_spans = step_ids + [token], step_spans + [(begins, len(text.value))]
        steps.append(reader.next(text.value, step_ids, step_spans))
    return text.value, step_spans, torch.stack(steps)


@pytest.mark.parametrize("records", [GLUED, SPACED], ids=["glued", "spaced"])
@pytest.mark.parametrize("anchor,augmenting", PAIRS, ids=IDS)
def test_decoding_a_completion_reads_the_text_that_training_read(tokenizers, anchor, augmenting, records):
    """Decoding a record's completion, token by token as the anchor emits it, gives every model the reading that
    training gave it (data/text_records.anchor_reading): the same text, each token ending where it did, and at
    every step the logits of the training forward at that token, with the decoding that completion_decoding picks
    from the records. A SentencePiece anchor reads "beta alpha" and " beta alpha" alike ("▁beta ▁alpha"):
    decoded alone they give the first, after the prompt's ids the second, so each kind of record needs its own (the
    other fails here); a byte-level BPE gives both back either way."""
    atok, gtok = tokenizers[anchor], tokenizers[augmenting]
    model = build(atok, gtok, sharpen=2.0)
    decoding = completion_decoding(records, DataConfig(), atok)
    if anchor == "sentencepiece":
        assert decoding == ("alone" if records is GLUED else "after_prompt")
    for record in records:
        ids, start, text, spans = anchor_reading(record, "record", DataConfig(), atok)
        with torch.no_grad():
            aligned = align([text], torch.tensor([spans]), torch.ones(1, len(ids), dtype=torch.long), gtok,
                            window=None)
            trained = model(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            augmenting_inputs=[aligned]).logits[0]
            decoded, decoded_spans, steps = decoded_step_by_step(model, atok, gtok, record, decoding)
        assert decoded == text
        # where each token ends: what it has read (a SentencePiece lone "▁" before " beta" spans no character in
        # training, and the space in decoding)
        assert [end for _, end in decoded_spans] == [end for _, end in spans[:-1]]
        torch.testing.assert_close(steps, trained[start - 1:-1])


def test_eval_warns_where_a_completion_does_not_read_back_from_the_anchors_ids(tokenizers):
    """Under a decoding that does not give a set's completions back from the anchor's ids (SentencePiece decodes
    "▁iota" alone to "iota", where the record reads " iota"), decoding cannot give the augmenting model the
    record's text, and the evaluation says so once; a byte-level BPE gives it back."""
    for anchor, augmenting, warns in (("sentencepiece", "bpe", True), ("small_bpe", "word", False)):
        atok, gtok = tokenizers[anchor], tokenizers[augmenting]
        fns = across_tokenizer_fns(build(atok, gtok), DataConfig(), atok, [gtok], [atok.eos_id], decoding="alone")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            evaluate_set(*fns, atok, GLUED + SPACED, batch_size=4, max_new_tokens=2)
        said = [str(w.message) for w in caught if "do not read back" in str(w.message)]
        assert said == (["completions such as ' beta alpha' do not read back from the anchor's ids decoded alone: "
                         "decoding gives the augmenting models another text than training did "
                         "(docs/cross_tokenizer.md)"] if warns else [])


@pytest.mark.parametrize("decoding", ["alone", "after_prompt"])
def test_eval_decodes_each_completion_as_the_composition_was_trained(tokenizers, decoding):
    """`calm-dist eval`'s decoding across tokenizers turns the new ids into text with the decoding it is given (the
    one the composition's training records read): its answers are those of that decoding, and on this model and
    these prompts the other decoding answers at least one otherwise."""
    atok, gtok = tokenizers["sentencepiece"], tokenizers["bpe"]
    model = build(atok, gtok, sharpen=2.0, seed=2)
    stops = [atok.eos_id]
    with torch.no_grad():
        answers = {d: [generate_across_tokenizers(model, [p], atok, [gtok], max_new_tokens=NEW, use_cache=False,
                                                  eos_token_id=stops, decoding=d).ids[0] for p in PROMPTS]
                   for d in ("alone", "after_prompt")}
    assert answers["alone"] != answers["after_prompt"]
    records = [{"prompt": p, "completion": "beta"} for p in PROMPTS]
    result = evaluate_set(*across_tokenizer_fns(model, DataConfig(), atok, [gtok], stops, decoding), atok, records,
                          batch_size=4, max_new_tokens=NEW, stops=stops, keep_examples=len(PROMPTS))
    assert [e["got"] for e in result.examples] == [answer_text(atok, d, stops) for d in answers[decoding]]
