#!/usr/bin/env bash
# Fine-tune every model on English UD POS from a local --data_dir and evaluate it zero-shot on every language the
# folder holds (UDPOS and MasakhaPOS test files), with the same settings for every model and seed; then write one
# table: per-language accuracy, the mean over the TRAINED languages and over the others, per model, mean over seeds.
#
#   DATA_DIR=data/downstream bash recipes/downstream_real_data.sh models/multilingual-e5-small
#   DATA_DIR=data/downstream SEEDS="17 23" TRAINED=subsets/quickstart_udhr.yaml \
#       bash recipes/downstream_real_data.sh base=models/multilingual-e5-small realigned=out/quickstart/seed17
#
# Arguments: one MODEL or LABEL=MODEL per model (a folder or Hub id; the label, by default the folder's name, names
# its column in the table and its folder under OUT_ROOT).
# DATA_DIR layout (run_token_classification.py --data_dir): udpos/en/train.conllu (or a UD treebank's own
# udpos/en/en_lines-ud-train.conllu), udpos/<config>/test.conllu (udpos/fr/fr_gsd-ud-test.conllu), and
# masakhapos/<lang>/test.txt as in github.com/masakhane-io/masakhane-pos; languages without a file are skipped.
# Outputs: OUT_ROOT/<label>/seed<seed>/ (one run_token_classification.py run each, its log beside it; the fine-tuned
# weights are removed once the run is scored unless KEEP_MODELS=1) and OUT_ROOT/table.md, OUT_ROOT/table.csv.
# A finished run is skipped when the recipe is run again; a different DATA_DIR, TRAIN_ARGS, EVAL_LANGUAGES or
# EXTRA_ARGS in the same OUT_ROOT is refused (use a new OUT_ROOT).
set -euo pipefail

