"""lm-evaluation-harness on saved compositions (`--model calm`, calm_dist/harness.py), offline: task YAMLs over a
local JSONL, a tiny composition. At init it scores exactly as its anchor does under lm-eval's own HF model; trained
a few steps it scores otherwise, and where lm-eval and `calm-dist eval` measure the same thing (the completion's
loss, greedy exact match, the greedy answers) they agree."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from calm_dist import ComposedModel
from calm_dist.data.tokenizer import Tokenizer, completion_ids, prompt_ids
from calm_dist.tiny_setup import make_records
from tests.helpers.launch import REPO, base_env
from tests.helpers.lm_eval_setup import models, task_yaml, write_jsonl
from tests.helpers.required import unavailable

TASKS = ["tiny_ll", "tiny_gen", "tiny_roll"]
MAX_GEN = 6


def train_a_few_steps(model: ComposedModel, tok: Tokenizer, records: list[dict], steps: int = 20) -> None:
    """AdamW on the blocks alone, the whole set each step (the README's Python example): enough for the
    composition to answer these prompts with their completion."""
    rows = [(prompt_ids(tok, r["prompt"]), completion_ids(tok, r["completion"])) for r in records]
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), tok.pad_id)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (p, c) in enumerate(rows):
        ids[i, width - len(p) - len(c):], mask[i, width - len(p) - len(c):] = torch.tensor(p + c), 1
        labels[i, width - len(c):] = torch.tensor(c)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.fixture(scope="module", autouse=True)
def lm_eval():
    """lm-evaluation-harness, the lm-eval extra: `make test` installs it, so CI must run these tests."""
    try:
        import lm_eval
    except ImportError as e:
        unavailable("lm-evaluation-harness (pip install 'calm-dist[lm-eval]')", str(e))
    import calm_dist.harness  # noqa: F401  (registers the model "calm")

    return lm_eval


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval")
    anchor, augmenting = models(d)
    tok = Tokenizer(anchor)
    ComposedModel.from_pretrained(anchor, [augmenting]).save_composition(d / "init")
    # 8 prompts the composition learns to answer "alpha", then 8 others with their reversed words
    taught = [{"prompt": r["prompt"], "completion": "alpha"} for r in make_records(8, seed=3)]
    torch.manual_seed(0)  # the blocks' initial weights
    trained = ComposedModel.from_pretrained(anchor, [augmenting])
    train_a_few_steps(trained, tok, taught)
    trained.save_composition(d / "trained")
    held_out = [{"prompt": r["prompt"], "completion": r["completion"].strip()} for r in make_records(8, seed=4)]
    data = write_jsonl(d / "eval.jsonl", taught + held_out)
    tasks = d / "tasks"
    tasks.mkdir()
    # the continuation ends with eos, as the completions calm-dist eval scores do ("</s>" is the tokenizer's eos);
    # a loglikelihood task puts no delimiter between context and continuation: the space is the target's
    task_yaml(tasks, "tiny_ll", data, "loglikelihood", doc_to_text="{{prompt}}",
              doc_to_target=" {{completion}} </s>", metric_list=[{"metric": "acc"}])
    task_yaml(tasks, "tiny_gen", data, "generate_until", doc_to_text="{{prompt}}", doc_to_target="{{completion}}",
              generation_kwargs={"until": [], "max_gen_toks": MAX_GEN, "do_sample": False},
              metric_list=[{"metric": "exact_match"}])
    task_yaml(tasks, "tiny_roll", data, "loglikelihood_rolling", doc_to_text="",
              doc_to_target="{{prompt}} {{completion}}", metric_list=[{"metric": "word_perplexity"}])
    return {"dir": d, "anchor": anchor, "augmenting": augmenting, "tok": tok, "data": data, "tasks": tasks}


@pytest.fixture(scope="module")
def task_manager(world):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(world["tasks"]))


def evaluate(task_manager, model: str, model_args: str, tasks=TASKS) -> dict:
    """lm-eval's simple_evaluate: {task: (metrics, [each sample's filtered response, in document order])}."""
    import lm_eval

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), task_manager=task_manager,
                                  log_samples=True, device="cpu", batch_size=5)
    return {task: ({k.split(",")[0]: v for k, v in out["results"][task].items() if "," in k and "stderr" not in k},
                   [s["filtered_resps"][0] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])])
            for task in tasks}


def test_at_init_the_composition_scores_exactly_as_its_anchor_under_lm_evals_hf_model(world, task_manager):
    """W_O = 0: loglikelihoods, greedy answers and rolling loglikelihoods of the composition are those of the anchor
    run by lm-eval's own `hf` model. (HF's rolling windows encode the text with the tokenizer's bos and then put
    the prefix bos before it, scoring a bos; without the tokenizer's bos, as `add_bos_token=False`, they condition
    on one bos as lm-eval's LM contract says, as calm does.)"""
    calm = evaluate(task_manager, "calm", f"composition={world['dir'] / 'init'}")
    hf = evaluate(task_manager, "hf", f"pretrained={world['anchor']}", ["tiny_ll", "tiny_gen"])
    hf |= evaluate(task_manager, "hf", f"pretrained={world['anchor']},add_bos_token=False", ["tiny_roll"])
    ours, theirs = calm["tiny_ll"][1], hf["tiny_ll"][1]
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in theirs], abs=1e-4)
    assert calm["tiny_gen"][1] == hf["tiny_gen"][1] and any(text.strip() for text in calm["tiny_gen"][1])
    assert calm["tiny_roll"][1] == pytest.approx(hf["tiny_roll"][1], abs=1e-4)
    assert calm["tiny_roll"][0]["word_perplexity"] == pytest.approx(hf["tiny_roll"][0]["word_perplexity"], rel=1e-5)


