"""The step time of a composed training step on a CPU rank (one thread), from measured rates: what
`calm-dist plan --hardware cpu` predicts, and what benchmarks/plan_bench.py compares with measured steps (P9p).

On a GPU the planner times a step at an assumed MFU. A CPU rank running the small benchmark models is far from
matmul-bound: HF's elementwise work (RMSNorm in fp32, RoPE, SwiGLU, the loss's softmax) streams through memory,
and every block call pays Python and autograd costs, plus ZeRO-3's hooks under stage 3. So a micro-step here is

    matmul FLOPs / the measured rate at the matmul's width and token count
  + attention FLOPs / the measured causal-SDPA rate at the sequence length
  + elementwise bytes / the measured streaming bandwidth at the tensors' size
  + the bytes ZeRO-3 gathers whole (allocated and filled; none in a group of one rank, where DeepSpeed points
    each parameter at its partition) / the same bandwidth
  + block calls x block_call_s + micro_step_s   (each fitted twice: on ZeRO-3 steps, whose blocks are hooked
                                                  leaves, and on ZeRO-2 steps, whose frozen blocks have no hook)

where each rate is the kernel's measured alone (a table by shape), times what a real step's kernels reach of
it (`*_efficiency`: one composed ZeRO-3 step of a calibration composition, profiled: its matmul, attention and
elementwise ops' own time against these formulas; other jobs' caches and the allocator take their share there),

and an optimizer step is `accum` micro-steps + AdamW's bytes / bandwidth + optimizer_step_s; communication
(`plan`'s all-gather and reduce-scatter bytes at the measured loopback rate) comes on top, in series.
The FLOPs are `costs.step_cost`'s, split into attention and matmul; the rates and fixed costs come from
benchmarks/cpu_profile.py (`Hardware` of kind "cpu"). Pure Python.

Elementwise traffic per token of one HF decoder block's forward, in elements read + written (fp32 on the CPU):
RMSNorm 7·D each (pow, mean, scale, weight), two of them; RoPE 10 per query and key element (two products, the
rotated half's negation and concatenation, the sum); the attention output's transpose copy 2·D; two residual
adds 3·D each; the gated MLP's activation and product 5·I. A LayerNorm is one fused pass (2·D); a GELU MLP's
composite tanh GELU ~10·I. A backward through the same ops moves about twice the forward's bytes. The loss
(`lm_loss.head_loss`) moves ~6·V per labelled token (logsumexp, the gather, the in-place softmax and the
one-hot subtraction over each chunk of logits); a composition block ~10·D_B forward.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass

from calm_dist.model.shapes import LOSS_CHUNK_LOGITS
from calm_dist.planning import costs
from calm_dist.planning.hardware import Hardware

ADAMW_ELEMENTS_PER_PARAM = 16   # read p, g, m, v and write p, m, v, plus the foreach temporaries of torch's AdamW


def block_elementwise_elems(spec: costs.ModelSpec) -> float:
    """Elements one decoder block's forward reads and writes per token outside its matmuls (docstring above)."""
    d, i = spec.hidden_size, spec.intermediate_size
    norms = 2 * (7 * d if spec.norm == "rms" else 2 * d)
    rope = 10 * (spec.d_attn + spec.d_kv) if spec.model_type != "gpt2" else 0
    mlp = 5 * i if spec.gated_mlp else (10 * i if spec.hidden_act in ("gelu_new", "gelu_fast") else 2 * i)
    return norms + rope + 2 * spec.d_attn + 2 * 3 * d + mlp


@dataclass(frozen=True)
class MicroStepWork:
    """What one micro-step of one rank computes, in the units the CPU rates are measured in."""

    tokens: int                   # micro_batch x seq_len
    seq_len: int
    matmul_flops: tuple           # ((FLOPs, width), ...): widths select the measured rate
    attention_flops: float        # causal self- and cross-attention, forward + backward + recompute
    elementwise_bytes: float      # streamed through memory outside matmuls
    loss_bytes: float             # of which the loss's chunks of logits
    block_calls: int              # decoder and composition block calls, forward and backward
    vocab_size: int = 0           # the anchor's (the loss's chunks of logits)

    def as_dict(self) -> dict:
        return asdict(self)


