"""The augmenting tokenizers of `make demo-xtok` (examples/kv_task/tokenizer.py, make_data.py
--augmenting-tokenizers) and pretrain.py's --aug-tokenizer.

Fast: small settings, no training."""
from __future__ import annotations

import dataclasses
import json
import os
import random
from types import SimpleNamespace

import pytest
import torch

from calm_dist.data.tokenizer import Tokenizer, prompt_ids
from examples.kv_task import make_data
from examples.kv_task import pretrain
from examples.kv_task import task as T
from examples.kv_task import tokenizer as tok
from examples.kv_task.scoring import read_jsonl

SMALL = T.TaskSettings(seed=3, n_keys=200, n_values=10, dc_frac=0.2, val_frac=0.1, n_dc_train=400,
                       n_kv_sub_train=300, n_eval=60)
SETS = ("dc_kv_arith", "val_kv_arith", "eval_kv_sub_heldout", "arith_train", "kv_facts")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("kv_xtok") / "task")
    make_data.build(out, SMALL, verbose=False)
    chars = make_data.write_augmenting_tokenizer(out, verbose=False)
    return out, chars


def data(out, name):
    return read_jsonl(os.path.join(out, "data", name + ".jsonl"))


def texts(out, n=40):
    for name in SETS:
        for r in data(out, name)[:n]:
            yield r["prompt"]
            yield f"{r['prompt']} {r['completion']}"


def check_spans(tokenizer: Tokenizer, text: str) -> list[tuple[str, str]]:
    """(piece, its text) of each token; the spans tile the text and each is its piece's characters."""
    ids, spans = tokenizer.encode_with_spans(text)
    assert ids == tokenizer.encode(text) and tok.UNK_ID not in ids
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    out = []
    for i, (s, e) in zip(ids, spans):
        piece, read = tokenizer._sp.id_to_piece(i), text[s:e]
        assert piece == (tok.WB + read if s == 0 and piece.startswith(tok.WB) else read.replace(" ", tok.WB))
        out.append((piece, read))
    return out


def test_char_tokenizer_reads_every_key_one_letter_a_token_with_its_spans(built):
    out, chars = built
    char_tok, task_tok = Tokenizer(chars), Tokenizer(os.path.join(out, "tokenizer.model"))
    n_keys = 0
    for text in texts(out):
        words = text.split()
        char_read, task_read = check_spans(char_tok, text), check_spans(task_tok, text)
        # the task's tokenizer reads each word as one token (numbers one digit a token); so does the character one,
        # except that a key is one token per letter, the first with the word mark
        expected_chars = []
        for w in words:
            pieces = [tok.WB + w[0]] + list(w[1:]) if w.isalpha() or w.lstrip("-").isdigit() else [tok.WB + w]
            if w.startswith("-") and len(w) > 1:  # a negative number: the sign's token, then the digits
                pieces = [tok.WB + "-"] + list(w[1:])
            expected_chars += pieces
            n_keys += w.isalpha()
        assert [p for p, _ in char_read] == expected_chars, text
        assert len(task_read) == len(expected_chars) - sum(len(w) - 1 for w in words if w.isalpha())
    assert n_keys > 100


def test_letters_numbers_tokenizer_reads_keys_by_letter_and_numbers_in_chunks_of_three(built):
    out, _ = built
    path = make_data.write_augmenting_tokenizer(out, verbose=False, kind="letters_numbers")
    assert os.path.basename(path) == make_data.LETTERS_NUMBERS_TOKENIZER
    sp, tokenizer = tok.load_tokenizer(path), Tokenizer(path)
    pieces = tok.letters_numbers_symbols()
    assert [sp.piece_to_id(p) for p in pieces] == list(range(4, 4 + len(pieces))) and sp.get_piece_size() == 2059
    for text in texts(out):
        expected = []
        for w in text.split():
            if w.isalpha():
                expected += [tok.WB + w[0]] + list(w[1:])
            elif w.lstrip("-").isdigit() and w != "-":
                digits = w.lstrip("-")
                chunks = [digits[i:i + 3] for i in range(0, len(digits), 3)]
                expected += ([tok.WB + "-"] + chunks) if w.startswith("-") else [tok.WB + chunks[0]] + chunks[1:]
            else:
                expected.append(tok.WB + w)
        assert [p for p, _ in check_spans(tokenizer, text)] == expected, text
    assert sp.encode("12345 = -1000", out_type=str) == ["\u2581123", "45", "\u2581=", "\u2581-", "100", "0"]


