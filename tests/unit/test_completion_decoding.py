"""How decoding across tokenizers turns a completion's ids back into text (data/text_records.completion_decoding):
as the training records' completions read, chosen from the first records of the training sources and recorded in
the export, which `calm-dist eval` and `generate` then use. A SentencePiece anchor reads "beta alpha" and
" beta alpha" alike, so records of the key-value task's kind (no space before the completion) need the ids decoded
alone, and lm-evaluation-harness's kind (the completion starts with the space) decoded after the prompt's."""
import json

import pytest

from calm_dist.config import DataConfig, DataSource
from calm_dist.data.text_records import completion_decoding, training_completion_decoding
from calm_dist.model.completion_text import decoded_completion
from calm_dist.task_eval import recorded_completion_decoding
from tests.helpers.tokenizers import byte_level_bpe, sentencepiece

WORDS = ["alpha", "beta", "red", "theta", "iota", "mu", "gamma"]


def glued(n: int) -> list[dict]:
    return [{"prompt": f"reverse: {WORDS[i % 7]} {WORDS[(i + 2) % 7]} =",
             "completion": f"{WORDS[(i + 2) % 7]} {WORDS[i % 7]}"} for i in range(n)]


def spaced(n: int) -> list[dict]:
    return [dict(r, completion=" " + r["completion"]) for r in glued(n)]


def write(path, records) -> str:
    path.write_text("".join((json.dumps(r) if isinstance(r, dict) else r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizers")
    return {"sentencepiece": sentencepiece(d / "sp.model", 40), "bpe": byte_level_bpe(d / "bpe", 250)}


def test_each_decoding_gives_back_its_kind_of_completion(tokenizers):
    sp, bpe = tokenizers["sentencepiece"], tokenizers["bpe"]
    for record in glued(7) + spaced(7):
        prompt_ids = [sp.bos_id, *sp.encode(record["prompt"])]
        ids = sp.encode(record["completion"])
        assert decoded_completion(sp, prompt_ids, ids, "alone") == record["completion"].lstrip(" ")
        assert decoded_completion(sp, prompt_ids, ids, "after_prompt") == " " + record["completion"].lstrip(" ")
        b_prompt, b_ids = [bpe.bos_id, *bpe.encode(record["prompt"])], bpe.encode(record["completion"])
        assert {decoded_completion(bpe, b_prompt, b_ids, d) for d in ("alone", "after_prompt")} == \
            {record["completion"]}
    assert completion_decoding(glued(7), DataConfig(), sp) == "alone"
    assert completion_decoding(spaced(7), DataConfig(), sp) == "after_prompt"
    assert completion_decoding(spaced(5) + glued(6), DataConfig(), sp) == "alone"  # the most records given back
    assert completion_decoding(glued(7), DataConfig(), bpe) == "after_prompt"  # a tie: a text read on
    with pytest.raises(ValueError, match="decoding 'whole': one of after_prompt, alone"):
        decoded_completion(sp, [], [5], "whole")


def test_a_tokenizer_that_rewrites_the_prompt_counts_as_giving_nothing_back(tokenizers):
    """The choice runs when training ends, before the export: a decoding that cannot rebuild a record (the
    prompt's text rewritten once the completion's ids follow) counts as a miss, never an error."""
    class CleaningUp:  # a decode that drops the space before a "." once more text follows, as a clean-up does
        bos_id = None

        def encode(self, text):
            return [ord(c) for c in text]

        def decode(self, ids):
            text = "".join(map(chr, ids))
            return text.replace(" .", ".") if not text.endswith(" .") else text

    records = [{"prompt": "a .", "completion": "b"}, {"prompt": "c .", "completion": "d"},
               {"prompt": "e", "completion": "f"}]
    with pytest.raises(ValueError, match="rewrote text already read"):
        decoded_completion(CleaningUp(), CleaningUp().encode("a ."), [ord("b")], "after_prompt")
    assert completion_decoding(records, DataConfig(), CleaningUp()) == "alone"


def test_the_training_sources_first_records_decide_and_nothing_after_them_is_read(tokenizers, tmp_path):
    """A directory of two parts (the first shorter than the sample, so the second is read too), a mixture of two
    sources sharing the sample by weight, and lines past the sample that are not JSON at all: never read."""
    sp = tokenizers["sentencepiece"]
    parts = tmp_path / "parts"
    parts.mkdir()
    write(parts / "a.jsonl", glued(3))
    write(parts / "b.jsonl", glued(4) + ["[not a record]"] * 3)
    cfg = DataConfig(train=str(parts))
    assert training_completion_decoding(cfg, sp, sample=7) == "alone"
    with pytest.raises(Exception, match="b.jsonl row 5: invalid JSON"):  # the first line past the sample
        training_completion_decoding(cfg, sp, sample=8)
    mixture = DataConfig(train=[DataSource(source=write(tmp_path / "s.jsonl", spaced(3) + ["[x]"])),
                                DataSource(source=str(parts), weight=3.0)])
    # shared by weight: 2 spaced records and 6 glued ones (the first part's 3 and 3 of the second's)
    assert training_completion_decoding(mixture, sp, sample=8) == "alone"
    assert training_completion_decoding(DataConfig(train=mixture.train[:1]), sp, sample=3) == "after_prompt"
    assert training_completion_decoding(DataConfig(train=str(parts), format="text"), sp) == "after_prompt"


def test_eval_takes_the_exports_record_else_the_recipes_training_records(tokenizers, tmp_path):
    sp = tokenizers["sentencepiece"]

    class Recipe:
        data = DataConfig(train=write(tmp_path / "glued.jsonl", glued(20)))

    assert recorded_completion_decoding({"different_tokenizers": True}, Recipe, sp) == "alone"  # predates the record
    assert recorded_completion_decoding({"completion_decoding": "after_prompt"}, Recipe, sp) == "after_prompt"
    Recipe.data = DataConfig()
    assert recorded_completion_decoding({}, Recipe, sp) == "after_prompt"  # no training records named
