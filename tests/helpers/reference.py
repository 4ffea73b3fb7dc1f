"""Independent references for the tests: the composition block written from the paper, and composed logits
computed from plain transformers models without calm_dist (forward hooks on the anchor, the augmenting
states from `output_hidden_states`).

test_costs.py counts the FLOPs and saved bytes of `RefBlock`; test_composition.py checks `ComposedModel`'s
logits against `composed_logits`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RefBlock(nn.Module):
    """A reference composition block: f_proj, LayerNorms, Q/K/V/O, causal SDPA cross-attention."""

    def __init__(self, d_aug, d_anchor, n_heads):
        super().__init__()
        self.h = n_heads
        self.proj = nn.Linear(d_aug, d_anchor)
        self.ln_aug = nn.LayerNorm(d_anchor)
        self.ln_q = nn.LayerNorm(d_anchor)
        self.q = nn.Linear(d_anchor, d_anchor, bias=False)
        self.k = nn.Linear(d_anchor, d_anchor, bias=False)
        self.v = nn.Linear(d_anchor, d_anchor, bias=False)
        self.o = nn.Linear(d_anchor, d_anchor, bias=False)

    def forward(self, h_anchor, h_aug):
        b, s, d = h_anchor.shape
        heads = lambda t: t.view(b, s, self.h, d // self.h).transpose(1, 2)  # noqa: E731
        kv = self.ln_aug(self.proj(h_aug))
        q = heads(self.q(self.ln_q(h_anchor)))
        out = F.scaled_dot_product_attention(q, heads(self.k(kv)), heads(self.v(kv)), is_causal=True)
        return h_anchor + self.o(out.transpose(1, 2).reshape(b, s, d))


# RefBlock's submodules -> calm_dist's CrossAttentionBlock's: the weights are copied, the computation is not
BLOCK_NAMES = {"proj": "proj", "ln_aug": "augmenting_norm", "ln_q": "query_norm", "q": "q_proj", "k": "k_proj",
               "v": "v_proj", "o": "o_proj"}


def ref_block_like(block: nn.Module, n_heads: int) -> RefBlock:
    """A RefBlock holding the weights of a calm_dist CrossAttentionBlock (every weight, or it raises)."""
    ref = RefBlock(block.proj.in_features, block.proj.out_features, n_heads)
    theirs = block.state_dict()
    ref.load_state_dict({f"{ours}.{kind}": theirs[f"{BLOCK_NAMES[ours]}.{kind}"]
                         for ours, kind in (k.split(".") for k in ref.state_dict())}, strict=True)
    assert len(theirs) == len(ref.state_dict()), sorted(theirs)
    return ref


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a transformers causal LM (written out here, not taken from calm_dist.model.backbones)."""
    if model.config.model_type == "gpt2":
        return model.transformer.h
    if model.config.model_type == "gpt_neox":
        return model.gpt_neox.layers
    return model.model.layers


@torch.no_grad()
def composed_logits(anchor: nn.Module, augmenting: list[nn.Module], layer_pairs: list[list[tuple[int, int]]],
                    blocks: list[list[RefBlock]], input_ids: torch.Tensor) -> torch.Tensor:
    """CALM's logits: anchor block j's output += blocks[a][p](it, output of augmenting model a's block i) for
    each pair p = (i, j); the blocks on one anchor block apply in order, augmenting model by model.

    The models are plain, untruncated transformers LMs. `hidden_states[i + 1]` is block i's output for every
    block but the last, where transformers applies the final norm first: composed blocks must be shallower."""
    updates: dict[int, list[tuple[RefBlock, torch.Tensor]]] = {}
    for model, pairs, model_blocks in zip(augmenting, layer_pairs, blocks, strict=True):
        assert max(i for i, _ in pairs) < model.config.num_hidden_layers - 1, \
            "hidden_states[-1] is after the final norm"
        states = model(input_ids, output_hidden_states=True).hidden_states
        for (i, j), block in zip(pairs, model_blocks, strict=True):
            updates.setdefault(j, []).append((block, states[i + 1]))

    def add_updates(j):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            for block, h_aug in updates[j]:
                hidden = block(hidden, h_aug)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook

    layers = decoder_layers(anchor)
    handles = [layers[j].register_forward_hook(add_updates(j)) for j in updates]
    try:
        return anchor(input_ids).logits
    finally:
        for handle in handles:
            handle.remove()


def merged_lora_anchor(anchor, lora_weights: dict[str, torch.Tensor]):
    """The anchor with every LoRA update folded into its weight, W + (alpha / r) B A with alpha = 2r (LoRAAnchor's
    default), without peft: an independent reference for LoRAAnchor and its exports (Linear layers only)."""
    modules = dict(anchor.named_modules())
    with torch.no_grad():
        for name, a in lora_weights.items():
            if ".lora_A." in name:
                b = lora_weights[name.replace(".lora_A.", ".lora_B.")]
                target = name.split(".lora_A.")[0].removeprefix("base_model.model.")
                modules[target].weight += 2.0 * b @ a
    return anchor
