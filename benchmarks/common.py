"""Shared pieces of the benchmarks: sizes, model builders, interleaved timing, memory probes.

Imported by run.py's child processes, by peer_bench.py (inside the peer venv, which sees the main venv's
packages) and by zero3_worker.py. Threads are pinned before torch is imported (one thread per process,
as the trainer runs each rank).
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Size:
    """One benchmark configuration: a Llama anchor + a Llama augmenting model, MHA, SwiGLU, untied head."""

    name: str
    anchor_d: int = 512
    anchor_layers: int = 8
    anchor_heads: int = 8
    aug_d: int = 256
    aug_layers: int = 8
    aug_heads: int = 4
    ffn_mult: int = 3            # intermediate = ffn_mult * d (x-transformers' ff_mult with a SwiGLU)
    vocab: int = 8192
    seq: int = 256
    batch: int = 8
    prompt: int = 32             # decoding: prompt length (batch 1)
    new_tokens: int = 256        # decoding: greedy tokens generated
    repeats: int = 7             # timed repeats per measurement (after warm-up); medians reported
    decode_repeats: int = 3      # repeats of the slow (no KV cache) decoding paths: 3, so one outlier cannot set
    #                              the median
    cache_rows: int = 128        # P7: rows written to the augmenting-state cache
    zero_batch: int = 2          # P5: micro-batch per rank of the ZeRO-3 steps
    zero_steps: int = 4          # P5: ZeRO-3 steps per rank (the first is warm-up)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """The paper's rule (calm_dist.model.layer_pairs.default_layer_pairs): every 4th augmenting block."""
        from calm_dist.model.layer_pairs import default_layer_pairs

        return default_layer_pairs(self.aug_layers, self.anchor_layers)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["pairs"] = [list(p) for p in self.pairs]
        return d


SIZES = {
    # ~47M parameters composed (anchor 35.7M, augmenting 8.9M, blocks 2.4M): big enough that matmuls dominate
    "full": Size("full"),
    "quick": Size("quick", anchor_d=256, anchor_layers=4, anchor_heads=4, aug_d=128, aug_layers=8, aug_heads=2,
                  vocab=4096, seq=128, batch=4, prompt=16, new_tokens=32, repeats=3, decode_repeats=1,
                  cache_rows=64, zero_steps=3),
}


def llama_config(d: int, layers: int, heads: int, size: Size):
    import transformers as T

    return T.LlamaConfig(hidden_size=d, intermediate_size=size.ffn_mult * d, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=size.vocab,
                         max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         attn_implementation="sdpa")


def anchor_config(size: Size):
    return llama_config(size.anchor_d, size.anchor_layers, size.anchor_heads, size)


def augmenting_config(size: Size):
    return llama_config(size.aug_d, size.aug_layers, size.aug_heads, size)


def build_models(size: Size, seed: int = 0):
    """(anchor, augmenting) random HF Llamas, eval mode."""
    import torch
    import transformers as T

    torch.manual_seed(seed)
    anchor = T.LlamaForCausalLM(anchor_config(size)).eval()
    augmenting = T.LlamaForCausalLM(augmenting_config(size)).eval()
    return anchor, augmenting


def build_composed(size: Size, seed: int = 0):
    from calm_dist import ComposedModel

    anchor, augmenting = build_models(size, seed)
    return ComposedModel(anchor, [augmenting], layer_pairs=[size.pairs])


def acting_blocks(model, seed: int = 0, scale: float = 0.2):
    """Non-zero composition blocks (norm weights near 1, the rest small noise), the same for every model built with
    `seed`: a freshly built composition equals its anchor (its blocks' output is zero-initialised), so decoding's
    token comparisons would not see the blocks at all. Timing does not change (the same ops on other values)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.blocks.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            p.copy_(1.0 + noise if "norm.weight" in name else noise)
    return model


def composed_training_step(model, ids, mask, opt=None, **forward_kwargs):
    """One training step of a composition as a closure: AdamW over its blocks, the LM loss over `ids`."""
    import torch

    opt = opt or torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        model(ids, attention_mask=mask, labels=ids, **forward_kwargs).loss.backward()
        opt.step()
    return step


def batch(size: Size, seed: int = 1, rows: int | None = None):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, size.vocab, (rows or size.batch, size.seq), generator=g)
    return ids, torch.ones_like(ids)


# ---- timing -------------------------------------------------------------------------------------------

class Timer:
    """Wall-clock and process CPU time of a block. With one thread per process, CPU time is the time the work
    itself took: it excludes the time the process waits while other jobs hold the (shared) cores, which wall
    time does not. CPU time is the basis of every ratio here; wall time is reported beside it."""

    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict[str, dict[str, list[float]]]:
    """Run every function `warmup` times, then `repeats` rounds of A, B, C, ... (round-robin, alternating the
    order, so slow phases of a shared machine hit every variant alike). Returns, per function, the CPU and
    wall seconds of each timed call: {"cpu": [...], "wall": [...]}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: {"cpu": [], "wall": []} for k in fns}
    for r in range(repeats):
        items = list(fns.items()) if r % 2 == 0 else list(reversed(fns.items()))
        for k, fn in items:
            with Timer() as t:
                fn()
            times[k]["cpu"].append(t.cpu)
            times[k]["wall"].append(t.wall)
    return times


