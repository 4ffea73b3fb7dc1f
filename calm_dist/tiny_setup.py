"""A tiny, self-contained composition set-up for smoke runs and tests (seconds, no hub).

Writes into --out: tokenizer.model (SentencePiece trained here), anchor/ (a 4-block Llama),
augmenting/ (a 4-block GPT-2 of another width), train.jsonl and eval.jsonl (prompt/completion).
The models are random: this checks plumbing and speed, not skill (the key-value demo does that).

    python -m calm_dist.tiny_setup --out artifacts/tiny
"""
from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

import sentencepiece as spm
import torch
import transformers as T

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega red green blue black white one two three four five six seven eight").split()


def make_records(n: int, seed: int) -> list[dict]:
    """`n` prompt/completion records: a few words, and the same words reversed (the same list for one seed)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(2, 5))
        records.append({"prompt": "reverse: " + " ".join(words) + " =", "completion": " " + " ".join(reversed(words))})
    return records


def train_tokenizer(sentences: list[str], path: Path, vocab_size: int = 128) -> None:
    """A SentencePiece unigram model with the ids the tiny models expect: pad 0, bos 1, eos 2, unk 3."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
                                   model_type="unigram", pad_id=0, bos_id=1, eos_id=2, unk_id=3,
                                   character_coverage=1.0, minloglevel=2, hard_vocab_limit=False)
    path.write_bytes(model.getvalue())


def make_models(out: Path, vocab_size: int, anchor_layers: int = 4, augmenting_layers: int = 4,
                anchor_width: int = 64, augmenting_width: int = 48, seed: int = 0) -> None:
    """A random Llama anchor and a random GPT-2 augmenting model of another width, saved under `out`."""
    special = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    anchor = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=anchor_width, intermediate_size=2 * anchor_width,
                                              num_hidden_layers=anchor_layers, num_attention_heads=4,
                                              num_key_value_heads=2, max_position_embeddings=512, **special))
    augmenting = T.GPT2LMHeadModel(T.GPT2Config(n_embd=augmenting_width, n_layer=augmenting_layers, n_head=4,
                                                n_positions=512, **special))
    anchor.save_pretrained(out / "anchor")
    augmenting.save_pretrained(out / "augmenting")


def make_tiny_setup(out: str | Path, n_train: int = 256, n_eval: int = 32, seed: int = 0, **model_kw) -> Path:
    """Write the data sets, and the tokenizer and models unless `out` holds them already; returns `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, evaluation = make_records(n_train, seed), make_records(n_eval, seed + 1)
    for name, records in (("train.jsonl", train), ("eval.jsonl", evaluation)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenizer = out / "tokenizer.model"
    if not tokenizer.exists():
        # a fixed corpus: the tokenizer (and so row lengths) must not depend on n_train
        train_tokenizer([r["prompt"] + r["completion"] for r in make_records(2000, seed=12345)], tokenizer)
    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size()
    if not (out / "anchor" / "config.json").exists():
        make_models(out, vocab, seed=seed, **model_kw)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="artifacts/tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_tiny_setup(args.out, seed=args.seed))
