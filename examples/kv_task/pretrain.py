#!/usr/bin/env python
"""Pretrain the two tiny base models of the key-value task (Hugging Face models, save_pretrained).

    python -m examples.kv_task.pretrain --task artifacts/kv_task --out artifacts/models [--which both]
        [--parallel] [--seed 0] [--anchor-steps 3000] [--aug-steps 2000] [--batch 128] [--anchor-lr 5e-3]
        [--aug-lr 3e-3]
        [--max-minutes 10] [--aug-tokenizer PATH] [--force]

anchor (OUT/anchor): a Llama trained on numeric arithmetic only (``<s> a op b = r </s>``, the whole
    table, numbers one digit a token); it never sees a key, and its key rows keep their random init.
augmenting (OUT/aug): a GPT-2 (learned absolute positions) trained on every key's value and no arithmetic.
    ``--aug-format pairs``: sequences ``<s> k1 v1 [op] k2 v2 ... </s>`` of key-value facts over all keys
    (plus ``n n`` for every value: a number's value is itself), loss on the values, so its state AT a key
    predicts that key's value; ``sub``: KV-substitution (``k1 op k2 =`` -> ``v1 op v2``), the paper's
    augmenting corpus; ``mix`` (default): half each.
The two models share nothing but the tokenizer: separate seeds, their own learned embeddings.

Both models use the task's tokenizer: same vocab size and pad/bos/eos ids. ``--aug-tokenizer PATH`` (a
SentencePiece model, e.g. the task's ``tokenizer_chars.model``, or a transformers tokenizer directory, e.g. its
``tokenizer_bpe``) gives the augmenting model its own (``make demo-xtok``): it trains and is scored through it, its
vocabulary and special ids are that tokenizer's, and its settings name the tokenizer's hash. Every sequence is
encoded as its text reads (a word after a space with the space), so a tokenizer without SentencePiece's dummy
prefix trains on the tokens the composition's text gives it. Runs are seeded and single-threaded by default
(deterministic). Reruns with the same settings and task reuse the saved models (``pretrain.json`` in each model
dir); --force retrains. Each model dir gets ``metrics.json``.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from calm_dist.data.tokenizer import Tokenizer, completion_ids, prompt_ids
from examples.kv_task.make_data import file_sha256
from examples.kv_task.scoring import completion_as_read, exact_match, next_token_accuracy, read_jsonl
from examples.kv_task.tokenizer import BOS_ID, EOS_ID, PAD_ID, load_tokenizer

FORMAT_VERSION = 3


def log(*a):
    print("[pretrain_tiny]", *a, flush=True)


# ------------------------------------------------------------------------------------------- data
class Task:
    """A task directory written by make_data.py."""

    def __init__(self, task_dir: str):
        self.dir = task_dir
        with open(os.path.join(task_dir, "manifest.json")) as f:
            self.manifest = json.load(f)
        self.sp = load_tokenizer(os.path.join(task_dir, "tokenizer.model"))
        self.tokenizer = Tokenizer(os.path.join(task_dir, "tokenizer.model"))  # what calm_dist scores with
        with open(os.path.join(task_dir, "keys.json")) as f:
            self.keys = json.load(f)
        self.n_values = self.manifest["settings"]["n_values"]
        self.vocab_size = self.manifest["vocab_size"]
        # How a prompt/completion record reads: apart (bos + prompt, completion + eos), as calm-dist feeds every
        # model of one tokenizer; or, for an augmenting model of its own tokenizer (with_tokenizer), as the text
        # prompt + completion read whole, which is what calm-dist gives it across tokenizers.
        self.whole_text = False

    def with_tokenizer(self, path: str) -> "Task":
        """The same task read through another tokenizer, a SentencePiece model or a transformers tokenizer
        directory (its vocabulary size and special ids); ``sp`` is None for the latter."""
        other = copy.copy(self)
        other.tokenizer = Tokenizer(path, "--aug-tokenizer")
        other.sp = load_tokenizer(path) if os.path.isfile(path) else None
        other.vocab_size = other.tokenizer.vocab_size
        other.whole_text = True
        return other

    def data(self, name: str) -> list[dict]:
        return read_jsonl(os.path.join(self.dir, "data", name + ".jsonl"))

    @property
    def fingerprint(self) -> str:
        """Changes whenever the vocabulary or a base-model corpus changes."""
        f = self.manifest["files"]
        used = {k: f[k] for k in ("tokenizer.model", "keys.json", "data/arith_train.jsonl",
                                  "data/kv_facts.jsonl", "data/kv_sub_train.jsonl") if k in f}
        return hashlib.sha256(json.dumps(used, sort_keys=True).encode()).hexdigest()[:16]

    def token_id(self, word) -> int:
        return self.sp.piece_to_id("\u2581" + str(word))


def pad_batch(seqs):
    """Right-pad (ids, labels) pairs; returns input_ids, attention_mask, labels."""
    n = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), n), PAD_ID, dtype=torch.long)
    lab = torch.full((len(seqs), n), -100, dtype=torch.long)
    att = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, (x, y) in enumerate(seqs):
        ids[i, :len(x)] = torch.tensor(x)
        lab[i, :len(y)] = torch.tensor(y)
        att[i, :len(x)] = 1
    return ids, att, lab


def record_ids(tokenizer: Tokenizer, record: dict, whole_text: bool = False) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of ``<s> prompt completion </s>`` as calm_dist trains on it; labels -100 on ``<s>`` and
    the prompt. ``whole_text``: the completion's tokens are those the text prompt + completion reads after the
    prompt's (Task.whole_text)."""
    p = prompt_ids(tokenizer, record["prompt"])
    c = completion_as_read(tokenizer, record) if whole_text else completion_ids(tokenizer, record["completion"])
    return p + c, [-100] * len(p) + c


