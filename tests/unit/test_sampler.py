"""GlobalBatchSampler: a fresh permutation each epoch with the remainder dropped, micro-batch x rank slices
that partition the global batch, and every batch a pure function of (seed, step)."""
import numpy as np
import pytest

from calm_dist.config import ConfigError
from calm_dist.data.sampler import GlobalBatchSampler

N, BATCH, SEED = 43, 12, 7  # 3 batches an epoch, 7 rows dropped each epoch


def epoch_rows(sampler, epoch: int) -> np.ndarray:
    per_epoch = sampler.batches_per_epoch
    return np.concatenate([sampler.global_batch_indices(epoch * per_epoch + k) for k in range(per_epoch)])


def test_each_epoch_is_a_permutation_with_the_remainder_dropped():
    sampler = GlobalBatchSampler(N, BATCH, SEED)
    assert sampler.batches_per_epoch == 3
    epochs = [epoch_rows(sampler, e) for e in range(4)]
    for rows in epochs:
        assert len(rows) == 36 and len(set(rows.tolist())) == 36 and set(rows.tolist()) <= set(range(N))
    # each epoch shuffles anew: another order, and other rows are dropped
    assert len({tuple(rows) for rows in epochs}) == 4
    assert len({frozenset(range(N)) - frozenset(rows.tolist()) for rows in epochs}) > 1
    # the batch after an epoch's last one starts the next epoch; none spans two
    assert np.array_equal(sampler.global_batch_indices(3), epochs[1][:BATCH])


def test_batches_are_the_seeded_permutation_cut_in_order():
    """Batch k of epoch e is slice k of numpy's permutation seeded with (seed, e): what a resumed run and
    the reference in test_distributed_training.py re-derive."""
    sampler = GlobalBatchSampler(N, BATCH, SEED)
    for epoch in range(3):
        perm = np.random.default_rng([SEED, epoch]).permutation(N)
        assert np.array_equal(epoch_rows(sampler, epoch), perm[:36])


@pytest.mark.parametrize("world,micro", [(1, 12), (2, 6), (2, 3), (3, 2), (4, 1)])
def test_micro_batch_and_rank_slices_partition_the_global_batch(world, micro):
    sampler = GlobalBatchSampler(N, BATCH, SEED)
    accumulation = BATCH // (world * micro)
    for step in (0, 2, 3, 7):
        slices = [sampler.micro_batch_indices(step, k, rank, world, micro)
                  for k in range(accumulation) for rank in range(world)]
        assert all(len(s) == micro for s in slices)
        # in order micro-step by micro-step, rank by rank: together exactly the global batch, no row twice
        assert np.array_equal(np.concatenate(slices), sampler.global_batch_indices(step))


def test_a_pure_function_of_seed_and_step():
    first = GlobalBatchSampler(N, BATCH, SEED)
    in_order = [first.global_batch_indices(step).copy() for step in range(10)]
    backwards = GlobalBatchSampler(N, BATCH, SEED)  # another process, asked in another order (a resume)
    for step in reversed(range(10)):
        assert np.array_equal(backwards.global_batch_indices(step), in_order[step])
    assert np.array_equal(GlobalBatchSampler(N, BATCH, SEED).global_batch_indices(8), in_order[8])
    other_seed = GlobalBatchSampler(N, BATCH, SEED + 1)
    assert not all(np.array_equal(other_seed.global_batch_indices(s), in_order[s]) for s in range(10))


def test_fewer_rows_than_one_global_batch_is_a_config_error():
    with pytest.raises(ConfigError, match="11 rows, fewer than one global batch of 12"):
        GlobalBatchSampler(11, BATCH, SEED)
