"""Worked examples built on calm_dist; run their modules from the repository root (`python -m examples...`)."""
