"""Peak memory of a job's ranks, for the progress line and MLflow: the host's, and the accelerator's where there
is one.

- host: the process's peak resident set size (`ru_maxrss`), the high-water mark since the process started:
  the kernel keeps no other peak, and it is the number an out-of-memory kill is about.
- accelerator (CUDA): the peak of memory allocated by PyTorch since the previous report, then the peak is reset,
  so each report holds the peak of the steps it covers.
Both are the maximum over ranks (the rank that runs out first is the one that matters), one all_reduce per
report.
"""
from __future__ import annotations

import resource
import sys

import torch
import torch.distributed as dist

GIB = 2 ** 30


def host_peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def accelerator_peak_bytes(device: torch.device) -> int | None:
    """PyTorch's peak allocation on `device` since the last call (None off CUDA), then the peak is reset."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def peak_memory(device: torch.device) -> dict[str, float]:
    """{"mem/peak_host_gib": ..., "mem/peak_accelerator_gib": ... (on CUDA)}, the maximum over ranks. Collective
    when a process group is up: every rank calls it at the same step."""
    accelerator = accelerator_peak_bytes(device)
    peaks = torch.tensor([host_peak_bytes(), accelerator or 0], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    host, accel = peaks.tolist()
    return {"mem/peak_host_gib": host / GIB} | ({"mem/peak_accelerator_gib": accel / GIB}
                                                 if accelerator is not None else {})
