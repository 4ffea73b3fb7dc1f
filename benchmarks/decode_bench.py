#!/usr/bin/env python
"""Decoding against the memory roofline, in bf16, and batched (issue #22); ratios measured side by side in one run.

    python benchmarks/decode_bench.py [--size full] [--json benchmarks/results/decode.json] [--repeats 5]

One process, one thread (as a rank runs). In the same run:
  - the single-core read bandwidth: a STREAM-like kernel (torch's sum over a 512 MiB fp32 array, so every byte
    is read once from memory), median of 7, before and after the rounds and in every round between the two fp32
    batch-1 variants; a copy kernel beside it for reference;
  - greedy KV-cached decoding of `new_tokens` tokens after a `prompt`-token prompt, batch 1 and batch 16, with
    the frozen models in fp32 and in bf16 (the composition blocks in fp32 or in bf16), variants interleaved
    round-robin, the order reversed every round; CPU-time medians.

The bytes a batch-1 step reads: the weights of every module a step runs (found with forward hooks: the anchor's LM
head runs, an augmenting model's does not), except the input embedding tables (a step reads one row of each), plus
the KV caches at the mean context length (each model's K and V of every layer, and each composition block's
projected keys and values). Goals:
  P4r    fp32 batch-1 tokens/s / (read bandwidth / bytes per token)               >= 0.8
         (each round's step against that round's bandwidth; the median of the rounds)
  P4b16  batch-16 tokens/s / batch-1 tokens/s (same dtype)                          >= 8
Each also with one compiled graph per decoding step (`generate(compile_step=True)`), its compilation timed apart
and its tokens compared with the eager step's.
Beside them: each batch-16 step against its own roofline (the weights once, the KV caches of 16 rows), and the
P4b16 that steps at equal fractions of their rooflines would give (16 x bytes of a batch-1 step / of a batch-16 one).
The bf16 rows report their own roofline and whether their tokens equal fp32's (the first difference, if any).
A torch.profiler table of one fp32 batch-1 generation shows where the time beyond the roofline goes, and the fp32
matmuls alone (one row through every weight matrix, as a step multiplies them) show the share of the read bandwidth
that the matmul kernels reach: the ceiling of P4r.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import common  # noqa: E402  (pins one thread per process before torch loads)
from machine import machine_info  # noqa: E402


def read_bandwidth(mib: int = 512, repeats: int = 7) -> dict:
    """Bytes per second of a sum over `mib` MiB (read once), and of a copy (read + write), medians."""
    import torch

    a = torch.ones(mib * 2**20 // 4)
    b = torch.empty_like(a)
    a.sum(), b.copy_(a)  # touch every page first

    def timed(fn) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)
    read = a.numel() * 4 / timed(a.sum)
    copy = 2 * a.numel() * 4 / timed(lambda: b.copy_(a))
    return {"read_bytes_per_s": read, "copy_bytes_per_s": copy, "array_mib": mib}


def modules_a_step_calls(model) -> list:
    """The modules one decoding step runs, found with forward hooks over a short eager generation (not assumed: an
    augmenting model's LM head, for one, never runs, since the blocks read its hidden states)."""
    import torch

    called: dict[int, torch.nn.Module] = {}

    def record(module, *_) -> None:  # returns None: a forward hook's return value would replace the output
        called[id(module)] = module
    hooks = [m.register_forward_hook(record) for m in model.modules()]
    try:
        first = next(model.parameters())
        model.generate(torch.full((1, 4), 3, device=first.device), max_new_tokens=2, eos_token_id=-1)
    finally:
        for h in hooks:
            h.remove()
    return list(called.values())


def weights_a_step_reads(model) -> list:
    """The parameters one decoding step reads whole: those of every module it runs but the input embedding tables
    (a step reads one row of each). A head tied to its embeddings counts, as the head's parameter."""
    import torch

    read = {id(p): p for m in modules_a_step_calls(model) if not isinstance(m, torch.nn.Embedding)
            for p in m.parameters(recurse=False)}
    return list(read.values())


def matmul_read_rate(model, repeats: int = 7) -> float:
    """Bytes per second that one row through every weight matrix a decoding step multiplies (each nn.Linear it runs,
    the anchor's LM head included; one F.linear call each, as a step makes them) reads: the rate the step's matmuls
    reach alone."""
    import torch
    import torch.nn.functional as F

    weights = [m.weight for m in modules_a_step_calls(model) if isinstance(m, torch.nn.Linear)]
    rows = [torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights]

    def once():
        for x, w in zip(rows, weights):
            F.linear(x, w)
    once()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    return sum(w.numel() * w.element_size() for w in weights) / statistics.median(times)


def bytes_per_token(model, context: float, batch: int = 1) -> dict:
    """What one decoding step of one row reads: the weights it runs (weights_a_step_reads) and the KV caches at
    `context`."""
    weights = sum(p.numel() * p.element_size() for p in weights_a_step_reads(model))
    kv = 0.0
    for m in [model.anchor, *model.augmenting]:
        c = m.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        itemsize = next(m.parameters()).element_size()
        kv += c.num_hidden_layers * 2 * kv_heads * head_dim * context * itemsize
    d_anchor = model.anchor.config.hidden_size
    blocks = sum(len(pairs) for pairs in model.layer_pairs)
    kv += blocks * 2 * d_anchor * context * next(model.blocks.parameters()).element_size()
    return {"weights": weights, "kv_cache_per_row": kv, "per_step": weights + batch * kv}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="full", choices=sorted(common.SIZES))
    ap.add_argument("--json", default=str(HERE / "results" / "decode.json"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    size = common.SIZES[args.size]
    n, prompt_len = size.new_tokens, size.prompt
    prompts = torch.randint(3, size.vocab, (args.batch, prompt_len), generator=torch.Generator().manual_seed(11))
    # blocks that act (common.acting_blocks): the compiled, batched and bf16 tokens compare a composition, not the
    # anchor alone
    models = {"fp32": common.acting_blocks(common.build_composed(size)).eval()}
    for name, blocks_bf16 in (("bf16", False), ("bf16_blocks_bf16", True)):
        m = common.acting_blocks(common.build_composed(size)).eval()  # the same seeds: the same weights
        m.anchor.to(torch.bfloat16)
        m.augmenting.to(torch.bfloat16)
        if blocks_bf16:
            m.blocks.to(torch.bfloat16)
        models[name] = m

    def decode(model, rows, compiled=False):
        return lambda: model.generate(prompts[:rows], max_new_tokens=n, eos_token_id=-1, use_cache=True,
                                      compile_step=compiled)

    # The read bandwidth is measured in every round between the two fp32 batch-1 variants (the round-robin keeps it
    # beside both), so that each round's P4r divides a step by the bandwidth of the same minutes: a shared host's
    # speed moves over a run of a quarter of an hour
    round_bandwidth: list[float] = []
    fns = {"fp32_b1": decode(models["fp32"], 1),
           "read_bandwidth": lambda: round_bandwidth.append(read_bandwidth()["read_bytes_per_s"]),
           # one compiled graph per decoding step (calm_dist/model/compiled_decoding.py), batch 1 and batch B
           "fp32_b1_compiled": decode(models["fp32"], 1, compiled=True)}
    fns.update({f"{name}_b1": decode(m, 1) for name, m in models.items() if name != "fp32"})
    fns.update({f"{name}_b{args.batch}": decode(models[name], args.batch) for name in ("fp32", "bf16")})
    fns.update({f"{name}_b{rows}_compiled": decode(models[name], rows, compiled=True)
                for name in ("fp32", "bf16") for rows in (1, args.batch) if (name, rows) != ("fp32", 1)})
    for m in models.values():  # warm-up: a short generation each
        m.generate(prompts[:2], max_new_tokens=8, eos_token_id=-1)
    first_generation_s = {}  # compilation + one generation of each compiled shape, timed apart from the rounds
    for name in ("fp32", "bf16"):
        for rows in (1, args.batch):
            start = time.perf_counter()
            fns[f"{name}_b{rows}_compiled"]()
            first_generation_s[f"{name}_b{rows}"] = time.perf_counter() - start
    bandwidth_before = read_bandwidth()
    matmuls_before = matmul_read_rate(models["fp32"])
    times = common.interleaved(fns, args.repeats, warmup=0)
    bandwidth_after = read_bandwidth()
    matmuls_after = matmul_read_rate(models["fp32"])
    matmul_rate = statistics.median([matmuls_before, matmuls_after])
    bandwidth = statistics.median([bandwidth_before["read_bytes_per_s"], bandwidth_after["read_bytes_per_s"]])

    bandwidth_s = times.pop("read_bandwidth")
    tok_s = {k: (args.batch if f"_b{args.batch}" in k else 1) * n / common.median(t["cpu"]) for k, t in times.items()}
    context = prompt_len + (n - 1) / 2  # mean context length over the generated tokens
    read = {name: bytes_per_token(m, context) for name, m in models.items()}
    roofline = {name: bandwidth / r["per_step"] for name, r in read.items()}
    # each round's fp32 batch-1 tokens/s over that round's roofline; P4r is their median
    per_round = {variant: [n / cpu / (bw / read["fp32"]["per_step"])
                           for cpu, bw in zip(times[variant]["cpu"], round_bandwidth)]
                 for variant in ("fp32_b1", "fp32_b1_compiled")}
    # A batch-B step reads the weights once and every row's KV caches: its roofline, and the P4bB that two steps at
    # the same fraction of their rooflines would give (the KV caches of B rows weigh about what the weights do here)
    read_batched = {name: bytes_per_token(models[name], context, args.batch) for name in ("fp32", "bf16")}
    roofline_batched = {name: args.batch * bandwidth / r["per_step"] for name, r in read_batched.items()}
    batched_bound = {name: args.batch * read[name]["per_step"] / r["per_step"] for name, r in read_batched.items()}
    compiled_equal, outputs = {}, {}
    for name in ("fp32", "bf16"):
        for rows in (1, args.batch):
            eager = models[name].generate(prompts[:rows], max_new_tokens=n, eos_token_id=-1)
            compiled = models[name].generate(prompts[:rows], max_new_tokens=n, eos_token_id=-1, compile_step=True)
            compiled_equal[f"{name}_b{rows}"] = bool(torch.equal(eager, compiled))
            if rows == 1:
                outputs[name], outputs[f"{name}_compiled"] = eager[0, prompt_len:], compiled[0, prompt_len:]
    outputs["bf16_blocks_bf16"] = models["bf16_blocks_bf16"].generate(prompts[:1], max_new_tokens=n,
                                                                      eos_token_id=-1)[0, prompt_len:]
    agreement = {}
    for name in ("bf16", "bf16_blocks_bf16", "bf16_compiled"):
        differ = (outputs[name] != outputs["fp32"]).nonzero()
        agreement[name] = {"equal_to_fp32": not len(differ), "first_difference": int(differ[0]) if len(differ) else None,
                           "equal_fraction": float((outputs[name] == outputs["fp32"]).float().mean())}
    batched = models["fp32"].generate(prompts, max_new_tokens=n, eos_token_id=-1)[:, prompt_len:]
    alone = torch.stack([models["fp32"].generate(prompts[i:i + 1], max_new_tokens=n, eos_token_id=-1)[0, prompt_len:]
                         for i in range(min(4, args.batch))])
    profile = common.profile_ops({"fp32_b1": fns["fp32_b1"], "bf16_b1": fns["bf16_b1"]}, HERE / "results", calls=1,
                                 filename=f"profile_p4r{'' if size.name == 'full' else '_' + size.name}.md",
                                 title=f"P4r profile, greedy decoding of {n} tokens, batch 1")
    b = args.batch
    result = {
        "command": "python benchmarks/decode_bench.py " + " ".join(sys.argv[1:]), "machine": machine_info(),
        "torch": torch.__version__, "size": size.as_dict(), "new_tokens": n, "prompt": prompt_len, "batch": b,
        "bandwidth": {"before": bandwidth_before, "after": bandwidth_after, "read_bytes_per_s": bandwidth,
                      "rounds_read_bytes_per_s": round_bandwidth, "rounds_cpu_s": bandwidth_s["cpu"]},
        # the fp32 matmuls alone (one row through every nn.Linear): the share of the roofline they reach caps P4r
        "matmul_read_bytes_per_s": {"before": matmuls_before, "after": matmuls_after, "median": matmul_rate},
        "matmul_ceiling_of_P4r": matmul_rate / bandwidth,
        "bytes_per_token": read, "roofline_tokens_per_s": roofline,
        f"bytes_per_step_b{args.batch}": read_batched, f"roofline_tokens_per_s_b{args.batch}": roofline_batched,
        f"P4b{args.batch}_at_equal_roofline_fractions": batched_bound,
        "times": {k: common.summary(t) for k, t in times.items()}, "tokens_per_s": tok_s,
        "P4r_per_round": per_round,
        "ratios": {
            "P4r": common.median(per_round["fp32_b1"]),
            "P4r_before_after_bandwidth": tok_s["fp32_b1"] / roofline["fp32"],
            "P4r_bf16": tok_s["bf16_b1"] / roofline["bf16"],
            "P4r_bf16_blocks_bf16": tok_s["bf16_blocks_bf16_b1"] / roofline["bf16_blocks_bf16"],
            f"P4b{b}_fp32": tok_s[f"fp32_b{b}"] / tok_s["fp32_b1"],
            f"P4b{b}_bf16": tok_s[f"bf16_b{b}"] / tok_s["bf16_b1"],
            f"P4r_b{b}_fp32": tok_s[f"fp32_b{b}"] / roofline_batched["fp32"],
            f"P4r_b{b}_bf16": tok_s[f"bf16_b{b}"] / roofline_batched["bf16"],
            "bf16_over_fp32_b1": tok_s["bf16_b1"] / tok_s["fp32_b1"],
            "P4r_compiled": common.median(per_round["fp32_b1_compiled"]),
            "P4r_compiled_before_after_bandwidth": tok_s["fp32_b1_compiled"] / roofline["fp32"],
            "P4r_bf16_compiled": tok_s["bf16_b1_compiled"] / roofline["bf16"],
            f"P4b{b}_fp32_compiled": tok_s[f"fp32_b{b}_compiled"] / tok_s["fp32_b1_compiled"],
            f"P4b{b}_bf16_compiled": tok_s[f"bf16_b{b}_compiled"] / tok_s["bf16_b1_compiled"],
            "compiled_over_eager_fp32_b1": tok_s["fp32_b1_compiled"] / tok_s["fp32_b1"],
            "compiled_over_eager_bf16_b1": tok_s["bf16_b1_compiled"] / tok_s["bf16_b1"],
            f"compiled_over_eager_fp32_b{b}": tok_s[f"fp32_b{b}_compiled"] / tok_s[f"fp32_b{b}"],
        },
        "first_compiled_generation_s": first_generation_s,
        "compile_s": {k: v - common.median(times[f"{k}_compiled"]["wall"]) for k, v in first_generation_s.items()},
        "compiled_tokens_equal_eager": compiled_equal,
        "bf16_tokens": agreement,
        "batched_rows_equal_alone": bool(torch.equal(batched[:len(alone)], alone)),
        "profile": profile,
    }
    common.write_json(args.json, result)
    print(f"read bandwidth {bandwidth / 1e9:.2f} GB/s; fp32 reads {read['fp32']['per_step'] / 1e6:.1f} MB per token "
          f"(roofline {roofline['fp32']:.1f} tok/s)")
    print(f"per round: read bandwidth {', '.join(f'{bw / 1e9:.2f}' for bw in round_bandwidth)} GB/s; P4r eager "
          f"{', '.join(f'{x:.3f}' for x in per_round['fp32_b1'])}; compiled "
          f"{', '.join(f'{x:.3f}' for x in per_round['fp32_b1_compiled'])}")
    print(f"the fp32 matmuls alone read {matmul_rate / 1e9:.2f} GB/s: {matmul_rate / bandwidth:.3f} of the roofline")
    print(f"batch {b}: fp32 reads {read_batched['fp32']['per_step'] / 1e6:.1f} MB per step; P4b{b} at equal fractions "
          f"of the rooflines: fp32 {batched_bound['fp32']:.2f}, bf16 {batched_bound['bf16']:.2f}")
    print("tokens/s: " + ", ".join(f"{k} {v:.1f}" for k, v in tok_s.items()))
    print("ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in result["ratios"].items()))
    print(f"bf16 tokens vs fp32: {agreement}; batched rows equal alone: {result['batched_rows_equal_alone']}")
    print(f"compilation s: {result['compile_s']}; compiled tokens equal eager: {compiled_equal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
