"""calm_dist.planning.recommend (`calm-dist plan --recommend`): the fastest option that fits is chosen, and the CPU
hardware model it times options with on this project's machine."""

import json

import pytest

from calm_dist.planning import costs, cpu_time
from calm_dist.planning import hardware as hardware_module
from calm_dist.planning.hardware import Hardware, hardware
from calm_dist.planning.plan import ZeroOptions, plan
from calm_dist.planning.plan_cli import main
from calm_dist.planning.recommend import candidates, recommend

GiB = 1024 ** 3
BIG = dict(anchor="llama-70b", augmenting="llama-7b", nodes=16, gpus_per_node=8, seq_len=4096, dtype="bf16")


def R(**kw):
    args = {**BIG, **kw}
    return recommend(args.pop("anchor"), args.pop("augmenting"), args.pop("pairs", None), **args)


def test_checkpointing_is_chosen_when_nothing_else_fits():
    """70B + 7B at 4,096 tokens: without checkpointing the anchor's activations alone exceed 80 GiB."""
    rec = R(rows_per_rank=1)
    best = rec.best
    assert best is not None and best.option.activation_checkpointing
    assert all(not s.fits for s in rec.scored if not s.option.activation_checkpointing)
    # and it is the fastest of those that fit
    assert best.step_s == min(s.step_s for s in rec.scored if s.fits)
    # hpZ keeps the frozen gathers on NVLink: 16 nodes are communication-bound without it
    assert best.option.frozen == "hpz"
    shard = next(s for s in rec.scored if s.fits and s.option.frozen == "shard")
    assert shard.step_s > 1.3 * best.step_s


def test_no_checkpointing_when_it_fits():
    """Small models, short sequences: everything fits, and not recomputing the anchor blocks is faster."""
    rec = R(anchor="llama-1b", augmenting="llama-0.3b", nodes=1, gpus_per_node=8, seq_len=1024, rows_per_rank=2)
    assert all(s.fits for s in rec.scored)
    assert rec.best.option.activation_checkpointing is False
    with_ckpt = min(s.step_s for s in rec.scored if s.option.activation_checkpointing)
    assert rec.best.step_s < with_ckpt


def test_memory_decides_between_micro_batches():
    """Bigger micro-batches amortise the gathers but hold more activations: the largest that fits wins."""
    rec = R(rows_per_rank=8, gpus_per_node=8, nodes=2, frozen=("shard",))
    fitting = {s.option.micro_batch for s in rec.scored if s.fits and s.option.activation_checkpointing}
    assert fitting == {1, 2, 4}
    assert rec.best.option.micro_batch == max(fitting)
    # one sequence per micro-step cannot hide the inter-node gathers behind its compute
    one = min(s.step_s for s in rec.scored if s.fits and s.option.micro_batch == 1)
    assert one > 1.2 * rec.best.step_s


def test_nothing_fits(capsys):
    rec = R(gpus_per_node=1, nodes=1, rows_per_rank=1)
    assert rec.best is None
    assert main(["--anchor", "llama-70b", "--augmenting", "llama-7b", "--nodes", "1", "--gpus-per-node", "1",
                 "--recommend"]) == 1
    assert "No option fits" in capsys.readouterr().out


def test_cached_states_pay_only_over_enough_epochs():
    """Caching costs a pass over the data: with one epoch recomputing wins, with many the cache does."""
    small = dict(anchor="llama-7b", augmenting="llama-7b", nodes=1, gpus_per_node=8, seq_len=2048, rows_per_rank=1)
    assert {s.option.states for s in R(**small).scored} == {"recompute"}  # no tokens: no caching pass to charge
    assert R(**small, tokens=1e9, epochs=1).best.option.states == "recompute"
    assert R(**small, tokens=1e9, epochs=50).best.option.states == "cached"


def test_hpz_is_no_option_inside_one_node():
    assert {o.frozen for o in candidates(rows_per_rank=2, nodes=1)} == {"shard", "replicate", "whole"}
    assert {o.micro_batch for o in candidates(rows_per_rank=6, nodes=2)} == {1, 2, 3, 6}


def test_replicated_blocks_are_not_gathered_and_cost_memory():
    rec = R(anchor="llama-1b", augmenting="llama-0.3b", nodes=1, gpus_per_node=2, seq_len=1024, rows_per_rank=1,
            hardware=hardware("cpu", gpu_mem_gib=64.0))
    pick = lambda frozen: next(s for s in rec.scored if s.option.frozen == frozen  # noqa: E731
                               and not s.option.activation_checkpointing)
    shard, repl = pick("shard"), pick("replicate")
    assert repl.plan.comm_per_step["total"] < 0.2 * shard.plan.comm_per_step["total"]
    assert repl.memory_gib > shard.memory_gib
    assert repl.step_s < shard.step_s  # no gathers over loopback


