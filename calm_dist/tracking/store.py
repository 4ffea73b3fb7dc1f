"""MLflow plumbing behind calm_dist.tracking.tracker.Tracker: stores, experiments, the sender and the offline buffer.

Nothing here is rank-aware; the Tracker decides who logs. `python -m calm_dist.tracking.tracker import-offline FILE`
sends what an outage left in `<output_dir>/mlflow_offline/`.

mlflow is imported inside the functions that talk to a store: it is a slow import, and a job with tracking
off, or a config check, never needs it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from calm_dist import SOURCE_TREE, __version__
from calm_dist.config import ConfigError, flatten
from calm_dist.files import replacing
from calm_dist.credentials import export_tracking_credentials

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "calm_dist"
OFFLINE_DIRNAME = "mlflow_offline"
OFFLINE_FORMAT_VERSION = 1
# Applied with os.environ.setdefault when a Tracker starts: an unreachable server must never block
# the training loop for long. A value already in the environment wins.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
}
# MLflow's limits (mlflow.utils.validation).
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_VAL_LENGTH = 6000
_MAX_TAG_VAL_LENGTH = 8000
IMPORT_HINT = "python -m calm_dist.tracking.tracker import-offline {path}"
# Validation waits this long at most for the store's answer (probe_tracking_store).
PROBE_TIMEOUT_S = 5.0


# ----------------------------------------------------------------------------------------------------
# helpers


def flatten_params(params: Any) -> dict[str, str]:
    """A nested config (mappings and dataclasses) as flat ``{"a.b.c": "value"}`` MLflow params.

    The keys are calm_dist.config.flatten's; lists and tuples become JSON, other leaves ``str(value)``; values
    longer than MLflow's limit are truncated (the full config belongs in an artifact: ``log_dict(cfg,
    "config.json")``).
    """
    params = _as_dicts(params)
    if not isinstance(params, dict):
        raise TypeError(f"params must be a mapping or a dataclass, got {type(params).__name__}")
    return {key: _param_str(value) for key, value in flatten(params).items()}


def _as_dicts(value: Any) -> Any:
    """Dataclasses and mappings as plain dicts, all the way down (not into lists): what config.flatten walks."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {key: _as_dicts(item) for key, item in value.items()}
    return value


def _param_str(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        try:
            text = json.dumps(list(value), default=str)
        except (TypeError, ValueError):
            text = str(value)
    elif isinstance(value, Mapping):
        text = "{}" if not value else json.dumps(value, default=str)
    else:
        text = str(value)
    return _truncate(text, _MAX_PARAM_VAL_LENGTH)


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    marker = "...[truncated]"
    return text[: limit - len(marker)] + marker


def parse_tags(text: str | None) -> dict[str, str]:
    """Tags from a string: a JSON object (``{"team": "nlp"}``) or ``k=v,k=v``. Raises ValueError."""
    text = (text or "").strip()
    if not text:
        return {}
    if text.startswith("{"):
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"MLFLOW_TAGS JSON must be an object, got {type(data).__name__}")
        return {str(k): str(v) for k, v in data.items()}
    tags = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad tag {part!r} in {text!r}: expected k=v,k=v or a JSON object")
        tags[key.strip()] = value.strip()
    return tags


def _git_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) from env CALM_DIST_GIT_COMMIT / GIT_COMMIT, else git in this source tree."""
    for var in ("CALM_DIST_GIT_COMMIT", "GIT_COMMIT"):
        if os.environ.get(var):
            return os.environ[var], None
    repo = SOURCE_TREE
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return (commit or None), bool(status)
    except Exception:
        return None, None


def default_tags() -> dict[str, str]:
    """Where and what ran: SLURM job id, node count, world size, git commit, calm_dist version, host."""
    env = os.environ
    tags = {"calm_dist_version": __version__, "hostname": socket.gethostname()}
    if env.get("SLURM_JOB_ID"):
        tags["slurm_job_id"] = env["SLURM_JOB_ID"]
        if env.get("SLURM_ARRAY_JOB_ID"):
            tags["slurm_array_job_id"] = env["SLURM_ARRAY_JOB_ID"]
            tags["slurm_array_task_id"] = env.get("SLURM_ARRAY_TASK_ID", "")
        if env.get("SLURM_JOB_NAME"):
            tags["slurm_job_name"] = env["SLURM_JOB_NAME"]
    world = env.get("WORLD_SIZE") or env.get("SLURM_NTASKS")
    if world:
        tags["world_size"] = world
    nodes = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or env.get("NNODES")
    if not nodes:
        local = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE")
        if world and local and local.isdigit() and world.isdigit() and int(local) > 0:
            nodes = str(max(1, int(world) // int(local)))
    if nodes:
        tags["num_nodes"] = nodes
    commit, dirty = _git_commit()
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    if dirty is not None:
        tags["git_dirty"] = str(dirty).lower()
    return tags


def resolve_tracking_uri(uri: str | None, output_dir: str | Path | None = None) -> str:
    """The explicit URI, else env MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db.

    A bare filesystem path ending in .db (or naming an existing file) becomes a sqlite URI. Credentials in
    the URI move to MLflow's MLFLOW_TRACKING_USERNAME / _PASSWORD: the URI returned (logged, buffered,
    printed) carries none.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is not None and "://" in uri:
        uri = export_tracking_credentials(uri)
    if uri is None:
        if output_dir is None:
            raise ValueError("no tracking URI: pass one, set MLFLOW_TRACKING_URI, or give output_dir")
        return "sqlite:///" + str((Path(output_dir) / "mlflow.db").resolve())
    if "://" not in uri and (uri.endswith(".db") or Path(uri).is_file()):
        return "sqlite:///" + str(Path(uri).resolve())
    return uri


def sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    return None


def default_artifact_location(uri: str, experiment: str) -> str | None:
    # A sqlite store's default artifact root is ./mlruns relative to the *current directory*; keep
    # artifacts beside the database instead. Servers choose their own (proxied) location.
    db = sqlite_path(uri)
    if db is None:
        return None
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment) or "experiment"
    return (db.resolve().parent / "mlartifacts" / safe).as_uri()


def apply_http_defaults() -> None:
    for key, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def get_or_create_experiment(client, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created if missing; safe when several processes race."""
    return find_or_create_experiment(client, name, artifact_location)[0]


def find_or_create_experiment(client, name: str, artifact_location: str | None = None) -> tuple[str, str]:
    """(experiment id, how) with how in {"existing", "created", "lost_race"}."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location), "created"
        except Exception:
            # Another process created it between our read and our create: read again.
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            how = "lost_race"
    else:
        how = "existing"
    if exp.lifecycle_stage != "active":
        raise MlflowException(deleted_experiment(name, exp.experiment_id, client.tracking_uri),
                              error_code="INVALID_STATE")
    return exp.experiment_id, how


def deleted_experiment(name: str, experiment_id: str, uri: str) -> str:
    """Why a deleted experiment is refused, and how to restore it. MLflow keeps a deleted experiment's name
    taken (and its runs) until it is purged, so a run can be neither created in it nor under its name; restoring
    is left to the user, who deleted it on purpose or by mistake."""
    return (f"tracking.experiment: the MLflow experiment {name!r} (id {experiment_id}) at {uri} is deleted; "
            f"restore it with `MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id "
            f"{experiment_id}`, or choose another tracking.experiment")


# ----------------------------------------------------------------------------------------------------
# the look at the store during validation


def probe_tracking_store(cfg, output_dir: str | Path) -> None:
    """Ask the tracking store for the experiment, before anything heavy (validation, rank 0 alone: it logs).

    A store MLflow refuses (a 4xx answer, a URI or store kind it does not take) or a deleted experiment is a
    ConfigError: no record of the run could ever be stored. A store that does not answer within
    PROBE_TIMEOUT_S is not: training goes on and the Tracker buffers, which one line on stderr says. A local
    store that does not exist yet is not opened, so validation creates nothing; the run creates it.
    """
    if not cfg.enabled:
        return
    uri = resolve_tracking_uri(cfg.tracking_uri, output_dir)
    experiment = cfg.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    local = sqlite_path(uri) or (Path(uri.removeprefix("file://")) if "://" not in uri or uri.startswith("file:")
                                  else None)
    if local is not None and not local.exists():
        return
    answer = _ask_for_experiment(uri, experiment)
    if "experiment" in answer:
        found = answer["experiment"]
        if found is not None and found.lifecycle_stage != "active":
            raise ConfigError(deleted_experiment(experiment, found.experiment_id, uri))
        return
    error = answer.get("error")
    if error is not None and not is_transient(error):
        raise ConfigError(f"tracking.tracking_uri: the MLflow tracking store {uri} refuses the run: "
                          f"{_first_line(error)}")
    reason = _first_line(error) if error is not None else f"no answer within {PROBE_TIMEOUT_S:g} s"
    print(f"calm_dist: warning: the MLflow tracking store {uri} does not answer ({reason}); training goes on, "
          f"buffering its records in {Path(output_dir) / OFFLINE_DIRNAME} until the store answers",
          file=sys.stderr, flush=True)


def _ask_for_experiment(uri: str, name: str) -> dict:
    """{"experiment": Experiment | None} or {"error": exception}; {} when no answer came in PROBE_TIMEOUT_S.
    The question runs in a daemon thread: a store that hangs (a black-holed host, a database that never
    accepts) delays validation by the timeout alone, whatever MLflow's own retries and timeouts."""
    from mlflow import MlflowClient

    apply_http_defaults()
    answer: dict = {}

    def ask() -> None:
        try:
            answer["experiment"] = MlflowClient(uri).get_experiment_by_name(name)
        except Exception as e:
            answer["error"] = e

    thread = threading.Thread(target=ask, name="calm_dist-mlflow-validate", daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    return dict(answer)


def _first_line(exc: BaseException) -> str:
    """The part of an exception worth one line: the OS error of a failed connection, else its first line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    errno = re.search(r"\[Errno -?\d+\] [^\"')(]+", text)
    return errno.group(0).strip() if errno else text[:300]


def is_transient(exc: BaseException) -> bool:
    """True when retrying later may succeed (store unreachable, 5xx, 429, database locked)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        code = exc.get_http_status_code()
        return code >= 500 or code == 429
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                        ValueError, TypeError, KeyError)):
        return False
    return True


