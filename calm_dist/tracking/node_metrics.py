"""System metrics of one node that is not global rank 0's, logged into the run rank 0 owns.

Global rank 0 logs everything else, and its own node's system metrics through its Tracker. The CPU, memory,
disk, network (and GPU, with `pynvml`) use of the other nodes is seen only from those nodes: each node's local
rank 0 runs MLflow's own monitor (`SystemMetricsMonitor`) into the same run, its metrics named
`system/<node id>/...` as MLflow names them for a `node_id`, plus one tag `<node id>.hostname`. This is the
one exception to "MLflow from rank 0 only", and it is best effort: these processes never buffer, and a
store that does not answer ends the node's monitor with one warning, never the job.
"""
from __future__ import annotations

import logging
import socket
from pathlib import Path

from calm_dist.tracking.store import resolve_tracking_uri

log = logging.getLogger(__name__)


class NodeSystemMetrics:
    """MLflow's system-metrics monitor for this node, into `run_id` (owned by another process)."""

    def __init__(self, run_id: str, tracking_uri: str | None, node_id: str, resume: bool = False,
                 output_dir: str | Path | None = None):
        # the store resolved on this node as rank 0 resolved it (tracking.tracking_uri, else $MLFLOW_TRACKING_URI,
        # else the output directory's sqlite file), so credentials in the URI reach MLflow's variables here too
        self.tracking_uri = resolve_tracking_uri(tracking_uri, output_dir)
        self.run_id, self.node_id, self.resume = run_id, node_id, resume
        self._monitor = None

    def start(self) -> bool:
        """Start the monitor thread; False (with a warning) when the store cannot be reached or refuses."""
        try:
            from mlflow import MlflowClient
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            MlflowClient(self.tracking_uri).set_tag(self.run_id, f"{self.node_id}.hostname", socket.gethostname())
            # resume: a resumed job continues the step count of the run's system metrics, as rank 0's does
            self._monitor = SystemMetricsMonitor(self.run_id, tracking_uri=self.tracking_uri, node_id=self.node_id,
                                                 resume_logging=self.resume)
            self._monitor.start()
            return True
        except Exception as e:  # the job goes on without this node's system metrics
            log.warning("MLflow system metrics of %s are not logged: %s", self.node_id, str(e).splitlines()[0][:300])
            self._monitor = None
            return False

    def stop(self) -> None:
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as e:
                log.debug("system metrics monitor of %s: %s", self.node_id, e)
            self._monitor = None
