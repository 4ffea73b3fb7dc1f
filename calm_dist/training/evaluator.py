"""The eval loss of a training run: the token mean of the next-token loss over the eval split, on every rank."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from calm_dist.model.lm_loss import labelled_tokens
from calm_dist.training.dist_env import DistEnv, to_device
from calm_dist.training.parallelize import DistributedModel
from calm_dist.training.states_cache import StatesCache


class Evaluator:
    """Rank r reads rows r, r + world, ... of the eval data, `micro_batch_size` at a time, for at most `max_batches`
    batches (0: all). Every rank runs the same number of forwards, since ZeRO-3 gathers are collective: a rank
    out of rows runs a forward on row 0 with weight 0."""

    def __init__(self, model: DistributedModel, data, states: StatesCache | None, env: DistEnv, device: torch.device,
                 micro_batch_size: int, max_batches: int = 0):
        self.model, self.data, self.states, self.env, self.device = model, data, states, env, device
        self.micro_batch_size, self.max_batches = micro_batch_size, max_batches

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """{"eval/loss": token-mean loss, "eval/perplexity": its exp}, the same on every rank. Collective."""
        env, engine, size = self.env, self.model.engine, self.micro_batch_size
        engine.eval()
        rows = list(range(env.rank, len(self.data), env.world_size))
        per_rank = math.ceil(len(self.data) / env.world_size)
        n_batches = math.ceil(per_rank / size)
        if self.max_batches:
            n_batches = min(n_batches, self.max_batches)
        total = torch.zeros(2, device=self.device)
        for b in range(n_batches):
            idx = rows[b * size:(b + 1) * size]
            weight = 1.0 if idx else 0.0
            batch_rows = idx or [0]
            batch = to_device(self.data.batch(batch_rows), self.device)
            states = to_device(self.states.read(batch_rows), self.device) if self.states is not None else None
            loss_sum = self.model.summed_loss(batch, states)
            total += weight * torch.stack([loss_sum.float(), labelled_tokens(batch["labels"]).float()])
        dist.all_reduce(total)
        engine.train()
        loss_sum, tokens = total.tolist()
        loss = loss_sum / max(1.0, tokens)
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}