def test_char_tokenizer_has_predictable_ids_and_no_key_piece(built):
    out, chars = built
    sp = tok.load_tokenizer(chars)
    pieces = tok.char_symbols()
    assert sp.get_piece_size() == 4 + len(pieces) == 4 + 13 + 26 + 10 + 26
    assert [sp.piece_to_id(p) for p in pieces] == list(range(4, 4 + len(pieces)))
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    keys = T.make_keys(SMALL).keys
    assert all(sp.piece_to_id(tok.WB + k) == tok.UNK_ID for k in keys)
    assert {sp.id_to_piece(i) for i in range(sp.get_piece_size())}.isdisjoint(tok.WB + k for k in keys)


def test_char_tokenizer_is_rewritten_only_when_its_bytes_change_and_leaves_the_task_current(built, tmp_path):
    out, chars = built
    assert make_data.is_current(out, SMALL)
    assert make_data.CHAR_TOKENIZER not in json.load(open(os.path.join(out, make_data.MANIFEST)))["files"]
    other = str(tmp_path / "task")
    make_data.build(other, SMALL, verbose=False)
    again = make_data.write_augmenting_tokenizer(other, verbose=False)
    assert open(again, "rb").read() == open(chars, "rb").read()  # deterministic
    stamp = os.path.getmtime(again)
    make_data.write_augmenting_tokenizer(other, verbose=False)
    assert os.path.getmtime(again) == stamp
    with open(again, "ab") as f:
        f.write(b"x")
    make_data.write_augmenting_tokenizer(other, verbose=False)
    assert open(again, "rb").read() == open(chars, "rb").read()


def args(out, *extra):
    return pretrain.parser().parse_args(["--task", out, "--out", "unused", *extra])


def test_pretrain_settings_name_the_augmenting_tokenizer(built, tmp_path):
    out, chars = built
    task = pretrain.Task(out)
    plain, xtok = args(out), args(out, "--aug-tokenizer", chars)
    # the anchor is the same either way; the augmenting model's settings name the tokenizer's bytes, and without
    # the flag they are what they were (models pretrained on the task's tokenizer stay current)
    assert pretrain.settings_for(plain, "anchor", task) == pretrain.settings_for(xtok, "anchor", task)
    assert "tokenizer" not in pretrain.settings_for(plain, "aug", task)
    # the letters tokenizer reads "...=-18" whole otherwise than "...=" and "-18" apart (SentencePiece's dummy
    # prefix), so the settings name the whole-text reading its records are pretrained on
    assert pretrain.settings_for(xtok, "aug", task) == {**pretrain.settings_for(plain, "aug", task),
                                                   "tokenizer": make_data.file_sha256(chars)[:16],
                                                   "reading": "whole_text"}
    model_dir = tmp_path / "aug"
    model_dir.mkdir()
    for f in ("config.json", "metrics.json"):
        (model_dir / f).write_text("{}")
    (model_dir / "pretrain.json").write_text(json.dumps({"settings": pretrain.settings_for(xtok, "aug", task),
                                                         "task": task.fingerprint}))
    assert pretrain.current_record(str(model_dir), pretrain.settings_for(xtok, "aug", task), task)
    assert not pretrain.current_record(str(model_dir), pretrain.settings_for(plain, "aug", task), task)
    changed = tmp_path / "other.model"
    changed.write_bytes(open(os.path.join(out, "tokenizer.model"), "rb").read())
    assert not pretrain.current_record(str(model_dir), pretrain.settings_for(args(out, "--aug-tokenizer", str(changed)),
                                                                             "aug", task), task)


