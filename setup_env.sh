#!/usr/bin/env bash
# Create or update the project's virtual environment in .venv (idempotent: a re-run with unchanged requirements
# installs nothing). torch is installed first and pinned (TORCH_SPEC), because an unpinned torch pulls a multi-GB CUDA
# build; on a GPU machine set TORCH_SPEC to the build matching your CUDA, or pre-install torch in the venv.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "Creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
  fi
  "$VENV/bin/python" -m pip install --quiet -r requirements-dev.txt
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
