"""This machine's peak FLOP/s: the denominator of MFU in the training log and the benchmarks.

The GPU table is plain data that `calm-dist plan` reads for its default peak; torch is imported only inside the
functions that query the device or measure a matmul, so importing this module stays torch-free."""
from __future__ import annotations

GPU_PEAK_TFLOPS = {  # dense tensor-core peaks per GPU: (bf16, fp32)
    "H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5), "L40S": (362.0, 91.6), "A10": (125.0, 31.2),
}


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
