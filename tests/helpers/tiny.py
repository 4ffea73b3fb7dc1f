"""Tiny decoder LMs built from configs (no hub), one per supported family, and compositions of them."""
from __future__ import annotations

import torch
import transformers as T

VOCAB = 96
SPECIAL = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_config(family: str, hidden: int = 32, layers: int = 4, heads: int = 4, vocab: int = VOCAB):
    common = dict(vocab_size=vocab, **SPECIAL)
    if family == "gpt2":
        return T.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                               num_attention_heads=heads, max_position_embeddings=256, **common)
    cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config, "qwen3": T.Qwen3Config}[family]
    extra = {"head_dim": hidden // heads} if family == "qwen3" else {}
    return cls(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=max(1, heads // 2), max_position_embeddings=256, **extra, **common)


def tiny_model(family: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(tiny_config(family, **kw))
    return model.eval()


def randomize_composition(model, seed: int = 0, scale: float = 0.2) -> None:
    """Give the zero-initialised blocks non-trivial weights, so the composition really acts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.blocks.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            p.copy_(1.0 + noise if "norm.weight" in name else noise)


def sharpened(model, factor=8.0):
    """A random model whose weight matrices are scaled up: its next-token choices are decided by wide margins and
    vary with the context (at the default init every tiny model repeats one token, which tests nothing)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(factor)
    return model


def sharpened_composition(anchor_family: str, aug_families):
    """A composition of sharpened bases with random blocks, in eval mode: decoding tests need greedy tokens that
    differ from row to row."""
    from calm_dist import ComposedModel

    model = ComposedModel.from_pretrained(
        sharpened(tiny_model(anchor_family, seed=1, hidden=48, layers=6, heads=4)),
        [sharpened(tiny_model(f, seed=2 + i, hidden=32, layers=8, heads=4)) for i, f in enumerate(aug_families)])
    randomize_composition(model)
    return model.eval()


def random_prompts(seed: int, lengths) -> list[torch.Tensor]:
    """Prompts of random ids (no special token), one of each length."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]


def left_padded(rows, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged rows of ids as one left-padded batch: (ids, attention mask)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return ids, mask


def first_stop(tokens: list[int], eos: int) -> int | None:
    return tokens.index(eos) if eos in tokens else None


def an_eos_the_rows_reach_apart(rows: list[list[int]]) -> int:
    """A token that rows decode at the most distinct steps, preferring one that some row never decodes: with it as
    eos, the rows of a batch finish apart."""
    stops = {t: [first_stop(r, t) for r in rows] for t in sorted({t for r in rows for t in r})}
    return max(stops, key=lambda t: (None in stops[t], len({s for s in stops[t] if s is not None})))


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox"]


def ids(batch=2, length=12, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def composed(anchor_family="llama", aug_families=("gpt2",), randomize=True, **kw):
    anchor = tiny_model(anchor_family, seed=1, hidden=48, layers=6, heads=4)
    augmenting = [tiny_model(f, seed=2 + i, hidden=32, layers=8, heads=4) for i, f in enumerate(aug_families)]
    from calm_dist import ComposedModel

    model = ComposedModel.from_pretrained(anchor, augmenting, **kw)
    if randomize:
        randomize_composition(model)
    return model


def tiny_setup(directory, **kw):
    """calm_dist.tiny_setup's models, tokenizer and data in `directory` (the integration tests' inputs)."""
    from calm_dist.tiny_setup import make_tiny_setup

    return make_tiny_setup(directory, **kw)


def random_lora(anchor, rank: int = 2, seed: int = 0):
    """The LoRA baseline on `anchor` with random B (trained-like: B = 0 would be the anchor itself)."""
    from calm_dist.model.baselines import LoRAAnchor

    lora = LoRAAnchor(anchor, rank=rank, targets=["q_proj", "v_proj"]).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return lora
