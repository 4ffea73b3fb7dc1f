"""One rank of a rank-0-only step (calm_dist/rank_zero.py), for tests/integration/test_rank_zero.py.

argv: <directory> <silence_s> <work_s> <outcome: ok | raise | config_error> [<rank 0's delay before the step, s>]
Rank 0's work takes work_s, then fails as `outcome` says or writes <directory>/result.txt (aside, then renamed).
Every rank that comes back prints what it reads there; a ConfigError is one line and exit 2, as in the CLI.
"""
import os
import sys
import time
from pathlib import Path

from calm_dist.config import ConfigError
from calm_dist.training.dist_env import run_then_exit
from calm_dist.rank_zero import run_on_rank_zero


def main() -> int:
    directory, silence_s, work_s, outcome = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    delay_s = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    rank = int(os.environ["RANK"])
    result = directory / "result.txt"

    def work() -> None:
        time.sleep(work_s)
        if outcome == "raise":
            raise RuntimeError("the disk caught fire")
        if outcome == "config_error":
            raise ConfigError("data row 7: field 'completion' is missing or not a string")
        staged = directory / "result.tmp"
        staged.write_text("written by rank 0")
        staged.rename(result)

    if rank == 0:
        time.sleep(delay_s)
    try:
        run_on_rank_zero("the test step", rank == 0, work, result.exists, directory / "step.status", silence_s)
    except ConfigError as e:
        print(f"calm_dist: error: {e}", flush=True)
        return 2
    print(f"rank {rank} read: {result.read_text()}", flush=True)
    return 0


if __name__ == "__main__":
    run_then_exit(main)