def test_whole_frozen_models_win_where_they_fit():
    """ZeRO-2 (frozen models whole on every rank, never gathered) is scored, and chosen where it fits and is the
    fastest: two nodes, whose inter-node gathers the sharded options cannot hide behind one sequence's compute."""
    rec = R(anchor="llama-1b", augmenting="llama-0.3b", nodes=2, gpus_per_node=8, seq_len=1024, rows_per_rank=1)
    whole = [s for s in rec.scored if s.option.frozen == "whole"]
    assert len(whole) == 2 and all(s.fits and s.plan.inputs["zero"]["stage"] == 2 for s in whole)
    best = rec.best
    assert best.option.frozen == "whole"
    others = min(s.step_s for s in rec.scored if s.fits and s.option.frozen != "whole")
    assert best.step_s < 0.95 * others
    assert "distributed.deepspeed_config=zero2" in rec.settings(best)
    # what it moves: the gradients' reduce-scatter and the updated weights' all-gather, no frozen weight
    comm = best.plan.comm_per_step
    assert comm["allgather_frozen_forward"] == comm["allgather_frozen_backward"] == 0
    assert comm["total"] == pytest.approx(comm["reduce_scatter_gradients"] + comm["allgather_trainable_after_step"])
    # on this CPU too (communication in series with compute there): no gathers over loopback, no ZeRO-3 hooks
    cpu = R(anchor="llama-1b", augmenting="llama-0.3b", nodes=1, gpus_per_node=2, seq_len=1024, rows_per_rank=1,
            dtype="fp32", hardware=hardware("cpu", gpu_mem_gib=64.0))
    assert cpu.best.option.frozen == "whole"


def test_whole_frozen_models_do_not_fit_70b():
    """70B + 7B whole in bf16 are 141 GiB of frozen weights: more than an 80 GiB GPU, so a sharded option stays."""
    for rows, tokens in ((1, None), (4, 2e9)):
        rec = R(rows_per_rank=rows, tokens=tokens)
        whole = [s for s in rec.scored if s.option.frozen == "whole"]
        assert whole and not any(s.fits for s in whole)
        assert min(s.plan.memory_gpu["frozen_params"] for s in whole) / GiB > 80
        assert rec.best.option.frozen == "hpz"


def test_stages_below_3_score_whole_frozen_models_only():
    """With --zero-stage below 3 the frozen models are whole whatever the option: ZeRO-2, the stage calm_dist trains."""
    rec = R(anchor="llama-1b", augmenting="llama-0.3b", nodes=1, gpus_per_node=8, seq_len=1024, rows_per_rank=2,
            zero=ZeroOptions(stage=1))
    assert {s.option.frozen for s in rec.scored} == {"whole"}
    assert {s.plan.inputs["zero"]["stage"] for s in rec.scored} == {2}
    assert "distributed.deepspeed_config=zero2" in rec.settings(rec.best)


