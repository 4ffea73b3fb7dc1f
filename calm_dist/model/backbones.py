"""Where a Hugging Face decoder-only LM keeps its blocks, widths and heads.

One small registry keyed by `config.model_type`. To support another architecture, add one line
naming the attribute of its decoder (`model.get_decoder()`) that holds the block list, then add the
family to the identity test in tests/unit/test_composition.py.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn

# model_type -> attribute of the decoder (model.get_decoder()) holding the nn.ModuleList of blocks.
BLOCK_LISTS: dict[str, str] = {
    "llama": "layers",
    "mistral": "layers",
    "qwen2": "layers",
    "qwen3": "layers",
    "gpt2": "h",
    "gpt_neox": "layers",
}


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class Backbone:
    """The facts the composition needs about one decoder LM."""

    model_type: str
    hidden_size: int
    num_heads: int
    num_layers: int
    vocab_size: int

    @classmethod
    def from_config(cls, config) -> "Backbone":
        model_type = getattr(config, "model_type", None)
        if model_type not in BLOCK_LISTS:
            raise UnsupportedArchitecture(
                f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(BLOCK_LISTS))}. "
                "To add one, map its model_type to the decoder attribute holding its blocks in "
                "calm_dist/model/backbones.py:BLOCK_LISTS."
            )
        # transformers' attribute_map gives GPT-2 (n_embd, n_head, n_layer) these generic names too.
        return cls(
            model_type=model_type,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_layers=config.num_hidden_layers,
            vocab_size=config.vocab_size,
        )


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ordered decoder blocks of a causal LM (or of its bare decoder)."""
    model_type = model.config.model_type
    Backbone.from_config(model.config)  # raises a clear error when unsupported
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    return getattr(decoder, BLOCK_LISTS[model_type])


def frozen_decoder_blocks(models) -> list[nn.Module]:
    """The decoder blocks of `models` that hold no trainable parameter (a LoRA adapter makes a block trainable):
    the ones ZeRO-3 may gather whole and torch.compile may take."""
    return [block for model in models for block in decoder_blocks(model)
            if not any(p.requires_grad for p in block.parameters())]


def decoder(model: nn.Module) -> nn.Module:
    """The bare decoder (embeddings + blocks + final norm), without the LM head."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model


def custom_attention_mask(model: nn.Module, allowed: torch.Tensor) -> torch.Tensor:
    """A boolean [B, 1, Tq, Tk] mask (True: attend) in the form `model`'s attention takes a ready 4D mask (transformers
    passes a 4D mask through untouched): SDPA takes the booleans, eager attention adds a float mask."""
    implementation = model.config._attn_implementation
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        dtype = next(model.parameters()).dtype
        blocked = torch.finfo(dtype).min
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, blocked)
    raise UnsupportedArchitecture(f"{model.config.model_type} with attention {implementation!r} takes no custom "
                                  "attention mask, which models of different tokenizers need: load it with "
                                  "attn_implementation='sdpa' or 'eager'")


def cache_kwarg(module: nn.Module) -> str:
    """The name under which `module.forward` takes a KV cache: `cache` in newer transformers 5.x releases,
    `past_key_values` before."""
    if torch.compiler.is_compiling():  # dynamo traces through functools.cache with a warning: read the signature
        return _cache_kwarg_of.__wrapped__(type(module))
    return _cache_kwarg_of(type(module))


@functools.cache
def _cache_kwarg_of(cls) -> str:  # one signature inspection per class: decoding asks on every step
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"
