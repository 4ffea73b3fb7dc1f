"""Activation memory of a composed training step: the bytes one micro-batch keeps for backward on one rank.

Pure Python, like `calm_dist.planning.costs` (whose model specs and layer-pair rules it uses): `calm-dist plan` runs
without importing torch. docs/plan.md section 4 has the derivation and the check against the bytes autograd
really keeps (tests/unit/test_costs.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from calm_dist.model.shapes import LOSS_CHUNK_LOGITS
from calm_dist.planning.costs import ModelSpec, dtype_bytes, model_spec, normalize_layer_pairs



def _norm_saved_bytes(spec: ModelSpec, b: int) -> int:
    # HF's RMSNorm upcasts to fp32 and keeps that copy for backward; nn.LayerNorm keeps its input.
    return 4 * spec.hidden_size if spec.norm == "rms" else b * spec.hidden_size


def _mlp_saved_elems(spec: ModelSpec) -> int:
    if spec.gated_mlp:
        return 3 * spec.intermediate_size        # act(gate) input, act output, up
    # composite tanh GELU (gpt2's gelu_new) keeps several intermediate-sized tensors; native GELU only its input
    return (4 if spec.hidden_act in ("gelu_new", "gelu_fast") else 1) * spec.intermediate_size


def layer_activation_bytes_per_token(spec: Any, dtype: Any = "bf16") -> int:
    """Bytes one frozen decoder block keeps for backward per token (input gradients only: a frozen Linear
    keeps nothing of its input), assuming fused SDPA / flash attention (no seq x seq matrix kept):
    2 norms + q, k, v, attention output (full head count: HF repeats KV heads when a mask is given) + MLP."""
    spec = model_spec(spec)
    b = dtype_bytes(dtype)
    return 2 * _norm_saved_bytes(spec, b) + 4 * spec.d_attn * b + _mlp_saved_elems(spec) * b


@dataclass(frozen=True)
class ActivationMemory:
    """Activation bytes of one micro-batch on one rank (see `activation_memory`)."""

    anchor_saved: float       # anchor blocks kept for backward (all above j0, or only their inputs when checkpointing)
    blocks_saved: float       # composition blocks kept for backward
    recompute_working: float  # checkpointing: one anchor block re-materialised during the backward
    loss: float               # lm_loss.head_loss: the hidden-state gradient it keeps + one chunk of logits
    aug_states: float         # augmenting states of the composed layers (cached or recomputed), kept all step
    transient: float          # one block's forward temporaries

    @property
    def total(self) -> float:
        return (self.anchor_saved + self.blocks_saved + self.recompute_working + self.loss + self.aug_states
                + self.transient)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        return d


def activation_memory(anchor: Any, augmenting: Any, layer_pairs: Any = None, *, tokens: int, dtype: Any = "bf16",
                      activation_checkpointing: bool = False, every: int = 4,
                      augmenting_per_token: float = 1.0) -> ActivationMemory:
    """Activation memory of one micro-batch (`tokens` = micro_batch * seq_len) on one rank, in bytes.

    Only anchor blocks above the first composed layer j0 keep activations (nothing below requires grad);
    the augmenting models run under no_grad and only the states of the composed layers stay alive.
    Without checkpointing: (L-1-j0) blocks * `layer_activation_bytes_per_token` + per pair ~8*D_B*bytes.
    With checkpointing (HF layer checkpointing, composition hooks outside it): the inputs of blocks
    j0+1..L-1 (D_B*bytes each) + one block re-materialised in the backward; the composition blocks keep theirs.
    `augmenting_per_token`: augmenting tokens per anchor token (costs.augmenting_tokens_per_token; 1 with one
    tokenizer): their states, and the blocks' tensors of the augmenting side (proj and LN out, k, v), scale by it.
    Estimates for planning, not exact allocator peaks (fragmentation and NCCL buffers are not here)."""
    anchor, groups = normalize_layer_pairs(anchor, augmenting, layer_pairs, every)
    b = dtype_bytes(dtype)
    L = anchor.num_layers
    j0 = min(bb for _, pairs in groups for _, bb in pairs)
    per_layer = layer_activation_bytes_per_token(anchor, dtype)
    r = augmenting_per_token
    # anchor side: query in, LN_q out, q, attention out; augmenting side (r per anchor token): proj out, LN out, k, v
    per_pair = (4 + 4 * r) * anchor.hidden_size * b
    n_pairs = sum(len(p) for _, p in groups)
    aug_states = r * sum(len({a for a, _ in p}) * s.hidden_size * b for s, p in groups)
    # lm_loss.head_loss never holds B x T x V: per labelled token the hidden row it selects and the gradient it
    # keeps for backward (D_B * bytes each) + its row index (8), and once one chunk of logits (model dtype, fp32,
    # the softmax cast back; in fp32 the casts are no-ops and the softmax is computed in place: one copy)
    chunk_bytes = 2 * b + 4 if b < 4 else 4
    loss = (2 * anchor.hidden_size * b + 8) * tokens + min(tokens * anchor.vocab_size, LOSS_CHUNK_LOGITS) * chunk_bytes
    blocks_saved = n_pairs * per_pair
    if activation_checkpointing:
        anchor_saved = (L - 1 - j0) * anchor.hidden_size * b
        working = per_layer
    else:
        anchor_saved = (L - 1 - j0) * per_layer
        working = 0
    return ActivationMemory(anchor_saved=anchor_saved * tokens, blocks_saved=blocks_saved * tokens,
                            recompute_working=working * tokens, loss=loss,
                            aug_states=aug_states * tokens, transient=per_layer * tokens)
