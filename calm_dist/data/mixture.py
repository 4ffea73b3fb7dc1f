"""A training set mixed from several sources by weight, e.g. the composition's data plus a share of the anchor's
own data as replay (which keeps the anchor's skills).

Every global batch holds a fixed number of rows of each source, its quota: the batch size apportioned by the
weights (largest remainders, ties to the earlier source), so each source's share is the same at every step. Source
k's rows come from its own stream of seeded permutations, epoch after epoch, and step s takes the rows
[s * quota_k, (s + 1) * quota_k) of that stream: the batch is a pure function of (seed, step), as with one source,
and a resumed run sees the same rows. The batch's rows are then shuffled together, so every micro-batch mixes the
sources. Row indices are global: source k's rows follow those of the sources before it (what the states cache
and `MixedRows.batch` index).
"""
from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

import numpy as np

from calm_dist.config import ConfigError

if TYPE_CHECKING:
    import torch


def quotas(weights: list[float], global_batch: int) -> list[int]:
    """The rows of each source in a global batch: `global_batch` apportioned by `weights` (largest remainder)."""
    total = sum(weights)
    exact = [global_batch * w / total for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda k: (-(exact[k] - counts[k]), k))
    for k in by_remainder[:global_batch - sum(counts)]:
        counts[k] += 1
    return counts


class MixtureSampler:
    """GlobalBatchSampler's interface over several sources (see the module docstring)."""

    def __init__(self, sizes: list[int], weights: list[float], global_batch_size: int, seed: int,
                 names: list[str] | None = None):
        self.sizes, self.seed, self.global_batch = list(sizes), seed, global_batch_size
        self.quotas = quotas(weights, global_batch_size)
        names = names or [f"source {k}" for k in range(len(sizes))]
        for name, quota, weight in zip(names, self.quotas, weights):
            if quota == 0:
                raise ConfigError(f"data.train: {name} (weight {weight:g}) gets no row of a global batch of "
                                  f"{global_batch_size}: raise its weight or the batch size")
        self.offsets = np.cumsum([0, *self.sizes[:-1]])
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _stream(self, k: int, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of source k's stream of per-epoch permutations (local indices)."""
        n = self.sizes[k]
        out = []
        while start < stop:
            epoch, within = divmod(start, n)
            if (k, epoch) not in self._perms:
                if len(self._perms) > 8:  # a step reads at most two epochs of each source
                    self._perms.clear()
                self._perms[(k, epoch)] = np.random.default_rng([self.seed, k, epoch]).permutation(n)
            take = min(stop - start, n - within)
            out.append(self._perms[(k, epoch)][within:within + take])
            start += take
        return np.concatenate(out)

    def global_batch_indices(self, step: int) -> np.ndarray:
        rows = np.concatenate([self.offsets[k] + self._stream(k, step * q, (step + 1) * q)
                               for k, q in enumerate(self.quotas)])
        return rows[np.random.default_rng([self.seed, step, len(self.sizes)]).permutation(len(rows))]

    def micro_batch_indices(self, step: int, micro_step: int, rank: int, world: int,
                            micro_batch_size: int) -> np.ndarray:
        start = (micro_step * world + rank) * micro_batch_size
        return self.global_batch_indices(step)[start:start + micro_batch_size]

    def source_of(self, indices) -> np.ndarray:
        return np.searchsorted(self.offsets, np.asarray(indices), side="right") - 1


class MixedRows:
    """Several sources' rows (TokenRows) behind one global row index: source k's rows follow the earlier ones."""

    def __init__(self, parts: list, weights: list[float], names: list[str]):
        self.parts, self.weights, self.names = parts, list(weights), list(names)
        self.offsets = np.cumsum([0, *(len(p) for p in parts)])
        text = json.dumps([[p.fingerprint for p in parts], self.weights])
        self.fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _split(self, indices):
        indices = np.asarray(indices, dtype=np.int64)
        source = np.searchsorted(self.offsets, indices, side="right") - 1
        return indices, source

    def batch(self, indices) -> dict[str, torch.Tensor]:
        import torch  # here: prepare's worker processes import this package and never make a tensor

        indices, source = self._split(indices)
        if len(indices) == 0:
            return self.parts[0].batch([])
        out = None
        for k in np.unique(source):
            where = np.nonzero(source == k)[0]
            part = self.parts[k].batch(indices[where] - self.offsets[k])
            if out is None:
                out = {name: torch.empty((len(indices), *t.shape[1:]), dtype=t.dtype) for name, t in part.items()}
            for name, t in part.items():
                out[name][torch.from_numpy(where)] = t
        return out

    def texts(self, indices) -> list:
        """TokenRows.texts of each row, from its source."""
        indices, source = self._split(indices)
        out: list = [None] * len(indices)
        for k in np.unique(source):
            where = np.nonzero(source == k)[0]
            for i, value in zip(where.tolist(), self.parts[k].texts(indices[where] - self.offsets[k])):
                out[i] = value
        return out

    def labelled_tokens_by_source(self, indices) -> list[int]:
        indices, source = self._split(indices)
        return [self.parts[k].labelled_tokens(indices[source == k] - self.offsets[k]) if (source == k).any() else 0
                for k in range(len(self.parts))]

    def labelled_tokens(self, indices) -> int:
        return sum(self.labelled_tokens_by_source(indices))
