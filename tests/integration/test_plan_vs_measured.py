"""`calm_dist.planning.plan` against a real 2-rank ZeRO-3 CPU run of the tiny set-up (calm_dist/tiny_setup.py):
per-rank parameter memory (frozen and trainable) against the bytes DeepSpeed really holds (ds_tensor),
and the step FLOPs against FlopCounterMode's count on a rank. Each within 10%."""
import json

import pytest

from tests.helpers.launch import REPO, run_ranks

pytestmark = pytest.mark.slow
WORKER = str(REPO / "benchmarks" / "zero3_worker.py")
PAIRS = [[1, 1], [3, 3]]
SEQ, MICRO, WORLD = 32, 4, 2


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    from tests.helpers.tiny import tiny_setup

    setup = tiny_setup(tmp_path_factory.mktemp("tiny"), n_train=8, n_eval=2)
    report = tmp_path_factory.mktemp("zero3") / "report"
    run_ranks([WORKER, "--anchor", str(setup / "anchor"), "--augmenting", str(setup / "augmenting"),
               "--pairs", json.dumps(PAIRS), "--seq", str(SEQ), "--micro-batch", str(MICRO), "--steps", "1",
               "--ds-config", str(REPO / "ds_configs" / "zero3.json"), "--count-flops", "--report", str(report)],
              world=WORLD, timeout=400)
    ranks = [json.loads(report.with_name(f"report.rank{r}.json").read_text()) for r in range(WORLD)]
    return setup, ranks


def predicted(setup, threshold):
    from calm_dist.planning.plan import ZeroOptions, plan

    # FlopCounterMode counts every query against every key: compare with the all-pairs attention count
    return plan(str(setup / "anchor"), str(setup / "augmenting"), PAIRS, nodes=1, gpus_per_node=WORLD, seq_len=SEQ,
                micro_batch=MICRO, dtype="fp32", zero=ZeroOptions(param_persistence_threshold=threshold),
                causal=False)


def test_parameter_memory_per_rank(measured):
    setup, ranks = measured
    threshold = ranks[0]["ds_config"]["zero_optimization"]["stage3_param_persistence_threshold"]
    p = predicted(setup, int(threshold))
    frozen_pred = p.memory_gpu["frozen_params"]
    train_pred = p.memory_gpu["trainable_params"]
    persistent_pred = p.memory_gpu.get("persistent_params", 0.0)
    for r in ranks:
        assert r["world_size"] == WORLD
        # the shards (plan: frozen_params, trainable_params); whole copies of persistent tensors come on top
        assert r["frozen"]["shard_bytes"] == pytest.approx(frozen_pred, rel=0.10)
        assert r["trainable"]["shard_bytes"] == pytest.approx(train_pred, rel=0.10)
        measured_total = r["frozen"]["resident_bytes"] + r["trainable"]["resident_bytes"]
        assert measured_total == pytest.approx(frozen_pred + train_pred + persistent_pred, rel=0.10)
        # and the shards really are 1/world of the whole
        assert r["frozen"]["shard_bytes"] == pytest.approx(r["frozen"]["full_bytes"] / WORLD, rel=0.02)


def test_step_flops_per_rank(measured):
    setup, ranks = measured
    p = predicted(setup, 0)
    for r in ranks:
        assert r["flops_fwd_bwd_micro_step"] == pytest.approx(p.flops["per_rank_per_step_model"], rel=0.10)
        assert p.flops["tokens_per_micro_step_per_rank"] == SEQ * MICRO
