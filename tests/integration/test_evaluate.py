"""Exact match by greedy decoding, completion loss, and the Table-1-shaped report."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from calm_dist import ComposedModel
from calm_dist.model.io import load_causal_lm
from calm_dist.config import DataConfig
from calm_dist.data.prepare import load_rows
from calm_dist.data.tokenizer import Tokenizer
from calm_dist.model.lm_loss import IGNORE
from calm_dist.task_eval import composed_fns, evaluate_set, format_table, hf_model_fns
from tests.helpers.tiny import random_lora, randomize_composition

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.helpers.tiny import tiny_setup

    return tiny_setup(tmp_path_factory.mktemp("tiny"), n_train=8, n_eval=12)


def records(tiny):
    return [json.loads(line) for line in (tiny / "eval.jsonl").read_text().splitlines()]


def write_jsonl(path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lookup_generator(answers: dict[tuple, list[int]], pad_id: int):
    """A `generate` that continues each (left-padded) prompt with the ids `answers` holds for it, then pads."""
    def generate(ids, mask, n):
        rows = []
        for row, keep in zip(ids.tolist(), mask.tolist()):
            prompt = tuple(t for t, k in zip(row, keep) if k)
            rows.append(row + (answers[prompt] + [pad_id] * n)[:n])
        return torch.tensor(rows)
    return generate


def word_level_tokenizer(directory: Path, eos_token: str | None = "</s>") -> Tokenizer:
    """A transformers tokenizer over a `tokenizers` WordLevel model, one token per digit: decode joins tokens
    with spaces ("1 1 5" for "115"), so it is not the inverse of encode."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "+": 4, "-": 5, "=": 6, **{str(d): 7 + d for d in range(10)}}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token=eos_token, pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(directory)
    return Tokenizer(directory)


def test_exact_match_compares_ids_not_decoded_text(tmp_path):
    """A model that answers every sum with the tokens training labels scores 100% although the tokenizer decodes
    "115" as "1 1 5". Ragged prompts, several batches."""
    tok = word_level_tokenizer(tmp_path / "tokenizer")
    assert tok.decode(tok.encode("115")) == "1 1 5"
    sums = [(3, 4), (12, 103), (7, 85), (250, 1), (9, 9), (31, 64), (5, 995), (40, 2)]
    rows = [{"prompt": f"{a} + {b} =", "completion": str(a + b)} for a, b in sums]
    prepared = load_rows(DataConfig(seq_len=16), str(write_jsonl(tmp_path / "sums.jsonl", rows)), "data.train", tok,
                         tmp_path / "data_cache", workers=1)
    data = prepared.batch(list(range(len(prepared))))
    answers = {}  # training's rows: the prompt as fed, then the labelled tokens (completion and eos)
    for ids, labels, mask in zip(data["input_ids"].tolist(), data["labels"].tolist(), data["attention_mask"].tolist()):
        prompt = [t for t, lab, m in zip(ids, labels, mask) if m and lab == IGNORE]
        answers[tuple(prompt)] = [lab for lab in labels if lab != IGNORE]
    assert len({len(p) for p in answers}) > 1  # ragged prompts: left padding in every batch

    def logits(ids, mask):
        return torch.zeros(*ids.shape, tok.vocab_size)

    result = evaluate_set(lookup_generator(answers, tok.pad_id), logits, tok, rows, batch_size=3)
    assert result.n == len(rows) and result.exact_match == 1.0
    assert result.examples[1] == {"prompt": "12 + 103 =", "expected": "115", "got": "1 1 5", "correct": True}


def test_a_tokenizer_without_eos_cannot_score_exact_match(tmp_path):
    """Without an eos nothing says where an answer stops: one ConfigError line, no number."""
    from calm_dist.config import ConfigError

    tok = word_level_tokenizer(tmp_path / "tokenizer", eos_token=None)
    with pytest.raises(ConfigError, match="end-of-sequence"):
        evaluate_set(lookup_generator({}, tok.pad_id), lambda ids, mask: None, tok,
                     [{"prompt": "1 =", "completion": "1"}])


