"""Compare MLflow runs: final metrics, ratios to a baseline, loss curves, and the params that differ.

    calm-dist compare [RUN_ID ...] [--experiment NAME] [--tag K=V] [--filter "MLflow filter"]
                      [--baseline RUN] [--metrics a,b] [--plot-metrics a,b] [--params] [--out-dir DIR]

Runs are picked by explicit ids, or searched in the experiment(s) (default: env
MLFLOW_EXPERIMENT_NAME, else "calm_dist") with tags and an MLflow filter string ANDed together; a search keeps
the training runs (those with train/loss) and the evaluation runs `calm-dist eval` makes for the base models
(`--all-runs`: every run found).

By default it shows what a comparison of CALM, LoRA and ablations needs: the final train/loss, every eval/*
metric and the exact match of every task set (the scores `calm-dist eval` logs into each training run) and, with
``--baseline``,
``<metric>/base`` ratio columns (value / the baseline's value), in a table that fits the terminal (one row per
run, or one column per run, in blocks, when rows would be wider); and the train/loss and eval/loss curves of
the runs overlaid in one PNG. ``--metrics`` / ``--plot-metrics`` choose others, ``--params`` adds the params
whose values differ (``--all-params`` every param). It writes ``<out-dir>/<name>.csv`` (every metric but system/*,
or those of ``--metrics``; the differing params; full ids, full precision) and ``<out-dir>/<name>.png``.

MLflow has no compare command; this uses ``MlflowClient.search_runs`` and ``get_metric_history``.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from calm_dist.tracking.eval_runs import ROLE_TAG
from calm_dist.tracking.store import DEFAULT_EXPERIMENT, resolve_tracking_uri

# Reading is not training: allow more time than the Tracker does, but never MLflow's 120 s x 7 tries.
_HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}
_MAX_PLOTS = 12
CURVES = ["train/loss", "eval/loss"]  # what the default PNG overlays


class CompareError(Exception):
    """A user-facing error (bad selection, unknown run, ...)."""


# ----------------------------------------------------------------------------------------------------
# selecting runs


def _quote(value: str) -> str:
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise CompareError(f"tag value {value!r} holds both quote characters: use --filter")


def build_filter(filter_string: str | None, tags: list[str] | None) -> str:
    """The MLflow filter string for ``--filter`` AND every ``--tag k=v``."""
    parts = []
    if filter_string and filter_string.strip():
        parts.append(f"({filter_string.strip()})" if " or " in filter_string.lower() else filter_string.strip())
    for tag in tags or []:
        key, sep, value = tag.partition("=")
        if not sep or not key.strip():
            raise CompareError(f"--tag wants K=V, got {tag!r}")
        parts.append(f"tags.`{key.strip()}` = {_quote(value.strip())}")
    return " and ".join(parts)


def select_runs(client, *, run_ids=(), experiments=(), tags=(), filter_string=None,
                max_runs: int = 50) -> list:
    """Runs by explicit id (in the order given), then those the search finds (oldest first)."""
    runs, seen = [], set()
    for run_id in run_ids or ():
        run = client.get_run(run_id)
        if run.info.run_id not in seen:
            runs.append(run)
            seen.add(run.info.run_id)
    searching = bool(experiments or tags or filter_string) or not run_ids
    if searching:
        names = list(experiments or []) or [os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT]
        exp_ids = []
        for name in names:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise CompareError(f"no MLflow experiment named {name!r}")
            exp_ids.append(exp.experiment_id)
        found = client.search_runs(exp_ids, filter_string=build_filter(filter_string, list(tags or [])),
                                   max_results=max_runs, order_by=["attributes.start_time ASC"])
        for run in found:
            if run.info.run_id not in seen:
                runs.append(run)
                seen.add(run.info.run_id)
    return runs


def resolve_baseline(client, runs: list, ref: str):
    """The run ``ref`` names among ``runs`` (id, unique id prefix or unique run name), else fetched
    by id and put first in ``runs``."""
    exact = [r for r in runs if r.info.run_id == ref]
    if exact:
        return exact[0]
    by_name = [r for r in runs if r.info.run_name == ref]
    by_prefix = [r for r in runs if r.info.run_id.startswith(ref)]
    for matches, what in ((by_name, "name"), (by_prefix, "id prefix")):
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise CompareError(f"--baseline {ref!r}: {len(matches)} runs share that {what}; use the run id")
    try:
        run = client.get_run(ref)
    except Exception as e:
        raise CompareError(f"--baseline {ref!r} is neither a chosen run's id, id prefix or name, "
                           f"nor a run id in the store ({e})") from None
    runs.insert(0, run)
    return run


# ----------------------------------------------------------------------------------------------------
# the table


def differing_params(runs: list, all_params: bool = False) -> tuple[list[str], int]:
    """(param keys whose values differ across ``runs``, sorted; how many keys are identical). Runs without params
    (calm-dist eval's runs for the base models) take no part: every key would differ."""
    runs = [r for r in runs if r.data.params] or runs
    keys = sorted({k for r in runs for k in r.data.params})
    differ = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    if all_params:
        return keys, len(keys) - len(differ)
    return differ, len(keys) - len(differ)


def is_compared(run) -> bool:
    """A run the default comparison keeps: a training run, or one calm-dist eval made for a base model."""
    return "train/loss" in run.data.metrics or run.data.tags.get(ROLE_TAG) == "eval"


def metric_keys(runs: list, wanted: list[str] | None = None, everything: bool = False) -> list[str]:
    """`wanted`; else with `everything` every metric but system/*; else the headline results: train/loss, every
    eval/* metric, the task scores' exact match (task/*/exact_match*, their losses left to the CSV), or, where
    the runs have none of those, every metric but system/*."""
    if wanted:
        return wanted
    keys = sorted({k for r in runs for k in r.data.metrics if not k.startswith("system/")})
    results = ([k for k in keys if k == "train/loss"] + [k for k in keys if k.startswith("eval/")]
               + [k for k in keys if k.startswith("task/") and "/exact_match" in k])
    return keys if everything else results or keys


def run_labels(runs: list) -> list[str]:
    names = [r.info.run_name or r.info.run_id[:8] for r in runs]
    return [f"{n} [{r.info.run_id[:8]}]" if names.count(n) > 1 else n for n, r in zip(names, runs)]


def comparison_rows(runs: list, params: list[str], metrics: list[str], baseline=None) -> list[dict]:
    """One dict per run: run_id, run_name, experiment_id, status, start_time, params.*, metrics.*,
    and with a baseline ratio.* (value / baseline value; None where undefined)."""
    base = baseline.data.metrics if baseline is not None else None
    rows = []
    for run in runs:
        row = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "experiment_id": run.info.experiment_id,
            "status": run.info.status,
            "start_time": datetime.fromtimestamp(run.info.start_time / 1000, timezone.utc)
            .strftime("%Y-%m-%d %H:%M:%S") if run.info.start_time else None,
        }
        for k in params:
            row[f"params.{k}"] = run.data.params.get(k)
        for k in metrics:
            row[f"metrics.{k}"] = run.data.metrics.get(k)
        if base is not None:
            for k in metrics:
                v, b = run.data.metrics.get(k), base.get(k)
                ok = v is not None and b is not None and b != 0 and math.isfinite(v) and math.isfinite(b)
                row[f"ratio.{k}"] = v / b if ok else None
        rows.append(row)
    return rows


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(headers: list[str], rows: list[list]) -> str:
    """A plain-text table; numbers right-aligned."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) for i in range(len(headers))]

    def line(vals):
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(vals, widths, numeric)).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _width(table: str) -> int:
    return max(map(len, table.splitlines()))


def render(rows: list[dict], labels: list[str], params: list[str], metrics: list[str],
           baseline_id: str | None, transpose: bool | None = False, width: int | None = None) -> str:
    """One row per run; transposed (one column per run), or with `transpose=None` whichever fits `width`
    (default: the terminal's): one row per run when it fits, else one column per run, the runs in blocks that
    each fit."""
    cols = [("run", None)] + [(k, f"params.{k}") for k in params] + [(k, f"metrics.{k}") for k in metrics]
    if baseline_id is not None:
        cols += [(f"{k}/base", f"ratio.{k}") for k in metrics]
    table = []
    for label, row in zip(labels, rows):
        name = label + (" (base)" if row["run_id"] == baseline_id else "")
        table.append([name] + [row[c] for _, c in cols[1:]])
    headers = [h for h, _ in cols]
    width = width or shutil.get_terminal_size().columns
    by_row = format_table(headers, table)
    if transpose is False or (transpose is None and _width(by_row) <= width):
        return by_row

    def by_column(runs: list[list]) -> str:
        return format_table([""] + [r[0] for r in runs], [[headers[i]] + [r[i] for r in runs]
                                                         for i in range(1, len(headers))])
    if transpose:
        return by_column(table)
    blocks, start = [], 0
    while start < len(table):  # as many runs per block as fit (at least one)
        end = start + 1
        while end < len(table) and _width(by_column(table[start:end + 1])) <= width:
            end += 1
        blocks.append(by_column(table[start:end]))
        start = end
    return "\n\n".join(blocks)


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0]) if rows else ["run_id"]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v)
                        for k, v in row.items()})


# ----------------------------------------------------------------------------------------------------
# the curves


def default_plot_metrics(runs: list) -> list[str]:
    """train/loss and eval/loss, those the runs logged (else their loss metrics, else every metric)."""
    keys = sorted({k for r in runs for k in r.data.metrics if not k.startswith("system/")})
    losses = [k for k in keys if "loss" in k.lower()]
    return [k for k in CURVES if k in keys] or (losses or keys)[:_MAX_PLOTS]


def metric_curve(client, run_id: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of a metric's history; a step logged twice keeps its latest value."""
    by_step = {}
    for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)):
        by_step[m.step] = m.value
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_curves(client, runs: list, labels: list[str], keys: list[str], path: Path) -> int:
    """Overlay every run's history of each metric (one panel per metric); returns the curves drawn."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state (renders with Agg)

    keys = keys[:_MAX_PLOTS]
    ncols = 1 if len(keys) <= 1 else 2
    nrows = max(1, math.ceil(len(keys) / ncols))
    fig = Figure(figsize=(6.4 * ncols, 4.0 * nrows), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    drawn = 0
    for ax, key in zip(axes, keys):
        for run, label in zip(runs, labels):
            steps, values = metric_curve(client, run.info.run_id, key)
            if not steps:
                continue
            ax.plot(steps, values, label=label, marker="." if len(steps) <= 30 else None, linewidth=1.2)
            drawn += 1
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    if not keys:
        fig.text(0.5, 0.5, "no metrics to plot", ha="center")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return drawn


# ----------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="calm-dist compare",
        description="Compare MLflow runs: differing params, final metrics, ratios to a baseline, "
                    "loss/eval curves (PNG) and a CSV.",
        epilog="examples:\n"
               "  calm-dist compare --experiment kv_task\n"
               "  calm-dist compare --tag sweep=lr --baseline lr-1e-3 --metrics train/loss,eval/loss\n"
               "  calm-dist compare --filter \"params.`optim.lr` = '0.001' and attributes.status = 'FINISHED'\"\n"
               "  calm-dist compare 3f2a... 9bc1... --tracking-uri runs/x/mlflow.db",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="explicit run ids")
    p.add_argument("--tracking-uri", help="default: env MLFLOW_TRACKING_URI; a path to a .db file "
                                          "means that sqlite store")
    p.add_argument("-e", "--experiment", action="append", default=[],
                   help="experiment name to search (repeatable; default: env MLFLOW_EXPERIMENT_NAME "
                        f"or {DEFAULT_EXPERIMENT!r})")
    p.add_argument("-t", "--tag", action="append", default=[], metavar="K=V",
                   help="only runs with this tag value (repeatable)")
    p.add_argument("-f", "--filter", help="MLflow search filter string, ANDed with --tag")
    p.add_argument("--max-runs", type=int, default=50, help="at most this many searched runs (default 50)")
    p.add_argument("--all-runs", action="store_true",
                   help="keep every run found (default: training runs and calm-dist eval's base-model runs)")
    p.add_argument("-b", "--baseline", metavar="RUN",
                   help="run id, id prefix or run name: adds <metric>/base ratio columns")
    p.add_argument("-m", "--metrics", help="comma-separated metrics for the table and CSV (default: train/loss, "
                                           "eval/*, task/*/exact_match*; the CSV: all but system/*)")
    p.add_argument("--plot-metrics", help="comma-separated metrics to plot (default: train/loss, eval/loss)")
    p.add_argument("--params", action="store_true", help="show the params whose values differ")
    p.add_argument("--all-params", action="store_true", help="show every param")
    layout = p.add_mutually_exclusive_group()
    layout.add_argument("--transpose", action="store_true", help="print one column per run")
    layout.add_argument("--wide", action="store_true", help="print one row per run, however wide")
    p.add_argument("-o", "--out-dir", default="runs/compare", help="where the CSV and PNG go (default runs/compare)")
    p.add_argument("--name", default="compare", help="file stem: <out-dir>/<name>.csv and .png")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return p


def _split(text: str | None) -> list[str] | None:
    if not text:
        return None
    return [k.strip() for k in text.split(",") if k.strip()]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for key, value in _HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        uri = resolve_tracking_uri(args.tracking_uri)
    except ValueError:
        print("calm-dist compare: no tracking store: pass --tracking-uri (a URI or a .db file) "
              "or set MLFLOW_TRACKING_URI", file=sys.stderr)
        return 2
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        print(f"calm-dist compare: no such sqlite store: {uri}", file=sys.stderr)
        return 2

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    try:
        runs = select_runs(client, run_ids=args.run_ids, experiments=args.experiment, tags=args.tag,
                           filter_string=args.filter, max_runs=args.max_runs)
        baseline = resolve_baseline(client, runs, args.baseline) if args.baseline else None
    except (CompareError, MlflowException) as e:
        print(f"calm-dist compare: {e}", file=sys.stderr)
        return 2
    if not (args.all_runs or args.run_ids):
        runs = [r for r in runs if is_compared(r) or r is baseline]
    if not runs:
        print("calm-dist compare: no runs matched", file=sys.stderr)
        return 1

    params, n_same = differing_params(runs, args.all_params)
    shown = params if args.params or args.all_params else []
    metrics = metric_keys(runs, _split(args.metrics))
    rows = comparison_rows(runs, params, metric_keys(runs, _split(args.metrics), everything=True), baseline)  # CSV
    labels = run_labels(runs)
    exps = sorted({r.info.experiment_id for r in runs})
    what = "params" if args.all_params else "params that differ"
    hidden = "" if shown or not params else ", --params shows them"
    print(f"{len(runs)} runs (experiment id {', '.join(exps)}; {uri}); {what}: {len(params)}"
          + ("" if args.all_params else f" ({n_same} identical, not shown{hidden})")
          + (f"; baseline: {labels[runs.index(baseline)]}" if baseline is not None else ""))
    layout = True if args.transpose else False if args.wide else None
    print(render(comparison_rows(runs, shown, metrics, baseline), labels, shown, metrics,
                 baseline.info.run_id if baseline else None, layout))

    out = Path(args.out_dir)
    csv_path = out / f"{args.name}.csv"
    write_csv(csv_path, rows)
    print(f"wrote {csv_path}")
    if not args.no_plot:
        png = out / f"{args.name}.png"
        keys = _split(args.plot_metrics) or default_plot_metrics(runs)
        n = plot_curves(client, runs, labels, keys, png)
        print(f"wrote {png} ({n} curves: {', '.join(keys) or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
