#!/usr/bin/env bash
# One short GPU benchmark of a CALM training step: a ~1.1B Llama anchor + a ~0.34B Llama augmenting model,
# built from configs (random weights, no download, no network), bf16, DeepSpeed ZeRO-3 on one rank
# (a single process with RANK=0 WORLD_SIZE=1), 6 layer pairs (the paper's every-4th rule).
#
# Measures, interleaved after warm-up (median of STEPS): the composed training step with recomputed
# augmenting states, the same step with cached states, and the frozen anchor's fwd+bwd (input gradients only):
# step time, tokens/s, MFU = tokens/s x cost-model FLOPs per token (calm_dist.planning.costs.step_cost) / 989 TFLOP/s
# (H100 SXM dense bf16; override with PEAK_TFLOPS). Writes $OUT/gpu_bench.json (or
# benchmarks/results/gpu_bench.json without $OUT). Budget: < 5 minutes (the python part is capped at 270 s).
#
#   bash benchmarks/gpu.sh                       # from the repository root, on a machine with an NVIDIA GPU
#   PYTHON=.venv/bin/python STEPS=10 SEQ=2048 MICRO=8 bash benchmarks/gpu.sh
#   COMPILE=1 bash benchmarks/gpu.sh             # the frozen blocks compiled (train.compile=true)
#   ZERO3=0 LIGER=1 bash benchmarks/gpu.sh       # plain PyTorch (no ZeRO-3); Liger Kernel's fused ops and loss
#   ZERO=2 LIGER=1 bash benchmarks/gpu.sh        # DeepSpeed ZeRO-2, as the trainer runs distributed.deepspeed_config
#                                                # =zero2: frozen models whole on the GPU, the blocks' state sharded
#   PERSIST=1e9 bash benchmarks/gpu.sh           # ZeRO-3 keeps every frozen tensor whole (the planner's replicate)
#   PROFILE=1 bash benchmarks/gpu.sh             # and one profiled recomputed step: gpu_profile.txt beside the JSON
#   GPU_BENCH_SMOKE=1 bash benchmarks/gpu.sh     # tiny models on the CPU, fp32: checks the script's plumbing
#
# Needs torch (CUDA build), transformers and, for ZeRO, deepspeed; without deepspeed it still runs, as plain
# single-GPU PyTorch, and says so in the JSON ("zero_stage": 0, "zero3": false).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 LOCAL_WORLD_SIZE=1 LOCAL_SIZE=1 MASTER_ADDR=127.0.0.1
export MASTER_PORT=${MASTER_PORT:-29517}
export TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "${GPU_BENCH_SMOKE:-0}" = 1 ]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
else
  export DS_ACCELERATOR=cuda
fi
OUT_DIR=${OUT:-benchmarks/results}
mkdir -p "$OUT_DIR"
command -v nvidia-smi >/dev/null \
  && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

timeout "${TIMEOUT_S:-270}" "$PYTHON" - "$OUT_DIR/gpu_bench.json" <<'PY'
import json, os, statistics, sys, time, traceback

import torch
import transformers as T

from calm_dist import ComposedModel
from calm_dist.planning import costs
from calm_dist.planning.hardware import GPU_PEAK_TFLOPS
from calm_dist.model.backbones import decoder
from calm_dist.training.parallelize import compile_frozen_blocks
from calm_dist.model.composition import position_ids_from_mask
from calm_dist.model.lm_loss import head_loss

out_path = sys.argv[1]
smoke = os.environ.get("GPU_BENCH_SMOKE") == "1"
cuda = torch.cuda.is_available() and not smoke
if not cuda and not smoke:
    sys.exit("no CUDA device: run on a GPU machine (or GPU_BENCH_SMOKE=1 for the CPU plumbing check)")
device = torch.device("cuda", 0) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
dtype = torch.bfloat16 if cuda else torch.float32
STEPS = int(os.environ.get("STEPS", 8 if cuda else 2))
WARMUP = int(os.environ.get("WARMUP", 2 if cuda else 1))
SEQ = int(os.environ.get("SEQ", 2048 if cuda else 32))
MICRO = int(os.environ.get("MICRO", 8 if cuda else 2))
PEAK = float(os.environ.get("PEAK_TFLOPS", GPU_PEAK_TFLOPS["H100"][0])) * 1e12  # H100 SXM dense bf16
LIGER = os.environ.get("LIGER") == "1"  # Liger Kernel's fused norms, activations, rotary and loss (needs the package)
COMPILE = os.environ.get("COMPILE") == "1"  # train.compile=true: compiled frozen blocks (compiled in the warm-up)
STAGE = int(os.environ.get("ZERO", "3"))  # the DeepSpeed ZeRO stage the trainer would run: 3 (default) or 2
if STAGE not in (2, 3):
    sys.exit(f"ZERO={STAGE}: the trainer runs ZeRO stage 2 or 3")

