"""The cost model and `calm-dist plan`: memory, FLOPs, communication and cache economics before a launch.

Pure Python: nothing in this package imports torch (tests/unit/test_plan.py checks it)."""
