"""`calm-dist prepare`: several input files, several shards, worker processes, resume, bad rows, the command.

The rows are checked against a reference written here from the tokenizer alone (bos + prompt, completion + eos,
loss on the completion; right padding), not through calm_dist's own tokenizing code."""
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from calm_dist.config import ConfigError, DataConfig
from calm_dist.data import prepare as prep
from calm_dist.data.prepare import load_rows, read_manifest
from calm_dist.data.tokenizer import Tokenizer
from calm_dist.model.lm_loss import IGNORE
from calm_dist.tiny_setup import make_records, make_tiny_setup
from tests.helpers.launch import REPO

SEQ = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_setup(tmp_path_factory.mktemp("tiny"))


def write_corpus(directory, n_files=3, rows=90, seed=0):
    """Three JSONL files of the tiny task: 270 records, in name order."""
    directory.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n_files):
        part = make_records(rows, seed + i)
        (directory / f"part-{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        records += part
    return records


def reference_rows(records, tok: Tokenizer, seq_len: int):
    ids, labels, mask = [], [], []
    for r in records:
        prompt = [tok.bos_id] + tok.encode(r["prompt"])
        completion = tok.encode(r["completion"]) + [tok.eos_id]
        row = (prompt + completion)[:seq_len]
        lab = ([IGNORE] * len(prompt) + completion)[:seq_len]
        pad = seq_len - len(row)
        ids.append(row + [tok.pad_id] * pad)
        labels.append(lab + [IGNORE] * pad)
        mask.append([1] * len(row) + [0] * pad)
    return {k: torch.tensor(v) for k, v in (("input_ids", ids), ("labels", labels), ("attention_mask", mask))}


@pytest.fixture
def corpus(tiny, tmp_path, monkeypatch):
    """Three JSONL files prepared in 9 shards of 40 records (some shorter); `load` prepares (or reads) them."""
    monkeypatch.setattr(prep, "ROWS_PER_SHARD", 40)
    records = write_corpus(tmp_path / "corpus")
    tok = Tokenizer(tiny / "tokenizer.model")

    def load(spec=None, cache="cache", cfg=DataConfig(seq_len=SEQ, overlong="truncate"), workers=2):
        return load_rows(cfg, str(spec or tmp_path / "corpus"), "data.train", tok, tmp_path / cache, workers=workers)
    return SimpleNamespace(records=records, tok=tok, load=load, directory=tmp_path / "corpus")


def shard_bytes(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard-*"))}


@pytest.mark.slow
def test_two_workers_write_the_shards_of_one_worker_and_the_rows_match_the_reference(corpus):
    two = corpus.load(cache="cache2")
    one = corpus.load(spec=corpus.directory / "*.jsonl", cache="cache1", workers=1)  # a glob of the same files
    manifest = read_manifest(two.directory)
    assert len(manifest["shards"]) == 9 and manifest["n_docs"] == len(corpus.records) == len(two)
    assert manifest["dtype"] == "<u2"  # a 128-token vocabulary
    assert shard_bytes(two.directory) == shard_bytes(one.directory)
    records = corpus.records
    expected = reference_rows(records, corpus.tok, SEQ)
    order = np.random.default_rng(0).permutation(len(records))
    got = two.batch(order)
    assert all(torch.equal(got[k], expected[k][order]) for k in expected)
    assert two.labelled_tokens(order) == int((expected["labels"][:, 1:] != IGNORE).sum())


@pytest.mark.slow
def test_an_interrupted_prepare_resumes_and_writes_the_same_bytes(corpus):
    rows = corpus.load()
    complete = shard_bytes(rows.directory)
    # an interruption: no manifest yet, the last shards never written, one left half-written without its sidecar
    (rows.directory / prep.MANIFEST).unlink()
    for name in [n for n in complete if n.startswith(("shard-00007", "shard-00008"))]:
        (rows.directory / name).unlink()
    (rows.directory / "shard-00006.json").unlink()
    (rows.directory / "shard-00006.tokens.bin").write_bytes(b"\x00" * 10)
    kept = {p.name: p.stat().st_mtime_ns for p in rows.directory.glob("shard-0000[0-5]*")}
    again = corpus.load()
    assert again.directory == rows.directory
    assert shard_bytes(again.directory) == complete
    assert {p.name: p.stat().st_mtime_ns for p in again.directory.glob("shard-0000[0-5]*")} == kept  # not redone


@pytest.mark.slow
def test_a_bad_row_in_a_later_file_is_one_line_and_leaves_what_was_prepared(corpus):
    good = corpus.load()
    before = shard_bytes(good.directory)
    bad = corpus.directory / "part-2.jsonl"
    lines = bad.read_text().splitlines()
    lines[57] = json.dumps({"prompt": "reverse: a b ="})  # line 58 of the third file has no completion
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as e:
        corpus.load()
    assert str(e.value) == f"data.train: {bad} row 58: field 'completion' is missing"
    assert shard_bytes(good.directory) == before  # the data set prepared before is untouched
    lines[57] = json.dumps({"prompt": "reverse: a b =", "completion": " b a" + " z" * 40})
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=rf"{bad} row 58 has \d+ tokens, more than data.seq_len=32"):
        corpus.load(cfg=DataConfig(seq_len=SEQ))
    lines[57] = json.dumps({"prompt": "reverse: a b =", "completion": ""})
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=rf"{bad} row 58: field 'completion' is empty"):
        corpus.load()


