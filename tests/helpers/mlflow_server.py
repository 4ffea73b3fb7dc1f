"""Test helpers: a real MLflow server (tools/local_mlflow.sh) on a free loopback port.

Use from a test module::

    from tests.helpers.mlflow_server import serve

    @pytest.fixture(scope="module")
    def mlflow_server(tmp_path_factory):
        yield from serve(tmp_path_factory.mktemp("mlflow_server"))

When the server cannot start, the test FAILS if env CI is set and is skipped (with the reason and
the server log's tail) on a developer machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers.required import unavailable

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "local_mlflow.sh"
START_TIMEOUT_S = int(os.environ.get("MLFLOW_TEST_SERVER_TIMEOUT", "180"))


class ServerStartError(RuntimeError):
    pass


def free_port() -> int:
    """A TCP port nothing listens on right now (127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """tools/local_mlflow.sh for one store directory and port."""

    def __init__(self, directory: Path, port: int | None = None):
        self.dir = Path(directory)
        self.port = port or free_port()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        try:
            return int((self.dir / "server.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def _env(self) -> dict:
        env = dict(os.environ)
        env["MLFLOW_LOCAL_PYTHON"] = sys.executable
        env["MLFLOW_LOCAL_START_TIMEOUT"] = str(START_TIMEOUT_S)
        env.pop("MLFLOW_TRACKING_URI", None)
        return env

    def _script(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT), *args, "--dir", str(self.dir)],
                              capture_output=True, text=True, timeout=timeout, env=self._env())

    def up(self) -> None:
        try:
            r = self._script("up", "--port", str(self.port), timeout=START_TIMEOUT_S + 30)
        except subprocess.TimeoutExpired as e:
            self.down()
            raise ServerStartError(f"local_mlflow.sh up timed out: {e}") from None
        if r.returncode != 0:
            raise ServerStartError(f"local_mlflow.sh up failed (rc {r.returncode}):\n{r.stdout}\n{r.stderr}"
                                   f"\n--- server.log tail ---\n{self.log_tail()}")
        if f"export MLFLOW_TRACKING_URI={self.uri}" not in r.stdout:
            raise ServerStartError(f"local_mlflow.sh up did not print the URI:\n{r.stdout}")

    def status(self) -> bool:
        return self._script("status", timeout=30).returncode == 0

    def down(self) -> None:
        """Stop the server with the script, and check it did: `down` signals only a pid it recognises as this
        directory's server, so a server it failed to recognise would outlive the tests."""
        pid = self.pid
        r = self._script("down", timeout=60)
        if pid is not None and running(pid):
            raise AssertionError(f"local_mlflow.sh down left server {pid} running:\n{r.stdout}\n{r.stderr}")

    def kill(self) -> None:
        """Crash the server: SIGKILL its whole process group, no clean shutdown."""
        pid = self.pid
        assert pid is not None, "no server pid file"
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
            except OSError:
                return
            time.sleep(0.1)
        raise AssertionError(f"port {self.port} still answers after SIGKILL")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join((self.dir / "server.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no server.log)"


def running(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie still answers kill 0)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def start_or_skip(server: LocalServer) -> None:
    """server.up(); on failure: pytest.fail under CI, pytest.skip elsewhere (required.py)."""
    try:
        server.up()
    except ServerStartError as e:
        unavailable("a local MLflow server (tools/local_mlflow.sh)", str(e))


def serve(directory: Path, port: int | None = None):
    """Generator for a fixture: yields a healthy LocalServer and always stops it afterwards."""
    server = LocalServer(directory, port)
    try:
        start_or_skip(server)
        yield server
    finally:
        server.down()


def clean_mlflow_env(monkeypatch) -> None:
    """A test's MLflow environment: none of the caller's tracking variables, and short HTTP timeouts without
    retries (Tracker.start() sets those with setdefault; monkeypatch restores them after the test)."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TAGS",
                "MLFLOW_ENABLE_ASYNC_LOGGING", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
