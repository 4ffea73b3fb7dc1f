#!/usr/bin/env bash
# `make demo`: the paper's key-value experiment (Table 1) at tiny scale, end to end, on 2 CPU ranks.
# The two base models share nothing but the tokenizer; every recipe value was chosen on the validation keys and
# the test keys are scored once (docs/kv_task.md).
#
#   1. the task and its shared SentencePiece tokenizer        python -m examples.kv_task.make_data (reused when current)
#   2. the tiny anchor (arithmetic) and augmenting (keys)     python -m examples.kv_task.pretrain  (reused when present)
#   3. the augmenting states of D_C, cached to disk           calm-dist cache
#   4. the composition, 2 ranks under ZeRO-2                  deepspeed --num_gpus 2 calm_dist/train.py
#   5. the baselines through the same entry point: LoRA on the anchor with as many parameters, and the
#      composition with a randomly initialised augmenting model (side by side, one rank each)
#   6. evaluation (greedy exact match) of every model on every set, the Table-1-shaped comparison
# BASE_SEED seeds the two base models, SEED the composition and the baselines (make demo-seeds varies both);
# BASELINES=0 skips step 5. PRETRAIN_ARGS (flags of examples.kv_task.pretrain) and TRAIN_OVERRIDES (dotted
# overrides of every training run) shrink it for a smoke run, e.g. PRETRAIN_ARGS="--anchor-steps 20 --aug-steps 20"
# TRAIN_OVERRIDES="train.steps=4 optim.warmup_steps=1".
# XTOK=1 (`make demo-xtok`, docs/cross_tokenizer.md): the augmenting model reads the text through its own
# tokenizer, XTOK_TOKENIZER of the task's (default tokenizer_bpe, a byte-level BPE with Qwen2's pre-tokenizer;
# tokenizer_bpe_prefix_space the same with a space before each text; tokenizer_chars.model reads keys one letter a
# token, tokenizer_letters_numbers.model also numbers whole),
# pretrained into models/xtok_<tokenizer>_seed*; the anchor is the same one, and every calm-dist command aligns the
# two readings by characters. Its runs go to runs_xtok/ and the MLflow experiment kv_demo_xtok; prefix-only decoding
# has no cross-tokenizer form. That m_A pretrains XTOK_AUG_STEPS steps (default 4000); AUG_PRETRAIN_ARGS adds flags to
# its pretraining only; AUG_BASE_SEED (default BASE_SEED) composes the anchor with the m_A of another base seed
# (docs/cross_tokenizer.md).
# VALIDATION_ONLY=1 scores the validation keys and numeric arithmetic only, without the baselines: a design is
# chosen there, and the test keys are scored once, by the run of the design chosen.
#   7. the comparison of the training runs (calm-dist compare): loss curves in comparison.png beside results.md
# Everything is logged to MLflow ($MLFLOW_TRACKING_URI, default sqlite:///<demo dir>/mlflow.db); each export's
# scores go into the run that trained it, the base models' into child runs named for them.
set -euo pipefail
cd "$(dirname "$0")/../.."

DEMO_DIR=${DEMO_DIR:-artifacts/kv_demo}
PYTHON=${PYTHON:-$(command -v python)}
RECIPE=examples/kv_task/recipe.yaml
BASE_SEED=${BASE_SEED:-0}
AUG_BASE_SEED=${AUG_BASE_SEED:-$BASE_SEED}
SEED=${SEED:-0}
BASELINES=${BASELINES:-1}
XTOK=${XTOK:-0}
XTOK_TOKENIZER=${XTOK_TOKENIZER:-tokenizer_bpe}
VALIDATION_ONLY=${VALIDATION_ONLY:-0}
[ "$VALIDATION_ONLY" = 1 ] && BASELINES=0
if [ "$AUG_BASE_SEED" != "$BASE_SEED" ] && [ "$XTOK" != 1 ]; then
    echo "AUG_BASE_SEED pairs base seeds across tokenizers only (XTOK=1)" >&2
    exit 2
fi
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$(realpath -m "$DEMO_DIR")/mlflow.db}  # DEMO_DIR may be absolute
if [ "$XTOK" = 1 ]; then
    export MLFLOW_EXPERIMENT_NAME=${MLFLOW_EXPERIMENT_NAME:-kv_demo_xtok}
    RUN=$DEMO_DIR/runs_xtok/$(date +%Y%m%d-%H%M%S)
