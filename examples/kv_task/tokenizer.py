"""The SentencePiece tokenizer shared by the anchor and the augmenting model.

Every operator and key is a ``user_defined_symbol`` written with SentencePiece's word-boundary mark
(``"\u2581qzv"``, ``"\u2581-"``) and ``add_dummy_prefix`` is on, so each is exactly one token wherever it
stands. Numbers are read one digit per token: each digit is a symbol twice, with the mark (a number's first
digit, ``"\u25814"``) and without (the digits after it, ``"7"``), so ``47`` reads ``\u25814 7`` and ``-18``
reads ``\u2581- 1 8`` (the sign is the operator's token). Model type BPE: with every word a user symbol it
learns no merges, so the vocabulary is exactly ``<pad>=0 <unk>=1 <s>=2 </s>=3``, then the words of
:func:`kv_task.task.vocabulary_words` with the mark (operators, digits, keys), then the bare digits.

A sequence for training or scoring is ``<s> prompt-tokens completion-tokens </s>`` with the loss on the
completion tokens and ``</s>`` only (see :func:`encode_record`).
"""
from __future__ import annotations

import io
from typing import Iterable

import sentencepiece as spm

from examples.kv_task.task import DIGITS

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
WB = "\u2581"


def symbols(words: list[str]) -> list[str]:
    """The pieces in id order after the four special ones: every word with the word-boundary mark, then the
    digits without it (a number's second and later digits)."""
    return [WB + w for w in words] + list(DIGITS)


def train_tokenizer(words: list[str], text: Iterable[str], model_prefix: str | None = None) -> bytes:
    """Train on the task text; returns the serialized model (also written to ``model_prefix.model``)."""
    buf = io.BytesIO()
    pieces = symbols(words)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=buf,
        model_type="bpe", vocab_size=4 + len(pieces), hard_vocab_limit=False,
        user_defined_symbols=pieces,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        add_dummy_prefix=True, split_by_whitespace=True, character_coverage=1.0,
        byte_fallback=False, num_threads=1, minloglevel=2,
    )
    proto = buf.getvalue()
    if model_prefix:
        with open(model_prefix + ".model", "wb") as f:
            f.write(proto)
    return proto


def load_tokenizer(path: str) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=path)


def encode_record(sp: spm.SentencePieceProcessor, record: dict) -> tuple[list[int], list[int]]:
    """(input_ids, labels): ``<s> prompt completion </s>``; labels -100 on ``<s>`` and the prompt."""
    p = sp.encode(record["prompt"])
    c = sp.encode(record["completion"]) + [EOS_ID]
    ids = [BOS_ID] + p + c
    labels = [-100] * (1 + len(p)) + c
    return ids, labels


def encode_prompt(sp: spm.SentencePieceProcessor, prompt: str) -> list[int]:
    return [BOS_ID] + sp.encode(prompt)
