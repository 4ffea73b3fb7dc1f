#!/usr/bin/env bash
# Cache the augmenting models' hidden states on Slurm: every rank caches its share of the data set.
#
#   CONFIG=recipes/my.yaml sbatch slurm/cache_augmenter.sh [key=value overrides ...]
#   CONFIG=recipes/my.yaml sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-task=1 slurm/cache_augmenter.sh
#
# Runs `python -m calm_dist.cli cache --config $CONFIG [overrides]` (= `calm-dist cache`) as one srun task
# per rank: calm_dist/training/dist_env.py maps SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS to the rank, local
# rank and world size, and this script sets MASTER_ADDR / MASTER_PORT for any collective the command needs.
#
# Environment: CONFIG (default recipes/tiny.yaml), PYTHON (default .venv/bin/python of the submit dir, else
# python3), ENTRY (what follows the interpreter, default "-m calm_dist.cli"; the word "cache" and the
# arguments come after it).
# A failing rank ends the whole job (srun --kill-on-bad-exit). The job is not requeued on its own: rerun
# it after a failure or a time limit (the cache command skips what a previous run finished, if it can).
#
# --- Defaults: edit here or override on the sbatch command line ------------------------------------
#SBATCH --job-name=calm-cache
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1            # ranks per node (one per GPU on GPU nodes)
#SBATCH --cpus-per-task=1
##SBATCH --gpus-per-task=1
##SBATCH --partition=gpu               # unset: the cluster's default partition
#SBATCH --time=02:00:00
#SBATCH --no-requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out       # per-job log in the submit dir (the directory must exist)
# ---------------------------------------------------------------------------------------------------
set -euo pipefail

say() { printf '[cache_augmenter %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { say "ERROR: $*" >&2; exit 1; }

[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm job: submit with sbatch slurm/cache_augmenter.sh"

REPO=${SLURM_SUBMIT_DIR:-$PWD}
cd "$REPO"
CONFIG=${CONFIG:-recipes/tiny.yaml}
ENTRY=${ENTRY:--m calm_dist.cli}
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=$(command -v python3); fi
fi
PATH=$(dirname "$PYTHON"):$PATH
MASTER_ADDR=$(timeout 30 scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
[ -n "$MASTER_ADDR" ] || die "could not resolve the first node of $SLURM_JOB_NODELIST"
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 12000))}
export PATH MASTER_ADDR MASTER_PORT PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
if [ -z "${DS_ACCELERATOR:-}" ] && ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
    export DS_ACCELERATOR=cpu
fi
[ -f "$CONFIG" ] || die "config $CONFIG not found (in $REPO)"

say "job $SLURM_JOB_ID: ${SLURM_NTASKS:-1} rank(s) on [$SLURM_JOB_NODELIST], master $MASTER_ADDR:$MASTER_PORT," \
    "config $CONFIG"
# shellcheck disable=SC2086  # ENTRY is words on purpose ("-m calm_dist.cli")
srun --kill-on-bad-exit=1 --label --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    "$PYTHON" $ENTRY cache --config "$CONFIG" "$@"
say "done"
