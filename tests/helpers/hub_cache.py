"""A Hugging Face hub cache laid out by the tests themselves (no network here): tiny models and word-level
tokenizers published as the cache holds a fetched commit, read with the hub offline."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import transformers as T

from calm_dist.tiny_setup import WORDS

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0-3, as the tiny models' configs expect


def offline_hub(cache: Path, monkeypatch) -> Path:
    """Point huggingface_hub at `cache`, offline, in this process and in the processes it starts
    (huggingface_hub reads both variables once, at import)."""
    from huggingface_hub import constants

    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def publish(cache: Path, repo_id: str, source: Path, commit: str, ref: str = "main") -> Path:
    """`source`'s files as the HF cache holds a fetched commit: blobs named by their hash, the snapshot's files
    linking to them, refs/<ref> naming the commit. Returns the snapshot directory."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(p for p in source.iterdir() if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


def commit(n: int) -> str:
    return f"{n:040x}"


def word_tokenizer(directory: Path, words: list[str] | None = None) -> int:
    """A transformers fast tokenizer over a `tokenizers` WordLevel model: the special tokens, then "reverse:", "="
    and `words` (default: tiny_setup's, which its records use), one id each. Returns its size."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers

    words = list(WORDS) if words is None else words
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, "reverse:", "=", *words])}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    T.PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                              unk_token="<unk>").save_pretrained(directory)
    return len(vocab)


def qwen2_model(directory: Path, rows: int, hidden: int = 32, layers: int = 4, seed: int = 0, **overrides):
    """A random tiny Qwen2 with an embedding table of `rows` rows (`overrides`: other config values), saved
    (safetensors) to `directory`."""
    import torch

    torch.manual_seed(seed)
    config = T.Qwen2Config(vocab_size=rows, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           **{"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **overrides})
    model = T.Qwen2ForCausalLM(config)
    model.save_pretrained(directory)
    return model
