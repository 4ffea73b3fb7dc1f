"""What the local services trust and where the ranks listen.

- tools/local_slurm.sh runs as root and uses what it finds in its directory: it refuses a directory another
  user owns or can open, and it parses its state file without running any of it.
- tools/local_mlflow.sh down signals only the MLflow server it started for that directory.
- calm_dist's init_process_group: the rendezvous store and gloo listen on 127.0.0.1 only, under our own
  launch and under torchrun (whose agent hosts the store itself, on every interface).
"""
from __future__ import annotations

import json
import os
import re
import socket
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from calm_dist.config import ConfigError
from calm_dist.training.dist_env import bound_listener, keep_gloo_on_loopback, loopback_interface
from tests.helpers.launch import REPO, base_env, describe, free_port, run_ranks
from tests.helpers.required import unavailable

LOCAL_SLURM = REPO / "tools" / "local_slurm.sh"
LOCAL_MLFLOW = REPO / "tools" / "local_mlflow.sh"
SOCKETS_WORKER = REPO / "tests" / "helpers" / "workers" / "sockets_worker.py"


def local_slurm(command: str, directory: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_CONF", "LOCAL_SLURM_DIR")}
    return subprocess.run(["bash", str(LOCAL_SLURM), command, "--dir", str(directory)], capture_output=True,
                          text=True, timeout=60, env=env)


def assert_refused(r: subprocess.CompletedProcess, why: str) -> None:
    assert r.returncode != 0 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and re.search(why, lines[0]), r.stderr


# ---- tools/local_slurm.sh: its directory and its state file ---------------------------------------------------
def hostile_state(directory: Path, marker: Path) -> None:
    """A state file another user could have planted: each line runs `touch marker` when sourced."""
    (directory / "cluster.env").write_text(f"KEEPER_PID=$(touch {marker})\nMNT_NS=`touch {marker}`\n"
                                           f"RUN_PORT=16817; touch {marker}\n")


@pytest.mark.parametrize("command", ["status", "down", "env"])
def test_local_slurm_refuses_a_directory_others_can_open(tmp_path, command):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    hostile_state(shared, tmp_path / "ran")
    r = local_slurm(command, shared)
    assert not (tmp_path / "ran").exists(), "local_slurm.sh ran the code of a state file another user could write"
    assert_refused(r, r"mode 777 .*refusing")


def test_local_slurm_refuses_a_directory_owned_by_another_user(tmp_path):
    if os.geteuid() != 0:
        unavailable("root (to give a directory to another user)", "not running as root")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    hostile_state(theirs, tmp_path / "ran")
    os.chown(theirs, 65534, 65534)  # nobody
    r = local_slurm("down", theirs)
    assert not (tmp_path / "ran").exists(), "local_slurm.sh ran the code of another user's state file"
    assert_refused(r, r"belongs to uid 65534.*refusing")


def test_local_slurm_refuses_a_directory_another_user_can_rename(tmp_path):
    """/tmp-like parents without the sticky bit: anyone may swap the private directory for their own."""
    parent = tmp_path / "open"
    parent.mkdir()
    parent.chmod(0o777)
    (parent / "mine").mkdir(mode=0o700)
    assert_refused(local_slurm("env", parent / "mine"), r"lets another user rename it")
    parent.chmod(0o1777)  # sticky, as /tmp: only the owner renames what is inside
    assert local_slurm("env", parent / "mine").returncode == 0


def test_local_slurm_creates_its_directory_private(tmp_path):
    r = local_slurm("env", tmp_path / "fresh")
    assert r.returncode == 0 and r.stdout == f"export SLURM_CONF={tmp_path / 'fresh'}/slurm.conf\n", r.stderr
    assert (tmp_path / "fresh").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("line", ["KEEPER_PID=$(touch {marker})", "MNT_NS=`touch {marker}`",
                                  "RUN_PORT=16817; touch {marker}", "RUN_NODES=2 touch {marker}",
                                  "PATH=/nonexistent", "touch {marker}"])
@pytest.mark.parametrize("command", ["status", "down"])
def test_local_slurm_parses_its_state_file_without_running_it(tmp_path, command, line):
    private = tmp_path / "cluster"
    private.mkdir(mode=0o700)
    marker = tmp_path / "ran"
    (private / "cluster.env").write_text(f"KEEPER_PID=4242\n{line.format(marker=marker)}\n")
    r = local_slurm(command, private)
    assert not marker.exists(), f"local_slurm.sh {command} ran the state file's line {line!r}"
    assert_refused(r, r"cluster\.env line 2 is not one of its KEY=VALUE lines")


def test_local_slurm_reads_the_state_it_writes(tmp_path):
    """The lines `up` writes (a real cluster's state, with processes long gone) parse, and `down` finds
    nothing of them running."""
    private = tmp_path / "cluster"
    private.mkdir(mode=0o700)
    (private / "cluster.env").write_text("KEEPER_PID=4194300\nKEEPER_START=123\nMNT_NS=mnt:[4026531841]\n"
                                         "RUN_NODES=2\nRUN_PORT=16817\n")
    r = local_slurm("down", private)
    assert r.returncode == 0 and "nothing was running" in r.stderr, r.stderr
    assert not (private / "cluster.env").exists()


# ---- tools/local_mlflow.sh down: only its own server ----------------------------------------------------------
def decoys(tmp_path: Path) -> dict[str, list[str]]:
    other = tmp_path / "other_store"
    return {
        "sleep": ["sleep", "600"],
        # An MLflow-looking command line serving another directory's store on the same port.
        "another_store": [sys.executable, "-c", "import time; time.sleep(600)", "-m", "mlflow", "server",
                          "--backend-store-uri", f"sqlite:///{other}/mlflow.db", "--port", "5999"],
    }


@pytest.mark.parametrize("decoy", ["sleep", "another_store"])
def test_local_mlflow_down_leaves_another_process_alone(tmp_path, decoy):
    store = tmp_path / "store"
    store.mkdir()
    # Its own session, like the server `up` starts: `down` signals the whole process group.
    process = subprocess.Popen(decoys(tmp_path)[decoy], start_new_session=True)
    try:
        (store / "server.pid").write_text(f"{process.pid}\n")
        (store / "server.port").write_text("5999\n")
        r = subprocess.run(["bash", str(LOCAL_MLFLOW), "down", "--dir", str(store)], capture_output=True,
                           text=True, timeout=120)
        assert process.poll() is None, f"local_mlflow.sh down killed pid {process.pid} ({decoy}): {r.stdout}"
        assert r.returncode == 0 and f"pid {process.pid}" in r.stdout and "left alone" in r.stdout, r
        assert not (store / "server.pid").exists()
    finally:
        process.kill()
        process.wait()


# ---- the ranks' listening sockets -----------------------------------------------------------------------------
HOST_ADDRESS = "10.254.0.1"  # a cluster node's address, inside the test's own network namespace only


@pytest.fixture
def network_namespace():
    """A network namespace of the test's own: loopback up, and HOST_ADDRESS on one end of a veth pair inside it.
    Ranks that join it see a reachable non-loopback address, and nothing they do reaches a real network."""
    ip = shutil.which("ip")
    if os.geteuid() != 0 or ip is None:
        unavailable("a network namespace of the test's own (root, iproute2)", f"uid {os.geteuid()}, ip {ip}")
    name = f"calm_dist_test_{os.getpid()}"
    commands = [["netns", "add", name], ["-n", name, "link", "set", "lo", "up"],
                ["-n", name, "link", "add", "host0", "type", "veth", "peer", "name", "host1"],
                ["-n", name, "addr", "add", f"{HOST_ADDRESS}/24", "dev", "host0"],
                ["-n", name, "link", "set", "host0", "up"]]
    try:
        for command in commands:
            r = subprocess.run([ip, *command], capture_output=True, text=True)
            if r.returncode:
                unavailable("a network namespace of the test's own", f"ip {' '.join(command)}: {r.stderr.strip()}")
        yield name
    finally:
        subprocess.run([ip, "netns", "del", name], capture_output=True)


def read_reports(out: Path, world: int) -> list[dict]:
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(world)]


