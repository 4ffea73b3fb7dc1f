"""calm_dist.tracking.tracker against real MLflow: sqlite stores (fast) and a local server (slow); the same through
training jobs in test_tracking_training.py."""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import os
import time

import pytest

from calm_dist.config import ConfigError, TrackingConfig
from calm_dist.tracking.store import (
    OFFLINE_DIRNAME,
    default_tags,
    find_or_create_experiment,
    flatten_params,
    import_offline,
    parse_tags,
    probe_tracking_store,
    read_offline_file,
)
from calm_dist.tracking.tracker import RUN_NOTE, Tracker, main as tracking_main
from tests.helpers.mlflow_server import clean_mlflow_env, free_port, serve

PARAMS = {
    "model": {"anchor": "tiny-llama", "augmenting": ["kv-a"], "pairs": [[1, 1], [3, 3]]},
    "optim": {"lr": 1e-3, "betas": (0.9, 0.95)},
    "steps": 100,
    "empty": {},
    "nothing": None,
}
FLAT = {
    "model.anchor": "tiny-llama",
    "model.augmenting": '["kv-a"]',
    "model.pairs": "[[1, 1], [3, 3]]",
    "optim.lr": "0.001",
    "optim.betas": "[0.9, 0.95]",
    "steps": "100",
    "empty": "{}",
    "nothing": "None",
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    clean_mlflow_env(monkeypatch)


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory):
    """One sqlite store shared by the fast tests (creating its tables takes seconds)."""
    from mlflow import MlflowClient

    uri = "sqlite:///" + str(tmp_path_factory.mktemp("store") / "mlflow.db")
    MlflowClient(uri).search_experiments(max_results=1)
    return uri


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _steps(client, run_id, key):
    hist = client.get_metric_history(run_id, key)
    return sorted(m.step for m in hist), {m.step: m.value for m in hist}


def _unreachable_warnings(caplog):
    return [r for r in caplog.records
            if r.name == "calm_dist.tracking.tracker" and r.levelno == logging.WARNING
            and " is unreachable (" in r.getMessage()]


# ----------------------------------------------------------------------------------------------------
# helpers


def test_flatten_params_and_parse_tags():
    assert flatten_params(PARAMS) == FLAT
    assert parse_tags("a=1, b = two ,") == {"a": "1", "b": "two"}
    assert parse_tags('{"team": "nlp", "n": 3}') == {"team": "nlp", "n": "3"}
    assert parse_tags("") == {}
    with pytest.raises(ValueError):
        parse_tags("novalue")


def test_default_tags_from_env(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("CALM_DIST_GIT_COMMIT", "abc123")
    tags = default_tags()
    assert tags["slurm_job_id"] == "4242"
    assert tags["num_nodes"] == "2"
    assert tags["world_size"] == "8"
    assert tags["git_commit"] == "abc123"
    assert tags["calm_dist_version"]
    monkeypatch.delenv("SLURM_JOB_NUM_NODES")
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_tags()["num_nodes"] == "2"  # torchrun: WORLD_SIZE / LOCAL_WORLD_SIZE


# ----------------------------------------------------------------------------------------------------
# sqlite store (fast)


def test_params_metrics_artifacts_tags_sqlite(tmp_path, monkeypatch):
    """Default store (sqlite in output_dir), default experiment, env tags; every kind of record."""
    monkeypatch.setenv("MLFLOW_TAGS", "sweep=lr,owner=ci")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "run"
    cfg = TrackingConfig(run_name="first", tags={"owner": "me"}, system_metrics=False)
    tracker = Tracker(cfg, is_main_process=True, output_dir=out)
    run_id = tracker.start(PARAMS, tags={"extra": "yes"})
    assert run_id and tracker.run_id == run_id
    assert tracker.tracking_uri == "sqlite:///" + str((out / "mlflow.db").resolve())

    for step in range(10):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1), "lr": 1e-3}, step=step)
    tracker.log_metrics({"train/loss": float("nan")}, step=10)
    (tmp_path / "note.txt").write_text("hello")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "a.bin").write_bytes(b"\0" * 10)
    tracker.log_artifact(tmp_path / "note.txt")
    tracker.log_artifact(tmp_path / "ckpt", artifact_path="checkpoint")
    tracker.log_dict({"a": {"b": 1}}, "config.json")
    tracker.set_tags({"phase": "done"})
    tracker.close()
    tracker.close()  # idempotent

    client = _client(tracker.tracking_uri)
    run = client.get_run(run_id)
    assert run.info.run_name == "first"
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "calm_dist"
    assert run.data.params == FLAT
    steps, values = _steps(client, run_id, "train/loss")
    assert steps == list(range(11))
    assert values[3] == pytest.approx(0.25) and math.isnan(values[10])
    tags = run.data.tags
    assert tags["sweep"] == "lr" and tags["owner"] == "me" and tags["extra"] == "yes"  # config beats env
    assert tags["phase"] == "done" and tags["world_size"] == "2" and "calm_dist_version" in tags
    names = {f.path for f in client.list_artifacts(run_id)}
    assert names == {"note.txt", "checkpoint", "config.json"}
    assert [f.path for f in client.list_artifacts(run_id, "checkpoint")] == ["checkpoint/a.bin"]
    # artifacts live beside the database, not in the current directory
    assert run.info.artifact_uri.startswith((out / "mlartifacts").resolve().as_uri())
    assert not (out / OFFLINE_DIRNAME).exists()


