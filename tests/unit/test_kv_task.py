"""The key-value task generator (examples/kv_task/make_data.py) and the tiny-model helpers
(examples/kv_task/pretrain.py).

Fast: small settings, no training."""
from __future__ import annotations

import json
import os

import pytest
import torch

from calm_dist.data.tokenizer import Tokenizer
from calm_dist.task_eval import evaluate_set
from examples.kv_task import make_data
from examples.kv_task import pretrain
from examples.kv_task import task as T
from examples.kv_task import tokenizer as tok
from examples.kv_task.scoring import exact_match, read_jsonl

SMALL = T.TaskSettings(seed=3, n_keys=200, n_values=10, dc_frac=0.2, val_frac=0.1, n_dc_train=400,
                       n_kv_sub_train=300, n_eval=60)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("kv") / "task")
    man = make_data.build(out, SMALL, verbose=False)
    return out, man


def data(out, name):
    return read_jsonl(os.path.join(out, "data", name + ".jsonl"))


def keys_json(out):
    with open(os.path.join(out, "keys.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------- determinism / reuse
def test_same_settings_give_identical_files(built, tmp_path):
    out, man = built
    man2 = make_data.build(str(tmp_path / "again"), SMALL, verbose=False)
    assert man2["files"] == man["files"]  # sha256 of every file, tokenizer included
    for rel in man["files"]:
        with open(os.path.join(out, rel), "rb") as a, open(os.path.join(tmp_path, "again", rel), "rb") as b:
            assert a.read() == b.read(), rel


def test_other_seed_gives_other_keys():
    a = T.make_keys(SMALL)
    b = T.make_keys(T.TaskSettings(**{**SMALL.to_dict(), "seed": SMALL.seed + 1}))
    assert a.keys != b.keys


def test_rebuild_is_skipped_when_current_and_redone_when_settings_change(built, tmp_path):
    out = str(tmp_path / "t")
    make_data.build(out, SMALL, verbose=False)
    stamp = os.path.getmtime(os.path.join(out, "data", "dc_kv_arith.jsonl"))
    assert make_data.is_current(out, SMALL)
    make_data.build(out, SMALL, verbose=False)
    assert os.path.getmtime(os.path.join(out, "data", "dc_kv_arith.jsonl")) == stamp
    other = T.TaskSettings(**{**SMALL.to_dict(), "n_eval": 50})
    assert not make_data.is_current(out, other)
    make_data.build(out, other, verbose=False)
    assert make_data.is_current(out, other) and not make_data.is_current(out, SMALL)


def test_a_tampered_file_makes_the_build_stale(tmp_path):
    out = str(tmp_path / "t")
    make_data.build(out, SMALL, verbose=False)
    with open(os.path.join(out, "data", "eval_arith.jsonl"), "a") as f:
        f.write('{"prompt": "1 + 1 =", "completion": "3"}\n')
    assert not make_data.is_current(out, SMALL)


# ------------------------------------------------------------------------------------------- key split
def test_dc_spans_at_most_20_percent_of_the_keys(built):
    out, _ = built
    k = keys_json(out)
    assert len(k["dc_keys"]) <= 0.2 * len(k["keys"])
    used = {w for r in data(out, "dc_kv_arith") for w in T.keys_of(r)}
    assert used <= set(k["dc_keys"])
    assert len(used) <= 0.2 * len(k["keys"])


def test_every_split_covers_every_value(built):
    out, _ = built
    k = keys_json(out)
    for split in ("dc_keys", "val_keys", "heldout_keys"):
        assert {k["value"][x] for x in k[split]} == set(range(SMALL.n_values)), split


def test_dc_validation_and_test_keys_are_disjoint(built):
    out, _ = built
    k = keys_json(out)
    dc, val, test = set(k["dc_keys"]), set(k["val_keys"]), set(k["heldout_keys"])
    assert dc.isdisjoint(val) and dc.isdisjoint(test) and val.isdisjoint(test)
    assert dc | val | test == set(k["keys"])
    for name, split in (("eval_kv_arith_heldout", test), ("eval_kv_sub_heldout", test), ("val_kv_arith", val),
                        ("val_kv_sub", val)):
        recs = data(out, name)
        assert recs and all(T.keys_of(r) and set(T.keys_of(r)) <= split for r in recs), name
    train_prompts = {r["prompt"] for r in data(out, "dc_kv_arith")}
    assert train_prompts.isdisjoint(r["prompt"] for r in data(out, "eval_kv_arith_dc_keys"))
    # the augmenting model's substitution corpus never holds an evaluation or validation expression
    sub = {r["prompt"] for r in data(out, "kv_sub_train")}
    assert sub.isdisjoint(r["prompt"] for r in data(out, "eval_kv_sub_heldout"))
    assert sub.isdisjoint(r["prompt"] for r in data(out, "val_kv_arith"))
    assert sub.isdisjoint(r["prompt"] for r in data(out, "val_kv_sub"))


def test_values_are_balanced_and_in_range():
    ks = T.make_keys(SMALL)
    counts = {}
    for key in ks.keys:
        counts[ks.value[key]] = counts.get(ks.value[key], 0) + 1
    assert set(counts) == set(range(SMALL.n_values))
    assert set(counts.values()) == {SMALL.n_keys // SMALL.n_values}
    assert len(set(ks.keys)) == SMALL.n_keys and all(k.isalpha() and k.islower() for k in ks.keys)


def test_settings_are_validated():
    with pytest.raises(ValueError):
        T.TaskSettings(dc_frac=0.25).validate()
    with pytest.raises(ValueError):
        T.TaskSettings(n_keys=1001, n_values=40).validate()
    with pytest.raises(ValueError):
        T.TaskSettings(n_keys=40, n_values=40).validate()  # one key per value: no D_C key
    with pytest.raises(ValueError):
        T.TaskSettings(n_keys=200, n_values=20, val_frac=0.05).validate()  # 10 keys per value: no validation key
    with pytest.raises(ValueError):
        T.TaskSettings(n_keys=100, n_values=20, val_frac=0.8).validate()  # 1 D_C + 4 validation: no test key
    T.TaskSettings(n_keys=200, n_values=20).validate()  # 2 D_C, 1 validation and 7 test keys per value


# ------------------------------------------------------------------------------------------ the records
def test_records_are_correct(built):
    out, _ = built
    val = keys_json(out)["value"]

    def num(w):
        return val[w] if w in val else int(w)

    def calc(p):
        a, op, b, eq = p.split()
        assert eq == "="
        return num(a) + num(b) if op == "+" else num(a) - num(b)
    for name in ("dc_kv_arith", "val_kv_arith", "eval_kv_arith_heldout", "eval_kv_arith_dc_keys", "eval_arith",
                 "arith_train"):
        for r in data(out, name):
            assert int(r["completion"]) == calc(r["prompt"]), (name, r)
    for r in data(out, "eval_kv_sub_heldout") + data(out, "val_kv_sub") + data(out, "kv_sub_train"):
        a, op, b, _ = r["prompt"].split()
        assert r["completion"] == f"{val[a]} {op} {val[b]}"
    assert all(r["completion"] == str(val[r["prompt"]]) for r in data(out, "kv_facts"))
    assert len(data(out, "arith_train")) == 2 * SMALL.n_values ** 2


# ------------------------------------------------------------------------------------------ tokenizer
def test_every_piece_has_a_predictable_id(built):
    out, man = built
    sp = tok.load_tokenizer(os.path.join(out, "tokenizer.model"))
    words = T.vocabulary_words(T.make_keys(SMALL))
    pieces = tok.symbols(words)
    assert sp.get_piece_size() == man["vocab_size"] == 4 + len(pieces)
    for i, piece in enumerate(pieces):
        assert sp.piece_to_id(piece) == 4 + i
    for i, w in enumerate(words):  # each operator, digit and key alone is one token
        assert sp.encode(w) == [4 + i]
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    assert man["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}


def test_numbers_read_one_digit_a_token(built):
    out, _ = built
    sp = tok.load_tokenizer(os.path.join(out, "tokenizer.model"))
    ks = T.make_keys(SMALL)
    k1, k2 = ks.keys[0], ks.keys[1]
    piece = sp.piece_to_id
    ids, labels = pretrain.record_ids(Tokenizer(os.path.join(out, "tokenizer.model")),
                                      {"prompt": f"{k1} - {k2} =", "completion": "-17"})
    assert ids == [tok.BOS_ID, piece("\u2581" + k1), piece("\u2581-"), piece("\u2581" + k2), piece("\u2581="),
                   piece("\u2581-"), piece("1"), piece("7"), tok.EOS_ID]
    assert labels == [-100] * 5 + ids[5:]
    # a number's first digit carries the word mark, the others do not; the sign is the operator's token
    assert sp.encode("47 + 105") == [piece("\u25814"), piece("7"), piece("\u2581+"), piece("\u25811"), piece("0"),
                                     piece("5")]
    assert sp.encode("-7") == sp.encode("- 7")[:1] + [piece("7")] and sp.encode("- 7")[1] == piece("\u25817")
    # the same word has the same id first in the text and inside it
    assert sp.encode(f"{k1} + {k1}")[0] == sp.encode(f"{k1} + {k1}")[2]
    # prompt + completion encoded separately == the whole text encoded at once
    assert sp.encode(f"{k1} - {k2} =") + sp.encode("-17") == sp.encode(f"{k1} - {k2} = -17")


def test_tokenizer_round_trips(built):
    out, _ = built
    sp = tok.load_tokenizer(os.path.join(out, "tokenizer.model"))
    for name in ("dc_kv_arith", "eval_kv_sub_heldout", "eval_arith", "kv_facts"):
        for r in data(out, name)[:100]:
            for text in (r["prompt"], r["completion"], f"{r['prompt']} {r['completion']}"):
                ids = sp.encode(text)
                assert tok.UNK_ID not in ids
                assert sp.decode(ids) == text


# -------------------------------------------------------------------------------- pretrain helpers
def test_base_models_share_vocab_and_special_ids(built):
    out, man = built
    task = pretrain.Task(out)
    anchor = pretrain.build_model(task.vocab_size, 16, 1, 4, 32, False, 0, "llama")
    aug = pretrain.build_model(task.vocab_size, 16, 1, 2, 32, True, 0, "gpt2")
    for m in (anchor, aug):
        c = m.config
        assert (c.vocab_size, c.pad_token_id, c.bos_token_id, c.eos_token_id) == (man["vocab_size"], 0, 2, 3)


def test_pairs_sampler_puts_the_loss_on_values_only(built):
    import random
    out, _ = built
    task = pretrain.Task(out)
    facts = data(out, "kv_facts")
    s = pretrain.PairsSampler(task.tokenizer, facts, random.Random(0), pairs_per_seq=4, sep_prob=0.5)
    ids, att, lab = s.batch(8)
    value = {task.token_id(r["prompt"]): task.sp.encode(r["completion"]) for r in facts}
    for i in range(ids.shape[0]):
        n = int(att[i].sum())
        row, lrow = ids[i, :n].tolist(), lab[i, :n].tolist()
        assert row[0] == tok.BOS_ID and row[-1] == tok.EOS_ID and lrow[-1] == tok.EOS_ID
        scored = 0
        for t in range(1, n - 1):
            if row[t] in value:  # a key: not scored, and the next tokens are its value's digits (scored)
                v = value[row[t]]
                assert lrow[t] == -100 and row[t + 1:t + 1 + len(v)] == v == lrow[t + 1:t + 1 + len(v)]
                scored += len(v)
        assert sum(x != -100 for x in lrow) == scored + 1


def test_training_says_why_it_stopped_and_a_model_cut_by_the_wall_cap_is_flagged(built, capsys):
    """A busy machine makes the wall-clock cap cut a model short (an anchor at 2,547 of 3,000 steps, 97.6% against
    99.8% arithmetic, with two more jobs on the demo's cores): the result says so, and so does a line whenever the
    model is trained or reused."""
    import random
    out, _ = built
    task = pretrain.Task(out)
    sampler = pretrain.RecordSampler(task.tokenizer, data(out, "arith_train"), random.Random(0))

    def run(steps, max_seconds, evals=None, stop_at=None):
        model = pretrain.build_model(task.vocab_size, 16, 1, 2, 32, False, 0, "llama")
        return pretrain.train(model, sampler, steps, 4, 1e-3, 1, 0.0, 100, max_seconds, evals, 1, stop_at)
    full = run(3, 1e9)
    assert (full["steps"], full["stopped"]) == (3, "steps")
    cut = run(3, -1.0)
    assert (cut["steps"], cut["stopped"]) == (1, "wall_cap")
    early = run(3, 1e9, evals={"always": lambda m: 1.0}, stop_at=0.99)
    assert (early["steps"], early["stopped"]) == (1, "stop_at")
    capsys.readouterr()
    pretrain.warn_if_cut("anchor", cut, {"steps": 3, "max_minutes": 10.0})
    warning = capsys.readouterr().out
    assert "WARNING: anchor stopped at step 1 of 3, cut by the wall-clock cap (--max-minutes 10)" in warning
    for result in (early, full):
        pretrain.warn_if_cut("anchor", result, {"steps": 3, "max_minutes": 10.0})
        assert capsys.readouterr().out == ""


def test_a_model_that_ran_to_its_end_is_reused_under_another_wall_cap(built, tmp_path, capsys):
    """The wall-clock cap is a limit, not the recipe: a model that ran every step under --max-minutes 90 is the model
    of --max-minutes 60 too, while one that the cap cut short is retrained under another cap (and reused, flagged,
    under its own). A model pretrained before `stopped` was recorded counts as cut unless it ran every step; any
    other setting that differs still retrains."""
    out, _ = built
    task = pretrain.Task(out)

    def args(*extra):
        return pretrain.parser().parse_args(["--task", out, "--out", "unused", *extra])
    settings = pretrain.settings_for(args("--max-minutes", "60"), "aug", task)
    recorded = pretrain.settings_for(args("--max-minutes", "90"), "aug", task)
    steps = settings["steps"]

    def model_dir(name: str, metrics: dict, saved: dict = recorded) -> str:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text("{}")
        (d / "metrics.json").write_text(json.dumps(metrics))
        (d / "pretrain.json").write_text(json.dumps({"settings": saved, "task": task.fingerprint}))
        return str(d)
    ran = model_dir("ran", {"steps": steps, "stopped": "steps"})
    cut = model_dir("cut", {"steps": steps - 7, "stopped": "wall_cap"})
    older_ran, older_cut = model_dir("older_ran", {"steps": steps}), model_dir("older_cut", {"steps": steps - 7})
    assert pretrain.current_record(ran, settings, task) and pretrain.current_record(older_ran, settings, task)
    assert not pretrain.current_record(cut, settings, task) and not pretrain.current_record(older_cut, settings, task)
    assert pretrain.current_record(cut, recorded, task)
    other = pretrain.settings_for(args("--max-minutes", "60", "--aug-steps", "10"), "aug", task)
    assert not pretrain.current_record(ran, other, task)
    # pretraining itself reuses it (nothing trains), saying under which cap it ran
    (tmp_path / "reuse").mkdir()
    os.rename(ran, tmp_path / "reuse" / "aug")
    capsys.readouterr()
    a = pretrain.parser().parse_args(["--task", out, "--out", str(tmp_path / "reuse"), "--max-minutes", "60"])
    assert pretrain.pretrain_one("aug", task, str(tmp_path / "reuse"), a) == {"steps": steps, "stopped": "steps"}
    said = capsys.readouterr().out
    assert "reusing" in said and "ran to its end under --max-minutes 90" in said


# ------------------------------------------------------------------------------------------ scoring
class Answering(torch.nn.Module):
    """A causal LM stand-in whose greedy continuation of each prompt is the ids `answers` holds for it."""

    def __init__(self, answers: dict[tuple, list[int]], vocab_size: int):
        super().__init__()
        self.answers, self.vocab_size = answers, vocab_size

    def forward(self, input_ids, attention_mask=None):
        nxt = []
        for row in input_ids.tolist():
            while row and row[0] == tok.PAD_ID:  # left padding
                row = row[1:]
            prompt = next(p for p in self.answers if tuple(row[:len(p)]) == p)
            nxt.append((self.answers[prompt] + [tok.PAD_ID] * len(row))[len(row) - len(prompt)])
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab_size)
        logits[:, -1] = torch.nn.functional.one_hot(torch.tensor(nxt), self.vocab_size).float()
        return type("Output", (), {"logits": logits})()


def test_the_tools_score_exact_match_as_calm_dist_eval_does(built):
    """examples/kv_task's exact_match (pretraining's metric) is calm-dist eval's definition: of rows answered and
    stopped, answered and run on with `<s> <s>`, and answered wrongly, only the first kind counts, in both."""
    out, _ = built
    tokenizer = Tokenizer(os.path.join(out, "tokenizer.model"))
    # prompts of one length: the stand-in model reads unpadded rows
    records = [r for r in data(out, "eval_arith") if len(tokenizer.encode(r["prompt"])) == 4][:12]
    answers = {}
    for i, r in enumerate(records):
        completion = tokenizer.encode(r["completion"])
        answers[tuple([tok.BOS_ID] + tokenizer.encode(r["prompt"]))] = [
            completion + [tok.EOS_ID], completion + [tok.BOS_ID] * 2, [tok.EOS_ID]][i % 3]
    model = Answering(answers, tokenizer.vocab_size)

    def generate(ids, mask, n):  # every prompt here has the same length: no padding to strip
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return ids

    package = evaluate_set(generate, lambda ids, mask: model(ids).logits, tokenizer, records, batch_size=5)
    assert exact_match(model, tokenizer, records, batch_size=5) == package.exact_match == 4 / 12


# ------------------------------------------------------------------------------- probe and seed report
def test_ridge_probe_reads_a_linear_code_and_not_noise():
    from examples.kv_task.probe import ridge_probe
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (400,), generator=g)
    code = torch.randn(10, 16, generator=g)
    x = code[y] + 0.05 * torch.randn(400, 16, generator=g)       # the digit written linearly into the state
    assert ridge_probe(x[:200], y[:200], x[200:], y[200:]) == 1.0
    noise = torch.randn(400, 16, generator=g)                     # a state that holds nothing of the digit
    assert ridge_probe(noise[:200], y[:200], noise[200:], y[200:]) < 0.25


def test_probe_scores_on_validation_keys_what_it_fits_on_dc_keys(built):
    """A model whose state at a key IS the one-hot of the value's digits is read perfectly; the key sets the
    probe fits and scores on are the D_C and validation keys."""
    from examples.kv_task import probe
    out, _ = built
    task = pretrain.Task(out)
    ids = {task.token_id(k): task.keys["value"][k] for k in task.keys["keys"]}

    class Oracle(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, output_hidden_states=True):
            h = torch.zeros(*input_ids.shape, 20)
            for (b, t), tok_id in zip(torch.cartesian_prod(torch.arange(input_ids.shape[0]),
                                                           torch.arange(input_ids.shape[1])).tolist(),
                                      input_ids.flatten().tolist()):
                if tok_id in ids:
                    h[b, t, ids[tok_id] // 10] = h[b, t, 10 + ids[tok_id] % 10] = 1.0
            return type("Out", (), {"hidden_states": (h,)})()
    rows = probe.probe(task, Oracle(), "{other} - {k} =")
    assert rows == [{"layer": 0, "tens": 1.0, "units": 1.0}]


def test_seed_report_gives_mean_and_spread(tmp_path):
    from examples.kv_task import seeds_report
    runs = []
    for i, (base, seed, score) in enumerate([(0, 0, 0.5), (0, 1, 0.7), (1, 0, 0.6), (1, 0, 0.4)]):
        d = tmp_path / f"run{i}"
        d.mkdir()
        results = {"composition": {"kv_arithmetic_test": {"exact_match": score}}}
        if seed == 0:  # the baselines train in the first run of each base pair only
            results["lora"] = {"kv_arithmetic_test": {"exact_match": score / 10}}
        if i == 0:
            results["anchor"] = {"numeric": {"exact_match": 1.0}}
        (d / "results.json").write_text(json.dumps(results))
        # the last run pairs base seed 1's anchor with base seed 0's m_A (demo.sh's AUG_BASE_SEED); runs before
        # that knob have no aug_base_seed
        seeds = {"base_seed": base, "seed": seed} if i < 3 else {"base_seed": base, "aug_base_seed": 0, "seed": seed}
        (d / "seeds.json").write_text(json.dumps(seeds))
        runs.append(str(d))
    assert seeds_report.main(runs + ["--out", str(tmp_path / "seeds.md")]) == 0
    text = (tmp_path / "seeds.md").read_text()
    assert "| composition | kv_arithmetic_test | 4 | 55.0 | 12.9 | 40.0 | 70.0 | 50.0 / 70.0 / 60.0 / 40.0 |" in text
    assert "| lora | kv_arithmetic_test | 3 | 5.0 | 1.0 | 4.0 | 6.0 | 5.0 / – / 6.0 / 4.0 |" in text
    assert "| anchor | numeric | 1 | 100.0 | – | 100.0 | 100.0 | 100.0 / – / – / – |" in text
    assert "base 0/comp 0, base 0/comp 1, base 1/comp 0, base 1 (m_A 0)/comp 0" in text


def test_demo_pairs_base_seeds_across_tokenizers_only(tmp_path):
    """AUG_BASE_SEED (an anchor with another base seed's m_A) names an m_A of its own tokenizer; without XTOK=1 the
    demo refuses it with one line and exit code 2, before it writes anything."""
    import subprocess

    demo = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "kv_task", "demo.sh")
    import sys

    env = {**os.environ, "DEMO_DIR": str(tmp_path / "demo"), "BASE_SEED": "1", "AUG_BASE_SEED": "0",
           "PYTHON": sys.executable}  # a machine may have no `python` on PATH
    done = subprocess.run(["bash", demo], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.splitlines() == [
        "AUG_BASE_SEED pairs base seeds across tokenizers only (XTOK=1)"], done.stderr
    assert not (tmp_path / "demo").exists()
