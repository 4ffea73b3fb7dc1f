"""One rank of a ZeRO-3 training run through the real Trainer, reporting what a test must check.

Usage (per rank, env RANK/WORLD_SIZE/MASTER_*): python zero3_worker.py REPORT.json CONFIG.yaml [overrides...]
"""
import glob
import json
import math
import os
import sys

import torch
from safetensors.torch import load_file

from calm_dist.config import load_config
from calm_dist.distributed import DistEnv, shut_down_process_group
from calm_dist.trainer import Trainer, quiet_libraries
from calm_dist.validate import validate


def partition_report(model, world: int) -> dict:
    """Every parameter, frozen or not, holds only its 1/world shard on this rank."""
    sizes = [(p.ds_tensor.numel(), p.ds_numel) for p in model.parameters()]
    return {"n_params": len(sizes),
            "all_partitioned": all(local == math.ceil(full / world) for local, full in sizes),
            "local": sum(l for l, _ in sizes), "full": sum(f for _, f in sizes)}


def frozen_identical(model, anchor_dir: str) -> bool:
    """Gather every anchor weight and compare it bit for bit with the file it was loaded from."""
    import deepspeed

    saved = load_file(f"{anchor_dir}/model.safetensors")
    same = True
    for name, p in model.anchor.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if name in saved:
                same &= torch.equal(p.data, saved[name])
    return bool(same)


@torch.no_grad()
def head_loss_outside_forward(model) -> list[float]:
    """lm_loss.head_loss called outside the engine's forward, where ZeRO-3 leaves the head partitioned (its own
    gather), and the logits path, on the same batch: the anchor alone (hooks idle)."""
    from calm_dist.backbones import decoder
    from calm_dist.lm_loss import head_loss, loss_from_logits

    ids = torch.arange(3, 19).reshape(2, 8)
    hidden = decoder(model.anchor)(input_ids=ids, use_cache=False).last_hidden_state
    return [head_loss(hidden, model.anchor.get_output_embeddings(), ids).item(),
            loss_from_logits(model.anchor(input_ids=ids, use_cache=False).logits, ids).item()]


def main():
    report_path, config_path, *overrides = sys.argv[1:]
    quiet_libraries()
    cfg = load_config(config_path, overrides)
    env = DistEnv.from_environ()
    trainer = Trainer(cfg, env, validate(cfg, env))
    trainer.setup()
    before = partition_report(trainer.model, env.world_size)
    result = trainer.run()
    report = {"losses": result.losses, "step": result.step, "partition": before,
              "frozen_identical": frozen_identical(trainer.model, cfg.model.anchor) if cfg.model.method == "calm" else None,
              "world_size": env.world_size,
              "compiled_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],  # train.compile
              "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
              "head_loss_outside_forward": head_loss_outside_forward(trainer.model) if cfg.model.method == "calm" else None,
              # DeepSpeed's CPU shared-memory all-reduce would have left one buffer per rank here for good
              "shm_buffers": glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{os.environ['MASTER_PORT']}_*")}
    if env.is_main:
        with open(report_path, "w") as f:
            json.dump(report, f)
    shut_down_process_group()


if __name__ == "__main__":
    main()