def test_trained_it_differs_from_its_anchor_and_agrees_with_calm_dist_eval(world, task_manager, tmp_path):
    """Trained 20 steps, the scores move off the anchor's, and lm-eval's numbers are calm-dist eval's: the
    loglikelihood of completion + eos summed over the set is minus its token-mean completion loss times the
    tokens; greedy acc of that continuation and generate_until's exact match are its exact match; the greedy
    answers are the answers it shows, with or without compiled decoding steps."""
    from calm_dist.cli import main as calm_dist

    trained = evaluate(task_manager, "calm", f"composition={world['dir'] / 'trained'}")
    init = evaluate(task_manager, "calm", f"composition={world['dir'] / 'init'}")
    for task in ("tiny_ll", "tiny_roll"):
        moved = [abs((a[0] if task == "tiny_ll" else a) - (b[0] if task == "tiny_ll" else b))
                 for a, b in zip(trained[task][1], init[task][1])]
        assert min(moved) > 1e-3, task
    assert trained["tiny_ll"][0]["acc"] == 0.5 and init["tiny_ll"][0]["acc"] == 0.0  # the 8 taught prompts

    report = tmp_path / "eval.json"
    overrides = [f"model.anchor={world['anchor']}", f"model.augmenting=[{world['augmenting']}]",
                 f"data.tokenizer={world['anchor']}", f"train.output_dir={tmp_path / 'run'}", "tracking.enabled=false"]
    assert calm_dist(["eval", "--config", str(REPO / "recipes" / "tiny.yaml"), *overrides, "--composition",
                      f"composed={world['dir'] / 'trained'}", "--set", f"eval={world['data']}", "--models", "",
                      "--batch-size", "5", "--max-new-tokens", str(MAX_GEN), "--json", str(report)]) == 0
    ours = json.loads(report.read_text())["composed"]["eval"]
    records = [json.loads(line) for line in world["data"].read_text().splitlines()]
    tokens = sum(len(completion_ids(world["tok"], r["completion"])) for r in records)
    assert -sum(ll for ll, _ in trained["tiny_ll"][1]) / tokens == pytest.approx(ours["loss"], rel=1e-5)
    assert trained["tiny_ll"][0]["acc"] == ours["exact_match"] == trained["tiny_gen"][0]["exact_match"]
    assert [e["got"] for e in ours["examples"]] == trained["tiny_gen"][1][:len(ours["examples"])]
    assert trained["tiny_gen"][1][:8] == ["alpha"] * 8
    # one compiled graph per decoding step answers the same
    compiled = evaluate(task_manager, "calm", f"composition={world['dir'] / 'trained'},compile_decoding=True",
                        ["tiny_gen"])
    assert compiled["tiny_gen"][1] == trained["tiny_gen"][1]


@pytest.mark.slow  # a fresh interpreter importing torch, transformers and lm-eval
def test_calm_dist_lm_eval_runs_lm_evals_command_line_with_the_calm_model(world, task_manager, tmp_path):
    """`calm-dist lm-eval --model calm ...` is lm-eval's own command line (its options, its results file) with
    the model registered; plain `lm_eval` does not know "calm" (lm-eval reads no entry points)."""
    args = ["--model", "calm", "--model_args", f"composition={world['dir'] / 'trained'}", "--tasks", "tiny_ll",
            "--include_path", str(world["tasks"]), "--batch_size", "5", "--device", "cpu",
            "--output_path", str(tmp_path / "out")]
    env = base_env(HF_DATASETS_OFFLINE=1, HF_HUB_OFFLINE=1)
    ours = subprocess.run([sys.executable, "-m", "calm_dist.cli", "lm-eval", *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    assert ours.returncode == 0, ours.stderr[-3000:]
    (results,) = (tmp_path / "out").rglob("results_*.json")
    saved = json.loads(results.read_text())
    assert saved["results"]["tiny_ll"]["acc,none"] == 0.5
    assert saved["config"]["model"] == "calm"
    plain = subprocess.run([sys.executable, "-m", "lm_eval", *args], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=600)
    assert plain.returncode != 0 and "calm" in plain.stderr


def test_compile_decoding_of_a_lora_export_is_refused_before_any_model_loads(world, tmp_path):
    """A LoRA export decodes with transformers' generate, which has no compiled step of ours: `compile_decoding`
    is one clear error, raised before the base model loads (the anchor given here does not exist); without it the
    same export loads and answers."""
    from transformers import AutoModelForCausalLM

    from calm_dist.config import ConfigError
    from calm_dist.harness import CalmLM
    from tests.helpers.tiny import random_lora

    random_lora(AutoModelForCausalLM.from_pretrained(world["anchor"])).save_composition(tmp_path / "lora")
    with pytest.raises(ConfigError, match="compile_decoding: a LoRA export"):
        CalmLM(composition=str(tmp_path / "lora"), anchor=str(tmp_path / "no_such_anchor"), compile_decoding=True)
    model = CalmLM(composition=str(tmp_path / "lora"), anchor=str(world["anchor"]), device="cpu")
    assert model.tok_decode(model.tok_encode("alpha beta", add_special_tokens=False)) == "alpha beta"
    ids, mask = model._left_pad([model.tok_encode("alpha beta")])
    assert model.model.generate(ids, attention_mask=mask, max_new_tokens=3).shape == (1, ids.shape[1] + 3)