def test_the_augmenting_model_is_built_and_fed_through_its_own_tokenizer(built):
    out, chars = built
    task = pretrain.Task(out)
    aug = task.with_tokenizer(chars)
    assert aug.vocab_size == aug.tokenizer.vocab_size == 4 + len(tok.char_symbols()) < task.vocab_size
    assert task.sp.get_piece_size() == task.vocab_size  # the task itself keeps its tokenizer
    sp = aug.sp
    model = pretrain.build_model(aug.vocab_size, 16, 1, 2, 32, True, 0, "gpt2", (sp.pad_id(), sp.bos_id(),
                                                                                sp.eos_id()))
    assert (model.config.vocab_size, model.config.pad_token_id, model.config.bos_token_id,
            model.config.eos_token_id) == (aug.vocab_size, 0, 2, 3)
    # a pairs sequence reads each key letter by letter, and scores its value's digits only
    facts = data(out, "kv_facts")
    value = {tuple(sp.encode(r["prompt"])): sp.encode(r["completion"]) for r in facts}
    assert all(len(k) == len(r["prompt"]) for k, r in zip(value, facts))
    ids, att, lab = pretrain.PairsSampler(aug.tokenizer, facts, random.Random(0), pairs_per_seq=4,
                                          sep_prob=0.0).batch(4)
    for i in range(ids.shape[0]):
        n = int(att[i].sum())
        row, lrow = ids[i, :n].tolist(), lab[i, :n].tolist()
        assert row[0] == sp.bos_id() and row[-1] == lrow[-1] == sp.eos_id()
        t, scored = 1, 0
        while t < n - 1:
            key = next(k for k in value
                       if tuple(row[t:t + len(k)]) == k and row[t + len(k):t + len(k) + len(value[k])] == value[k])
            v = value[key]
            assert lrow[t:t + len(key)] == [-100] * len(key) and lrow[t + len(key):t + len(key) + len(v)] == v
            t, scored = t + len(key) + len(v), scored + len(v)
        assert sum(x != -100 for x in lrow) == scored + 1
    rec_ids, rec_labels = pretrain.record_ids(aug.tokenizer, {"prompt": "qzv - ab =", "completion": "-18"})
    assert [sp.id_to_piece(i) for i in rec_ids[1:-1]] == ["\u2581q", "z", "v", "\u2581-", "\u2581a", "b", "\u2581=",
                                                          "\u2581-", "1", "8"]
    assert rec_labels == [-100] * 8 + rec_ids[8:]
    # an augmenting model of its own tokenizer is pretrained on each record's text read whole, as calm-dist gives it
    # the text across tokenizers: "=-18" is one word there, read without a second dummy prefix
    assert aug.whole_text and not task.whole_text
    text = "qzv - ab =-18"
    whole_ids, whole_labels = pretrain.record_ids(aug.tokenizer, {"prompt": "qzv - ab =", "completion": "-18"},
                                                  whole_text=True)
    assert whole_ids == [sp.bos_id()] + sp.encode(text) + [sp.eos_id()] != rec_ids
    assert whole_labels == [-100] * 8 + whole_ids[8:]


def test_the_probe_reads_a_key_read_letter_by_letter_at_its_last_letter(built):
    from examples.kv_task import probe
    out, chars = built
    task = pretrain.Task(out)
    key = task.keys["dc_keys"][0]
    ids, at = probe.key_position(task, "{k} + abc =", key)
    assert ids[at] == task.token_id(key) and at == 1  # the task's tokenizer: the key's one token, after bos
    char_task = task.with_tokenizer(chars)
    ids, at = probe.key_position(char_task, "abc - {k} =", key)
    assert char_task.sp.id_to_piece(ids[at]) == key[-1] and at == 4 + len(key)  # after bos, "abc" and "-"
    assert [char_task.sp.id_to_piece(i) for i in ids[at - len(key) + 1:at + 1]] == ["\u2581" + key[0], *key[1:]]