def now_ms() -> int:
    return int(time.time() * 1000)


def to_float(value: Any) -> float:
    if hasattr(value, "item"):  # torch / numpy scalars
        value = value.item()
    return float(value)


# ----------------------------------------------------------------------------------------------------
# sending records (shared by the live Tracker and import_offline)


class SendError(Exception):
    """Sending the first ``n`` pending records failed with ``exc``."""

    def __init__(self, exc: BaseException, n: int):
        super().__init__(str(exc))
        self.exc = exc
        self.n = n


class Sender:
    """Applies records to one MLflow run, in order. Records are plain JSON-able dicts:

    create  {experiment, artifact_location, run_name, tags, params, start_time}
    attach  {run_id, tags, + the create fields, used if the run no longer exists}; run_id None: the run the
            records before it established (a job resumed before its run could be created)
    run     {run_id}     the records after it belong to that run (a file left by an earlier process)
    params  {params}     metrics {step, timestamp, metrics}     tags {tags}
    artifact {path, artifact_path}     dict {artifact_file, data}     end {status, end_time}
    """

    def __init__(self, client, run_id: str | None = None, *, live: bool = True):
        self.client = client
        self.run_id = run_id
        self.live = live          # a live run is set back to RUNNING on attach; an import is not
        self.attached = False     # True once a run was reattached (not created)
        self.run_established = False

    def drain(self, pending: deque, deadline: float | None = None, coalesce: bool = True) -> int:
        """Send records from the head of ``pending`` until it is empty or ``deadline`` (monotonic)
        passes; each sent record is removed. Raises SendError; ``pending`` then starts with the
        record(s) that failed, possibly rewritten to reflect partial progress."""
        sent = 0
        while pending:
            if deadline is not None and sent and time.monotonic() > deadline:
                break
            head = pending[0]
            if head["type"] == "metrics":
                batch, count = [], 0
                for rec in pending:
                    if rec["type"] != "metrics":
                        break
                    if batch and (not coalesce or count + len(rec["metrics"]) > _MAX_METRICS_PER_BATCH):
                        break
                    batch.append(rec)
                    count += len(rec["metrics"])
                try:
                    self._send_metrics(batch)
                except Exception as e:
                    raise SendError(e, len(batch)) from e
                for _ in batch:
                    pending.popleft()
                sent += len(batch)
            else:
                try:
                    self._apply(head)
                except Exception as e:
                    raise SendError(e, 1) from e
                pending.popleft()
                sent += 1
        return sent

    # -- one record -------------------------------------------------------------------------------
    def _require_run(self):
        if self.run_id is None:
            raise ValueError("no MLflow run: the offline file lacks its create/attach record")

    def _send_metrics(self, batch):
        from mlflow.entities import Metric

        self._require_run()
        metrics = [
            Metric(key, float(value), int(rec["timestamp"]), int(rec["step"]))
            for rec in batch for key, value in rec["metrics"].items()
        ]
        for i in range(0, len(metrics), _MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + _MAX_METRICS_PER_BATCH],
                                  synchronous=True)

    def _send_params(self, params):
        from mlflow.entities import Param

        items = [Param(k, _truncate(str(v), _MAX_PARAM_VAL_LENGTH)) for k, v in params.items()]
        for i in range(0, len(items), _MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + _MAX_PARAMS_TAGS_PER_BATCH],
                                  synchronous=True)

    def _send_tags(self, tags):
        from mlflow.entities import RunTag

        items = [RunTag(k, _truncate(str(v), _MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
        for i in range(0, len(items), _MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=items[i:i + _MAX_PARAMS_TAGS_PER_BATCH],
                                  synchronous=True)

    def _create(self, rec):
        exp_id = get_or_create_experiment(self.client, rec["experiment"], rec.get("artifact_location"))
        run = self.client.create_run(exp_id, start_time=rec.get("start_time"),
                                     tags=rec.get("tags") or {}, run_name=rec.get("run_name"))
        self.run_id = run.info.run_id
        self.run_established = True
        # From here the run exists: if logging its params fails, only they are left to send.
        params = rec.get("params") or {}
        rec.clear()
        rec.update({"type": "params", "params": params})
        if params:
            self._send_params(params)

    def _attach(self, rec):
        from mlflow.exceptions import MlflowException

        run_id = rec["run_id"] or self.run_id
        if run_id is None:  # no record before it created a run: this one does
            rec["type"] = "create"
            self._create(rec)
            return
        try:
            self.client.get_run(run_id)
        except MlflowException as e:
            if e.get_http_status_code() != 404:
                raise
            log.warning("MLflow run %s to resume does not exist in this tracking store; "
                        "starting a new run (tag resumed_from_run_id=%s)", run_id, run_id)
            tags = dict(rec.get("tags") or {}, resumed_from_run_id=run_id)
            rec.update({"type": "create", "tags": tags})
            self._create(rec)
            return
        self.run_id = run_id
        self.attached = True
        self.run_established = True
        if self.live:
            self.client.update_run(self.run_id, status="RUNNING")
        tags = rec.get("tags") or {}
        rec.clear()
        rec.update({"type": "tags", "tags": tags})
        if tags:
            self._send_tags(tags)

    def _apply(self, rec):
        kind = rec["type"]
        if kind == "create":
            self._create(rec)
        elif kind == "attach":
            self._attach(rec)
        elif kind == "run":
            self.run_id = rec["run_id"]
        elif kind == "params":
            self._require_run()
            self._send_params(rec["params"])
        elif kind == "tags":
            self._require_run()
            self._send_tags(rec["tags"])
        elif kind == "metrics":
            self._send_metrics([rec])
        elif kind == "artifact":
            self._require_run()
            path = Path(rec["path"])
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), rec.get("artifact_path"))
            elif path.exists():
                self.client.log_artifact(self.run_id, str(path), rec.get("artifact_path"))
            else:
                raise FileNotFoundError(f"artifact {path} no longer exists")
        elif kind == "dict":
            self._require_run()
            self.client.log_dict(self.run_id, rec["data"], rec["artifact_file"])
        elif kind == "end":
            self._require_run()
            self.client.set_terminated(self.run_id, status=rec["status"], end_time=rec.get("end_time"))
        else:
            raise ValueError(f"unknown offline record type {kind!r}")


# ----------------------------------------------------------------------------------------------------
# the offline file


def write_offline_file(path: Path, header: dict, records) -> None:
    """Atomically replace ``path`` with header + records (one JSON object per line), synced to disk."""
    with replacing(path, fsync=True, aside=path.name + ".tmp") as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(header) + "\n")
        for rec in records:
            fh.write(json.dumps(rec) + "\n")


