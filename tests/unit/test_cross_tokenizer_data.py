"""The data path of models of different tokenizers (data.different_tokenizers): prepared shards keep each record's
text and the anchor's spans (calm_dist/data/texts.py, text_records.py), and a micro-batch carries each augmenting
model's aligned reading (aligned_rows.py), the one token_alignment's reference gives the record's text; the
anchor's rows and labels are the same-tokenizer path's; data.augmenting_seq_len follows data.overlong; the
prepared rows' fingerprint covers the augmenting tokenizer; a mixture reads each source's texts; reading texts
keeps a rank's memory flat in the corpus size."""
import gc
import json

import numpy as np
import psutil
import pytest
import torch

from calm_dist.config import ConfigError, DataConfig
from calm_dist.data.aligned_rows import AlignedRows
from calm_dist.data.mixture import MixedRows
from calm_dist.data.prepare import load_rows
from calm_dist.data.shards import ShardWriter, TokenRows
from calm_dist.data.texts import TextWriter
from calm_dist.model.token_alignment import align, read
from calm_dist.tiny_setup import make_records
from tests.helpers.tokenizers import byte_level_bpe, sentencepiece, word_level

PAIRS = [("small_bpe", "word"), ("sentencepiece", "bpe")]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizers")
    return {"word": word_level(d / "word"), "bpe": byte_level_bpe(d / "bpe", 250),
            "small_bpe": byte_level_bpe(d / "small_bpe", 60), "sentencepiece": sentencepiece(d / "sp.model", 40)}


@pytest.fixture
def records(tmp_path):
    records = make_records(24, seed=3)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records, str(tmp_path / "train.jsonl")


def rows_of(tmp_path, spec, atok, augmenting, **settings):
    cfg = DataConfig(train=spec, seq_len=settings.pop("seq_len", 96), **settings)
    return load_rows(cfg, spec, "data.train", atok, tmp_path / "cache", augmenting=augmenting, workers=1), cfg


def anchor_spans(record, atok):
    """The anchor's tokens of bos + prompt + completion + eos and their spans in prompt + completion, plainly."""
    prompt, completion = record["prompt"], record["completion"]
    p_ids, p_spans = atok.encode_with_spans(prompt)
    c_ids, c_spans = atok.encode_with_spans(completion)
    text = prompt + completion
    ids = [atok.bos_id, *p_ids, *c_ids, atok.eos_id]
    spans = [(0, 0), *p_spans, *((s + len(prompt), e + len(prompt)) for s, e in c_spans), (len(text), len(text))]
    return text, ids, spans