else
    export MLFLOW_EXPERIMENT_NAME=${MLFLOW_EXPERIMENT_NAME:-kv_demo}
    RUN=$DEMO_DIR/runs/$(date +%Y%m%d-%H%M%S)
fi
# every run of this demo carries the tag demo_run=<its directory>, so step 7 compares these runs and no earlier ones
export MLFLOW_TAGS="demo_run=$(basename "$RUN")"
TASK=$DEMO_DIR/task
MODELS=$DEMO_DIR/models/base_seed$BASE_SEED
mkdir -p "$RUN"
printf '{"base_seed": %s, "aug_base_seed": %s, "seed": %s}\n' "$BASE_SEED" "$AUG_BASE_SEED" "$SEED" > "$RUN/seeds.json"
echo "RUN_DIR=$RUN"
started=$SECONDS
say() { printf '\n[demo %4ds] %s\n' "$((SECONDS - started))" "$*"; }

say "1/7 key-value task and tokenizer -> $TASK"
"$PYTHON" -m examples.kv_task.make_data --out "$TASK" --augmenting-tokenizers

say "2/7 tiny anchor and augmenting models -> $MODELS"
AUG=$MODELS/aug
if [ "$XTOK" = 1 ]; then
    AUG=$DEMO_DIR/models/xtok_$(basename "${XTOK_TOKENIZER%.model}")_seed$AUG_BASE_SEED/aug
    # the anchor and the augmenting model of its own tokenizer side by side, one process each (reused when current)
    # shellcheck disable=SC2086 # PRETRAIN_ARGS is a list of flags
    "$PYTHON" -m examples.kv_task.pretrain --task "$TASK" --out "$MODELS" --which anchor --seed "$BASE_SEED" \
        ${PRETRAIN_ARGS:-} > "$RUN/pretrain_anchor.log" 2>&1 &
    anchor_job=$!
    # 4,000 steps (XTOK_AUG_STEPS), chosen on the validation keys over six seeds (docs/cross_tokenizer.md): the BPE
    # reads each key in two forms (first in a text and after a space), so each form gets the same-tokenizer m_A's
    # 2,000 steps' worth. Its 3,518-token output layer makes them take ~30 minutes alone: a wall cap of 60 minutes
    # shellcheck disable=SC2086
    "$PYTHON" -m examples.kv_task.pretrain --task "$TASK" --out "$(dirname "$AUG")" --which aug --seed "$AUG_BASE_SEED" \
        --aug-tokenizer "$TASK/$XTOK_TOKENIZER" --aug-steps "${XTOK_AUG_STEPS:-4000}" --max-minutes 60 \
        ${PRETRAIN_ARGS:-} ${AUG_PRETRAIN_ARGS:-} \
        > "$RUN/pretrain_aug.log" 2>&1 &
    aug_job=$!
    wait "$anchor_job" || { tail -n 20 "$RUN/pretrain_anchor.log"; exit 1; }
    wait "$aug_job" || { tail -n 20 "$RUN/pretrain_aug.log"; exit 1; }
    tail -n 3 "$RUN/pretrain_anchor.log" "$RUN/pretrain_aug.log"
else
    # shellcheck disable=SC2086 # PRETRAIN_ARGS is a list of flags
    "$PYTHON" -m examples.kv_task.pretrain --task "$TASK" --out "$MODELS" --which both --parallel --seed "$BASE_SEED" \
        ${PRETRAIN_ARGS:-}
fi

common=(model.anchor="$MODELS/anchor" model.augmenting="[$AUG]" data.tokenizer="$TASK/tokenizer.model"
        data.train="[{source: $TASK/data/dc_kv_arith.jsonl, weight: 0.75}, {source: $TASK/data/arith_train.jsonl, weight: 0.25}]"
        data.eval="$TASK/data/val_kv_arith.jsonl" data.cache_dir="$DEMO_DIR/data_cache" train.seed="$SEED"
        tracking.experiment="$MLFLOW_EXPERIMENT_NAME")
eval_flags=(--prefix-only)
if [ "$XTOK" = 1 ]; then  # every line of the task, letter by letter and with <s>, reads at most 18 tokens
    common+=(data.different_tokenizers=true data.augmenting_tokenizers="[$TASK/$XTOK_TOKENIZER]"
             data.augmenting_seq_len=32)
    eval_flags=()
