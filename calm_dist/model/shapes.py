"""The shapes of the composition's trainable part (one cross-attention block's parameter tensors, the parameter
count of all blocks) and the loss's logits chunk: the facts of the model the planner reads.

`calm_dist.model.cross_attention.CrossAttentionBlock` builds these tensors; the composition, the cost model and
`calm-dist plan` count them from here, so a change to the block is a change to this one list
(tests/unit/test_costs.py compares it with a real block's parameters).

Pure Python (never imports torch): the planner imports it without torch, as it does layer_pairs.
"""
from __future__ import annotations

from typing import Iterable, Sequence

__all__ = ["block_tensors", "block_parameter_count", "block_matmul_parameter_count", "composition_parameter_count"]


def block_tensors(d_augmenting: int, d_anchor: int) -> list[tuple[str, int, bool]]:
    """Every parameter tensor of one block as (name, numel, is_matmul_weight), in the block's parameter order
    (D_A = augmenting width, D_B = anchor width):

        proj             D_A*D_B + D_B   f_proj, a Linear with bias
        augmenting_norm  2*D_B           LayerNorm on the projected augmenting states
        query_norm       2*D_B           LayerNorm on the anchor query
        q/k/v_proj       3 * D_B^2       no bias
        o_proj           D_B^2           no bias, zero-initialised so that composed == anchor at step 0

    The paper counts D_A*D_B + 3*D_B^2 (+ D_B^2 for W^O); the bias and the two LayerNorms add 5*D_B."""
    return [
        ("proj.weight", d_augmenting * d_anchor, True), ("proj.bias", d_anchor, False),
        ("augmenting_norm.weight", d_anchor, False), ("augmenting_norm.bias", d_anchor, False),
        ("query_norm.weight", d_anchor, False), ("query_norm.bias", d_anchor, False),
        ("q_proj.weight", d_anchor * d_anchor, True), ("k_proj.weight", d_anchor * d_anchor, True),
        ("v_proj.weight", d_anchor * d_anchor, True), ("o_proj.weight", d_anchor * d_anchor, True),
    ]


def block_parameter_count(d_augmenting: int, d_anchor: int) -> int:
    """Trainable parameters of one block: D_A*D_B + 4*D_B^2 + 5*D_B."""
    return sum(n for _, n, _ in block_tensors(d_augmenting, d_anchor))


def block_matmul_parameter_count(d_augmenting: int, d_anchor: int) -> int:
    """The block's matmul weights (what costs FLOPs): D_A*D_B + 4*D_B^2."""
    return sum(n for _, n, matmul in block_tensors(d_augmenting, d_anchor) if matmul)


def composition_parameter_count(d_anchor: int, augmenting: Iterable[tuple[int, Sequence]]) -> int:
    """Trainable parameters of a composition: one block per layer pair. `augmenting` gives each augmenting
    model's (width, layer pairs)."""
    return sum(len(pairs) * block_parameter_count(d_augmenting, d_anchor) for d_augmenting, pairs in augmenting)


# The label of a position without loss (torch's cross-entropy ignore_index): training rows are built with it
# by the data package, which never imports torch.
IGNORE = -100

# Logits per chunk of lm_loss.head_loss: 16 MiB in fp32, so the loss's peak stays small whatever the vocabulary
# (benchmarks/README.md has the timing that chose it). Torch-free, so the activation-memory model and the loss
# share one number.
LOSS_CHUNK_LOGITS = 1 << 22
