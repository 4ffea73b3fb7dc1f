"""The one "did any rank fail?" collective, with real gloo ranks: every rank learns every failing rank's message."""
import json

import pytest

from tests.helpers.launch import REPO, run_ranks

WORKER = str(REPO / "tests" / "helpers" / "workers" / "agreement_worker.py")


@pytest.mark.parametrize("failing", ["", "2", "1,3"])
def test_every_rank_learns_which_ranks_failed_and_why(tmp_path, failing):
    out, world = tmp_path / "seen", 4
    run_ranks([WORKER, str(out), failing], world=world, timeout=120)
    expected = {str(r): f"shard {r} of node {r // 2} is corrupted ☹" for r in map(int, filter(None, failing.split(",")))}
    for rank in range(world):
        seen = json.loads((tmp_path / f"seen.{rank}").read_text())
        assert seen["failures"] == expected
        assert seen["healthy"] == {}
    if expected:
        first = min(expected, key=int)
        more = " (and 1 more rank)" if len(expected) == 2 else ""
        assert seen["line"] == f"rank {first}: {expected[first]}{more}"


def test_a_single_process_needs_no_group():
    from calm_dist.training.agreement import gather_failures

    assert gather_failures(None) == {}
    assert gather_failures(OSError("disk full")) == {0: "disk full"}