fi
read -r -a extra <<< "${TRAIN_OVERRIDES:-}"
common+=("${extra[@]}")
launch() {  # the deepspeed launcher: RANKS (default 2) ranks on this machine's CPU
    "$PYTHON" -m deepspeed.launcher.runner --num_gpus "${RANKS:-2}" --master_addr 127.0.0.1 \
        --master_port "$("$PYTHON" -c 'from calm_dist.training.dist_env import free_port; print(free_port())')" \
        calm_dist/train.py --config "$RECIPE" "${common[@]}" "$@"
}

say "3/7 cache the augmenting states of every training and eval row"
"$PYTHON" -m calm_dist.cli cache --config "$RECIPE" "${common[@]}" train.output_dir="$RUN/composition" \
    train.states_cache_dir="$RUN/states_cache"

say "4/7 train the composition (2 ranks, ZeRO-2, cached states)"
launch train.output_dir="$RUN/composition" train.augmenting_states=cached \
    train.states_cache_dir="$RUN/states_cache" tracking.run_name=composition

compositions=(--composition composition="$RUN/composition/final")
if [ "$BASELINES" = 1 ]; then
say "5/7 baselines: LoRA on the anchor (same parameter count), composition with a random augmenting model"
# The random augmenting model is written once (seeded, as model.augmenting_init=random would) and then
# composed like any other, from cached states: recomputing them every step would cost a minute more.
random_aug=$("$PYTHON" -c 'import sys
from calm_dist.config import load_config
from calm_dist.training.parallelize import materialize_random_augmenting
print(materialize_random_augmenting(load_config(sys.argv[1], sys.argv[2:]), is_main=True)[0])' \
    "$RECIPE" "${common[@]}" train.output_dir="$RUN/random_augmenting")
"$PYTHON" -m calm_dist.cli cache --config "$RECIPE" "${common[@]}" model.augmenting="[$random_aug]" \
    train.output_dir="$RUN/random_augmenting" train.states_cache_dir="$RUN/random_states_cache"
# The two baselines train side by side, one rank (one core) each: the same global batch as two ranks (two
# micro-batches accumulated), without the per-step exchange between two processes on a small model.
echo "  (their logs: $RUN/lora.log, $RUN/random_augmenting.log)"
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT  # never leave a baseline training on its own
RANKS=1 launch train.output_dir="$RUN/lora" model.method=lora tracking.run_name=lora > "$RUN/lora.log" 2>&1 &
lora=$!
RANKS=1 launch model.augmenting="[$random_aug]" train.output_dir="$RUN/random_augmenting" \
    train.augmenting_states=cached train.states_cache_dir="$RUN/random_states_cache" \
    tracking.run_name=random_augmenting > "$RUN/random_augmenting.log" 2>&1 &
random=$!
wait "$lora" || { tail -n 20 "$RUN/lora.log"; exit 1; }
wait "$random" || { tail -n 20 "$RUN/random_augmenting.log"; exit 1; }
compositions+=(--composition lora="$RUN/lora/final" --composition random_augmenting="$RUN/random_augmenting/final")
fi

sets=(--set kv_arithmetic_test="$TASK/data/eval_kv_arith_heldout.jsonl"
      --set kv_arithmetic_validation="$TASK/data/val_kv_arith.jsonl"
      --set kv_substitution_test="$TASK/data/eval_kv_sub_heldout.jsonl"
      --set numeric_arithmetic="$TASK/data/eval_arith.jsonl")
if [ "$VALIDATION_ONLY" = 1 ]; then
    sets=(--set kv_arithmetic_validation="$TASK/data/val_kv_arith.jsonl"
          --set kv_substitution_validation="$TASK/data/val_kv_sub.jsonl"
          --set numeric_arithmetic="$TASK/data/eval_arith.jsonl")
fi

say "6/7 evaluate every model on every set"
"$PYTHON" -m calm_dist.cli eval --config "$RECIPE" "${common[@]}" train.output_dir="$RUN/composition" \
    "${compositions[@]}" "${eval_flags[@]}" "${sets[@]}" --json "$RUN/results.json" | tee "$RUN/results.md"

say "7/7 compare the training runs: final metrics, and their loss curves in $RUN/comparison.png"
"$PYTHON" -m calm_dist.cli compare --experiment "$MLFLOW_EXPERIMENT_NAME" --tag "demo_run=$(basename "$RUN")" \
    --out-dir "$RUN" --name comparison

say "done in $((SECONDS - started)) s: $RUN/results.md, $RUN/comparison.png, MLflow at $MLFLOW_TRACKING_URI"
