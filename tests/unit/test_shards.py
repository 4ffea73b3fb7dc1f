"""Token shards: the rows TokenRows reads from memory-mapped shards equal those of the in-memory path (re-derived
here plainly from the documents), in both modes and both token types; completed_shard detects what a resumed
prepare must rewrite; reading batches does not bring the corpus into memory."""
import gc
import json

import numpy as np
import psutil
import pytest
import torch

from calm_dist.data.shards import ShardWriter, TokenRows, completed_shard, shard_name, token_dtype
from calm_dist.files import sha256_file
from calm_dist.model.lm_loss import IGNORE, labelled_tokens

PAD = 3


def reference_rows(docs, seq_len: int, packing: bool, pad_id: int = PAD) -> dict[str, np.ndarray]:
    """The rows, derived plainly from the (ids, loss_start) documents. A document's first token is never a target
    (nothing of its own precedes it). Packed: the documents back to back, row r = tokens [r*(L-1), r*(L-1)+L) of
    that stream, and each token's position is its place in its document, less the place of the row's first token
    when that one is of the same document."""
    ids_rows, label_rows = [], []
    for ids, loss_start in docs:
        ids = [int(t) for t in ids]
        labels = [IGNORE] * max(1, loss_start) + ids[max(1, loss_start):]
        if not packing:
            ids, labels = ids[:seq_len], labels[:seq_len]
        ids_rows.append(ids)
        label_rows.append(labels[:len(ids)])
    if packing:
        flat_ids = np.array([t for r in ids_rows for t in r], dtype=np.int64)
        flat_labels = np.array([t for r in label_rows for t in r], dtype=np.int64)
        doc = np.array([d for d, r in enumerate(ids_rows) for _ in r], dtype=np.int64)
        in_doc = np.array([i for r in ids_rows for i in range(len(r))], dtype=np.int64)
        starts = [r * (seq_len - 1) for r in range(max(0, len(flat_ids) - 1) // (seq_len - 1))]
        take = np.array([np.arange(s, s + seq_len) for s in starts], dtype=np.int64).reshape(-1, seq_len)
        positions = np.array([in_doc[t] - np.where(doc[t] == doc[t[0]], in_doc[t[0]], 0) for t in take],
                             dtype=np.int64).reshape(-1, seq_len)
        input_ids, labels = flat_ids[take], flat_labels[take]
        return {"input_ids": input_ids, "labels": labels, "attention_mask": np.ones_like(input_ids),
                "position_ids": positions}
    input_ids = np.full((len(ids_rows), seq_len), pad_id, dtype=np.int64)
    labels = np.full((len(ids_rows), seq_len), IGNORE, dtype=np.int64)
    mask = np.zeros((len(ids_rows), seq_len), dtype=np.int64)
    for r, (ids, lab) in enumerate(zip(ids_rows, label_rows)):
        input_ids[r, :len(ids)], labels[r, :len(lab)], mask[r, :len(ids)] = ids, lab, 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def random_docs(rng, n: int, vocab: int, max_len: int) -> list[tuple[list[int], int]]:
    """Documents of 0..max_len tokens, with loss starting anywhere from the first token to past the last."""
    docs = []
    for _ in range(n):
        length = int(rng.integers(0, max_len + 1))
        docs.append((rng.integers(0, vocab, length).tolist(), int(rng.integers(0, length + 1))))
    return docs


def write_shards(directory, docs, per_shard: list[int], dtype, **kw) -> list[dict]:
    """Split `docs` into shards of the given document counts; returns the sidecars in order."""
    sidecars, at = [], 0
    for i, count in enumerate(per_shard):
        with ShardWriter(directory, i, dtype, **kw) as writer:
            for ids, loss_start in docs[at:at + count]:
                writer.add(ids, loss_start)
        sidecars.append(json.loads((directory / f"{shard_name(i)}.json").read_text()))
        at += count
    assert at == len(docs)
    return sidecars


def test_token_dtype_is_uint16_up_to_65536_ids():
    assert token_dtype(32000) == np.dtype("<u2") and token_dtype(65536) == np.dtype("<u2")
    assert token_dtype(65537) == np.dtype("<u4") and token_dtype(1 << 32) == np.dtype("<u4")
    for bad in (0, (1 << 32) + 1):
        with pytest.raises(ValueError):
            token_dtype(bad)


@pytest.mark.parametrize("vocab", [1000, 65536, 1 << 32], ids=["uint16", "uint16-full", "uint32"])
@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_rows_equal_the_in_memory_rows(tmp_path, vocab, packing):
    """Random documents (empty ones, ones longer than seq_len, loss from anywhere) over shards of uneven sizes,
    an empty shard among them; rows read in random order with repeats equal the reference, as int64."""
    rng = np.random.default_rng(vocab + packing)
    seq_len = 16
    docs = random_docs(rng, 120, vocab, max_len=40)
    per_shard = [7, 1, 0, 30, 2, 50, 30]
    sidecars = write_shards(tmp_path, docs, per_shard, token_dtype(vocab), fsync=False)
    ref = reference_rows(docs, seq_len, packing)
    rows = TokenRows(tmp_path, sidecars, seq_len=seq_len, packing=packing, pad_id=PAD, fingerprint="fp")
    assert len(rows) == len(ref["input_ids"]) and set(rows.batch([0])) == set(ref)
    assert (rows.fingerprint == "fp") != packing  # packed rows are named by how they are cut as well
    if vocab > 1 << 16:  # ids above uint16 survive the round trip
        assert ref["input_ids"].max() > 1 << 16
    for indices in (rng.permutation(len(rows)), rng.integers(0, len(rows), 50), [5, 5, 5], [len(rows) - 1],
                    np.array([], dtype=np.int64)):
        batch = rows.batch(indices)
        for key, want in ref.items():
            assert batch[key].dtype == torch.int64 and batch[key].shape == (len(indices), seq_len)
            assert np.array_equal(batch[key].numpy(), want[np.asarray(indices, dtype=np.int64)]), key
        want_n = int(labelled_tokens(torch.from_numpy(ref["labels"][np.asarray(indices, dtype=np.int64)])))
        assert rows.labelled_tokens(indices) == want_n
    assert rows.labelled_tokens(range(len(rows))) > 0  # the documents do carry labels
    with pytest.raises(IndexError):
        rows.batch([len(rows)])
    with pytest.raises(IndexError):
        rows.batch([-1])


def test_packed_rows_span_shard_boundaries(tmp_path):
    """Shards shorter than a row: one packed row draws on three shards; rows overlap by one token; labels and
    positions follow each document."""
    seq_len = 10
    docs = [([1, 2, 3, 4, 5, 6], 2), ([7, 8, 9], 0), ([10, 11], 1), ([12, 13, 14, 15, 16, 17, 18], 7),
            ([19, 20, 21, 22], 0), ([23] * 9, 4)]
    sidecars = write_shards(tmp_path, docs, [1, 1, 1, 1, 2], token_dtype(100), fsync=False)
    rows = TokenRows(tmp_path, sidecars, seq_len=seq_len, packing=True, pad_id=PAD, fingerprint="fp")
    assert len(rows) == 3  # 31 tokens: rows start at 0, 9 and 18; the last three tokens are dropped
    batch = rows.batch([0, 1, 2])
    assert batch["input_ids"][0].tolist() == list(range(1, 11))  # shards 0, 1 and 2
    assert batch["labels"][0].tolist() == [IGNORE, IGNORE, 3, 4, 5, 6, IGNORE, 8, 9, IGNORE]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 0]
    assert batch["input_ids"][1].tolist() == list(range(10, 20))  # 10 again: the context of 11
    assert batch["labels"][1].tolist() == [IGNORE, 11] + [IGNORE] * 8
    assert batch["position_ids"][1].tolist() == [0, 1, 0, 1, 2, 3, 4, 5, 6, 0]
    assert batch["input_ids"][2].tolist() == [19, 20, 21, 22] + [23] * 6
    assert batch["labels"][2].tolist() == [IGNORE, 20, 21, 22] + [IGNORE] * 4 + [23] * 2
    assert batch["position_ids"][2].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5]
    assert torch.equal(batch["attention_mask"], torch.ones(3, seq_len, dtype=torch.int64))