def test_cli_recommend_table_and_json(capsys):
    args = ["--anchor", "llama-70b", "--augmenting", "llama-7b", "--nodes", "16", "--gpus-per-node", "8",
            "--seq-len", "4096", "--recommend"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Recommended: hpz, ckpt on, recompute, mb 1 x 1" in out
    assert "train.activation_checkpointing=true" in out and "zero3_hpz" in out
    assert main(args + ["--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["best"] == "hpz, ckpt on, recompute, mb 1 x 1" and len(d["options"]) == 8


# ------------------------------------------------------------------------------------------ the CPU model

def testshipped_cpu_profile_loads():
    hw = hardware("cpu")
    assert hw.kind == "cpu" and not hw.overlap_comm
    # the plan names the profile with its date: step times on a CPU are those of the hour it was measured in
    with open(hardware_module.shipped_cpu_profile()) as f:
        assert f"measured {json.load(f)['machine']['date_utc']}" in hw.name
    assert hw.matmul_gflops and hw.attention_gflops and hw.elementwise_GBps and hw.block_call_s > 0
    assert hardware("cpu", gpu_mem_gib=3.0).gpu_mem_gib == 3.0
    with pytest.raises(ValueError, match="unknown hardware"):
        hardware("tpu-v9")


def test_cpu_work_counts_the_cost_models_flops():
    """The CPU model splits `costs.step_cost`'s hardware FLOPs into matmul and attention, and loses none."""
    anchor, aug = costs.model_spec("llama-1b"), costs.model_spec("llama-0.3b")
    _, groups = costs.normalize_layer_pairs(anchor, aug)
    for states in ("recompute", "cached"):
        for ckpt in (False, True):
            w = cpu_time.micro_step_work(anchor, groups, seq_len=512, micro_batch=2, states=states,
                                         activation_checkpointing=ckpt, elem_bytes=4)
            sc = costs.step_cost(anchor, aug, seq_len=512, states=states, activation_checkpointing=ckpt)
            assert sum(f for f, _ in w.matmul_flops) + w.attention_flops == pytest.approx(sc.total_hardware * 1024)
            assert w.attention_flops > 0 and all(f > 0 for f, _ in w.matmul_flops)
    off = cpu_time.micro_step_work(anchor, groups, seq_len=512, micro_batch=1, states="recompute",
                                   activation_checkpointing=False, elem_bytes=4)
    on = cpu_time.micro_step_work(anchor, groups, seq_len=512, micro_batch=1, states="recompute",
                                  activation_checkpointing=True, elem_bytes=4)
    above = anchor.num_layers - 1 - min(b for _, b in groups[0][1])
    assert on.block_calls - off.block_calls == above  # each checkpointed block runs its forward once more


def test_cpu_plan_adds_communication_to_compute():
    """A one-thread CPU rank does not overlap gathers with compute: the step is their sum."""
    hw = hardware("cpu")
    p = plan("llama-1b", "llama-0.3b", nodes=1, gpus_per_node=2, seq_len=512, dtype="fp32", hardware=hw)
    t = p.time
    assert t["comm_s"] > 0 and t["step_s_overlapped"] == pytest.approx(t["compute_s"] + t["comm_s"])
    assert sum(v for k, v in t["cpu_terms"].items() if k not in ("compute_s", "comm_s", "step_s")) == \
        pytest.approx(t["compute_s"])
    gpu = plan("llama-1b", "llama-0.3b", nodes=1, gpus_per_node=2, seq_len=512, dtype="fp32", hardware=Hardware())
    assert gpu.time["step_s_overlapped"] == max(gpu.time["compute_s"], gpu.time["comm_s"])
    # a CPU node's memory is shared by its ranks
    assert hw.rank_mem_bytes(2) == pytest.approx(hw.rank_mem_bytes(1) / 2)


def test_zero2_steps_have_their_own_fixed_costs(tmp_path):
    """A ZeRO-2 block call has no ZeRO-3 hook: stage-2 plans take the fixed costs fitted on stage-2 steps, and a
    profile written before they were measured still loads (ZeRO-3's then stand for them)."""
    with open(hardware_module.shipped_cpu_profile()) as f:
        shipped = json.load(f)
    stage2 = {"block_call_s": 1e-4, "micro_step_s": 2e-3, "optimizer_step_s": 5e-3}
    shipped["fixed_costs"]["stage2"] = stage2
    (tmp_path / "new.json").write_text(json.dumps(shipped))
    del shipped["fixed_costs"]["stage2"]
    (tmp_path / "old.json").write_text(json.dumps(shipped))
    hw, old = hardware(str(tmp_path / "new.json")), hardware(str(tmp_path / "old.json"))
    zero3 = tuple(shipped["fixed_costs"][k] for k in ("block_call_s", "micro_step_s", "optimizer_step_s"))
    assert hw.fixed_costs(2) == tuple(stage2.values()) and hw.fixed_costs(3) == zero3
    assert old.fixed_costs(2) == old.fixed_costs(3) == zero3

    anchor, aug = costs.model_spec("llama-1b"), costs.model_spec("llama-0.3b")
    _, groups = costs.normalize_layer_pairs(anchor, aug)
    calls = cpu_time.micro_step_work(anchor, groups, seq_len=256, micro_batch=1, states="recompute",
                                     activation_checkpointing=False, elem_bytes=4).block_calls
    for stage, (block, micro, step) in ((2, stage2.values()), (3, zero3)):
        p = plan("llama-1b", "llama-0.3b", nodes=1, gpus_per_node=2, seq_len=256, grad_accum=3, dtype="fp32",
                 hardware=hw, zero=ZeroOptions(stage=stage))
        terms = p.time["cpu_terms"]
        assert terms["fixed_s"] == pytest.approx(3 * (calls * block + micro))
        trainable = p.params["trainable"] / 2
        adamw = trainable * cpu_time.ADAMW_ELEMENTS_PER_PARAM * 4 / cpu_time.bandwidth(hw, trainable * 4)
        assert terms["optimizer_s"] == pytest.approx(adamw + step)