def test_the_store_and_gloo_listen_on_loopback_only(tmp_path, network_namespace):
    """Each rank's host name is a reachable non-loopback address (in the test's own network namespace, a UTS
    namespace per rank), as on a cluster node: torch's store would listen on every interface and gloo on that
    address; with MASTER_ADDR=127.0.0.1 both stay on loopback."""
    out = tmp_path / "sockets"
    results = run_ranks([str(SOCKETS_WORKER), str(out), HOST_ADDRESS, network_namespace], timeout=240)
    reports = read_reports(out, 2)
    for report in reports:
        assert report["sum"] == 6.0 and report["hostname"] == HOST_ADDRESS, describe(results)
        # the default group and one new group: one gloo listener each
        assert {a for a, _ in report["listening"]} == {"127.0.0.1"}, report
        assert report["gloo_socket_ifname"] == loopback_interface()
    master_port = reports[0]["master_port"]
    assert [port for _, port in reports[0]["listening"]].count(master_port) == 1  # the store, on rank 0 only
    assert len(reports[0]["listening"]) == 3 and len(reports[1]["listening"]) == 2, reports


def test_under_torchrun_the_agent_hosts_the_store(tmp_path):
    """torchrun's agent (its own process, outside calm_dist) hosts the store on every interface; the ranks
    only connect to it, and their gloo listeners stay on loopback."""
    out = tmp_path / "sockets"
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(port), "--max_restarts", "0",
                        str(SOCKETS_WORKER), str(out)],
                       capture_output=True, text=True, timeout=240, env=base_env(), cwd=REPO)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    reports = read_reports(out, 2)
    for report in reports:
        assert report["sum"] == 6.0 and report["master_port"] == port
        assert len(report["listening"]) == 2 and {a for a, _ in report["listening"]} == {"127.0.0.1"}, report
        assert port not in [p for _, p in report["listening"]]
    assert reports[0]["agent_listening"] == [["::", port]]


