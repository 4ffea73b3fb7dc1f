"""calm_dist.planning.plan: self-consistency of the memory / communication / FLOP plan, and the CLI."""

import json
import math

import pytest

from calm_dist.planning import costs, model_sizes
from calm_dist.planning.plan import Hardware, ZeroOptions, plan, resolve_model
from calm_dist.planning.plan_cli import main

GiB = 1024 ** 3
KW = dict(seq_len=2048, micro_batch=1, dtype="bf16")


def P(**kw):
    args = {**KW, **kw}
    return plan(args.pop("anchor", "llama-13b"), args.pop("augmenting", "llama-1b"), args.pop("pairs", None), **args)


def test_frozen_shard_halves_with_world_size():
    one = P(nodes=1, gpus_per_node=1)
    two = P(nodes=1, gpus_per_node=2)
    four = P(nodes=2, gpus_per_node=2)
    for key in ("frozen_params", "trainable_params", "gradients", "optimizer_fp32"):
        assert two.memory_gpu[key] == pytest.approx(one.memory_gpu[key] / 2), key
        assert four.memory_gpu[key] == pytest.approx(one.memory_gpu[key] / 4), key
    # what does not shard
    for key in ("activations", "gathered_working_set", "reserve", "persistent_params", "reduce_bucket"):
        assert two.memory_gpu[key] == one.memory_gpu[key], key
    # world 1: the whole frozen anchor + the augmenting model up to its deepest composed block (19 of 0..21),
    # without its LM head (untied: 32,000 x 2,048), which the composition drops
    aug = costs.param_counts("llama-1b")
    assert aug.lm_head == 32000 * 2048
    total = costs.param_counts("llama-13b").total + aug.total - 2 * aug.per_block - aug.lm_head
    assert one.memory_gpu["frozen_params"] == total * 2
    assert one.params["frozen_loaded"] == total
    whole = P(nodes=1, gpus_per_node=1, truncate_augmenting=False)
    assert whole.params["frozen_loaded"] == total + 2 * aug.per_block + aug.lm_head
    assert one.memory_gpu_total == pytest.approx(sum(one.memory_gpu.values()))
    assert one.memory_gpu_headroom == pytest.approx(80 * GiB - one.memory_gpu_total)


def test_zero_stages():
    n = costs.composition_params("llama-13b", "llama-1b")
    w = 8
    s0 = P(zero=ZeroOptions(stage=0))
    s1 = P(zero=ZeroOptions(stage=1))
    s2 = P(zero=ZeroOptions(stage=2))
    s3 = P(zero=ZeroOptions(stage=3))
    assert s0.memory_gpu["optimizer_fp32"] == n * 12
    assert s1.memory_gpu["optimizer_fp32"] == pytest.approx(n * 12 / w)
    assert s1.memory_gpu["gradients"] == n * 2
    assert s2.memory_gpu["gradients"] == pytest.approx(n * 2 / w)
    assert s2.memory_gpu["frozen_params"] == s0.memory_gpu["frozen_params"]
    assert s3.memory_gpu["frozen_params"] == pytest.approx(s0.memory_gpu["frozen_params"] / w)
    assert s3.memory_gpu["trainable_params"] == pytest.approx(n * 2 / w)
    assert s2.comm_per_step["allgather_frozen_forward"] == 0
    assert s3.comm_per_step["allgather_frozen_forward"] > 0
    with pytest.raises(ValueError):
        P(zero=ZeroOptions(stage=2, offload_params=True))


def test_zero2_keeps_the_frozen_models_whole_and_gathers_the_updated_weights():
    """ZeRO-2 per rank: frozen and trainable weights whole, gradients and optimizer state 1/W; per step: the
    gradients reduce-scattered every micro-step, the updated weights all-gathered once after the optimizer step,
    nothing frozen gathered or materialised. By hand: N_blocks elements, b = 2, ring collectives over W = 8 ranks
    in one node (NVLink)."""
    n = costs.composition_params("llama-13b", "llama-1b")
    p = P(zero=ZeroOptions(stage=2), grad_accum=3)
    frozen = costs.param_counts("llama-13b").total + p.params["augmenting_loaded"][0]
    m = p.memory_gpu
    assert m["frozen_params"] == frozen * 2 and m["trainable_params"] == n * 2
    assert m["gradients"] == pytest.approx(n * 2 / 8) and m["optimizer_fp32"] == pytest.approx(n * 12 / 8)
    assert "gathered_working_set" not in m and "persistent_params" not in m
    one_collective = n * 2 * 7 / 8
    step = p.comm_per_step
    assert step["reduce_scatter_gradients"] == pytest.approx(3 * one_collective)
    assert step["allgather_trainable_after_step"] == pytest.approx(one_collective)
    assert step["total"] == step["intra_node"] == pytest.approx(4 * one_collective)
    assert step["time_s"] == pytest.approx(4 * one_collective / 450e9)
    assert step["gathered_bytes"] == 0
    assert p.comm_per_micro_step["total"] == pytest.approx(one_collective)
    assert "allgather_trainable_after_step" not in P(grad_accum=3).comm_per_step  # ZeRO-3 holds shards, not copies


