"""One rank of the agreement test: ranks listed in argv[2] fail; every rank writes what it learned."""
import json
import sys
from datetime import timedelta

import torch.distributed as dist

from calm_dist.training.agreement import any_rank, first_failure, gather_failures, run_everywhere
from calm_dist.training.dist_env import run_then_exit


class Found(Exception):
    pass


def raised(agreement) -> str | None:
    """What raise_failure raises here (own error kept, others a Found naming the first failing rank)."""
    try:
        agreement.raise_failure(lambda first: Found(f"found by {first}"))
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def main():
    out, failing = sys.argv[1], {int(r) for r in sys.argv[2].split(",") if r}
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    problem = ValueError(f"shard {rank} of node {rank // 2} is corrupted ☹") if rank in failing else None
    failures = gather_failures(problem)
    healthy = gather_failures(None)  # a second round after a failure: nothing carries over

    def work():
        if problem is not None:
            raise problem
    agreed = run_everywhere(work, catch=ValueError)
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"failures": {str(k): v for k, v in failures.items()}, "healthy": healthy,
                   "line": first_failure(failures) if failures else None,
                   "agreed": {str(k): v for k, v in agreed.failures.items()}, "raised": raised(agreed),
                   "any_rank": any_rank(rank in failing)}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    run_then_exit(main)
