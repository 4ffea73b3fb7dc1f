"""The nodes of a job: which node a rank is on, and each node's system metrics in the job's MLflow run.

Rank 0's Tracker logs its own node's system metrics; the other nodes' local rank 0 log theirs into the same run
(`calm_dist.tracking.node_metrics`), every node under its id, `system/node<k>/...`. Only rank 0 knows the run
id, so it is broadcast once at set-up (bytes in a tensor, never pickled); each node resolves the store itself.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from calm_dist.config import TrackingConfig
from calm_dist.tracking.node_metrics import NodeSystemMetrics
from calm_dist.training.dist_env import DistEnv

RUN_ID_BYTES = 128  # MLflow run ids are 32 hex characters


def node_index(env: DistEnv) -> int:
    """The node of this rank: launchers number ranks node by node, local_world_size to a node."""
    return env.rank // max(1, env.local_world_size)


def node_id(env: DistEnv) -> str:
    return f"node{node_index(env)}"


def broadcast_text(text: str, device: torch.device, size: int = RUN_ID_BYTES) -> str:
    """Rank 0's `text` (at most `size` UTF-8 bytes) on every rank. Collective."""
    data = text.encode()[:size]
    buffer = torch.zeros(size + 1, dtype=torch.uint8, device=device)  # the last byte: the length is not 0
    if data:
        buffer[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    buffer[size] = 1
    dist.broadcast(buffer, src=0)
    return bytes(buffer[:size].cpu().tolist()).rstrip(b"\0").decode(errors="replace")


def start_node_metrics(env: DistEnv, run_id: str | None, tracking: TrackingConfig, output_dir, device: torch.device,
                       resuming: bool) -> NodeSystemMetrics | None:
    """Collective: rank 0 passes the run's id; on every other node, local rank 0 starts that node's monitor
    into that run. None where no monitor runs (rank 0, other local ranks, a one-node job, tracking or system
    metrics off, a run that does not exist yet because the store did not answer)."""
    if env.world_size == 1 or env.local_world_size >= env.world_size or not (tracking.enabled and
                                                                           tracking.system_metrics):
        return None
    shared = broadcast_text((run_id or "") if env.is_main else "", device)
    if env.is_main or env.local_rank != 0 or not shared:
        return None
    monitor = NodeSystemMetrics(shared, tracking.tracking_uri, node_id(env), resume=resuming, output_dir=output_dir)
    return monitor if monitor.start() else None
