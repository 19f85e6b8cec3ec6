#!/usr/bin/env bash
# Run the paper's grid as a SLURM job array: one array task per (model, subset, seed), i.e. one realignment and the
# POS, NER and NLI fine-tunings that start from it. Finished cells are skipped, so a failed task is re-submitted by
# submitting the same array again (or `--array=<index>`). Give the grid's flags after the script name:
#
#   ARGS="--models xlm-roberta-base,bert-base-multilingual-cased --subsets main --seeds 17,23,42,66"
#   N=$(bash recipes/reproduce_paper.sh $ARGS --count)
#   mkdir -p logs && sbatch --array=0-$((N - 1))%16 recipes/slurm_array.sh $ARGS
#   python collect_results.py results/grid --out report/        # when the array is done (or at any time)
#
# Every task writes its own results CSV, so concurrent tasks never write the same file. Adapt the #SBATCH lines
# (partition, account, time) to your cluster; 4 h fits one realignment and three fine-tunings of a base model on one
# recent GPU with room to spare.
#SBATCH --job-name=realign-grid
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
: "${SLURM_ARRAY_TASK_ID:?submit this script with sbatch --array=0-(N-1), N from reproduce_paper.sh --count}"
exec bash recipes/reproduce_paper.sh "$@" --cell-index "$SLURM_ARRAY_TASK_ID"