@pytest.mark.parametrize("anchor,augmenting", PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_a_micro_batch_carries_each_augmenting_reading_of_the_records_text(tmp_path, tokenizers, records, anchor,
                                                                           augmenting):
    atok, gtok = tokenizers[anchor], tokenizers[augmenting]
    recs, spec = records
    rows, cfg = rows_of(tmp_path, spec, atok, [gtok], different_tokenizers=True)
    plain, _ = rows_of(tmp_path, spec, atok, [])
    indices = [5, 0, 17, 3]
    batch = AlignedRows(rows, [gtok], cfg.augmenting_len).batch(indices)
    same = plain.batch(indices)
    for name in ("input_ids", "labels", "attention_mask"):  # the anchor's side is the same-tokenizer path's
        assert torch.equal(batch[name], same[name]), name
    spans = torch.zeros(len(indices), cfg.seq_len, 2, dtype=torch.long)
    texts = []
    for i, row in enumerate(indices):
        text, ids, row_spans = anchor_spans(recs[row], atok)
        assert batch["input_ids"][i, :len(ids)].tolist() == ids
        spans[i, :len(ids)] = torch.tensor(row_spans)
        texts.append(text)
    want = align(texts, spans, batch["attention_mask"], gtok, pad_id=gtok.pad_id, window=None)
    (got,) = batch["augmenting_inputs"]
    assert want.has_tails or augmenting == "bpe"
    for field in want.__dataclass_fields__:
        assert torch.equal(getattr(got, field), getattr(want, field)), field


def test_a_prefetched_micro_batch_is_the_one_built_in_place(tmp_path, tokenizers, records):
    """AlignedRows.prefetch aligns the next micro-batch in a background thread (the trainer's), get returns it:
    the batch that batch() builds, field for field, whichever order the rows come in."""
    _, spec = records
    atok, gtok = tokenizers["sentencepiece"], tokenizers["bpe"]
    rows, cfg = rows_of(tmp_path, spec, atok, [gtok], different_tokenizers=True)
    aligned = AlignedRows(rows, [gtok], cfg.augmenting_len)
    first, second = [3, 9, 1, 20], [11, 2, 23, 5]
    aligned.prefetch(first)
    aligned.prefetch(second)
    for indices in (second, first, [0, 7]):  # the last one never prefetched
        got, want = aligned.get(indices), aligned.batch(indices)
        for name in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(got[name], want[name]), name
        for field in want["augmenting_inputs"][0].__dataclass_fields__:
            assert torch.equal(getattr(got["augmenting_inputs"][0], field),
                               getattr(want["augmenting_inputs"][0], field)), field
    assert not aligned._pending


def test_the_lora_baseline_reads_the_anchors_rows_alone(tmp_path, tokenizers, records):
    """model.method=lora trains the anchor alone: its batches carry no augmenting inputs (its forward takes none),
    the composition's do."""
    from calm_dist.config import load_config
    from calm_dist.data.aligned_rows import with_alignment

    _, spec = records
    rows, _ = rows_of(tmp_path, spec, tokenizers["small_bpe"], [tokenizers["word"]], different_tokenizers=True)
    common = [f"data.train={spec}", "data.different_tokenizers=true"]
    lora = with_alignment(rows, load_config(None, [*common, "model.method=lora"]), [tokenizers["word"]])
    calm = with_alignment(rows, load_config(None, common), [tokenizers["word"]])
    assert lora is rows and "augmenting_inputs" not in lora.batch([0, 1])
    assert "augmenting_inputs" in calm.batch([0, 1])


def test_the_prepared_rows_fingerprint_covers_the_augmenting_tokenizer(tmp_path, tokenizers, records):
    _, spec = records
    atok = tokenizers["small_bpe"]
    word, _ = rows_of(tmp_path, spec, atok, [tokenizers["word"]], different_tokenizers=True)
    bpe, _ = rows_of(tmp_path, spec, atok, [tokenizers["bpe"]], different_tokenizers=True)
    plain, _ = rows_of(tmp_path, spec, atok, [])
    assert len({word.fingerprint, bpe.fingerprint, plain.fingerprint}) == 3
    assert not list(plain.directory.glob("*.text.json"))  # the same-tokenizer shards are as they were


def longest_reading(gtok, text, spans) -> int:
    """The most augmenting tokens any of these anchor tokens reads: its prefix's reading, read whole."""
    return max(len(read(gtok, text[:int(end)])[0]) for _, end in spans)


def test_an_augmenting_reading_over_augmenting_seq_len_follows_overlong(tmp_path, tokenizers, records):
    """The limit bounds the longest reading any anchor token reads (a prefix cut in a word reads more tokens than
    the whole text). error: refused naming the row; truncate: the anchor's last tokens are dropped until the
    readings of those kept fit, and the rows keep the untruncated rows' first tokens."""
    recs, spec = records
    atok, gtok, L = tokenizers["sentencepiece"], tokenizers["bpe"], 11
    first, n = next((i + 1, n) for i, r in enumerate(recs)
                    if (n := longest_reading(gtok, *anchor_spans(r, atok)[::2])) > L)
    with pytest.raises(ConfigError, match=f"row {first}: augmenting model 0's tokenizer reads {n} tokens, more "
                                          f"than data.augmenting_seq_len={L} \\(raise it or set "
                                          "data.overlong=truncate\\)"):
        rows_of(tmp_path, spec, atok, [gtok], different_tokenizers=True, augmenting_seq_len=L, seq_len=96)
    rows, cfg = rows_of(tmp_path, spec, atok, [gtok], different_tokenizers=True, augmenting_seq_len=L,
                        seq_len=96, overlong="truncate")
    whole, _ = rows_of(tmp_path, spec, atok, [gtok], different_tokenizers=True, seq_len=96)
    indices = list(range(len(recs)))
    batch = AlignedRows(rows, [gtok], L).batch(indices)
    full, full_texts = whole.batch(indices), whole.texts(indices)
    kept, untruncated = batch["attention_mask"].sum(1), full["attention_mask"].sum(1)
    assert 0 < int((kept < untruncated).sum()) < len(recs)
    for i, (text, spans) in enumerate(rows.texts(indices)):
        n, (whole_text, whole_spans) = int(kept[i]), full_texts[i]
        assert torch.equal(batch["input_ids"][i, :n], full["input_ids"][i, :n])
        assert text == whole_text[:int(spans[n - 1, 1])] and longest_reading(gtok, text, spans) <= L
        if n < untruncated[i]:  # one anchor token more would read too much
            assert longest_reading(gtok, whole_text, whole_spans[:n + 1]) > L
    assert int(batch["augmenting_inputs"][0].position_ids.max()) < L


@pytest.mark.parametrize("overrides,message", [
    (dict(packing=True), "data.packing with data.different_tokenizers is not supported"),
    (dict(augmenting_seq_len=0), "data.augmenting_seq_len must be >= 1"),
])
def test_settings_the_different_tokenizers_do_not_take_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(train="x.jsonl", different_tokenizers=True, **overrides)
    with pytest.raises(ConfigError, match="data.augmenting_seq_len is read only with data.different_tokenizers"):
        DataConfig(train="x.jsonl", augmenting_seq_len=8)


def test_a_mixture_serves_each_rows_text_from_its_source(tmp_path, tokenizers):
    """MixedRows.texts: the global rows of two sources, in any order, read each source's own text and spans."""
    atok, gtok = tokenizers["small_bpe"], tokenizers["word"]
    sources = []
    for k, seed in enumerate((4, 5)):
        path = tmp_path / f"part{k}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in make_records(6 + k, seed=seed)))
        sources.append(rows_of(tmp_path, str(path), atok, [gtok], different_tokenizers=True)[0])
    mixed = MixedRows(sources, [1.0, 1.0], ["a", "b"])
    indices = [9, 0, 6, 5, 12]
    want = [sources[0].texts([i])[0] if i < 6 else sources[1].texts([i - 6])[0] for i in indices]
    for (text, spans), (want_text, want_spans) in zip(mixed.texts(indices), want):
        assert text == want_text and np.array_equal(spans, want_spans)
    assert len({text for text, _ in want}) == len(indices)


def write_text_shards(directory, n_shards: int, n_docs: int, rng) -> list[dict]:
    """Shards of `n_docs` documents, each 4,000 characters of text and 1,000 tokens' spans."""
    letters = np.frombuffer(b"abcdefgh ", dtype=np.uint8)
    tokens = rng.integers(0, 1000, 1000, dtype=np.uint16)
    spans = np.stack([np.arange(0, 4000, 4), np.arange(4, 4001, 4)], axis=1)
    sidecars = []
    for shard in range(n_shards):
        texts = TextWriter(directory, shard)
        with ShardWriter(directory, shard, np.uint16, fsync=False) as writer:
            for _ in range(n_docs):
                writer.add(tokens, 0)
                texts.add(letters[rng.integers(0, len(letters), 4000)].tobytes().decode(), spans)
            texts.close()
            sidecars.append(writer.close())
    return sidecars


def test_reading_rows_texts_does_not_load_the_corpus(tmp_path):
    """2 shards of 4,000 documents (~100 MB of text, spans and tokens): reading the texts of 10 random batches of
    32 rows raises this process's resident memory by a few MB, not by the size of the data."""
    rng = np.random.default_rng(0)
    sidecars = write_text_shards(tmp_path / "big", 2, 4000, rng)
    data_bytes = sum(p.stat().st_size for p in (tmp_path / "big").glob("shard-*"))
    assert data_bytes > 90e6
    # code paths and allocator warmed up on other shards, so the measurement sees the data only
    small = TokenRows(tmp_path / "small", write_text_shards(tmp_path / "small", 2, 4, rng), seq_len=1024,
                      packing=False, pad_id=0, fingerprint="")
    small.texts([0, 1, 5])
    rows = TokenRows(tmp_path / "big", sidecars, seq_len=1024, packing=False, pad_id=0, fingerprint="")
    gc.collect()
    process = psutil.Process()
    before = process.memory_info().rss
    for _ in range(10):
        for text, row_spans in rows.texts(rng.integers(0, len(rows), 32)):
            assert len(text) == 4000 and row_spans.shape == (1000, 2) and int(row_spans[-1, 1]) == 4000
    grown = process.memory_info().rss - before
    assert grown < 0.2 * data_bytes, (grown, data_bytes)
