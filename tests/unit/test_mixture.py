"""Mixtures of training sources: each source's quota of every global batch, each source's rows in epochs of its
own, a pure function of (seed, step), and one row index over all sources."""
import numpy as np
import pytest
import torch

from calm_dist.config import ConfigError, load_config
from calm_dist.data.mixture import MixedRows, MixtureSampler, quotas

SIZES, WEIGHTS, BATCH = [48, 8, 24], [0.6, 0.1, 0.3], 20  # epochs end where steps end (quotas 12, 2, 6)


def test_quotas_apportion_the_batch_by_weight():
    assert quotas([3, 1], 8) == [6, 2]
    assert quotas([0.6, 0.1, 0.3], 20) == [12, 2, 6]
    assert quotas([1, 1, 1], 8) == [3, 3, 2]  # remainders tie: the earlier sources get the extra rows
    for w in ([0.2, 0.3, 0.5], [1, 2, 3, 4], [5, 1]):
        for batch in (1, 7, 64):
            q = quotas(w, batch)
            assert sum(q) == batch and all(abs(n - batch * x / sum(w)) < 1 for n, x in zip(q, w))


def test_every_batch_holds_each_quota_and_each_source_runs_through_its_epochs():
    sampler = MixtureSampler(SIZES, WEIGHTS, BATCH, seed=3)
    offsets = np.cumsum([0] + SIZES[:-1])
    streams = [[] for _ in SIZES]
    for step in range(30):
        rows = sampler.global_batch_indices(step)
        source = sampler.source_of(rows)
        assert np.bincount(source, minlength=3).tolist() == sampler.quotas == [12, 2, 6]
        for k in range(3):
            streams[k] += (rows[source == k] - offsets[k]).tolist()
    for k, n in enumerate(SIZES):  # source k's rows: whole permutations of its n rows, one epoch after another
        epochs = len(streams[k]) // n
        assert epochs >= 1
        for e in range(epochs):
            assert sorted(streams[k][e * n:(e + 1) * n]) == list(range(n))
    assert streams[1][:8] != streams[1][8:16]  # a new order each epoch


def test_batches_are_a_pure_function_of_seed_and_step_and_ranks_split_them():
    a, b = MixtureSampler(SIZES, WEIGHTS, BATCH, seed=3), MixtureSampler(SIZES, WEIGHTS, BATCH, seed=3)
    in_order = [a.global_batch_indices(step) for step in range(41)]
    for step in (17, 2, 40, 17):  # any order, a fresh sampler: a resumed run draws what an uninterrupted one did
        assert np.array_equal(b.global_batch_indices(step), in_order[step])
    assert not np.array_equal(a.global_batch_indices(5), MixtureSampler(SIZES, WEIGHTS, BATCH, 4)
                              .global_batch_indices(5))
    world, micro, accumulation = 2, 5, 2
    parts = [a.micro_batch_indices(9, m, r, world, micro) for m in range(accumulation) for r in range(world)]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.sort(a.global_batch_indices(9)))
    mixed = [len(set(a.source_of(a.micro_batch_indices(s, 0, 0, world, micro)).tolist())) for s in range(20)]
    assert max(mixed) > 1  # micro-batches mix the sources


def test_a_source_without_a_row_in_the_batch_is_refused():
    with pytest.raises(ConfigError, match="source 1 \\(weight 0.01\\) gets no row of a global batch of 8"):
        MixtureSampler([10, 10], [1, 0.01], 8, seed=0)


class FakeRows:
    """A source's rows: row i of source `tag` holds the value 100 * tag + i everywhere."""

    def __init__(self, tag, n, fingerprint="f"):
        self.tag, self.n, self.fingerprint = tag, n, fingerprint

    def __len__(self):
        return self.n

    def batch(self, indices):
        values = torch.as_tensor(np.asarray(indices, dtype=np.int64) + 100 * self.tag)
        return {"input_ids": values[:, None].repeat(1, 4), "labels": values[:, None].repeat(1, 4)}

    def labelled_tokens(self, indices):
        return 3 * len(indices)


def test_mixed_rows_index_the_sources_one_after_another():
    rows = MixedRows([FakeRows(1, 5), FakeRows(2, 3), FakeRows(3, 4)], [1, 1, 2], ["a", "b", "c"])
    assert len(rows) == 12
    got = rows.batch([11, 0, 5, 7, 4, 8])
    assert got["input_ids"][:, 0].tolist() == [303, 100, 200, 202, 104, 300]
    assert rows.labelled_tokens_by_source([0, 1, 9]) == [6, 0, 3]
    other = MixedRows([FakeRows(1, 5), FakeRows(2, 3), FakeRows(3, 4)], [1, 1, 3], ["a", "b", "c"])
    assert other.fingerprint != rows.fingerprint  # the weights change the run


def test_data_train_takes_a_list_of_weighted_sources():
    cfg = load_config(None, ["data.train=[{source: a.jsonl, weight: 3}, {source: 'hf:org/x?split=train'}]"])
    assert cfg.data.train_sources() == [("data.train[0]", "a.jsonl", 3.0), ("data.train[1]", "hf:org/x?split=train",
                                                                             1.0)]
    assert load_config(None, ["data.train=a.jsonl"]).data.train_sources() == [("data.train", "a.jsonl", 1.0)]
    with pytest.raises(ConfigError, match="data.train\\[\\].weight must be > 0, got 0"):
        load_config(None, ["data.train=[{source: a.jsonl, weight: 0}]"])
    with pytest.raises(ConfigError, match="data.train: an empty list of sources"):
        load_config(None, ["data.train=[]"])
