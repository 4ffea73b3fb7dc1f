"""Real DeepSpeed ZeRO-3 over gloo with 2 processes: equivalence, sharding, frozen weights, resume."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch import REPO, run_ranks

pytestmark = pytest.mark.slow
WORKER = str(REPO / "tests" / "workers" / "zero3_worker.py")
STEPS = 6


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    from tiny import tiny_setup

    return tiny_setup(tmp_path_factory.mktemp("tiny"), n_train=96, n_eval=16)


def overrides(setup: Path, out: Path, **extra) -> list[str]:
    items = {
        "model.anchor": setup / "anchor", "model.augmenting": f"[{setup / 'augmenting'}]",
        "model.layer_pairs": "[[[1,1],[3,3]]]",
        "data.train": setup / "train.jsonl", "data.eval": setup / "eval.jsonl", "data.tokenizer": setup / "tokenizer.model", "data.seq_len": 32,
        "data.cache_dir": out.parent / "data_cache", "train.output_dir": out, "train.steps": STEPS,
        "train.micro_batch_size": 4, "train.global_batch_size": 16, "train.log_every": 1,
        "optim.lr": 3e-3, "optim.warmup_steps": 2, "tracking.enabled": "false",
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def run_worker(setup, out, world=2, **extra):
    report = out.parent / f"{out.name}.report.json"
    run_ranks([WORKER, str(report), str(REPO / "recipes" / "tiny.yaml"), *overrides(setup, out, **extra)], world=world)
    return json.loads(report.read_text())


def reference_losses(setup: Path, out: Path):
    """Single process, plain PyTorch: the same global batches, AdamW, schedule and clipping."""
    from calm_dist import ComposedModel
    from calm_dist.config import load_config
    from calm_dist.data import GlobalBatchSampler, Tokenizer, load_tokenized
    from calm_dist.lm_loss import labelled_tokens, loss_from_logits
    from calm_dist.trainer import lr_lambda

    cfg = load_config(REPO / "recipes" / "tiny.yaml", overrides(setup, out))
    data = load_tokenized(cfg.data, cfg.data.train, Tokenizer(cfg.data.tokenizer), out.parent / "ref_cache")
    torch.manual_seed(cfg.train.seed)
    model = ComposedModel.from_pretrained(cfg.model.anchor, cfg.model.augmenting, layer_pairs=cfg.model.layer_pairs)
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    sampler = GlobalBatchSampler(len(data), cfg.train.global_batch_size, cfg.train.seed)
    losses = []
    for step in range(cfg.train.steps):
        batch = data.batch(sampler.global_batch_indices(step))
        out_ = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        # the logits path, unlike the trainer's head_loss: an independent reference for it
        loss = loss_from_logits(out_.logits, batch["labels"], "sum") / labelled_tokens(batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, model.composition_state_dict()


def test_two_rank_zero3_matches_single_process_reference(setup_dir, tmp_path):
    out = tmp_path / "zero3"
    report = run_worker(setup_dir, out)
    ref_losses, ref_weights = reference_losses(setup_dir, tmp_path / "ref")
    assert len(report["losses"]) == STEPS
    assert report["losses"] == pytest.approx(ref_losses, abs=1e-5)
    assert report["losses"][-1] < report["losses"][0]
    trained = load_file(str(out / "final" / "composition.safetensors"))
    assert trained.keys() == ref_weights.keys()
    for k in trained:
        torch.testing.assert_close(trained[k], ref_weights[k], atol=1e-4, rtol=0)
    # frozen weights never move; every parameter (frozen too) holds half on each rank
    assert report["frozen_identical"]
    assert report["partition"]["all_partitioned"]
    assert report["partition"]["local"] * 2 == pytest.approx(report["partition"]["full"], rel=0.01)
    fused, plain = report["head_loss_outside_forward"]  # the head's own ZeRO-3 gather (lm_loss._gathered)
    assert fused == pytest.approx(plain, abs=1e-5)
    assert report["shm_buffers"] == []  # nothing left in /dev/shm (calm_dist.distributed.disable_shared_memory_allreduce)


def test_compiled_blocks_with_activation_checkpointing_match_reference(setup_dir, tmp_path):
    """train.compile under ZeRO-3: the leaf blocks' weights are gathered around the compiled graphs, and the
    checkpointed blocks recompute through them."""
    out = tmp_path / "compiled"
    report = run_worker(setup_dir, out, **{"train.compile": "true", "train.activation_checkpointing": "true"})
    assert report["compiled_graphs"] > 0 and report["graph_breaks"] == 0
    ref_losses, ref_weights = reference_losses(setup_dir, tmp_path / "ref")
    assert report["losses"] == pytest.approx(ref_losses, abs=1e-5)
    trained = load_file(str(out / "final" / "composition.safetensors"))
    for k in trained:
        torch.testing.assert_close(trained[k], ref_weights[k], atol=1e-4, rtol=0)


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
    a = load_file(str(tmp_path / "full" / "final" / "composition.safetensors"))
    b = load_file(str(tmp_path / "split" / "final" / "composition.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the last K checkpoints are kept, `latest` names the newest
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["latest", "step_4", "step_6"]


def check_one_mlflow_run(db, experiment, losses):
    """Both halves of a stopped-and-resumed 2-rank job logged into exactly one MLflow run."""
    from mlflow.tracking import MlflowClient

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


def test_cached_states_with_activation_checkpointing_match_reference(setup_dir, tmp_path):
    """`calm-dist cache` on 2 ranks, then ZeRO-3 training that never loads the augmenting weights."""
    out = tmp_path / "cached"
    common = overrides(setup_dir, out, **{"train.augmenting_states": "cached", "train.activation_checkpointing": "true"})
    run_ranks(["-m", "calm_dist.cli", "cache", "--config", str(REPO / "recipes" / "tiny.yaml"),
               "--rows-per-shard", "32", *common])
    manifest = json.loads((out / "augmenting_cache" / "train" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 3 and manifest["rows"] == 96
    report = out.parent / "cached.report.json"
    run_ranks([WORKER, str(report), str(REPO / "recipes" / "tiny.yaml"), *common])
    ref_losses, _ = reference_losses(setup_dir, tmp_path / "ref")
    assert json.loads(report.read_text())["losses"] == pytest.approx(ref_losses, abs=1e-5)


@pytest.mark.parametrize("baseline", [{"model.method": "lora"}, {"model.augmenting_init": "random"},
                                      {"model.augmenting_sees": "prompt"}])
def test_baselines_train_through_the_same_zero3_entry_point(setup_dir, tmp_path, baseline):
    """LoRA on the anchor, a random augmenting model, the prompt-only augmenting model: 2 ranks, ZeRO-3."""
    from calm_dist.baselines import LoRAAnchor
    from calm_dist.composition import load_causal_lm, read_composition_config

    out = tmp_path / "baseline"
    report = run_worker(setup_dir, out, **baseline)
    assert len(report["losses"]) == STEPS and report["losses"][-1] < report["losses"][0]
    assert report["partition"]["all_partitioned"]
    saved = read_composition_config(out / "final")
    if baseline.get("model.method") == "lora":
        assert saved["method"] == "lora"
        LoRAAnchor.from_export(out / "final", load_causal_lm(str(setup_dir / "anchor")))  # loads back
    elif "model.augmenting_init" in baseline:  # the export names the random model it was trained with
        random_dir = out / "random_augmenting" / "0"
        assert str(random_dir) in json.dumps(saved["augmenting"]) and (random_dir / "config.json").exists()