def test_env_uri_and_experiment(tmp_path, sqlite_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "env_exp")
    tracker = Tracker(TrackingConfig(system_metrics=False), is_main_process=True, output_dir=tmp_path)
    run_id = tracker.start({"x": 1})
    tracker.close()
    client = _client(sqlite_uri)
    assert client.get_experiment(client.get_run(run_id).info.experiment_id).name == "env_exp"
    assert not (tmp_path / "mlflow.db").exists()


def test_foreign_config_object_and_context_manager(tmp_path, sqlite_uri):
    """The config tree's own tracking section (no retry knobs) works; an exception marks FAILED."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(enabled=True, tracking_uri=sqlite_uri, experiment="ctx", run_name="boom",
                          tags=None, system_metrics=False)
    with pytest.raises(RuntimeError, match="boom"):
        with Tracker(cfg, is_main_process=True, output_dir=tmp_path) as tracker:
            run_id = tracker.start({"a": 1})
            tracker.log_metrics({"loss": 1.0}, 1)
            raise RuntimeError("boom")
    assert _client(sqlite_uri).get_run(run_id).info.status == "FAILED"


def test_non_main_rank_and_disabled_log_nothing(tmp_path):
    uri = "sqlite:///" + str(tmp_path / "store" / "mlflow.db")
    for main, enabled in ((False, True), (True, False)):
        out = tmp_path / f"out_{main}_{enabled}"
        tracker = Tracker(TrackingConfig(tracking_uri=uri, enabled=enabled), is_main_process=main,
                          output_dir=out)
        assert tracker.start(PARAMS) is None
        tracker.log_metrics({"loss": 1.0}, step=0)
        tracker.log_artifact(__file__)
        tracker.log_dict({"a": 1}, "a.json")
        tracker.set_tags({"a": "b"})
        assert tracker.flush()
        tracker.close("FAILED")
        assert tracker.run_id is None
        assert not out.exists()
    assert not (tmp_path / "store").exists()  # no store was ever opened


def test_resume_reattaches_without_param_conflict(tmp_path, sqlite_uri, monkeypatch):
    cfg = TrackingConfig(tracking_uri=sqlite_uri, experiment="resume", system_metrics=False)
    first = Tracker(cfg, is_main_process=True, output_dir=tmp_path)
    run_id = first.start({"optim": {"lr": 1e-3}, "steps": 10})
    for step in range(5):
        first.log_metrics({"loss": 10.0 - step}, step)
    first.close("KILLED")  # preempted

    # Resumed with a changed config: the run keeps its params, the steps continue.
    second = Tracker(cfg, is_main_process=True, output_dir=tmp_path)
    assert second.start({"optim": {"lr": 5e-4}, "steps": 20}, run_id=run_id) == run_id
    client = _client(sqlite_uri)
    assert client.get_run(run_id).info.status == "RUNNING"
    for step in range(5, 10):
        second.log_metrics({"loss": 10.0 - step}, step)
    second.close()

    # The env var does the same (MLflow's own convention).
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    third = Tracker(cfg, is_main_process=True, output_dir=tmp_path)
    assert third.start({"anything": "else"}) == run_id
    third.log_metrics({"loss": 0.0}, 10)
    third.close()

    run = client.get_run(run_id)
    assert run.data.params == {"optim.lr": "0.001", "steps": "10"}
    assert _steps(client, run_id, "loss")[0] == list(range(11))
    assert run.info.status == "FINISHED"
    exp_runs = client.search_runs([run.info.experiment_id])
    assert [r.info.run_id for r in exp_runs] == [run_id]


def test_resume_of_unknown_run_starts_a_new_one(tmp_path, sqlite_uri):
    cfg = TrackingConfig(tracking_uri=sqlite_uri, experiment="resume_unknown", system_metrics=False)
    tracker = Tracker(cfg, is_main_process=True, output_dir=tmp_path)
    run_id = tracker.start({"a": 1}, run_id="0" * 32)
    tracker.close()
    assert run_id and run_id != "0" * 32
    run = _client(sqlite_uri).get_run(run_id)
    assert run.data.params == {"a": "1"}
    assert run.data.tags["resumed_from_run_id"] == "0" * 32


def _race_worker(uri, names, tracker_names, out_dir, barrier, queue):
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    result = {"raw": {}, "tracker": {}}
    for name in names:
        barrier.wait(timeout=60)
        result["raw"][name] = find_or_create_experiment(client, name)
    for name in tracker_names:
        barrier.wait(timeout=60)
        t = Tracker(TrackingConfig(tracking_uri=uri, experiment=name, system_metrics=False),
                    is_main_process=True, output_dir=out_dir)
        result["tracker"][name] = t.start({"p": 1})
        t.close()
    queue.put(result)


def test_experiment_get_or_create_race_two_processes(tmp_path):
    from mlflow import MlflowClient

    uri = "sqlite:///" + str(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    client.search_experiments(max_results=1)  # tables exist before the race
    names = [f"raw_{i}" for i in range(4)]
    tracker_names = [f"tracked_{i}" for i in range(2)]
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race_worker,
                         args=(uri, names, tracker_names, str(tmp_path / f"out{i}"), barrier, queue))
             for i in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for name in names:
        (id_a, how_a), (id_b, how_b) = (r["raw"][name] for r in results)
        assert id_a == id_b == client.get_experiment_by_name(name).experiment_id
        assert sorted([how_a, how_b]) in (["created", "existing"], ["created", "lost_race"])
    for name in tracker_names:
        exp_id = client.get_experiment_by_name(name).experiment_id
        run_ids = {r["tracker"][name] for r in results}
        assert len(run_ids) == 2
        assert {r.info.run_id for r in client.search_runs([exp_id])} == run_ids
    assert client.search_runs(["0"]) == []  # nothing fell into the Default experiment


def test_unreachable_at_start_buffers_then_imports(tmp_path, sqlite_uri, caplog):
    """No server at all: start returns fast, everything goes to the offline file, nothing is lost."""
    caplog.set_level(logging.INFO, logger="calm_dist.tracking.tracker")
    port = free_port()
    cfg = TrackingConfig(tracking_uri=f"http://127.0.0.1:{port}", experiment="offline_start",
                         retry_interval_s=0.2)
    out = tmp_path / "out"
    tracker = Tracker(cfg, is_main_process=True, output_dir=out)
    t0 = time.monotonic()
    assert tracker.start(PARAMS, tags={"t": "1"}) is None
    (tmp_path / "a.txt").write_text("a")
    for step in range(50):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "acc": step / 50}, step)
        if step == 25:
            tracker.log_artifact(tmp_path / "a.txt")
            tracker.log_dict({"k": [1, 2]}, "cfg.json")
            tracker.set_tags({"mid": "run"})
    assert time.monotonic() - t0 < 10, "an unreachable server must not block training"
    assert tracker.offline
    path = tracker.offline_file
    # Everything so far is already on disk (a crash now would lose nothing).
    header, records = read_offline_file(path)
    assert header["tracking_uri"] == cfg.tracking_uri and header["run_id"] is None
    assert sum(r["type"] == "metrics" for r in records) == 50
    time.sleep(0.5)  # the probe keeps failing: no more warnings
    tracker.log_metrics({"loss": 0.0}, 50)
    tracker.close()
    assert len(_unreachable_warnings(caplog)) == 1
    assert any("import-offline" in r.getMessage() for r in caplog.records)
    assert path.exists()
    _, records = read_offline_file(path)
    assert records[0]["type"] == "create"
    assert records[-1]["type"] == "end" and records[-1]["status"] == "FINISHED"

    # Later (here: into a sqlite store), with the CLI.
    assert tracking_main(["import-offline", str(path), "--tracking-uri", sqlite_uri]) == 0
    assert not path.exists() and path.with_name(path.name + ".imported").exists()
    client = _client(sqlite_uri)
    exp = client.get_experiment_by_name("offline_start")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params == FLAT
    assert run.data.tags["t"] == "1" and run.data.tags["mid"] == "run"
    assert _steps(client, run.info.run_id, "loss")[0] == list(range(51))
    assert _steps(client, run.info.run_id, "acc")[0] == list(range(50))
    assert {f.path for f in client.list_artifacts(run.info.run_id)} == {"a.txt", "cfg.json"}
    assert run.info.status == "FINISHED"


def test_import_offline_is_resumable(tmp_path, sqlite_uri):
    """An import that stops half-way keeps only what is unsent; running it again completes it."""
    port = free_port()
    out = tmp_path / "out"
    cfg = TrackingConfig(tracking_uri=f"http://127.0.0.1:{port}", experiment="import_resume",
                         retry_interval_s=60)
    tracker = Tracker(cfg, is_main_process=True, output_dir=out)
    tracker.start({"a": 1})
    for step in range(5):
        tracker.log_metrics({"loss": float(step)}, step)
    tracker.log_artifact(tmp_path / "missing.bin")  # an artifact that is gone by import time
    tracker.log_metrics({"loss": 5.0}, 5)
    tracker.close()
    path = tracker.offline_file  # what close() could not send
    with pytest.raises(RuntimeError, match="no longer exists"):
        import_offline(path, tracking_uri=sqlite_uri)
    header, records = read_offline_file(path)
    assert header["run_id"] and records[0]["type"] == "artifact"  # the run exists; metrics 0-4 sent
    records = records[1:]  # drop the broken record, as a user would
    path.write_text("\n".join(json.dumps(r) for r in [header, *records]) + "\n")
    run_id = import_offline(path, tracking_uri=sqlite_uri)
    assert run_id == header["run_id"]
    client = _client(sqlite_uri)
    assert _steps(client, run_id, "loss")[0] == list(range(6))
    assert client.get_run(run_id).info.status == "FINISHED"


def test_probe_refuses_what_can_never_log_and_only_warns_when_unreachable(tmp_path, sqlite_uri, capsys):
    """Validation's look at the store: a deleted experiment, a store kind MLflow refuses and a URI scheme it
    has no store for are ConfigErrors (one line); a port nobody listens on is one warning line, no error."""
    client = _client(sqlite_uri)
    gone = client.create_experiment("probe_deleted")
    client.delete_experiment(gone)
    with pytest.raises(ConfigError) as e:
        probe_tracking_store(TrackingConfig(tracking_uri=sqlite_uri, experiment="probe_deleted"), tmp_path)
    assert str(e.value) == (
        f"tracking.experiment: the MLflow experiment 'probe_deleted' (id {gone}) at {sqlite_uri} is deleted; "
        f"restore it with `MLFLOW_TRACKING_URI={sqlite_uri} mlflow experiments restore --experiment-id {gone}`, "
        "or choose another tracking.experiment")
    (tmp_path / "mlruns").mkdir()  # MLflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE is set
    for uri, refusal in ((str(tmp_path / "mlruns"), "The filesystem tracking backend"),
                         ("htp://127.0.0.1:5000", "unsupported URI 'htp://127.0.0.1:5000'")):
        with pytest.raises(ConfigError) as e:
            probe_tracking_store(TrackingConfig(tracking_uri=uri), tmp_path)
        assert str(e.value).startswith(f"tracking.tracking_uri: the MLflow tracking store {uri} refuses the run: ")
        assert refusal in str(e.value) and "\n" not in str(e.value)
    capsys.readouterr()

    port = free_port()
    probe_tracking_store(TrackingConfig(tracking_uri=f"http://127.0.0.1:{port}"), tmp_path / "out")
    assert capsys.readouterr().err.splitlines() == [
        f"calm_dist: warning: the MLflow tracking store http://127.0.0.1:{port} does not answer ([Errno 111] "
        f"Connection refused); training goes on, buffering its records in {tmp_path / 'out' / OFFLINE_DIRNAME} "
        "until the store answers"]
    probe_tracking_store(TrackingConfig(), tmp_path / "fresh")  # the default sqlite store is not created here
    probe_tracking_store(TrackingConfig(enabled=False, tracking_uri="htp://x"), tmp_path)
    assert not (tmp_path / "fresh").exists() and not (tmp_path / "out").exists()
    assert capsys.readouterr().err == ""


def test_resumed_trackers_continue_the_run_an_offline_start_buffered(tmp_path, sqlite_uri):
    """A job starts with its store unreachable and stops (its checkpoint can name no run); the job resumed
    later sends those records and continues the run they create; one resumed again, from the same
    run-less checkpoint after a crash, finds that run in <output_dir>/mlflow_run.json. One run, each step once."""
    out = tmp_path / "out"
    first = Tracker(TrackingConfig(tracking_uri=f"http://127.0.0.1:{free_port()}", experiment="offline_resume",
                                   retry_interval_s=60, system_metrics=False), is_main_process=True, output_dir=out)
    assert first.start(PARAMS) is None
    for step in range(1, 4):
        first.log_metrics({"loss": 1.0 / step}, step)
    first.close("KILLED")
    assert first.run_id is None and len(list((out / OFFLINE_DIRNAME).glob("*.jsonl"))) == 1

    reachable = TrackingConfig(tracking_uri=sqlite_uri, experiment="offline_resume", system_metrics=False)
    second = Tracker(reachable, is_main_process=True, output_dir=out)
    run_id = second.start({"other": "params"}, resuming=True)
    assert run_id is not None and not list((out / OFFLINE_DIRNAME).glob("*.jsonl"))
    assert json.loads((out / RUN_NOTE).read_text())["run_id"] == run_id
    for step in range(4, 6):
        second.log_metrics({"loss": 1.0 / step}, step)
    # a crash: no close, and the checkpoint it resumes from still names no run

    third = Tracker(reachable, is_main_process=True, output_dir=out)
    assert third.start({"other": "params"}, resuming=True) == run_id
    for step in range(4, 8):
        third.log_metrics({"loss": 1.0 / step}, step)
    third.close()

    client = _client(sqlite_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("offline_resume").experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.params == FLAT  # the first job's, logged once
    history = client.get_metric_history(run_id, "loss")
    # the buffered steps once each; 4 and 5 twice, as any steps run again after a crash past the last checkpoint
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 4, 5, 5, 6, 7]
    assert all(m.value == 1.0 / m.step for m in history)


def test_system_metrics_are_logged(tmp_path, sqlite_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    tracker = Tracker(TrackingConfig(tracking_uri=sqlite_uri, experiment="sysmetrics"),
                      is_main_process=True, output_dir=tmp_path)
    run_id = tracker.start({})
    deadline = time.monotonic() + 20
    client = _client(sqlite_uri)
    while time.monotonic() < deadline:
        tracker.log_metrics({"loss": 1.0}, 0)
        if any(k.startswith("system/") for k in client.get_run(run_id).data.metrics):
            break
        time.sleep(0.2)
    tracker.close()
    keys = client.get_run(run_id).data.metrics
    assert any(k.startswith("system/cpu") for k in keys), keys


# ----------------------------------------------------------------------------------------------------
# a real server (slow)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    yield from serve(tmp_path_factory.mktemp("mlflow_server"))


@pytest.mark.slow
def test_logging_over_http(mlflow_server, tmp_path):
    cfg = TrackingConfig(tracking_uri=mlflow_server.uri, experiment="http", run_name="over-http",
                         system_metrics=False)
    tracker = Tracker(cfg, is_main_process=True, output_dir=tmp_path)
    run_id = tracker.start(PARAMS)
    for step in range(20):
        tracker.log_metrics({"train/loss": 2.0 - step / 10, "eval/loss": 2.5 - step / 10}, step)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "w.bin").write_bytes(os.urandom(4096))
    tracker.log_artifact(tmp_path / "ckpt", artifact_path="checkpoint")
    tracker.log_dict({"cfg": 1}, "config.yaml")
    tracker.close()
    client = _client(mlflow_server.uri)
    run = client.get_run(run_id)
    assert run.data.params == FLAT and run.info.status == "FINISHED"
    assert _steps(client, run_id, "eval/loss")[0] == list(range(20))
    assert {f.path for f in client.list_artifacts(run_id)} == {"checkpoint", "config.yaml"}
    # proxied artifacts: the bytes are in the server's store directory
    stored = list((mlflow_server.dir / "artifacts").rglob("w.bin"))
    assert len(stored) == 1 and stored[0].read_bytes() == (tmp_path / "ckpt" / "w.bin").read_bytes()
    assert not (tmp_path / OFFLINE_DIRNAME).exists()


@pytest.mark.slow
def test_server_killed_mid_run_then_restarted_loses_nothing(mlflow_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="calm_dist.tracking.tracker")
    cfg = TrackingConfig(tracking_uri=mlflow_server.uri, experiment="outage", retry_interval_s=0.5,
                         system_metrics=False)
    tracker = Tracker(cfg, is_main_process=True, output_dir=tmp_path)
    run_id = tracker.start({"lr": 0.1})
    step = 0
    for _ in range(10):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "grad_norm": float(step)}, step)
        step += 1
    assert not tracker.offline

    mlflow_server.kill()  # a crash between two log calls
    t0 = time.monotonic()
    for _ in range(40):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "grad_norm": float(step)}, step)
        step += 1
    tracker.set_tags({"during": "outage"})
    assert time.monotonic() - t0 < 10, "logging blocked while the server was down"
    assert tracker.offline and tracker.offline_file.exists()
    buffered = read_offline_file(tracker.offline_file)[1]
    assert sum(r["type"] == "metrics" for r in buffered) == 40

    mlflow_server.up()  # same port, same store
    deadline = time.monotonic() + 60
    while tracker.offline and time.monotonic() < deadline:
        tracker.log_metrics({"loss": 1.0 / (step + 1), "grad_norm": float(step)}, step)
        step += 1
        time.sleep(0.1)
    assert not tracker.offline, "the backlog was not flushed after the server came back"
    for _ in range(5):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "grad_norm": float(step)}, step)
        step += 1
    tracker.close()

    assert len(_unreachable_warnings(caplog)) == 1
    assert not list((tmp_path / OFFLINE_DIRNAME).glob("*.jsonl"))
    client = _client(mlflow_server.uri)
    for key in ("loss", "grad_norm"):
        hist = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in hist) == list(range(step)), key  # each step exactly once
    assert {m.step: m.value for m in client.get_metric_history(run_id, "grad_norm")} == \
        {s: float(s) for s in range(step)}
    run = client.get_run(run_id)
    assert run.data.tags["during"] == "outage" and run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1"}


# ----------------------------------------------------------------------------------------------------
# training jobs (slow): calm_dist/train.py against a real server
