"""calm_dist.tracking.tracker through real training jobs (calm_dist/train.py) and a real MLflow server: a misconfigured
store refused at validation, a job started offline and resumed into one run."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from calm_dist.tracking.store import OFFLINE_DIRNAME, read_offline_file
from tests.helpers.launch import REPO, describe, run_ranks
from tests.helpers.mlflow_server import LocalServer, clean_mlflow_env, serve, start_or_skip


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    clean_mlflow_env(monkeypatch)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    yield from serve(tmp_path_factory.mktemp("mlflow_server"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.helpers.tiny import tiny_setup

    return tiny_setup(tmp_path_factory.mktemp("tiny"), n_train=32, n_eval=8)


TRAIN_STEPS = 4


def train_args(tiny, out, **extra) -> list[str]:
    items = {"model.anchor": tiny / "anchor", "model.augmenting": f"[{tiny / 'augmenting'}]",
             "data.train": tiny / "train.jsonl", "data.eval": "null", "data.tokenizer": tiny / "tokenizer.model",
             "data.cache_dir": tiny / "data_cache", "train.output_dir": out, "train.steps": TRAIN_STEPS,
             "train.micro_batch_size": 4, "train.global_batch_size": 8, "train.log_every": 1,
             "tracking.enabled": "true", "tracking.system_metrics": "false", "tracking.retry_interval_s": 60}
    items.update(extra)
    return ["--config", str(REPO / "recipes" / "tiny.yaml"), *[f"{k}={v}" for k, v in items.items()]]


@pytest.mark.slow
def test_misconfigured_store_is_one_line_and_exit_2(mlflow_server, tiny, tmp_path, monkeypatch, capsys):
    """train.py's main: a deleted experiment on a real server, a URI scheme MLflow has no store for, a file
    store MLflow refuses: each one line, exit 2, before any model loads, the output directory never made."""
    from calm_dist.train import main

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    client = MlflowClient(mlflow_server.uri)
    gone = client.create_experiment("deleted_before_the_job")
    client.delete_experiment(gone)
    (tmp_path / "mlruns").mkdir()
    cases = [
        ({"tracking.tracking_uri": mlflow_server.uri, "tracking.experiment": "deleted_before_the_job"},
         f"the MLflow experiment 'deleted_before_the_job' (id {gone}) at {mlflow_server.uri} is deleted; restore "
         f"it with `MLFLOW_TRACKING_URI={mlflow_server.uri} mlflow experiments restore --experiment-id {gone}`"),
        ({"tracking.tracking_uri": "htp://127.0.0.1:5000"}, "MLflow has no tracking store for the scheme 'htp'"),
        ({"tracking.tracking_uri": tmp_path / "mlruns"}, "The filesystem tracking backend"),
    ]
    for overrides, message in cases:
        out = tmp_path / "never_made"
        code = main(train_args(tiny, out, **overrides))
        lines = capsys.readouterr().err.splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("calm_dist: config error: "), lines
        assert message in lines[0] and not out.exists()


@pytest.mark.slow
def test_job_started_offline_then_resumed_logs_every_metric_once_into_one_run(tiny, tmp_path):
    """2 ranks, ZeRO-3: the job starts while nothing listens on the store's port (one warning, it trains,
    stops at step 2 with its records buffered); the server comes up on that port; the job resumes. One run
    holds every metric step exactly once, the losses rank 0 wrote to metrics.jsonl, the first job's params."""
    server = LocalServer(tmp_path / "server")  # a free port; the server is started after the first job
    out = tmp_path / "run"
    args = [str(REPO / "calm_dist" / "train.py"),
            *train_args(tiny, out, **{"tracking.tracking_uri": server.uri, "tracking.experiment": "offline_start"})]
    first = run_ranks([*args, "train.stop_after_step=2"], check=False)
    assert [r.returncode for r in first] == [0, 0], describe(first)
    warnings = [line for line in first[0].output.splitlines() if line.startswith("calm_dist: warning:")]
    assert len(warnings) == 1 and f"store {server.uri} does not answer" in warnings[0], describe(first)
    state = json.loads((out / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert state["mlflow_run_id"] is None  # the run did not exist yet
    (buffered,) = (out / OFFLINE_DIRNAME).glob("*.jsonl")
    assert read_offline_file(buffered)[1][0]["type"] == "create"

    try:
        start_or_skip(server)
        second = run_ranks([*args, "train.resume=auto"], check=False)
        assert [r.returncode for r in second] == [0, 0], describe(second)
        client = MlflowClient(server.uri)
        (run,) = client.search_runs([client.get_experiment_by_name("offline_start").experiment_id])
        run_id = run.info.run_id
        logged = {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
                  for key in run.data.metrics}
        artifacts = {a.path for a in client.list_artifacts(run_id)}
    finally:
        server.down()
    state = json.loads((out / "checkpoints" / f"step_{TRAIN_STEPS}" / "trainer_state.json").read_text())
    assert state["mlflow_run_id"] == run_id and run.info.status == "FINISHED"
    assert not list((out / OFFLINE_DIRNAME).glob("*.jsonl"))
    # rank 0 wrote every logged metric to metrics.jsonl as well: the run holds each (step, value) once
    written: dict[str, list] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key != "step":
                written.setdefault(key, []).append((row["step"], value))
    assert sorted(step for step, _ in written["train/loss"]) == list(range(1, TRAIN_STEPS + 1))
    assert logged.keys() == written.keys()
    for key, points in written.items():
        assert [step for step, _ in sorted(logged[key])] == [step for step, _ in sorted(points)], key
        assert [v for _, v in sorted(logged[key])] == pytest.approx([v for _, v in sorted(points)], rel=1e-6), key
    assert run.data.params["train.stop_after_step"] == "2"  # logged once, by the first job's buffered create
    assert run.data.tags["world_size"] == "2"
    assert {"config.json", "deepspeed_config.json", "composition"} <= artifacts
