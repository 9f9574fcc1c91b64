#!/usr/bin/env bash
# Create (or update) the project's environment in .venv/ at the repository root.
# Idempotent: re-installs only when a pyproject.toml changed since the last successful set-up.
# Two distributions, both editable: ecos-fleet-device (packaging/device: device_sdk/, ecos-device) and
# ecos-fleet (pyproject.toml: cloud/, models/, the cloud commands), which depends on the first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${ECOS_EXTRAS:-cloud,broker,test,bench,parquet}
stamp=.venv/.ecos-setup
want="$(cat pyproject.toml packaging/device/pyproject.toml | sha256sum | cut -c1-16) $EXTRAS"
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up .venv (extras: $EXTRAS); the first time this installs PyTorch and takes a few minutes" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch/torchvision pinned to the versions known to work together here (see docs/toolchain.md).
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
# The distribution was called "ecos" before (PyPI's name of an unrelated solver): drop that editable install
# and its build metadata (from /, so that pip does not take ./ecos.egg-info for the installed one).
root=$PWD
old_ecos=$(cd / && "$root/.venv/bin/python" -m pip show ecos 2>/dev/null || true)
if grep -qxF "Editable project location: $root" <<<"$old_ecos"; then
  (cd / && "$root/.venv/bin/python" -m pip uninstall -q -y ecos)
fi
rm -rf ecos.egg-info
.venv/bin/python -m pip install -q -e ./packaging/device -e ".[$EXTRAS]"
# Best effort: the real-data digits benchmark (ecos-make-digits --source real) reads two Debian packages.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1; then
  missing=""
  for pkg in opencv-doc dataset-fashion-mnist; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
  done
  if [ -n "$missing" ]; then
    echo "the real-data digits benchmark (--source real) needs:$missing; installing with apt-get" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >/dev/null 2>&1 \
      || echo "apt-get could not install$missing; ecos-make-digits --source real will say what is missing" >&2
  fi
fi
echo "$want" > "$stamp"
