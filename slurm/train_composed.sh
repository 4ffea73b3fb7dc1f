#!/usr/bin/env bash
# Train a CALM composition with DeepSpeed ZeRO-3 on Slurm: one torchrun launcher per node, preemption-safe.
#
#   sbatch slurm/train_composed.sh [key=value overrides for calm_dist/train.py ...]
#   CONFIG=recipes/my.yaml sbatch --nodes=4 --gpus-per-node=8 slurm/train_composed.sh train.steps=20000
#   CONFIG=recipes/tiny.yaml PROCS_PER_NODE=2 sbatch --nodes=1 --cpus-per-task=2 slurm/train_composed.sh
#
# Environment (read at submission: sbatch exports the submitting shell's environment):
#   CONFIG          the recipe (default recipes/tiny.yaml)
#   PROCS_PER_NODE  ranks per node (default: the GPUs Slurm gave the node, else 1)
#   RUN_DIR         output dir; "%j" becomes the job id (default runs/slurm-%j). It stays the same when
#                   the job is requeued, so the requeued job resumes from its checkpoints.
#   DS_CONFIG       DeepSpeed JSON with the ZeRO knobs (default ds_configs/zero3.json); copied per job to
#                   RUN_DIR/ds_config-<jobid>.json and passed as distributed.deepspeed_config
#   PYTHON          interpreter (default .venv/bin/python of the submit dir if present, else python3)
#   TRAIN_SCRIPT    entry point (default calm_dist/train.py)
#   MAX_REQUEUES    stop requeueing after this many restarts (default 50)
#   SIGNAL_REPEAT_S while a stop is pending, re-send USR1 to the ranks every N s (default 20; 0: once)
#
# Stops: --signal=B:USR1@N makes Slurm send SIGUSR1 to this batch shell N seconds before the time limit;
# scancel --signal=USR1 --batch JOBID or scancel --signal=TERM JOBID stop a run by hand. The ranks (train.py)
# finish their step, write a checkpoint and exit 0 on USR1 or TERM alike; then this shell requeues the job
# (scontrol requeue) and the new run starts with train.resume=auto in the same RUN_DIR, unless the job is
# ending for good: scancel JOBID (TERM to everything, then KILL after KillWait) or a preemption. A TERM at
# the time limit requeues too. The rule and what Slurm sends when: docs/slurm.md.
# A rank that fails ends the whole job (srun --kill-on-bad-exit, torchrun without restarts).
#
# --- Defaults: edit here or override on the sbatch command line ------------------------------------
#SBATCH --job-name=calm-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1            # ONE launcher (torchrun) per node; it starts PROCS_PER_NODE ranks
#SBATCH --cpus-per-task=2              # CPUs per node for the launcher and all its ranks
##SBATCH --gpus-per-node=8             # GPU nodes: PROCS_PER_NODE then defaults to the GPUs per node
##SBATCH --partition=gpu               # unset: the cluster's default partition
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300            # USR1 to this shell 5 min before the time limit: checkpoint + requeue
#SBATCH --requeue
#SBATCH --open-mode=append             # a requeued run appends to the same log
#SBATCH --output=slurm-%x-%j.out       # per-job log in the submit dir (the directory must exist)
# ---------------------------------------------------------------------------------------------------
set -euo pipefail

say() { printf '[train_composed %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { say "ERROR: $*" >&2; exit 1; }

[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm job: submit with sbatch slurm/train_composed.sh"

REPO=${SLURM_SUBMIT_DIR:-$PWD}
cd "$REPO"
CONFIG=${CONFIG:-recipes/tiny.yaml}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-calm_dist/train.py}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3.json}
MAX_REQUEUES=${MAX_REQUEUES:-50}
RESTART=${SLURM_RESTART_COUNT:-0}
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
RUN_DIR=${RUN_DIR:-runs/slurm-%j}
RUN_DIR=${RUN_DIR//%j/$SLURM_JOB_ID}
mkdir -p "$RUN_DIR"
RUN_DIR=$(cd "$RUN_DIR" && pwd -P)

if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=$(command -v python3); fi
fi
# The interpreter's bin dir first: torchrun's python, and one ninja for DeepSpeed's cached JIT ops.
PATH=$(dirname "$PYTHON"):$PATH
PROCS_PER_NODE=${PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
MASTER_ADDR=$(timeout 30 scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
[ -n "$MASTER_ADDR" ] || die "could not resolve the first node of $SLURM_JOB_NODELIST"
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 12000))}
export PATH PYTHON MASTER_ADDR MASTER_PORT PROCS_PER_NODE
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

