"""One rank of a ZeRO-3 (or ZeRO-2) composed model: per-rank parameter, gradient and optimizer-state bytes, step
time, peak memory (and FLOPs, and the bytes a forward's ZeRO-3 gathers materialise).

Spawned by benchmarks/run.py (P5, through torchrun) and tests/integration/test_plan_vs_measured.py (through
tests/helpers/launch.py) with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set. The models load as the trainer
loads them (calm_dist.training.parallelize): under ZeRO-3 straight into shards (HfDeepSpeedConfig alive during
from_pretrained) and `deepspeed.initialize` partitions everything, the frozen weights included; under ZeRO-2
(--ds-config ds_configs/zero2.json) whole, and DeepSpeed's optimizer flattens the composition's weights and
shards only their gradients, fp32 master copy and Adam moments.

    python benchmarks/zero3_worker.py --anchor DIR --augmenting DIR --pairs '[[3,3],[7,7]]' --seq 256 \
        --micro-batch 2 --steps 4 --report OUT.json [--ds-config ds_configs/zero3.json] [--count-flops] \
        [--gathered-bytes]

Every rank writes OUT.rank<r>.json. Under ZeRO-2 its "zero2" entry holds what DeepSpeed's optimizer holds on
this rank (`zero2_optimizer_bytes`): each size read from a tensor DeepSpeed allocated, none computed.
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
    params = list(params)
    if params and not hasattr(params[0], "ds_tensor"):
        return whole_parameter_bytes(params)
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


def whole_parameter_bytes(params) -> dict:
    """Bytes of `params` held whole on this rank (ZeRO-2 partitions no weight): every tensor's storage."""
    full = sum(p.numel() * p.element_size() for p in params)
    return {"n_tensors": len(params), "shard_bytes": full, "persistent_full_bytes": 0, "resident_bytes": full,
            "full_bytes": full, "dtype": str(params[0].dtype) if params else None}


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer counted once): what stays allocated."""
    seen = {}
    for t in tensors:
        if t is not None:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class Zero2Probe:
    """What DeepSpeed's ZeRO-1/2 optimizer (DeepSpeedZeroOptimizer, runtime/zero/stage_1_and_2.py) holds on this
    rank. Its gradient bucket and the step's fp32 gradient partition live only inside backward and step, so the
    methods that hold them are wrapped to read their sizes there."""

    def __init__(self, optimizer):
        self.opt = optimizer
        self.reduce_bucket_bytes = 0     # the contiguous-gradients bucket (ipg buffer), as large as it gets
        self.step_fp32_grad_bytes = 0    # the fp32 gradient partition the inner optimizer steps with
        reduce_ipg_grads, optimizer_step = optimizer.reduce_ipg_grads, optimizer._optimizer_step

        def reduce_ipg_grads_probe(*args, **kwargs):
            buffers = [b for bucket in optimizer.ipg_buckets.values() for b in bucket.buffer]
            self.reduce_bucket_bytes = max(self.reduce_bucket_bytes, tensor_bytes(buffers))
            return reduce_ipg_grads(*args, **kwargs)

        def optimizer_step_probe(group_no, *args, **kwargs):
            grad = optimizer.single_partition_of_fp32_groups[group_no].grad
            self.step_fp32_grad_bytes = max(self.step_fp32_grad_bytes, tensor_bytes([grad]))
            return optimizer_step(group_no, *args, **kwargs)

        optimizer.reduce_ipg_grads = reduce_ipg_grads_probe
        optimizer._optimizer_step = optimizer_step_probe

    def layout(self) -> dict:
        """The flat trainable buffer (whole, model dtype, padded for alignment) and this rank's slice of it."""
        flats = self.opt.bit16_groups_flat
        return {"flat_numel": sum(f.numel() for f in flats), "flat_bytes": tensor_bytes(flats),
                "partition_numel": int(sum(self.opt.partition_size)),
                "param_numel": sum(p.numel() for g in self.opt.bit16_groups for p in g)}

    def gradients(self) -> dict:
        """After backward, before the step: the reduced gradient of this rank's partition (averaged_gradients:
        slices of the gradients of the parameters overlapping the partition), and the buffers behind them."""
        grads = [t for g in self.opt.averaged_gradients.values() if g is not None for t in g]
        return {"gradient_partition_bytes": tensor_bytes(grads), "gradient_storage_bytes": storage_bytes(grads),
                "gradient_dtype": str(grads[0].dtype) if grads else None}

    def optimizer_state(self) -> dict:
        """After a step: the fp32 master partition and the inner optimizer's state of it, by key."""
        masters = self.opt.single_partition_of_fp32_groups
        by_key: dict[str, int] = {}
        for master in masters:
            for key, value in self.opt.optimizer.state.get(master, {}).items():
                if torch.is_tensor(value):
                    by_key[key] = by_key.get(key, 0) + tensor_bytes([value])
        return {"fp32_master_partition_bytes": tensor_bytes(masters), "optimizer_state_bytes": by_key,
                "reduce_bucket_bytes": self.reduce_bucket_bytes, "step_fp32_grad_bytes": self.step_fp32_grad_bytes}


