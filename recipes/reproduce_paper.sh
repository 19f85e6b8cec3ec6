#!/usr/bin/env bash
# The paper's grid: for every (model, subset, seed), realign once and fine-tune POS, NER and NLI from that checkpoint;
# finished cells are skipped, so the command can be re-run after a crash or to extend the grid.
#
#   bash recipes/reproduce_paper.sh --models xlm-roberta-base,bert-base-multilingual-cased --subsets main \
#       --seeds 17,23,42,66 --dry-run --seconds_per_step realign=0.05,pos=0.08,ner=0.08,nli=0.06
#   bash recipes/reproduce_paper.sh --models xlm-roberta-base,bert-base-multilingual-cased --subsets main \
#       --seeds 17,23,42,66
#   bash recipes/reproduce_paper.sh --subsets ablation ...      # Tables 9/11 and Table 1; --subsets all for both
#   bash recipes/reproduce_paper.sh --subsets uriel_5,random_5,none --cell-index 3   # one (model, subset, seed)
#   python collect_results.py results/grid --out report/
#
# Environment (flags override): ACCELERATE_CONFIG, OUT_ROOT (out/grid), RESULTS_DIR (results/grid), EXTRA_ARGS,
# REALIGN_ARGS, DOWNSTREAM_ARGS, POS_ARGS, NER_ARGS, NLI_ARGS, ACCELERATE, PYTHON. `--help` lists every flag; the
# grid logic is in recipes/grid.py.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
exec "$PYTHON" "$ROOT/recipes/grid.py" "$@"
