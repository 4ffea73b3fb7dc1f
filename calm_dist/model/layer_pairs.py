"""Which augmenting layer feeds which anchor layer.

Indices are 0-based decoder blocks; a pair (i, j) reads the OUTPUT of augmenting block i and adds the
cross-attention result to the output of anchor block j (the input of anchor block j + 1).

The paper's rule (Bansal et al. 2024, §3.1), made exact here:
  n = N_aug // every pairs (every = 4), augmenting blocks every-1, 2*every-1, ..., n*every-1
  (the output of every 4th block), paired in order with n evenly spaced anchor blocks:
  anchor block round_half_up((k + 1) * N_anchor / n) - 1 = (2(k+1)N_anchor + n) // 2n - 1 (floored at 0),
  for k = 0 .. n-1; the deepest pair always feeds the last anchor block.
Examples: 8-block augmenting, 12-block anchor -> [(3, 5), (7, 11)];
          32-block augmenting, 80-block anchor -> [(3, 9), (7, 19), ..., (31, 79)];
          22-block augmenting (n = 5), 32-block anchor -> anchor blocks 5, 12, 18, 25, 31.
"""
from __future__ import annotations

LayerPairs = list[tuple[int, int]]


class MappingError(ValueError):
    """Layer pairs the two models cannot take."""


def default_layer_pairs(n_augmenting_layers: int, n_anchor_layers: int, every: int = 4) -> LayerPairs:
    """The paper's rule (module docstring): every `every`-th augmenting block, to evenly spaced anchor blocks."""
    if every < 1:
        raise MappingError(f"every must be >= 1, got {every}")
    n = n_augmenting_layers // every
    if n < 1:
        raise MappingError(
            f"the augmenting model has {n_augmenting_layers} blocks: fewer than every={every}, so the "
            "default rule picks no layer; pass explicit layer_pairs or a smaller `every`"
        )
    if n_anchor_layers < 1:
        raise MappingError(f"the anchor has {n_anchor_layers} blocks")
    augmenting = [(k + 1) * every - 1 for k in range(n)]
    anchor = [max(0, (2 * (k + 1) * n_anchor_layers + n) // (2 * n) - 1) for k in range(n)]
    return list(zip(augmenting, anchor))


def validate_layer_pairs(pairs, n_augmenting_layers: int, n_anchor_layers: int, who: str = "augmenting model",
                         anchor: str = "anchor") -> LayerPairs:
    """Normalise to a list of int tuples and check ranges; one augmenting layer may feed several anchor layers.
    `who` and `anchor` name the two models in the messages."""
    try:
        pairs = [(int(i), int(j)) for i, j in pairs]
    except (TypeError, ValueError) as e:
        raise MappingError(f"layer pairs for the {who} must be (augmenting_layer, anchor_layer) pairs: {e}") from None
    if not pairs:
        raise MappingError(f"the {who} needs at least one layer pair")
    for i, j in pairs:
        if not 0 <= i < n_augmenting_layers:
            raise MappingError(
                f"augmenting layer {i} is out of range: the {who} has blocks 0..{n_augmenting_layers - 1}")
        if not 0 <= j < n_anchor_layers:
            raise MappingError(f"anchor layer {j} is out of range: the {anchor} has blocks 0..{n_anchor_layers - 1}")
    if len(set(pairs)) != len(pairs):
        raise MappingError(f"duplicate layer pair in {pairs} for the {who}")
    return pairs


def used_augmenting_layers(layer_pairs: list[LayerPairs]) -> list[list[int]]:
    """For each augmenting model, the blocks whose output some pair reads, ascending: what the composition
    captures, what the states cache stores, and where each augmenting model may be truncated."""
    return [sorted({int(i) for i, _ in pairs}) for pairs in layer_pairs]
