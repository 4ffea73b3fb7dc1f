"""Tokenizers: a SentencePiece model file or a transformers tokenizer directory behind one small interface; which
tokenizer each model has (the one saved with it, else data.tokenizer) and whether two share one vocabulary; the
token ids of a prompt and a completion as training and evaluation both use them.

sentencepiece and transformers are imported where they are used: preflight imports this module."""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from calm_dist.config import Config, ConfigError
from calm_dist.model.hub import has_tokenizer, local_path

# A model's weights, in a directory the tokenizer shares with them: no part of the tokenizer
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf", ".onnx",
                ".safetensors.index.json", ".bin.index.json")


class Tokenizer:
    """A SentencePiece model file or a transformers tokenizer directory, behind one small interface. `key` names
    where it came from in messages (data.tokenizer, or the model it was saved with)."""

    def __init__(self, path: str | Path, key: str = "data.tokenizer"):
        self.path, self.key = Path(path), key
        if self.path.is_file() and self.path.suffix == ".model":
            import sentencepiece as spm

            if self.path.stat().st_size == 0:
                raise ConfigError(f"{key}: {path} is an empty file")
            with _named_load_failure(path, "a SentencePiece model", key):
                self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
            self.vocab_size = self._sp.get_piece_size()
            ids = (self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id())
            self.bos_id, self.eos_id, self.pad_id = (i if i >= 0 else None for i in ids)
        elif self.path.is_dir():
            from transformers import AutoTokenizer

            if not any(self.path.iterdir()):
                raise ConfigError(f"{key}: {path} is an empty directory")
            with _named_load_failure(path, "a tokenizer", key):
                self._hf = AutoTokenizer.from_pretrained(str(self.path), trust_remote_code=False)
            self._sp = None
            self.vocab_size = len(self._hf)
            self.bos_id, self.eos_id, self.pad_id = self._hf.bos_token_id, self._hf.eos_token_id, self._hf.pad_token_id
        else:
            raise ConfigError(f"{key}: {path} is neither a SentencePiece .model file nor a tokenizer directory")
        if self.pad_id is None:
            self.pad_id = self.eos_id if self.eos_id is not None else 0

    def encode(self, text: str) -> list[int]:
        if self._sp is not None:
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False)

    def encode_with_spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """encode(text), and each token's character span (start, end) in `text`: what models of different tokenizers
        are aligned by (calm_dist/model/token_alignment.py). Refused for a slow transformers tokenizer, which
        reports no offsets."""
        if self._sp is not None:
            pieces = self._sp.encode(text, return_type="proto").pieces
            starts, ends = _characters_of_bytes(text)  # SentencePiece's offsets count UTF-8 bytes
            return [p.id for p in pieces], [(starts[p.begin], ends[p.end]) for p in pieces]
        if not getattr(self._hf, "is_fast", False):
            raise ConfigError(f"{self.key}: {self.path} is a slow tokenizer, which gives no character offsets; models "
                              "of different tokenizers are aligned by them: use a fast one (tokenizer.json)")
        out = self._hf(text, add_special_tokens=False, return_offsets_mapping=True)
        return out["input_ids"], [tuple(span) for span in out["offset_mapping"]]

    def encode_batch_with_spans(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """encode_with_spans of each text, a fast tokenizer's in one call into its Rust loop: the windowed
        alignment's short windows cost per call, not per character."""
        if self._sp is not None or not texts:
            return [self.encode_with_spans(text) for text in texts]
        if getattr(self, "_backend", None) is None:
            import tokenizers

            self.encode_with_spans("")  # a slow tokenizer is refused with its one line
            # the Rust tokenizer transformers calls, without its per-token Python conversion (~45% of the time)
            self._backend = tokenizers.Tokenizer.from_str(self.backend_json())
            self._backend.no_truncation()
            self._backend.no_padding()
        return [(e.ids, e.offsets) for e in self._backend.encode_batch(texts, add_special_tokens=False)]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() of each text, in one call into the library (its C++ / Rust loop, not Python's)."""
        if self._sp is not None:
            return self._sp.encode(texts)
        return self._hf(texts, add_special_tokens=False)["input_ids"]

    def backend_json(self) -> str | None:
        """The Rust tokenizer behind a transformers fast tokenizer, serialized as transformers configured it (added
        tokens, pre-tokenizer options); None for SentencePiece and slow tokenizers."""
        if self._sp is not None or not getattr(self._hf, "is_fast", False):
            return None
        return self._hf.backend_tokenizer.to_str()

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return self._sp.decode(ids) if self._sp is not None else self._hf.decode(ids, skip_special_tokens=True)

    def vocabulary(self) -> dict[str, int]:
        """token -> id, added tokens included."""
        if self._sp is not None:
            return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}
        return dict(self._hf.get_vocab())

    def vocabulary_hash(self) -> str:
        """A hash of the vocabulary (token -> id): two tokenizers give the same ids to the same tokens iff equal."""
        pairs = sorted(self.vocabulary().items(), key=lambda item: (item[1], item[0]))
        return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()[:16]

    def fingerprint(self) -> str:
        """A hash of the tokenizer's file names and bytes: the same files in another directory, the same value.
        Weights saved beside it (a model's directory) are no part of it, and are not read."""
        files = [self.path] if self.path.is_file() else sorted(
            p for p in self.path.iterdir() if p.is_file() and not p.name.endswith(WEIGHT_FILES))
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode())
            h.update(f.read_bytes())
        return h.hexdigest()[:16]