if smoke:
    anchor_cfg = T.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=6, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=512, max_position_embeddings=SEQ)
    aug_cfg = T.LlamaConfig(hidden_size=32, intermediate_size=88, num_hidden_layers=8, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=512, max_position_embeddings=SEQ)
else:
    # ~1.1B anchor (TinyLlama-1.1B's shape) and ~0.34B augmenting model, one vocabulary
    anchor_cfg = T.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)
    aug_cfg = T.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                            num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)
for c in (anchor_cfg, aug_cfg):
    c.bos_token_id, c.eos_token_id, c.pad_token_id = 1, 2, None
    c._attn_implementation = "sdpa"
pairs = costs.default_layer_pairs(aug_cfg.num_hidden_layers, anchor_cfg.num_hidden_layers)
result = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (smoke)", "dtype": str(dtype), "seq": SEQ,
          "micro_batch": MICRO, "steps": STEPS, "warmup": WARMUP, "compile": COMPILE, "liger": LIGER,
          "persistence_threshold": float(os.environ.get("PERSIST", 1e5)), "layer_pairs": pairs,
          "peak_flops": PEAK, "torch": torch.__version__, "transformers": T.__version__, "errors": {}}

try:
    if os.environ.get("ZERO3", "1") == "0":
        raise ImportError("ZERO3=0: plain single-GPU PyTorch asked for")
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    from calm_dist.training.dist_env import DistEnv, init_process_group
    from calm_dist.training.parallelize import mark_zero3_leaf_blocks

    stage = STAGE
    result["deepspeed"] = deepspeed.__version__
except ImportError as e:
    stage = 0  # plain PyTorch
    result["errors"]["deepspeed_import"] = repr(e)
zero3 = stage == 3
result["zero_stage"], result["zero3"] = stage, zero3

ds = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1, "train_batch_size": MICRO,
      "gradient_clipping": 1.0, "bf16": {"enabled": dtype == torch.bfloat16}, "steps_per_print": 10 ** 9,
      "wall_clock_breakdown": False, "zero_allow_untested_optimizer": True,
      "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": 5e7, "stage3_prefetch_bucket_size": 5e7,
                            "stage3_param_persistence_threshold": float(os.environ.get("PERSIST", 1e5)),
                            "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9}}
if stage == 2:  # ds_configs/zero2.json's knobs, with overlap as on the ZeRO-3 runs
    ds["zero_optimization"] = {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "reduce_scatter": True,
                               "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7}

def build(cfg):
    # random init from the config; with HfDeepSpeedConfig alive the weights are initialised, then partitioned;
    # without ZeRO-3 they are initialised on the device (a 1.4B init on the CPU takes minutes)
    if not zero3:
        with torch.device(device):
            try:
                return T.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
            except TypeError:
                return T.AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    try:
        return T.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    except TypeError:
        return T.AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)

t_setup = time.perf_counter()
if stage:
    init_process_group(DistEnv.from_environ(), 600)
if zero3:
    keep_alive = HfDeepSpeedConfig(ds)
torch.manual_seed(0)
anchor, aug = build(anchor_cfg), build(aug_cfg)
if LIGER:
    # Liger Kernel's Triton RMSNorm, SwiGLU and RoPE in both frozen models, and its fused linear-cross-entropy
    from calm_dist.model.fused_kernels import apply_fused_kernels  # model.fused_kernels=liger
    for m in (anchor, aug):
        apply_fused_kernels(m, "liger")
model = ComposedModel(anchor, [aug], layer_pairs=[pairs], loss_kernel="liger" if LIGER else "chunked")
model.blocks.to(dtype)
if COMPILE:
    compile_frozen_blocks([anchor, aug])
optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)
if stage:
    if zero3:
        mark_zero3_leaf_blocks([anchor, aug])  # as the trainer does (distributed.zero3_leaf_blocks)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    forward, backward, opt_step = engine, engine.backward, engine.step
else:
    model.to(device)
    forward = model
    backward = lambda loss: loss.backward()  # noqa: E731
    def opt_step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