def micro_step_work(anchor: costs.ModelSpec, groups: list, *, seq_len: int, micro_batch: int, states: str,
                    activation_checkpointing: bool, elem_bytes: int, causal: bool = True) -> MicroStepWork:
    """The work of one micro-step: `groups` is [(augmenting spec, pairs), ...] as `costs.normalize_layer_pairs`
    returns them; FLOPs are `costs.step_cost`'s (hardware FLOPs: recomputation included)."""
    tokens = micro_batch * seq_len
    sc = costs.step_cost(anchor, [s for s, _ in groups], [p for _, p in groups], seq_len=seq_len, states=states,
                         activation_checkpointing=activation_checkpointing, causal=causal)
    L, j0 = anchor.num_layers, sc.first_composed_layer
    above = L - 1 - j0
    attn = lambda spec_or_width: costs.attention_flops_per_token(seq_len, spec_or_width, causal)  # noqa: E731
    aug_blocks = [(s, max(a for a, _ in p) + 1) for s, p in groups] if states == "recompute" else []
    aug_attn = sum(n * attn(s.d_attn) for s, n in aug_blocks)
    n_pairs = sum(len(p) for _, p in groups)
    # self-attention: forward of every anchor block, backward (2x) of those above j0, once more when recomputed;
    # cross-attention: forward and backward (2x) of every composition block
    anchor_attn = (L + 2 * above + (above if activation_checkpointing else 0)) * attn(anchor.d_attn)
    cross_attn = 3 * n_pairs * attn(anchor.hidden_size)
    attention = aug_attn + anchor_attn + cross_attn
    matmul = [(tokens * (sc.aug_forward - aug_attn), min(s.hidden_size for s, _ in aug_blocks))] if aug_blocks else []
    matmul.append((tokens * (sc.total_hardware - sc.aug_forward - anchor_attn - cross_attn), anchor.hidden_size))

    e_anchor = block_elementwise_elems(anchor)
    elems = (L + 2 * above + (above if activation_checkpointing else 0)) * e_anchor
    elems += sum(n * block_elementwise_elems(s) for s, n in aug_blocks)
    elems += 3 * n_pairs * 10 * anchor.hidden_size            # composition blocks: forward + backward (2x)
    loss = 6 * anchor.vocab_size * elem_bytes * tokens
    calls = (L + above + (above if activation_checkpointing else 0) + sum(n for _, n in aug_blocks)
             + 2 * n_pairs)
    return MicroStepWork(tokens=tokens, seq_len=seq_len, matmul_flops=tuple(matmul), attention_flops=tokens * attention,
                         elementwise_bytes=elems * elem_bytes * tokens + loss, loss_bytes=loss, block_calls=calls,
                         vocab_size=anchor.vocab_size)


def _interp(x: float, xs: list, ys: list) -> float:
    """Linear in log(x) between the measured points; the end values beyond them."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    k = bisect.bisect_right(xs, x)
    f = (math.log(x) - math.log(xs[k - 1])) / (math.log(xs[k]) - math.log(xs[k - 1]))
    return ys[k - 1] + f * (ys[k] - ys[k - 1])


def matmul_rate(hw: Hardware, tokens: int, width: int) -> float:
    """FLOP/s of a projection of `tokens` rows at `width`: the measured table, interpolated in both."""
    by_tokens: dict[int, list] = {}
    for t, w, g in hw.matmul_gflops:
        by_tokens.setdefault(int(t), []).append((w, g))
    ts = sorted(by_tokens)
    rates = [_interp(width, [w for w, _ in sorted(by_tokens[t])], [g for _, g in sorted(by_tokens[t])]) for t in ts]
    return _interp(tokens, ts, rates) * 1e9


def attention_rate(hw: Hardware, seq_len: int) -> float:
    rows = sorted(hw.attention_gflops)
    return _interp(seq_len, [s for s, _ in rows], [g for _, g in rows]) * 1e9


def bandwidth(hw: Hardware, tensor_bytes: float) -> float:
    rows = sorted(hw.elementwise_GBps)
    return _interp(max(1.0, tensor_bytes), [b for b, _ in rows], [g for _, g in rows]) * 1e9


def kernel_seconds(work: MicroStepWork, hw: Hardware, width: int | None = None) -> dict:
    """Seconds of one micro-step's kernels, by kind (no fixed costs). `width` sizes the elementwise tensors
    (tokens x width elements; default: the widest matmul width)."""
    width = width or max(w for _, w in work.matmul_flops)
    mm = sum(f / matmul_rate(hw, work.tokens, w) for f, w in work.matmul_flops) / hw.matmul_efficiency
    at = work.attention_flops / attention_rate(hw, work.seq_len) / hw.attention_efficiency
    el = (work.elementwise_bytes - work.loss_bytes) / bandwidth(hw, work.tokens * width * 4) / hw.elementwise_efficiency
    chunk = min(work.tokens * work.vocab_size, LOSS_CHUNK_LOGITS) * 4  # one chunk of fp32 logits
    loss = work.loss_bytes / bandwidth(hw, chunk) / hw.elementwise_efficiency
    return {"matmul": mm, "attention": at, "elementwise": el, "loss": loss, "total": mm + at + el + loss}


def step_seconds(work: MicroStepWork, hw: Hardware, *, grad_accum: int, trainable_per_rank: float,
                 comm_s: float, gathered_bytes: float = 0.0, width: int | None = None, zero_stage: int = 3) -> dict:
    """One optimizer step of one rank: `grad_accum` micro-steps, AdamW over its partition of the trainable
    parameters, the fixed costs, and the communication in series (a one-thread CPU rank does not overlap it).
    `gathered_bytes`: what ZeRO-3 materialises whole per micro-step (allocated and written, read by the kernels;
    nothing in a world of one), streamed at the elementwise rate. `zero_stage` selects the fixed costs (ZeRO-3's
    hooks on every block, or none of them)."""
    k = kernel_seconds(work, hw, width)
    k["gather"] = 2 * gathered_bytes / bandwidth(hw, gathered_bytes / max(1, work.block_calls)) \
        / hw.elementwise_efficiency
    k["total"] += k["gather"]
    block_call_s, micro_step_s, optimizer_step_s = hw.fixed_costs(zero_stage)
    fixed_micro = work.block_calls * block_call_s + micro_step_s
    opt_bytes = trainable_per_rank * ADAMW_ELEMENTS_PER_PARAM * 4
    optimizer = opt_bytes / bandwidth(hw, trainable_per_rank * 4) + optimizer_step_s
    compute = grad_accum * (k["total"] + fixed_micro) + optimizer
    return {**{f"{key}_s": grad_accum * v for key, v in k.items() if key != "total"},
            "fixed_s": grad_accum * fixed_micro, "optimizer_s": optimizer, "compute_s": compute, "comm_s": comm_s,
            "step_s": compute + comm_s}
