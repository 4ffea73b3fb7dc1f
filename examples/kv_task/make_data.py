#!/usr/bin/env python
"""Build the key-value task of CALM at tiny scale: keys, data sets (JSONL) and the shared tokenizer.

    python -m examples.kv_task.make_data --out artifacts/kv_task [--seed 0] [--n-keys 1000] [--n-values 100]
        [--dc-frac 0.2] [--val-frac 0.1] [--n-dc-train 20000] [--n-kv-sub-train 20000] [--n-eval 500] [--force]
        [--augmenting-tokenizers]

Writes into --out:
    manifest.json              settings, file list with sha256, vocabulary size and special ids
    keys.json                  key -> value, the D_C, validation and test (held-out) keys
    tokenizer.model            SentencePiece (BPE; every key and operator is one token, numbers one digit a token)
    data/arith_train.jsonl     numeric arithmetic, the whole table (anchor pretraining; the composition's replay)
    data/kv_facts.jsonl        "key" -> "value" for every key (augmenting pretraining)
    data/kv_sub_train.jsonl    KV-substitution over all keys (augmenting pretraining)
    data/dc_kv_arith.jsonl     the composition data D_C: KV-arithmetic over the D_C keys only (<= 20% of the keys)
    data/val_kv_arith.jsonl    KV-arithmetic, both keys validation keys: every design choice is made here
    data/val_kv_sub.jsonl      KV-substitution, same expressions: the augmenting model's recipe is chosen here
    data/eval_kv_arith_heldout.jsonl  KV-arithmetic, both keys test keys (the headline metric, scored once a run)
    data/eval_kv_sub_heldout.jsonl    KV-substitution, same expressions
    data/eval_kv_arith_dc_keys.jsonl  KV-arithmetic over D_C keys, expressions not in D_C
    data/eval_arith.jsonl             numeric arithmetic (a sample of the table)
With --augmenting-tokenizers (alias --char-tokenizer), also the augmenting models' own tokenizers of `make
demo-xtok`, not in the manifest, each rewritten only when it changes:
    tokenizer_bpe/             a byte-level BPE with Qwen2's pre-tokenizer, a transformers tokenizer directory (keys
                               whole tokens, digits one a token, a space before a number a token of its own)
    tokenizer_bpe_prefix_space/  the same, learned with a space before each text (GPT-2's add_prefix_space): a key
                               reads one token first in a text and after a space
    tokenizer_chars.model      keys read one letter a token
    tokenizer_letters_numbers.model  keys one letter a token, numbers of up to three digits one token

Reruns with the same settings reuse the files (checked against the manifest's hashes); --force rebuilds.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time


from examples.kv_task import task as T
from examples.kv_task import tokenizer as tok

MANIFEST = "manifest.json"
FORMAT_VERSION = 3
CHAR_TOKENIZER = "tokenizer_chars.model"
LETTERS_NUMBERS_TOKENIZER = "tokenizer_letters_numbers.model"
BPE_TOKENIZER = "tokenizer_bpe"
BPE_PREFIX_SPACE_TOKENIZER = "tokenizer_bpe_prefix_space"
AUGMENTING_TOKENIZERS = {  # kind: (file, trainer, its pieces in id order)
    "chars": (CHAR_TOKENIZER, tok.train_char_tokenizer, tok.char_symbols),
    "letters_numbers": (LETTERS_NUMBERS_TOKENIZER, tok.train_letters_numbers_tokenizer, tok.letters_numbers_symbols),
}
TOKENIZER_TEXT = ("arith_train", "kv_sub_train", "kv_facts", "dc_kv_arith")  # the sets both tokenizers learn from


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_jsonl(path: str, records: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r, separators=(", ", ": ")) + "\n")
    os.replace(tmp, path)


def is_current(out: str, settings: T.TaskSettings) -> bool:
    """True when ``out`` holds a complete build for these settings (every file present, hashes match)."""
    path = os.path.join(out, MANIFEST)
    if not os.path.exists(path):
        return False
    try:
        with open(path) as f:
            man = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    if man.get("settings") != settings.to_dict() or man.get("format_version") != FORMAT_VERSION:
        return False
    for rel, sha in man.get("files", {}).items():
        p = os.path.join(out, rel)
        if not os.path.exists(p) or file_sha256(p) != sha:
            return False
    return True


def build(out: str, settings: T.TaskSettings, force: bool = False, verbose: bool = True) -> dict:
    """Build (or reuse) the task in ``out``; returns the manifest."""
    if not force and is_current(out, settings):
        if verbose:
            print(f"[make_kv_task] reusing {out} (same settings)")
        with open(os.path.join(out, MANIFEST)) as f:
            return json.load(f)
    t0 = time.time()
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    man_path = os.path.join(out, MANIFEST)
    if os.path.exists(man_path):
        os.remove(man_path)  # a half-written build must never look current
    ks = T.make_keys(settings)
    sets = T.build_datasets(settings, ks)
    files: dict[str, str] = {}
    with open(os.path.join(out, "keys.json.tmp"), "w") as f:
        json.dump(ks.to_dict(), f, indent=0)
    os.replace(os.path.join(out, "keys.json.tmp"), os.path.join(out, "keys.json"))
    files["keys.json"] = ""
    for name, recs in sets.items():
        rel = f"data/{name}.jsonl"
        _write_jsonl(os.path.join(out, rel), recs)
        files[rel] = ""
    words = T.vocabulary_words(ks)
    text = [t for name in TOKENIZER_TEXT for t in T.record_text(sets[name])]
    tok.train_tokenizer(words, text, model_prefix=os.path.join(out, "tokenizer"))
    files["tokenizer.model"] = ""
    sp = tok.load_tokenizer(os.path.join(out, "tokenizer.model"))
    check_piece_ids(sp, tok.symbols(words), "tokenizer")
    for i, word in enumerate(words):  # each word alone reads as its marked piece
        if sp.encode(word) != [4 + i]:
            raise RuntimeError(f"tokenizer: word {word!r} reads {sp.encode(word)}, expected [{4 + i}]")
    for rel in files:
        files[rel] = file_sha256(os.path.join(out, rel))
    man = {
        "format_version": FORMAT_VERSION,
        "settings": settings.to_dict(),
        "files": files,
        "vocab_size": sp.get_piece_size(),
        "special_ids": {"pad": tok.PAD_ID, "unk": tok.UNK_ID, "bos": tok.BOS_ID, "eos": tok.EOS_ID},
        "counts": {name: len(recs) for name, recs in sets.items()},
        "n_dc_keys": len(ks.dc_keys), "n_val_keys": len(ks.val_keys), "n_heldout_keys": len(ks.heldout_keys),
        "sequence_format": "<s> prompt completion </s>; loss on completion and </s>; keys and operators one "
                           "token, numbers one digit a token",
    }
    with open(man_path + ".tmp", "w") as f:
        json.dump(man, f, indent=1)
    os.replace(man_path + ".tmp", man_path)
    if verbose:
        print(f"[make_kv_task] wrote {out} in {time.time() - t0:.1f}s: vocab {man['vocab_size']}, "
              f"{len(ks.dc_keys)}/{len(ks.val_keys)}/{len(ks.heldout_keys)} D_C/validation/test keys, " +
              ", ".join(f"{k}={v}" for k, v in man["counts"].items()))
    return man


def check_piece_ids(sp, pieces: list[str], what: str) -> None:
    """Every piece has the id its position promises (after the four special ones), and there is no other."""
    for i, piece in enumerate(pieces):
        if sp.piece_to_id(piece) != 4 + i:
            raise RuntimeError(f"{what}: piece {piece!r} has id {sp.piece_to_id(piece)}, expected {4 + i}")
    if sp.get_piece_size() != 4 + len(pieces):
        raise RuntimeError(f"{what}: {sp.get_piece_size()} pieces, expected {4 + len(pieces)}")


def _training_text(out: str) -> list[str]:
    """The text both tokenizers are trained on (TOKENIZER_TEXT), read back from a build."""
    def read(name):
        with open(os.path.join(out, "data", name + ".jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]
    return [t for name in TOKENIZER_TEXT for t in T.record_text(read(name))]


def write_augmenting_tokenizer(out: str, verbose: bool = True, kind: str = "chars",
                               text: list[str] | None = None) -> str:
    """Train an augmenting tokenizer of ``make demo-xtok`` (AUGMENTING_TOKENIZERS: ``chars``, letters and digits one
    a token; ``letters_numbers``, numbers of up to three digits one a token) on the build in ``out`` (its
    ``_training_text``, unless given) and write it there unless that file already holds the same bytes; returns its
    path."""
    name, train, pieces = AUGMENTING_TOKENIZERS[kind]
    path = os.path.join(out, name)
    proto = train(_training_text(out) if text is None else text)
    if os.path.exists(path) and open(path, "rb").read() == proto:
        if verbose:
            print(f"[make_kv_task] reusing {path} (same bytes)")
        return path
    check_piece_ids(tok.load_tokenizer(model_proto=proto), pieces(), f"{kind} tokenizer")
    with open(path + ".tmp", "wb") as f:
        f.write(proto)
    os.replace(path + ".tmp", path)
    if verbose:
        print(f"[make_kv_task] wrote {path}: vocab {4 + len(pieces())}, keys read one letter a token")
    return path


def check_bpe_tokenizer(tokenizer, keys: list[str], prefix_space: bool = False) -> None:
    """Every key reads one token, first in a text and after a space (with ``prefix_space``, the same one), and a
    number one digit a token."""
    for key in keys:
        for text in (key, " " + key):
            if len(tokenizer.encode(text)) != 1:
                raise RuntimeError(f"bpe tokenizer: {text!r} reads {len(tokenizer.encode(text))} tokens, expected 1")
        if prefix_space and tokenizer.encode(key) != tokenizer.encode(" " + key):
            raise RuntimeError(f"bpe tokenizer: {key!r} reads otherwise first in a text than after a space")
    if len(tokenizer.encode("1234")) != 4 + prefix_space:  # the space it puts before the text, then the digits
        raise RuntimeError("bpe tokenizer: '1234' does not read one digit a token")


def write_bpe_tokenizer(out: str, verbose: bool = True, text: list[str] | None = None,
                        prefix_space: bool = False) -> str:
    """Learn the byte-level BPE augmenting tokenizer (``tok.train_bpe_tokenizer``) from the build in ``out`` and
    write it to ``out/tokenizer_bpe`` (``out/tokenizer_bpe_prefix_space`` with ``prefix_space``) unless the
    tokenizer.json there reads the same (``_same_tokenizer_json``); returns its path.
    The directory is replaced whole, never left half written."""
    from calm_dist.data.tokenizer import Tokenizer

    path = os.path.join(out, BPE_PREFIX_SPACE_TOKENIZER if prefix_space else BPE_TOKENIZER)
    serialized = tok.train_bpe_tokenizer(_training_text(out) if text is None else text, prefix_space=prefix_space)
    current = os.path.join(path, "tokenizer.json")
    if os.path.exists(current) and _same_tokenizer_json(current, serialized):
        if verbose:
            print(f"[make_kv_task] reusing {path} (same tokenizer)")
        return path
    staging, old = path + ".tmp", path + ".old"
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tok.save_bpe_tokenizer(serialized, staging)
    with open(os.path.join(out, "keys.json")) as f:
        check_bpe_tokenizer(Tokenizer(staging, "bpe tokenizer"), list(json.load(f)["value"]), prefix_space)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)
    if verbose:
        print(f"[make_kv_task] wrote {path}: a byte-level BPE, keys one token each"
              + (", a space before each text" if prefix_space else ""))
    return path


def _same_tokenizer_json(path: str, serialized: str) -> bool:
    """Whether the saved tokenizer.json reads as the serialized tokenizer: the same vocabulary, merges, special
    tokens and pre-tokenizer (transformers adds a post-processor when it saves, so the file is not byte-equal)."""
    with open(path) as f:
        saved, new = json.load(f), json.loads(serialized)
    return all(saved.get(k) == new.get(k) for k in ("model", "added_tokens", "normalizer", "pre_tokenizer", "decoder"))


def settings_from_args(a: argparse.Namespace) -> T.TaskSettings:
    return T.TaskSettings(seed=a.seed, n_keys=a.n_keys, n_values=a.n_values, dc_frac=a.dc_frac,
                          val_frac=a.val_frac, n_dc_train=a.n_dc_train, n_kv_sub_train=a.n_kv_sub_train,
                          n_eval=a.n_eval)


def parser() -> argparse.ArgumentParser:
    d = T.TaskSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--n-keys", type=int, default=d.n_keys)
    p.add_argument("--n-values", type=int, default=d.n_values,
                   help="values are 0..N-1; n-keys must be a multiple")
    p.add_argument("--dc-frac", type=float, default=d.dc_frac, help="fraction of keys D_C may use (<= 0.2)")
    p.add_argument("--val-frac", type=float, default=d.val_frac, help="fraction of keys for validation")
    p.add_argument("--n-dc-train", type=int, default=d.n_dc_train)
    p.add_argument("--n-kv-sub-train", type=int, default=d.n_kv_sub_train)
    p.add_argument("--n-eval", type=int, default=d.n_eval)
    p.add_argument("--force", action="store_true", help="rebuild even when --out is current")
    p.add_argument("--augmenting-tokenizers", "--char-tokenizer", dest="augmenting_tokenizers", action="store_true",
                   help=f"also write {CHAR_TOKENIZER}, {LETTERS_NUMBERS_TOKENIZER}, {BPE_TOKENIZER}/ and "
                        f"{BPE_PREFIX_SPACE_TOKENIZER}/, the augmenting tokenizers of make demo-xtok")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    settings = settings_from_args(a)
    settings.validate()
    build(a.out, settings, force=a.force)
    if a.augmenting_tokenizers:
        text = _training_text(a.out)  # read once for the four
        for kind in AUGMENTING_TOKENIZERS:
            write_augmenting_tokenizer(a.out, kind=kind, text=text)
        write_bpe_tokenizer(a.out, text=text)
        write_bpe_tokenizer(a.out, text=text, prefix_space=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