# ---- the rendezvous listener, alone ---------------------------------------------------------------------------
def test_the_store_refuses_a_port_in_use_with_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"cannot listen on MASTER_ADDR:MASTER_PORT=127\.0\.0\.1:{port}: "):
            bound_listener("127.0.0.1", port)


def test_a_master_address_of_another_host_leaves_the_store_to_torch(capfd):
    """A service or NAT address reaches rank 0 without being one of its own: torch's own listener on every
    interface serves it."""
    assert bound_listener("203.0.113.7", free_port()) is None  # TEST-NET-3: nobody's address
    assert "MASTER_ADDR=203.0.113.7 is not an address of this host" in capfd.readouterr().err


def test_gloo_moves_to_loopback_only_for_a_loopback_master():
    """Host names as a cluster node's: an address literal resolves without a name service."""
    environ = {"MASTER_ADDR": "127.0.0.1"}
    keep_gloo_on_loopback(environ, hostname="203.0.113.7")
    assert environ == {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": loopback_interface()} and loopback_interface()
    for environ, hostname in (({"MASTER_ADDR": "203.0.113.8"}, "203.0.113.7"),  # a master on another host
                              ({"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "eth7"}, "203.0.113.7"),  # chosen
                              ({"MASTER_ADDR": "127.0.0.1"}, "localhost")):  # gloo is on loopback already
        before = dict(environ)
        keep_gloo_on_loopback(environ, hostname=hostname)
        assert environ == before, hostname