def reads_otherwise_whole(tokenizer: Tokenizer, records: list[dict], chunk: int = 1000) -> bool:
    """Whether any record's text prompt + completion reads otherwise than its prompt and completion apart; read
    a chunk at a time, so a tokenizer that reads them otherwise answers after the first."""
    for start in range(0, len(records), chunk):
        part = records[start:start + chunk]
        apart = zip(tokenizer.encode_batch([r["prompt"] for r in part]),
                    tokenizer.encode_batch([r["completion"] for r in part]))
        whole = tokenizer.encode_batch([r["prompt"] + r["completion"] for r in part])
        if any(p + c != w for (p, c), w in zip(apart, whole)):
            return True
    return False


class RecordSampler:
    """Uniformly sampled prompt/completion records (``<s> prompt completion </s>``), encoded once."""

    def __init__(self, tokenizer: Tokenizer, records: list[dict], rng: random.Random, whole_text: bool = False):
        self.enc = [record_ids(tokenizer, r, whole_text) for r in records]
        self.rng = rng

    def batch(self, n: int):
        return pad_batch([self.rng.choice(self.enc) for _ in range(n)])


class PairsSampler:
    """Sequences ``<s> k1 v1 [op] k2 v2 [op] ... </s>`` of facts (each fact once per epoch, shuffled),
    a random ``+``/``-``/``=`` between some pairs; loss on the values and ``</s>``."""

    def __init__(self, tokenizer: Tokenizer, facts: list[dict], rng: random.Random, pairs_per_seq: int = 6,
                 sep_prob: float = 0.5):
        # a sequence reads as its text "k1 v1 + k2 v2 ...": the first key as a text's first word, every later word
        # after a space (the same ids under SentencePiece's dummy prefix; not under a byte-level BPE)
        def fact(r, first):
            key = r["prompt"] if first else " " + r["prompt"]
            return tokenizer.encode(key), tokenizer.encode(" " + r["completion"])
        self.facts = [(fact(r, True), fact(r, False)) for r in facts]
        self.seps = [tokenizer.encode(" " + w) for w in ("+", "-", "=")]
        if any(len(sep) != 1 for sep in self.seps):
            raise ValueError(f"{tokenizer.path}: an operator after a space reads more than one token")
        self.bos, self.eos = tokenizer.bos_id, tokenizer.eos_id
        self.rng, self.k, self.sep_prob = rng, pairs_per_seq, sep_prob
        self.order: list[int] = []

    def _next_fact(self):
        if not self.order:
            self.order = list(range(len(self.facts)))
            self.rng.shuffle(self.order)
        return self.facts[self.order.pop()]

    def one(self):
        ids, lab = [self.bos], [-100]
        for j in range(self.k):
            if j and self.rng.random() < self.sep_prob:
                ids += self.rng.choice(self.seps)
                lab.append(-100)
            k, v = self._next_fact()[j > 0]
            ids += k + v
            lab += [-100] * len(k) + v
        ids.append(self.eos)
        lab.append(self.eos)
        return ids, lab

    def batch(self, n: int):
        return pad_batch([self.one() for _ in range(n)])


