#!/usr/bin/env bash
# Run the test suite (sets up .venv first). Extra arguments go to pytest, e.g. `bash test.sh -k realign -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
