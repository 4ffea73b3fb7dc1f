#!/usr/bin/env python
"""How readable is each key's value in the augmenting model's states? A linear probe per layer and digit.

    python -m examples.kv_task.probe --task artifacts/kv_demo/task --model artifacts/kv_demo/models/base_seed0/aug
    python -m examples.kv_task.probe --task artifacts/kv_demo/task --tokenizer artifacts/kv_demo/task/tokenizer_bpe \
        --model artifacts/kv_demo/models/xtok_tokenizer_bpe_seed0/aug   # make demo-xtok's model, its own tokenizer
    (with tokenizer_chars.model and models/xtok_tokenizer_chars_seed0/aug: the key read letter by letter, at its last)

The composition can only carry to held-out keys what a mapping fit on the D_C keys reads off the augmenting
states at a key. This fits, on the D_C keys, a ridge-regularised linear read-out of each digit of the value (tens,
units) from the state at the key in a KV-arithmetic prompt, per layer, and scores it on the validation keys. A
digit the probe cannot read on validation keys is one the cross-attention blocks (linear in those states up to the
anchor's own layers) must guess from the anchor's side; docs/kv_task.md reports the figures."""
from __future__ import annotations

import argparse
import json
import sys

import torch
from transformers import AutoModelForCausalLM

from examples.kv_task.pretrain import Task

DIGITS = {"tens": lambda v: v // 10, "units": lambda v: v % 10}


def key_position(task: Task, template: str, key: str) -> tuple[list[int], int]:
    """(bos + the tokens of ``template`` with ``key`` in it, the index of the token that ends the key): the one
    token of the key, or its last letter when the tokenizer reads it letter by letter."""
    text = template.format(k=key)
    ids, spans = task.tokenizer.encode_with_spans(text)
    end = text.index(key) + len(key)
    return [task.tokenizer.bos_id] + list(ids), 1 + [e for _, e in spans].index(end)


@torch.no_grad()
def states_at_keys(model, task: Task, keys: list[str], template: str) -> list[torch.Tensor]:
    """Per layer (embeddings first), the state at each key, the key read in ``template`` (``{k}`` marks it)."""
    rows, at = zip(*(key_position(task, template, k) for k in keys))
    width = max(map(len, rows))  # keys of 3-5 letters read as rows of different lengths: padded on the right
    ids = torch.tensor([row + [task.tokenizer.pad_id] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    hidden = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    return [h[torch.arange(len(keys)), at] for h in hidden]


def ridge_probe(x_fit: torch.Tensor, y_fit: torch.Tensor, x_score: torch.Tensor, y_score: torch.Tensor,
                classes: int = 10, ridge: float = 1e-2) -> float:
    """Accuracy on the scored rows of a one-hot least-squares read-out (with bias) fit on the others."""
    def with_bias(x):
        return torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    X = with_bias(x_fit)
    W = torch.linalg.solve(X.T @ X + ridge * torch.eye(X.shape[1], dtype=torch.float64),
                           X.T @ torch.nn.functional.one_hot(y_fit, classes).double())
    return float(((with_bias(x_score) @ W).argmax(1) == y_score).double().mean())


def probe(task: Task, model, template: str) -> list[dict]:
    keys = task.keys
    value = keys["value"]
    fit, score = keys["dc_keys"], keys["val_keys"]
    # the other operand of the template is a D_C key, as in training
    template = template.replace("{other}", fit[0])
    h_fit, h_score = states_at_keys(model, task, fit, template), states_at_keys(model, task, score, template)
    out = []
    for layer, (a, b) in enumerate(zip(h_fit, h_score)):
        row = {"layer": layer}
        for name, digit in DIGITS.items():
            row[name] = ridge_probe(a, torch.tensor([digit(value[k]) for k in fit]),
                                    b, torch.tensor([digit(value[k]) for k in score]))
        out.append(row)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", required=True)
    p.add_argument("--model", required=True, help="the augmenting model's directory")
    p.add_argument("--tokenizer", help="the model's own tokenizer, a SentencePiece model or a tokenizer directory "
                                       "(default: the task's)")
    p.add_argument("--json", help="also write the figures here")
    a = p.parse_args(argv)
    task = Task(a.task) if a.tokenizer is None else Task(a.task).with_tokenizer(a.tokenizer)
    model = AutoModelForCausalLM.from_pretrained(a.model).eval()
    results = {}
    for where, template in (("first operand", "{k} + {other} ="), ("second operand", "{other} - {k} =")):
        results[where] = probe(task, model, template)
        for row in results[where]:
            print(f"{where:>14}, layer {row['layer']}: tens {100 * row['tens']:.0f}%, units {100 * row['units']:.0f}%")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
