"""The suite's one rule for a real component that cannot run here (Slurm, a tmpfs mount, ...): with the
environment variable CI set the test FAILS, since the CI machine must exercise it (.ci/run sets CI); on a
developer machine it is skipped, with the reason."""
from __future__ import annotations

import os
from typing import NoReturn

import pytest


def unavailable(what: str, reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required under CI but is unavailable: {reason}", pytrace=False)
    pytest.skip(f"{what} is unavailable on this machine: {reason} (a developer machine may skip this; CI must not)")
