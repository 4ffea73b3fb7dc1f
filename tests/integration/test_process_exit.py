"""Entry points end through distributed.run_then_exit: never through interpreter finalization, which aborts a
rank now and then once gloo and DeepSpeed are up ("terminate called without an active exception"). The abort
itself is a race; what is checked here is its precondition: no finalization (an atexit handler never runs)."""
import subprocess
import sys

import pytest

from tests.helpers.launch import REPO

ENTRY = """
import atexit, sys
from pathlib import Path
from calm_dist.training.dist_env import run_then_exit
atexit.register(lambda: Path(sys.argv[1]).write_text("finalized"))
def main():
    {body}
run_then_exit(main)
"""


@pytest.mark.parametrize("body, code, stderr", [
    ("raise RuntimeError('boom')", 1, "RuntimeError: boom"),
    ("return 3", 3, ""),
    ("return None", 0, ""),
    ("sys.exit('calm_dist: a message')", 1, "calm_dist: a message"),
    ("sys.exit(2)", 2, ""),
])
def test_an_entry_point_exits_with_its_code_and_without_interpreter_finalization(tmp_path, body, code, stderr):
    marker = tmp_path / "finalized"
    proc = subprocess.run([sys.executable, "-c", ENTRY.format(body=body), str(marker)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    assert stderr in proc.stderr
    if code == 1 and "raise" in body:
        assert "Traceback (most recent call last)" in proc.stderr  # printed by sys.excepthook, as Python would
    assert not marker.exists()  # no finalization
