"""The SentencePiece tokenizer shared by the anchor and the augmenting model.

Every word of the task (operator, number, key) is a ``user_defined_symbol`` written with SentencePiece's
word-boundary mark (``"\u2581qzv"``, ``"\u2581-18"``) and ``add_dummy_prefix`` is on, so every
space-separated word is exactly one token wherever it stands (first word or not). Model type BPE: with
every word a user symbol it learns no merges and needs no extra characters, so the vocabulary is
exactly: ``<pad>=0 <unk>=1 <s>=2 </s>=3``, then the words in :func:`kv_task.task.vocabulary_words`
order (operators, numbers, keys).

A sequence for training or scoring is ``<s> prompt-tokens completion-tokens </s>`` with the loss on the
completion tokens and ``</s>`` only (see :func:`encode_record`).
"""
from __future__ import annotations

import io
from typing import Iterable

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
WB = "\u2581"


def train_tokenizer(words: list[str], text: Iterable[str], model_prefix: str | None = None) -> bytes:
    """Train on the task text; returns the serialized model (also written to ``model_prefix.model``)."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=buf,
        model_type="bpe", vocab_size=4 + len(words), hard_vocab_limit=False,
        user_defined_symbols=[WB + w for w in words],
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
