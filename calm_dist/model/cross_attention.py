"""One CALM composition block: f_proj then causal multi-head cross-attention, zero-initialised output.

The block's parameter tensors and their count (D_A*D_B + 4*D_B^2 + 5*D_B per block) are listed once, torch-free,
in `calm_dist.model.shapes`, which the planner shares.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calm_dist.model.shapes import block_parameter_count

__all__ = ["CrossAttentionBlock", "cross_attention_mask", "block_parameter_count"]


def cross_attention_mask(query_positions: torch.Tensor, key_mask: torch.Tensor | None,
                         num_keys: int, documents: torch.Tensor | None = None,
                         key_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean [B or 1, 1, Tq, Tk] mask: query at absolute position t sees keys s <= t that are not padding and,
    for packed rows, belong to its document (`documents` [B, T]: each token's document index; queries and keys
    are then the same T positions).

    `key_positions` [B, Tk] places each row's keys on the queries' scale when key s is not at position s (another
    tokenizer's tokens, calm_dist/model/token_alignment.py); `query_positions` may then be per row, [B, Tq].

    Callers pass None instead of a mask when plain causal attention over aligned positions suffices (SDPA's
    fast path).
    """
    keys = torch.arange(num_keys, device=query_positions.device) if key_positions is None else key_positions
    causal = keys[..., None, :] <= query_positions[..., :, None]  # [Tq, Tk], or [B, Tq, Tk] with per-row positions
    mask = causal.view(-1, 1, *causal.shape[-2:])
    if key_mask is not None:
        mask = mask & key_mask.bool()[:, None, None, :]
    if documents is not None:
        mask = mask & (documents[:, None, :, None] == documents[:, None, None, :])
    return mask


class CrossAttentionBlock(nn.Module):
    def __init__(self, d_augmenting: int, d_anchor: int, num_heads: int, eps: float = 1e-5):
        super().__init__()
        if d_anchor % num_heads:
            raise ValueError(f"anchor width {d_anchor} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.proj = nn.Linear(d_augmenting, d_anchor)  # f_proj
        self.augmenting_norm = nn.LayerNorm(d_anchor, eps=eps)
        self.query_norm = nn.LayerNorm(d_anchor, eps=eps)
        self.q_proj = nn.Linear(d_anchor, d_anchor, bias=False)
        self.k_proj = nn.Linear(d_anchor, d_anchor, bias=False)
        self.v_proj = nn.Linear(d_anchor, d_anchor, bias=False)
        self.o_proj = nn.Linear(d_anchor, d_anchor, bias=False)
        nn.init.zeros_(self.o_proj.weight)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2)

    def keys_values(self, augmenting_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project augmenting states [B, T, D_A] to per-head keys and values [B, H, T, D_B/H]."""
        projected = self.augmenting_norm(self.proj(augmenting_states.to(self.proj.weight.dtype)))
        return self._heads(self.k_proj(projected)), self._heads(self.v_proj(projected))

    def forward(self, anchor_states: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """The residual update for anchor_states [B, Tq, D_B]; mask as from cross_attention_mask (None: causal,
        aligned)."""
        b, t, d = anchor_states.shape
        queries = self._heads(self.q_proj(self.query_norm(anchor_states.to(self.q_proj.weight.dtype))))
        if mask is None:
            out = F.scaled_dot_product_attention(queries, keys, values, is_causal=True)
        else:
            # A query with no visible key (a left-padding position; across tokenizers, an anchor token that ends
            # before any augmenting token does) would give NaN: let it see everything, then zero its update, so
            # that its state is exactly the anchor's own.
            visible = mask.any(dim=-1, keepdim=True)
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask | ~visible)
            out = out * visible.to(out.dtype)
        out = out.transpose(1, 2).reshape(b, t, d)
        return self.o_proj(out).to(anchor_states.dtype)
