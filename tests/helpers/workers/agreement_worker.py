"""One rank of the agreement test: ranks listed in argv[2] fail; every rank writes what it learned."""
import json
import sys
from datetime import timedelta

import torch.distributed as dist

from calm_dist.training.agreement import first_failure, gather_failures


def main():
    out, failing = sys.argv[1], {int(r) for r in sys.argv[2].split(",") if r}
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    problem = ValueError(f"shard {rank} of node {rank // 2} is corrupted ☹") if rank in failing else None
    failures = gather_failures(problem)
    healthy = gather_failures(None)  # a second round after a failure: nothing carries over
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"failures": {str(k): v for k, v in failures.items()}, "healthy": healthy,
                   "line": first_failure(failures) if failures else None}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    from calm_dist.training.dist_env import run_then_exit

    run_then_exit(main)
