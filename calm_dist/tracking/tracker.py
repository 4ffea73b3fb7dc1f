"""MLflow tracking for calm_dist: one run per training job, logged from global rank 0 only.

The trainer builds one :class:`Tracker` per process and calls the same methods on every rank; the
methods do nothing unless ``is_main_process`` is true and tracking is enabled::

    tracker = Tracker(cfg.tracking, is_main_process=rank == 0, output_dir=out)
    run_id = tracker.start(config_dict, run_id=resumed_run_id)   # save tracker.run_id in checkpoints
    try:
        ...
        tracker.log_metrics({"train/loss": loss}, step=step)
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close()

The MLflow client is used with explicit run ids (``MlflowClient``), never the fluent global state:
the experiment is got-or-created by name and the run created in it by id, because two processes
calling ``mlflow.set_experiment(new_name)`` at once can put a run into the Default experiment.

Resilience: when the tracking store cannot be reached (at start or mid-run), training goes on. One
warning is logged per outage; every record (metrics, params, tags, artifact paths, log_dict payloads,
the final status) is appended, in order, to ``<output_dir>/mlflow_offline/<run>-<time>-<pid>.jsonl``.
A background thread probes the store at most every ``retry_interval_s`` seconds, so the training loop
never waits on the network; once the probe succeeds, the next call sends the backlog in order (in
batches of up to 1,000 metrics, with their original steps and timestamps) and deletes the file. What is
still unsent at :meth:`Tracker.close` stays in that file. The next Tracker started on the same output
directory (a resumed job) sends it first, through the same sender as ``import-offline``, and a resumed
job continues the run those records create; ``<output_dir>/mlflow_run.json`` notes the run once it exists,
for a job resumed from a checkpoint written before it did. By hand, a warning prints the command::

    python -m calm_dist.tracking.tracker import-offline FILE [--tracking-uri URI]

Re-sending a metric point is harmless (MLflow ignores an identical (key, step, timestamp, value)).
HTTP requests get short defaults (``MLFLOW_HTTP_REQUEST_TIMEOUT=5``, ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``)
unless those environment variables are already set. mlflow itself is imported when a run starts, never at
import (see calm_dist.tracking.store).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from calm_dist.config import TrackingConfig  # the typed config tree owns the section
from calm_dist.files import write_atomic
from calm_dist.tracking.hf_env import PARENT_TAG, nested_parent
from calm_dist.tracking.store import (
    DEFAULT_EXPERIMENT,
    IMPORT_HINT,
    OFFLINE_DIRNAME,
    OFFLINE_FORMAT_VERSION,
    Sender,
    SendError,
    apply_http_defaults,
    default_artifact_location,
    default_tags,
    flatten_params,
    import_offline,
    is_transient,
    now_ms,
    parse_tags,
    read_offline_file,
    resolve_tracking_uri,
    sqlite_path,
    to_float,
    write_offline_file,
)

log = logging.getLogger(__name__)
RUN_NOTE = "mlflow_run.json"  # in the output directory: the run its job logs to

# ----------------------------------------------------------------------------------------------------
# the tracker


def _complete_config(cfg) -> TrackingConfig:
    if cfg is None:
        return TrackingConfig()
    if isinstance(cfg, TrackingConfig):
        return cfg
    if isinstance(cfg, Mapping):
        get = cfg.get
    else:
        def get(name, default):
            return getattr(cfg, name, default)
    defaults = TrackingConfig()
    values = {f.name: get(f.name, getattr(defaults, f.name)) for f in dataclasses.fields(TrackingConfig)}
    values["tags"] = dict(values["tags"] or {})
    return TrackingConfig(**values)


class Tracker:
    """MLflow logging for one training job (see the module docstring). Not thread-safe: call it from
    the training loop's thread. Every method is a no-op unless ``is_main_process`` and
    ``cfg.enabled``."""

    def __init__(self, cfg: TrackingConfig | None, *, is_main_process: bool, output_dir: str | Path,
                 node_id: str | None = None):
        # Any object with TrackingConfig's fields will do; missing ones take TrackingConfig's defaults.
        # node_id: this node's name in the system metrics (system/<node_id>/...), as every node of a job logs them
        self.cfg = _complete_config(cfg)
        self.node_id = node_id
        self.active = bool(self.cfg.enabled and is_main_process)
        self.output_dir = Path(output_dir)
        self.run_id: str | None = None
        self.tracking_uri: str | None = None
        self.experiment: str | None = None
        self._client = None
        self._sender: Sender | None = None
        self._pending: deque = deque()
        self._offline = False
        self._offline_path: Path | None = None
        self._offline_fh = None
        self._server_back = threading.Event()
        self._stop_probe = threading.Event()
        self._probe_thread: threading.Thread | None = None
        self._sysmon = None
        self._sysmon_failed = False
        self._started = False
        self._closed = False
        self._warned_not_started = False
        self._rejected_warned: set[str] = set()
        self._noted: str | None = None  # the run id last written to <output_dir>/mlflow_run.json
        self._adopting = False          # sending the records earlier processes left
        self.outages = 0           # how many times the store became unreachable
        self.records_buffered = 0  # how many records went through the offline file

    # -- public API ----------------------------------------------------------------------------------
    @property
    def offline(self) -> bool:
        """True while records are waiting for the store to come back."""
        return self._offline

    @property
    def offline_file(self) -> Path | None:
        """The JSONL file holding unsent records (None while everything has been sent)."""
        return self._offline_path if self._offline else None

    def start(self, params: Any = None, *, run_id: str | None = None,
              tags: dict | None = None, resuming: bool = False) -> str | None:
        """Create the run (logging ``params`` flattened) or, with ``run_id`` or env MLFLOW_RUN_ID,
        reattach that run without re-logging params. Records that earlier processes left in
        ``<output_dir>/mlflow_offline`` are sent first. ``resuming`` without a run id (a checkpoint written
        before its run could be created) continues the run those records create, else the run that
        ``<output_dir>/mlflow_run.json`` names. Returns the run id; None off the main process, or while a new run
        waits to be created because the store is unreachable (then read ``tracker.run_id`` later)."""
        if not self.active:
            return None
        if self._started:
            raise RuntimeError("Tracker.start() was already called")
        self._started = True
        apply_http_defaults()
        cfg = self.cfg
        self.tracking_uri = resolve_tracking_uri(cfg.tracking_uri, self.output_dir)
        self.experiment = cfg.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        parent = nested_parent()  # MLFLOW_NESTED_RUN: MLFLOW_RUN_ID names the parent, not a run to resume
        resume_id = (run_id or (None if parent else os.environ.get("MLFLOW_RUN_ID"))
                     or (self._noted_run_id() if resuming else None))

        all_tags = default_tags()
        try:
            all_tags.update(parse_tags(os.environ.get("MLFLOW_TAGS")))
        except ValueError as e:
            log.warning("ignoring env MLFLOW_TAGS: %s", e)
        all_tags.update({str(k): str(v) for k, v in (cfg.tags or {}).items()})
        all_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
        if parent and not resume_id:
            all_tags[PARENT_TAG] = parent
        try:
            from mlflow.tracking.context.registry import resolve_tags

            context = resolve_tags()  # mlflow.user, mlflow.source.name/type, ...
            all_tags = {**context, **all_tags}
        except Exception:
            pass

        flat = flatten_params(params) if params is not None else {}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        db = sqlite_path(self.tracking_uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        earlier = self._adopt_leftover_files()

        from mlflow import MlflowClient

        self._client = MlflowClient(self.tracking_uri)
        self._sender = Sender(self._client, resume_id)
        if earlier:  # sent, or written into this process's offline file: either way their files are done with
            self._adopting = True  # no system metrics before this process's own run record
            self._drain(budget_s=None)
            self._adopting = False
            for path in earlier:
                if path != self._offline_path:
                    path.unlink(missing_ok=True)
        create = {
            "experiment": self.experiment,
            "artifact_location": default_artifact_location(self.tracking_uri, self.experiment),
            "run_name": cfg.run_name,
            "tags": all_tags,
            "params": flat,
            "start_time": now_ms(),
        }
        if resume_id or (earlier and resuming):  # without an id: the run the earlier records created
            self.run_id = resume_id or self.run_id
            first = {"type": "attach", "run_id": resume_id, **create}
        else:
            first = {"type": "create", **create}
        self._submit(first, raise_permanent=True)
        return self.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self._ready() or not metrics:
            return
        values = {}
        for key, value in metrics.items():
            try:
                values[str(key)] = to_float(value)
            except (TypeError, ValueError):
                if f"metric:{key}" not in self._rejected_warned:
                    self._rejected_warned.add(f"metric:{key}")
                    log.warning("Tracker: metric %r has no numeric value (%r); not logged", key, value)
        if not values:
            return
        self._submit({"type": "metrics", "step": int(step), "timestamp": now_ms(), "metrics": values})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or a directory (its contents, under ``artifact_path``)."""
        if not self._ready():
            return
        self._submit({"type": "artifact", "path": str(Path(path).resolve()),
                      "artifact_path": artifact_path})

    def log_dict(self, d: dict, artifact_file: str) -> None:
        """Store ``d`` as a JSON/YAML artifact (by ``artifact_file``'s extension)."""
        if not self._ready():
            return
        data = json.loads(json.dumps(d, default=str))  # a snapshot, JSON-able for the offline file
        self._submit({"type": "dict", "artifact_file": artifact_file, "data": data})

    def set_tags(self, tags: dict) -> None:
        if not self._ready() or not tags:
            return
        self._submit({"type": "tags", "tags": {str(k): str(v) for k, v in tags.items()}})

    def flush(self) -> bool:
        """Try to send the backlog now (ignores the retry interval). True when nothing is pending."""
        if not self._ready():
            return True
        if self._pending:
            self._drain(budget_s=None)
        return not self._pending

    def close(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED). Idempotent."""
        if not self.active or not self._started or self._closed:
            return
        self._stop_sysmon()
        self._closed = True  # from here on: no probe thread, no system metrics monitor
        self._submit({"type": "end", "status": status, "end_time": now_ms()}, final=True)
        self._stop_probe_thread()
        if self._pending:
            path = self._offline_path
            if self._offline_fh is not None:
                self._offline_fh.close()
                self._offline_fh = None
            log.warning(
                "MLflow: %d records could not be sent to %s; they are kept in %s. A job resumed in %s "
                "sends them first; or send them with: %s", len(self._pending), self.tracking_uri, path,
                self.output_dir, IMPORT_HINT.format(path=path))

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("FINISHED")
        else:
            self.close("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    # -- internals -----------------------------------------------------------------------------------
    def _ready(self) -> bool:
        if not self.active or self._closed:
            return False
        if not self._started:
            if not self._warned_not_started:
                log.warning("Tracker: logging before start() is ignored")
                self._warned_not_started = True
            return False
        return True

    def _submit(self, rec: dict, *, raise_permanent: bool = False, final: bool = False) -> None:
        self._pending.append(rec)
        if self._offline:
            self._append_offline(rec)
            if final:
                self._drain(budget_s=None)          # one last try, whatever the interval
            elif self._server_back.is_set():
                self._drain(budget_s=self.cfg.flush_budget_s)
        else:
            self._drain(budget_s=None, raise_permanent=raise_permanent)

    def _drain(self, budget_s: float | None, raise_permanent: bool = False) -> None:
        self._server_back.clear()
        deadline = None if budget_s is None else time.monotonic() + budget_s
        coalesce = True
        sent = 0
        while self._pending:
            try:
                sent += self._sender.drain(self._pending, deadline, coalesce)
                break
            except SendError as e:
                if is_transient(e.exc):
                    self._lost_connection(e.exc)
                    return
                if e.n > 1:  # find the bad record among the coalesced ones
                    coalesce = False
                    continue
                if raise_permanent:
                    self._pending.popleft()
                    raise e.exc
                self._reject(self._pending.popleft(), e.exc)
        self.run_id = self._sender.run_id
        self._note_run()
        if self._offline:
            if self._pending:     # out of budget: keep the rest for the next calls
                self._rewrite_offline()
                self._server_back.set()
            else:
                self._back_online(sent)
        if self._sender.run_established and not self._closed:
            self._start_sysmon()

    def _lost_connection(self, exc: BaseException) -> None:
        self.run_id = self._sender.run_id
        self._note_run()
        if not self._offline:
            self._offline = True
            self.outages += 1
            self.records_buffered += len(self._pending)
            self._open_offline()
            log.warning(
                "MLflow tracking store %s is unreachable (%s: %s). Training goes on; metrics are "
                "buffered in %s and sent when the store is back (checked every %g s).",
                self.tracking_uri, type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "",
                self._offline_path, self.cfg.retry_interval_s)
        else:
            self._rewrite_offline()
            log.debug("MLflow store still unreachable: %s", exc)
        if not self._closed:
            self._start_probe_thread()

    def _back_online(self, sent: int) -> None:
        path = self._offline_path
        if self._offline_fh is not None:
            self._offline_fh.close()
            self._offline_fh = None
        if path is not None:
            path.unlink(missing_ok=True)
        self._offline = False
        self._offline_path = None
        self._stop_probe_thread()
        log.info("MLflow tracking store %s is reachable again: sent %d buffered records (run %s)",
                    self.tracking_uri, sent, self.run_id)

    # offline file
    def _offline_header(self) -> dict:
        return {"type": "header", "version": OFFLINE_FORMAT_VERSION, "tracking_uri": self.tracking_uri,
                "experiment": self.experiment, "run_id": self._sender.run_id,
                "output_dir": str(self.output_dir.resolve()), "pid": os.getpid(),
                "host": socket.gethostname(), "created": now_ms()}

    def _open_offline(self) -> None:
        d = self.output_dir / OFFLINE_DIRNAME
        d.mkdir(parents=True, exist_ok=True)
        stem = self._sender.run_id or "pending"
        self._offline_path = d / f"{stem}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.jsonl"
        self._rewrite_offline()

    def _rewrite_offline(self) -> None:
        if self._offline_fh is not None:
            self._offline_fh.close()
            self._offline_fh = None
        write_offline_file(self._offline_path, self._offline_header(), self._pending)
        self._offline_fh = open(self._offline_path, "a", encoding="utf-8")

    def _append_offline(self, rec: dict) -> None:
        self.records_buffered += 1
        self._offline_fh.write(json.dumps(rec) + "\n")
        self._offline_fh.flush()  # survives a crash of this process

    def _reject(self, rec: dict, exc: BaseException) -> None:
        d = self.output_dir / OFFLINE_DIRNAME
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{self.run_id or 'pending'}.rejected.jsonl"
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"error": f"{type(exc).__name__}: {exc}", "record": rec}) + "\n")
        key = f"{rec.get('type')}:{type(exc).__name__}"
        if key not in self._rejected_warned:
            self._rejected_warned.add(key)
            log.warning("MLflow rejected a %s record (%s: %s); it is kept in %s",
                        rec.get("type"), type(exc).__name__, str(exc)[:300], path)

    def _adopt_leftover_files(self) -> list[Path]:
        """Queue the records of the offline files earlier processes left (oldest first), each behind a
        ``run`` record naming the run it was logging to, if it had one: the same records and the same
        sender as ``import-offline``, so this job's records follow its earlier ones into one run. A file
        that cannot be read stays, with a warning."""
        d = self.output_dir / OFFLINE_DIRNAME
        if not d.is_dir():
            return []
        files = []
        for path in d.glob("*.jsonl"):
            if path.name.endswith(".rejected.jsonl"):
                continue
            try:
                header, records = read_offline_file(path)
            except (OSError, ValueError) as e:
                log.warning("MLflow: cannot read the offline file %s (%s); send it by hand: %s", path, e,
                            IMPORT_HINT.format(path=path))
                continue
            files.append((header.get("created", 0), path.name, path, header, records))
        files.sort()
        for *_, header, records in files:
            if header.get("run_id"):
                self._pending.append({"type": "run", "run_id": header["run_id"]})
            self._pending.extend(records)
        paths = [path for _, _, path, _, _ in files]
        if paths:
            log.info("MLflow: sending what earlier processes buffered: %s", ", ".join(map(str, paths)))
        return paths

    # the run this output directory logs to, noted once it exists: a checkpoint written while the store was
    # unreachable holds no run id, and the job resumed from it must still continue that run
    def _note_run(self) -> None:
        if self.run_id is None or self.run_id == self._noted:
            return
        path = self.output_dir / RUN_NOTE
        self._noted = self.run_id  # tried once per run: a full disk must not stop training
        try:
            write_atomic(path, json.dumps({"run_id": self.run_id, "tracking_uri": self.tracking_uri,
                                           "experiment": self.experiment}) + "\n",
                         fsync=False, aside=path.name + ".tmp")
        except OSError as e:
            log.warning("MLflow: cannot note run %s in %s (%s)", self.run_id, path, e)

    def _noted_run_id(self) -> str | None:
        try:
            return json.loads((self.output_dir / RUN_NOTE).read_text(encoding="utf-8"))["run_id"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # probe thread: tells the main thread when the store answers again
    def _start_probe_thread(self) -> None:
        if self._probe_thread is not None and self._probe_thread.is_alive():
            return
        self._stop_probe.clear()
        self._server_back.clear()
        self._probe_thread = threading.Thread(target=self._probe_loop, name="calm_dist-mlflow-probe",
                                              daemon=True)
        self._probe_thread.start()

    def _probe_loop(self) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(self.tracking_uri)
        while not self._stop_probe.wait(max(0.05, float(self.cfg.retry_interval_s))):
            try:
                client.search_experiments(max_results=1)
            except Exception as e:  # still down
                log.debug("MLflow probe failed: %s", e)
                continue
            self._server_back.set()
            return

    def _stop_probe_thread(self) -> None:
        self._stop_probe.set()
        t = self._probe_thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=30)
        self._probe_thread = None

    # system metrics (best effort: mlflow's monitor stops itself when the store is unreachable and
    # is restarted, continuing its step count, once the store is back)
    def _start_sysmon(self) -> None:
        if (not self.cfg.system_metrics or self._sysmon_failed or self._offline or self.run_id is None
                or self._adopting):
            return
        mon = self._sysmon
        if mon is not None and mon._process is not None and mon._process.is_alive():
            return
        resume = mon is not None or self._sender.attached
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            mon = SystemMetricsMonitor(self.run_id, tracking_uri=self.tracking_uri, resume_logging=resume,
                                       node_id=self.node_id)
            mon.start()
            self._sysmon = mon
        except Exception as e:  # psutil missing, ...
            self._sysmon_failed = True
            log.warning("MLflow system metrics disabled: %s", e)

    def _stop_sysmon(self) -> None:
        if self._sysmon is not None:
            try:
                self._sysmon.finish()
            except Exception as e:
                log.debug("system metrics monitor: %s", e)
            self._sysmon = None


# ----------------------------------------------------------------------------------------------------
# command line: python -m calm_dist.tracking.tracker import-offline FILE...


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calm_dist.tracking.tracker",
                                     description="calm_dist MLflow helpers")
    sub = parser.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import-offline", help="send buffered records (mlflow_offline/*.jsonl) to MLflow")
    imp.add_argument("files", nargs="+", type=Path)
    imp.add_argument("--tracking-uri", default=None,
                     help="where to send them (default: the URI recorded in each file)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rc = 0
    for path in args.files:
        try:
            run_id = import_offline(path, args.tracking_uri)
            print(f"{path}: imported into run {run_id}")
        except Exception as e:
            print(f"{path}: FAILED: {e}", file=sys.stderr)
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
