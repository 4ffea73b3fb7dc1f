#!/usr/bin/env python
"""Compare MLflow runs (the same as `calm-dist compare`); see calm_dist/tracking/compare.py or --help.

    python tools/compare_runs.py --experiment kv_task --baseline RUN --tracking-uri runs/x/mlflow.db
"""
import sys

from calm_dist.tracking.compare import main

if __name__ == "__main__":
    sys.exit(main())
