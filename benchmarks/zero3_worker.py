"""One rank of a ZeRO-3 composed model: resident parameter bytes, step time, peak memory (and FLOPs).

Spawned by benchmarks/run.py (P5, through torchrun) and tests/integration/test_plan_vs_measured.py (through
tests/helpers/launch.py) with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set. The frozen models load straight into ZeRO-3 shards as
the trainer loads them (HfDeepSpeedConfig alive during from_pretrained, calm_dist.training.parallelize), the
composition is built on top, and `deepspeed.initialize` partitions everything, the frozen weights included.

    python benchmarks/zero3_worker.py --anchor DIR --augmenting DIR --pairs '[[3,3],[7,7]]' --seq 256 \
        --micro-batch 2 --steps 4 --report OUT.json [--ds-config ds_configs/zero3.json] [--count-flops]

Every rank writes OUT.rank<r>.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import common  # noqa: E402  (pins threads, DS_ACCELERATOR=cpu)

import torch  # noqa: E402


def cpu_sdpa_mapping() -> dict:
    """FlopCounterMode counts the CUDA SDPA kernels only; count the CPU flash kernel the same way."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    return {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v),
    }


def parameter_bytes(params) -> dict:
    """Bytes this rank holds for `params`: its ZeRO-3 partitions (ds_tensor), plus whole copies of the
    persistent (small, never partitioned-away) ones; and the full size for reference."""
    shard = persistent = full = n = 0
    for p in params:
        n += 1
        size = p.ds_tensor.element_size()
        shard += p.ds_tensor.numel() * size
        full += p.ds_numel * size
        if getattr(p, "ds_persist", False):
            persistent += p.ds_numel * size
    return {"n_tensors": n, "shard_bytes": shard, "persistent_full_bytes": persistent,
            "resident_bytes": shard + persistent, "full_bytes": full}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--anchor", required=True)
    ap.add_argument("--augmenting", required=True)
    ap.add_argument("--pairs", required=True, help="JSON list of [augmenting_layer, anchor_layer]")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="training steps; the first is warm-up (untimed)")
    ap.add_argument("--ds-config", default=str(common.REPO / "ds_configs" / "zero3.json"))
    ap.add_argument("--count-flops", action="store_true", help="FlopCounterMode over one extra fwd+bwd")
    ap.add_argument("--report", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)

    import deepspeed
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    from calm_dist.model.composition import ComposedModel

    from calm_dist.model.io import load_causal_lm
    from calm_dist.training.dist_env import DistEnv, init_process_group, shut_down_process_group

    env = DistEnv.from_environ()
    init_process_group(env, 300)
    world = env.world_size
    ds = json.loads(Path(args.ds_config).read_text())
    ds.update({"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
               "train_batch_size": args.micro_batch * world, "gradient_clipping": 1.0,
               "bf16": {"enabled": False}, "steps_per_print": 10 ** 9, "wall_clock_breakdown": False})
    rss_before_models = common.current_rss_bytes()
    hf_ds_config = HfDeepSpeedConfig(ds)  # referenced until the end (the `del` below): ZeRO-3 loading needs it
    anchor = load_causal_lm(args.anchor)
    augmenting = load_causal_lm(args.augmenting)
    torch.manual_seed(0)
    pairs = [tuple(p) for p in json.loads(args.pairs)]
    model = ComposedModel(anchor, [augmenting], layer_pairs=[pairs])
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)

    frozen = [p for p in model.parameters() if not p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    report = {"rank": env.rank, "world_size": world, "seq": args.seq, "micro_batch": args.micro_batch,
              "ds_config": ds, "frozen": parameter_bytes(frozen), "trainable": parameter_bytes(trainable),
              "rss_after_setup_bytes": common.current_rss_bytes(), "rss_before_models_bytes": rss_before_models}

    g = torch.Generator().manual_seed(100 + env.rank)
    vocab = anchor.config.vocab_size

    def step():
        ids = torch.randint(3, vocab, (args.micro_batch, args.seq), generator=g)
        out = engine(ids, attention_mask=torch.ones_like(ids), labels=ids)
        engine.backward(out.loss)
        engine.step()
        return out.loss.item()

    times, cpu_times, losses = [], [], []
    for s in range(args.steps):
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step())
        if s:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    report["step_s"] = times  # wall clock (ranks wait on each other in the collectives)
    report["step_cpu_s"] = cpu_times
    report["losses"] = losses
    if times:
        report["step_median_s"] = common.median(times)
        report["tokens_per_s_per_rank"] = args.micro_batch * args.seq / report["step_median_s"]

    if args.count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        ids = torch.randint(3, vocab, (args.micro_batch, args.seq), generator=g)
        with FlopCounterMode(display=False, custom_mapping=cpu_sdpa_mapping()) as fc:
            out = engine(ids, attention_mask=torch.ones_like(ids), labels=ids)
            engine.backward(out.loss)
        engine.step()
        report["flops_fwd_bwd_micro_step"] = int(fc.get_total_flops())

    report["peak_rss_bytes"] = common.peak_rss_bytes()
    out_path = Path(args.report)
    common.write_json(out_path.with_name(f"{out_path.name}.rank{env.rank}.json"), report)
    shut_down_process_group()  # not exiting with gloo's threads alive (pytorch#179291)
    del hf_ds_config


if __name__ == "__main__":
    from calm_dist.training.dist_env import run_then_exit

    run_then_exit(main)
