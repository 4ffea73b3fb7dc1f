"""The machine's speed at one moment: a fixed one-thread workload timed in CPU seconds, run beside a CPU profile
(benchmarks/cpu_profile.py) and beside the steps that profile predicts (benchmarks/plan_worker.py).

This host's speed drifts by 10-40% within an hour with nothing else running on it (benchmarks/README.md, P9p): a
profile measured in a slow stretch predicts the steps of a fast one too slow. Timed at the profile's start and end,
the workload shows whether the machine moved while the profile was measured (cpu_profile.py warns above 5%); timed
beside each P9p process, it is the `speed` column of plan_bench.py's table (the probe there / the profile's). It is
a diagnostic beside the errors, not a correction of them: in some processes it reads slow while their steps do not
(benchmarks/README.md, P9p).

The workload is a step's two kinds of work in miniature: matmuls of 512 tokens x 512 wide against 1536 x 512
weights, cycling through a 24 MiB working set (past the caches, as a step's projections read each weight once), and
adds of 4 MiB tensors over a 64 MiB working set, three passes of each. Every result goes into a tensor allocated
once: the probe measures the core and the memory, not the allocator, whose state differs from process to process.
One call takes ~0.13 s here.

    python benchmarks/speed_probe.py [--repeats 7]
"""
from __future__ import annotations

import argparse
import json

import common  # noqa: F401  (pins threads before torch is imported)


class SpeedProbe:
    """Call it to run the workload once; its inputs are allocated at construction, outside every timed call."""

    def __init__(self, tokens: int = 512, width: int = 512, elementwise_bytes: int = 4 << 20, passes: int = 3) -> None:
        import torch

        self.passes = passes  # each pass ~0.05 s here: three keep the timer's and the scheduler's jitter small

        g = torch.Generator().manual_seed(0)
        n_pairs = max(2, (24 << 20) // (4 * (tokens * width + 3 * width * width)))
        # x @ w.T, as F.linear computes a projection, into one output tensor
        self.pairs = [(torch.randn(tokens, width, generator=g), torch.randn(3 * width, width, generator=g).t())
                      for _ in range(n_pairs)]
        self.product = torch.empty(tokens, 3 * width)
        n_tensors = max(2, (64 << 20) // elementwise_bytes)
        self.tensors = [torch.randn(elementwise_bytes // 4, generator=g) for _ in range(n_tensors + 1)]
        self.sums = [torch.zeros(elementwise_bytes // 4) for _ in range(n_tensors)]

    def matmuls(self) -> None:
        import torch

        for _ in range(self.passes):
            for x, w_t in self.pairs:
                torch.mm(x, w_t, out=self.product)

    def adds(self) -> None:
        import torch

        for _ in range(self.passes):
            for a, b, out in zip(self.tensors, self.tensors[1:], self.sums):
                torch.add(a, b, out=out)

    def __call__(self) -> None:
        self.matmuls()
        self.adds()


def measure(repeats: int = 7, probe: SpeedProbe | None = None) -> dict:
    """CPU seconds of `repeats` calls (after one warm-up), with the two halves timed apart: {median_s, cpu_s,
    matmul_median_s, elementwise_median_s}."""
    probe = probe or SpeedProbe()
    t = common.interleaved({"matmul": probe.matmuls, "elementwise": probe.adds}, repeats=repeats)
    total = [m + e for m, e in zip(t["matmul"]["cpu"], t["elementwise"]["cpu"])]
    return {"median_s": common.median(total), "cpu_s": [round(x, 6) for x in total],
            "matmul_median_s": common.median(t["matmul"]["cpu"]),
            "elementwise_median_s": common.median(t["elementwise"]["cpu"])}


def reference_seconds(profile: dict) -> float | None:
    """The probe's median CPU seconds recorded with a CPU profile, or None for a profile measured without it."""
    return (profile.get("speed_probe") or {}).get("median_s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    print(json.dumps(measure(args.repeats), indent=1))


if __name__ == "__main__":
    main()
