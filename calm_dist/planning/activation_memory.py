"""Activation memory of a composed training step: the peak bytes one micro-batch holds on one rank.

Pure Python, like `calm_dist.planning.costs` (whose model specs and layer-pair rules it uses): `calm-dist plan` runs
without importing torch. docs/plan.md section 4 has the derivation; tests/unit/test_costs.py checks the bytes the
forward keeps against what autograd really keeps, and the peak against the live tensor bytes of real steps.

The peak is not the sum of everything a step ever allocates: what the forward keeps for backward stays alive until
its backward, while each phase's own tensors (one block's forward temporaries, the loss's chunks of logits, the
re-materialised block and the gradients in flight in the backward) come and go. So the model adds to the kept
bytes what each moment holds besides, and takes the largest moment:

    forward, the top block    everything kept below it + one block's forward temporaries
    forward, the final norm   everything kept + the norm's forward temporaries + the embedding output
    forward, the loss         everything kept + the loss's own tensors
    backward, the final norm  everything kept + the norm's backward temporaries
    backward, the top block   everything kept below it + its re-materialised tensors (checkpointing) + the
                              gradients in flight in its MLP backward

The top anchor block is the one that matters: the kept bytes grow through the forward and shrink through the
backward, so its forward and its backward (the first of the blocks') see the most. Each moment's tensors are
Llama's (HF's decoder layer, SDPA, RMSNorm, a gated MLP), measured op by op; GPT-2's and GPT-NeoX's blocks and
grouped-query attention (k and v at the KV heads when HF does not repeat them) differ by a few percent.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from calm_dist.model.shapes import LOSS_CHUNK_LOGITS
from calm_dist.planning.costs import ModelSpec, dtype_bytes, model_spec, normalize_layer_pairs

FP32 = 4


def _norm_saved_bytes(spec: ModelSpec, b: int) -> int:
    # HF's RMSNorm upcasts to fp32 and keeps that copy for backward; nn.LayerNorm keeps its input.
    return FP32 * spec.hidden_size if spec.norm == "rms" else b * spec.hidden_size


def _norm_keeps_its_input(spec: ModelSpec, b: int) -> bool:
    # the fp32 "copy" of an fp32 tensor is the tensor itself (.to() returns it)
    return spec.norm == "layer" or b == FP32


def _mlp_saved_elems(spec: ModelSpec) -> int:
    if spec.gated_mlp:
        return 3 * spec.intermediate_size        # act(gate) input, act output, up
    # composite tanh GELU (gpt2's gelu_new) keeps several intermediate-sized tensors; native GELU only its input
    return (4 if spec.hidden_act in ("gelu_new", "gelu_fast") else 1) * spec.intermediate_size


def _zero3_keeps_inputs(spec: ModelSpec, zero3_linear: bool) -> bool:
    # GPT-2's Conv1D calls addmm, not F.linear: ZeRO-3's replacement never sees it
    return zero3_linear and spec.model_type != "gpt2"


def _zero3_linear_inputs_elems(spec: ModelSpec) -> int:
    """What ZeRO-3's Linear keeps besides (see `activation_memory`): the two normed hidden states and the MLP's
    down-projection input; the output projection's input is the attention output, kept already."""
    return 2 * spec.hidden_size + spec.intermediate_size


def layer_activation_bytes_per_token(spec: Any, dtype: Any = "bf16", zero3_linear: bool = False) -> int:
    """Bytes one frozen decoder block keeps for backward per token (input gradients only: a frozen Linear
    keeps nothing of its input, unless ZeRO-3 replaced it, `zero3_linear`), assuming fused SDPA / flash
    attention (no seq x seq matrix kept): 2 norms + q, k, v, attention output (full head count: HF repeats KV
    heads when a mask is given) + MLP."""
    spec = model_spec(spec)
    b = dtype_bytes(dtype)
    kept = 2 * _norm_saved_bytes(spec, b) + 4 * spec.d_attn * b + _mlp_saved_elems(spec) * b
    return kept + (_zero3_linear_inputs_elems(spec) * b if _zero3_keeps_inputs(spec, zero3_linear) else 0)


def _mlp_forward_peak_elems(spec: ModelSpec) -> int:
    """Intermediate-sized tensors alive at once in an MLP's forward when nothing is kept: gated, act(gate), up
    and their product (the gate is freed by then); otherwise the up-projection, what the activation keeps
    besides, and its output."""
    if spec.gated_mlp:
        return 3 * spec.intermediate_size
    return _mlp_saved_elems(spec) + spec.intermediate_size


def _mlp_backward_elems(spec: ModelSpec) -> int:
    """Intermediate-sized gradients alive at once in an MLP's backward: the down-projection's input gradient
    and, gated, the product's two input gradients (non-gated: the activation's input gradient)."""
    return (3 if spec.gated_mlp else 2) * spec.intermediate_size


