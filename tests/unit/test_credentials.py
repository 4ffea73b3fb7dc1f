"""Credentials in a tracking URI never leave the process: not as a param, in config.json or a checkpoint's
config.yaml, in the offline buffer or in a warning; MLflow still authenticates with them."""
from __future__ import annotations

import base64
import http.server
import logging
import threading

import pytest

from calm_dist.config import load_config
from calm_dist.credentials import redact, split_credentials
from calm_dist.tracking.store import read_offline_file
from calm_dist.tracking.tracker import Tracker
from tests.helpers.launch import REPO

SECRET = "s3cr%2Ft"  # percent-encoded "s3cr/t"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("uri, clean, user, password", [
    (f"https://alice:{SECRET}@mlflow.example:5000/path?x=1", "https://mlflow.example:5000/path?x=1", "alice", "s3cr/t"),
    ("http://bob@127.0.0.1:5000", "http://127.0.0.1:5000", "bob", None),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000", None, None),
    ("sqlite:////tmp/x@y/mlflow.db", "sqlite:////tmp/x@y/mlflow.db", None, None),
])
def test_credentials_are_split_off_the_uri(uri, clean, user, password):
    assert split_credentials(uri) == (clean, user, password)
    shown = redact(uri)
    assert "alice" not in shown and "s3cr" not in shown and ("bob" not in shown)
    assert shown.replace("***:***@", "") == clean


def test_the_config_as_saved_and_logged_carries_no_secret():
    cfg = load_config(REPO / "recipes" / "tiny.yaml", [f"tracking.tracking_uri=https://alice:{SECRET}@127.0.0.1:1"])
    assert cfg.tracking.tracking_uri.endswith("@127.0.0.1:1")  # the process itself keeps what it was given
    for text in (repr(cfg.to_dict()), cfg.to_yaml()):
        assert "s3cr" not in text and "alice" not in text
    assert cfg.to_dict()["tracking"]["tracking_uri"] == "https://***:***@127.0.0.1:1"


class _RecordingHandler(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def _answer(self):
        type(self).seen.append(self.headers.get("Authorization", ""))
        self.send_response(503)
        self.end_headers()

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


def test_a_tracker_authenticates_without_showing_the_secret(tmp_path, caplog):
    """A loopback server that answers 503 and records the Authorization header: MLflow sends the credentials,
    while the tracker's URI, warnings and offline buffer never contain them."""
    caplog.set_level(logging.INFO)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RecordingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://alice:{SECRET}@127.0.0.1:{server.server_address[1]}"
        overrides = [f"tracking.tracking_uri={uri}", "tracking.retry_interval_s=60", "tracking.system_metrics=false"]
        cfg = load_config(REPO / "recipes" / "tiny.yaml", overrides)
        tracker = Tracker(cfg.tracking, is_main_process=True, output_dir=tmp_path / "out")
        tracker.start(cfg.to_dict())
        tracker.log_metrics({"loss": 1.0}, 1)
        tracker.close()
    finally:
        server.shutdown()
    assert _RecordingHandler.seen, "MLflow never reached the server"
    assert set(_RecordingHandler.seen) == {"Basic " + base64.b64encode(b"alice:s3cr/t").decode()}
    assert tracker.tracking_uri == f"http://127.0.0.1:{server.server_address[1]}"
    shown = "\n".join(r.getMessage() for r in caplog.records) + tracker.offline_file.read_text()
    assert "s3cr" not in shown and "alice:" not in shown  # (MLflow tags the run mlflow.user=alice, as it should)
    header, _ = read_offline_file(tracker.offline_file)
    assert header["tracking_uri"] == tracker.tracking_uri
