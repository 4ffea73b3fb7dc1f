"""P3 / P4: calm_dist against CALM-pytorch (lucidrains, PyPI `calm-pytorch`), in one process, interleaved.

Runs with the peer venv's python (benchmarks/.venv-peer, made by run.py), which sees the main venv's
packages (torch, transformers, calm_dist) through a .pth file, so both implementations run on the same torch
in the same process and are timed round-robin.

Like for like: the peer's anchor and augmenting models are x-transformers decoders of the same widths,
depths, heads, vocabulary and FLOPs per token as ours (pre-RMSNorm, rotary, SwiGLU with the same inner
width, no biases, untied head, SDPA attention); the same layer pairs (ours are 0-based (i, j), CALM-pytorch's
`connections` are 1-based); cross-attention with the anchor's head count; the same batch and sequence length;
fp32, one thread; a training step = zero_grad + forward + loss + backward + AdamW step on the trainable blocks.

    <peer python> benchmarks/peer_bench.py --size full --json out.json
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import common  # noqa: E402  (pins threads before torch)

import torch  # noqa: E402


# P3d: the run length whose default step is timed: the 49M model's 1,000-step run (benchmarks/README.md, P3)
DEFAULT_RUN_STEPS = 1000


def xt_model(d: int, layers: int, heads: int, size: common.Size):
    from x_transformers import Decoder, TransformerWrapper

    return TransformerWrapper(
        num_tokens=size.vocab, max_seq_len=2048, use_abs_pos_emb=False,
        attn_layers=Decoder(dim=d, depth=layers, heads=heads, attn_dim_head=d // heads, rotary_pos_emb=True,
                            use_rmsnorm=True, ff_glu=True, ff_swish=True, ff_mult=size.ffn_mult, ff_no_bias=True,
                            attn_flash=True))


def agreement(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """How far two decodings of one prompt agree: equal, the first new token that differs, the share equal."""
    differ = (reference != other).nonzero()
    return {"equal_to_fp32": bool(torch.equal(reference, other)),
            "first_difference": int(differ[0]) if len(differ) else None,
            "equal_fraction": float((reference == other).float().mean())}


def build_peer(size: common.Size, seed: int = 0):
    from CALM_pytorch import CALM, AugmentParams

    torch.manual_seed(seed)
    anchor = xt_model(size.anchor_d, size.anchor_layers, size.anchor_heads, size)
    augment = xt_model(size.aug_d, size.aug_layers, size.aug_heads, size)
    connections = tuple((i + 1, j + 1) for i, j in size.pairs)
    calm = CALM(anchor, AugmentParams(model=augment, connections=connections),
                attn_kwargs=dict(linear_project_context=True, pre_rmsnorm=True, flash=True,
                                 heads=size.anchor_heads, dim_head=size.anchor_d // size.anchor_heads))
    return calm, anchor, augment


def peer_leak_stopper(peer_anchor):
    """A function that empties the lists CALM-pytorch 0.2.2 leaks into: the `Recorder` hooks it leaves on the
    anchor's blocks at construction keep appending every forward's block outputs (~0.7 GB per 256-token
    generation here). Emptied at the start of each peer call, so the process stays small for both sides and
    the peer is not slowed by its leak: the comparison is the stricter for it."""
    lists = [hook.output for block in peer_anchor.modules() for hook in block._forward_hooks.values()
             if type(hook).__name__ == "Recorder"]
    assert lists, "no Recorder hooks on the peer's anchor: has CALM-pytorch changed?"
    return lambda: [leaked.clear() for leaked in lists]


def peer_memory(size: common.Size) -> dict:
    """Peak RSS of the peer alone in a process: build, two training steps (AdamW state exists after one)."""
    base = common.peak_rss_bytes()
    peer, _, _ = build_peer(size)
    ids, _ = common.batch(size)
    seq = torch.cat([ids, ids[:, :1]], dim=1)
    opt = torch.optim.AdamW(peer.parameters(), lr=1e-4)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        peer(seq, prompt=seq[:, :-1]).backward()
        opt.step()
    return {"variant": "peer", "peak_rss_bytes": common.peak_rss_bytes(), "rss_after_import_bytes": base}


def default_compile(model, size: common.Size, steps: int = DEFAULT_RUN_STEPS) -> dict:
    """What the trainer's default (`train.compile=auto`) decides for a `steps`-step run of this composition on this
    CPU, one rank, the benchmark's micro-batch and sequence length: the step P3d times (P3c's when on)."""
    from types import SimpleNamespace

    from calm_dist.config import load_config
    from calm_dist.training import compile_policy
    from calm_dist.training.ds_config import build_ds_config, gradient_accumulation_steps

    cfg = load_config(None, [f"train.steps={steps}", f"train.micro_batch_size={size.batch}",
                             f"data.seq_len={size.seq}"])
    configs = [model.anchor.config, *(m.config for m in model.augmenting)]
    # the DeepSpeed JSON and accumulation as the trainer resolves them from the default config, on one rank
    resolved = SimpleNamespace(anchor_config=configs[0], augmenting_configs=configs[1:], layer_pairs=[size.pairs],
                               accumulation=gradient_accumulation_steps(cfg, 1),
                               ds_config=build_ds_config(cfg, 1, configs))
    on, why = compile_policy.decide(cfg, resolved, "cpu")
    return {"steps": steps, "compile": on, "why": why}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="full")
    ap.add_argument("--json", required=True)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="profile tables")
    ap.add_argument("--memory-only", action="store_true", help="the peer alone: build, 2 steps, peak RSS")
    args = ap.parse_args()
    size = common.SIZES[args.size]
    torch.set_num_threads(1)
    if args.memory_only:
        common.write_json(args.json, peer_memory(size))
        return

    import CALM_pytorch
    import x_transformers
    from importlib.metadata import version

    from calm_dist.training.parallelize import compile_frozen_blocks

    ours = common.build_composed(size)
    peer, peer_anchor, peer_augment = build_peer(size)
    n = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
    info = {
        "peer_versions": {"calm-pytorch": version("calm-pytorch"), "x-transformers": version("x-transformers"),
                          "torch": torch.__version__},
        "peer_module": CALM_pytorch.__file__, "x_transformers_module": x_transformers.__file__,
        "params": {
            "ours_anchor": n(ours.anchor.parameters()), "peer_anchor": n(peer_anchor.parameters()),
            "ours_augmenting": n(ours.augmenting.parameters()), "peer_augmenting": n(peer_augment.parameters()),
            "ours_trainable": n(ours.trainable_parameters()), "peer_trainable": n(peer.parameters()),
        },
        "peer_connections_1_based": [list(c) for c in peer.connections[0]],
        "ours_pairs_0_based": [list(p) for p in size.pairs],
    }

    # ---- P3: training step (ours recomputes the augmenting states, as the peer always does) -------------
    ids, mask = common.batch(size)
    extra = torch.randint(3, size.vocab, (size.batch, 1), generator=torch.Generator().manual_seed(7))
    peer_seq = torch.cat([ids, extra], dim=1)  # the peer trains on seq[:, :-1] -> seq[:, 1:]: T anchor tokens
    ours_step = common.composed_training_step(ours, ids, mask)
    opt_peer = torch.optim.AdamW(peer.parameters(), lr=1e-4)

    empty_peer_leak = peer_leak_stopper(peer_anchor)

    def peer_step():
        empty_peer_leak()
        opt_peer.zero_grad(set_to_none=True)
        peer(peer_seq, prompt=peer_seq[:, :-1]).backward()
        opt_peer.step()

    # P3b: the same composition with its frozen augmenting forward in bf16 (`model.augmenting_dtype=bf16`):
    # same weights, the states cast to fp32 at f_proj, so everything that trains stays fp32.
    ours_bf16 = common.build_composed(size)
    ours_bf16.augmenting.to(torch.bfloat16)
    ours_bf16_step = common.composed_training_step(ours_bf16, ids, mask)

    # P3c: the same composition with its frozen decoder blocks compiled (`train.compile=true`), fp32 as the
    # peer: like for like. The warm-up round compiles (not timed).
    ours_compiled = common.build_composed(size)
    compile_frozen_blocks([ours_compiled.anchor, *ours_compiled.augmenting])
    ours_compiled_step = common.composed_training_step(ours_compiled, ids, mask)

    times = common.interleaved({"ours": ours_step, "peer": peer_step, "ours_bf16_augmenting": ours_bf16_step,
                                "ours_compiled": ours_compiled_step}, repeats=size.repeats)
    suffix = "" if size.name == "full" else f"_{size.name}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prof3 = common.profile_ops({"peer": peer_step, "ours": ours_step}, out, filename=f"profile_p3{suffix}.md",
                               title="P3 profile, training step (recomputed augmenting states)")
    tokens = size.batch * size.seq
    p3 = {k: {**common.summary(v), "tokens_per_s": tokens / common.median(v["cpu"])} for k, v in times.items()}
    p3["default"] = default_compile(ours, size)

    # ---- P4: greedy decoding, batch 1 -------------------------------------------------------------------
    prompt = torch.randint(3, size.vocab, (1, size.prompt), generator=torch.Generator().manual_seed(11))
    ours.eval()

    def ours_cached(n=size.new_tokens):
        return ours.generate(prompt, max_new_tokens=n, eos_token_id=-1, use_cache=True)

    def ours_uncached(n=size.new_tokens):
        return ours.generate(prompt, max_new_tokens=n, eos_token_id=-1, use_cache=False)

    # P4 in bf16: the same weights with the frozen models in bf16 (the blocks stay fp32: cross-attention casts
    # at its boundary), as a user decodes in production; the peer stays fp32, as its users run it. A copy of
    # `ours` as P3 left it (its blocks took P3's optimizer steps), so that the tokens compare like for like
    ours_bf16_decode = copy.deepcopy(ours).eval()
    ours_bf16_decode.anchor.to(torch.bfloat16)
    ours_bf16_decode.augmenting.to(torch.bfloat16)

    def ours_bf16(n=size.new_tokens):
        return ours_bf16_decode.generate(prompt, max_new_tokens=n, eos_token_id=-1, use_cache=True)

    # P4c / P4hc: the same decoding with one compiled graph per step (calm_dist/model/compiled_decoding.py), as
    # `calm-dist generate --compile` runs it; compiled in the warm-up at the timed length (the graph's capacity
    # depends on prompt + new tokens), so no timed round compiles
    def ours_compiled(n=size.new_tokens):
        return ours.generate(prompt, max_new_tokens=n, eos_token_id=-1, use_cache=True, compile_step=True)

    def ours_bf16_compiled(n=size.new_tokens):
        return ours_bf16_decode.generate(prompt, max_new_tokens=n, eos_token_id=-1, use_cache=True,
                                         compile_step=True)

    def peer_generate(n=size.new_tokens):
        # CALM-pytorch decodes by nucleus sampling over a full recompute of the anchor each step (no KV
        # cache) and encodes the prompt once with the augmenting model; the arithmetic is that of greedy.
        empty_peer_leak()
        return peer.generate(prompt, seq_len=size.prompt + n)

    for fn in (ours_cached, ours_bf16, ours_uncached, peer_generate):  # warm-up: short generations
        fn(8)
    compile_s = {}
    for name, fn in (("ours_compiled", ours_compiled), ("ours_bf16_compiled", ours_bf16_compiled)):
        with common.Timer() as t:
            fn()
        compile_s[name] = t.wall  # compilation + one generation; the rounds' median is taken off below
    dec = {k: {"cpu": [], "wall": []} for k in ("ours_cached", "ours_bf16", "ours_compiled", "ours_bf16_compiled",
                                                  "ours_uncached", "peer")}
    outputs = {}
    for r in range(max(size.repeats, size.decode_repeats)):
        order = [("ours_cached", ours_cached), ("ours_bf16", ours_bf16), ("ours_compiled", ours_compiled),
                 ("ours_bf16_compiled", ours_bf16_compiled)]
        if r < size.decode_repeats:
            order += [("ours_uncached", ours_uncached), ("peer", peer_generate)]
        if r % 2:
            order.reverse()
        for name, fn in order:
            with common.Timer() as t:
                outputs[name] = fn()
            dec[name]["cpu"].append(t.cpu)
            dec[name]["wall"].append(t.wall)
    same = bool(torch.equal(outputs["ours_cached"], outputs["ours_uncached"]))
    n_prof = min(64, size.new_tokens)
    prof4 = common.profile_ops({"peer": lambda: peer_generate(n_prof), "ours_cached": lambda: ours_cached(n_prof)},
                               out, calls=1, filename=f"profile_p4{suffix}.md",
                               title=f"P4 profile, greedy decoding of {n_prof} tokens, batch 1")
    p4 = {k: {**common.summary(v), "tokens_per_s": size.new_tokens / common.median(v["cpu"])} for k, v in dec.items()}
    p4["ours_cached_equals_uncached"] = same
    p4["ours_compiled_equals_cached"] = bool(torch.equal(outputs["ours_compiled"], outputs["ours_cached"]))
    p4["compile_s"] = {k: v - common.median(dec[k]["wall"]) for k, v in compile_s.items()}
    new_fp32 = outputs["ours_cached"][0, size.prompt:]
    p4["bf16_tokens"] = agreement(new_fp32, outputs["ours_bf16"][0, size.prompt:])
    p4["bf16_compiled_tokens"] = agreement(new_fp32, outputs["ours_bf16_compiled"][0, size.prompt:])
    common.write_json(args.json, {"info": info, "p3": p3, "p4": p4, "profile_p3": prof3, "profile_p4": prof4,
                                  "peak_rss_bytes": common.peak_rss_bytes()})


if __name__ == "__main__":
    main()
