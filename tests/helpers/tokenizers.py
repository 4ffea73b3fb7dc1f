"""Tokenizers trained or built here (no hub) over one small corpus, each behind calm_dist.data.tokenizer.Tokenizer:
word-level, byte-level BPE and SentencePiece unigram, so that models of different tokenizers read the same texts.
Every one gives pad 0, bos 1 and eos 2, as tests/helpers/tiny.py's models expect."""
from __future__ import annotations

import re
from pathlib import Path

from calm_dist.data.tokenizer import Tokenizer
from calm_dist.tiny_setup import make_records, train_tokenizer

CORPUS = [r["prompt"] + r["completion"] for r in make_records(400, seed=7)]
SPECIALS = ["<pad>", "<s>", "</s>"]


def _save_fast(raw, directory: Path, **special) -> Tokenizer:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            **special).save_pretrained(directory)
    return Tokenizer(directory)


def word_level(directory: Path) -> Tokenizer:
    """One token per word or run of punctuation of the corpus, <unk> for the rest (a partial word included)."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers

    words = sorted({w for text in CORPUS for w in re.findall(r"\w+|[^\w\s]+", text)})
    vocab = {t: i for i, t in enumerate([*SPECIALS, "<unk>", *words])}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return _save_fast(raw, directory, unk_token="<unk>")


def byte_level_bpe(directory: Path, vocab_size: int) -> Tokenizer:
    """A byte-level BPE of `vocab_size` tokens trained on the corpus (its alphabet: the corpus's characters)."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                        show_progress=False))
    return _save_fast(raw, directory)


def sentencepiece(path: Path, vocab_size: int = 128) -> Tokenizer:
    """calm_dist.tiny_setup's SentencePiece unigram model, trained on the corpus."""
    train_tokenizer(CORPUS, path, vocab_size=vocab_size)
    return Tokenizer(path)


def split_by_decoding(tok: Tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """The text prompt + completion read whole, split where the prompt ends, found by decoding (exact for a
    byte-level BPE): bos and the longest run of the first tokens that decodes to a prefix of the prompt, then the
    rest and eos. A reference for data.tokenizer.whole_text_ids, which splits by the tokens' character spans."""
    whole = tok.encode(prompt + completion)
    cut = max(k for k in range(len(whole) + 1) if prompt.startswith(tok.decode(whole[:k])))
    return [tok.bos_id, *whole[:cut]], whole[cut:] + [tok.eos_id]
