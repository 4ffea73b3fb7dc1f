"""Greedy exact match and next-token accuracy on prompt/completion records, for any model whose
``forward(input_ids)`` returns an object with ``.logits`` (a Hugging Face causal LM or a composed model).

The tokenizer is calm_dist's (``calm_dist.data.tokenizer.Tokenizer``) and so is the scoring: prompts and references are
tokenized as training tokenizes them (``calm_dist.data.tokenizer.prompt_ids`` / ``completion_ids``) and a row counts
by ``calm_dist.task_eval.is_exact_match``, the definition ``calm-dist eval`` uses."""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Callable

import torch

from calm_dist.data.tokenizer import Tokenizer, completion_ids, prompt_ids, whole_text_ids
from calm_dist.task_eval import is_exact_match


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _by_length(rows: list[list[int]]) -> list[list[int]]:
    """Indices of the rows grouped by length: each group stacks into one tensor without padding."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[len(row)].append(i)
    return list(groups.values())


@torch.no_grad()
def greedy_complete(model: Callable, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int,
                    batch_size: int = 250) -> list[list[int]]:
    """Greedy continuation ids of each prompt, eos included; a row that has stopped is filled with eos
    (every prompt of this task has the same length, so grouping by length needs no padding)."""
    enc = [prompt_ids(tokenizer, p) for p in prompts]
    eos = tokenizer.eos_id
    out: list[list[int]] = [[] for _ in prompts]
    for idx in _by_length(enc):
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            x = torch.tensor([enc[i] for i in chunk], dtype=torch.long)
            done = torch.zeros(len(chunk), dtype=torch.bool)
            gen = []
            for _ in range(max_new_tokens):
                nxt = model(input_ids=x).logits[:, -1, :].argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                gen.append(nxt)
                done |= nxt == eos
                x = torch.cat([x, nxt[:, None]], dim=1)
                if bool(done.all()):
                    break
            for j, row in zip(chunk, torch.stack(gen, 1).tolist()):
                out[j] = row
    return out


def exact_match(model: Callable, tokenizer: Tokenizer, records: list[dict], max_new_tokens: int | None = None,
                batch_size: int = 250, whole_text: bool = False) -> float:
    """Fraction of records whose greedy continuation is the reference completion and then eos
    (``calm_dist.task_eval.is_exact_match``). ``whole_text``: the reference is the completion as the text
    ``prompt + completion`` reads it (``completion_as_read``), the reading a model trained on whole texts learned."""
    if not records:
        return float("nan")
    refs = [completion_as_read(tokenizer, r) if whole_text else completion_ids(tokenizer, r["completion"])
            for r in records]
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        gens = greedy_complete(model, tokenizer, [r["prompt"] for r in records],
                               max_new_tokens or max(map(len, refs)), batch_size)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return sum(is_exact_match(g, ref) for g, ref in zip(gens, refs)) / len(records)


@torch.no_grad()
def next_token_accuracy(model: Callable, tokenizer: Tokenizer, records: list[dict], batch_size: int = 500) -> float:
    """Fraction of records whose next token after ``<s> prompt`` is the model's greedy one (e.g. a key's value
    right after the key). The next token is the one the text ``prompt + completion`` reads after the prompt's
    tokens: a tokenizer that puts a space before each text it reads would read the completion alone with a space
    token first, which the text does not have."""
    if not records:
        return float("nan")
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    enc = [prompt_ids(tokenizer, r["prompt"]) for r in records]
    tgt = [completion_as_read(tokenizer, r)[0] for r in records]
    ok = 0
    try:
        for idx in _by_length(enc):
            for s in range(0, len(idx), batch_size):
                chunk = idx[s:s + batch_size]
                x = torch.tensor([enc[i] for i in chunk], dtype=torch.long)
                pred = model(input_ids=x).logits[:, -1, :].argmax(-1).tolist()
                ok += sum(int(p == tgt[i]) for p, i in zip(pred, chunk))
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return ok / len(records)


def completion_as_read(tokenizer: Tokenizer, record: dict) -> list[int]:
    """The tokens that the text ``prompt + completion`` reads after the prompt's own tokens, then eos: the
    completion as a model reads it when it is given the text whole (calm-dist's augmenting side across tokenizers,
    ``calm_dist.data.tokenizer.whole_text_ids``), which a tokenizer may read otherwise than the completion alone
    (SentencePiece's dummy prefix, a prefix space). The demo's tools decode from the prompt read alone, so the text
    must read it first."""
    prompt, completion = whole_text_ids(tokenizer, record["prompt"], record["completion"])
    own = completion[:-1] if tokenizer.eos_id is not None else completion
    if prompt != prompt_ids(tokenizer, record["prompt"]) or not own:
        raise ValueError(f"{record['prompt']!r} + {record['completion']!r}: the text does not read the prompt's "
                         "tokens and then more, so its completion has no tokens of its own")
    return completion

