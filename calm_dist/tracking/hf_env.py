"""The MLflow switches of transformers' `MLflowCallback` (transformers/integrations/integration_utils.py), read
the way it reads them, so a job configured for HF Trainer logs the same way here.

- `HF_MLFLOW_LOG_ARTIFACTS`: true: every checkpoint is logged as artifacts when it is saved (the callback's
  `on_save`), under `checkpoints/step_N`. The final export is logged either way: it is what the run produced,
  and it is small (what trains, nothing frozen).
- `MLFLOW_NESTED_RUN`: true: the job's run is a child of "the current run". A process started by a launcher
  has no active fluent run, so the current run is the one `MLFLOW_RUN_ID` names (as for an MLflow Project's
  entry point); the new run carries MLflow's `mlflow.parentRunId` tag and `MLFLOW_RUN_ID` is then not resumed.
  Without `MLFLOW_RUN_ID` the run is a top-level one, as the callback's `start_run(nested=True)` makes without
  an active run.

No mlflow or transformers import: the trainer asks on every checkpoint.
"""
from __future__ import annotations

import os

# transformers.utils.ENV_VARS_TRUE_VALUES, written out: importing transformers for a set of strings costs seconds
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag for nested runs (mlflow.utils.mlflow_tags.MLFLOW_PARENT_RUN_ID)


def is_true(name: str, environ=os.environ) -> bool:
    return environ.get(name, "FALSE").upper() in TRUE_VALUES


def log_checkpoints(environ=os.environ) -> bool:
    """HF_MLFLOW_LOG_ARTIFACTS: log each checkpoint directory as artifacts when it is saved."""
    return is_true("HF_MLFLOW_LOG_ARTIFACTS", environ)


def nested_parent(environ=os.environ) -> str | None:
    """The run a new run nests under: MLFLOW_RUN_ID when MLFLOW_NESTED_RUN is true, else None."""
    if not is_true("MLFLOW_NESTED_RUN", environ):
        return None
    return environ.get("MLFLOW_RUN_ID") or None
