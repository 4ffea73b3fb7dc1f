"""An augmenting model alone across tokenizers, scored by `calm-dist eval` in the reading the composition gives it:
the text prompt + completion read whole and split where the prompt ends (data.tokenizer.whole_text_ids), not the
prompt and the completion read apart. The reference splits another way, by decoding (a byte-level BPE decodes
exactly; tests/helpers/tokenizers.split_by_decoding)."""
import pytest
import torch

from calm_dist.data.tokenizer import completion_ids, prompt_ids, whole_text_ids
from calm_dist.task_eval import evaluate_set, hf_model_fns
from tests.helpers.tiny import tiny_model
from tests.helpers.tokenizers import byte_level_bpe, sentencepiece, split_by_decoding, word_level

CONTEXTS = ["reverse: alpha beta =", "reverse: red =", "reverse: theta iota mu =", "reverse: a =",
            "reverse: mu nu xi omicron =", "reverse: beta =", "reverse: eight epsilon rho =", "reverse: phi beta =",
            "reverse: three white =", "reverse: black alpha white =", "reverse: xi =", "reverse: rho sigma ="]
NEW = 6


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizers")
    return {"bpe": byte_level_bpe(d / "bpe", 250), "word": word_level(d / "word"),
            "sentencepiece": sentencepiece(d / "sp.model", 40)}


def reversed_words(context: str) -> str:
    return " ".join(reversed(context.removeprefix("reverse: ").removesuffix(" =").split()))


def test_the_whole_texts_tokens_split_where_the_prompt_ends(tokenizers):
    bpe, word = tokenizers["bpe"], tokenizers["word"]
    records = [(c + " ", reversed_words(c)) for c in CONTEXTS] + [(c, " " + reversed_words(c)) for c in CONTEXTS]
    for prompt, completion in records:
        assert whole_text_ids(bpe, prompt, completion) == split_by_decoding(bpe, prompt, completion)
        # a word-level tokenizer reads a prompt's words alone as within the text
        assert whole_text_ids(word, prompt, completion) == (prompt_ids(word, prompt), completion_ids(word, completion))
    # read apart, the prompt's trailing space is a token of its own where the text merges it into the next word
    assert sum(whole_text_ids(bpe, c + " ", reversed_words(c)) != (prompt_ids(bpe, c + " "),
                                                                   completion_ids(bpe, reversed_words(c)))
               for c in CONTEXTS) >= 6


def test_a_token_across_the_cut_belongs_to_the_completion(tokenizers):
    """The cut falls inside a token (the prompt ends mid-word): that token is the completion's first, and the
    prompt's part is every token that ends within the prompt. A SentencePiece side reads the completion's word
    alone with a word-start mark that the text does not give it."""
    bpe, sp = tokenizers["bpe"], tokenizers["sentencepiece"]
    prompt, reference = whole_text_ids(bpe, "reverse: alpha be", "ta = beta alpha")
    ids, spans = bpe.encode_with_spans("reverse: alpha beta = beta alpha")
    inside = next(i for i, (start, end) in enumerate(spans) if start < len("reverse: alpha be") < end)
    assert prompt == [bpe.bos_id, *ids[:inside]] and reference == [*ids[inside:], bpe.eos_id]
    assert bpe.decode(reference[:-1]).startswith(" beta")
    prompt, reference = whole_text_ids(sp, "reverse: alpha beta =", "beta alpha")
    assert prompt[1:] + reference[:-1] == sp.encode("reverse: alpha beta =beta alpha")
    assert reference != completion_ids(sp, "beta alpha")


