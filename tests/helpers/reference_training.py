"""Single-process references for the distributed training tests: the global batches of the sampler's contract,
derived here and not through GlobalBatchSampler, and plain-PyTorch training over them (no DeepSpeed, no
calm_dist trainer, the logits path of the loss instead of the trainer's head_loss).

tests/integration/test_distributed_training.py (2 ranks) and tests/integration/test_slurm.py (4 ranks on 2 Slurm
nodes) compare their losses and weights with these.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from calm_dist import ComposedModel
from calm_dist.data.prepare import load_rows
from calm_dist.data.tokenizer import Tokenizer
from calm_dist.model.lm_loss import labelled_tokens, loss_from_logits
from calm_dist.training.parallelize import lr_lambda  # its values are pinned by hand in test_schedule.py


def reference_batches(n_rows: int, batch_size: int, seed: int, steps: int) -> list[np.ndarray]:
    """Epoch after epoch a permutation seeded by (seed, epoch), cut into whole batches, the remainder dropped."""
    batches, epoch = [], 0
    while len(batches) < steps:
        perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
        batches += [perm[start:start + batch_size] for start in range(0, n_rows - batch_size + 1, batch_size)]
        epoch += 1
    return batches[:steps]


def reference_optimizer(cfg):
    """The composition of `cfg` seeded as the trainer seeds it, its trainable parameters, and the trainer's AdamW
    and schedule over them: (model, params, optimizer, scheduler)."""
    torch.manual_seed(cfg.train.seed)
    model = ComposedModel.from_pretrained(cfg.model.anchor, cfg.model.augmenting, layer_pairs=cfg.model.layer_pairs)
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay)
    return model, params, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


def optimizer_step(logits, labels, params, opt, sched, grad_clip: float) -> float:
    """One step on the token-mean loss of `logits` against `labels`, as the trainer takes it; returns the loss."""
    loss = loss_from_logits(logits, labels, "sum") / labelled_tokens(labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    sched.step()
    opt.zero_grad()
    return loss.item()


def reference_training(cfg, global_batch: int, tokenized_cache: Path):
    """`cfg.train.steps` steps of one process over the reference batches: the same AdamW, schedule and
    clipping. Returns (the loss of each step, the composition's final weights)."""

    data = load_rows(cfg.data, cfg.data.train, "data.train", Tokenizer(cfg.data.tokenizer), tokenized_cache)
    model, params, opt, sched = reference_optimizer(cfg)
    losses = []
    for rows in reference_batches(len(data), global_batch, cfg.train.seed, cfg.train.steps):
        batch = data.batch(rows)
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch.get("position_ids"))
        losses.append(optimizer_step(out.logits, batch["labels"], params, opt, sched, cfg.optim.grad_clip))
    return losses, model.composition_state_dict()


def eval_loss(composition_dir: Path, cfg, rows, tokenized_cache: Path) -> float:
    """Token-mean next-token loss of an exported composition over the given rows of `cfg.data.eval`: one
    process, one batch, the logits path (the trainer's eval runs ZeRO-3 micro-batches through head_loss)."""

    data = load_rows(cfg.data, cfg.data.eval, "data.eval", Tokenizer(cfg.data.tokenizer), tokenized_cache)
    model = ComposedModel.from_composition(composition_dir).eval()
    batch = data.batch(list(rows))
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return (loss_from_logits(logits, batch["labels"], "sum") / labelled_tokens(batch["labels"])).item()
