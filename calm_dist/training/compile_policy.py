"""`train.compile: auto`: compile the frozen decoder blocks when the run is long enough to earn the compilation
back.

Compiling costs ~20 s per process at the start (inductor, both models of the benchmark composition: benchmarks/
README.md, P3c) and saves ~10% of every step after it (the compiled step measured 0.88-0.90x the eager one on the
CPU, under ZeRO-3 with leaf blocks). It pays once train.steps x the expected step time x 10% exceeds those 20 s,
i.e. after ~200 s of training. The expected step time is the step's model FLOPs on one rank
(`planning.costs.step_cost`) at half this rank's peak (`planning.hardware.peak_flops_per_rank`), an optimistic
time: small models reach far less than half the peak, so auto errs towards not compiling the short runs of tests
and smoke runs, where compilation would cost more than the run.

auto also stays off where the frozen blocks' elementwise work is fused already (model.fused_kernels: on one H200,
Liger's kernels gave 48% MFU and compilation 44%, benchmarks/README.md P8), and where compiling cannot work:
without distributed.zero3_leaf_blocks (DeepSpeed's per-module hooks cannot run inside a compiled block) or without
a compiler for inductor (a C++ compiler on the CPU, Triton on a GPU). `true` and `false` are obeyed as they are
(true's conditions are preflight's).
"""
from __future__ import annotations

import importlib.util
import shutil

from calm_dist.config import Config
from calm_dist.planning.costs import step_cost
from calm_dist.planning.hardware import peak_flops_per_rank
from calm_dist.training.ds_config import zero_stage

COMPILE_S = 20.0       # compilation per process (benchmarks/README.md, P3c)
STEP_GAIN = 0.10       # the share of a step compilation saves (P3c: 0.88-0.90x the eager step)
ASSUMED_MFU = 0.5      # of the peak, for the expected step time: optimistic on purpose (module docstring)


def compiler_available(device_type: str) -> bool:
    if device_type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return any(shutil.which(cc) for cc in ("c++", "g++", "clang++"))


def expected_step_s(cfg: Config, resolved, peak_flops: float) -> float:
    """One optimizer step of one rank: its tokens x the step's model FLOPs per token at ASSUMED_MFU of the peak."""
    per_token = step_cost(resolved.anchor_config, resolved.augmenting_configs, resolved.layer_pairs,
                          seq_len=cfg.data.seq_len, states=cfg.train.augmenting_states,
                          activation_checkpointing=cfg.train.activation_checkpointing).total
    tokens = cfg.train.micro_batch_size * resolved.accumulation * cfg.data.seq_len
    return tokens * per_token / (ASSUMED_MFU * peak_flops)


def hooks_inside_blocks(cfg: Config, stage: int) -> bool:
    """Whether DeepSpeed hooks each module inside the frozen blocks (ZeRO-3 without leaf blocks), which a compiled
    block cannot run: train.compile=true is refused then, and auto stays off."""
    return stage == 3 and not cfg.distributed.zero3_leaf_blocks


def decide(cfg: Config, resolved, device_type: str = "cpu") -> tuple[bool, str]:
    """(compile?, why) for train.compile: true and false as set; auto by the rule of the module docstring."""
    setting = cfg.train.compile
    if setting != "auto":
        return bool(setting), f"train.compile={str(setting).lower()}"
    if cfg.model.method != "calm":
        return False, "train.compile=auto: off (the LoRA baseline's blocks all train: none is compiled)"
    if hooks_inside_blocks(cfg, zero_stage(resolved.ds_config)):
        return False, "train.compile=auto: off (distributed.zero3_leaf_blocks=false)"
    if cfg.model.fused_kernels != "none":
        return False, f"train.compile=auto: off (model.fused_kernels={cfg.model.fused_kernels} fuses the blocks' " \
                      "elementwise work already)"
    if not compiler_available(device_type):
        return False, f"train.compile=auto: off (no compiler for inductor on {device_type})"
    step_s = expected_step_s(cfg, resolved, peak_flops_per_rank(cfg.train.precision, cfg.train.peak_tflops_per_rank))
    gain_s = cfg.train.steps * step_s * STEP_GAIN
    on = gain_s > COMPILE_S
    return on, (f"train.compile=auto: {'on' if on else 'off'} ({cfg.train.steps} steps x ~{step_s:.3g} s expected: "
                f"compiling would save ~{gain_s:.0f} s for ~{COMPILE_S:.0f} s of compilation)")
