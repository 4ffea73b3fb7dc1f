#!/usr/bin/env python
"""Compare MLflow runs (the same as `calm-dist compare`); see calm_dist/compare.py or --help.

    python tools/compare_runs.py --experiment kv_task --baseline RUN --tracking-uri runs/x/mlflow.db
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable without installing

from calm_dist.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
