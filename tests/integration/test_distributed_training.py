"""Real DeepSpeed ZeRO-3 over gloo with 2 processes: equivalence, sharding, frozen weights, resume, eval."""
import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from calm_dist.config import load_config
from calm_dist.data.prepare import load_rows
from calm_dist.data.tokenizer import Tokenizer
from calm_dist.model.baselines import LoRAAnchor
from calm_dist.model.io import load_causal_lm
from calm_dist.planning import costs

from tests.helpers.launch import REPO, describe, run_ranks
from tests.helpers.reference import merged_lora_anchor
from tests.helpers.reference_training import eval_loss, reference_training
from tests.helpers.tiny import tiny_setup

pytestmark = pytest.mark.slow
WORKER = str(REPO / "tests" / "helpers" / "workers" / "zero3_worker.py")
RECIPE = REPO / "recipes" / "tiny.yaml"
STEPS = 6
GLOBAL_BATCH = 16  # 2 ranks x micro-batch 4 x accumulation 2
# 40 rows: two global batches an epoch and 8 rows dropped, so 6 steps run 3 epochs.
N_TRAIN = 40
# 17 rows, round-robin over 2 ranks in micro-batches of 4: rank 0 has 9 rows (4, 4, 1), rank 1 has 8 (4, 4,
# then the dummy forward of a rank out of rows).
N_EVAL = 17
PEAK_TFLOPS_PER_RANK = 0.5


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("tiny"), n_train=N_TRAIN, n_eval=N_EVAL)