class BackendTokenizer:
    """encode_batch of a fast tokenizer through `tokenizers` alone, from Tokenizer.backend_json(): prepare's workers
    use it because importing transformers costs each worker process ~2.5 s, this ~0.1 s, and it encodes without
    the offsets transformers has the backend compute. The ids are those of
    Tokenizer.encode_batch (transformers calls the same backend); prepare checks that on a sample first."""

    def __init__(self, backend_file: str | Path, bos_id: int | None, eos_id: int | None):
        import tokenizers

        self._tok = tokenizers.Tokenizer.from_file(str(backend_file))
        self._tok.no_truncation()
        self._tok.no_padding()
        self.bos_id, self.eos_id = bos_id, eos_id
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets: ~15% less time, the same ids
        self._encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._encode(texts, add_special_tokens=False)]


def _characters_of_bytes(text: str) -> tuple[list[int], list[int]]:
    """For each UTF-8 byte offset of `text` (its length included), the character offset at or before it (a span's
    start) and at or after it (a span's end): a piece of a character's bytes covers the whole character."""
    starts, ends = [], []
    for i, char in enumerate(text):
        width = len(char.encode())
        starts += [i] * width
        ends += [i] + [i + 1] * (width - 1)
    return starts + [len(text)], ends + [len(text)]


@contextlib.contextmanager
def _named_load_failure(path, what: str, key: str):
    """A tokenizer file the library cannot parse becomes one line naming the path, not a library traceback."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key}: cannot load {what} from {path}: {first}") from None


def check_tokenizer_matches(tokenizer: Tokenizer, model_config, who: str) -> None:
    """The tokenizer must fit the model's embedding table (a larger, padded table is fine: no id reaches its extra
    rows) and agree with the model's config on bos and eos (Llama-3's configs list several eos ids)."""
    problems = []
    if tokenizer.vocab_size > model_config.vocab_size:
        problems.append(f"tokenizer has {tokenizer.vocab_size} tokens, the model's vocabulary (embedding table) "
                        f"{model_config.vocab_size}")
    for name in ("bos", "eos"):
        ours, theirs = getattr(tokenizer, f"{name}_id"), getattr(model_config, f"{name}_token_id", None)
        allowed = theirs if isinstance(theirs, (list, tuple)) else [theirs]
        if ours is not None and theirs is not None and ours not in allowed:
            problems.append(f"{name} id {ours} in the tokenizer, {theirs} in the model")
    if problems:
        raise ConfigError(f"{tokenizer.key} does not match the {who}: {'; '.join(problems)}")


def check_same_vocabulary(reference: Tokenizer, other: Tokenizer) -> None:
    """CALM feeds the same ids to every model: `other` must give every token the id `reference` gives it (compared
    by vocabulary_hash) and have the same bos and eos. Refused otherwise, naming the first differing token."""
    if reference.vocabulary_hash() != other.vocabulary_hash():
        ours = {i: t for t, i in reference.vocabulary().items()}
        theirs = {i: t for t, i in other.vocabulary().items()}
        first = next((i for i in sorted(ours.keys() | theirs.keys()) if ours.get(i) != theirs.get(i)), None)
        differs = (f"id {first} is {_token(ours.get(first))} in {reference.key}, {_token(theirs.get(first))} in "
                   f"{other.key}" if first is not None else "one id stands for several tokens")
        raise ConfigError(
            f"{other.key} ({other.path}) is another tokenizer than {reference.key} ({reference.path}): {differs} "
            f"({reference.vocab_size} and {other.vocab_size} tokens). CALM feeds the same token ids to every model: "
            "compose models of one tokenizer")
    problems = [f"{name} id {getattr(reference, f'{name}_id')} in {reference.key}, {getattr(other, f'{name}_id')} "
                f"in {other.key}" for name in ("bos", "eos")
                if getattr(reference, f"{name}_id") != getattr(other, f"{name}_id")]
    if problems:
        raise ConfigError(f"{other.key} has the vocabulary of {reference.key} but other special tokens: "
                          + "; ".join(problems))


def _token(token: str | None) -> str:
    return "absent" if token is None else repr(token)


def saved_tokenizer(name: str, revision: str | None, key: str) -> Tokenizer | None:
    """The tokenizer saved with a model (in its directory or hub repository), None when it was saved without one."""
    directory = local_path(name, revision, key, weights=False)
    return Tokenizer(directory, f"{key}'s tokenizer") if has_tokenizer(directory) else None


@dataclass
class ModelTokenizers:
    """Each model's tokenizer. `anchor` tokenizes the data: its ids go to every model."""

    anchor: Tokenizer
    augmenting: list[Tokenizer]
    anchor_saved: Tokenizer | None  # the anchor's own, when data.tokenizer stands in for it


