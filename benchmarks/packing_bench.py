#!/usr/bin/env python
"""Packed rows against unpacked rows at equal real tokens (issue #17), measured side by side in one run.

    python benchmarks/packing_bench.py [--json benchmarks/results/packing.json] [--repeats 5] [--device cpu]

One training step (forward and backward of the composition, AdamW on its blocks) over the same documents, three
ways:
  unpacked      each document its own row, right-padded to seq_len (calm_dist's rows without data.packing)
  packed        the documents back to back in full rows with position ids restarting at each document: every
                model and the cross-attention keep the documents apart (a block-diagonal causal mask)
  packed_leaky  the same rows without position ids: plain causal attention across documents, SDPA's is_causal
                path; what packing cost before the documents were kept apart, and so the mask's price

The documents are seeded, log-uniform in length between 16 and seq_len tokens (a pretraining-like spread). The
packed rows are cut from their concatenation, and the unpacked variant's documents are the pieces of the packed
rows (each maximal run of one document within a row), so both compute the same real tokens with the same
attention; the script checks that their summed losses agree. Models: the `--size` of benchmarks/common.py (a
Llama anchor and a Llama augmenting model, random weights: speed only).

Ratios (CPU time on a CPU device, wall time with synchronisation on CUDA; medians over interleaved rounds):
  packed / unpacked       the padding the packing saves (goal: below 1; the real-token fraction of the unpacked
                          rows bounds it from below)
  packed / packed_leaky   the price of keeping the documents apart (goal: close to 1)
benchmarks/README.md ("Packing with document boundaries") has the results.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import common  # noqa: E402  (pins one thread per process before torch loads)
from machine import machine_info  # noqa: E402


def documents(n_tokens: int, seq_len: int, seed: int) -> list[int]:
    """Document lengths, log-uniform in [16, seq_len], until they hold n_tokens."""
    import numpy as np

    rng, lengths = np.random.default_rng(seed), []
    while sum(lengths) < n_tokens:
        lengths.append(int(np.exp(rng.uniform(np.log(16), np.log(seq_len)))))
    return lengths


def build_rows(lengths: list[int], seq_len: int, vocab: int, seed: int):
    """(packed input_ids, position_ids, labels) [R, seq_len] and the unpacked rows (input_ids, mask, labels) of
    the same pieces; the last partial packed row is dropped."""
    import torch

    from calm_dist.model.lm_loss import IGNORE

    g = torch.Generator().manual_seed(seed)
    stream = torch.randint(3, vocab, (sum(lengths),), generator=g)
    in_doc = torch.cat([torch.arange(n) for n in lengths])
    rows = len(stream) // seq_len
    ids = stream[:rows * seq_len].view(rows, seq_len)
    in_doc = in_doc[:rows * seq_len].view(rows, seq_len)
    positions = torch.empty_like(in_doc)  # restarting at each document and at the row's start
    for r in range(rows):
        start = 0
        for c in range(seq_len):
            if c == 0 or in_doc[r, c] == 0:
                start = c
            positions[r, c] = c - start
    labels = torch.where(positions > 0, ids, IGNORE)
    pieces = [(r, c0, c1) for r in range(rows) for c0, c1 in _runs(positions[r])]
    u_ids = torch.zeros(len(pieces), seq_len, dtype=torch.long)
    u_mask = torch.zeros_like(u_ids)
    u_labels = torch.full_like(u_ids, IGNORE)
    for k, (r, c0, c1) in enumerate(pieces):
        u_ids[k, :c1 - c0], u_mask[k, :c1 - c0] = ids[r, c0:c1], 1
        u_labels[k, :c1 - c0] = labels[r, c0:c1]
    return (ids, positions, labels), (u_ids, u_mask, u_labels)


def _runs(positions) -> list[tuple[int, int]]:
    """[start, stop) of each document within one packed row."""
    starts = [c for c in range(len(positions)) if int(positions[c]) == 0] + [len(positions)]
    return list(zip(starts[:-1], starts[1:]))


def step_fn(model, opt, micro_batches, device):
    """One optimizer step over the micro-batches (each a dict of forward arguments); returns the summed loss."""
    import torch

    def step():
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for mb in micro_batches:
            loss = model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in mb.items()},
                         loss_reduction="sum").loss
            loss.backward()
            total += loss.item()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return total
    return step


def chunks(tensors: dict, size: int) -> list[dict]:
    n = next(iter(tensors.values())).shape[0]
    return [{k: v[i:i + size] for k, v in tensors.items()} for i in range(0, n, size)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=str(HERE / "results" / "packing.json"))
    ap.add_argument("--size", default="quick", choices=sorted(common.SIZES))
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=8192, help="real tokens per step")
    ap.add_argument("--micro-batch", type=int, default=4, help="rows per forward")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    device = torch.device(args.device)
    size = common.SIZES[args.size]
    lengths = documents(args.tokens, args.seq_len, args.seed)
    (ids, positions, labels), (u_ids, u_mask, u_labels) = build_rows(lengths, args.seq_len, size.vocab, args.seed)
    model = common.build_composed(size, args.seed).to(device)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    with torch.no_grad():  # non-zero blocks, so the cross-attention's output matters to the loss
        for block in (b for blocks in model.blocks for b in blocks):
            block.o_proj.weight.normal_(0, 0.02)
    model.train()
    variants = {
        "unpacked": chunks({"input_ids": u_ids, "attention_mask": u_mask, "labels": u_labels}, args.micro_batch),
        "packed": chunks({"input_ids": ids, "position_ids": positions, "labels": labels}, args.micro_batch),
        "packed_leaky": chunks({"input_ids": ids, "labels": labels}, args.micro_batch),
    }
    # the same real tokens and attention: equal summed losses (before any optimizer step changes the blocks)
    with torch.no_grad():
        losses = {k: sum(model(**{n: t.to(device) for n, t in mb.items()}, loss_reduction="sum").loss.item()
                         for mb in v) for k, v in variants.items()}
    if abs(losses["packed"] - losses["unpacked"]) > 1e-3 * abs(losses["unpacked"]):
        print(f"packing_bench: packed loss {losses['packed']:.6f} != unpacked {losses['unpacked']:.6f}",
              file=sys.stderr)
        return 1
    fns = {k: step_fn(model, opt, v, device) for k, v in variants.items()}
    times = common.interleaved(fns, args.repeats)
    basis = "wall" if device.type == "cuda" else "cpu"  # CPU time would not see a device's work
    med = {k: common.median(t[basis]) for k, t in times.items()}
    real = int(u_mask.sum())
    result = {
        "command": "python benchmarks/packing_bench.py " + " ".join(sys.argv[1:]), "machine": machine_info(),
        "size": size.as_dict(), "seq_len": args.seq_len, "micro_batch": args.micro_batch, "device": str(device),
        "torch": torch.__version__, "basis": basis, "real_tokens": real, "documents": len(lengths),
        "rows": {"packed": int(ids.shape[0]), "unpacked": int(u_ids.shape[0])},
        "real_fraction_unpacked": real / u_ids.numel(), "summed_loss": losses,
        "times": {k: common.summary(t) for k, t in times.items()},
        "ratios": {"packed/unpacked": med["packed"] / med["unpacked"],
                   "packed/packed_leaky": med["packed"] / med["packed_leaky"]},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{real} real tokens in {ids.shape[0]} packed rows or {u_ids.shape[0]} unpacked rows "
          f"({100 * result['real_fraction_unpacked']:.0f}% of them real); median {basis} s: "
          + ", ".join(f"{k} {v:.3f}" for k, v in med.items()))
    print(", ".join(f"{k} {v:.3f}" for k, v in result["ratios"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
