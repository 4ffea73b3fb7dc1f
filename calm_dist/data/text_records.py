"""Records as models of different tokenizers read them (data.different_tokenizers): the anchor's token ids, each
with its character span in the record's text, fitted to both row lengths. Runs in prepare's workers (no torch).

A prompt/completion record's text is prompt + completion; the anchor reads bos (span (0, 0)), the prompt's tokens,
the completion's (their spans shifted past the prompt) and eos (span (len, len)): the ids tokenize_records gives,
so the loss is the same-tokenizer path's. A text record: bos, the text's tokens, eos.

Lengths: the anchor keeps at most data.seq_len tokens, and every anchor token kept reads an augmenting reading
(of the text up to its end, bos included) of at most data.augmenting_seq_len tokens: its positions must fit the
augmenting model. A prefix cut inside a word can read more tokens than the whole text (BPE splits the part word),
so the limit bounds the longest reading any anchor token reads, not only the whole text's. Over either,
data.overlong=error refuses the record naming its row; truncate drops the anchor's last tokens until both fit.
The text stored is cut at the end of the anchor's last token kept: nothing after it is read by any model.
"""
from __future__ import annotations

import itertools

from calm_dist.config import ConfigError, DataConfig
from calm_dist.model.completion_text import COMPLETION_DECODINGS, decoded_completion
from calm_dist.model.prefix_reading import read, windowed_readings

Span = tuple[int, int]


def record_field(record, name: str, where: str) -> str:
    """A record's string field, or a ConfigError naming the row (prepare's check of every record)."""
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: the record is a {type(record).__name__}, not an object")
    value = record.get(name)
    if not isinstance(value, str):
        problem = "is missing" if name not in record else f"is a {type(value).__name__}, not a string"
        raise ConfigError(f"{where}: field {name!r} {problem}")
    return value


def anchor_reading(record, where: str, data_cfg: DataConfig, tok) -> tuple[list[int], int, str, list[Span]]:
    """(ids, loss_start, text, spans) of one record, before any length is applied."""
    bos = [tok.bos_id] if tok.bos_id is not None else []
    eos = [tok.eos_id] if tok.eos_id is not None else []
    if data_cfg.format == "prompt_completion":
        prompt = record_field(record, data_cfg.prompt_field, where)
        completion = record_field(record, data_cfg.completion_field, where)
        if not completion:
            raise ConfigError(f"{where}: field {data_cfg.completion_field!r} is empty (nothing to learn)")
        p_ids, p_spans = tok.encode_with_spans(prompt)
        c_ids, c_spans = tok.encode_with_spans(completion)
        text = prompt + completion
        spans = [tuple(s) for s in p_spans] + [(s + len(prompt), e + len(prompt)) for s, e in c_spans]
        ids, loss_start = list(p_ids) + list(c_ids), len(bos) + len(p_ids)
    else:
        text = record_field(record, data_cfg.text_field, where)
        ids, spans = tok.encode_with_spans(text)
        ids, spans, loss_start = list(ids), [tuple(s) for s in spans], 0
    return (bos + ids + eos, loss_start, text,
            [(0, 0)] * len(bos) + spans + [(len(text), len(text))] * len(eos))


def fit(ids: list[int], text: str, spans: list[Span], where: str, data_cfg: DataConfig, augmenting: list
        ) -> tuple[int, str]:
    """(anchor tokens kept, the text they read): both readings within their lengths, or a ConfigError."""
    n = len(ids)
    if n == 0:
        return 0, ""
    if n > data_cfg.seq_len:
        if data_cfg.overlong == "error":
            raise ConfigError(f"{where} has {n} tokens, more than data.seq_len={data_cfg.seq_len} "
                              "(raise seq_len or set data.overlong=truncate)")
        n = data_cfg.seq_len
    limit = data_cfg.augmenting_len
    for i, tokenizer in enumerate(augmenting):
        lengths = augmenting_lengths(text, spans[:n], tokenizer)
        over = next((t for t, length in enumerate(lengths) if length > limit), None)
        if over is None:
            continue
        if data_cfg.overlong == "error":
            raise ConfigError(f"{where}: augmenting model {i}'s tokenizer reads {max(lengths)} tokens, more than "
                              f"data.augmenting_seq_len={limit} (raise it or set data.overlong=truncate)")
        n = over
    return n, text[:spans[n - 1][1]] if n else ""