[ -f "$TRAIN_SCRIPT" ] || die "$TRAIN_SCRIPT not found (in $REPO)"
[ -f "$CONFIG" ] || die "config $CONFIG not found (in $REPO)"
[ -f "$DS_CONFIG" ] || die "DeepSpeed config $DS_CONFIG not found (in $REPO)"
JOB_DS_CONFIG=$RUN_DIR/ds_config-$SLURM_JOB_ID.json
[ "$DS_CONFIG" -ef "$JOB_DS_CONFIG" ] || cp "$DS_CONFIG" "$JOB_DS_CONFIG"

say "job $SLURM_JOB_ID restart $RESTART: $NNODES node(s) [$SLURM_JOB_NODELIST] x $PROCS_PER_NODE proc(s)," \
    "master $MASTER_ADDR:$MASTER_PORT"
say "config $CONFIG, run dir $RUN_DIR, DeepSpeed $JOB_DS_CONFIG, python $PYTHON"

# --- The per-node launcher (runs on every node under srun; sbatch copies only this file, so it is inline)
# It starts torchrun with SIGUSR1 and SIGTERM ignored and out of torchrun's own handling: torchrun would die
# of USR1, and it turns TERM into a SignalException that kills the ranks 30 s later, checkpoint or not; the
# ranks inherit both as ignored until train.py installs its handler. Slurm signals every process of the step,
# torchrun included. On USR1 or TERM the launcher forwards the signal to torchrun's children (the ranks) and
# re-sends USR1 every SIGNAL_REPEAT_S until they exit, which also reaches a rank still setting up.
# shellcheck disable=SC2016
NODE_LAUNCHER='
set -u
children_of() {  # PIDs whose parent is $1 (from /proc/PID/stat; the comm field may hold spaces)
    local f s pid
    for f in /proc/[0-9]*/stat; do
        { read -r s < "$f"; } 2>/dev/null || continue   # processes come and go
        pid=${s%% *}; s=${s##*) }; s=${s#* }
        [ "${s%% *}" = "$1" ] && echo "$pid"
    done
    return 0
}
forward() { local w; for w in $(children_of "$TORCHRUN_PID"); do kill -s "$1" "$w" 2>/dev/null || true; done; }
on_stop() {
    forward "$1"
    if [ -z "$REPEATER" ] && [ "${SIGNAL_REPEAT_S:-20}" -gt 0 ]; then
        # deaf to the TERM Slurm sends every process of the step, it ends on a HUP from the launcher; no output
        # fds held (the step ends when its output closes), and its sleep dies with it
        ( trap "" USR1 TERM; trap "kill \$NAP 2>/dev/null; exit 0" HUP
          while :; do sleep "${SIGNAL_REPEAT_S:-20}" & NAP=$!; wait $NAP; forward USR1; done
        ) </dev/null >/dev/null 2>&1 &
        REPEATER=$!
    fi
}
REPEATER=
trap "on_stop USR1" USR1
trap "on_stop TERM" TERM
if [ -z "${DS_ACCELERATOR:-}" ] && ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
    export DS_ACCELERATOR=cpu
fi
echo "node $SLURM_NODEID ($(hostname)): torchrun --nnodes $SLURM_NNODES --node_rank $SLURM_NODEID" \
     "--nproc_per_node $PROCS_PER_NODE (DS_ACCELERATOR=${DS_ACCELERATOR:-auto})"
# torchrun handles the signals it is told to (--signals-to-handle, read from PET_SIGNALS_TO_HANDLE; older
# releases read TORCHELASTIC_SIGNALS_TO_HANDLE): not TERM
export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT
( trap "" USR1 TERM; exec "$PYTHON" -m torch.distributed.run --nnodes "$SLURM_NNODES" --node_rank "$SLURM_NODEID" \
      --nproc_per_node "$PROCS_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
      --max_restarts 0 "$@" ) &
TORCHRUN_PID=$!
while :; do
    wait "$TORCHRUN_PID" && rc=0 || rc=$?
    kill -0 "$TORCHRUN_PID" 2>/dev/null || break   # still there (or an unreaped zombie): interrupted by a trap
done
[ -n "$REPEATER" ] && kill -s HUP "$REPEATER" 2>/dev/null
[ "$rc" = 0 ] || echo "node $SLURM_NODEID ($(hostname)): torchrun exited with $rc" >&2
exit "$rc"
'

# --- Stops: forward USR1/TERM to the job step as USR1, remember it, requeue after a clean stop ---------
# TERM reaches this shell only when the whole job ends (scancel, time limit, preemption): Slurm signals the
# step's processes itself, and srun would take a forwarded TERM as an order to end its step.
STOP_SIGNAL=
SRUN_PID=
on_signal() {
    STOP_SIGNAL=$1
    say "got SIG$1: asking the ranks to checkpoint and exit"
    [ -n "$SRUN_PID" ] && kill -s USR1 "$SRUN_PID" 2>/dev/null || true
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# --- Phase 1: the token shards, prepared once on one node; every rank then memory-maps them -------------
# (a no-op when they exist: a requeued job, or a data set prepared beforehand with calm-dist prepare)
say "preparing the data: calm-dist prepare on one node"
srun --nodes=1 --ntasks=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}" \
     "$PYTHON" -m calm_dist.cli prepare --config "$CONFIG" "train.output_dir=$RUN_DIR" "$@" ||
    die "preparing the data failed (see above)"
case "$STOP_SIGNAL" in  # a stop that came while preparing (the shards prepared so far stay for the next run)
    USR1) say "got SIGUSR1 while preparing: requeueing before training starts"
          timeout 60 scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed"
          exec sleep 120 ;;
    TERM) say "got SIGTERM while preparing: the job ends before training starts"; exit 0 ;;
