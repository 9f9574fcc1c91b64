#!/usr/bin/env bash
# Create (or update) the project's environment in .venv/ at the repository root.
# Idempotent: re-installs only when pyproject.toml changed since the last successful set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${ECOS_EXTRAS:-cloud,broker,test}
stamp=.venv/.ecos-setup
want="$(sha256sum pyproject.toml | cut -c1-16) $EXTRAS"
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up .venv (extras: $EXTRAS); the first time this installs PyTorch and takes a few minutes" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch/torchvision pinned to the versions known to work together here (see docs/install.md).
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[$EXTRAS]"
echo "$want" > "$stamp"
