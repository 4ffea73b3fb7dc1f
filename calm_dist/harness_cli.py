"""`calm-dist lm-eval ARGS`: lm-evaluation-harness's own command line (`lm-eval ARGS`) with `--model calm`
registered first (calm_dist/harness.py says why lm-eval cannot find it by itself). Every argument is lm-eval's.
"""
from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("calm-dist lm-eval: lm-evaluation-harness is not installed: pip install 'calm-dist[lm-eval]'",
              file=sys.stderr)
        return 2
    import calm_dist.harness  # noqa: F401  (registers the model "calm")

    # lm-eval's parser reads sys.argv (and inserts its `run` verb when none is given)
    sys.argv = ["calm-dist lm-eval", *argv]
    cli_evaluate()
    return 0