def gathered_in_forward(engine, vocab: int, micro_batch: int, seq: int, generator) -> dict:
    """Over one forward: the partitioned (not persistent) weights each module uses, in bytes, split into those
    ZeRO-3 materialised into a tensor of their own (a gather: allocated and filled) and those whose whole tensor is
    a view of this rank's partition (a world of one: DeepSpeed's NoGatherHandle). Read in forward pre-hooks
    registered after DeepSpeed's own, so each module's weights are fetched when read."""
    seen, out = set(), {"materialised_bytes": 0, "partition_view_bytes": 0, "tensors": 0}

    def record(module, _inputs):
        for p in module.parameters(recurse=False):
            if id(p) in seen or not hasattr(p, "ds_tensor") or getattr(p, "ds_persist", False):
                continue
            seen.add(id(p))
            own = p.data.untyped_storage().data_ptr() != p.ds_tensor.untyped_storage().data_ptr()
            out["materialised_bytes" if own else "partition_view_bytes"] += p.ds_numel * p.element_size()
            out["tensors"] += 1
    handles = [m.register_forward_pre_hook(record) for m in engine.module.modules()
               if any(True for _ in m.parameters(recurse=False))]
    ids = torch.randint(3, vocab, (micro_batch, seq), generator=generator)
    with torch.no_grad():
        engine(ids, attention_mask=torch.ones_like(ids), labels=ids)
    for h in handles:
        h.remove()
    return out


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
    ap.add_argument("--gathered-bytes", action="store_true",
                    help="over one extra forward, the bytes of the weights ZeRO-3 gathers into new tensors")
    ap.add_argument("--report", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)

    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
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
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    # referenced until the end (the `del` below): ZeRO-3 loading needs it; under ZeRO-2 the models load whole,
    # as the trainer loads them (parallelize.load_frozen_models)
    hf_ds_config = HfDeepSpeedConfig(ds) if stage == 3 else None
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
    probe = Zero2Probe(engine.optimizer) if isinstance(engine.optimizer, DeepSpeedZeroOptimizer) else None
    if probe:
        report["zero2"] = probe.layout()

    g = torch.Generator().manual_seed(100 + env.rank)
    vocab = anchor.config.vocab_size

    def step():
        ids = torch.randint(3, vocab, (args.micro_batch, args.seq), generator=g)
        out = engine(ids, attention_mask=torch.ones_like(ids), labels=ids)
        engine.backward(out.loss)
        if probe and "gradient_partition_bytes" not in report["zero2"]:  # the gradients exist until the step
            report["zero2"].update(probe.gradients())
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
    if probe:
        report["zero2"].update(probe.optimizer_state())
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

    if args.gathered_bytes:
        report["gathered_forward"] = gathered_in_forward(engine, vocab, args.micro_batch, args.seq, g)

    report["peak_rss_bytes"] = common.peak_rss_bytes()
    out_path = Path(args.report)
    common.write_json(out_path.with_name(f"{out_path.name}.rank{env.rank}.json"), report)
    shut_down_process_group()  # not exiting with gloo's threads alive (pytorch#179291)
    del hf_ds_config


if __name__ == "__main__":
    from calm_dist.training.dist_env import run_then_exit

    run_then_exit(main)