def test_an_answer_without_eos_is_a_miss_and_the_loss_is_a_token_mean(tiny):
    """Every third row answered then stopped, every third answered and run on with `<s> <s>` (no eos), the rest
    wrong: 4 of 12. The loss, from logits that differ per token, is the mean over all completion tokens,
    computed here with SentencePiece directly, in batches of 5, 5 and 2."""
    import sentencepiece as spm

    tok = Tokenizer(tiny / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(tiny / "tokenizer.model"))
    rows = records(tiny)
    answers = {}
    for i, r in enumerate(rows):
        prompt, completion = [sp.bos_id()] + sp.encode(r["prompt"]), sp.encode(r["completion"])
        stopped, run_on, wrong = completion + [sp.eos_id()], completion + [sp.bos_id()] * 2, [5, 6, sp.eos_id()]
        answers[tuple(prompt)] = [stopped, run_on, wrong][i % 3]
    table = torch.randn(tok.vocab_size, tok.vocab_size, generator=torch.Generator().manual_seed(0)) * 3

    def logits(ids, mask):  # each position's logits depend on its token only: padding cannot change them
        return table[ids]

    result = evaluate_set(lookup_generator(answers, tok.pad_id), logits, tok, rows, batch_size=5)
    assert result.n == 12 and result.exact_match == 4 / 12
    assert [e["correct"] for e in result.examples] == [True, False, False, True, False]
    assert result.examples[1]["got"] == result.examples[1]["expected"].strip()  # what decoded text would have passed

    per_row = []
    for r in rows:
        seq = [sp.bos_id()] + sp.encode(r["prompt"]) + sp.encode(r["completion"]) + [sp.eos_id()]
        n = len(sp.encode(r["completion"])) + 1
        per_row.append([-torch.log_softmax(table[seq[t - 1]], 0)[seq[t]].item() for t in range(len(seq) - n, len(seq))])
    token_mean = sum(map(sum, per_row)) / sum(map(len, per_row))
    row_mean = sum(sum(x) / len(x) for x in per_row) / len(per_row)
    assert abs(token_mean - row_mean) > 1e-2  # the weighting shows in the number
    assert result.loss == pytest.approx(token_mean, rel=1e-5)


def test_composition_at_init_scores_like_its_anchor(tiny):
    tok = Tokenizer(tiny / "tokenizer.model")
    anchor = load_causal_lm(str(tiny / "anchor")).eval()
    composed = ComposedModel.from_pretrained(tiny / "anchor", [tiny / "augmenting"]).eval()
    a = evaluate_set(*hf_model_fns(anchor, tok.eos_id, tok.pad_id), tok, records(tiny), batch_size=4)
    c = evaluate_set(*composed_fns(composed, tok.eos_id, tok.pad_id), tok, records(tiny), batch_size=4)
    assert c.loss == pytest.approx(a.loss, abs=1e-5)
    assert [e["got"] for e in c.examples] == [e["got"] for e in a.examples]
    table = format_table({"anchor": {"eval": a}, "composed": {"eval": c}})
    assert table.splitlines()[0] == "| data set | anchor | composed |"


def test_lora_baseline_is_evaluated_through_the_composition_interface(tiny):
    """LoRA with random B, through composed_fns, scores and decodes like the anchor with B A folded into its
    weights (no peft), and unlike the anchor."""
    from tests.helpers.reference import merged_lora_anchor

    tok = Tokenizer(tiny / "tokenizer.model")
    lora = random_lora(load_causal_lm(str(tiny / "anchor")))
    merged = merged_lora_anchor(load_causal_lm(str(tiny / "anchor")), lora.composition_state_dict()).eval()
    anchor = load_causal_lm(str(tiny / "anchor")).eval()
    result = evaluate_set(*composed_fns(lora, tok.eos_id, tok.pad_id), tok, records(tiny), batch_size=4)
    reference = evaluate_set(*hf_model_fns(merged, tok.eos_id, tok.pad_id), tok, records(tiny), batch_size=4)
    plain = evaluate_set(*hf_model_fns(anchor, tok.eos_id, tok.pad_id), tok, records(tiny), batch_size=4)
    assert result.loss == pytest.approx(reference.loss, abs=1e-5)
    assert [e["got"] for e in result.examples] == [e["got"] for e in reference.examples]
    assert abs(result.loss - plain.loss) > 1e-3
    assert [e["got"] for e in result.examples] != [e["got"] for e in plain.examples]


def answered_rows(model, tok: Tokenizer, n: int = 64, max_new_tokens: int = 6) -> list[dict]:
    """Prompts of the tiny task that `model` answers: its greedy continuation stops (eos) after at least one
    token, and that answer, tokenized again, is what it generated. The rows carry that answer as completion."""
    from calm_dist.tiny_setup import make_records
    from calm_dist.data.tokenizer import completion_ids, prompt_ids

    rows = []
    for r in make_records(n, seed=7):
        x = torch.tensor([prompt_ids(tok, r["prompt"])])
        new = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                             eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)[0, x.shape[1]:].tolist()
        if tok.eos_id in new[1:]:
            answer = tok.decode(new[:new.index(tok.eos_id)])
            if completion_ids(tok, answer) == new[:new.index(tok.eos_id) + 1]:
                rows.append({"prompt": r["prompt"], "completion": answer})
    return rows


