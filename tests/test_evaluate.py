"""Exact match by greedy decoding, completion loss, and the Table-1-shaped report."""
import json

import pytest
import torch

from calm_dist import ComposedModel
from calm_dist.data import Tokenizer
from calm_dist.evaluate import composed_fns, evaluate_set, format_table, hf_model_fns


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny import tiny_setup

    return tiny_setup(tmp_path_factory.mktemp("tiny"), n_train=8, n_eval=12)


def records(tiny):
    return [json.loads(line) for line in (tiny / "eval.jsonl").read_text().splitlines()]


def test_exact_match_scores_what_the_model_decodes(tiny):
    """A decoder that emits the reference for even rows and garbage for odd rows scores exactly 50%."""
    tok = Tokenizer(tiny / "tokenizer.model")
    rows = records(tiny)
    answers = {tuple([tok.bos_id] + tok.encode(r["prompt"])): tok.encode(r["completion"]) + [tok.eos_id] for r in rows}
    order = [tuple([tok.bos_id] + tok.encode(r["prompt"])) for r in rows]

    def generate(ids, mask, n):
        out = []
        for row, m in zip(ids.tolist(), mask.tolist()):
            prompt = tuple(t for t, keep in zip(row, m) if keep)
            new = answers[prompt] if order.index(prompt) % 2 == 0 else [5, 6, tok.eos_id]
            out.append(row + (new + [tok.pad_id] * n)[:n])
        return torch.tensor(out)

    def logits(ids, mask):
        return torch.zeros(*ids.shape, tok.vocab_size)

    result = evaluate_set(generate, logits, tok, rows, batch_size=5)
    assert result.n == 12 and result.exact_match == 0.5
    assert result.loss == pytest.approx(torch.log(torch.tensor(float(tok.vocab_size))).item(), rel=1e-5)
    assert result.examples[0]["correct"] and not result.examples[1]["correct"]


def test_composition_at_init_scores_like_its_anchor(tiny):
    from calm_dist.composition import load_causal_lm

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
    """LoRA starts with B = 0: through composed_fns it must decode and score exactly like its anchor."""
    from calm_dist.baselines import LoRAAnchor
    from calm_dist.composition import load_causal_lm

    tok = Tokenizer(tiny / "tokenizer.model")
    anchor = evaluate_set(*hf_model_fns(load_causal_lm(str(tiny / "anchor")).eval(), tok.eos_id, tok.pad_id),
                          tok, records(tiny), batch_size=4)
    lora = LoRAAnchor(load_causal_lm(str(tiny / "anchor")), rank=2, targets=["q_proj", "v_proj"]).eval()
    result = evaluate_set(*composed_fns(lora, tok.eos_id, tok.pad_id), tok, records(tiny), batch_size=4)
    assert result.loss == pytest.approx(anchor.loss, abs=1e-5)
    assert [e["got"] for e in result.examples] == [e["got"] for e in anchor.examples]


def test_eval_and_generate_commands_on_a_saved_composition(tiny, tmp_path):
    """`calm-dist eval` and `calm-dist generate` end to end: a composition saved at init scores and decodes
    exactly like its anchor."""
    import subprocess
    import sys
    from pathlib import Path

    from calm_dist.composition import load_causal_lm

    repo = Path(__file__).resolve().parent.parent
    ComposedModel.from_pretrained(tiny / "anchor", [tiny / "augmenting"]).save_composition(tmp_path / "comp")
    overrides = [f"model.anchor={tiny / 'anchor'}", f"model.augmenting=[{tiny / 'augmenting'}]",
                 f"data.tokenizer={tiny / 'tokenizer.model'}", f"train.output_dir={tmp_path / 'run'}",
                 "tracking.enabled=false"]
    report = tmp_path / "eval.json"
    subprocess.run([sys.executable, "-m", "calm_dist.cli", "eval", "--config", str(repo / "recipes" / "tiny.yaml"),
                    *overrides, "--composition", f"composed={tmp_path / 'comp'}", "--set", f"eval={tiny / 'eval.jsonl'}",
                    "--models", "anchor", "--json", str(report)], check=True, capture_output=True, cwd=tmp_path)
    results = json.loads(report.read_text())
    assert results["composed"]["eval"]["exact_match"] == results["anchor"]["eval"]["exact_match"]
    assert results["composed"]["eval"]["loss"] == pytest.approx(results["anchor"]["eval"]["loss"], abs=1e-5)

    tok = Tokenizer(tiny / "tokenizer.model")
    prompt = records(tiny)[0]["prompt"]
    out = subprocess.run([sys.executable, "-m", "calm_dist.cli", "generate", str(tmp_path / "comp"), "--tokenizer",
                          str(tiny / "tokenizer.model"), "--prompt", prompt, "--max-new-tokens", "6"],
                         check=True, capture_output=True, text=True, cwd=tmp_path).stdout
    ids = torch.tensor([[tok.bos_id] + tok.encode(prompt)])
    expected = load_causal_lm(str(tiny / "anchor")).generate(ids, max_new_tokens=6, do_sample=False,
                                                             eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    assert out.strip()  # something was decoded
    assert out.strip() == tok.decode([t for t in expected[0, ids.shape[1]:].tolist() if t != tok.pad_id]).strip()
