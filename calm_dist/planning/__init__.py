"""The cost model and `calm-dist plan`: memory, FLOPs, communication and cache economics before a launch.

Pure Python: importing any module here never imports torch, so `calm-dist plan` runs without it
(tests/unit/test_plan.py checks). Only `hardware`'s peak measurement uses torch, inside the call."""
