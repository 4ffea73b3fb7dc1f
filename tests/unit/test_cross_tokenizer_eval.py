"""`calm-dist eval` of a composition across tokenizers (calm_dist/cross_tokenizer_eval.py through
task_eval.evaluate_set): in batches with left padding and ragged prompts, its answers, exact match and completion
loss equal a reference computed record by record, with decoding that recomputes the whole text each step and the
reference alignment (every prefix read whole)."""
import pytest
import torch

from calm_dist.config import DataConfig
from calm_dist.cross_tokenizer_eval import across_tokenizer_fns
from calm_dist.model.cross_tokenizer_generation import generate_across_tokenizers
from calm_dist.model.token_alignment import align
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
