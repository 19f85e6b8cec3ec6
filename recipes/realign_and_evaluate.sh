#!/usr/bin/env bash
# Realign one model on one language subset, then fine-tune POS, NER and NLI from that checkpoint; every task appends
# its rows to the results table (RESULTS_FILE). Finished steps are skipped when the recipe is run again.
#
#   bash recipes/realign_and_evaluate.sh subsets/uriel_20.yaml xlm-roberta-base 17
#   bash recipes/realign_and_evaluate.sh none xlm-roberta-base 17          # fine-tuning only (no realignment)
#   ACCELERATE_CONFIG=accelerate_configs/deepspeed_zero2.yaml EXTRA_ARGS="--bf16" \
#       bash recipes/realign_and_evaluate.sh uriel_20 xlm-roberta-base 17
#   PUSH_TO_HUB=user/xlmr-base-realigned-uriel20 bash recipes/realign_and_evaluate.sh uriel_20 xlm-roberta-base 17
#
# Arguments: SUBSET (a subset YAML, a name from subsets/, or `none`), MODEL (Hub id or folder), SEED (default 17).
# Outputs: OUT_ROOT/<model>/<subset>/seed<seed>/{realign,pos,ner,nli}/ and their logs beside them.
set -euo pipefail

SUBSET=${1:?usage: bash recipes/realign_and_evaluate.sh SUBSET MODEL [SEED]}
MODEL=${2:?usage: bash recipes/realign_and_evaluate.sh SUBSET MODEL [SEED]}
SEED=${3:-17}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ACCELERATE=${ACCELERATE:-accelerate}                                    # the accelerate executable
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-$ROOT/accelerate_configs/single_gpu.yaml}
OUT_ROOT=${OUT_ROOT:-out}                                               # checkpoints and logs
RESULTS_FILE=${RESULTS_FILE:-results/results.csv}                       # the results table every task appends to
TASKS=${TASKS:-pos ner nli}
EXTRA_ARGS=${EXTRA_ARGS:-}            # every step, e.g. "--bf16" or, for a test, "--max_steps 5 --use_cpu"
REALIGN_ARGS=${REALIGN_ARGS:-}        # run_realign.py only, e.g. "--parallel_data_dir data/parallel --gather_negatives"
DOWNSTREAM_ARGS=${DOWNSTREAM_ARGS:-}  # the three tasks, e.g. "--data_dir data/downstream --eval_languages yor,swa"
POS_ARGS=${POS_ARGS:-}
NER_ARGS=${NER_ARGS:-}
NLI_ARGS=${NLI_ARGS:-}
PUSH_TO_HUB=${PUSH_TO_HUB:-}          # a Hub repo id (user/name): upload the realigned checkpoint and its model card

read -r -a extra <<< "$EXTRA_ARGS"
read -r -a realign_extra <<< "$REALIGN_ARGS"
read -r -a downstream_extra <<< "$DOWNSTREAM_ARGS"

if [ -d "$MODEL" ]; then model_slug=$(basename "$MODEL"); else model_slug=${MODEL//\//--}; fi
subset_name=$(basename "$SUBSET"); subset_name=${subset_name%.yaml}; subset_name=${subset_name%.yml}
RUN_DIR="$OUT_ROOT/$model_slug/$subset_name/seed$SEED"
mkdir -p "$RUN_DIR" "$(dirname "$RESULTS_FILE")"

launch() {  # launch LOG SCRIPT ARGS...: one `accelerate launch` per step, its output in LOG (and on the terminal)
  local log=$1; shift
  echo "+ $ACCELERATE launch --config_file $ACCELERATE_CONFIG $*" | tee -a "$log"
  "$ACCELERATE" launch --config_file "$ACCELERATE_CONFIG" "$@" 2>&1 | tee -a "$log"
}

# 1. Realignment (skipped for `none`, and when realign_config.json, written after the checkpoint, is there).
ENCODER=$MODEL
if [ "$subset_name" != none ]; then
  ENCODER=$RUN_DIR/realign
  push=()
  if [ -n "$PUSH_TO_HUB" ]; then push=(--push_to_hub --hub_model_id "$PUSH_TO_HUB"); fi
  if [ -f "$ENCODER/realign_config.json" ] && [ ${#push[@]} -eq 0 ]; then
    echo "Realignment finished earlier: $ENCODER"
  else
    launch "$RUN_DIR/realign.log" "$ROOT/run_realign.py" --subset "$SUBSET" --model_name_or_path "$MODEL" \
      --seed "$SEED" --output_dir "$ENCODER" "${push[@]}" "${extra[@]}" "${realign_extra[@]}"
  fi
fi

# 2. Downstream tasks from that checkpoint (skipped when all_results.json has the task's macro average).
for task in $TASKS; do
  case $task in
    pos) script=run_token_classification.py; task_flag=(--task pos); metric=accuracy; read -r -a task_extra <<< "$POS_ARGS" ;;
    ner) script=run_token_classification.py; task_flag=(--task ner); metric=f1; read -r -a task_extra <<< "$NER_ARGS" ;;
    nli) script=run_xnli.py; task_flag=(); metric=accuracy; read -r -a task_extra <<< "$NLI_ARGS" ;;
    *) echo "Unknown task $task in TASKS (expected pos, ner, nli)" >&2; exit 2 ;;
  esac
  task_dir=$RUN_DIR/$task
  if [ -f "$task_dir/all_results.json" ] && grep -q "\"eval_avg_$metric\"" "$task_dir/all_results.json"; then
    echo "$task finished earlier: $task_dir"
    continue
  fi
  launch "$RUN_DIR/$task.log" "$ROOT/$script" "${task_flag[@]}" --model_name_or_path "$ENCODER" --seed "$SEED" \
    --output_dir "$task_dir" --results_file "$RESULTS_FILE" "${extra[@]}" "${downstream_extra[@]}" "${task_extra[@]}"
done

echo "Done: $RUN_DIR (results appended to $RESULTS_FILE; summarise with: python collect_results.py $(dirname "$RESULTS_FILE") --out report/)"
