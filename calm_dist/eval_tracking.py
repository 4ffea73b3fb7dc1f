"""`calm-dist eval`'s results in MLflow: each export's scores go into the run that trained it (composition.json
records it), the base models' into named child runs (calm_dist.tracking.eval_runs says where and why).

Metrics: `task/<set>/exact_match` and `task/<set>/loss`; the prefix-encoder ablation of an export
(`--prefix-only`) is logged into that export's run as `task/<set>/exact_match_prefix_only` and
`task/<set>/loss_prefix_only`. The store: tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else the one the
first export records, else sqlite:///<train.output_dir>/mlflow.db; the experiment likewise.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from calm_dist.config import Config
from calm_dist.model.composition import export_config
from calm_dist.tracking.eval_runs import EvalColumn, log_evaluation
from calm_dist.tracking.store import DEFAULT_EXPERIMENT, resolve_tracking_uri

PREFIX_ONLY = "_prefix_only"  # task_eval's column suffix for the prefix-encoder ablation


def recorded_run(directory: str | Path) -> dict:
    """The training record of an export's composition.json ({} when it has none): steps, mlflow {run_id, ...}."""
    return export_config(directory).get("training") or {}


def eval_columns(results: dict[str, dict[str, dict]], compositions: dict[str, str]) -> list[EvalColumn]:
    """One EvalColumn per model of `results` (task_eval.to_json's shape: {column: {set: {exact_match, loss, ...}}}),
    the ablation columns folded into their export's."""
    columns: dict[str, EvalColumn] = {}
    for name, per_set in results.items():
        owner = name[:-len(PREFIX_ONLY)] if name.endswith(PREFIX_ONLY) and name[:-len(PREFIX_ONLY)] in compositions \
            else name
        suffix = PREFIX_ONLY if owner != name else ""
        if owner not in columns:
            training = recorded_run(compositions[owner]) if owner in compositions else {}
            columns[owner] = EvalColumn(owner, {}, {}, (training.get("mlflow") or {}).get("run_id"),
                                        int(training.get("steps") or 0))
        column = columns[owner]
        column.results[name] = per_set
        for set_name, r in per_set.items():
            column.metrics |= {f"task/{set_name}/exact_match{suffix}": r["exact_match"],
                               f"task/{set_name}/loss{suffix}": r["loss"]}
    return list(columns.values())


def log_results(cfg: Config, results: dict[str, dict[str, dict]], compositions: dict[str, str],
                parent_run_id: str | None) -> None:
    """Log, and say in one line where each column went; a store that fails is one warning (the table is printed
    and the JSON written already)."""
    recorded = next((r["mlflow"] for r in map(recorded_run, compositions.values())
                     if (r.get("mlflow") or {}).get("tracking_uri")), {})
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                               or recorded.get("tracking_uri"), cfg.train.output_dir)
    experiment = (cfg.tracking.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or recorded.get("experiment")
                  or DEFAULT_EXPERIMENT)
    try:
        logged = log_evaluation(uri, experiment, eval_columns(results, compositions), parent_run_id)
    except Exception as e:  # the results stand without MLflow
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        print(f"calm-dist eval: warning: the results were not logged to MLflow at {uri}: {first}", file=sys.stderr)
        return
    # stderr: stdout holds the results tables (the demo keeps them as results.md)
    print(f"MLflow ({uri}): " + ", ".join(f"{name} -> run {run_id}" for name, run_id in logged.items()),
          file=sys.stderr)