class MixSampler:
    """Equal shares of each sampler in every batch."""

    def __init__(self, samplers):
        self.samplers = samplers

    def batch(self, n: int):
        counts = [n // len(self.samplers)] * len(self.samplers)
        counts[0] += n - sum(counts)
        seqs = []
        for s, c in zip(self.samplers, counts):
            ids, att, lab = s.batch(c)
            for i in range(c):
                m = int(att[i].sum())
                seqs.append((ids[i, :m].tolist(), lab[i, :m].tolist()))
        return pad_batch(seqs)


# ------------------------------------------------------------------------------------------ model
def build_model(vocab_size: int, hidden: int, layers: int, heads: int, ffn: int, tie: bool, seed: int,
                arch: str = "llama", special_ids: tuple[int, int, int] = (PAD_ID, BOS_ID, EOS_ID)):
    """special_ids: (pad, bos, eos) of the model's tokenizer."""
    pad_id, bos_id, eos_id = special_ids
    torch.manual_seed(seed)
    if arch == "gpt2":
        # learned absolute position embeddings: every state carries its position
        cfg = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=hidden, n_layer=layers, n_head=heads,
                         n_inner=ffn, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id, tie_word_embeddings=tie)
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=ffn,
                      max_position_embeddings=64, pad_token_id=pad_id, bos_token_id=bos_id,
                      eos_token_id=eos_id, tie_word_embeddings=tie, rms_norm_eps=1e-5,
                      attention_dropout=0.0)
    return LlamaForCausalLM(cfg)


