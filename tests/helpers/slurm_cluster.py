"""A real Slurm for the tests: tools/local_slurm.sh brings up 2 simulated nodes; helpers submit and poll.

`slurm_cluster` is a session fixture: a test module makes it its own by name (test_slurm.py:
`slurm_cluster = tests.helpers.slurm_cluster.slurm_cluster`). When Slurm cannot be brought up, the tests FAIL
if the environment variable CI is set (the CI machine must run them) and are skipped, with the reason, on a
developer machine (required.py).

Jobs are submitted with `sbatch --parsable` and polled with `scontrol show job` against a deadline
(never `sbatch --wait`); every client call runs under a timeout, since a client hangs once the
controller is gone.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.required import unavailable

REPO = Path(__file__).resolve().parents[2]
LOCAL_SLURM = REPO / "tools" / "local_slurm.sh"
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"}


class SlurmUnavailable(RuntimeError):
    pass


@dataclass
class Job:
    id: str
    fields: dict

    @property
    def state(self) -> str:
        return self.fields.get("JobState", "UNKNOWN")

    @property
    def restarts(self) -> int:
        return int(self.fields.get("Restarts", 0))

    @property
    def exit_code(self) -> str:
        return self.fields.get("ExitCode", "")

    @property
    def nodes(self) -> str:
        return self.fields.get("NodeList", "")


class SlurmCluster:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # ---- the cluster ----------------------------------------------------------------------------------
    def local_slurm(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(LOCAL_SLURM), *args, "--dir", str(self.dir)], capture_output=True,
                              text=True, timeout=timeout, env={k: v for k, v in self.env.items() if k != "SLURM_CONF"})

    def client(self, *args: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(["timeout", str(timeout), *args], capture_output=True, text=True, env=self.env)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {r.returncode}: {r.stderr.strip()}\n{self.diagnostics()}")
        return r

    def diagnostics(self, lines: int = 30) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd-node1.log", "slurmd-node2.log"):
            path = self.dir / "log" / name
            if path.is_file():
                out.append(f"--- {path} (tail)\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    # ---- jobs -----------------------------------------------------------------------------------------
    def sbatch(self, script: str | Path, *args: str, sbatch_args: tuple[str, ...] = (), env: dict | None = None,
               cwd: Path = REPO) -> str:
        """Submit and return the job id. `env` is exported to the job (sbatch exports the environment);
        a None value removes that variable."""
        full_env = {**self.env, **{k: str(v) for k, v in (env or {}).items() if v is not None}}
        for k in [k for k, v in (env or {}).items() if v is None]:
            full_env.pop(k, None)
        r = subprocess.run(["timeout", "60", "sbatch", "--parsable", *sbatch_args, str(script), *map(str, args)],
                           capture_output=True, text=True, env=full_env, cwd=cwd)
        if r.returncode != 0:
            raise AssertionError(f"sbatch failed ({r.returncode}): {r.stderr.strip()}\n{self.diagnostics()}")
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> Job:
        r = self.client("scontrol", "show", "job", "-o", job_id, check=False)
        if r.returncode != 0:
            return Job(job_id, {"JobState": "UNKNOWN", "error": r.stderr.strip()})
        return Job(job_id, dict(re.findall(r"(\w+)=(\S*)", r.stdout)))

    def wait(self, job_id: str, timeout: float, log: Path | None = None) -> Job:
        """Poll until the job reaches a terminal state. (A requeued job waits cred_expire + 1 s before it
        starts again: ~11 s on the local cluster. Do not force it with StartTime=now: a start within the
        second of the requeue meets the revoked credential of the previous run and the job FAILS.)"""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.state in TERMINAL_STATES:
                return job
            if time.monotonic() > deadline:
                self.client("scancel", job_id, check=False)
                text = log.read_text(errors="replace")[-6000:] if log and log.is_file() else "(no log)"
                raise AssertionError(f"job {job_id} still {job.state} after {timeout:.0f}s: {job.fields}\n"
                                     f"--- job log (tail)\n{text}\n{self.diagnostics()}")
            time.sleep(1)

    def wait_for_log(self, job_id: str, log: Path, pattern: str, timeout: float) -> float:
        """Wait until `pattern` (a regex) appears in the job log; returns the monotonic time it was seen."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            if log.is_file() and rx.search(log.read_text(errors="replace")):
                return time.monotonic()
            job = self.job(job_id)
            if job.state in TERMINAL_STATES or time.monotonic() > deadline:
                text = log.read_text(errors="replace")[-6000:] if log.is_file() else "(no log)"
                raise AssertionError(f"job {job_id} ({job.state}): {pattern!r} never appeared in {log}\n{text}")
            time.sleep(0.3)

    @staticmethod
    def wait_for_output(log: Path, pattern: str, timeout: float) -> str:
        """The job log once `pattern` appears in it. A cancelled job reads CANCELLED while its batch script
        still runs (until KillWait), so its last lines can come after `wait` returns."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            text = log.read_text(errors="replace") if log.is_file() else ""
            if rx.search(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} never appeared in {log}\n{text[-6000:]}")
            time.sleep(0.3)

    def wait_for_requeue(self, job_id: str, log: Path, timeout: float) -> Job:
        """Wait until the job has been requeued once (Restarts=1), before its next run starts."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.restarts >= 1:
                return job
            if job.state in TERMINAL_STATES or time.monotonic() > deadline:
                text = log.read_text(errors="replace")[-6000:] if log.is_file() else "(no log)"
                raise AssertionError(f"job {job_id} ({job.state}) was not requeued\n{text}\n{self.diagnostics()}")
            time.sleep(1)

    def signal_batch(self, job_id: str, signal: str = "USR1") -> None:
        """What --signal=B:USR1@N does before the time limit: the signal to the batch shell only."""
        self.client("scancel", f"--signal={signal}", "--batch", job_id)


def bring_up(directory: Path, nodes: int = 2) -> SlurmCluster:
    if not sys.platform.startswith("linux"):
        raise SlurmUnavailable("needs Linux (namespaces, /proc)")
    if os.geteuid() != 0:
        raise SlurmUnavailable("needs root (the daemons run as root; apt-get installs Slurm when missing)")
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        raise SlurmUnavailable("unshare/nsenter (util-linux) not found")
    cluster = SlurmCluster(directory)
    try:
        r = cluster.local_slurm("up", "--nodes", str(nodes))
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable("tools/local_slurm.sh up timed out") from None
    if r.returncode != 0:
        raise SlurmUnavailable(f"tools/local_slurm.sh up exited {r.returncode}:\n{r.stderr[-3000:]}")
    return cluster


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    # A short path: the munge socket path must stay under the 108-byte limit of a Unix socket.
    directory = tmp_path_factory.mktemp("slurm")
    try:
        cluster = bring_up(directory, nodes=2)
    except SlurmUnavailable as e:
        unavailable("a local Slurm", str(e))
    yield cluster
    r = cluster.local_slurm("down", timeout=180)
    assert r.returncode == 0, f"tools/local_slurm.sh down exited {r.returncode}: {r.stderr}"


