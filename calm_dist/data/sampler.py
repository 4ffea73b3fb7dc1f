"""The global batch of a step as a pure function of (seed, step): resuming at any step needs nothing else."""
from __future__ import annotations

import numpy as np

from calm_dist.config import ConfigError
from calm_dist.data.mixture import MixedRows, MixtureSampler


class GlobalBatchSampler:
    """Global batch `step` as a pure function of (seed, step): resuming at any step needs nothing else.

    Each epoch is a fresh seeded permutation; a global batch never spans two epochs (the remainder of an
    epoch is dropped). Rank r, micro-step k of the accumulation takes the slice k*world + r of the batch.
    """

    def __init__(self, num_examples: int, global_batch_size: int, seed: int):
        if num_examples < global_batch_size:
            raise ConfigError(f"the training set has {num_examples} rows, fewer than one global batch "
                              f"of {global_batch_size}")
        self.n, self.global_batch, self.seed = num_examples, global_batch_size, seed
        self.batches_per_epoch = num_examples // global_batch_size
        self._perm_epoch, self._perm = -1, None

    def global_batch_indices(self, step: int) -> np.ndarray:
        epoch, within = divmod(step, self.batches_per_epoch)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm[within * self.global_batch:(within + 1) * self.global_batch]

    def micro_batch_indices(self, step: int, micro_step: int, rank: int, world: int,
                            micro_batch_size: int) -> np.ndarray:
        start = (micro_step * world + rank) * micro_batch_size
        return self.global_batch_indices(step)[start:start + micro_batch_size]


def sampler_for(rows, global_batch_size: int, seed: int):
    """GlobalBatchSampler for one source; a mixture's MixtureSampler, with each source's quota of every batch."""
    if isinstance(rows, MixedRows):
        return MixtureSampler([len(p) for p in rows.parts], rows.weights, global_batch_size, seed, rows.names)
    return GlobalBatchSampler(len(rows), global_batch_size, seed)