def test_a_document_split_across_packed_rows_is_a_target_on_every_token(tmp_path):
    """A text document of 40 tokens in rows of 8: each token after its first is the target of exactly one row
    position past the row's first (the loss sees it once), whatever the row boundaries."""
    docs = [(list(range(10, 50)), 0), (list(range(60, 63)), 0)]
    sidecars = write_shards(tmp_path, docs, [2], token_dtype(100), fsync=False)
    rows = TokenRows(tmp_path, sidecars, seq_len=8, packing=True, pad_id=PAD, fingerprint="fp")
    batch = rows.batch(range(len(rows)))
    targets = batch["labels"][:, 1:][batch["labels"][:, 1:] != IGNORE].tolist()
    assert len(rows) == 6 and targets == list(range(11, 50)) + [61, 62]


def test_shard_files_and_sidecar(tmp_path):
    """The four files hold what the layout says, the sidecar (written last) their sizes and hashes; no aside
    files are left; the same documents, given as lists or arrays, give the same bytes."""
    docs = [([5, 6, 7], 1), ([], 0), ([65535, 0], 2)]
    with ShardWriter(tmp_path / "a", 3, np.uint16, fsync=False) as writer:
        for ids, loss_start in docs:
            writer.add(ids, loss_start)
    sidecar = json.loads((tmp_path / "a" / "shard-00003.json").read_text())
    assert set(sidecar) == {"shard", "n_docs", "n_tokens", "n_labelled", "dtype", "files"}
    assert (sidecar["shard"], sidecar["n_docs"], sidecar["n_tokens"], sidecar["n_labelled"], sidecar["dtype"]) == \
        (3, 3, 5, 2, "uint16")
    stem = tmp_path / "a" / "shard-00003"
    assert (tmp_path / "a" / "shard-00003.tokens.bin").read_bytes() == np.array([5, 6, 7, 65535, 0], "<u2").tobytes()
    index, loss_start = np.load(f"{stem}.index.npy"), np.load(f"{stem}.loss_start.npy")
    assert index.dtype == np.int64 and index.tolist() == [0, 3, 3, 5]
    assert loss_start.dtype == np.int32 and loss_start.tolist() == [1, 0, 2]
    assert sorted(sidecar["files"]) == sorted(p.name for p in (tmp_path / "a").iterdir() if p.suffix != ".json")
    for name, entry in sidecar["files"].items():
        path = tmp_path / "a" / name
        assert entry == {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    assert completed_shard(tmp_path / "a", 3) == sidecar
    # numpy arrays of another integer type, and fsync on: identical files
    with ShardWriter(tmp_path / "b", 3, np.dtype("uint16")) as writer:
        for ids, loss_start in docs:
            writer.add(np.asarray(ids, dtype=np.int64), np.int64(loss_start))
    for p in (tmp_path / "a").iterdir():
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes(), p.name


def test_add_refuses_what_the_shard_cannot_hold(tmp_path):
    writer = ShardWriter(tmp_path, 0, token_dtype(1000), fsync=False)
    for ids, loss_start in (([70000], 0), ([-1], 0), (np.array([1 << 16], dtype=np.int64), 0), ([1.5], 0),
                            ([1, 2], 3), ([1, 2], -1), ([[1, 2]], 0)):
        with pytest.raises(ValueError):
            writer.add(ids, loss_start)
    writer.add([65535, 4], 0)
    assert writer.close()["n_tokens"] == 2
    with pytest.raises(ValueError):
        ShardWriter(tmp_path, 1, np.int64)


def test_completed_shard_detects_incomplete_shards(tmp_path):
    docs = [(list(range(i, i + 5)), 1) for i in range(20)]
    write_shards(tmp_path, docs, [10, 10], token_dtype(100), fsync=False)
    stem = tmp_path / shard_name(0)
    assert completed_shard(tmp_path, 0)["n_docs"] == 10 and completed_shard(tmp_path, 1) is not None
    assert completed_shard(tmp_path, 2) is None  # never written

    tokens = tmp_path / f"{shard_name(0)}.tokens.bin"
    data = tokens.read_bytes()
    tokens.write_bytes(data[:-2])  # truncated
    assert completed_shard(tmp_path, 0) is None
    tokens.write_bytes(data[:-2] + b"\xff\xff")  # the right size, other bytes: only a verify sees it
    assert completed_shard(tmp_path, 0) is not None and completed_shard(tmp_path, 0, verify=True) is None
    tokens.write_bytes(data)
    assert completed_shard(tmp_path, 0, verify=True) is not None

    index = tmp_path / f"{shard_name(1)}.index.npy"
    index.write_bytes(index.read_bytes()[:-8])
    assert completed_shard(tmp_path, 1) is None
    (tmp_path / f"{shard_name(0)}.loss_start.npy").unlink()
    assert completed_shard(tmp_path, 0) is None
    write_shards(tmp_path, docs, [10, 10], token_dtype(100), fsync=False)
    assert completed_shard(tmp_path, 0) is not None
    (tmp_path / f"{shard_name(0)}.json").unlink()  # the sidecar missing: the files alone do not count
    assert completed_shard(tmp_path, 0) is None
    (tmp_path / f"{shard_name(1)}.json").write_text("{\"shard\": 1, \"n_do")  # a torn sidecar
    assert completed_shard(tmp_path, 1) is None
    assert stem.with_suffix(".tokens.bin").exists()


def test_a_rewrite_or_a_failure_leaves_no_complete_looking_shard(tmp_path):
    """A writer removes the shard's old sidecar before it writes: an interrupted rewrite is incomplete, not the
    old sidecar beside new files; a writer that fails leaves no aside files."""
    write_shards(tmp_path, [([1, 2, 3], 0)], [1], token_dtype(100), fsync=False)
    assert completed_shard(tmp_path, 0) is not None
    writer = ShardWriter(tmp_path, 0, token_dtype(100), fsync=False)
    writer.add([4, 5], 0)  # ... and the process dies here
    assert completed_shard(tmp_path, 0) is None
    writer.abort()
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, 1, token_dtype(100), fsync=False) as writer:
            writer.add([1], 0)
            raise RuntimeError("a bad record")
    assert completed_shard(tmp_path, 1) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{shard_name(0)}.{part}" for part in
                                                          ("index.npy", "loss_start.npy", "tokens.bin")]