def train(model, sampler, steps: int, batch: int, lr: float, warmup: int, wd: float, log_every: int,
          max_seconds: float, evals=None, eval_every: int = 0, stop_at: float | None = None):
    """AdamW, linear warmup then cosine decay to lr/10; optional early stop once every eval >= stop_at. The result's
    ``stopped`` says why it ended: ``steps`` (all of them), ``stop_at``, or ``wall_cap`` (``max_seconds`` ran out
    first: not the recipe's model)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, betas=(0.9, 0.98))

    def lr_at(s):
        if s < warmup:
            return lr * (s + 1) / warmup
        p = (s - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))
    model.train()
    t0, c0, hist, loss_avg, stopped = time.time(), time.process_time(), [], None, "steps"
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        ids, att, lab = sampler.batch(batch)
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        last = step + 1 == steps or time.time() - t0 > max_seconds
        if last and step + 1 < steps:
            stopped = "wall_cap"
        if (step + 1) % log_every == 0 or last:
            log(f"step {step + 1} loss {loss_avg:.4f} lr {lr_at(step):.2e} {time.time() - t0:.0f}s")
        if evals and eval_every and ((step + 1) % eval_every == 0 or last):
            accs = {k: fn(model) for k, fn in evals.items()}
            hist.append({"step": step + 1, "seconds": round(time.time() - t0, 1), **accs})
            log(f"  eval step {step + 1}: " + " ".join(f"{k}={a:.3f}" for k, a in accs.items()))
            if stop_at is not None and all(a >= stop_at for a in accs.values()):
                log(f"  every eval >= {stop_at}: stopping early")
                stopped = "stop_at"
                break
        if last:
            break
    model.eval()
    return {"steps": step + 1, "stopped": stopped, "seconds": round(time.time() - t0, 1),
            "cpu_seconds": round(time.process_time() - c0, 1), "final_loss": loss_avg, "history": hist}


def warn_if_cut(which: str, metrics: dict, settings: dict) -> None:
    """One line when the model was cut short by the wall-clock cap: its scores are not the recipe's, and a busy
    machine (another job on the demo's cores) is the usual cause."""
    if metrics.get("stopped") == "wall_cap":
        log(f"WARNING: {which} stopped at step {metrics['steps']} of {settings['steps']}, cut by the wall-clock cap "
            f"(--max-minutes {settings['max_minutes']:g}): not the recipe's model. Retrain it with --force on a "
            "quieter machine, or with a larger --max-minutes")


# -------------------------------------------------------------------------------------- main flow
def settings_for(a: argparse.Namespace, which: str, task: Task) -> dict:
    """What a pretrained model's manifest must hold to be reused: the flags that shape it, and for an augmenting
    model of its own tokenizer, that tokenizer's bytes and how `task`'s records read through it."""
    common = {"format_version": FORMAT_VERSION, "seed": a.seed, "batch": a.batch,
              "warmup": a.warmup, "eval_every": a.eval_every,
              "max_minutes": a.max_minutes}
    if which == "anchor":
        return {**common, "which": "anchor", "arch": a.anchor_arch, "steps": a.anchor_steps, "lr": a.anchor_lr,
                "weight_decay": a.anchor_weight_decay, "stop_at": a.stop_at,
                "layers": a.anchor_layers, "hidden": a.anchor_hidden, "heads": a.anchor_heads,
                "ffn": a.anchor_ffn, "tie": a.anchor_tie}
    aug = {**common, "which": "aug", "arch": a.aug_arch, "steps": a.aug_steps, "lr": a.aug_lr,
           "weight_decay": a.aug_weight_decay, "stop_at": None, "layers": a.aug_layers,
           "hidden": a.aug_hidden, "heads": a.aug_heads, "ffn": a.aug_ffn, "tie": not a.aug_untied,
           "format": a.aug_format, "pairs_per_seq": a.pairs_per_seq, "sep_prob": a.sep_prob,
           "number_facts": not a.no_number_facts}
    if a.aug_tokenizer:  # absent otherwise: models pretrained with the task's tokenizer stay current
        aug["tokenizer"] = (file_sha256(a.aug_tokenizer)[:16] if os.path.isfile(a.aug_tokenizer)
                            else Tokenizer(a.aug_tokenizer, "--aug-tokenizer").fingerprint())
        # records read whole (Task.whole_text); named only where that reads otherwise than apart, so a model whose
        # tokenizer reads them alike either way (the default BPE) stays current
        if reads_otherwise_whole(Tokenizer(a.aug_tokenizer, "--aug-tokenizer"),
                                 task.data("kv_sub_train") + task.data("val_kv_sub")):
            aug["reading"] = "whole_text"
    return aug


def was_cut(metrics: dict, settings: dict) -> bool:
    """Whether the wall-clock cap ended the model's training; a model pretrained before ``stopped`` was recorded
    counts as cut unless it ran every step."""
    if "stopped" in metrics:
        return metrics["stopped"] == "wall_cap"
    return metrics.get("steps") != settings["steps"]


def current_record(model_dir: str, settings: dict, task: Task) -> tuple[dict, dict] | None:
    """`model_dir`'s pretrain.json and metrics.json when it holds the model these settings train on this task, else
    None. The wall-clock cap (max_minutes) is a limit, not part of the recipe: a model that ran to its end under
    another cap is the same model, and reused; one that the cap cut short is retrained under a cap that differs."""
    if not all(os.path.exists(os.path.join(model_dir, f)) for f in ("pretrain.json", "config.json", "metrics.json")):
        return None
    with open(os.path.join(model_dir, "pretrain.json")) as f:
        man = json.load(f)
    with open(os.path.join(model_dir, "metrics.json")) as f:
        metrics = json.load(f)
    recorded = man.get("settings") or {}
    if man.get("task") != task.fingerprint:
        return None
    if recorded == settings:
        return man, metrics
    if {**recorded, "max_minutes": None} != {**settings, "max_minutes": None} or was_cut(metrics, recorded):
        return None
    return man, metrics


def pretrain_one(which: str, task: Task, out: str, a: argparse.Namespace) -> dict:
    model_dir = os.path.join(out, which)
    s = settings_for(a, which, task)
    record = None if a.force else current_record(model_dir, s, task)
    if record is not None:
        manifest, metrics = record
        cap = manifest["settings"]["max_minutes"]
        log(f"reusing {model_dir} (same settings and task" + (")" if cap == s["max_minutes"] else
                                                              f"; it ran to its end under --max-minutes {cap:g})"))
        warn_if_cut(which, metrics, s)
        return metrics
    seed = a.seed + (0 if which == "anchor" else 1000)
    rng = random.Random(seed)
    if which == "aug" and a.aug_tokenizer:
        task = task.with_tokenizer(a.aug_tokenizer)
    tokenizer = task.tokenizer
    model = build_model(task.vocab_size, s["hidden"], s["layers"], s["heads"], s["ffn"], s["tie"], seed, s["arch"],
                        (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{which}: {s['arch']} {n_params / 1e6:.2f}M params, {s['layers']} blocks, d={s['hidden']}, "
        f"{s['heads']} heads")
    if which == "anchor":
        sampler = RecordSampler(tokenizer, task.data("arith_train"), rng, task.whole_text)
        ev = task.data("eval_arith")
        evals = {"arith": lambda m: exact_match(m, task.tokenizer, ev, whole_text=task.whole_text)}
    else:
        facts = task.data("kv_facts")
        if s["number_facts"]:
            # a number's value is the number itself: "7" -> "7" (no arithmetic)
            facts = facts + [{"prompt": str(n), "completion": str(n)} for n in range(task.n_values)]
        pairs = PairsSampler(tokenizer, facts, rng, s["pairs_per_seq"], s["sep_prob"])
        sub = RecordSampler(tokenizer, task.data("kv_sub_train"), rng, task.whole_text)
        sampler = {"pairs": pairs, "sub": sub, "mix": MixSampler([pairs, sub])}[s["format"]]
        kv = facts_as_read(task.data("kv_facts"))
        random.Random(0).shuffle(kv)
        kv = kv[:300]
        evals = {"kv_facts": lambda m: next_token_accuracy(m, task.tokenizer, kv)}
        if s["format"] != "pairs":
            ev = task.data("val_kv_sub")[:200]  # validation keys: the test keys are scored once, at the end
            evals["kv_sub"] = lambda m: exact_match(m, task.tokenizer, ev, whole_text=task.whole_text)
    torch.manual_seed(seed)
    stop_at = s["stop_at"] if s["stop_at"] is not None and 0 < s["stop_at"] <= 1 else None
    info = train(model, sampler, s["steps"], s["batch"], s["lr"], s["warmup"], s["weight_decay"], a.log_every,
                 s["max_minutes"] * 60, evals, s["eval_every"], stop_at)
    metrics = evaluate_base(model, task)
    metrics.update(info)
    os.makedirs(model_dir, exist_ok=True)
    model.save_pretrained(model_dir)
    with open(os.path.join(model_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    with open(os.path.join(model_dir, "pretrain.json"), "w") as f:
        json.dump({"settings": s, "task": task.fingerprint, "params": n_params}, f, indent=1)
    log(f"{which} saved to {model_dir} after {info['steps']} steps, {info['seconds']}s: "
        + " ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k.startswith(("em_", "acc_"))))
    warn_if_cut(which, metrics, s)
    return metrics


def facts_as_read(facts: list[dict]) -> list[dict]:
    """Key-value facts scored as a sequence reads them, "qzv 12": the prompt is the key and the space after it, so
    the next token is the value's first digit under a tokenizer that reads that space as a token of its own (a
    byte-level BPE's "\u0120"; SentencePiece drops the trailing space, the ids are the same)."""
    return [{"prompt": r["prompt"] + " ", "completion": r["completion"]} for r in facts]


def evaluate_base(model, task: Task, n: int = 500) -> dict:
    """Greedy exact match on the task's sets (KV-arithmetic on the validation keys: the test keys are scored once,
    by the run's evaluation), and the next-token accuracy of key -> value."""
    out = {}
    for metric, name in (("em_arith", "eval_arith"), ("em_kv_sub_heldout", "eval_kv_sub_heldout"),
                         ("em_kv_sub_validation", "val_kv_sub"), ("em_kv_arith_validation", "val_kv_arith")):
        out[metric] = exact_match(model, task.tokenizer, task.data(name)[:n], whole_text=task.whole_text)
    out["acc_kv_facts"] = next_token_accuracy(model, task.tokenizer, facts_as_read(task.data("kv_facts")))
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, help="task dir written by make_data.py")
    p.add_argument("--out", required=True, help="models go to OUT/anchor and OUT/aug")
    p.add_argument("--which", choices=["anchor", "aug", "both"], default="both")
    p.add_argument("--parallel", action="store_true",
                   help="with --which both: train the two models at once, one process (one thread) each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--anchor-lr", type=float, default=5e-3)
    p.add_argument("--aug-lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--anchor-weight-decay", type=float, default=0.01)
    p.add_argument("--aug-weight-decay", type=float, default=0.3,
                   help="longer training with more decay makes the value readable off the state at a key "
                        "(examples/kv_task/probe.py; docs/kv_task.md)")
    p.add_argument("--anchor-arch", choices=["llama", "gpt2"], default="llama")
    p.add_argument("--anchor-steps", type=int, default=3000)
    p.add_argument("--anchor-layers", type=int, default=4)
    p.add_argument("--anchor-hidden", type=int, default=64)
    p.add_argument("--anchor-heads", type=int, default=16,
                   help="also the composition's cross-attention heads (CALM: as many as the anchor)")
    p.add_argument("--anchor-ffn", type=int, default=256)
    p.add_argument("--anchor-tie", action="store_true", help="tie the anchor's embeddings")
    p.add_argument("--aug-arch", choices=["llama", "gpt2"], default="gpt2")
    p.add_argument("--aug-steps", type=int, default=2000,
                   help="its whole schedule: it knows every value after ~750 steps, and the rest makes the value "
                        "readable off its state at a key (docs/kv_task.md)")
    p.add_argument("--aug-layers", type=int, default=4)
    p.add_argument("--aug-hidden", type=int, default=64)
    p.add_argument("--aug-heads", type=int, default=4)
    p.add_argument("--aug-ffn", type=int, default=256)
    p.add_argument("--aug-untied", action="store_true", help="untie the augmenting model's embeddings")
    p.add_argument("--aug-format", choices=["pairs", "sub", "mix"], default="mix")
    p.add_argument("--pairs-per-seq", type=int, default=6)
    p.add_argument("--sep-prob", type=float, default=0.5)
    p.add_argument("--no-number-facts", action="store_true",
                   help="augmenting corpus without the 'n n' facts (a number's value is itself)")
    p.add_argument("--stop-at", type=float, default=0.99,
                   help="the anchor stops early once its periodic eval reaches this accuracy (outside (0, 1]: never)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--log-every", type=int, default=250)
    p.add_argument("--max-minutes", type=float, default=10.0, help="wall-clock cap per model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--aug-tokenizer", metavar="PATH",
                   help="a SentencePiece model or a transformers tokenizer directory the augmenting model reads "
                        "through instead of the task's tokenizer")
    p.add_argument("--force", action="store_true")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser()
    a = p.parse_args(argv)
    if a.aug_tokenizer and not os.path.exists(a.aug_tokenizer):
        p.error(f"--aug-tokenizer: {a.aug_tokenizer} does not exist")
    torch.set_num_threads(a.threads)
    task = Task(a.task)
    if a.which == "both" and a.parallel:
        base = [x for x in argv if x != "--parallel"]
        if "--which" in base:
            i = base.index("--which")
            del base[i:i + 2]
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
        procs = [subprocess.Popen([sys.executable, "-m", "examples.kv_task.pretrain", *base, "--which", w], env=env)
                 for w in ("anchor", "aug")]

        def stop(signum, frame):
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, stop)
        try:
            rcs = [p.wait() for p in procs]
        finally:  # never leave a child training on its own
            for p in procs:
                if p.poll() is None:
                    p.terminate()
                    p.wait()
        return max(rcs)
    for which in (["anchor", "aug"] if a.which == "both" else [a.which]):
        pretrain_one(which, task, a.out, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