def test_bpe_tokenizer_is_learned_from_the_task_and_every_sequence_reads_as_its_text(tmp_path):
    # KV-substitution enough for every key to stand after a space somewhere in the text it learns from
    out = str(tmp_path / "task")
    make_data.build(out, dataclasses.replace(SMALL, n_kv_sub_train=3000), verbose=False)
    path = make_data.write_bpe_tokenizer(out, verbose=False)
    bpe = Tokenizer(path)
    hf = bpe._hf
    keys = list(json.load(open(os.path.join(out, "keys.json")))["value"])
    assert all(len(bpe.encode(k)) == len(bpe.encode(" " + k)) == 1 for k in keys)
    assert all(bpe.encode(k) != bpe.encode(" " + k) for k in keys)  # no dummy prefix: a text's first word differs
    assert hf.convert_ids_to_tokens(bpe.encode(f"{keys[0]} - 47")) == [keys[0], "\u0120-", "\u0120", "4", "7"]
    assert (bpe.pad_id, bpe.bos_id, bpe.eos_id) == (0, 1, 2)
    text = f"{keys[1]} + {keys[2]} =-18"
    ids, spans = bpe.encode_with_spans(text)
    assert ids == bpe.encode(text) and [text[s:e] for s, e in spans] == [keys[1], " +", " " + keys[2], " =", "-",
                                                                         "1", "8"]
    # learned again from the same text: reused as it is; from other text: replaced
    mtime = os.stat(os.path.join(path, "tokenizer.json")).st_mtime_ns
    assert make_data.write_bpe_tokenizer(out, verbose=False) == path
    assert os.stat(os.path.join(path, "tokenizer.json")).st_mtime_ns == mtime
    with pytest.raises(RuntimeError, match=r"reads \d+ tokens, expected 1"):  # a text without the keys: refused,
        make_data.write_bpe_tokenizer(out, verbose=False, text=["ab cd 12 + 3 - 4 = 5"] * 3)  # the old one kept
    assert Tokenizer(path).vocabulary() == bpe.vocabulary()
    assert os.stat(os.path.join(path, "tokenizer.json")).st_mtime_ns == mtime
    make_data.write_bpe_tokenizer(out, verbose=False, text=make_data._training_text(out) + ["zyxw vuts"] * 4)
    assert "zyxw" in Tokenizer(path).vocabulary() and sorted(os.listdir(tmp_path / "task")) == sorted(
        ["data", "keys.json", make_data.MANIFEST, "tokenizer.model", make_data.BPE_TOKENIZER])
    make_data.write_bpe_tokenizer(out, verbose=False)

    # pretraining feeds it the ids its text reads: pairs of facts, records, the special ids, the settings' hash
    task = pretrain.Task(out).with_tokenizer(path)
    assert task.sp is None and task.vocab_size == bpe.vocab_size
    pairs = pretrain.PairsSampler(task.tokenizer, data(out, "kv_facts"), random.Random(0), pairs_per_seq=5,
                                  sep_prob=0.5)
    for _ in range(50):
        ids, labels = pairs.one()
        text = bpe.decode(ids)  # "k1 v1 + k2 v2 ...": the task's words, one space apart
        assert all(w in keys or w in "+-=" or w.isdigit() for w in text.split(" ")), text
        assert ids == [bpe.bos_id] + bpe.encode(text) + [bpe.eos_id]
        assert labels[-1] == bpe.eos_id and sum(x != -100 for x in labels) > 5
    record = data(out, "val_kv_arith")[0]
    ids, labels = pretrain.record_ids(task.tokenizer, record)
    assert ids == [bpe.bos_id] + bpe.encode(record["prompt"]) + bpe.encode(record["completion"]) + [bpe.eos_id]
    assert labels == [-100] * (1 + len(bpe.encode(record["prompt"]))) + ids[1 + len(bpe.encode(record["prompt"])):]
    fact = pretrain.facts_as_read(data(out, "kv_facts"))[0]  # scored at the space that the value follows
    assert hf.convert_ids_to_tokens(bpe.encode(fact["prompt"])) == [fact["prompt"][:-1], "\u0120"]
    sp = Tokenizer(os.path.join(out, "tokenizer.model"))
    assert sp.encode(fact["prompt"]) == sp.encode(fact["prompt"][:-1])  # SentencePiece: the ids it always read
    settings = pretrain.settings_for(args(out, "--aug-tokenizer", path), "aug", pretrain.Task(out))
    assert settings["tokenizer"] == bpe.fingerprint()
    assert "reading" not in settings  # its records read alike apart and whole: models pretrained before stay current
    assert pretrain.record_ids(task.tokenizer, record, whole_text=True) == pretrain.record_ids(task.tokenizer, record)


