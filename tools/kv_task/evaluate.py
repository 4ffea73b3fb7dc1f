"""Greedy exact match on prompt/completion records, for any model whose ``forward(input_ids)`` returns
an object with ``.logits`` (a Hugging Face causal LM or a composed model)."""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Callable

import torch

from .tokenizer import BOS_ID, EOS_ID


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@torch.no_grad()
def greedy_complete(model: Callable, sp, prompts: list[str], max_new_tokens: int,
                    batch_size: int = 250) -> list[list[int]]:
    """Greedy continuation ids (up to and excluding ``</s>``) of each prompt. Prompts are grouped by
    token length, so no padding is needed (every prompt of this task has the same length anyway)."""
    enc = [[BOS_ID] + sp.encode(p) for p in prompts]
    groups: dict[int, list[int]] = defaultdict(list)
    for i, e in enumerate(enc):
        groups[len(e)].append(i)
    out: list[list[int]] = [[] for _ in prompts]
    for idx in groups.values():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            x = torch.tensor([enc[i] for i in chunk], dtype=torch.long)
            done = torch.zeros(len(chunk), dtype=torch.bool)
            gen = []
            for _ in range(max_new_tokens):
                logits = model(input_ids=x).logits[:, -1, :]
                nxt = logits.argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, EOS_ID), nxt)
                gen.append(nxt)
                done |= nxt == EOS_ID
                x = torch.cat([x, nxt[:, None]], dim=1)
                if bool(done.all()):
                    break
            g = torch.stack(gen, 1).tolist()
            for j, i in enumerate(chunk):
                seq = g[j]
                out[i] = seq[:seq.index(EOS_ID)] if EOS_ID in seq else seq
    return out


def exact_match(model: Callable, sp, records: list[dict], max_new_tokens: int | None = None,
                batch_size: int = 250) -> float:
    """Fraction of records whose greedy completion equals the reference completion (token-exact,
    ``</s>`` required within ``max_new_tokens``)."""
    if not records:
        return float("nan")
    refs = [sp.encode(r["completion"]) for r in records]
    n_new = max_new_tokens or (max(len(r) for r in refs) + 1)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        gens = greedy_complete(model, sp, [r["prompt"] for r in records], n_new, batch_size)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    # a completion counts only when the model also stopped: the reference plus </s> within budget
    ok = 0
    for g, ref in zip(gens, refs):
        ok += int(g == ref and len(g) < n_new)
    return ok / len(records)


@torch.no_grad()
def next_token_accuracy(model: Callable, sp, records: list[dict], batch_size: int = 500) -> float:
    """Fraction of records whose first completion token is the model's greedy next token after
    ``<s> prompt`` (e.g. a key's value right after the key)."""
    if not records:
        return float("nan")
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    enc = [[BOS_ID] + sp.encode(r["prompt"]) for r in records]
    tgt = [sp.encode(r["completion"])[0] for r in records]
    groups: dict[int, list[int]] = defaultdict(list)
    for i, e in enumerate(enc):
        groups[len(e)].append(i)
    ok = 0
    try:
        for idx in groups.values():
            for s in range(0, len(idx), batch_size):
                chunk = idx[s:s + batch_size]
                x = torch.tensor([enc[i] for i in chunk], dtype=torch.long)
                pred = model(input_ids=x).logits[:, -1, :].argmax(-1).tolist()
                ok += sum(int(p == tgt[i]) for p, i in zip(pred, chunk))
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return ok / len(records)