def median(xs) -> float:
    return float(statistics.median(xs))


def summary(t: dict) -> dict:
    """`median_s` is the median CPU time (the basis of the ratios); wall-clock beside it."""
    cpu, wall = t["cpu"], t["wall"]
    return {"median_s": median(cpu), "min_s": float(min(cpu)), "max_s": float(max(cpu)), "n": len(cpu),
            "wall_median_s": median(wall), "wall_min_s": float(min(wall)), "wall_max_s": float(max(wall)),
            "cpu_s": [round(x, 6) for x in cpu], "wall_s": [round(x, 6) for x in wall]}


# ---- memory -------------------------------------------------------------------------------------------

def peak_rss_bytes() -> int:
    """This process's peak resident set (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Peak RSS while a block runs (a thread reads /proc/self/statm every `interval` s). Used on an untimed
    extra call, so two variants sharing one process each get their own peak."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self.start_rss = current_rss_bytes()
        self.peak = self.start_rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())


def peak_rss_of(fn) -> int:
    with RssSampler() as s:
        fn()
    return s.peak


# ---- profiles ------------------------------------------------------------------------------------------

CATEGORIES = [
    ("matmul (mm/addmm/bmm)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmm_")),
    ("attention (SDPA kernels)", ("scaled_dot_product", "flash_attention")),
    ("copies / casts / cat", ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::cat", "aten::contiguous",
                              "aten::index", "aten::embedding")),
    ("optimizer (AdamW)", ("_foreach", "Optimizer", "aten::lerp", "aten::addcdiv", "aten::addcmul", "aten::sqrt")),
]


def _category(name: str) -> str:
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "elementwise / norms / other"


def profile_ops(fns: dict, out: Path, calls: int = 2, filename: str = "profile_p1.md",
                title: str = "P1 profile") -> dict:
    """Self CPU time per aten op per call of each function (torch.profiler, mean of `calls`), grouped, and a
    diff table."""
    from torch.profiler import ProfilerActivity, profile

    per, wall_ms = {}, {}
    for name, fn in fns.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            wall_ms[name] = (time.perf_counter() - t0) * 1000.0 / calls
        ops = {}
        for e in prof.key_averages():
            ops[e.key] = {"self_ms": e.self_cpu_time_total / 1000.0 / calls, "count": e.count // calls}
        per[name] = ops
    names = list(fns)
    a, b = names[0], names[1]
    keys = sorted(set(per[a]) | set(per[b]),
                  key=lambda k: -(per[b].get(k, {}).get("self_ms", 0) - per[a].get(k, {}).get("self_ms", 0)))
    lines = [f"| op | {a} self ms | {b} self ms | delta ms | calls ({a} / {b}) |", "|---|---:|---:|---:|---:|"]
    for k in keys[:25]:
        x, y = per[a].get(k, {"self_ms": 0, "count": 0}), per[b].get(k, {"self_ms": 0, "count": 0})
        lines.append(f"| `{k}` | {x['self_ms']:.1f} | {y['self_ms']:.1f} | {y['self_ms'] - x['self_ms']:+.1f} | "
                     f"{x['count']} / {y['count']} |")
    groups = {}
    for name in names:
        g: dict[str, float] = {}
        for k, v in per[name].items():
            g[_category(k)] = g.get(_category(k), 0.0) + v["self_ms"]
        groups[name] = g
    cats = sorted({c for g in groups.values() for c in g})
    glines = [f"| category | {a} self ms | {b} self ms | delta ms |", "|---|---:|---:|---:|"]
    for c in cats:
        x, y = groups[a].get(c, 0.0), groups[b].get(c, 0.0)
        glines.append(f"| {c} | {x:.1f} | {y:.1f} | {y - x:+.1f} |")
    glines.append(f"| **total of op self times** | {sum(groups[a].values()):.1f} | {sum(groups[b].values()):.1f} | "
                  f"{sum(groups[b].values()) - sum(groups[a].values()):+.1f} |")
    glines.append(f"| wall time per call (profiler on) | {wall_ms[a]:.1f} | {wall_ms[b]:.1f} | "
                  f"{wall_ms[b] - wall_ms[a]:+.1f} |")
    text = (f"# {title}: `{a}` vs `{b}`, per call (torch.profiler, self CPU time, mean of {calls} calls, 1 thread)\n\n"
            "## By category\n\n" + "\n".join(glines) + "\n\n## Top ops by delta\n\n" + "\n".join(lines) + "\n")
    (out / filename).write_text(text)
    return {"groups_ms": groups, "wall_ms": wall_ms, "table": filename}


def write_json(path, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1, default=str) + "\n")
