#!/usr/bin/env bash
# Realign one model on one language subset, then fine-tune POS, NER and NLI from that checkpoint; every task appends
# its rows to the results table (RESULTS_FILE). Finished steps are skipped when the recipe is run again with the same
# arguments; a step finished with other arguments is an error (its folder holds another run), and the tasks of a
# realignment that was done again are fine-tuned again from the new checkpoint.
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

# A finished step records its arguments, one per line, in DIR/recipe_step.args (a task also records, in
# DIR/recipe_step.encoder, which realignment it started from): finished work is keyed by what made it.
step_state() {  # step_state DIR ARGS...: done (finished with these arguments), todo, or conflict (other arguments)
  local dir=$1; shift
  if [ ! -f "$dir/recipe_step.args" ]; then echo todo
  elif [ "$(cat "$dir/recipe_step.args")" = "$(printf '%s\n' "$@")" ]; then echo done
  else echo conflict; fi
}
refuse_conflict() {  # refuse_conflict DIR ARGS...
  local dir=$1; shift
  { echo "$dir was finished with other arguments:"
    echo "  before: $(tr '\n' ' ' < "$dir/recipe_step.args")"
    echo "  now:    $*"
    echo "Use another OUT_ROOT, or delete $dir to run it again with the new arguments."; } >&2
  exit 1
}
mark_done() {  # mark_done DIR ARGS...
  local dir=$1; shift
  printf '%s\n' "$@" > "$dir/recipe_step.args"
}

# 1. Realignment (skipped for `none`, and when it finished with the same arguments: realign_config.json, written
#    after the checkpoint, is there). Each realignment run gets an id, which its tasks record.
ENCODER=$MODEL
ENCODER_RUN="base model $MODEL"
if [ "$subset_name" != none ]; then
  ENCODER=$RUN_DIR/realign
  push=()
  if [ -n "$PUSH_TO_HUB" ]; then push=(--push_to_hub --hub_model_id "$PUSH_TO_HUB"); fi
  realign_args=(--subset "$SUBSET" --model_name_or_path "$MODEL" --seed "$SEED" --output_dir "$ENCODER"
    "${extra[@]}" "${realign_extra[@]}")
  state=$(step_state "$ENCODER" "${realign_args[@]}")
  if [ "$state" = conflict ]; then refuse_conflict "$ENCODER" "${realign_args[@]}"; fi
  if [ "$state" = done ] && [ ! -f "$ENCODER/realign_config.json" ]; then state=todo; fi
  if [ "$state" = done ] && [ ${#push[@]} -eq 0 ]; then
    echo "Realignment finished earlier: $ENCODER"
  else
    launch "$RUN_DIR/realign.log" "$ROOT/run_realign.py" "${realign_args[@]}" "${push[@]}"
    if [ "$state" != done ]; then  # a new realignment (not an upload of a finished one)
      date -u +%Y-%m-%dT%H:%M:%S.%NZ > "$ENCODER/recipe_step.run"
      mark_done "$ENCODER" "${realign_args[@]}"
    fi
  fi
  ENCODER_RUN="realignment $(cat "$ENCODER/recipe_step.run" 2>/dev/null || echo unknown)"
fi

# 2. Downstream tasks from that checkpoint (skipped when they finished with the same arguments from this realignment
#    and all_results.json has the task's macro average).
for task in $TASKS; do
  case $task in
    pos) script=run_token_classification.py; task_flag=(--task pos); metric=accuracy; read -r -a task_extra <<< "$POS_ARGS" ;;
    ner) script=run_token_classification.py; task_flag=(--task ner); metric=f1; read -r -a task_extra <<< "$NER_ARGS" ;;
    nli) script=run_xnli.py; task_flag=(); metric=accuracy; read -r -a task_extra <<< "$NLI_ARGS" ;;
    *) echo "Unknown task $task in TASKS (expected pos, ner, nli)" >&2; exit 2 ;;
  esac
  task_dir=$RUN_DIR/$task
  task_args=("${task_flag[@]}" --model_name_or_path "$ENCODER" --seed "$SEED" --output_dir "$task_dir"
    --results_file "$RESULTS_FILE" "${extra[@]}" "${downstream_extra[@]}" "${task_extra[@]}")
  state=$(step_state "$task_dir" "${task_args[@]}")
  if [ "$state" = conflict ]; then refuse_conflict "$task_dir" "${task_args[@]}"; fi
  if [ "$state" = done ] && [ "$(cat "$task_dir/recipe_step.encoder" 2>/dev/null)" != "$ENCODER_RUN" ]; then
    echo "$task was fine-tuned from an earlier realignment: $task_dir is removed and $task runs again"
    rm -rf "$task_dir"
    state=todo
  fi
  if [ "$state" = done ] && grep -q "\"eval_avg_$metric\"" "$task_dir/all_results.json" 2>/dev/null; then
    echo "$task finished earlier: $task_dir"
    continue
  fi
  launch "$RUN_DIR/$task.log" "$ROOT/$script" "${task_args[@]}"
  printf '%s\n' "$ENCODER_RUN" > "$task_dir/recipe_step.encoder"
  mark_done "$task_dir" "${task_args[@]}"
done

echo "Done: $RUN_DIR (results appended to $RESULTS_FILE; summarise with: python collect_results.py $(dirname "$RESULTS_FILE") --out report/)"
