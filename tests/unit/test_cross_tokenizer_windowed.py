"""The windowed alignment (calm_dist/model/prefix_reading.py) against the reference that reads every prefix whole:
the same AugmentingInputs, field for field, on many random texts (corpus words shuffled, with characters that
merge across the cuts dropped in), for the tokenizer pairs of test_cross_tokenizer.py and the reverse pairs (a
SentencePiece augmenting side, whose dummy prefix makes a window's first token read otherwise, and a BPE over a
Metaspace pre-tokenizer as Llama-2's fast tokenizer is, "▁" put before the text's first word only); and a window
costs a few tokens of text, not the prefix."""
import random

import pytest
import torch

from calm_dist.model.prefix_reading import windowed_readings
from calm_dist.model.token_alignment import align, read, read_batch
from tests.helpers.tokenizers import CORPUS, SPECIALS, byte_level_bpe, sentencepiece, word_level

PAIRS = [("small_bpe", "word"), ("sentencepiece", "bpe"), ("bpe", "sentencepiece"), ("word", "small_bpe"),
         ("metaspace", "word"), ("sentencepiece", "metaspace"), ("bpe", "metaspace")]
NOISE = ["ab", "a", "  ", "ü", "=", "x", "eta", ":", "", "\n"]


def metaspace_bpe(directory):
    """A BPE over Llama-2's fast pre-tokenizer: spaces become "▁", and one is put before the text's first word."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from calm_dist.data.tokenizer import Tokenizer

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=SPECIALS, show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(directory)
    return Tokenizer(directory)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizers")
    return {"word": word_level(d / "word"), "bpe": byte_level_bpe(d / "bpe", 250),
            "small_bpe": byte_level_bpe(d / "small_bpe", 60), "sentencepiece": sentencepiece(d / "sp.model", 40),
            "metaspace": metaspace_bpe(d / "metaspace")}


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = " ".join(CORPUS).split(" ")
    texts = []
    for _ in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 40)))
        for _ in range(rng.randint(0, 3)):
            at = rng.randrange(len(text) + 1)
            text = text[:at] + rng.choice(NOISE) + text[at:]
        texts.append(text)
    return texts


def assert_same_inputs(got, want):
    for field in want.__dataclass_fields__:
        assert torch.equal(getattr(got, field), getattr(want, field)), field


@pytest.mark.parametrize("anchor,augmenting", PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_the_windowed_alignment_is_the_reference_on_random_texts(tokenizers, anchor, augmenting):
    atok, gtok = tokenizers[anchor], tokenizers[augmenting]
    texts = random_texts(150, seed=len(anchor) * 31 + len(augmenting))
    ids, mask, spans = read_batch(texts, atok, padding_side="left")
    reference = align(texts, spans, mask, gtok, padding_side="left", window=None)
    assert_same_inputs(align(texts, spans, mask, gtok, padding_side="left"), reference)
    assert_same_inputs(align(texts, spans, mask, gtok, padding_side="left", window=2), reference)  # the least


@pytest.mark.parametrize("augmenting", ["word", "small_bpe", "sentencepiece", "metaspace"])
def test_every_cut_of_a_text_reads_as_the_whole_prefix_does(tokenizers, augmenting):
    """Every character of a text as a cut (not only the anchor's token ends): the prefixes whose reading departs
    from the whole text's (merges across the cut) are read as the reference reads them, through windows that do
    not start at the text's beginning."""
    gtok = tokenizers[augmenting]
    departing = 0
    for text in random_texts(12, seed=5):
        whole = read(gtok, text)
        readings = windowed_readings(text, list(range(len(text) + 1)), gtok, whole, window=4)
        for end, got in readings.items():
            want = read(gtok, text[:end])
            assert (whole[0][:got.shared] + got.ids, whole[1][:got.shared] + got.spans) == want, (text, end)
            departing += want[0] != whole[0][:len(want[0])] and got.shared > 0
    assert departing > 20, departing


class Counting:
    """A tokenizer that counts the characters it is asked to read."""

    def __init__(self, tokenizer):
        self.tokenizer, self.bos_id, self.characters = tokenizer, tokenizer.bos_id, 0

    def encode_with_spans(self, text):
        self.characters += len(text)
        return self.tokenizer.encode_with_spans(text)


@pytest.mark.parametrize("augmenting", ["word", "sentencepiece"])
def test_a_window_reads_a_few_tokens_of_text_not_the_prefix(tokenizers, augmenting):
    """A long text (~2,000 characters): the windows read under 100 characters per cut on average, where the
    reference reads the prefix (~1,000 on average)."""
    atok, gtok = tokenizers["small_bpe"], Counting(tokenizers[augmenting])
    text = " ".join(CORPUS[:60])
    ids, mask, spans = read_batch([text], atok)
    cuts = len(set(spans[0, :, 1].tolist()))
    align([text], spans, mask, gtok)
    windowed, gtok.characters = gtok.characters, 0
    align([text], spans, mask, gtok, window=None)
    assert windowed / cuts < 100 < gtok.characters / cuts, (windowed / cuts, gtok.characters / cuts)