def augmenting_lengths(text: str, spans: list[Span], tokenizer) -> list[int]:
    """For each anchor token, how many tokens the augmenting reading of the text up to its end holds (the
    windowed reading, prefix_reading.py), the longest so far: an anchor token reads its prefix's reading, which a
    cut in a word can make longer than a longer prefix's, and the positions of that reading must fit the row."""
    ends = [e for _, e in spans]
    if not ends:
        return []
    readings = windowed_readings(text[:ends[-1]], ends, tokenizer, read(tokenizer, text[:ends[-1]]))
    lengths = [readings[e].shared + len(readings[e].ids) for e in ends]
    return list(itertools.accumulate(lengths, max))


def tokenize_with_spans(batch: list[tuple[str, dict]], data_cfg: DataConfig, tok, augmenting: list
                        ) -> list[tuple[list[int], int, str, list[Span]]]:
    """(ids, loss_start, text, spans) of each (where, record), fitted to data.seq_len and augmenting_seq_len."""
    out = []
    for where, record in batch:
        ids, loss_start, text, spans = anchor_reading(record, where, data_cfg, tok)
        n, text = fit(ids, text, spans, where, data_cfg, augmenting)
        out.append((ids[:n], min(loss_start, n), text, spans[:n]))
    return out


def completion_decoding(records, data_cfg: DataConfig, tok) -> str:
    """Which of COMPLETION_DECODINGS gives back more of `records`' completions exactly from their ids (ties:
    "after_prompt"). Training reads a record's text as prompt + completion, and the anchor's ids do not always say
    what that text was (SentencePiece reads "-18" and " -18" alike, as "▁- 1 8"), so decoding across tokenizers
    rebuilds a completion's text the way the training records' texts read: the augmenting models then read in
    decoding the text they read in training."""
    hits = dict.fromkeys(COMPLETION_DECODINGS, 0)
    for record in records:
        prompt = record_field(record, data_cfg.prompt_field, "record")
        completion = record_field(record, data_cfg.completion_field, "record")
        bos = [tok.bos_id] if tok.bos_id is not None else []
        prompt_ids, completion_ids = bos + tok.encode(prompt), tok.encode(completion)
        for decoding in COMPLETION_DECODINGS:
            hits[decoding] += gives_back(tok, prompt_ids, completion_ids, decoding, completion)
    return max(COMPLETION_DECODINGS, key=lambda d: hits[d])  # max keeps the first of a tie


def gives_back(tok, prompt_ids: list[int], completion_ids: list[int], decoding: str, completion: str) -> bool:
    """Whether `decoding` rebuilds `completion` exactly from its ids; a tokenizer that rewrites the prompt's text
    when more ids follow (a clean-up of spaces before punctuation) gives nothing back, and raises nothing: this
    runs when training ends, before the export is written."""
    try:
        return decoded_completion(tok, prompt_ids, completion_ids, decoding) == completion
    except ValueError:
        return False


def training_completion_decoding(data_cfg: DataConfig, tok, sample: int = 1000) -> str:
    """completion_decoding over the first records of the training sources (`sample` in all, shared by their
    weights, as training's batches share them): O(1) in the corpus. A corpus of plain text has no completions: a
    text reads on ("after_prompt")."""
    from calm_dist.data.sources import open_source

    if data_cfg.format != "prompt_completion":
        return "after_prompt"
    sources = data_cfg.train_sources()
    records, total = [], sum(weight for _, _, weight in sources)
    for key, spec, weight in sources:
        wanted = max(1, round(sample * weight / total))
        for part in open_source(spec, key):
            taken = [record for _, record in part.records(0, wanted)]
            records += taken
            wanted -= len(taken)
            if wanted <= 0:
                break
    return completion_decoding(records, data_cfg, tok)