def overrides(setup: Path, out: Path, **extra) -> list[str]:
    items = {
        "model.anchor": setup / "anchor", "model.augmenting": f"[{setup / 'augmenting'}]",
        "model.layer_pairs": "[[[1,1],[3,3]]]",
        "data.train": setup / "train.jsonl", "data.eval": setup / "eval.jsonl",
        "data.tokenizer": setup / "tokenizer.model", "data.seq_len": 32,
        "data.cache_dir": out.parent / "data_cache", "train.output_dir": out, "train.steps": STEPS,
        "train.micro_batch_size": 4, "train.global_batch_size": GLOBAL_BATCH, "train.log_every": 1,
        "optim.lr": 3e-3, "optim.warmup_steps": 2, "tracking.enabled": "false",
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def run_worker(setup, out, world=2, **extra):
    report = out.parent / f"{out.name}.report.json"
    run_ranks([WORKER, str(report), str(RECIPE), *overrides(setup, out, **extra)], world=world)
    return json.loads(report.read_text())


def reference_run(setup: Path, out: Path):
    """Single process, plain PyTorch: the same global batches, AdamW, schedule and clipping."""
    cfg = load_config(RECIPE, overrides(setup, out))
    data = load_rows(cfg.data, cfg.data.train, "data.train", Tokenizer(cfg.data.tokenizer), out.parent / "ref_cache")
    assert STEPS > 2 * (len(data) // GLOBAL_BATCH)  # the run crosses two epoch boundaries
    return reference_training(cfg, GLOBAL_BATCH, out.parent / "ref_cache")


def assert_matches_reference(report: dict, out: Path, reference) -> None:
    """The run's losses and exported weights equal the single-process reference's (losses, weights)."""
    ref_losses, ref_weights = reference
    assert report["losses"] == pytest.approx(ref_losses, abs=1e-5)
    trained = load_file(str(out / "final" / "composition.safetensors"))
    assert trained.keys() == ref_weights.keys()
    for k in trained:
        torch.testing.assert_close(trained[k], ref_weights[k], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def reference(setup_dir, tmp_path_factory):
    return reference_run(setup_dir, tmp_path_factory.mktemp("ref") / "ref")


def logged(out: Path, key: str) -> dict[int, float]:
    """step -> value of one metric in rank 0's metrics.jsonl."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def export_eval_loss(setup: Path, out: Path, rows) -> float:
    """Token-mean next-token loss of the exported composition over the given eval rows (one process)."""
    return eval_loss(out / "final", load_config(RECIPE, overrides(setup, out)), rows, out.parent / "ref_cache")


@pytest.fixture(scope="module")
def zero3(setup_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3") / "zero3"
    return out, run_worker(setup_dir, out, **{"train.peak_tflops_per_rank": PEAK_TFLOPS_PER_RANK})


def test_two_rank_zero3_matches_single_process_reference(setup_dir, zero3, reference):
    out, report = zero3
    assert len(report["losses"]) == STEPS
    assert report["losses"][-1] < report["losses"][0]
    assert_matches_reference(report, out, reference)
    # the eval loss covers every eval row, the ragged last micro-batches and the dummy forward included
    assert logged(out, "eval/loss")[STEPS] == pytest.approx(export_eval_loss(setup_dir, out, range(N_EVAL)), abs=1e-5)
    # frozen weights never move; every parameter (frozen too) holds half on each rank
    assert report["frozen_mismatches"] == []
    assert report["partition"]["all_partitioned"]
    assert report["partition"]["local"] * 2 == pytest.approx(report["partition"]["full"], rel=0.01)
    fused, plain = report["head_loss_outside_forward"]  # the head's own ZeRO-3 gather (lm_loss._gathered)
    assert fused == pytest.approx(plain, abs=1e-5)
    # nothing left in /dev/shm (calm_dist.training.dist_env.disable_shared_memory_allreduce)
    assert report["shm_buffers"] == []


def test_two_rank_zero3_matches_single_process_reference_with_packing(setup_dir, tmp_path):
    """data.packing: rows of several documents, kept apart by their position ids in the anchor, the augmenting
    model and the cross-attention, on both sides of the comparison."""
    out = tmp_path / "packed"
    packed = {"data.packing": "true"}
    report = run_worker(setup_dir, out, **packed)
    cfg = load_config(RECIPE, overrides(setup_dir, out, **packed))
    rows = load_rows(cfg.data, cfg.data.train, "data.train", Tokenizer(cfg.data.tokenizer), tmp_path / "ref_cache")
    assert ((rows.batch(range(len(rows)))["position_ids"] == 0).sum(-1) >= 2).all()  # every row packs documents
    assert_matches_reference(report, out, reference_training(cfg, GLOBAL_BATCH, tmp_path / "ref_cache"))


def test_logged_tflops_and_mfu_are_the_cost_model_over_the_step_time(setup_dir, zero3):
    """What the trainer logs: model FLOPs of every position of the global batch (costs.step_cost) over the
    step's wall time, and that over the peak of all ranks."""
    out, _ = zero3
    per_token = costs.step_cost(AutoConfig.from_pretrained(setup_dir / "anchor"),
                                [AutoConfig.from_pretrained(setup_dir / "augmenting")], [[(1, 1), (3, 3)]],
                                seq_len=32).total
    step_s, tflops, mfu = (logged(out, k) for k in ("train/step_s", "train/tflops", "train/mfu"))
    assert sorted(tflops) == sorted(mfu) == list(range(1, STEPS + 1))
    for step, seconds in step_s.items():
        expected = per_token * GLOBAL_BATCH * 32 / seconds / 1e12
        assert tflops[step] == pytest.approx(expected, rel=1e-9)
        assert mfu[step] == pytest.approx(expected / (2 * PEAK_TFLOPS_PER_RANK), rel=1e-9)


def test_compiled_blocks_with_activation_checkpointing_match_reference(setup_dir, tmp_path, reference):
    """train.compile under ZeRO-3: the leaf blocks' weights are gathered around the compiled graphs, and the
    checkpointed blocks recompute through them."""
    out = tmp_path / "compiled"
    report = run_worker(setup_dir, out, **{"train.compile": "true", "train.activation_checkpointing": "true",
                                           "train.eval_batches": 2})
    assert report["compiled_graphs"] > 0 and report["graph_breaks"] == 0
    assert_matches_reference(report, out, reference)
    # 2 eval batches of 4 rows per rank: rank 0 rows 0, 2, .., 14, rank 1 rows 1, 3, .., 15
    assert logged(out, "eval/loss")[STEPS] == pytest.approx(export_eval_loss(setup_dir, out, range(16)), abs=1e-5)


def test_stop_and_resume_equals_uninterrupted_run(setup_dir, tmp_path):
    full = run_worker(setup_dir, tmp_path / "full", **{"train.checkpoint_every": 2})
    mlflow = {"tracking.enabled": "true", "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
              "tracking.experiment": "resume-test", "tracking.system_metrics": "false"}
    stopped = run_worker(setup_dir, tmp_path / "split", **{"train.stop_after_step": 3}, **mlflow)
    ckpt = tmp_path / "split" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_3"
    assert not (tmp_path / "split" / "final").exists()
    resumed = run_worker(setup_dir, tmp_path / "split", **{"train.resume": "auto"}, **mlflow)
    check_one_mlflow_run(tmp_path / "mlflow.db", "resume-test", full["losses"])
    assert stopped["losses"] + resumed["losses"] == full["losses"]  # bit-exact
    # every forward drew random numbers (zero3_worker.draw_on_every_forward); each rank's RNG states came back
    assert resumed["rng_draws"] == full["rng_draws"]
    assert stopped["rng_draws"] != full["rng_draws"] and full["rng_draws"][0] != full["rng_draws"][1]
    a = load_file(str(tmp_path / "full" / "final" / "composition.safetensors"))
    b = load_file(str(tmp_path / "split" / "final" / "composition.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the last K checkpoints are kept, `latest` names the newest
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["latest", "step_4", "step_6"]


def check_one_mlflow_run(db, experiment, losses):
    """Both halves of a stopped-and-resumed 2-rank job logged into exactly one MLflow run."""
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == str(STEPS) and run.data.params["data.seq_len"] == "32"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, STEPS + 1))
    assert [m.value for m in history] == pytest.approx(losses, abs=1e-6)
    assert run.data.tags["world_size"] == "2" and run.data.tags["zero_stage"] == "3"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "deepspeed_config.json", "composition"} <= artifacts


def test_cached_states_with_activation_checkpointing_match_reference(setup_dir, tmp_path, reference):
    """`calm-dist cache` on 2 ranks, then ZeRO-3 training that never loads the augmenting weights; then a
    shard that only rank 1 verifies is corrupted: both ranks stop with exit 2 and rank 0 says what rank 1 found."""
    out = tmp_path / "cached"
    common = overrides(setup_dir, out, **{"train.augmenting_states": "cached",
                                          "train.activation_checkpointing": "true"})
    run_ranks(["-m", "calm_dist.cli", "cache", "--config", str(RECIPE), "--rows-per-shard", "16", *common])
    manifest = json.loads((out / "augmenting_cache" / "train" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 3 and manifest["rows"] == N_TRAIN
    report = out.parent / "cached.report.json"
    run_ranks([WORKER, str(report), str(RECIPE), *common])
    ref_losses, _ = reference
    assert json.loads(report.read_text())["losses"] == pytest.approx(ref_losses, abs=1e-5)
    # cached eval states, the dummy forward reading row 0's
    assert logged(out, "eval/loss")[STEPS] == pytest.approx(export_eval_loss(setup_dir, out, range(N_EVAL)), abs=1e-5)

    shard = out / "augmenting_cache" / "train" / "shard-00001.safetensors"  # rank r verifies shards r, r + 2, ..
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    again = overrides(setup_dir, tmp_path / "corrupted", **{"train.augmenting_states": "cached",
                                                            "train.states_cache_dir": out / "augmenting_cache"})
    results = run_ranks([str(REPO / "calm_dist" / "train.py"), "--config", str(RECIPE), *again], check=False)
    assert [r.returncode for r in results] == [2, 2], describe(results)
    errors = [line for line in results[0].output.splitlines() if line.startswith("calm_dist:")]
    assert len(errors) == 1 and errors[0].startswith("calm_dist: error: rank 1: "), describe(results)
    assert f"{shard} is corrupted" in errors[0], describe(results)


@pytest.mark.parametrize("baseline", [{"model.method": "lora"}, {"model.augmenting_init": "random"},
                                      {"model.augmenting_sees": "prompt"}])
def test_baselines_train_through_the_same_zero3_entry_point(setup_dir, tmp_path, baseline):
    """LoRA on the anchor, a random augmenting model, the prompt-only augmenting model: 2 ranks, ZeRO-3.
    LoRA's export has trained (B starts at zero) and reloads to the anchor with B A folded in by hand; the
    random augmenting model is its seeded initialisation. (tests/unit/test_baselines.py: the prompt-only mask.)"""
    out = tmp_path / "baseline"
    report = run_worker(setup_dir, out, **baseline)
    assert len(report["losses"]) == STEPS and report["losses"][-1] < report["losses"][0]
    assert report["partition"]["all_partitioned"]
    saved = json.loads((out / "final" / "composition.json").read_text())
    if baseline.get("model.method") == "lora":  # PEFT's adapter format, gathered from the ZeRO-3 shards
        from peft import PeftModel

        assert saved["method"] == "lora" and saved["training"]["steps"] == STEPS
        weights = load_file(str(out / "final" / "adapter_model.safetensors"))
        assert weights and all(w.abs().max() > 0 for w in weights.values())
        anchor = str(setup_dir / "anchor")
        reloaded = LoRAAnchor.from_export(out / "final", load_causal_lm(anchor))
        by_peft = PeftModel.from_pretrained(load_causal_lm(anchor), str(out / "final"))
        reference = merged_lora_anchor(load_causal_lm(anchor), weights)
        x = torch.randint(3, reference.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(reloaded(x).logits, reference(input_ids=x).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(by_peft(input_ids=x).logits, reference(input_ids=x).logits, atol=1e-5, rtol=0)
    elif "model.augmenting_init" in baseline:  # the export names the random model it was trained with
        random_dir = out / "random_augmenting" / "0"
        assert str(random_dir) in json.dumps(saved["augmenting"]) and (random_dir / "config.json").exists()
        torch.manual_seed(load_config(REPO / "recipes" / "tiny.yaml", overrides(setup_dir, out)).train.seed + 1)
        expected = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(setup_dir / "augmenting")).state_dict()
        written = load_causal_lm(str(random_dir)).state_dict()
        assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)


def test_two_rank_zero2_matches_single_process_reference(setup_dir, tmp_path, reference):
    """distributed.deepspeed_config=zero2: the frozen models whole on every rank (no gathers), the composition's
    gradients and optimizer state sharded; the same losses and weights as the reference, frozen weights intact.
    Its frozen blocks compile without being ZeRO-3 leaves (no DeepSpeed hook inside them)."""
    out = tmp_path / "zero2"
    report = run_worker(setup_dir, out, **{"distributed.deepspeed_config": "zero2", "train.compile": "true",
                                           "distributed.zero3_leaf_blocks": "false"})
    assert report["compiled_graphs"] > 0 and report["graph_breaks"] == 0
    assert_matches_reference(report, out, reference)
    assert logged(out, "eval/loss")[STEPS] == pytest.approx(export_eval_loss(setup_dir, out, range(N_EVAL)), abs=1e-5)
    assert report["frozen_mismatches"] == []
    assert report["partition"]["local"] == report["partition"]["full"]  # nothing sharded: every tensor whole


def test_zero2_stop_and_resume_in_bf16_equals_uninterrupted_run(setup_dir, tmp_path):
    """ZeRO-2 resume restores each rank's fp32 master partition as saved, then the model's bf16 weights from all
    of them: bf16 training resumes bit for bit (fp32 masters re-derived from the bf16 weights would not)."""
    bf16 = {"distributed.deepspeed_config": "zero2", "train.precision": "bf16"}
    full = run_worker(setup_dir, tmp_path / "full", **bf16)
    stopped = run_worker(setup_dir, tmp_path / "split", **{"train.stop_after_step": 3}, **bf16)
    resumed = run_worker(setup_dir, tmp_path / "split", **{"train.resume": "auto"}, **bf16)
    assert stopped["losses"] + resumed["losses"] == full["losses"]  # bit-exact
    assert resumed["rng_draws"] == full["rng_draws"]
    a = load_file(str(tmp_path / "full" / "final" / "composition.safetensors"))
    b = load_file(str(tmp_path / "split" / "final" / "composition.safetensors"))
    assert all(a[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)