def test_eval_and_generate_commands_on_trained_exports(tiny, tmp_path):
    """`calm-dist eval` and `calm-dist generate` end to end on a composition with random blocks and a LoRA export
    with random B: every number equals the same evaluation in this process, and differs from the anchor's."""
    tok = Tokenizer(tiny / "tokenizer.model")
    composed = ComposedModel.from_pretrained(tiny / "anchor", [tiny / "augmenting"]).eval()
    randomize_composition(composed, scale=0.02)
    composed.save_composition(tmp_path / "comp")
    lora = random_lora(load_causal_lm(str(tiny / "anchor")))
    lora.save_composition(tmp_path / "lora")  # PEFT's adapter format
    answered = answered_rows(composed, tok)
    assert answered, "the composition stops with eos on none of the prompts: nothing to score it on"
    eval_set = write_jsonl(tmp_path / "eval.jsonl", answered[:4] + records(tiny))

    overrides = [f"model.anchor={tiny / 'anchor'}", f"model.augmenting=[{tiny / 'augmenting'}]",
                 f"data.tokenizer={tiny / 'tokenizer.model'}", f"train.output_dir={tmp_path / 'run'}",
                 "tracking.enabled=false"]
    report = tmp_path / "eval.json"
    subprocess.run([sys.executable, "-m", "calm_dist.cli", "eval", "--config", str(REPO / "recipes" / "tiny.yaml"),
                    *overrides, "--composition", f"composed={tmp_path / 'comp'}", "--composition",
                    f"lora={tmp_path / 'lora'}", "--set", f"eval={eval_set}", "--models", "anchor", "--batch-size", "5",
                    "--json", str(report)], check=True, capture_output=True, cwd=tmp_path)
    cli = {name: per["eval"] for name, per in json.loads(report.read_text()).items()}

    rows = [json.loads(line) for line in eval_set.read_text().splitlines()]
    anchor = load_causal_lm(str(tiny / "anchor")).eval()
    ours = {"composed": evaluate_set(*composed_fns(composed, tok.eos_id, tok.pad_id), tok, rows, batch_size=5),
            "lora": evaluate_set(*composed_fns(lora, tok.eos_id, tok.pad_id), tok, rows, batch_size=5),
            "anchor": evaluate_set(*hf_model_fns(anchor, tok.eos_id, tok.pad_id), tok, rows, batch_size=5)}
    for name, result in ours.items():
        assert cli[name]["exact_match"] == result.exact_match, name
        assert cli[name]["loss"] == pytest.approx(result.loss, abs=1e-5), name
        assert cli[name]["examples"] == result.examples, name
    assert cli["composed"]["exact_match"] >= min(4, len(answered)) / len(rows) > cli["anchor"]["exact_match"]
    for name in ("composed", "lora"):
        assert abs(cli[name]["loss"] - cli["anchor"]["loss"]) > 1e-3, name
        assert [e["got"] for e in cli[name]["examples"]] != [e["got"] for e in cli["anchor"]["examples"]], name

    prompt = rows[0]["prompt"]
    out = subprocess.run([sys.executable, "-m", "calm_dist.cli", "generate", str(tmp_path / "comp"), "--tokenizer",
                          str(tiny / "tokenizer.model"), "--prompt", prompt, "--max-new-tokens", "6"],
                         check=True, capture_output=True, text=True, cwd=tmp_path).stdout
    ids = torch.tensor([[tok.bos_id] + tok.encode(prompt)])
    expected = composed.generate(ids, max_new_tokens=6, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    assert out.strip() and out.strip() == rows[0]["completion"]
    assert out.strip() == tok.decode([t for t in expected[0, ids.shape[1]:].tolist() if t != tok.pad_id]).strip()
    compiled = subprocess.run([sys.executable, "-m", "calm_dist.cli", "generate", str(tmp_path / "comp"),
                               "--tokenizer", str(tiny / "tokenizer.model"), "--prompt", prompt, "--max-new-tokens", "6",
                               "--compile"], check=True, capture_output=True, text=True, cwd=tmp_path).stdout
    assert compiled == out
