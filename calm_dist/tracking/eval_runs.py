"""Where `calm-dist eval` logs: each export's results into the run that trained it, the rest into named child runs.

An export records the MLflow run that trained it (composition.json: training.mlflow.run_id). Its scores are
logged into that run, at its last step, beside the losses they follow from, so `calm-dist compare` shows one
row per trained model with everything about it. Nothing else of that run changes: not its status, times,
params or tags (the Tracker's reattaching would set it RUNNING and rewrite its tags; a finished training run
stays finished).

A column without a run of its own (the anchor and augmenting models, an export saved outside a training job)
goes into a child run named `eval <column>` (MLflow's `mlflow.parentRunId` tag) of the run the caller names
(`--mlflow-run-id`) or else of the first export's run; with no run anywhere, into a top-level run of that name
in the experiment. Every run made here is tagged `calm_dist.role=eval` and carries $MLFLOW_TAGS, as the
Tracker's runs do. Never an unnamed run.

MLflow is imported when logging starts, as everywhere in calm_dist.tracking.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from calm_dist.tracking.hf_env import PARENT_TAG
from calm_dist.tracking.store import (apply_http_defaults, default_artifact_location, get_or_create_experiment,
                                      now_ms, parse_tags)

log = logging.getLogger(__name__)
ROLE_TAG = "calm_dist.role"


@dataclass
class EvalColumn:
    """One model's results: `metrics` {name: value}, `results` (a JSON-able payload, logged as an artifact), and
    the run its export records (None: none)."""

    name: str
    metrics: dict[str, float]
    results: dict = field(default_factory=dict)
    run_id: str | None = None
    step: int = 0


def env_tags() -> dict[str, str]:
    """$MLFLOW_TAGS, which every run a job makes carries (the Tracker's runs too); unreadable: none, with a warning."""
    try:
        return parse_tags(os.environ.get("MLFLOW_TAGS"))
    except ValueError as e:
        log.warning("ignoring env MLFLOW_TAGS: %s", e)
        return {}


def _existing(client, run_id: str | None):
    """The run, or None when the id is None or this store does not hold it (a 404)."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException as e:
        if e.get_http_status_code() != 404:
            raise
        log.warning("MLflow run %s, recorded by the export, is not in this store: its results go to a child run",
                    run_id)
        return None


def _log_into(client, run_id: str, column: EvalColumn) -> None:
    from mlflow.entities import Metric

    now = now_ms()
    metrics = [Metric(k, float(v), now, column.step) for k, v in column.metrics.items()]
    for i in range(0, len(metrics), 1000):  # MLflow's limit per log_batch
        client.log_batch(run_id, metrics=metrics[i:i + 1000], synchronous=True)
    client.log_dict(run_id, column.results, f"task_eval/{column.name}.json")


def log_evaluation(tracking_uri: str, experiment: str, columns: list[EvalColumn],
                   parent_run_id: str | None = None) -> dict[str, str]:
    """Log every column (see the module docstring); returns {column name: the run it went into}."""
    from mlflow import MlflowClient

    apply_http_defaults()
    client = MlflowClient(tracking_uri)
    owned = {c.name: run for c in columns if (run := _existing(client, c.run_id)) is not None}
    parent = _existing(client, parent_run_id) if parent_run_id else next(iter(owned.values()), None)
    if parent_run_id and parent is None:
        raise ValueError(f"--mlflow-run-id {parent_run_id}: no such run in {tracking_uri}")
    logged = {}
    for column in columns:
        run = owned.get(column.name)
        if run is not None:
            _log_into(client, run.info.run_id, column)
            logged[column.name] = run.info.run_id
            continue
        tags = env_tags() | {ROLE_TAG: "eval"} | ({PARENT_TAG: parent.info.run_id} if parent is not None else {})
        experiment_id = parent.info.experiment_id if parent is not None else get_or_create_experiment(
            client, experiment, default_artifact_location(tracking_uri, experiment))
        child = client.create_run(experiment_id, run_name=f"eval {column.name}", tags=tags)
        _log_into(client, child.info.run_id, column)
        client.set_terminated(child.info.run_id, status="FINISHED")
        logged[column.name] = child.info.run_id
    return logged