if [ $# -eq 0 ]; then
  echo "usage: DATA_DIR=DIR bash recipes/downstream_real_data.sh [LABEL=]MODEL [[LABEL=]MODEL ...]" >&2
  exit 2
fi
DATA_DIR=${DATA_DIR:?set DATA_DIR to the --data_dir folder (see the header of this file)}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
OUT_ROOT=${OUT_ROOT:-out/downstream_real_data}
SEEDS=${SEEDS:-17}
TRAINED=${TRAINED:-}                      # the languages realigned on: a subset YAML / name or codes (yor,wol)
EVAL_LANGUAGES=${EVAL_LANGUAGES:-paper}   # every UDPOS + MasakhaPOS language; those without a file are skipped
# The same for every model, sized for CPU: 2000 English UD sentences, two epochs (126 steps), the first 100 sentences
# of every test set (scored up to 512 tokens, so no word is cut off), length-grouped batches of 32 with the paper's
# linear schedule and 10 % warm-up, first-sub-word labelling. The learning rate is 1e-4 rather than the paper's 2e-5:
# with 126 steps instead of the paper's thousands, 5e-5 and one epoch left multilingual-e5-small at 61 % in English;
# these settings reach 87-89 %. Measured (docs/real_data.md): one run of multilingual-e5-small takes 7.5-10 minutes on
# 2 CPU cores shared with one other job (OMP_NUM_THREADS=1 each; two jobs with the default thread count each ran
# several times slower).
DEFAULT_TRAIN_ARGS="--max_train_samples 2000 --num_train_epochs 2 --learning_rate 1e-4 --max_seq_length 128"
DEFAULT_TRAIN_ARGS+=" --eval_max_seq_length 512 --max_eval_samples 100 --per_device_train_batch_size 32"
DEFAULT_TRAIN_ARGS+=" --per_device_eval_batch_size 64 --train_sampling_strategy group_by_length --save_steps 100000"
DEFAULT_TRAIN_ARGS+=" --logging_steps 10"
TRAIN_ARGS=${TRAIN_ARGS:-$DEFAULT_TRAIN_ARGS}
EXTRA_ARGS=${EXTRA_ARGS:---use_cpu}       # anything else, e.g. "--bf16" on a GPU, or "--max_steps 5" for a test
KEEP_MODELS=${KEEP_MODELS:-0}             # 1: keep every fine-tuned model (about 470 MB each for e5-small)

read -r -a train_args <<< "$TRAIN_ARGS"
read -r -a extra_args <<< "$EXTRA_ARGS"
mkdir -p "$OUT_ROOT"

# Finished work is keyed by its settings: refuse to mix runs made with other settings in one table.
settings="data_dir=$(cd "$DATA_DIR" && pwd)
train_args=$TRAIN_ARGS
eval_languages=$EVAL_LANGUAGES
extra_args=$EXTRA_ARGS"
if [ -f "$OUT_ROOT/recipe_settings.txt" ]; then
  if [ "$(cat "$OUT_ROOT/recipe_settings.txt")" != "$settings" ]; then
    echo "$OUT_ROOT holds runs made with other settings:" >&2
    diff <(cat "$OUT_ROOT/recipe_settings.txt") <(echo "$settings") >&2 || true
    echo "Use a new OUT_ROOT, or delete $OUT_ROOT to start over." >&2
    exit 2
  fi
else
  echo "$settings" > "$OUT_ROOT/recipe_settings.txt"
fi

labels=(); models=()
for spec in "$@"; do  # every label is checked before anything runs
  if [[ "$spec" == *=* ]]; then label=${spec%%=*}; model=${spec#*=}; else model=$spec; label=$(basename "$model"); fi
  if [ -d "$model" ]; then model=$(cd "$model" && pwd); fi
  for seen in "${labels[@]:-}"; do
    if [ "$seen" = "$label" ]; then echo "Two models are labelled $label: name them LABEL=MODEL." >&2; exit 2; fi
  done
  if [ -f "$OUT_ROOT/$label/model.txt" ] && [ "$(cat "$OUT_ROOT/$label/model.txt")" != "$model" ]; then
    echo "$OUT_ROOT/$label holds runs of $(cat "$OUT_ROOT/$label/model.txt"), not $model: use another label." >&2
    exit 2
  fi
  labels+=("$label"); models+=("$model")
done

for i in "${!labels[@]}"; do
  label=${labels[$i]}; model=${models[$i]}
  mkdir -p "$OUT_ROOT/$label"
  echo "$model" > "$OUT_ROOT/$label/model.txt"
  for seed in $SEEDS; do
    run_dir=$OUT_ROOT/$label/seed$seed
    if [ -f "$run_dir/all_results.json" ] && grep -q '"eval_avg_accuracy"' "$run_dir/all_results.json"; then
      echo "$label seed $seed finished earlier: $run_dir"
      continue
    fi
    mkdir -p "$run_dir"
    echo "+ $label seed $seed -> $run_dir"
    start=$(date +%s)
    "$PYTHON" "$ROOT/run_token_classification.py" --task pos --model_name_or_path "$model" --data_dir "$DATA_DIR" \
      --eval_languages "$EVAL_LANGUAGES" --seed "$seed" --output_dir "$run_dir" \
      --results_file "$OUT_ROOT/results.csv" \
      "${train_args[@]}" "${extra_args[@]}" > "$run_dir.log" 2>&1 || {
        echo "$label seed $seed failed; the end of $run_dir.log:" >&2; tail -n 30 "$run_dir.log" >&2; exit 1; }
    echo "  done in $(( $(date +%s) - start )) s"
    if [ "$KEEP_MODELS" != 1 ]; then rm -rf "$run_dir"/model.safetensors "$run_dir"/checkpoint-*; fi
  done
done

"$PYTHON" "$ROOT/recipes/downstream_table.py" --out_root "$OUT_ROOT" --models "${labels[@]}" --trained "$TRAINED" \
  --output "$OUT_ROOT/table"
echo "Table: $OUT_ROOT/table.md (and table.csv)"
