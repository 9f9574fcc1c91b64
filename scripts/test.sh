#!/usr/bin/env bash
# Set up .venv if needed, then lint (ruff check + ruff format --check) and run the whole test suite.
# Extra arguments go to pytest. Both run even if the lint fails; the exit status is non-zero if either did.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
lint=0
.venv/bin/ruff check --quiet . || lint=$?
.venv/bin/ruff format --check --quiet . || lint=$?
[ "$lint" -eq 0 ] || echo "ruff: the tree does not pass 'ruff check' / 'ruff format --check' (see above)" >&2
.venv/bin/python -m pytest -q "$@"
exit "$lint"