model.train()
result["setup_s"] = time.perf_counter() - t_setup
result["optimizer"] = type(optimizer).__name__  # DeepSpeed's ZeRO optimizer of the stage, or AdamW
n = lambda ps: sum(getattr(p, "ds_numel", p.numel()) for p in ps)  # noqa: E731
result["params"] = {"anchor": n(model.anchor.parameters()), "augmenting": n(model.augmenting.parameters()),
                    "trainable": n(model.trainable_parameters())}

g = torch.Generator().manual_seed(1)
ids = torch.randint(3, anchor_cfg.vocab_size, (MICRO, SEQ), generator=g).to(device)
mask = torch.ones_like(ids)
pos = position_ids_from_mask(mask)
with torch.no_grad():
    states = model.run_augmenting(ids, mask, pos)
embed = model.anchor.get_input_embeddings()

def recompute_step():
    out = forward(ids, attention_mask=mask, labels=ids)
    backward(out.loss)
    opt_step()

def cached_step():
    out = forward(ids, attention_mask=mask, labels=ids, augmenting_states=states)
    backward(out.loss)
    opt_step()

def anchor_alone():
    # the frozen anchor's forward + input-gradient backward (no weight gradients), no optimizer; the loss as
    # the composed step computes it (lm_loss.head_loss, no logits tensor)
    e = embed(ids).detach().requires_grad_(True)
    hidden = decoder(anchor)(inputs_embeds=e, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    head_loss(hidden, anchor.get_output_embeddings(), ids).backward()

def sync():
    if cuda:
        torch.cuda.synchronize()

fns = {"recompute": recompute_step, "cached": cached_step, "anchor_alone": anchor_alone}
times = {k: [] for k in fns}
for r in range(WARMUP + STEPS):
    for name, fn in fns.items():
        if name in result["errors"]:
            continue
        try:
            sync(); t0 = time.perf_counter()
            fn()
            sync()
            if r >= WARMUP:
                times[name].append(time.perf_counter() - t0)
        except Exception as e:  # one failing variant must not lose the others
            result["errors"][name] = "".join(traceback.format_exception_only(type(e), e)).strip()

if os.environ.get("PROFILE") == "1" and "recompute" not in result["errors"]:
    # one more recomputed step under the profiler: where the time goes, by operator (self time on the device)
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        recompute_step()
        sync()
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=30, max_name_column_width=60)
    with open(os.path.join(os.path.dirname(out_path), "gpu_profile.txt"), "w") as f:
        f.write(table)
    print(table)

tokens = MICRO * SEQ
cost = {s: costs.step_cost(anchor_cfg, aug_cfg, pairs, seq_len=SEQ, states=s) for s in ("recompute", "cached")}
for name in ("recompute", "cached"):
    if times[name]:
        med = statistics.median(times[name])
        result[name] = {"step_s_median": med, "step_s": times[name], "tokens_per_s": tokens / med,
                        "model_flops_per_token": cost[name].total,
                        "tflops_per_s": tokens * cost[name].total / med / 1e12,
                        "mfu": cost[name].mfu(tokens / med, PEAK)}
if times["anchor_alone"]:
    result["anchor_alone"] = {"step_s_median": statistics.median(times["anchor_alone"]),
                              "step_s": times["anchor_alone"]}
    if times["cached"]:
        result["P1_cached_over_anchor_alone"] = (result["cached"]["step_s_median"]
                                                 / result["anchor_alone"]["step_s_median"])
if times["cached"] and times["recompute"]:
    result["P2_cached_over_recompute"] = result["cached"]["step_s_median"] / result["recompute"]["step_s_median"]
    result["P2_predicted"] = cost["cached"].total / cost["recompute"].total
if cuda:
    result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
with open(out_path, "w") as f:
    json.dump(result, f, indent=1)
for name in ("recompute", "cached"):
    if name in result:
        r = result[name]
        print(f"{name:9s}: {r['step_s_median'] * 1e3:8.1f} ms/step  {r['tokens_per_s']:>10,.0f} tok/s  "
              f"{r['tflops_per_s']:7.1f} TFLOP/s  MFU {r['mfu']:.1%}")
for k in ("P1_cached_over_anchor_alone", "P2_cached_over_recompute", "P2_predicted"):
    if k in result:
        print(f"{k}: {result[k]:.3f}")
if result["errors"]:
    print("errors:", json.dumps(result["errors"], indent=1))
print(f"wrote {out_path}")
sys.exit(1 if not times["recompute"] else 0)
PY