def _norm_forward_bytes(spec: ModelSpec, b: int) -> int:
    """What a norm holds in its forward besides what it keeps: its input when it keeps a copy instead (the
    caller's), HF RMSNorm's fp32 normalised states and their cast back, and its output."""
    own_input = 0 if _norm_keeps_its_input(spec, b) else b * spec.hidden_size
    if spec.norm == "rms":
        return own_input + (FP32 + (b if b < FP32 else 0) + b) * spec.hidden_size
    return own_input + b * spec.hidden_size


def _norm_backward_bytes(spec: ModelSpec, b: int) -> int:
    """An RMSNorm's backward runs as autograd's pieces (mul, mean, pow), five fp32 hidden-sized gradients at
    once; nn.LayerNorm's is one kernel: its output and the incoming gradient."""
    return 5 * FP32 * spec.hidden_size if spec.norm == "rms" else 2 * b * spec.hidden_size


def loss_logits_bytes(tokens: int, vocab_size: int, dtype: Any = "bf16") -> int:
    """The peak bytes of lm_loss.head_loss's chunks of logits: one chunk in fp32 (the softmax taken in place)
    with, in a 16-bit dtype, the model-dtype copy the matmul reads or writes; and when there are more rows than
    one chunk, the previous chunk's fp32 logits still referenced while the next one is computed."""
    b = dtype_bytes(dtype)
    cast = b if b < FP32 else 0
    rows_per_chunk = max(1, LOSS_CHUNK_LOGITS // vocab_size)
    first = min(tokens, rows_per_chunk) * vocab_size
    second = min(max(tokens - rows_per_chunk, 0), rows_per_chunk) * vocab_size
    return max(first * (FP32 + cast), FP32 * first + second * (FP32 + cast))


@dataclass(frozen=True)
class ActivationMemory:
    """Activation bytes of one micro-batch on one rank (see `activation_memory`). The first four are kept from
    the forward to the backward (`saved`); the next four are what one moment holds besides; `total` is the
    largest moment, the peak."""

    anchor_saved: float       # anchor blocks kept for backward (all above j0, or only their inputs when checkpointing)
    blocks_saved: float       # composition blocks kept for backward
    aug_states: float         # augmenting states of the composed layers (cached or recomputed), kept all step
    final_norm: float         # the anchor's final norm's input, kept for its backward
    loss: float               # lm_loss.head_loss: the hidden states, their selected rows, the gradient it keeps, logits
    transient: float          # the top anchor block's forward temporaries (what it does not keep)
    recompute_working: float  # checkpointing: the top anchor block re-materialised for its backward
    backward_working: float   # gradients in flight at the top anchor block's MLP backward
    forward_peak: float       # the larger forward moment: the loss, or the top anchor block
    backward_peak: float      # the larger backward moment: the final norm, or the top anchor block

    @property
    def saved(self) -> float:
        """What the forward keeps for backward (its end, before the loss)."""
        return self.anchor_saved + self.blocks_saved + self.aug_states + self.final_norm

    @property
    def total(self) -> float:
        """The step's peak: forward and backward never hold their working sets at once."""
        return max(self.forward_peak, self.backward_peak)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["saved"] = self.saved
        d["total"] = self.total
        return d


def activation_memory(anchor: Any, augmenting: Any, layer_pairs: Any = None, *, tokens: int, dtype: Any = "bf16",
                      activation_checkpointing: bool = False, every: int = 4,
                      augmenting_per_token: float = 1.0, zero3_linear: bool = False) -> ActivationMemory:
    """Activation memory of one micro-batch (`tokens` = micro_batch * seq_len) on one rank, in bytes.

    Only anchor blocks above the first composed layer j0 keep activations (nothing below requires grad);
    the augmenting models run under no_grad and only the states of the composed layers stay alive.
    Without checkpointing: (L-1-j0) blocks * `layer_activation_bytes_per_token` + per pair ~8*D_B*bytes.
    With checkpointing (the blocks above j0 each checkpointed, composition hooks outside it): the inputs of
    blocks j0+1..L-1 (D_B*bytes each) + the composition blocks' own; the top block is re-materialised in the
    backward. Rotary models keep the position embeddings (cos, sin) once for all blocks.
    `augmenting_per_token`: augmenting tokens per anchor token (costs.augmenting_tokens_per_token; 1 with one
    tokenizer): their states, and the blocks' tensors of the augmenting side (proj and LN out, k, v), scale by it.
    `zero3_linear`: DeepSpeed's ZeRO-3 (zero.Init, under which the trainer loads the models) replaces F.linear by
    an autograd Function that keeps every Linear's input, frozen ones too (zero_optimization.memory_efficient_linear,
    on by default): each block keeps its two normed hidden states and its MLP's down-projection input besides.
    Estimates for planning, not exact allocator peaks (fragmentation, kernels' workspaces and NCCL buffers are
    not here)."""
    anchor, groups = normalize_layer_pairs(anchor, augmenting, layer_pairs, every)
    b = dtype_bytes(dtype)
    D, L = anchor.hidden_size, anchor.num_layers
    j0 = min(bb for _, pairs in groups for _, bb in pairs)
    above = L - 1 - j0
    per_layer = layer_activation_bytes_per_token(anchor, dtype, zero3_linear)
    r = augmenting_per_token
    # anchor side: query in, LN_q out, q, attention out; augmenting side (r per anchor token): proj out, LN out, k, v
    anchor_side, aug_side = 4 * D * b, 4 * r * D * b
    n_pairs = sum(len(p) for _, p in groups)
    # the pairs on the top block: their anchor side is not made yet in its forward and freed before its backward
    # (the hook runs after the block); their k and v are then freed too, but their gradients wait for the
    # augmenting side's backward, which runs last: the augmenting side's bytes stay
    n_top = sum(1 for _, p in groups for _, bb in p if bb == L - 1)
    aug_states = r * sum(len({a for a, _ in p}) * s.hidden_size * b for s, p in groups)
    # the rotary position embeddings (cos, sin): held by the decoder all its forward, and kept for backward by
    # the blocks above j0 (the same two tensors for all: their checkpoints' arguments, or their q and k rotations)
    rotary_fwd = 0 if anchor.learned_positions or anchor.model_type == "gpt2" else 2 * anchor.head_dim * b
    rotary = rotary_fwd if above else 0
    if activation_checkpointing:
        anchor_saved = above * D * b + rotary
        # the block's kept tensors, re-made; the first norm's fp32 input is the block's own when it keeps that
        recompute = per_layer - (D * b if _norm_keeps_its_input(anchor, b) else 0) if above else 0
    else:
        anchor_saved = above * per_layer + rotary
        recompute = 0
    # the top block's forward, at its MLP: the decoder holds the embedding output all its forward and the block's
    # input (kept already by a checkpoint, or by a norm that keeps its input itself), the block its residual
    # (h_mid) and the MLP's input. A block that keeps nothing (checkpointed, or at or below j0) peaks with the
    # MLP's working set; one that keeps its tensors at the down-projection, with what it does not keep: the MLP's
    # input, the down-projection's input (both kept under ZeRO-3) and its output
    input_kept = above and (activation_checkpointing or _norm_keeps_its_input(anchor, b))
    transient = (2 - input_kept) * D * b + (0 if above else rotary_fwd)
    if activation_checkpointing or not above:
        transient += (_mlp_forward_peak_elems(anchor) + 2 * D) * b
    elif _zero3_keeps_inputs(anchor, zero3_linear):
        transient += D * b
    else:
        transient += (anchor.intermediate_size + 2 * D) * b
    # the incoming gradient + the MLP's; under ZeRO-3 the down-projection's backward has freed the input it kept
    backward = (D + _mlp_backward_elems(anchor)) * b
    if _zero3_keeps_inputs(anchor, zero3_linear):
        backward -= anchor.intermediate_size * b
    final_norm = _norm_saved_bytes(anchor, b)
    # lm_loss.head_loss never holds B x T x V: the final hidden states (the caller's), the labelled rows it selects,
    # the gradient it keeps for backward (D_B * bytes each) + the rows' targets (8), and its chunks of logits
    loss = (3 * D * b + 8) * tokens + loss_logits_bytes(tokens, anchor.vocab_size, dtype)
    saved = (anchor_saved + n_pairs * (anchor_side + aug_side) + aug_states + final_norm) * tokens
    below_top = saved - (final_norm + n_top * anchor_side) * tokens
    # the final norm runs inside the decoder's forward: the embedding output is still held
    forward_peak = max(saved + loss, below_top + transient * tokens,
                       saved + (_norm_forward_bytes(anchor, b) + D * b) * tokens)
    backward_peak = max(saved + _norm_backward_bytes(anchor, b) * tokens,
                        below_top + (recompute + backward) * tokens if above else 0)
    return ActivationMemory(anchor_saved=anchor_saved * tokens,
                            blocks_saved=n_pairs * (anchor_side + aug_side) * tokens,
                            aug_states=aug_states * tokens, final_norm=final_norm * tokens, loss=loss,
                            transient=transient * tokens, recompute_working=recompute * tokens,
                            backward_working=backward * tokens, forward_peak=forward_peak,
                            backward_peak=backward_peak)
