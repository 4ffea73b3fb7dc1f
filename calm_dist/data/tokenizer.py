"""One tokenizer for every model: a SentencePiece model file or a transformers tokenizer directory, behind one
small interface, and the token ids of a prompt and a completion as training and evaluation both use them.

sentencepiece and transformers are imported where they are used: preflight imports this module."""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path


from calm_dist.config import ConfigError


class Tokenizer:
    """A SentencePiece model file or a transformers tokenizer directory, behind one small interface."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_file() and self.path.suffix == ".model":
            import sentencepiece as spm

            if self.path.stat().st_size == 0:
                raise ConfigError(f"data.tokenizer: {path} is an empty file")
            with _named_load_failure(path, "a SentencePiece model"):
                self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
            self.vocab_size = self._sp.get_piece_size()
            ids = (self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id())
            self.bos_id, self.eos_id, self.pad_id = (i if i >= 0 else None for i in ids)
        elif self.path.is_dir():
            from transformers import AutoTokenizer

            if not any(self.path.iterdir()):
                raise ConfigError(f"data.tokenizer: {path} is an empty directory")
            with _named_load_failure(path, "a tokenizer"):
                self._hf = AutoTokenizer.from_pretrained(str(self.path), trust_remote_code=False)
            self._sp = None
            self.vocab_size = len(self._hf)
            self.bos_id, self.eos_id, self.pad_id = self._hf.bos_token_id, self._hf.eos_token_id, self._hf.pad_token_id
        else:
            raise ConfigError(f"data.tokenizer: {path} is neither a SentencePiece .model file nor a tokenizer "
                              "directory")
        if self.pad_id is None:
            self.pad_id = self.eos_id if self.eos_id is not None else 0

    def encode(self, text: str) -> list[int]:
        if self._sp is not None:
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False)

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

    def fingerprint(self) -> str:
        """A hash of the tokenizer's file names and bytes: the same files in another directory, the same value."""
        files = [self.path] if self.path.is_file() else sorted(p for p in self.path.iterdir() if p.is_file())
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode())
            h.update(f.read_bytes())
        return h.hexdigest()[:16]


class BackendTokenizer:
    """encode_batch of a fast tokenizer through `tokenizers` alone, from Tokenizer.backend_json(): prepare's workers
    use it because importing transformers costs each worker process ~2.5 s, this ~0.1 s. The ids are those of
    Tokenizer.encode_batch (transformers calls the same backend); prepare checks that on a sample first."""

    def __init__(self, backend_file: str | Path, bos_id: int | None, eos_id: int | None):
        import tokenizers

        self._tok = tokenizers.Tokenizer.from_file(str(backend_file))
        self._tok.no_truncation()
        self._tok.no_padding()
        self.bos_id, self.eos_id = bos_id, eos_id

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]


@contextlib.contextmanager
def _named_load_failure(path, what: str):
    """A tokenizer file the library cannot parse becomes one line naming the path, not a library traceback."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"data.tokenizer: cannot load {what} from {path}: {first}") from None


def check_tokenizer_matches(tokenizer: Tokenizer, model_config, who: str) -> None:
    """The tokenizer must fit the model's embedding table and agree on the special ids."""
    problems = []
    if tokenizer.vocab_size > model_config.vocab_size:
        problems.append(f"tokenizer has {tokenizer.vocab_size} tokens, the model's vocabulary "
                        f"{model_config.vocab_size}")
    for name in ("bos", "eos"):
        ours, theirs = getattr(tokenizer, f"{name}_id"), getattr(model_config, f"{name}_token_id", None)
        if ours is not None and theirs is not None and ours != theirs:
            problems.append(f"{name} id {ours} in the tokenizer, {theirs} in the model")
    if problems:
        raise ConfigError(f"data.tokenizer does not match the {who}: {'; '.join(problems)}")


def prompt_ids(tok: Tokenizer, prompt: str) -> list[int]:
    """A prompt as training and evaluation feed it: bos (when the tokenizer has one), then its tokens."""
    return ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(prompt)


def completion_ids(tok: Tokenizer, completion: str) -> list[int]:
    """A completion as training labels it and exact match requires it: its tokens, then eos."""
    return tok.encode(completion) + ([tok.eos_id] if tok.eos_id is not None else [])
