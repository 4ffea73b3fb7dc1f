#!/usr/bin/env bash
# `make demo-seeds`: the demo's composition over several seeds, for the README's mean and spread.
#   BASE_SEEDS (default "0 1"): each pretrains its own anchor and augmenting model;
#   SEEDS (default "0 1 2"): composition seeds, each trained on every base pair.
# The first run of each base pair also trains the LoRA and random-augmenting baselines. Every run writes its
# results.json under $DEMO_DIR/runs/; the table goes to $DEMO_DIR/seeds.md. Time: docs/kv_task.md §6.
# XTOK=1 (`make demo-xtok-seeds`) does the same for `make demo-xtok`: runs under runs_xtok/, the table seeds_xtok.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
export DEMO_DIR=${DEMO_DIR:-artifacts/kv_demo}
PYTHON=${PYTHON:-$(command -v python)}
runs=()
for base in ${BASE_SEEDS:-0 1}; do
    first=1
    for seed in ${SEEDS:-0 1 2}; do
        log=$(mktemp)
        BASE_SEED=$base SEED=$seed BASELINES=$first bash examples/kv_task/demo.sh | tee "$log"
        run=$(sed -n 's/^RUN_DIR=//p' "$log" | tail -1)
        rm -f "$log"
        runs+=("$run")
        first=0
    done
done
table=$DEMO_DIR/seeds.md
[ "${XTOK:-0}" = 1 ] && table=$DEMO_DIR/seeds_xtok.md
"$PYTHON" -m examples.kv_task.seeds_report "${runs[@]}" --out "$table"