@pytest.fixture(scope="module")
def prefix_space_built(tmp_path_factory):
    """A task with both BPEs learned from it: (task dir, the default BPE, the prefix-space BPE, its keys)."""
    out = str(tmp_path_factory.mktemp("kv_prefix_space") / "task")
    make_data.build(out, dataclasses.replace(SMALL, n_kv_sub_train=3000), verbose=False)
    default = Tokenizer(make_data.write_bpe_tokenizer(out, verbose=False))
    path = make_data.write_bpe_tokenizer(out, verbose=False, prefix_space=True)
    assert os.path.basename(path) == make_data.BPE_PREFIX_SPACE_TOKENIZER
    return out, default, Tokenizer(path), list(json.load(open(os.path.join(out, "keys.json")))["value"])


def test_bpe_tokenizer_with_a_prefix_space_reads_a_key_one_token_wherever_it_stands(prefix_space_built):
    out, default, bpe, keys = prefix_space_built
    assert all(len(bpe.encode(k)) == 1 and bpe.encode(k) == bpe.encode(" " + k) for k in keys)
    assert all(default.encode(k) != default.encode(" " + k) for k in keys)  # the default BPE is as it was
    assert bpe._hf.convert_ids_to_tokens(bpe.encode(f"{keys[0]} - 47")) == ["\u0120" + keys[0], "\u0120-", "\u0120",
                                                                             "4", "7"]
    # the added space has no character of its own: the spans point into the text as given
    text = f"{keys[1]} + {keys[2]} =-18"
    ids, spans = bpe.encode_with_spans(text)
    assert ids == bpe.encode(text) and [text[s:e] for s, e in spans] == [keys[1], " +", " " + keys[2], " =", "-",
                                                                         "1", "8"]
    # a window of the text read from a cut rejoins the whole text's reading: windowed alignment equals the reference
    from calm_dist.model.token_alignment import align, read_batch

    sp = Tokenizer(os.path.join(out, "tokenizer.model"))
    texts = [r["prompt"] + r["completion"] for name in SETS for r in data(out, name)[:6]]
    anchor_ids, mask, anchor_spans = read_batch(texts, sp, padding_side="left")
    windowed = align(texts, anchor_spans, mask, bpe, padding_side="left", window=2)
    exact = align(texts, anchor_spans, mask, bpe, padding_side="left", window=None)
    for field in dataclasses.fields(exact):
        a, b = getattr(windowed, field.name), getattr(exact, field.name)
        assert torch.equal(a, b) if hasattr(a, "shape") else a == b, field.name
    with pytest.raises(RuntimeError, match="reads otherwise first in a text than after a space"):
        make_data.check_bpe_tokenizer(default, keys, prefix_space=True)


def test_a_record_that_reads_otherwise_whole_is_found_in_any_chunk(prefix_space_built):
    """reads_otherwise_whole reads the records a chunk at a time and stops at the first that differs; one record
    of twelve, in the third chunk of four, that the default BPE reads otherwise (a prompt ending with a space, which
    the text joins to the completion's first token) is found, and the task's records alone are not."""
    out, default, _, _ = prefix_space_built
    records = data(out, "val_kv_sub")[:12]
    assert not pretrain.reads_otherwise_whole(default, records, chunk=4)
    odd = [*records[:9], {"prompt": records[9]["prompt"] + " ", "completion": "is " + records[9]["completion"]},
           *records[10:]]
    assert pretrain.reads_otherwise_whole(default, odd, chunk=4)
    assert pretrain.reads_otherwise_whole(default, odd[9:10], chunk=4)


