"""The corpus of benchmarks/data_bench.py: a seeded synthetic text corpus (JSONL files of documents of 200-2,000
tokens, pseudo-words with Zipf frequencies) and the byte-level BPE tokenizer trained on it with `tokenizers`.
Built once under the benchmark's work directory and reused while CORPUS_VERSION and the settings match."""
from __future__ import annotations

import functools
import json
import os
import shutil
import time
from pathlib import Path

FILE_TOKENS = 2_500_000   # tokens per corpus file at scale 1
FILES_1X, FILES_10X = 8, 80
DOC_TOKENS = (200, 2000)  # document length in tokens (bos and eos included), uniform
VOCAB = 16_384
LEXICON_WORDS = 40_000
CORPUS_VERSION = 1        # bump when the generator changes: the cached corpus is rebuilt


def log(msg: str) -> None:
    print(f"[corpus] {msg}", flush=True)


@functools.lru_cache(maxsize=2)
def lexicon(seed: int):
    """LEXICON_WORDS distinct pseudo-words of 1-4 syllables and their Zipf-Mandelbrot probabilities."""
    import numpy as np

    rng = np.random.default_rng([seed, 0])
    onsets = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "th", "sh",
              "ch", "st", "tr", "br", "pl", "gr"]
    syllables = [o + v + c for o in onsets for v in ("a", "e", "i", "o", "u", "ai", "ou")
                 for c in ("", "", "n", "r", "s", "l", "t")]
    words, seen = [], set()
    while len(words) < LEXICON_WORDS:
        n = int(rng.choice([1, 2, 3, 4], p=[0.25, 0.4, 0.25, 0.1]))
        w = "".join(syllables[i] for i in rng.integers(0, len(syllables), n))
        if w and w not in seen:
            seen.add(w)
            words.append(w)
    p = 1.0 / (np.arange(LEXICON_WORDS) + 2.7) ** 1.05
    return words, p / p.sum()


def documents(words, probs, rng, n_words_each):
    """One text per entry of n_words_each: words drawn by probs, sentences of ~12 words ending in '.'"""
    import numpy as np

    plain = np.array(words, dtype=object)
    dotted = np.array([w + "." for w in words], dtype=object)
    cdf = np.cumsum(probs)
    cdf[-1] = 1.0
    total = int(sum(n_words_each))
    idx = np.searchsorted(cdf, rng.random(total), side="right")
    ends = rng.random(total) < 1 / 12
    tokens = np.where(ends, dotted[idx], plain[idx])
    out, pos = [], 0
    for n in n_words_each:
        out.append(" ".join(tokens[pos:pos + n].tolist()))
        pos += n
    return out


def build_tokenizer(work: Path, seed: int) -> tuple[Path, float, float]:
    """Train the BPE tokenizer on a sample of the corpus' language; returns (dir, tokens/word, bytes/token)."""
    tok_dir = work / "tokenizer"
    meta = work / "tokenizer.json"
    want = {"version": CORPUS_VERSION, "seed": seed, "vocab": VOCAB}
    if meta.exists() and json.loads(meta.read_text()).get("settings") == want and (tok_dir / "tokenizer.json").exists():
        m = json.loads(meta.read_text())
        return tok_dir, m["tokens_per_word"], m["bytes_per_token"]
    import numpy as np
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words, probs = lexicon(seed)
    rng = np.random.default_rng([seed, 1])
    sample = documents(words, probs, rng, [1000] * 4000)  # 4M words: every frequent word seen many times
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sample, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    fast.save_pretrained(str(tok_dir))
    probe = documents(words, probs, np.random.default_rng([seed, 2]), [1000] * 300)
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(probe))
    tpw, bpt = n_tokens / 300_000, sum(len(t.encode()) for t in probe) / n_tokens
    meta.write_text(json.dumps({"settings": want, "tokens_per_word": tpw, "bytes_per_token": bpt,
                                "vocab_size": tok.get_vocab_size()}, indent=1))
    return tok_dir, tpw, bpt


def write_corpus_file(path: Path, index: int, seed: int, scale: float, tpw: float) -> dict:
    """File `index` of the corpus: documents of DOC_TOKENS tokens (as planned from tokens/word) until the file
    holds FILE_TOKENS x scale planned tokens. A pure function of (seed, index, scale, tpw)."""
    import numpy as np

    words, probs = lexicon(seed)
    rng = np.random.default_rng([seed, 10, index])
    budget = int(FILE_TOKENS * scale)
    planned = []
    while budget > 0:
        t = int(rng.integers(DOC_TOKENS[0], DOC_TOKENS[1] + 1))
        planned.append(max(1, round((t - 2) / tpw)))  # bos + eos are two of the document's tokens
        budget -= t
    tmp = path.with_name(path.name + ".partial")
    size = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for s in range(0, len(planned), 500):
            chunk = "".join(json.dumps({"text": t}) + "\n" for t in documents(words, probs, rng, planned[s:s + 500]))
            f.write(chunk)
            size += len(chunk)
    os.replace(tmp, path)
    return {"docs": len(planned), "bytes": path.stat().st_size}


def build_corpus(work: Path, seed: int, scale: float, tpw: float, need_10x: bool) -> dict:
    """work/files/part-XXXXX.jsonl, and corpus_1x/ and corpus_10x/ of hard links to them."""
    files = work / "files"
    meta_path = work / "corpus.json"
    settings = {"version": CORPUS_VERSION, "seed": seed, "scale": scale, "tokens_per_word": round(tpw, 6)}
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("settings") != settings:
        shutil.rmtree(files, ignore_errors=True)
        for d in ("corpus_1x", "corpus_10x"):
            shutil.rmtree(work / d, ignore_errors=True)
        meta = {"settings": settings, "files": {}}
    files.mkdir(parents=True, exist_ok=True)
    n = FILES_10X if need_10x else FILES_1X
    t0 = time.perf_counter()
    for i in range(n):
        name = f"part-{i:05d}.jsonl"
        if name not in meta["files"] or not (files / name).exists():
            meta["files"][name] = write_corpus_file(files / name, i, seed, scale, tpw)
            meta_path.write_text(json.dumps(meta, indent=1))
            if i % 8 == 7:
                log(f"  corpus: {i + 1}/{n} files ({time.perf_counter() - t0:.0f} s)")
    for label, count in (("corpus_1x", FILES_1X), ("corpus_10x", FILES_10X if need_10x else 0)):
        d = work / label
        d.mkdir(exist_ok=True)
        for i in range(count):
            link = d / f"part-{i:05d}.jsonl"
            if not link.exists():
                os.link(files / link.name, link)
    return meta


def disk_needed(scale: float, bpt_text: float, need_10x: bool) -> int:
    """Bytes this run writes at most: the corpus files (1x files are shared by 10x), both prepared corpora, and
    the largest D2 variant alive at once (datasets' Arrow copy of the text and its token lists), + 20%."""
    t1 = 20e6 * scale
    t10 = 10 * t1 if need_10x else t1
    text = t10 * (bpt_text + 0.3)          # JSONL framing
    shards = (t10 + t1) * 2.1
    datasets_cache = t1 * (bpt_text + 4 + 2.1)
    return int(1.2 * (text + shards + datasets_cache) + (256 << 20))
