"""The FLOP / byte model of CALM training: parameter counts, FLOPs per token, step cost, cache economics.
(What a step keeps in memory for backward is `calm_dist.planning.activation_memory`.)

Pure Python (no torch import). Everything is derived from a light description of each model, `ModelSpec`,
built by `model_spec(...)` from a `transformers.PretrainedConfig`, a dict of config.json fields, or a named size
from `calm_dist.planning.model_sizes`. Supported families: llama, mistral, qwen2, qwen3 (GQA, gated SwiGLU MLP
with three matrices, RMSNorm), gpt2 (n_embd/n_layer/n_head, 4x GELU MLP, learned positions, tied embeddings, biases) and
gpt_neox (two-matrix GELU MLP, LayerNorm, biases).

Conventions (docs/plan.md has the derivations):

* A matmul of an [m, k] by a [k, n] matrix costs 2*m*k*n FLOPs. Only matmuls and attention are counted, as
  `torch.utils.flop_counter.FlopCounterMode` does: norms, activations, RoPE, softmax and the loss are free.
* Attention (QK^T and PV) costs 4 * seq * d_attn FLOPs per token and layer when every query reads every key
  (`causal=False`, what FlopCounterMode and most MFU papers count). With `causal=True` (the default here) a
  token reads on average (seq + 1) / 2 keys: 2 * (seq + 1) * d_attn.
* Layer indices are 0-based decoder-block indices; "the output of anchor block j" is where the composition
  output is added (the input of block j + 1). A layer pair is (augmenting_layer, anchor_layer).
* Composition block per pair: f_proj Linear(D_A -> D_B, bias), LayerNorm(D_B) on the projected augmenting
  states, LayerNorm(D_B) on the anchor query, Q/K/V/O Linear(D_B -> D_B, no bias), W^O zero-initialised,
  causal multi-head cross-attention with the anchor's head count (its tensors: `calm_dist.model.shapes`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from calm_dist.model.layer_pairs import default_layer_pairs, validate_layer_pairs
from calm_dist.model import shapes
from calm_dist.model.shapes import block_parameter_count as composition_block_params

__all__ = [
    "DTYPE_BYTES", "dtype_bytes", "ModelSpec", "model_spec", "ParamCounts", "param_counts", "param_tensors",
    "default_layer_pairs", "normalize_layer_pairs", "composition_block_params", "composition_params",
    "attention_flops_per_token", "block_forward_flops", "forward_flops", "anchor_forward_flops",
    "augmenting_forward_flops", "composition_forward_flops", "StepCost", "step_cost",
    "cache_bytes_per_token", "cache_disk_bytes", "CacheEconomics", "cache_economics",
]

DTYPE_BYTES = {
    "fp32": 4, "float32": 4, "float": 4,
    "bf16": 2, "bfloat16": 2,
    "fp16": 2, "float16": 2, "half": 2,
    "fp8": 1, "float8": 1, "int8": 1,
}


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of a dtype given as a name ('bf16', 'float32', ...) or a torch.dtype."""
    if isinstance(dtype, int):
        return dtype
    name = str(dtype).lower().replace("torch.", "")
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(sorted(DTYPE_BYTES))}")
    return DTYPE_BYTES[name]


# --------------------------------------------------------------------------------------------- model specs

@dataclass(frozen=True)
class ModelSpec:
    """What the cost model needs to know about one decoder-only transformer."""

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    gated_mlp: bool = True          # SwiGLU-style: gate, up, down (3 matrices); else up, down (2 matrices)
    norm: str = "rms"               # "rms" (weight only) or "layer" (weight + bias)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False           # qwen3: RMSNorm(head_dim) on q and k
    learned_positions: int = 0      # gpt2: n_positions rows of learned position embeddings
    hidden_act: str = "silu"

    @property
    def d_attn(self) -> int:
        """Width of the query / attention output (num_heads * head_dim)."""
        return self.num_heads * self.head_dim

    @property
    def d_kv(self) -> int:
        """Width of the key and of the value projection (num_kv_heads * head_dim)."""
        return self.num_kv_heads * self.head_dim

    @property
    def mlp_matrices(self) -> int:
        return 3 if self.gated_mlp else 2


_LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3"}
_SUPPORTED = sorted(_LLAMA_LIKE | {"gpt2", "gpt_neox"})


def _config_dict(config: Any) -> dict:
    if isinstance(config, Mapping):
        d = dict(config)
    elif hasattr(config, "to_dict"):
        d = config.to_dict()
        # attribute_map aliases and derived attributes (head_dim, ...) live on the object
        for key in ("head_dim", "num_key_value_heads", "tie_word_embeddings"):
            if key not in d or d[key] is None:
                value = getattr(config, key, None)
                if value is not None:
                    d[key] = value
    else:
        raise TypeError(f"expected a PretrainedConfig, a dict of config.json fields, a ModelSpec or a size name, "
                        f"got {type(config).__name__}")
    if "text_config" in d and "hidden_size" not in d and "n_embd" not in d:
        d = dict(d["text_config"]) if isinstance(d["text_config"], Mapping) else _config_dict(d["text_config"])
    return d


def model_spec(config: Any, name: str | None = None) -> ModelSpec:
    """A `ModelSpec` from a PretrainedConfig, a dict of config.json fields, a ModelSpec or a named size."""
    if isinstance(config, ModelSpec):
        return config
    if isinstance(config, str):
        from calm_dist.planning import model_sizes
        return model_spec(model_sizes.get(config), name=name or config)
    d = _config_dict(config)
    mt = d.get("model_type")
    if mt is None:
        raise ValueError("config has no model_type")
    label = name or d.get("_name_or_path") or d.get("name_or_path") or mt
    if mt in _LLAMA_LIKE:
        hidden = int(d["hidden_size"])
        heads = int(d["num_attention_heads"])
        kv = d.get("num_key_value_heads") or heads
        head_dim = d.get("head_dim") or hidden // heads
        attn_bias = bool(d.get("attention_bias", False))
        return ModelSpec(
            name=label, model_type=mt, hidden_size=hidden, num_layers=int(d["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(kv), head_dim=int(head_dim),
            intermediate_size=int(d["intermediate_size"]), vocab_size=int(d["vocab_size"]),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), gated_mlp=True, norm="rms",
            qkv_bias=True if mt == "qwen2" else attn_bias,
            o_bias=False if mt == "qwen2" else attn_bias,
            mlp_bias=bool(d.get("mlp_bias", False)) if mt == "llama" else False,
            qk_norm=(mt == "qwen3"), hidden_act=str(d.get("hidden_act", "silu")),
        )
    if mt == "gpt2":
        hidden = int(d.get("n_embd", d.get("hidden_size")))
        heads = int(d.get("n_head", d.get("num_attention_heads")))
        inner = d.get("n_inner") or 4 * hidden
        return ModelSpec(
            name=label, model_type=mt, hidden_size=hidden, num_layers=int(d.get("n_layer", d.get("num_hidden_layers"))),
            num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads, intermediate_size=int(inner),
            vocab_size=int(d["vocab_size"]), tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            gated_mlp=False, norm="layer", qkv_bias=True, o_bias=True, mlp_bias=True,
            learned_positions=int(d.get("n_positions", d.get("max_position_embeddings", 1024))),
            hidden_act=str(d.get("activation_function", "gelu_new")),
        )
    if mt == "gpt_neox":
        hidden = int(d["hidden_size"])
        heads = int(d["num_attention_heads"])
        attn_bias = bool(d.get("attention_bias", True))
        return ModelSpec(
            name=label, model_type=mt, hidden_size=hidden, num_layers=int(d["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
            intermediate_size=int(d["intermediate_size"]), vocab_size=int(d["vocab_size"]),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), gated_mlp=False, norm="layer",
            qkv_bias=attn_bias, o_bias=attn_bias, mlp_bias=True, hidden_act=str(d.get("hidden_act", "gelu")),
        )
    raise ValueError(f"model_type {mt!r} is not supported by the cost model; supported: {', '.join(_SUPPORTED)}")


# ------------------------------------------------------------------------------------------ parameter counts

def _norm_params(spec: ModelSpec, width: int | None = None) -> int:
    width = spec.hidden_size if width is None else width
    return width if spec.norm == "rms" else 2 * width


def param_tensors(spec: ModelSpec) -> dict[str, list[tuple[str, int, bool]]]:
    """Every parameter tensor as (name, numel, is_matmul_weight), grouped: 'embedding', 'block' (one decoder
    block; all blocks are alike), 'final_norm', 'lm_head' (empty when tied)."""
    d, da, dkv, i = spec.hidden_size, spec.d_attn, spec.d_kv, spec.intermediate_size
    block: list[tuple[str, int, bool]] = [
        ("q.weight", d * da, True), ("k.weight", d * dkv, True), ("v.weight", d * dkv, True),
        ("o.weight", da * d, True),
    ]
    if spec.qkv_bias:
        block += [("q.bias", da, False), ("k.bias", dkv, False), ("v.bias", dkv, False)]
    if spec.o_bias:
        block += [("o.bias", d, False)]
    if spec.qk_norm:
        block += [("q_norm.weight", spec.head_dim, False), ("k_norm.weight", spec.head_dim, False)]
    if spec.gated_mlp:
        block += [("gate.weight", d * i, True), ("up.weight", d * i, True), ("down.weight", i * d, True)]
        if spec.mlp_bias:
            block += [("gate.bias", i, False), ("up.bias", i, False), ("down.bias", d, False)]
    else:
        block += [("up.weight", d * i, True), ("down.weight", i * d, True)]
        if spec.mlp_bias:
            block += [("up.bias", i, False), ("down.bias", d, False)]
    for n in ("norm1", "norm2"):
        block.append((f"{n}.weight", d, False))
        if spec.norm == "layer":
            block.append((f"{n}.bias", d, False))
    embedding = [("embed_tokens.weight", spec.vocab_size * d, False)]
    if spec.learned_positions:
        embedding.append(("embed_positions.weight", spec.learned_positions * d, False))
    final = [("final_norm.weight", d, False)] + ([("final_norm.bias", d, False)] if spec.norm == "layer" else [])
    head = [] if spec.tie_word_embeddings else [("lm_head.weight", spec.vocab_size * d, True)]
    return {"embedding": embedding, "block": block, "final_norm": final, "lm_head": head}


@dataclass(frozen=True)
class ParamCounts:
    embedding: int          # token (+ learned position) embeddings
    per_block: int
    blocks: int             # per_block * num_layers
    final_norm: int
    lm_head: int            # 0 when tied to the token embedding
    matmul_per_block: int   # matmul weights of one block (what costs FLOPs)
    total: int              # what `sum(p.numel() for p in model.parameters())` prints (tied weights once)
    non_embedding: int      # blocks + final norm (no token / position embeddings, no lm_head)


def param_counts(spec: Any) -> ParamCounts:
    spec = model_spec(spec)
    t = param_tensors(spec)
    emb = sum(n for _, n, _ in t["embedding"])
    per_block = sum(n for _, n, _ in t["block"])
    mm = sum(n for _, n, m in t["block"] if m)
    fin = sum(n for _, n, _ in t["final_norm"])
    head = sum(n for _, n, _ in t["lm_head"])
    blocks = per_block * spec.num_layers
    return ParamCounts(embedding=emb, per_block=per_block, blocks=blocks, final_norm=fin, lm_head=head,
                       matmul_per_block=mm, total=emb + blocks + fin + head, non_embedding=blocks + fin)


# ------------------------------------------------------------------------------------------------ layer pairs

def _spec_list(augmenting: Any) -> list[ModelSpec]:
    if isinstance(augmenting, (ModelSpec, str, Mapping)) or hasattr(augmenting, "to_dict"):
        return [model_spec(augmenting)]
    return [model_spec(a) for a in augmenting]


def _is_pair(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(v, int) for v in x)


def _split_pairs(n_augs: int, layer_pairs: Any) -> list:
    """One entry (a pair list, or None for the default) per augmenting model."""
    if layer_pairs is None:
        return [None] * n_augs
    lp = list(layer_pairs)
    if n_augs == 1 and (not lp or all(_is_pair(x) for x in lp)):
        return [lp]
    if len(lp) != n_augs:
        raise ValueError(f"{n_augs} augmenting model(s) but {len(lp)} layer-pair list(s)")
    return lp


def normalize_layer_pairs(anchor: Any, augmenting: Any, layer_pairs: Any = None, every: int = 4
                          ) -> tuple[ModelSpec, list[tuple[ModelSpec, list[tuple[int, int]]]]]:
    """(anchor spec, [(augmenting spec, pairs), ...]) from the loose forms the public functions accept.

    `augmenting` is one model or a list of models; `layer_pairs` is None (the default rule for each),
    a list of (aug_layer, anchor_layer) pairs (one augmenting model), or a list of such lists (one per
    augmenting model; None inside it means the default for that one). The pairs pass the composition's own
    check (`calm_dist.model.layer_pairs.validate_layer_pairs`), so the planner accepts what training accepts."""
    anchor = model_spec(anchor)
    augs = _spec_list(augmenting)
    per = _split_pairs(len(augs), layer_pairs)
    out = []
    for spec, pairs in zip(augs, per):
        if pairs is None:
            pairs = default_layer_pairs(spec.num_layers, anchor.num_layers, every)
        out.append((spec, validate_layer_pairs(pairs, spec.num_layers, anchor.num_layers,
                                               f"augmenting model {spec.name}", f"anchor {anchor.name}")))
    return anchor, out


# -------------------------------------------------------------------------------------- composition blocks

def composition_params(anchor: Any, augmenting: Any, layer_pairs: Any = None, every: int = 4) -> int:
    """Trainable parameters of all composition blocks (one block per pair, per augmenting model)."""
    anchor, groups = normalize_layer_pairs(anchor, augmenting, layer_pairs, every)
    return shapes.composition_parameter_count(anchor.hidden_size, [(s.hidden_size, p) for s, p in groups])


# -------------------------------------------------------------------------------------------------- FLOPs

def attention_flops_per_token(seq_len: int, d_attn: int, causal: bool = True) -> float:
    """QK^T and PV FLOPs of one token in one attention layer (d_attn = query heads * head_dim).
    causal=True: the average token reads (seq_len + 1) / 2 keys; False: all seq_len keys."""
    keys = (seq_len + 1) / 2 if causal else seq_len
    return 4.0 * d_attn * keys


def block_forward_flops(spec: Any, seq_len: int, causal: bool = True) -> float:
    """Forward FLOPs per token of one decoder block: 2 * matmul params + attention."""
    spec = model_spec(spec)
    return 2.0 * param_counts(spec).matmul_per_block + attention_flops_per_token(seq_len, spec.d_attn, causal)


def forward_flops(spec: Any, seq_len: int, n_layers: int | None = None, lm_head: bool = True,
                  causal: bool = True) -> float:
    """Forward FLOPs per token through the first `n_layers` blocks (all by default) and, if `lm_head`,
    the output projection (2 * vocab * hidden, counted also when tied to the embedding)."""
    spec = model_spec(spec)
    n = spec.num_layers if n_layers is None else n_layers
    head = 2.0 * spec.vocab_size * spec.hidden_size if lm_head else 0.0
    return n * block_forward_flops(spec, seq_len, causal) + head


def anchor_forward_flops(anchor: Any, seq_len: int, causal: bool = True) -> float:
    """The anchor's full forward per token: every block + lm_head."""
    return forward_flops(anchor, seq_len, lm_head=True, causal=causal)


def augmenting_forward_flops(augmenting: Any, seq_len: int, deepest_layer: int, causal: bool = True) -> float:
    """The augmenting model's forward per token up to and including block `deepest_layer` (no head)."""
    return forward_flops(augmenting, seq_len, n_layers=deepest_layer + 1, lm_head=False, causal=causal)


def composition_forward_flops(d_aug: int, d_anchor: int, seq_len: int, causal: bool = True) -> float:
    """Forward FLOPs per token of one composition block: f_proj 2*D_A*D_B, Q/K/V/O 4 * 2*D_B^2, cross
    attention scores + values over the augmenting positions (causal like the anchor's self-attention)."""
    return (2.0 * shapes.block_matmul_parameter_count(d_aug, d_anchor)
            + attention_flops_per_token(seq_len, d_anchor, causal))


@dataclass(frozen=True)
class StepCost:
    """FLOPs per training token of one CALM step, term by term (see `step_cost`)."""

    aug_forward: float        # augmenting models up to their deepest composed layer (0 when states are cached)
    anchor_forward: float     # the whole anchor, lm_head included
    blocks_forward: float     # all composition blocks
    anchor_backward: float    # input gradients only, through anchor blocks above the first composed layer + lm_head
    blocks_backward: float    # weight + input gradients of the composition blocks
    recompute: float          # activation checkpointing: the re-run forward of the checkpointed region (0 if off)
    seq_len: int = 0
    causal: bool = True
    states: str = "recompute"
    first_composed_layer: int = 0
    n_blocks_params: int = 0  # trainable parameters (all composition blocks)

    @property
    def forward(self) -> float:
        return self.aug_forward + self.anchor_forward + self.blocks_forward

    @property
    def backward(self) -> float:
        return self.anchor_backward + self.blocks_backward

    @property
    def total(self) -> float:
        """Model FLOPs per token (what MFU counts): forward + backward, no recomputation."""
        return self.forward + self.backward

    @property
    def total_hardware(self) -> float:
        """FLOPs the hardware executes per token (HFU): total + activation-checkpointing recomputation."""
        return self.total + self.recompute

    def mfu(self, tokens_per_s: float, peak_flops: float) -> float:
        """Model FLOPs utilisation: tokens_per_s * total / peak_flops. Use one scope for both: global tokens/s
        with world_size * per-GPU peak, or per-GPU tokens/s with the per-GPU peak (FLOP/s, not TFLOP/s)."""
        return tokens_per_s * self.total / peak_flops

    def hfu(self, tokens_per_s: float, peak_flops: float) -> float:
        """Hardware FLOPs utilisation (recomputation counted)."""
        return tokens_per_s * self.total_hardware / peak_flops

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(forward=self.forward, backward=self.backward, total=self.total,
                 total_hardware=self.total_hardware)
        return d


def estimated_tail_fraction(seq_len: int, augmenting_seq_len: int) -> float:
    """The tails' tokens per token of an augmenting row, estimated from how much finer the anchor cuts the same
    text (seq_len / augmenting_seq_len): a tail comes from an anchor token that ends inside an augmenting token.
    1.5 x (ratio - 1) is within 2x of what docs/cross_tokenizer.md measures on the tested tokenizer pairs (0.6 at
    a ratio of 1.3, 1.2 at 2.5, 3.7 at 3.4; none when the anchor's tokens are the coarser)."""
    return 1.5 * max(0.0, seq_len / augmenting_seq_len - 1.0)


def augmenting_tokens_per_token(seq_len: int, augmenting_seq_len: int | None, tail_fraction: float | None = None
                                ) -> float:
    """Augmenting tokens computed per anchor token: 1 when the models share the tokenizer (augmenting_seq_len
    None); with different tokenizers (docs/cross_tokenizer.md) a full row's augmenting reading,
    augmenting_seq_len, plus the tails of the prefixes that read otherwise, `tail_fraction` of it (None:
    estimated_tail_fraction), over the anchor's seq_len."""
    if augmenting_seq_len is None:
        return 1.0
    if tail_fraction is None:
        tail_fraction = estimated_tail_fraction(seq_len, augmenting_seq_len)
    return augmenting_seq_len * (1.0 + tail_fraction) / seq_len


def step_cost(anchor: Any, augmenting: Any, layer_pairs: Any = None, *, seq_len: int, states: str = "recompute",
              activation_checkpointing: bool = False, causal: bool = True, attn_backward_factor: float = 2.0,
              every: int = 4, augmenting_seq_len: int | None = None, tail_fraction: float | None = None
              ) -> StepCost:
    """FLOPs per token of one training step (docs/plan.md section 3), term by term.

    Models of different tokenizers (augmenting_seq_len set): each augmenting model computes
    r = augmenting_tokens_per_token(seq_len, augmenting_seq_len, tail_fraction) tokens per anchor token, each
    attending a context of augmenting_seq_len; in every composition block f_proj, K and V run over those tokens
    (r times), Q and O over the anchor's, and the cross attention reads augmenting_seq_len keys. Same tokenizer:
    r = 1 and the augmenting context is seq_len, the terms below.

    Let j0 be the first (lowest) composed anchor layer over all pairs. Then per token:
      aug_forward     = sum over augmenting models of 2 * matmul params of blocks 0..deepest composed layer
                        + their attention;  0 when states == 'cached'
      anchor_forward  = 2 * anchor matmul params (all blocks + lm_head) + attention of every block. In training
                        the head runs only on positions with a next-token label (lm_loss.head_loss): T-1 of T
                        for unmasked data, fewer for prompt/completion data; counted here for all T.
      blocks_forward  = per pair 2 * (D_A*D_B + 4*D_B^2) + cross attention
      anchor_backward = input gradients only (the anchor is frozen: no weight gradients), through the blocks
                        j0+1 .. L-1 and the lm_head: 2 * their matmul params + 2x their attention forward
                        (dQ, dK, dV, dP are all needed). Blocks <= j0 need no backward.
                        `attn_backward_factor` (2.0) is the attention backward / forward ratio; fused SDPA /
                        flash kernels recompute QK^T in the backward (2.5: what FlopCounterMode counts for them).
      blocks_backward = weight gradients 2 * (D_A*D_B + 4*D_B^2) + input gradients of Q, K, V, O 2 * 4*D_B^2
                        (f_proj's input, the frozen augmenting state, needs none) + 2x cross-attention
                        = 6 * matmul params - 2*D_A*D_B + 2x attention, i.e. ~6 * N_blocks.
      recompute       = with activation checkpointing as Hugging Face does it (each decoder layer's `forward`
                        checkpointed, non-reentrant): one more forward of anchor blocks j0+1 .. L-1, less
                        their last matmul (the MLP down-projection: torch stops recomputing once every
                        saved tensor is restored, and a frozen Linear saves none of its input). Composition
                        blocks attached by forward hooks run outside the checkpoint (HF checkpoints
                        `forward`, not `__call__`) and keep their activations; block j0 and everything
                        below store nothing and are not re-run; the augmenting models run under no_grad.
                        Caveat: transformers 5's `activation_checkpointing_enable()` also calls
                        `enable_input_require_grads()`, which makes the embedding output require grad and
                        so backpropagates (and recomputes) the whole frozen anchor; call
                        `disable_input_require_grads()` afterwards to get the cost modelled here.
    """
    if states not in ("recompute", "cached"):
        raise ValueError("states must be 'recompute' or 'cached'")
    anchor, groups = normalize_layer_pairs(anchor, augmenting, layer_pairs, every)
    L = anchor.num_layers
    j0 = min(b for _, pairs in groups for _, b in pairs)
    r = augmenting_tokens_per_token(seq_len, augmenting_seq_len, tail_fraction)
    context = augmenting_seq_len or seq_len  # the augmenting positions a token attends
    aug_fwd = 0.0
    if states == "recompute":
        aug_fwd = r * sum(augmenting_forward_flops(s, context, max(a for a, _ in p), causal) for s, p in groups)
    anchor_fwd = anchor_forward_flops(anchor, seq_len, causal)
    blk_fwd = 0.0
    blk_bwd = 0.0
    for s, pairs in groups:
        da, db = s.hidden_size, anchor.hidden_size
        attn = attention_flops_per_token(context, db, causal)
        augmenting_side = da * db + 2 * db * db  # f_proj, K, V: one per augmenting token
        matmul = r * augmenting_side + shapes.block_matmul_parameter_count(da, db) - augmenting_side  # + Q, O
        blk_fwd += len(pairs) * (2.0 * matmul + attn)
        blk_bwd += len(pairs) * (2.0 * matmul + 2.0 * 2 * db * db * (1 + r) + attn_backward_factor * attn)
    n_params = shapes.composition_parameter_count(anchor.hidden_size, [(s.hidden_size, p) for s, p in groups])
    pc = param_counts(anchor)
    attn_a = attention_flops_per_token(seq_len, anchor.d_attn, causal)
    above = L - 1 - j0
    anchor_bwd = (above * (2.0 * pc.matmul_per_block + attn_backward_factor * attn_a)
                  + 2.0 * anchor.vocab_size * anchor.hidden_size)
    recompute = 0.0
    if activation_checkpointing:
        tail = 2.0 * anchor.intermediate_size * anchor.hidden_size   # the down-projection, not re-run
        recompute = above * (block_forward_flops(anchor, seq_len, causal) - tail)
    return StepCost(aug_forward=aug_fwd, anchor_forward=anchor_fwd, blocks_forward=blk_fwd,
                    anchor_backward=anchor_bwd, blocks_backward=blk_bwd, recompute=recompute, seq_len=seq_len,
                    causal=causal, states=states, first_composed_layer=j0, n_blocks_params=n_params)


# ----------------------------------------------------------------------------------------------- the cache

def cache_bytes_per_token(augmenting: Any, layer_pairs: Any = None, dtype: Any = "bf16", anchor: Any = None,
                          every: int = 4) -> int:
    """Bytes of cached augmenting states per token: for each augmenting model, its distinct composed layers
    times D_A times bytes(dtype) (a layer feeding several anchor layers is stored once).
    `anchor` is only needed to derive default pairs (layer_pairs=None)."""
    if layer_pairs is None and anchor is None:
        raise ValueError("pass layer_pairs, or the anchor to derive the default pairs")
    if anchor is None:
        augs = _spec_list(augmenting)
        groups = list(zip(augs, _split_pairs(len(augs), layer_pairs)))
    else:
        _, groups = normalize_layer_pairs(anchor, augmenting, layer_pairs, every)
    b = dtype_bytes(dtype)
    return sum(len({a for a, _ in pairs}) * s.hidden_size * b for s, pairs in groups)


def cache_disk_bytes(bytes_per_token: int, tokens: float) -> float:
    """Disk size of the cache for `tokens` training tokens (payload only; no index, no compression)."""
    return bytes_per_token * float(tokens)


@dataclass(frozen=True)
class CacheEconomics:
    """Caching the augmenting states vs recomputing them every step (times are cluster seconds per token)."""

    bytes_per_token: int
    cache_pass_s: float           # the one-time caching pass: augmenting forward + writing the states
    recompute_s_per_epoch: float  # what recomputing costs every epoch: the augmenting forward (+ extra)
    read_s_per_epoch: float       # what reading the states back costs every epoch (beyond what overlaps)
    break_even_epochs: float      # caching is cheaper overall when training for more epochs than this (inf: never)
    disk_bytes: float | None = None
    tokens: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def cache_economics(aug_flops_per_token: float, bytes_per_token: int, *, flops_per_s: float,
                    cache_flops_per_s: float | None = None, write_bytes_per_s: float = math.inf,
                    read_bytes_per_s: float = math.inf, overlap_s_per_token: float = 0.0,
                    recompute_extra_s_per_token: float = 0.0, tokens: float | None = None) -> CacheEconomics:
    """Cache-vs-recompute break-even, per token (the token count cancels out).

      caching pass    C = aug_flops / cache_flops_per_s + bytes / write_bytes_per_s
      recompute/epoch A = aug_flops / flops_per_s + recompute_extra_s_per_token
      read/epoch      R = max(0, bytes / read_bytes_per_s - overlap_s_per_token)
    Training E epochs costs E*A recomputing and C + E*R cached: caching wins for E > C / (A - R) (inf if A <= R).

    `flops_per_s` is the achieved rate of the training job (all GPUs), `cache_flops_per_s` that of the caching
    pass (default: the same). `overlap_s_per_token` is the rest of a cached step, during which a prefetching
    loader reads in the background (0: reads are not hidden). `recompute_extra_s_per_token` adds what the
    recompute mode costs beyond its FLOPs (e.g. the augmenting weights' all-gathers when communication-bound).
    With free I/O the answer is 1 epoch: the caching pass is one epoch of augmenting forwards."""
    cache_rate = flops_per_s if cache_flops_per_s is None else cache_flops_per_s
    c = aug_flops_per_token / cache_rate + bytes_per_token / write_bytes_per_s
    a = aug_flops_per_token / flops_per_s + recompute_extra_s_per_token
    r = max(0.0, bytes_per_token / read_bytes_per_s - overlap_s_per_token)
    be = c / (a - r) if a > r else math.inf
    disk = cache_disk_bytes(bytes_per_token, tokens) if tokens is not None else None
    return CacheEconomics(bytes_per_token=bytes_per_token, cache_pass_s=c, recompute_s_per_epoch=a,
                          read_s_per_epoch=r, break_even_epochs=be, disk_bytes=disk, tokens=tokens)
