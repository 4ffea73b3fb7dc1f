"""One rank of a ZeRO-3 training run through the real Trainer, reporting what a test must check.

Usage (per rank, env RANK/WORLD_SIZE/MASTER_*): python zero3_worker.py REPORT.json CONFIG.yaml [overrides...]
"""
import glob
import json
import math
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from calm_dist.config import load_config
from calm_dist.console import quiet_libraries
from calm_dist.model.backbones import decoder
from calm_dist.model.lm_loss import head_loss, loss_from_logits
from calm_dist.training.dist_env import DistEnv, run_then_exit, shut_down_process_group
from calm_dist.training.preflight import preflight
from calm_dist.training.trainer import Trainer


def partition_report(model, world: int) -> dict:
    """Whether every parameter, frozen or not, holds only its 1/world shard on this rank (ZeRO-3), and the
    elements held here against the full count (under ZeRO-2 every tensor is whole)."""
    sizes = [(p.ds_tensor.numel(), p.ds_numel) if hasattr(p, "ds_tensor") else (p.numel(), p.numel())
             for p in model.parameters()]
    return {"n_params": len(sizes),
            "all_partitioned": all(local == math.ceil(full / world) for local, full in sizes),
            "local": sum(l for l, _ in sizes), "full": sum(f for _, f in sizes)}


def frozen_mismatches(model, anchor_dir: str) -> list[str]:
    """Gather every anchor weight and compare it bit for bit with the file it was loaded from. Empty only
    when every parameter was found in the file, every saved tensor was compared, and all are equal."""
    import deepspeed  # imported here, once main() has quieted the libraries: its import logs at info level

    saved = load_file(f"{anchor_dir}/model.safetensors")
    problems, compared = [], set()
    for name, p in model.anchor.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if name not in saved:
                problems.append(f"parameter {name} is not in the saved anchor")
            elif not torch.equal(p.data, saved[name]):
                problems.append(f"parameter {name} differs from the saved anchor")
        compared.add(name)
    problems += [f"saved tensor {name} matches no parameter" for name in sorted(saved.keys() - compared)]
    return problems


def draw_on_every_forward(model, rank: int) -> None:
    """Consume every RNG a step could use (torch, numpy, python), a rank-dependent amount per forward, as
    dropout would: a resumed run draws the same numbers only if each rank's RNG states were restored."""
    def draw(module, inputs):
        torch.rand(rank + 1)
        np.random.rand(rank + 1)
        [random.random() for _ in range(rank + 1)]
    model.register_forward_pre_hook(draw)


def rng_draws(device) -> list[list[float]]:
    """One draw of torch, numpy and python random per rank, gathered: [rank][generator]."""
    mine = torch.tensor([torch.rand(1).item(), np.random.rand(), random.random()], dtype=torch.float64, device=device)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [t.tolist() for t in every]


@torch.no_grad()
def head_loss_outside_forward(model) -> list[float]:
    """lm_loss.head_loss called outside the engine's forward, where ZeRO-3 leaves the head partitioned (its own
    gather), and the logits path, on the same batch: the anchor alone (hooks idle)."""
    ids = torch.arange(3, 19).reshape(2, 8)
    hidden = decoder(model.anchor)(input_ids=ids, use_cache=False).last_hidden_state
    return [head_loss(hidden, model.anchor.get_output_embeddings(), ids).item(),
            loss_from_logits(model.anchor(input_ids=ids, use_cache=False).logits, ids).item()]


def main():
    report_path, config_path, *overrides = sys.argv[1:]
    quiet_libraries()
    cfg = load_config(config_path, overrides)
    env = DistEnv.from_environ()
    trainer = Trainer(cfg, env, preflight(cfg, env))
    trainer.setup()
    model = trainer.model.module  # the composition (or LoRA baseline) under DeepSpeed's engine
    before = partition_report(model, env.world_size)
    draw_on_every_forward(model, env.rank)
    result = trainer.run()
    calm = cfg.model.method == "calm"
    report = {"losses": result.losses, "step": result.step, "partition": before,
              "rng_draws": rng_draws(trainer.device),  # first: nothing else may draw after the run
              "frozen_mismatches": frozen_mismatches(model, cfg.model.anchor) if calm else None,
              "world_size": env.world_size,
              "compiled_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],  # train.compile
              "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
              "head_loss_outside_forward": head_loss_outside_forward(model) if cfg.model.method == "calm" else None,
              # DeepSpeed's CPU shared-memory all-reduce would have left one buffer per rank here for good
              "shm_buffers": glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{os.environ['MASTER_PORT']}_*")}
    if env.is_main:
        with open(report_path, "w") as f:
            json.dump(report, f)
    shut_down_process_group()


if __name__ == "__main__":
    run_then_exit(main)