def trained_on_whole_texts(tok, records, steps: int = 300):
    """A tiny GPT-2 that learns `records` read as a model reads text: bos + the whole text + eos."""
    torch.manual_seed(0)
    model = tiny_model("gpt2", seed=3, hidden=64, layers=2, heads=4, vocab=tok.vocab_size).train()
    rows = [[tok.bos_id, *tok.encode(r["prompt"] + r["completion"]), tok.eos_id] for r in records]
    width = max(map(len, rows))
    ids = torch.tensor([row + [tok.pad_id] * (width - len(row)) for row in rows])
    labels = torch.tensor([row + [-100] * (width - len(row)) for row in rows])
    mask = (labels != -100).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
    return model.eval()


def test_an_augmenting_model_alone_is_scored_in_its_reading_of_the_whole_text(tokenizers):
    """A model trained on half the records read whole, over three batches with left padding (prompts end with a
    space, which a byte-level BPE reads within the completion's first token): exact match and completion loss equal
    a reference computed record by record, split by decoding. Read apart, the prompt ends in a lone space
    token the model never saw, and the same records score otherwise."""
    tok = tokenizers["bpe"]
    records = [{"prompt": c + " ", "completion": reversed_words(c)} for c in CONTEXTS]
    model = trained_on_whole_texts(tok, records[::2])
    result = evaluate_set(*hf_model_fns(model, [tok.eos_id], tok.pad_id), tok, records, batch_size=5,
                          max_new_tokens=NEW, stops=[tok.eos_id], whole_text=True)

    hits, summed, count = 0, 0.0, 0
    with torch.no_grad():
        for record in records:
            prompt, reference = split_by_decoding(tok, record["prompt"], record["completion"])
            ids = torch.tensor([prompt])
            new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                                 eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
            hits += new[:len(reference)] == reference
            full = torch.tensor([prompt + reference])
            logits = model(full).logits[0, len(prompt) - 1:-1]
            summed += float(torch.nn.functional.cross_entropy(logits.float(), full[0, len(prompt):],
                                                              reduction="sum"))
            count += len(reference)
    assert 2 <= hits < len(records)
    assert result.exact_match == pytest.approx(hits / len(records))
    assert result.loss == pytest.approx(summed / count, rel=1e-5)
    apart = evaluate_set(*hf_model_fns(model, [tok.eos_id], tok.pad_id), tok, records, batch_size=5,
                         max_new_tokens=NEW, stops=[tok.eos_id])
    assert (apart.exact_match, apart.loss) != (result.exact_match, pytest.approx(result.loss))


def test_a_prompt_that_reads_to_no_token_is_refused_with_its_record(tokenizers, tmp_path):
    """A tokenizer without bos gives nothing to generate from where the prompt reads to no token of its own: the
    record is named in one line, not scored as a row of padding. Here the 5th record (batch 2 of 3) cuts its first
    word, which the text reads as one token that runs into the completion."""
    from transformers import PreTrainedTokenizerFast

    from calm_dist.config import ConfigError
    from calm_dist.data.tokenizer import Tokenizer

    bpe = tokenizers["bpe"]
    PreTrainedTokenizerFast.from_pretrained(bpe.path, bos_token=None).save_pretrained(tmp_path / "no_bos")
    tok = Tokenizer(tmp_path / "no_bos")
    assert tok.bos_id is None and len(bpe.encode("reverse")) == 1
    records = [{"prompt": c + " ", "completion": reversed_words(c)} for c in CONTEXTS[:9]]
    records[4] = {"prompt": "rev", "completion": "erse: red = red"}
    model = tiny_model("gpt2", seed=3, hidden=32, layers=1, heads=2, vocab=tok.vocab_size).eval()
    fns = hf_model_fns(model, [tok.eos_id], tok.pad_id)
    with pytest.raises(ConfigError, match="record 4 of the set reads to no prompt token"):
        evaluate_set(*fns, tok, records, batch_size=4, max_new_tokens=NEW, whole_text=True)
    records[4] = {"prompt": "", "completion": "reverse: red = red"}
    with pytest.raises(ConfigError, match="record 4 of the set"):
        evaluate_set(*fns, tok, records, batch_size=4, max_new_tokens=NEW)