def test_a_completion_read_within_the_text_needs_the_prompts_own_tokens_first(prefix_space_built):
    """The demo's tools decode from the prompt read alone: a text that reads the prompt otherwise (it ends inside a
    key, which the text reads whole) or reads nothing after it is refused, not scored against a shifted reference."""
    from examples.kv_task.scoring import completion_as_read

    out, default, _, keys = prefix_space_built
    key = keys[0]
    assert completion_as_read(default, {"prompt": f"{key} =", "completion": "-18"})[:-1] == default.encode("-18")
    for record in ({"prompt": f"{key} + {key[:2]}", "completion": f"{key[2:]} =-18"},
                   {"prompt": f"{key} =", "completion": ""}):
        with pytest.raises(ValueError, match="no tokens of its own"):
            completion_as_read(default, record)


def test_an_augmenting_model_of_the_prefix_space_bpe_learns_and_is_scored_on_whole_texts(prefix_space_built):
    from examples.kv_task.scoring import completion_as_read, exact_match, next_token_accuracy

    out, default, bpe, keys = prefix_space_built
    # pretrained on whole texts: "=-18" reads no space after "=", where the completion alone would start with one
    settings = pretrain.settings_for(args(out, "--aug-tokenizer", str(bpe.path)), "aug", pretrain.Task(out))
    assert settings["reading"] == "whole_text"
    record = {"prompt": f"{keys[1]} + {keys[2]} =", "completion": "-18"}
    ids, labels = pretrain.record_ids(bpe, record, whole_text=True)
    assert ids == [bpe.bos_id] + bpe.encode(record["prompt"] + record["completion"]) + [bpe.eos_id]
    assert bpe._hf.convert_ids_to_tokens(ids[-5:-1]) == ["\u0120=", "-", "1", "8"]
    assert labels == [-100] * (1 + len(bpe.encode(record["prompt"]))) + ids[-4:]
    assert pretrain.record_ids(bpe, record)[0] != ids
    # and scored so, over four batches (the last ragged): a model that continues every other prompt as its whole
    # text reads, and ends the rest at once, is right on those, read whole
    records = data(out, "val_kv_sub")[:30]
    answers = {tuple(prompt_ids(bpe, r["prompt"])): completion_as_read(bpe, r) if i % 2 == 0 else []
               for i, r in enumerate(records)}

    def continues_as_read(input_ids):
        logits = torch.zeros(*input_ids.shape, bpe.vocab_size)
        for row, ids in enumerate(input_ids.tolist()):
            prompt = next(p for p in answers if tuple(ids[:len(p)]) == p)
            logits[row, -1, (answers[prompt] + [bpe.eos_id] * 99)[len(ids) - len(prompt)]] = 1.0
        return SimpleNamespace(logits=logits)
    assert len(answers) == len(records)
    assert exact_match(continues_as_read, bpe, records, batch_size=8, whole_text=True) == 15 / 30
    assert exact_match(continues_as_read, bpe, records, batch_size=8) == 0.0  # read alone it starts with a space
    # a fact is scored at the value's first digit, which "key 47" reads after "key ": read apart, "47" would start
    # with the space this tokenizer puts before a text
    facts = pretrain.facts_as_read(data(out, "kv_facts"))[:20]
    for t in (bpe, default):
        digit = {tuple(prompt_ids(t, f["prompt"])): t._hf.convert_tokens_to_ids(f["completion"][0]) for f in facts}

        def knows_every_fact(input_ids):  # the next token is the value's first digit
            logits = torch.zeros(*input_ids.shape, t.vocab_size)
            for row, ids in enumerate(input_ids.tolist()):
                logits[row, -1, digit[tuple(ids)]] = 1.0
            return SimpleNamespace(logits=logits)
        assert next_token_accuracy(knows_every_fact, t, facts) == 1.0