def test_reading_batches_does_not_load_the_corpus(tmp_path):
    """50M uint16 tokens (100 MB) in 5 shards: reading 10 random batches of 32 rows of each kind raises this
    process's resident memory by a few MB, not by the size of the data. (Memory-mapped tokens fail it: the
    kernel maps up to ~1 MB around each page read, and 640 random rows bring most of the corpus in.)"""
    rng = np.random.default_rng(0)
    sidecars = []
    for shard in range(5):
        tokens = rng.integers(0, 1 << 16, 10_000_000, dtype=np.uint16)
        cuts = np.cumsum(rng.integers(200, 2001, 10_000))
        cuts = np.concatenate([[0], cuts[cuts < len(tokens)], [len(tokens)]])
        with ShardWriter(tmp_path, shard, np.uint16, fsync=False) as writer:
            for a, b in zip(cuts[:-1], cuts[1:]):
                writer.add(tokens[a:b], int(rng.integers(0, b - a)))
            sidecars.append(writer.close())
    del tokens
    data_bytes = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert data_bytes > 100e6
    # code paths and allocator warmed up on other shards, so the measurement sees the data only
    small = tmp_path / "small"
    warm = write_shards(small, [(list(range(50)), 3)] * 8, [4, 4], np.uint16, fsync=False)
    for packing in (False, True):
        TokenRows(small, warm, seq_len=64, packing=packing, pad_id=0, fingerprint="").batch([0, 1, 2])
    gc.collect()
    process = psutil.Process()
    before = process.memory_info().rss
    for packing in (False, True):
        rows = TokenRows(tmp_path, sidecars, seq_len=2048, packing=packing, pad_id=0, fingerprint="")
        for _ in range(10):
            indices = rng.integers(0, len(rows), 32)
            batch = rows.batch(indices)
            assert batch["input_ids"].shape == (32, 2048)
            assert rows.labelled_tokens(indices) > 0
        # the offsets are mapped, not loaded (too small here for the RSS to tell)
        assert all(isinstance(a, np.memmap) for s in rows._open.values() for a in (s.index, s.loss_start))
    grown = process.memory_info().rss - before
    print(f"RSS grew by {grown / 2**20:.1f} MiB reading 2 x 10 batches of 32 rows from {data_bytes / 2**20:.0f} MiB")
    assert grown < 0.2 * data_bytes


