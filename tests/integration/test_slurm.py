"""The Slurm launch scripts on a real Slurm (tools/local_slurm.sh: slurmctld + 2 slurmd "nodes" on this machine).

Fast checks (no cluster): the scripts parse, carry their #SBATCH defaults, refuse to run outside a job.
Slow checks, on the cluster:
  (a) a torchrun-per-node gloo all_reduce job: rendezvous and ranks on both nodes;
  with the real calm_dist/train.py and recipes/tiny.yaml (no stand-ins):
  (b) slurm/train_composed.sh on 1 node x 2 procs and 2 nodes x 1 proc: checkpoints + exported composition;
  (c) USR1 mid-run -> checkpoint -> requeue -> resume: the same final weights as an uninterrupted run;
  (d) train.fail_at_step: the whole job fails fast, with the error in the job log;
  (e) Slurm's time-limit warning -> checkpoint -> requeue -> resume, then scancel: checkpoint, not requeued;
  (f) world size 4 on 2 nodes x 2 ranks: the caching job, then ZeRO-3 training on the cached states stopped by
      scancel --signal=TERM, requeued and resumed, against a single-process reference.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from calm_dist.config import load_config
from calm_dist.training.dist_env import slurm_master_port
from tests.helpers import tiny
from tests.helpers import slurm_cluster as local_cluster
from tests.helpers.reference_training import eval_loss, reference_training
from tests.helpers.slurm_cluster import REPO, SlurmCluster

slurm_cluster = local_cluster.slurm_cluster  # the session fixture, found by pytest under this name

TRAIN_SH = REPO / "slurm" / "train_composed.sh"
CACHE_SH = REPO / "slurm" / "cache_augmenter.sh"
LOCAL_SLURM = REPO / "tools" / "local_slurm.sh"
LOCAL_MLFLOW = REPO / "tools" / "local_mlflow.sh"
CPUS = str(min(2, os.cpu_count() or 1))      # cpus-per-task for a 2-rank node (ranks are not pinned)
JOB_TIMEOUT = 600                            # seconds a training job may take here (2 shared cores)


# ---- fast: no cluster ---------------------------------------------------------------------------------
@pytest.mark.parametrize("script", [TRAIN_SH, CACHE_SH, LOCAL_SLURM, LOCAL_MLFLOW], ids=lambda p: p.name)
def test_script_parses(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def sbatch_directives(script: Path) -> dict[str, str]:
    out = {}
    for line in script.read_text().splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            out[m.group(1)] = m.group(2) or ""
    return out


def test_train_script_defaults():
    d = sbatch_directives(TRAIN_SH)
    assert d["ntasks-per-node"] == "1"            # one torchrun launcher per node
    assert re.fullmatch(r"B:USR1@\d+", d["signal"])
    assert "requeue" in d and d["open-mode"] == "append" and "%j" in d["output"]
    assert {"nodes", "time", "job-name", "cpus-per-task"} <= set(d)
    text = TRAIN_SH.read_text()
    assert "set -euo pipefail" in text and "--kill-on-bad-exit=1" in text and "--max_restarts 0" in text
    assert "train.resume=auto" in text and "scontrol requeue" in text


def test_cache_script_defaults():
    d = sbatch_directives(CACHE_SH)
    assert {"nodes", "ntasks-per-node", "time", "output"} <= set(d) and "%j" in d["output"]
    assert "--kill-on-bad-exit=1" in CACHE_SH.read_text()


@pytest.mark.parametrize("script", [TRAIN_SH, CACHE_SH], ids=lambda p: p.name)
def test_scripts_refuse_to_run_outside_slurm(script):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=REPO, timeout=30)
    assert r.returncode != 0 and "not inside a Slurm job" in r.stderr


@pytest.mark.parametrize("script", [TRAIN_SH, CACHE_SH], ids=lambda p: p.name)
def test_scripts_derive_the_python_rendezvous_port_below_the_ephemeral_range(script):
    line = next(line for line in script.read_text().splitlines() if line.startswith("MASTER_PORT="))
    for job_id in (1, 12345, 31999, 987654321):
        r = subprocess.run(["bash", "-c", f"SLURM_JOB_ID={job_id}; unset MASTER_PORT; {line}; echo $MASTER_PORT"],
                           capture_output=True, text=True, check=True)
        port = int(r.stdout)
        assert port == slurm_master_port(job_id) and 20000 <= port < 32768  # Linux's ephemeral ports start at 32768


# ---- slow: the cluster itself -----------------------------------------------------------------------------
@pytest.mark.slow
def test_local_slurm_is_idempotent(slurm_cluster: SlurmCluster, tmp_path):
    started = time.monotonic()
    again = slurm_cluster.local_slurm("up", "--nodes", "2", timeout=120)
    assert again.returncode == 0, again.stderr
    assert f"export SLURM_CONF={slurm_cluster.conf}" in again.stdout and "already up" in again.stderr
    assert time.monotonic() - started < 30
    other_shape = slurm_cluster.local_slurm("up", "--nodes", "1", timeout=120)
    assert other_shape.returncode != 0 and "down" in other_shape.stderr
    status = slurm_cluster.local_slurm("status", timeout=60)
    assert status.returncode == 0 and "node1" in status.stdout and "node2" in status.stdout, status.stderr
    nothing = subprocess.run(["bash", str(LOCAL_SLURM), "down", "--dir", str(tmp_path / "empty")],
                             capture_output=True, text=True, timeout=60)
    assert nothing.returncode == 0 and "nothing was running" in nothing.stderr
    sinfo = slurm_cluster.client("sinfo", "-h", "-N", "-o", "%N %t").stdout.split("\n")
    assert sorted(line.split()[0] for line in sinfo if line.strip()) == ["node1", "node2"]


ALLREDUCE_SH = r"""#!/usr/bin/env bash
#SBATCH --job-name=allreduce
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=1
#SBATCH --time=00:10:00
set -euo pipefail
MASTER_ADDR=$(timeout 30 scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_PORT=$((20000 + SLURM_JOB_ID % 12000))
export MASTER_ADDR MASTER_PORT OMP_NUM_THREADS=1
srun --ntasks-per-node=1 --kill-on-bad-exit=1 --label bash -c 'exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$SLURM_NNODES" --node_rank "$SLURM_NODEID" --nproc_per_node 1 \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --max_restarts 0 "$WORKER" "$RESULT_DIR"'
"""

ALLREDUCE_PY = r"""
import json, os, socket, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
hosts = [None] * world
dist.all_gather_object(hosts, socket.gethostname())
if rank == 0:
    with open(os.path.join(sys.argv[1], "result.json"), "w") as f:
        json.dump({"world": world, "sum": t.item(), "hosts": hosts, "master": os.environ["MASTER_ADDR"]}, f)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_gloo_allreduce_across_two_nodes(slurm_cluster: SlurmCluster, tmp_path):
    """(a) torchrun per node under srun: the rendezvous works and the ranks sit on both nodes."""
    (tmp_path / "allreduce.sh").write_text(ALLREDUCE_SH)
    (tmp_path / "allreduce.py").write_text(ALLREDUCE_PY)
    log = tmp_path / "job.log"
    job_id = slurm_cluster.sbatch(tmp_path / "allreduce.sh", sbatch_args=(f"--output={log}",),
                                  env={"PYTHON": sys.executable, "WORKER": tmp_path / "allreduce.py",
                                       "RESULT_DIR": tmp_path})
    job = slurm_cluster.wait(job_id, 300, log)
    assert job.state == "COMPLETED", log.read_text()
    result = json.loads((tmp_path / "result.json").read_text())
    assert result == {"world": 2, "sum": 3.0, "hosts": ["node1", "node2"], "master": "node1"}
    assert job.nodes == "node[1-2]"


# ---- slow: the real trainer (calm_dist/train.py, recipes/tiny.yaml) ---------------------------------------
STEPS = 30


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    return tiny.tiny_setup(tmp_path_factory.mktemp("tiny_slurm"), n_train=96, n_eval=16)


def tiny_overrides(setup: Path, cache: Path, **extra) -> list[str]:
    items = {
        "model.anchor": setup / "anchor", "model.augmenting": f"[{setup / 'augmenting'}]",
        "data.train": setup / "train.jsonl", "data.eval": "null", "data.tokenizer": setup / "tokenizer.model",
        "data.cache_dir": cache, "train.steps": STEPS, "train.micro_batch_size": 4, "train.log_every": 1,
        "train.checkpoint_every": 10, "tracking.enabled": "false",
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def submit_train(cluster: SlurmCluster, setup: Path, tmp: Path, nodes: int, procs: int, sbatch_args=(), **extra):
    log, run_dir = tmp / "job-%j.log", tmp / "run-%j"
    job_id = cluster.sbatch(TRAIN_SH, *tiny_overrides(setup, tmp / "data_cache", **extra),
                            sbatch_args=(f"--nodes={nodes}", f"--cpus-per-task={CPUS if procs > 1 else 1}",
                                         "--time=00:30:00", f"--output={log}", *sbatch_args),
                            env={"CONFIG": "recipes/tiny.yaml", "RUN_DIR": run_dir, "PYTHON": sys.executable,
                                 "PROCS_PER_NODE": procs})
    return job_id, Path(str(log).replace("%j", job_id)), Path(str(run_dir).replace("%j", job_id))


def final_weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final" / "composition.safetensors"))


def check_completed_run(job, log: Path, run_dir: Path, nodes: int, procs: int) -> None:
    text = log.read_text()
    assert job.state == "COMPLETED" and job.exit_code == "0:0", text[-6000:]
    hosts = ["node1", "node2"][:nodes]
    for node_id, host in enumerate(hosts):       # one launcher per node, each on its own host
        assert f"{node_id}: node {node_id} ({host}): torchrun --nnodes {nodes} --node_rank {node_id} " \
               f"--nproc_per_node {procs}" in text, text[-6000:]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{STEPS}"
    state = json.loads((run_dir / "checkpoints" / latest / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["world_size"] == 2
    assert {p.name for p in (run_dir / "checkpoints" / latest).glob("optimizer.rank*.safetensors")} == \
        {"optimizer.rank0.safetensors", "optimizer.rank1.safetensors"}
    assert (run_dir / "final" / "composition.json").is_file()
    assert final_weights(run_dir)
    assert (run_dir / f"ds_config-{job.id}.json").is_file()
    assert f"composition exported to {run_dir}/final" in text


@pytest.fixture(scope="module")
def uninterrupted_2x1(slurm_cluster, tiny_setup, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train_2x1")
    job_id, log, run_dir = submit_train(slurm_cluster, tiny_setup, tmp, 2, 1)
    return slurm_cluster.wait(job_id, JOB_TIMEOUT, log), log, run_dir


@pytest.mark.slow
def test_train_composed_two_nodes_one_proc(uninterrupted_2x1):
    """(b) 2 nodes x 1 process."""
    job, log, run_dir = uninterrupted_2x1
    check_completed_run(job, log, run_dir, nodes=2, procs=1)
    assert job.nodes == "node[1-2]"


@pytest.mark.slow
def test_train_composed_one_node_two_procs(slurm_cluster, tiny_setup, tmp_path):
    """(b) 1 node x 2 processes, the same script unchanged."""
    job_id, log, run_dir = submit_train(slurm_cluster, tiny_setup, tmp_path, 1, 2)
    job = slurm_cluster.wait(job_id, JOB_TIMEOUT, log)
    check_completed_run(job, log, run_dir, nodes=1, procs=2)


@pytest.mark.slow
def test_preempted_job_resumes_to_the_uninterrupted_weights(slurm_cluster, tiny_setup, uninterrupted_2x1, tmp_path):
    """(c) USR1 to the batch shell mid-run -> checkpoint -> requeue -> resume: the same final weights."""
    job_id, log, run_dir = submit_train(slurm_cluster, tiny_setup, tmp_path, 2, 1)
    slurm_cluster.wait_for_log(job_id, log, rf"step [3-9]/{STEPS} \|", timeout=JOB_TIMEOUT)
    slurm_cluster.signal_batch(job_id, "USR1")
    job = slurm_cluster.wait(job_id, JOB_TIMEOUT, log)
    text = log.read_text()
    assert job.state == "COMPLETED" and job.restarts == 1, text[-6000:]
    assert "got SIGUSR1" in text and "requeueing job" in text and "No such file" not in text
    m = re.search(r"resumed from \S+/checkpoints/step_(\d+) at step (\d+)", text)
    assert m and 3 <= int(m.group(2)) < STEPS, text[-6000:]
    check_completed_run(job, log, run_dir, nodes=2, procs=1)
    reference_job, _, reference_dir = uninterrupted_2x1
    assert reference_job.state == "COMPLETED"
    resumed, reference = final_weights(run_dir), final_weights(reference_dir)
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name


@pytest.mark.slow
def test_failing_rank_fails_the_whole_job_fast(slurm_cluster, tiny_setup, tmp_path):
    """(d) train.fail_at_step: rank 1 (on node2) raises; the job fails at once, the error in its log."""
    job_id, log, run_dir = submit_train(slurm_cluster, tiny_setup, tmp_path, 2, 1, **{"train.fail_at_step": 3})
    seen = slurm_cluster.wait_for_log(job_id, log, r"injected failure on rank 1", timeout=JOB_TIMEOUT)
    job = slurm_cluster.wait(job_id, 180, log)
    elapsed = time.monotonic() - seen
    text = log.read_text()
    assert job.state == "FAILED" and job.restarts == 0, text[-6000:]
    assert elapsed < 90, f"the job outlived its failed rank by {elapsed:.0f}s"
    assert "RuntimeError: train.fail_at_step=3: injected failure on rank 1" in text
    assert "1: node 1 (node2)" in text and not (run_dir / "final").exists()


@pytest.mark.slow
def test_cache_augmenter_two_nodes(slurm_cluster, tiny_setup, tmp_path):
    """slurm/cache_augmenter.sh with the real `calm-dist cache`: one rank per node, each writes its shards."""
    log, cache = tmp_path / "job.log", tmp_path / "states"
    overrides = tiny_overrides(tiny_setup, tmp_path / "data_cache", **{"train.output_dir": tmp_path / "run",
                                                                         "train.states_cache_dir": cache})
    job_id = slurm_cluster.sbatch(CACHE_SH, "--rows-per-shard=16", *overrides,
                                  sbatch_args=("--nodes=2", "--ntasks-per-node=1", f"--output={log}"),
                                  env={"CONFIG": "recipes/tiny.yaml", "PYTHON": sys.executable})
    job = slurm_cluster.wait(job_id, JOB_TIMEOUT, log)
    text = log.read_text()
    assert job.state == "COMPLETED", text[-6000:]
    assert job.nodes == "node[1-2]"
    manifest = json.loads((cache / "train" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 6                  # 96 rows / 16: ranks 0 and 1 wrote 3 each
    assert sorted(p.name for p in (cache / "train").glob("shard-*.safetensors")) == \
        [f"shard-{i:05d}.safetensors" for i in range(6)]
    assert f"cached train: {cache}/train" in text
    writers = [json.loads((cache / "train" / f"shard-{i:05d}.json").read_text())["written_by_rank"] for i in range(6)]
    assert writers == [0, 1, 0, 1, 0, 1]                 # each node's rank wrote its half


@pytest.mark.slow
def test_time_limit_warning_requeues_and_scancel_stops_for_good(slurm_cluster, tiny_setup, tmp_path):
    """Slurm's own time-limit warning (--time=1 --signal=B:USR1@1: USR1 in the last 30-60 s) -> checkpoint ->
    requeue -> resume; then `scancel` (TERM to every process, KILL after KillWait): the ranks checkpoint and the
    job ends CANCELLED, not requeued. torchrun raises no SignalException: it does not handle TERM."""
    job_id, log, run_dir = submit_train(slurm_cluster, tiny_setup, tmp_path, 2, 1, **{
        "train.steps": 100_000, "train.log_every": 10, "train.checkpoint_every": 0},  # runs into its time limit
        sbatch_args=("--time=1", "--signal=B:USR1@1"))
    slurm_cluster.wait_for_requeue(job_id, log, timeout=JOB_TIMEOUT)
    slurm_cluster.client("scontrol", "update", f"JobId={job_id}", "TimeLimit=30")  # the resumed run is not warned
    resumed = r"resumed from \S+/step_(\d+) at step \d+"
    slurm_cluster.wait_for_log(job_id, log, resumed + r"[\s\S]*\n0: step \d+/", timeout=JOB_TIMEOUT)  # training again
    resumed_at = int(re.search(resumed, log.read_text()).group(1))
    slurm_cluster.client("scancel", job_id)
    job = slurm_cluster.wait(job_id, JOB_TIMEOUT, log)
    assert job.state == "CANCELLED" and job.restarts == 1, log.read_text()[-6000:]
    text = slurm_cluster.wait_for_output(log, r"\] (stopped at a checkpoint|training failed)", timeout=120)
    first, second = text.split("restart 1:")
    assert "got SIGUSR1" in first and "checkpoint written (JobState=RUNNING" in first, first[-6000:]
    assert "got SIGTERM" in second and re.search(r"the job ends \(JobState=\w+ Reason=None", second), second[-6000:]
    for rank, host in enumerate(["node1", "node2"]):
        assert f"{rank}: rank {rank} (local rank 0 on {host}): SIGTERM: checkpointing" in second, second[-6000:]
    assert "SignalException" not in text and "training failed" not in text, text[-6000:]
    assert int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_")) > resumed_at
    assert not (run_dir / "final").exists()


# ---- slow: world size 4 end to end, 2 nodes x 2 ranks ----------------------------------------------------
# 96 rows in global batches of 16 (4 ranks x micro-batch 2 x accumulation 2): 6 steps an epoch, so 14 steps
# run 3 epochs. 12 train shards of 8 rows: rank r (node r // 2) writes shards r, r + 4, r + 8.
WIDE_STEPS, WIDE_BATCH, WIDE_SHARD_ROWS = 14, 16, 8


@pytest.mark.slow
def test_four_ranks_on_two_nodes_cache_train_stop_resume_match_the_single_process_reference(
        slurm_cluster, tiny_setup, tmp_path):
    """slurm/cache_augmenter.sh (2 nodes x 2 tasks), then slurm/train_composed.sh (2 nodes x 2 ranks, ZeRO-3,
    cached states, eval at the end) stopped by `scancel --signal=TERM` (TERM to every process of the step,
    torchrun included), requeued and resumed: every step's loss, the final weights and the eval loss equal a
    single process's over the same global batches. Ranks 2 and 3 are local ranks 0 and 1 of node2, where a
    local rank used for a global one (sampler slice, shard assignment) would read or write another rank's rows."""
    cache = tmp_path / "states"
    wide = {"data.eval": tiny_setup / "eval.jsonl", "train.steps": WIDE_STEPS, "train.micro_batch_size": 2,
            "train.global_batch_size": WIDE_BATCH, "train.checkpoint_every": 0, "train.augmenting_states": "cached",
            "train.states_cache_dir": cache}
    cache_log = tmp_path / "cache.log"
    cache_job = slurm_cluster.sbatch(
        CACHE_SH, f"--rows-per-shard={WIDE_SHARD_ROWS}",
        *tiny_overrides(tiny_setup, tmp_path / "data_cache", **wide, **{"train.output_dir": tmp_path / "unused"}),
        sbatch_args=("--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={cache_log}"),
        env={"CONFIG": "recipes/tiny.yaml", "PYTHON": sys.executable})
    job = slurm_cluster.wait(cache_job, JOB_TIMEOUT, cache_log)
    assert job.state == "COMPLETED", cache_log.read_text()[-6000:]
    for split, shards in (("train", 12), ("eval", 2)):
        writers = [json.loads((cache / split / f"shard-{i:05d}.json").read_text())["written_by_rank"]
                   for i in range(shards)]
        assert writers == [i % 4 for i in range(shards)], (split, writers)

    job_id, log, run_dir = submit_train(slurm_cluster, tiny_setup, tmp_path, 2, 2, **wide)
    slurm_cluster.wait_for_log(job_id, log, rf"step [3-9]/{WIDE_STEPS} \|", timeout=JOB_TIMEOUT)
    slurm_cluster.client("scancel", "--signal=TERM", job_id)
    job = slurm_cluster.wait(job_id, JOB_TIMEOUT, log)
    text = log.read_text()
    assert job.state == "COMPLETED" and job.restarts == 1, text[-6000:]
    assert "SignalException" not in text and "checkpoint written (JobState=RUNNING" in text
    for rank in range(4):  # srun's label is the node; each rank names its local rank and host
        node, local = divmod(rank, 2)
        assert f"{node}: rank {rank} (local rank {local} on node{node + 1}): SIGTERM: checkpointing" in text, \
            text[-6000:]
    stopped_at = int(re.search(r"resumed from \S+/step_(\d+) at step", text).group(1))
    assert 3 <= stopped_at < WIDE_STEPS
    latest = run_dir / "checkpoints" / f"step_{WIDE_STEPS}"
    assert json.loads((latest / "trainer_state.json").read_text())["world_size"] == 4
    assert sorted(p.name for p in latest.glob("optimizer.rank*.safetensors")) == \
        [f"optimizer.rank{r}.safetensors" for r in range(4)]

    cfg = load_config(REPO / "recipes" / "tiny.yaml", tiny_overrides(tiny_setup, tmp_path / "data_cache", **wide))
    ref_losses, ref_weights = reference_training(cfg, WIDE_BATCH, tmp_path / "ref_cache")
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["train/loss"] for r in logged if "train/loss" in r}
    assert sorted(losses) == list(range(1, WIDE_STEPS + 1))  # each step once, across the stop
    assert [losses[s] for s in sorted(losses)] == pytest.approx(ref_losses, abs=1e-5)
    trained = final_weights(run_dir)
    assert trained.keys() == ref_weights.keys()
    for name in trained:
        torch.testing.assert_close(trained[name], ref_weights[name], atol=1e-4, rtol=0)
    eval_logged = [r["eval/loss"] for r in logged if "eval/loss" in r]
    assert eval_logged == pytest.approx([eval_loss(run_dir / "final", cfg, range(16), tmp_path / "ref_cache")],
                                        abs=1e-5)
