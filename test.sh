#!/usr/bin/env bash
# Run the format and lint checks, then the test suite (sets up .venv first). Extra arguments go to pytest, e.g.
# `bash test.sh -k realign -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash setup_env.sh
if ! .venv/bin/ruff format --check .; then
  echo "test.sh: files are not formatted; run \`.venv/bin/ruff format .\` and commit the result." >&2
  exit 1
fi
if ! .venv/bin/ruff check .; then
  echo "test.sh: lint findings above; run \`.venv/bin/ruff check --fix .\` and fix the rest by hand." >&2
  exit 1
fi
exec .venv/bin/python -m pytest -q "$@"