esac

# --- Phase 2: training ---------------------------------------------------------------------------------
srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 \
     --cpus-per-task="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}" \
     ${SLURM_GPUS_PER_NODE:+--gpus-per-node="$SLURM_GPUS_PER_NODE"} \
     --kill-on-bad-exit=1 --label \
     bash -c "$NODE_LAUNCHER" node-launcher \
     "$TRAIN_SCRIPT" --config "$CONFIG" \
     "train.output_dir=$RUN_DIR" train.resume=auto "distributed.deepspeed_config=$JOB_DS_CONFIG" "$@" &
SRUN_PID=$!
while :; do
    wait "$SRUN_PID" && rc=0 || rc=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break   # interrupted by a trap: srun still runs
done

if [ "$rc" != 0 ]; then
    say "training failed (srun exit $rc); see the rank errors above"
    exit "$rc"
fi
if [ -f "$RUN_DIR/final/composition.safetensors" ]; then
    [ -z "$STOP_SIGNAL" ] || say "training finished before the SIG$STOP_SIGNAL took effect: not requeueing"
    say "done: $RUN_DIR/final"
    exit 0
fi
# The ranks stopped at a checkpoint: a USR1 or TERM reached them (through this shell, or straight from Slurm).
# Requeue unless the job is ending for good: scancel and a preemption leave it neither RUNNING nor at its
# TimeLimit (Slurm requeues a preempted job itself under PreemptMode=REQUEUE). The controller's answer
# decides; without one, a TERM to this shell counts as the job ending.
JOB=$(timeout 30 scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null) || JOB="JobState=UNKNOWN Reason=$STOP_SIGNAL"
STATE=$(grep -o 'JobState=[A-Z_]*' <<<"$JOB" || true); STATE=${STATE#JobState=}
REASON=$(grep -o ' Reason=[^ ]*' <<<"$JOB" || true); REASON=${REASON# Reason=}
case "$STATE/$REASON" in
    RUNNING/* | */TimeLimit | UNKNOWN/USR1 | UNKNOWN/) ;;
    *) say "stopped at a checkpoint while the job ends (JobState=$STATE Reason=$REASON: cancelled or preempted):" \
           "not requeueing; RUN_DIR=$RUN_DIR sbatch ... resumes it"
       exit 0 ;;
esac
[ "$RESTART" -lt "$MAX_REQUEUES" ] ||
    die "stopped at a checkpoint, but restart $RESTART reached MAX_REQUEUES=$MAX_REQUEUES: not requeueing"
say "checkpoint written (JobState=$STATE Reason=$REASON): requeueing job $SLURM_JOB_ID" \
    "(resumes from $RUN_DIR/checkpoints/latest)"
# The controller ends this shell as it requeues the job; nothing below runs on success.
timeout 60 scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed"
exec sleep 120