def test_cached_states_drop_the_augmenting_model():
    rec = P()
    cac = P(states="cached")
    aug = rec.params["augmenting_loaded"][0]
    assert cac.params["augmenting_loaded"] == [0]
    assert rec.memory_gpu["frozen_params"] - cac.memory_gpu["frozen_params"] == pytest.approx(aug * 2 / 8)
    assert cac.step_cost["aug_forward"] == 0 and rec.step_cost["aug_forward"] > 0
    assert rec.step_cost["total"] - cac.step_cost["total"] == pytest.approx(rec.step_cost["aug_forward"])
    saved = rec.comm_per_micro_step["allgather_frozen_forward"] - cac.comm_per_micro_step["allgather_frozen_forward"]
    assert saved == pytest.approx(rec.cache["allgather_bytes_saved_per_micro_step"])
    assert rec.cache["bytes_per_token"] == costs.cache_bytes_per_token("llama-1b", anchor="llama-13b")
    # both modes see the same economics
    assert rec.cache["break_even_epochs"] == pytest.approx(cac.cache["break_even_epochs"])


def test_allgather_volume_matches_parameter_counts():
    p = P(nodes=2, gpus_per_node=4)
    w = 8
    anchor, aug = model_sizes.get("llama-13b"), model_sizes.get("llama-1b")
    pa, pg = costs.param_counts(anchor), costs.param_counts(aug)
    deepest = max(a for a, _ in costs.default_layer_pairs(22, 40)) + 1   # 20 of 22 augmenting layers run
    norms = lambda pc, spec, n: n * 2 * spec["hidden_size"]  # noqa: E731  (persistent RMSNorm weights)
    fwd = (pa.total - norms(pa, anchor, 40) - anchor["hidden_size"]
           + pg.embedding + deepest * pg.per_block - norms(pg, aug, deepest))
    assert p.comm_per_micro_step["allgather_frozen_forward"] == pytest.approx(fwd * 2 * (w - 1) / w)
    j0 = p.params["first_composed_anchor_layer"]
    bwd = (40 - 1 - j0) * (pa.per_block - 2 * anchor["hidden_size"]) + pa.lm_head
    assert p.comm_per_micro_step["allgather_frozen_backward"] == pytest.approx(bwd * 2 * (w - 1) / w)
    n = p.params["trainable"]
    assert p.comm_per_micro_step["reduce_scatter_gradients"] == pytest.approx(n * 2 * (w - 1) / w)
    assert p.comm_per_micro_step["inter_node"] == pytest.approx(p.comm_per_micro_step["total"])
    one_node = P(nodes=1, gpus_per_node=8)
    assert one_node.comm_per_micro_step["inter_node"] == 0
    assert one_node.comm_per_micro_step["intra_node"] == pytest.approx(p.comm_per_micro_step["total"])


def test_hpz_keeps_frozen_gathers_in_the_node():
    base = P(nodes=4, gpus_per_node=8)
    hpz = P(nodes=4, gpus_per_node=8, zero=ZeroOptions(hpz_partition_size=8))
    m = hpz.comm_per_micro_step
    assert m["allgather_frozen_forward"] == pytest.approx(base.comm_per_micro_step["allgather_frozen_forward"]
                                                          * (7 / 8) / (31 / 32))
    # frozen weights and backward gathers stay on NVLink; gradients and the step's first forward gather
    # of the trainable blocks cross nodes
    assert m["inter_node"] < 0.1 * m["total"]
    assert m["time_s"] < base.comm_per_micro_step["time_s"] / 3
    frozen = hpz.params["frozen_loaded"] + hpz.params["trainable"]
    assert hpz.memory_gpu["hpz_secondary"] == pytest.approx(frozen * 2 / 8)
    assert "hpz_secondary" not in base.memory_gpu
    # grad accumulation: later micro-steps gather the trainable blocks inside the node as well
    ga = P(nodes=4, gpus_per_node=8, grad_accum=4, zero=ZeroOptions(hpz_partition_size=8))
    assert ga.comm_per_step["allgather_frozen_forward"] == pytest.approx(4 * m["allgather_frozen_forward"])
    assert ga.comm_per_step["inter_node"] < 4 * m["inter_node"]
    assert any("hpZ" in w for w in P(zero=ZeroOptions(hpz_partition_size=3)).warnings)


def test_offload_moves_state_to_cpu():
    off = P(zero=ZeroOptions(offload_optimizer=True, offload_params=True), gpus_per_node=4)
    on = P(gpus_per_node=4)
    for key in ("optimizer_fp32", "frozen_params", "trainable_params"):
        assert key not in off.memory_gpu
        assert off.memory_cpu_per_node[key] == pytest.approx(4 * on.memory_gpu[key])
    assert off.memory_cpu_per_node["gradients_fp32"] == pytest.approx(on.memory_gpu["gradients"] * 2 * 4)
    assert off.memory_gpu_total < on.memory_gpu_total
    assert on.memory_cpu_per_node == {}


