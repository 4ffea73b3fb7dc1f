"""The one "did any rank fail?" collective, with real gloo ranks: every rank learns every failing rank's message."""
import json

import pytest

from calm_dist.training.agreement import gather_failures, run_everywhere

from tests.helpers.launch import REPO, run_ranks

WORKER = str(REPO / "tests" / "helpers" / "workers" / "agreement_worker.py")


@pytest.mark.parametrize("failing", ["", "2", "1,3"])
def test_every_rank_learns_which_ranks_failed_and_why(tmp_path, failing):
    out, world = tmp_path / "seen", 4
    run_ranks([WORKER, str(out), failing], world=world, timeout=120)
    expected = {str(r): f"shard {r} of node {r // 2} is corrupted ☹"
                for r in map(int, filter(None, failing.split(",")))}
    first = min(expected, key=int) if expected else None
    line = f"rank {first}: {expected[first]}{' (and 1 more rank)' if len(expected) == 2 else ''}" if expected else None
    for rank in range(world):
        seen = json.loads((tmp_path / f"seen.{rank}").read_text())
        assert seen["failures"] == expected
        assert seen["healthy"] == {}
        assert seen["line"] == line
        # run_everywhere: the same agreement; a failing rank raises its own error, the others one naming the first
        assert seen["agreed"] == expected
        own = f"ValueError: {expected.get(str(rank))}" if str(rank) in expected else f"Found: found by {line}"
        assert seen["raised"] == (own if expected else None)
        assert seen["any_rank"] == bool(expected)


def test_a_single_process_needs_no_group():
    assert gather_failures(None) == {}
    assert gather_failures(OSError("disk full")) == {0: "disk full"}
    assert not run_everywhere(lambda: None).failed
    agreed = run_everywhere(lambda: open("/nonexistent/dir/file"), catch=OSError)
    assert agreed.failed and isinstance(agreed.own, OSError) and agreed.first().startswith("rank 0: [Errno 2]")
    with pytest.raises(RuntimeError, match="^rank 0: "):
        agreed.raise_failure(RuntimeError, keep_own=lambda e: False)
    with pytest.raises(KeyError):  # outside `catch`: raised at once, no agreement
        run_everywhere(lambda: {}["missing"], catch=OSError)