def read_offline_file(path: str | Path) -> tuple[dict, list[dict]]:
    """(header, records) of an offline file. A truncated last line (a crash mid-write) is skipped."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    header, records = None, []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                log.warning("%s: skipping a truncated last line", path)
                continue
            raise ValueError(f"{path}:{i + 1}: not JSON") from None
        if header is None:
            if rec.get("type") != "header":
                raise ValueError(f"{path}: the first line is not a calm_dist offline header")
            header = rec
        else:
            records.append(rec)
    if header is None:
        raise ValueError(f"{path}: empty offline file")
    return header, records


def import_offline(path: str | Path, tracking_uri: str | None = None) -> str:
    """Send an offline file's records to MLflow (the file's own tracking URI unless one is given).

    Returns the run id. On success the file is renamed to ``<path>.imported``; on failure it is
    rewritten to hold only what is still unsent, and the error is raised.
    """
    from mlflow import MlflowClient

    apply_http_defaults()
    path = Path(path)
    header, records = read_offline_file(path)
    uri = resolve_tracking_uri(tracking_uri or header.get("tracking_uri"))
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    sender = Sender(MlflowClient(uri), header.get("run_id"), live=False)
    pending = deque(records)
    try:
        sender.drain(pending)
    except SendError as e:
        header = dict(header, run_id=sender.run_id)
        write_offline_file(path, header, pending)
        raise RuntimeError(f"import of {path} into {uri} stopped with {len(pending)} records left "
                           f"(kept in the file): {e.exc}") from e.exc
    done = path.with_name(path.name + ".imported")
    os.replace(path, done)
    log.info("imported %d records from %s into run %s at %s (file renamed to %s)",
             len(records), path, sender.run_id, uri, done)
    return sender.run_id
