"""The hardware the planner times a step on, and this machine's peak FLOP/s (the denominator of MFU in the
training log and the benchmarks).

`Hardware` is plain data that `calm-dist plan` reads: a GPU node (compute at an assumed MFU of the dense peak,
communication at nominal link rates, overlapped), or a CPU (kind "cpu": the measured rates and fixed costs of
calm_dist/planning/cpu_time.py, communication in series with compute). `PROFILES` names the known ones;
`hardware(name_or_path)` also reads a profile JSON that benchmarks/cpu_profile.py wrote. torch is imported only
inside the functions that query the device or measure a matmul, so importing this module stays torch-free."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

GPU_PEAK_TFLOPS = {  # dense tensor-core peaks per GPU: (bf16, fp32)
    "H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5), "L40S": (362.0, 91.6), "A10": (125.0, 31.2),
}


@dataclass(frozen=True)
class Hardware:
    """Per-rank figures; the defaults are an H100 SXM node (8 GPUs on NVLink, one 400 Gb/s NIC per GPU)."""

    gpu_peak_tflops: float = GPU_PEAK_TFLOPS["H100"][0]   # dense bf16 tensor-core peak
    gpu_mem_gib: float = 80.0        # memory per rank; on a CPU (kind "cpu") the node's, shared by its ranks
    net_GBps: float = 50.0           # inter-node bandwidth per GPU (400 Gb/s InfiniBand NDR)
    nvlink_GBps: float = 450.0       # intra-node bandwidth per GPU, one direction (NVLink 4: 900 GB/s both ways)
    disk_write_GBps: float = 2.0     # per node, to the cache's file system
    disk_read_GBps: float = 2.0      # per node
    reserve_gib: float = 4.0         # CUDA context, NCCL buffers, allocator fragmentation (a rule of thumb)
    name: str = "H100"
    kind: str = "gpu"                # "gpu": compute at an assumed MFU; "cpu": cpu_time's measured model
    # kind "cpu" (benchmarks/cpu_profile.py measures them; one thread per rank, fp32):
    matmul_gflops: tuple = ()        # ((tokens, width, GFLOP/s), ...) of F.linear(x[T, D], W[3D, D])
    attention_gflops: tuple = ()     # ((seq_len, GFLOP/s), ...) of causal SDPA forward + backward
    elementwise_GBps: tuple = ()     # ((tensor bytes, GB/s), ...) of an out-of-place add, 3 tensors moved
    collective_latency_s: float = 0.0  # per all-gather / reduce-scatter call between the node's ranks
    matmul_efficiency: float = 1.0   # what a real step's matmuls reach of the table's rates (profiled in situ)
    attention_efficiency: float = 1.0
    elementwise_efficiency: float = 1.0
    block_call_s: float = 0.0        # fixed cost of one block call (forward or backward) beyond its kernels, ZeRO-3
    micro_step_s: float = 0.0        # fixed cost of one micro-step (engine, embeddings, loss bookkeeping), ZeRO-3
    optimizer_step_s: float = 0.0    # fixed cost of one optimizer step (DeepSpeed's step beyond AdamW's bytes), ZeRO-3
    # the same three under ZeRO-2 (no hooks on any block, gradient hooks and a partitioned step instead), fitted on
    # stage-2 steps; a profile without them leaves ZeRO-3's to stand for them
    stage2_fixed_s: tuple = ()       # (block_call_s, micro_step_s, optimizer_step_s)

    def fixed_costs(self, zero_stage: int) -> tuple[float, float, float]:
        """(per block call, per micro-step, per optimizer step): ZeRO-3's, or stage 2's for stages 0-2 (none of
        them hooks a module's parameters)."""
        if zero_stage < 3 and self.stage2_fixed_s:
            return tuple(self.stage2_fixed_s)
        return self.block_call_s, self.micro_step_s, self.optimizer_step_s

    def rank_mem_bytes(self, ranks_per_node: int) -> float:
        """Memory one rank may fill: a GPU's own, or a CPU node's shared evenly by its ranks."""
        gib = self.gpu_mem_gib / ranks_per_node if self.kind == "cpu" else self.gpu_mem_gib
        return gib * 1024 ** 3

    @property
    def overlap_comm(self) -> bool:
        """GPUs overlap gathers with compute (DeepSpeed's prefetch on its own stream); a CPU rank with one thread
        and `overlap_comm: false` (ds_configs/zero3.json) does one after the other."""
        return self.kind != "cpu"


# "cpu": this project's machine, one thread per rank, measured by `benchmarks/cpu_profile.py --install` (the date,
# the machine and the other jobs' load during the measurement are recorded in the file)
CPU_PROFILE_FILE = "cpu_profile.json"
FIXED_COST_KEYS = ("block_call_s", "micro_step_s", "optimizer_step_s")  # a profile's fixed costs, in that order
PROFILES = {
    "h100": Hardware(),
    "h200": Hardware(name="H200", gpu_mem_gib=141.0, gpu_peak_tflops=GPU_PEAK_TFLOPS["H200"][0]),
    "a100": Hardware(name="A100", gpu_mem_gib=80.0, gpu_peak_tflops=GPU_PEAK_TFLOPS["A100"][0], nvlink_GBps=300.0,
                     net_GBps=25.0),
}


def from_profile_json(path: str) -> Hardware:
    """A CPU `Hardware` from a profile benchmarks/cpu_profile.py wrote."""
    with open(path) as f:
        d = json.load(f)
    fc = d["fixed_costs"]
    mem_gib = d.get("machine", {}).get("mem_gib") or _node_mem_gib()
    # the date goes into the name the plan prints: this machine's speed drifts by 10-20% between hours, so a
    # profile's age is part of what its step times mean (benchmarks/README.md, P9p)
    measured = d.get("machine", {}).get("date_utc")
    return Hardware(
        name=f"cpu ({os.path.basename(path)}{f', measured {measured}' if measured else ''})", kind="cpu",
        gpu_peak_tflops=_peak_gflops(d["matmul_gflops"]) / 1e3,
        gpu_mem_gib=mem_gib, nvlink_GBps=d["collective"]["GBps"], net_GBps=d["collective"]["GBps"],
        collective_latency_s=d["collective"]["latency_s"], reserve_gib=d.get("reserve_gib", 0.6),
        matmul_gflops=tuple(map(tuple, d["matmul_gflops"])), attention_gflops=tuple(map(tuple, d["attention_gflops"])),
        elementwise_GBps=tuple(map(tuple, d["elementwise_GBps"])), block_call_s=fc["block_call_s"],
        **{f"{k}_efficiency": v for k, v in d.get("in_situ_efficiency", {}).items()},
        micro_step_s=fc["micro_step_s"], optimizer_step_s=fc["optimizer_step_s"],
        stage2_fixed_s=tuple(fc["stage2"][k] for k in FIXED_COST_KEYS) if "stage2" in fc else ())


def _peak_gflops(table) -> float:
    return max(row[-1] for row in table)


def _node_mem_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3
    except (ValueError, OSError, AttributeError):
        return 16.0


def hardware(name_or_path: str, **overrides) -> Hardware:
    """A named profile (`PROFILES`, or "cpu": this machine's measured profile), or a profile JSON's path;
    `overrides` replace single fields (the command line's --gpu-mem-gib and friends)."""
    key = name_or_path.lower()
    if key in PROFILES:
        hw = PROFILES[key]
    elif key == "cpu":
        hw = from_profile_json(shipped_cpu_profile())
    elif os.path.isfile(name_or_path):
        hw = from_profile_json(name_or_path)
    else:
        raise ValueError(f"unknown hardware {name_or_path!r}: one of {', '.join([*PROFILES, 'cpu'])} or a profile "
                         f"JSON written by benchmarks/cpu_profile.py")
    return dataclasses.replace(hw, **{k: v for k, v in overrides.items() if v is not None})


def shipped_cpu_profile() -> str:
    """The CPU profile measured on this project's machine, shipped beside this module."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), CPU_PROFILE_FILE)


def measured_matmul_peak(dtype=None, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a square matmul on this process's CPU threads (best of `repeats`): the MFU denominator here."""
    import time

    import torch

    a = torch.randn(n, n, dtype=dtype or torch.float32)
    b = torch.randn(n, n, dtype=dtype or torch.float32)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def peak_flops_per_rank(precision: str = "fp32", configured_tflops: float | None = None) -> float:
    """The configured peak, else a known GPU's table entry, else a measured CPU matmul peak."""
    if configured_tflops:
        return configured_tflops * 1e12
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, (bf16, fp32) in GPU_PEAK_TFLOPS.items():
            if key in name:
                return (bf16 if precision == "bf16" else fp32) * 1e12
    return measured_matmul_peak()