def test_open_shards_are_bounded(tmp_path):
    """Rows from every shard, read with max_open=2: never more than two shards' files open at once."""
    docs = [([i, i + 1, i + 2], 0) for i in range(14)]
    sidecars = write_shards(tmp_path, docs, [2] * 7, token_dtype(100), fsync=False)
    process = psutil.Process()
    before = process.num_fds()
    rows = TokenRows(tmp_path, sidecars, seq_len=4, packing=False, pad_id=PAD, fingerprint="fp", max_open=2)
    ref = reference_rows(docs, 4, packing=False)
    for indices in ([0, 13, 2, 11, 4, 9, 6, 7], list(range(14))[::-1]):
        assert np.array_equal(rows.batch(indices)["input_ids"].numpy(), ref["input_ids"][indices])
        assert process.num_fds() - before <= 2 * 3
    rows.close()
    assert process.num_fds() == before


def test_a_shard_that_disagrees_with_its_sidecar_is_refused(tmp_path):
    """tokens.bin one token short: opening the shard refuses it, even for rows whose tokens are all there."""
    docs = [([1, 2, 3, 4], 0), ([5, 6], 1), ([7, 8], 0)]
    sidecars = write_shards(tmp_path, docs, [1, 2], token_dtype(100), fsync=False)
    tokens = tmp_path / f"{shard_name(1)}.tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-2])
    for packing in (False, True):
        rows = TokenRows(tmp_path, sidecars, seq_len=2, packing=packing, pad_id=PAD, fingerprint="fp")
        assert rows.batch([0])["input_ids"].tolist() == [[1, 2]]  # shard 0 is fine
        with pytest.raises(ValueError, match="tokens.bin"):
            rows.batch([1 if not packing else 4])  # [5, 6]: in the file, but the shard is damaged


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_any_labelled(tmp_path, packing):
    """Labels only past seq_len (unpacked: truncated away) or only in the dropped tail (packed): none left."""
    docs = [([1, 2, 3, 4], 4)] * 5 + [([5, 6, 7, 8, 9, 10], 5) if packing else ([5, 6, 7, 8, 9], 2)]
    sidecars = write_shards(tmp_path, docs, [3, 3], token_dtype(100), fsync=False)
    rows = TokenRows(tmp_path, sidecars, seq_len=2 if not packing else 4, packing=packing, pad_id=PAD, fingerprint="")
    ref = reference_rows(docs, rows.seq_len, packing)
    assert not (ref["labels"][:, 1:] != IGNORE).any() and not rows.any_labelled(chunk_rows=2)
    docs[-1] = ([5, 6, 7, 8, 9], 1)  # labels in the last row only
    sidecars = write_shards(tmp_path, docs, [3, 3], token_dtype(100), fsync=False)
    assert TokenRows(tmp_path, sidecars, seq_len=rows.seq_len, packing=packing, pad_id=PAD,
                     fingerprint="").any_labelled(chunk_rows=2)