def test_flops_and_time():
    p = P(nodes=2, gpus_per_node=8, micro_batch=2, grad_accum=3, mfu=0.5, tokens=1e9)
    sc = costs.step_cost("llama-13b", "llama-1b", seq_len=2048)
    tokens_step = 2048 * 2 * 3 * 16
    assert p.flops["tokens_per_step"] == tokens_step
    assert p.flops["per_step_model"] == pytest.approx(sc.total * tokens_step)
    assert p.time["compute_s"] == pytest.approx(sc.total * tokens_step / 16 / (989e12 * 0.5))
    assert p.time["step_s_overlapped"] == max(p.time["compute_s"], p.time["comm_s"])
    assert p.time["train_days"] == pytest.approx(1e9 / p.time["tokens_per_s"] / 86400)
    ac = P(activation_checkpointing=True, hfu=0.5)
    assert ac.step_cost["recompute"] > 0
    assert ac.time["mfu_assumed"] < 0.5 and ac.time["hfu_implied"] == pytest.approx(0.5)
    assert ac.activations["total"] < P().activations["total"]
    # a different peak scales compute time
    slow = P(hardware=Hardware(gpu_peak_tflops=494.5))
    assert slow.time["compute_s"] == pytest.approx(2 * P().time["compute_s"])


def test_activation_memory_scales_with_micro_batch():
    a1 = P(micro_batch=1).memory_gpu["activations"]
    a4 = P(micro_batch=4).memory_gpu["activations"]
    assert a4 == pytest.approx(4 * a1, rel=0.01)  # all but the loss's one chunk of logits scales
    assert any("GPU memory" in w for w in P(anchor="llama-70b", augmenting="llama-7b", micro_batch=8).warnings)


def test_warnings_and_inputs():
    p = P(anchor="llama-13b", augmenting="qwen2-0.5b")
    assert any("vocabulary" in w for w in p.warnings)
    assert any("learned positions" in w for w in P(anchor="gpt2-small", augmenting="gpt2-small").warnings)
    with pytest.raises(ValueError, match="neither"):
        resolve_model("no-such-model")
    p = P(augmenting=["llama-1b", "llama-7b"], pairs=[[(3, 9)], None])
    assert p.layer_pairs[0] == [[3, 9]] and len(p.layer_pairs[1]) == 8
    assert p.params["trainable"] == costs.composition_params("llama-13b", ["llama-1b", "llama-7b"],
                                                             [[(3, 9)], None])


def test_plan_json_round_trip():
    d = P(states="cached", tokens=2e9).to_dict()
    text = json.dumps(d)
    back = json.loads(text)
    assert back["inputs"]["states"] == "cached"
    assert back["cache"]["disk_bytes"] == pytest.approx(costs.cache_bytes_per_token("llama-1b", anchor="llama-13b")
                                                        * 2e9)


# ----------------------------------------------------------------------------------------------------- CLI

def test_cli_table_and_json(capsys, tmp_path):
    assert main(["--anchor", "llama-70b", "--augmenting", "llama-7b", "--nodes", "16", "--gpus-per-node", "8",
                 "--seq-len", "4096", "--hpz", "8", "--activation-checkpointing", "--tokens", "2B"]) == 0
    out = capsys.readouterr().out
    for text in ("GPU memory per rank", "hpz_secondary", "Communication per rank", "FLOPs per token",
                 "break-even", "3->9", "31->79"):
        assert text in out, text
    # a config.json path and a directory holding one
    cfg = model_sizes.get("llama-1b")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert main(["--anchor", str(tmp_path / "m"), "--augmenting", str(tmp_path / "m" / "config.json"),
                 "--pairs", "3:1,7:5", "--gpus-per-node", "2", "--states", "cached", "--zero-offload", "optimizer",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["layer_pairs"] == [[[3, 1], [7, 5]]]
    assert d["params"]["anchor"] == costs.param_counts(cfg).total
    assert "optimizer_fp32" in d["memory_cpu_per_node"]
    assert main(["--anchor", "nope", "--augmenting", "llama-7b"]) == 2
    assert "neither" in capsys.readouterr().err
    assert main(["--list-models"]) == 0
    assert "llama-70b" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--anchor", "llama-7b", "--augmenting", "llama-1b", "--pairs", "3:1", "--pairs", "7:2"])


def test_cli_never_break_even_is_json_safe(capsys):
    assert main(["--anchor", "llama-0.3b", "--augmenting", "llama-1b", "--gpus-per-node", "1",
                 "--disk-read-gbps", "0.01", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["cache"]["break_even_epochs"] == "inf"
    assert math.isinf(float(d["cache"]["break_even_epochs"]))


def test_plan_runs_without_importing_torch():
    """`calm-dist plan` is pure arithmetic: it must not pay torch's import (the loss's chunk size, which the
    memory model shares, lives in the torch-free calm_dist.planning.activation_memory)."""
    import subprocess
    import sys

    code = ("import sys; from calm_dist.planning.plan_cli import main; "
            "main(['--anchor', 'llama-70b', '--augmenting', 'llama-7b', '--json']); "
            "sys.stderr.write(str('torch' in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["activations"]["loss"] > 0
    assert out.stderr.strip().endswith("False")