@pytest.mark.slow
def test_the_prepare_command_prints_one_line_per_split_and_refuses_bad_input(tiny, tmp_path):
    def prepare(*overrides):
        items = {"model.anchor": tiny / "anchor", "model.augmenting": f"[{tiny / 'augmenting'}]",
                 "data.train": tiny / "train.jsonl", "data.eval": tiny / "eval.jsonl",
                 "data.tokenizer": tiny / "tokenizer.model", "data.cache_dir": tmp_path / "cache",
                 "train.output_dir": tmp_path / "run"}
        argv = [sys.executable, "-m", "calm_dist.cli", "prepare", "--config", str(REPO / "recipes" / "tiny.yaml"),
                "--workers", "2", *[f"{k}={v}" for k, v in items.items()], *overrides]
        return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)

    done = prepare()
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["data.train", "data.eval"]
    assert lines[0].startswith("data.train: 256 records, ") and "256 rows of 32 in 1 shards" in lines[0]
    for overrides, message in [(["data.train=/nonexistent/*.jsonl"],
                                "data.train: the glob /nonexistent/*.jsonl matches nothing"),
                               (["data.workers=-1"], "data.workers must be >= 0, got -1")]:
        refused = prepare(*overrides)
        assert refused.returncode == 2 and refused.stdout == ""
        assert refused.stderr.strip().splitlines() == [f"calm-dist: error: {message}"], refused.stderr


@pytest.mark.slow
def test_a_second_prepare_of_the_same_data_waits_for_the_first(corpus, tmp_path):
    """Two jobs sharing a data cache: the second prepare blocks on the first's lock, then reads its manifest."""
    import fcntl
    import threading

    first = corpus.load(cache="cache", workers=1)
    manifest = first.directory / prep.MANIFEST
    manifest.unlink()  # as if the first job were still writing
    with open(first.directory.with_name(first.directory.name + ".lock"), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = {}
        second = threading.Thread(target=lambda: result.setdefault("rows", corpus.load(cache="cache", workers=1)))
        second.start()
        second.join(timeout=5)
        assert second.is_alive() and not manifest.exists()  # waiting, writing nothing
    second.join(timeout=120)
    assert not second.is_alive() and manifest.exists() and len(result["rows"]) == len(first)


def bpe_tokenizer(directory, texts, vocab_size=300):
    """A transformers fast tokenizer over a byte-level BPE trained here, with a special token the data uses."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            additional_special_tokens=["<sep>"]).save_pretrained(directory)
    return Tokenizer(directory)


@pytest.fixture
def fast_corpus(tmp_path, monkeypatch):
    """The corpus of `corpus` with "<sep>" and non-ASCII text in it, and a BPE fast tokenizer trained on part of it."""
    monkeypatch.setattr(prep, "ROWS_PER_SHARD", 40)
    records = write_corpus(tmp_path / "corpus")
    for i, r in enumerate(records):
        r["prompt"] = r["prompt"].replace(":", " <sep>" if i % 3 else " ü 日本:")
    for i in range(3):
        (tmp_path / "corpus" / f"part-{i}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records[90 * i: 90 * (i + 1)]))
    tok = bpe_tokenizer(tmp_path / "bpe", [r["prompt"] + r["completion"] for r in records[:100]])
    return SimpleNamespace(records=records, tok=tok, directory=tmp_path / "corpus", cache=tmp_path / "cache")


@pytest.mark.slow
def test_workers_tokenize_with_the_fast_backend_alone_and_match_transformers(fast_corpus):
    """The spawned workers load only `tokenizers` (importing transformers costs each ~2.5 s); their rows equal
    those of the transformers tokenizer the parent holds, "<sep>" and non-ASCII text included."""
    tok = fast_corpus.tok
    assert tok.encode("a <sep> b").count(tok._hf.convert_tokens_to_ids("<sep>")) == 1
    rows = load_rows(DataConfig(seq_len=SEQ, overlong="truncate"), str(fast_corpus.directory), "data.train", tok,
                     fast_corpus.cache, workers=2)
    assert (rows.directory / prep.BACKEND_FILE).exists()
    order = np.arange(len(fast_corpus.records))
    expected = reference_rows(fast_corpus.records, tok, SEQ)
    got = rows.batch(order)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    # a worker's tokenizer is the backend alone, and loading it imports no transformers
    probe = (f"import sys; from calm_dist.data import prepare as p; t = p._tokenizer('', ({str(rows.directory / prep.BACKEND_FILE)!r}, "
             f"{tok.bos_id}, {tok.eos_id})); print(type(t).__name__, t.encode_batch(['a <sep> ü']), "
             "'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.split(maxsplit=1)[0] == "BackendTokenizer" and out.stdout.strip().endswith("False"), out.stderr
    assert out.stdout.split(maxsplit=1)[1].rsplit(maxsplit=1)[0] == str(tok.encode_batch(["a <sep> ü"]))


@pytest.mark.slow
def test_a_backend_that_tokenizes_differently_is_not_given_to_the_workers(fast_corpus, tmp_path, monkeypatch):
    """When the fast backend disagrees with transformers on the first records, the workers load the full
    tokenizer: the rows are transformers' still."""
    other = bpe_tokenizer(tmp_path / "other", ["zzz yyy xxx www"] * 20, vocab_size=270)
    other_json = other.backend_json()
    monkeypatch.setattr(Tokenizer, "backend_json", lambda self: other_json)
    rows = load_rows(DataConfig(seq_len=SEQ, overlong="truncate"), str(fast_corpus.directory), "data.train",
                     fast_corpus.tok, fast_corpus.cache, workers=2)
    order = np.arange(len(fast_corpus.records))
    expected = reference_rows(fast_corpus.records, fast_corpus.tok, SEQ)
    got = rows.batch(order)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
