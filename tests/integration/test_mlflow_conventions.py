"""What calm_dist logs as MLflow users expect, against real sqlite stores: transformers' MLFLOW_NESTED_RUN, each
node's system metrics under its node id, `calm-dist eval`'s results in the runs that trained the exports (never an
unnamed run). The same through a 2-node training job: test_mlflow_training.py."""
from __future__ import annotations

import json
import time

import pytest
from mlflow import MlflowClient

from calm_dist.config import TrackingConfig
from calm_dist.tracking.hf_env import PARENT_TAG, log_checkpoints
from calm_dist.tracking.node_metrics import NodeSystemMetrics
from calm_dist.tracking.tracker import Tracker
from tests.helpers.mlflow_server import clean_mlflow_env


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    clean_mlflow_env(monkeypatch)
    for var in ("MLFLOW_NESTED_RUN", "HF_MLFLOW_LOG_ARTIFACTS", "MLFLOW_SYSTEM_METRICS_NODE_ID"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    uri = "sqlite:///" + str(tmp_path_factory.mktemp("store") / "mlflow.db")
    MlflowClient(uri).search_experiments(max_results=1)  # creates the tables once
    return uri


def tracked_run(uri: str, out, name: str, experiment: str = "conventions", **extra) -> Tracker:
    tracker = Tracker(TrackingConfig(tracking_uri=uri, experiment=experiment, run_name=name, system_metrics=False),
                      is_main_process=True, output_dir=out, **extra)
    tracker.start({"steps": 3})
    return tracker


def test_mlflow_nested_run_makes_the_job_a_child_of_mlflow_run_id(uri, tmp_path, monkeypatch):
    """As transformers' MLflowCallback: MLFLOW_NESTED_RUN=true starts a new run nested in the current one (here the
    run MLFLOW_RUN_ID names) instead of continuing it; without it MLFLOW_RUN_ID is continued."""
    client = MlflowClient(uri)
    parent = tracked_run(uri, tmp_path / "parent", "sweep")
    parent.close()
    monkeypatch.setenv("MLFLOW_RUN_ID", parent.run_id)
    monkeypatch.setenv("MLFLOW_NESTED_RUN", "true")
    child = tracked_run(uri, tmp_path / "child", "trial")
    child.log_metrics({"train/loss": 1.0}, 1)
    child.close()
    assert child.run_id != parent.run_id
    run = client.get_run(child.run_id)
    assert run.data.tags[PARENT_TAG] == parent.run_id and run.info.run_name == "trial"
    assert "train/loss" not in client.get_run(parent.run_id).data.metrics

    monkeypatch.setenv("MLFLOW_NESTED_RUN", "0")
    resumed = tracked_run(uri, tmp_path / "resumed", "trial")
    resumed.close()
    assert resumed.run_id == parent.run_id


def test_hf_mlflow_log_artifacts_reads_true_as_transformers_does(monkeypatch):
    for value, expected in (("1", True), ("TRUE", True), ("yes", True), ("0", False), ("false", False)):
        monkeypatch.setenv("HF_MLFLOW_LOG_ARTIFACTS", value)
        assert log_checkpoints() is expected, value
    monkeypatch.delenv("HF_MLFLOW_LOG_ARTIFACTS")
    assert log_checkpoints() is False


def test_a_nodes_system_metrics_go_into_the_run_under_its_node_id(uri, tmp_path, monkeypatch):
    """Another node's local rank 0 logs MLflow's system metrics into rank 0's run as system/node1/..., with the
    node's host name as a tag; rank 0's own monitor names its node too."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    tracker = Tracker(TrackingConfig(tracking_uri=uri, experiment="conventions"), is_main_process=True,
                      output_dir=tmp_path, node_id="node0")
    run_id = tracker.start({})
    node = NodeSystemMetrics(run_id, uri, "node1")
    assert node.start()
    client, deadline = MlflowClient(uri), time.monotonic() + 30
    while time.monotonic() < deadline:
        tracker.log_metrics({"train/loss": 1.0}, 0)
        keys = client.get_run(run_id).data.metrics
        if any(k.startswith("system/node0/cpu") for k in keys) and any(k.startswith("system/node1/cpu") for k in keys):
            break
        time.sleep(0.2)
    node.stop()
    tracker.close()
    run = client.get_run(run_id)
    assert any(k.startswith("system/node0/cpu") for k in run.data.metrics), sorted(run.data.metrics)
    assert any(k.startswith("system/node1/cpu") for k in run.data.metrics), sorted(run.data.metrics)
    assert not any(k.startswith("system/cpu") for k in run.data.metrics)  # no metric without its node
    assert run.data.tags["node1.hostname"]


def export(directory, run_id: str | None, uri: str, steps: int = 3):
    """The composition.json a training job writes (what eval reads of it): its run and steps."""
    directory.mkdir()
    training = {"steps": steps, "mlflow": {"run_id": run_id, "experiment": "conventions", "tracking_uri": uri}}
    (directory / "composition.json").write_text(json.dumps({"format_version": 1, "training": training}))
    return directory


def results(exact_match: float) -> dict:
    return {"heldout": {"exact_match": exact_match, "loss": 1.5, "n": 4, "examples": []}}


def test_eval_logs_each_export_into_its_training_run_and_the_base_models_into_named_child_runs(uri, tmp_path,
                                                                                              monkeypatch):
    """calm-dist eval's logging: an export's scores go into the run it records, at its last step, and nothing else
    of that finished run changes (status, end time, tags); the anchor's and an unrecorded export's go to child runs
    named after them, with $MLFLOW_TAGS as every run; the prefix-only ablation into its export's run; no unnamed
    run appears."""
    from calm_dist.config import Config
    from calm_dist.eval_tracking import log_results

    client = MlflowClient(uri)
    trained = tracked_run(uri, tmp_path / "composition", "composition")
    trained.close()
    before = client.get_run(trained.run_id)
    compositions = {"composed": str(export(tmp_path / "final", trained.run_id, uri)),
                    "saved_by_hand": str(export(tmp_path / "other", None, uri))}
    cfg = Config()
    cfg.train.output_dir = str(tmp_path / "eval")
    monkeypatch.setenv("MLFLOW_TAGS", "demo_run=20261130")
    log_results(cfg, {"anchor": results(0.25), "composed": results(0.75), "composed_prefix_only": results(0.5),
                      "saved_by_hand": results(0.0)}, compositions, None)

    after = client.get_run(trained.run_id)
    assert after.data.metrics["task/heldout/exact_match"] == 0.75
    assert after.data.metrics["task/heldout/exact_match_prefix_only"] == 0.5
    assert [m.step for m in client.get_metric_history(trained.run_id, "task/heldout/exact_match")] == [3]
    assert (after.info.status, after.info.end_time, after.data.tags) == (
        before.info.status, before.info.end_time, before.data.tags)
    assert "task_eval/composed.json" in {a.path for a in client.list_artifacts(trained.run_id, "task_eval")}
    experiment = client.get_experiment_by_name("conventions").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([experiment])}
    assert {"eval anchor", "eval saved_by_hand"} <= set(runs) and all(runs)  # every run named
    for name, score in (("eval anchor", 0.25), ("eval saved_by_hand", 0.0)):
        assert runs[name].data.tags[PARENT_TAG] == trained.run_id and runs[name].info.status == "FINISHED"
        assert runs[name].data.tags["demo_run"] == "20261130"
        assert runs[name].data.metrics["task/heldout/exact_match"] == score


def test_eval_with_mlflow_run_id_nests_the_base_models_under_that_run(uri, tmp_path):
    from calm_dist.config import Config
    from calm_dist.eval_tracking import log_results

    parent = tracked_run(uri, tmp_path / "sweep", "sweep", experiment="nesting")
    parent.close()
    cfg = Config()
    cfg.train.output_dir = str(tmp_path / "eval")
    cfg.tracking.tracking_uri, cfg.tracking.experiment = uri, "nesting"
    log_results(cfg, {"anchor": results(0.25)}, {}, parent.run_id)
    client = MlflowClient(uri)
    (child,) = client.search_runs([client.get_experiment_by_name("nesting").experiment_id],
                                  filter_string="attributes.run_name = 'eval anchor'")
    assert child.data.tags[PARENT_TAG] == parent.run_id


def test_eval_keeps_its_results_when_mlflow_is_down(tmp_path, capsys):
    """A store that does not answer costs a warning line, not the results."""
    from calm_dist.config import Config
    from calm_dist.eval_tracking import log_results

    cfg = Config()
    cfg.train.output_dir = str(tmp_path)
    cfg.tracking.tracking_uri = "http://127.0.0.1:9"  # discard: nothing listens
    log_results(cfg, {"anchor": results(0.25)}, {}, None)
    err = capsys.readouterr().err
    assert err.startswith("calm-dist eval: warning: the results were not logged to MLflow at http://127.0.0.1:9")
    assert len(err.splitlines()) == 1


def test_progress_line_shows_peak_memory_and_time_left():
    import torch

    from calm_dist.console import progress_line
    from calm_dist.training.memory import peak_memory

    peaks = peak_memory(torch.device("cpu"))
    assert set(peaks) == {"mem/peak_host_gib"} and 0.05 < peaks["mem/peak_host_gib"] < 64  # no accelerator here
    line = progress_line(5, 20, {"train/loss": 1.0, "train/lr": 1e-3, "train/grad_norm": 0.5,
                                 "train/tokens_per_s": 1000.0, "mem/peak_host_gib": 1.5,
                                 "mem/peak_accelerator_gib": 10.25}, eta_s=192)
    assert line.endswith("| peak mem GiB: host 1.50, accelerator 10.25 | ETA 3m12s")
    assert progress_line(5, 20, {"train/loss": 1.0, "train/lr": 1e-3, "train/grad_norm": 0.5,
                                 "train/tokens_per_s": 1.0}, eta_s=7300).endswith("| ETA 2h01m")
