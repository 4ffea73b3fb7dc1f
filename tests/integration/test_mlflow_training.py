"""A training job logs as MLflow users expect, end to end on a real server: two ranks standing for two nodes
(each its node's local rank 0), MLFLOW_NESTED_RUN, HF_MLFLOW_LOG_ARTIFACTS, every node's system metrics, peak
memory and the time left per logged step; the export records its run and carries a model card; `calm-dist eval`
logs into that run; `calm-dist compare` shows it."""
from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from calm_dist.tracking.hf_env import PARENT_TAG
from tests.helpers.launch import REPO, Ranks, describe
from tests.helpers.mlflow_server import clean_mlflow_env, serve

STEPS = 6


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    clean_mlflow_env(monkeypatch)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    yield from serve(tmp_path_factory.mktemp("mlflow_server_training"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.helpers.tiny import tiny_setup

    return tiny_setup(tmp_path_factory.mktemp("tiny"), n_train=32, n_eval=8)


def overrides(tiny, out, uri) -> list[str]:
    items = {"model.anchor": tiny / "anchor", "model.augmenting": f"[{tiny / 'augmenting'}]",
             "data.train": tiny / "train.jsonl", "data.eval": tiny / "eval.jsonl",
             "data.tokenizer": tiny / "tokenizer.model", "data.cache_dir": tiny / "data_cache",
             "train.output_dir": out, "train.steps": STEPS, "train.micro_batch_size": 4,
             "train.global_batch_size": 8, "train.log_every": 1, "train.checkpoint_every": 3, "train.eval_every": 3,
             "tracking.tracking_uri": uri, "tracking.experiment": "two_nodes", "tracking.run_name": "composition",
             "tracking.system_metrics": "true"}
    return [f"{k}={v}" for k, v in items.items()]


@pytest.mark.slow
def test_a_two_node_job_its_eval_and_its_comparison(mlflow_server, tiny, tmp_path, capsys):
    client = MlflowClient(mlflow_server.uri)
    experiment = client.create_experiment("two_nodes")
    parent = client.create_run(experiment, run_name="sweep").info.run_id
    out = tmp_path / "run"
    recipe = str(REPO / "recipes" / "tiny.yaml")
    env = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5", "HF_MLFLOW_LOG_ARTIFACTS": "true",
           "MLFLOW_NESTED_RUN": "1", "MLFLOW_RUN_ID": parent}
    one_per_node = {"LOCAL_RANK": 0, "LOCAL_WORLD_SIZE": 1, "LOCAL_SIZE": 1}  # rank r is node r's local rank 0
    ranks = Ranks([str(REPO / "calm_dist" / "train.py"), "--config", recipe, *overrides(tiny, out, mlflow_server.uri)],
                  env=env, rank_env={0: one_per_node, 1: one_per_node})
    results = ranks.wait(600)
    assert [r.returncode for r in results] == [0, 0], describe(results)

    # the job's run: a child of the run MLFLOW_RUN_ID names, which is left as it was
    (run,) = client.search_runs([experiment], filter_string="attributes.run_name = 'composition'")
    run_id = run.info.run_id
    assert run.data.tags[PARENT_TAG] == parent and "train/loss" not in client.get_run(parent).data.metrics
    # every node's system metrics under its id, and its host
    for node in ("node0", "node1"):
        assert any(k.startswith(f"system/{node}/cpu_utilization") for k in run.data.metrics), sorted(run.data.metrics)
    assert not any(k.startswith("system/cpu") for k in run.data.metrics)
    assert run.data.tags["node1.hostname"]
    # peak memory at every logged step, in MLflow and in the progress line, with the time left
    assert [m.step for m in client.get_metric_history(run_id, "mem/peak_host_gib")] == list(range(1, STEPS + 1))
    progress = [line for line in results[0].output.splitlines() if line.startswith("step ") and "loss" in line
                and "/" in line.split()[1]]
    assert len(progress) == STEPS and all("| peak mem GiB: host " in line and "| ETA " in line for line in progress)
    assert progress[-1].endswith("| ETA 0s")
    # HF_MLFLOW_LOG_ARTIFACTS: each checkpoint as it was saved; the export always
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(
        run_id, "checkpoints")}
    assert {"checkpoints/step_3", "checkpoints/step_6", "composition"} <= artifacts, artifacts
    # the export records the run and its results, and says so in its model card
    final = json.loads((out / "final" / "composition.json").read_text())["training"]
    assert final["mlflow"] == {"run_id": run_id, "experiment": "two_nodes", "tracking_uri": mlflow_server.uri}
    assert final["steps"] == STEPS and final["final_metrics"]["train/loss"] == run.data.metrics["train/loss"]
    assert final["final_metrics"]["eval/loss"] == run.data.metrics["eval/loss"]
    assert f"`{run_id}`" in (out / "final" / "README.md").read_text()

    # calm-dist eval: into this run (the export says which), the anchor into a child run named for it
    from calm_dist.cli import main as calm_dist

    eval_overrides = [o for o in overrides(tiny, out, mlflow_server.uri) if not o.startswith("tracking.")]
    assert calm_dist(["eval", "--config", recipe, *eval_overrides, "--set", f"heldout={tiny / 'eval.jsonl'}",
                      "--models", "anchor", "--limit", "4"]) == 0
    assert f"composed -> run {run_id}" in capsys.readouterr().err
    scored = client.get_run(run_id)
    assert "task/heldout/exact_match" in scored.data.metrics and scored.info.status == "FINISHED"
    (anchor,) = client.search_runs([experiment], filter_string="attributes.run_name = 'eval anchor'")
    assert anchor.data.tags[PARENT_TAG] == run_id
    assert len(client.search_runs([experiment])) == 3  # the sweep, the job, the anchor's eval: no unnamed run

    # calm-dist compare, by default: the job and the anchor's eval, and the job's curves
    from calm_dist.tracking.compare import main as compare

    assert compare(["--tracking-uri", mlflow_server.uri, "-e", "two_nodes", "-o", str(tmp_path / "cmp")]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("2 runs") and "task/heldout/exact_match" in shown
    assert "(2 curves: train/loss, eval/loss)" in shown and (tmp_path / "cmp" / "compare.png").is_file()
