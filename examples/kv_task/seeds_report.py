#!/usr/bin/env python
"""Mean and spread of `make demo-seeds`: one row per (model, set) over the runs' results.json files.

    python -m examples.kv_task.seeds_report RUN_DIR [RUN_DIR ...] [--out seeds.md]

Each RUN_DIR holds the results.json that `calm-dist eval` wrote (examples/kv_task/demo.sh step 6) and a seeds.json
naming its base-model and composition seeds. The spread is the sample standard deviation (n - 1) and the range."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys


def load(run_dir: str) -> tuple[dict, dict]:
    with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(run_dir, "seeds.json")) as f:
        seeds = json.load(f)
    return results, seeds


def base_seeds(seeds: dict) -> str:
    """The base-model seed, or both where the anchor and m_A come from different ones (demo.sh's AUG_BASE_SEED)."""
    aug = seeds.get("aug_base_seed", seeds["base_seed"])
    return str(seeds["base_seed"]) if aug == seeds["base_seed"] else f"{seeds['base_seed']} (m_A {aug})"


def table(runs: list[tuple[dict, dict]]) -> str:
    """Markdown: per (model, set) the exact match (%) of every run that scored it, their number, mean, standard
    deviation and range. A model missing from some runs (the baselines train once per base pair) keeps its row,
    over the runs that have it; "–" marks the others, and the spread of a single run."""
    header = ", ".join(f"base {base_seeds(s)}/comp {s['seed']}" for _, s in runs)
    lines = [f"runs (base-model seed / composition seed): {header}", "",
             "| model | set | n | mean | std | min | max | per run |", "|---|---|---|---|---|---|---|---|"]
    models = list(dict.fromkeys(m for r, _ in runs for m in r))
    for model in models:
        for name in dict.fromkeys(n for r, _ in runs for n in r.get(model, {})):
            per_run = [100 * r[model][name]["exact_match"] if name in r.get(model, {}) else None for r, _ in runs]
            scores = [x for x in per_run if x is not None]
            std = f"{statistics.stdev(scores):.1f}" if len(scores) > 1 else "–"
            shown = " / ".join("–" if x is None else f"{x:.1f}" for x in per_run)
            lines.append(f"| {model} | {name} | {len(scores)} | {statistics.mean(scores):.1f} | {std} | "
                         f"{min(scores):.1f} | {max(scores):.1f} | {shown} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run directories of examples/kv_task/demo.sh")
    p.add_argument("--out", help="also write the table here")
    a = p.parse_args(argv)
    text = table([load(r) for r in a.runs])
    print(text, end="")
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
