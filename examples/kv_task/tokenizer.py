"""The SentencePiece tokenizer shared by the anchor and the augmenting model.

Every operator and key is a ``user_defined_symbol`` written with SentencePiece's word-boundary mark
(``"\u2581qzv"``, ``"\u2581-"``) and ``add_dummy_prefix`` is on, so each is exactly one token wherever it
stands. Numbers are read one digit per token: each digit is a symbol twice, with the mark (a number's first
digit, ``"\u25814"``) and without (the digits after it, ``"7"``), so ``47`` reads ``\u25814 7`` and ``-18``
reads ``\u2581- 1 8`` (the sign is the operator's token). Model type BPE: with every word a user symbol it
learns no merges, so the vocabulary is exactly ``<pad>=0 <unk>=1 <s>=2 </s>=3``, then the words of
:func:`kv_task.task.vocabulary_words` with the mark (operators, digits, keys), then the bare digits.

A sequence for training or scoring is ``<s> prompt-tokens completion-tokens </s>`` with the loss on the
completion tokens and ``</s>`` only (``examples.kv_task.pretrain.record_ids``, as calm_dist trains).

:func:`train_char_tokenizer` trains the augmenting model's own tokenizer for ``make demo-xtok``: the same special
ids, operators and digits, but no key symbols; each letter a-z is a symbol with the mark and bare, so a key reads
one letter a token (``qzv`` reads ``\u2581q z v``). Its vocabulary is ``<pad> <unk> <s> </s>``, then the pieces of
:func:`char_symbols`. :func:`train_letters_numbers_tokenizer` is its variant that reads numbers as modern
tokenizers do (tiktoken's cl100k, Llama 3): every number of up to three digits one token (``47`` reads ``\u258147``,
``1234`` reads ``\u2581123 4``), keys still one letter a token.

:func:`train_bpe_tokenizer` is a tokenizer of another kind altogether, as a Qwen2-family augmenting model has: a
byte-level BPE (the `tokenizers` library) learned from the task text with Qwen2's pre-tokenizer, saved as a
transformers tokenizer directory. Its vocabulary and ids are its own; it has no dummy prefix (a text's first word
reads otherwise than the same word after a space), a space before a number is a token of its own and digits are one
a token (``qzv - 47`` reads ``qzv \u0120- \u0120 4 7``), and the keys, frequent in the text, are whole tokens.
With ``prefix_space=True`` it reads a text that does not start with a space as if one preceded it (GPT-2's and
RoBERTa's ``add_prefix_space``; SentencePiece's dummy prefix does the same): a key reads one token wherever it stands
(``qzv - 47`` reads ``\u0120qzv \u0120- \u0120 4 7``).
"""
from __future__ import annotations

import io
from typing import Iterable

import sentencepiece as spm

from examples.kv_task.task import DIGITS, EQ, OPS

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
WB = "\u2581"
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")


def symbols(words: list[str]) -> list[str]:
    """The pieces in id order after the four special ones: every word with the word-boundary mark, then the
    digits without it (a number's second and later digits)."""
    return [WB + w for w in words] + list(DIGITS)


def char_symbols() -> list[str]:
    """The character tokenizer's pieces in id order after the four special ones: operators, digits and letters
    with the word-boundary mark, then the digits and letters without it."""
    return [WB + w for w in (*OPS, EQ, *DIGITS, *LETTERS)] + list(DIGITS) + list(LETTERS)


def letters_numbers_symbols() -> list[str]:
    """The letters-and-numbers tokenizer's pieces in id order after the four special ones: operators, the numbers
    0-999 and letters with the word-boundary mark, then the numbers and letters without it (the longest piece
    wins, so a number reads in chunks of three digits)."""
    numbers = [str(n) for n in range(1000)]
    return [WB + w for w in (*OPS, EQ, *numbers, *LETTERS)] + numbers + list(LETTERS)


def train_tokenizer(words: list[str], text: Iterable[str], model_prefix: str | None = None) -> bytes:
    """Train on the task text; returns the serialized model (also written to ``model_prefix.model``)."""
    return _train(symbols(words), text, model_prefix)


def train_char_tokenizer(text: Iterable[str], model_prefix: str | None = None) -> bytes:
    """The augmenting side's tokenizer of ``make demo-xtok`` (:func:`char_symbols`), trained on the task text;
    returns the serialized model (also written to ``model_prefix.model``)."""
    return _train(char_symbols(), text, model_prefix)


def train_letters_numbers_tokenizer(text: Iterable[str], model_prefix: str | None = None) -> bytes:
    """The augmenting side's tokenizer with whole numbers (:func:`letters_numbers_symbols`), trained on the task
    text; returns the serialized model (also written to ``model_prefix.model``)."""
    return _train(letters_numbers_symbols(), text, model_prefix)


# Qwen2's pre-tokenizer (its tokenizer.json): letters runs with one leading non-letter, digits one at a time,
# punctuation runs with one leading space, whitespace.
QWEN2_PRE_TOKENIZER = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                       r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
BPE_SPECIAL = ("<pad>", "<s>", "</s>")


def train_bpe_tokenizer(text: Iterable[str], vocab_size: int = 8192, prefix_space: bool = False) -> str:
    """The byte-level BPE tokenizer (module docstring) learned from ``text``, serialized (tokenizer.json). The
    `tokenizers` trainer is deterministic: the same text gives the same bytes. ``prefix_space``: a space goes before
    every text that does not start with one, by the normalizer, so each token's offsets still point into the text as
    given (the added space maps to the first character)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    if prefix_space:  # ByteLevel's own add_prefix_space would act on each piece the Split cuts, each digit included
        bpe.normalizer = normalizers.Sequence([normalizers.Prepend(" "), normalizers.Replace(Regex("^  "), " ")])
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRE_TOKENIZER), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, special_tokens=list(BPE_SPECIAL), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return bpe.to_str()


def save_bpe_tokenizer(serialized: str, out_dir: str) -> None:
    """A transformers tokenizer directory (tokenizer.json and its config) of :func:`train_bpe_tokenizer`'s
    tokenizer: pad, bos and eos are its three special tokens."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    pad, bos, eos = BPE_SPECIAL
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(serialized), pad_token=pad, bos_token=bos,
                            eos_token=eos).save_pretrained(out_dir)


def _train(pieces: list[str], text: Iterable[str], model_prefix: str | None) -> bytes:
    buf = io.BytesIO()
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


def load_tokenizer(path: str | None = None, model_proto: bytes | None = None) -> spm.SentencePieceProcessor:
    if model_proto is not None:
        return spm.SentencePieceProcessor(model_proto=model_proto)
    return spm.SentencePieceProcessor(model_file=path)