def anchor_tokenizer(cfg: Config) -> Tokenizer:
    """The tokenizer the data is tokenized with: data.tokenizer when set, else the one saved with the anchor."""
    data, model = cfg.data, cfg.model
    if data.tokenizer:
        return Tokenizer(local_path(data.tokenizer, None, "data.tokenizer", weights=False), "data.tokenizer")
    if not model.anchor:
        raise ConfigError("data.tokenizer is not set, nor model.anchor, whose tokenizer it defaults to")
    tokenizer = saved_tokenizer(model.anchor, model.anchor_revision, "model.anchor")
    if tokenizer is None:
        raise ConfigError(f"model.anchor: {model.anchor} was saved without a tokenizer: set data.tokenizer")
    return tokenizer


def model_tokenizers(cfg: Config) -> ModelTokenizers:
    """Each model's tokenizer: the anchor's is anchor_tokenizer(cfg); an augmenting model's is its entry in
    data.augmenting_tokenizers, else the one saved with it, else (saved without one) the anchor's."""
    data, model = cfg.data, cfg.model
    anchor = anchor_tokenizer(cfg)
    anchor_saved = saved_tokenizer(model.anchor, model.anchor_revision, "model.anchor") if data.tokenizer else None
    revisions = model.augmenting_revisions or [None] * len(model.augmenting)
    explicit = data.augmenting_tokenizers or [None] * len(model.augmenting)
    augmenting = [augmenting_tokenizer(i, name, revision, given, anchor, "data.augmenting_tokenizers")
                  for i, (name, revision, given) in enumerate(zip(model.augmenting, revisions, explicit))]
    return ModelTokenizers(anchor, augmenting, anchor_saved)


def augmenting_tokenizer(i: int, name: str, revision: str | None, given: str | None, anchor: Tokenizer,
                         given_key: str) -> Tokenizer:
    """Augmenting model i's tokenizer: `given` (a path or hub id, from `given_key`), else the one saved with the
    model, else (saved without one) the anchor's."""
    if given:
        key = f"{given_key}[{i}]"
        return Tokenizer(local_path(given, None, key, weights=False), key)
    return saved_tokenizer(name, revision, f"model.augmenting[{i}]") or anchor


def prompt_ids(tok: Tokenizer, prompt: str) -> list[int]:
    """A prompt as training and evaluation feed it: bos (when the tokenizer has one), then its tokens."""
    return ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(prompt)


def completion_ids(tok: Tokenizer, completion: str) -> list[int]:
    """A completion as training labels it and exact match requires it: its tokens, then eos."""
    return tok.encode(completion) + ([tok.eos_id] if tok.eos_id is not None else [])


def whole_text_ids(tok: Tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """A prompt and its completion as a model reads the text `prompt + completion` whole, split where the prompt's
    characters end: bos and the tokens that end within the prompt, then the rest and eos. The reading an augmenting
    model gets across tokenizers, which may differ from prompt_ids + completion_ids: a byte-level BPE reads
    "A: " + "42" as "A", ":", " 42", a prefix-space or dummy-prefix tokenizer puts a space token before a
    completion read alone. A token across the cut belongs to the completion (lm-evaluation-harness moves a
    context's trailing space to its continuation for the same reason)."""
    ids, spans = tok.encode_with_spans(prompt + completion)
    cut = 0
    while cut < len(ids) and spans[cut][1] <= len(prompt):
        cut += 1
    return (([tok.bos_id] if tok.bos_id is not None else []) + ids[:cut],
            ids[cut:] + ([tok.eos_id] if tok.eos_id is not None else []))
