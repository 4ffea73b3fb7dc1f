"""calm_dist.tracking.compare / tools/compare_runs.py over real MLflow runs (sqlite fast, server slow)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from calm_dist.config import TrackingConfig
from calm_dist.tracking.compare import build_filter, main as compare_main
from calm_dist.tracking.tracker import Tracker
from tests.helpers.mlflow_server import serve

REPO = Path(__file__).resolve().parents[2]
# name -> (lr, keys); model and steps are the same for every run
RUNS = {"base": (1e-3, 400), "fast": (3e-3, 400), "big": (1e-3, 800)}
FINAL_EVAL = {"base": 2.0, "fast": 1.5, "big": 3.0}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TAGS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("COLUMNS", "400")  # a wide terminal: one row per run (the layout tests set their own)


def make_runs(uri: str, experiment: str, out: Path) -> dict[str, str]:
    """Three tagged sweep runs plus one untagged run with another model; returns name -> run id."""
    ids = {}
    specs = [(name, lr, keys, {"sweep": "lr"}) for name, (lr, keys) in RUNS.items()]
    specs.append(("other", 1e-3, 400, {}))
    for name, lr, keys, tags in specs:
        cfg = TrackingConfig(tracking_uri=uri, experiment=experiment, run_name=name, tags=tags,
                             system_metrics=False)
        tracker = Tracker(cfg, is_main_process=True, output_dir=out / name)
        model = "tiny-llama" if name != "other" else "tiny-gpt"
        ids[name] = tracker.start({"model": {"name": model}, "optim": {"lr": lr},
                                   "data": {"keys": keys}, "steps": 10})
        final = FINAL_EVAL.get(name, 9.0)
        for step in range(1, 11):
            tracker.log_metrics({"train/loss": final + 1.0 / step, "train/lr": lr}, step)
            if step % 5 == 0:
                tracker.log_metrics({"eval/loss": final + (10 - step) / 10, "eval/accuracy": step / 20}, step)
        tracker.close()
    return ids


@pytest.fixture(scope="module")
def sqlite_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare_store")
    uri = "sqlite:///" + str(d / "mlflow.db")
    return uri, d / "mlflow.db", make_runs(uri, "cmp", d)


def _table(stdout: str) -> tuple[list[str], dict[str, str]]:
    """(header line words, run label -> its table line) of the printed table."""
    lines = stdout.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith("run "))
    header = lines[i].split()
    rows = {}
    for line in lines[i + 2:]:
        if not line.strip() or line.startswith("wrote "):
            break
        rows[line.split()[0]] = line
    return header, rows


def _check_outputs(out: Path, stdout: str, ids: dict[str, str]) -> None:
    header, rows = _table(stdout)
    # only the params that differ among base / fast / big: lr and keys
    assert "params that differ: 2 (2 identical, not shown)" in stdout
    assert header[:3] == ["run", "data.keys", "optim.lr"]
    assert "model.name" not in header and "steps" not in header
    assert {"eval/loss", "train/loss", "eval/accuracy", "eval/loss/base", "train/loss/base"} <= set(header)
    assert set(rows) == {"base", "fast", "big"}
    assert "(base)" in rows["base"]
    with open(out / "compare.csv", newline="") as fh:
        table = {row["run_name"]: row for row in csv.DictReader(fh)}
    assert set(table) == {"base", "fast", "big"}
    assert table["fast"]["run_id"] == ids["fast"]
    assert table["big"]["params.data.keys"] == "800" and table["fast"]["params.optim.lr"] == "0.003"
    for name in table:
        assert float(table[name]["metrics.eval/loss"]) == pytest.approx(FINAL_EVAL[name])
        assert float(table[name]["ratio.eval/loss"]) == pytest.approx(FINAL_EVAL[name] / FINAL_EVAL["base"])
    assert "params.model.name" not in table["base"]
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # the training curves, train/loss and eval/loss, x 3 runs
    assert "(6 curves: train/loss, eval/loss)" in stdout


def test_compare_by_tag_with_baseline(sqlite_runs, tmp_path, capsys):
    uri, _, ids = sqlite_runs
    rc = compare_main(["--tracking-uri", uri, "--experiment", "cmp", "--tag", "sweep=lr",
                       "--baseline", "base", "--params", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    _check_outputs(tmp_path, out, ids)


def test_compare_selection_modes(sqlite_runs, tmp_path, capsys):
    uri, db, ids = sqlite_runs
    # a .db path works as the URI; an MLflow filter string; no plot
    assert compare_main(["--tracking-uri", str(db), "-e", "cmp", "--no-plot", "-o", str(tmp_path),
                         "--filter", "params.`optim.lr` = '0.001' and params.`data.keys` = '400'"]) == 0
    _, rows = _table(capsys.readouterr().out)
    assert set(rows) == {"base", "other"}
    assert not (tmp_path / "compare.png").exists()
    # explicit ids (no experiment needed), baseline by id prefix, all params, transposed
    assert compare_main(["--tracking-uri", uri, ids["big"], ids["other"], "--baseline", ids["big"][:10],
                         "--all-params", "--transpose", "--no-plot", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "params: 4" in out and "baseline: big" in out
    assert any(line.startswith("model.name") and "tiny-gpt" in line for line in out.splitlines())
    # the whole experiment: the untagged run's model makes model.name differ too
    assert compare_main(["--tracking-uri", uri, "-e", "cmp", "--params", "--no-plot", "-o", str(tmp_path)]) == 0
    header, rows = _table(capsys.readouterr().out)
    assert len(rows) == 4 and "model.name" in header
    # errors
    assert compare_main(["--tracking-uri", uri, "-e", "nope", "-o", str(tmp_path)]) == 2
    assert compare_main(["--tracking-uri", uri, "-e", "cmp", "-t", "sweep=none", "-o", str(tmp_path)]) == 1
    assert compare_main(["--tracking-uri", uri, "-e", "cmp", "-b", "missing", "-o", str(tmp_path)]) == 2
    assert compare_main(["-e", "cmp"]) == 2  # no store given
    capsys.readouterr()


def test_build_filter():
    assert build_filter(None, ["a=1", "b = it's"]) == "tags.`a` = '1' and tags.`b` = \"it's\""
    assert build_filter("metrics.x < 2 or metrics.x > 5", ["a=1"]) == \
        "(metrics.x < 2 or metrics.x > 5) and tags.`a` = '1'"


@pytest.mark.slow  # a fresh interpreter: ~15 s of imports on a busy machine
def test_tools_compare_runs_cli(sqlite_runs, tmp_path):
    """The thin wrapper runs from a fresh interpreter without installing the package."""
    uri, _, ids = sqlite_runs
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, str(REPO / "tools" / "compare_runs.py"), "--tracking-uri", uri,
                        "-e", "cmp", "-t", "sweep=lr", "-b", "base", "--params", "-o", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    _check_outputs(tmp_path, r.stdout, ids)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    yield from serve(tmp_path_factory.mktemp("mlflow_server_compare"))


@pytest.mark.slow
def test_compare_three_runs_on_a_server(mlflow_server, tmp_path, capsys):
    ids = make_runs(mlflow_server.uri, "cmp_server", tmp_path / "runs")
    rc = compare_main(["--tracking-uri", mlflow_server.uri, "--experiment", "cmp_server",
                       "--tag", "sweep=lr", "--baseline", "base", "--params", "--out-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0, out
    _check_outputs(tmp_path / "out", out, ids)


def demo_like_experiment(uri: str, experiment: str, out: Path) -> dict[str, str]:
    """What `make demo` leaves in its experiment: three training runs (long configs whose output paths differ, per-
    step metrics of every kind), the scores `calm-dist eval` logs into them and into child runs for the base
    models, and an unnamed run of the kind `calm-dist eval` used to make (every model's scores in one run)."""
    from mlflow import MlflowClient

    from calm_dist.tracking.eval_runs import EvalColumn, log_evaluation

    ids, sets = {}, ("kv_arithmetic_heldout", "kv_substitution_heldout", "numeric_arithmetic")
    for k, name in enumerate(("composition", "lora", "random_augmenting")):
        tracker = Tracker(TrackingConfig(tracking_uri=uri, experiment=experiment, run_name=name, system_metrics=False),
                          is_main_process=True, output_dir=out / name)
        config = {"model": {"method": "lora" if name == "lora" else "calm"},
                  "train": {"output_dir": f"/home/someone/calm/artifacts/kv_demo/runs/20261130-065300/{name}"},
                  **{f"section{i}": {"value": i} for i in range(60)}}
        ids[name] = tracker.start(config)
        for step in range(1, 21):
            tracker.log_metrics({"train/loss": 3.0 / step + k, "train/lr": 1e-3, "train/grad_norm": 0.5,
                                 "train/tokens_per_s": 1e4, "mem/peak_host_gib": 1.5}, step)
            if step % 5 == 0:
                tracker.log_metrics({"eval/loss": 2.0 / step + k}, step)
        tracker.close()
    scores = {name: {f"task/{s}/{m}": 0.1 * k + 0.01 * j for j, s in enumerate(sets) for m in ("exact_match", "loss")}
              for k, name in enumerate(("composition", "lora", "random_augmenting", "anchor", "augmenting"))}
    log_evaluation(uri, experiment, [EvalColumn(name, metrics, {"scores": metrics}, ids.get(name), 20)
                                     for name, metrics in scores.items()])
    client = MlflowClient(uri)
    old = client.create_run(client.get_experiment_by_name(experiment).experiment_id)
    for name, metrics in scores.items():
        for key, value in metrics.items():
            client.log_metric(old.info.run_id, key.replace("task/", f"eval/{name}/"), value, step=20)
    client.set_terminated(old.info.run_id)
    return ids


def test_compare_by_default_shows_the_training_runs_results_in_a_terminal_and_their_loss_curves(tmp_path, capsys,
                                                                                               monkeypatch):
    """On the demo's experiment the default is what comparing CALM, LoRA and an ablation needs: a table that fits an
    80-column terminal; the training runs and the base models' eval runs, not the unnamed eval run; their final
    train/loss, eval/loss and exact match per task set, no per-step bookkeeping (lr, throughput, memory), no params
    (the CSV has them all); one PNG with the train/loss and eval/loss curves of the three training runs."""
    monkeypatch.setenv("COLUMNS", "80")
    uri = "sqlite:///" + str(tmp_path / "mlflow.db")
    ids = demo_like_experiment(uri, "kv_demo", tmp_path / "runs")
    assert compare_main(["--tracking-uri", uri, "-e", "kv_demo", "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines()[1:] if not line.startswith("wrote ")]  # not the paths' lines
    assert max(map(len, table)) <= 80, out
    assert "5 runs" in out and "params that differ: 2 (60 identical, not shown, --params shows them)" in out
    cells = out.split()
    for label in ("composition", "lora", "random_augmenting", "eval anchor", "eval augmenting"):
        assert label in out, label
    for metric in ("train/loss", "eval/loss", "task/kv_arithmetic_heldout/exact_match",
                   "task/numeric_arithmetic/exact_match"):
        assert metric in cells, metric
    assert not any(word.startswith(("train/lr", "mem/", "train/tokens", "eval/anchor", "model.method", "train.output"))
                   or word.endswith("/loss") and word.startswith("task/") for word in cells)  # losses: the CSV's
    assert "(6 curves: train/loss, eval/loss)" in out
    png = (tmp_path / "out" / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "out" / "compare.csv", newline="") as fh:
        table = {row["run_name"]: row for row in csv.DictReader(fh)}
    assert set(table) == {"composition", "lora", "random_augmenting", "eval anchor", "eval augmenting"}
    assert table["composition"]["run_id"] == ids["composition"]
    assert float(table["lora"]["metrics.task/numeric_arithmetic/exact_match"]) == pytest.approx(0.12)
    assert float(table["lora"]["metrics.task/numeric_arithmetic/loss"]) == pytest.approx(0.12)
    assert float(table["lora"]["metrics.train/lr"]) == 1e-3  # the CSV holds every metric
    assert table["lora"]["params.model.method"] == "lora"  # the CSV keeps the params that differ
