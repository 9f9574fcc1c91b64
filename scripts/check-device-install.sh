#!/usr/bin/env bash
# Install the device-only wheel (ecos-fleet-device) into a clean venv, as a device would, and use it.
# Not part of the test suite: it needs the package index (numpy, Pillow, paho-mqtt, cryptography, onnxruntime).
#
#   scripts/check-device-install.sh [EXTRA]      EXTRA: onnx (default); litert needs a .tflite encoder
#
# 1. builds the wheel from a clean copy of packaging/device + device_sdk (pip wheel --no-deps);
# 2. with the cloud side (.venv, scripts/setup.sh): a small generated pool, a small encoder, a signed probe;
# 3. python3 -m venv in a temp folder, pip install 'ecos_fleet_device-*.whl[EXTRA]' (timed), pip check;
# 4. ecos-device --help, a real `ecos-device score` of a device folder against that encoder and probe;
# 5. asserts that torch, torchvision, cloud and models are not importable there, and only ecos-device is installed;
# prints the wheel's size, the venv's size and the install time. Work folder: $ECOS_CHECK_DIR or a temp folder
# (removed at the end unless ECOS_KEEP=1). Python: $PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
EXTRA=${1:-onnx}
PY=${PYTHON:-python3}
W=${ECOS_CHECK_DIR:-$(mktemp -d /tmp/ecos-device-check.XXXXXX)}
mkdir -p "$W"
cleanup() { [ "${ECOS_KEEP:-0}" = 1 ] || [ -n "${ECOS_CHECK_DIR:-}" ] || rm -rf "$W"; }
trap cleanup EXIT
say() { printf '== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

say "1. build the device wheel (clean copy of packaging/device and device_sdk)"
rm -rf "$W/src" "$W/dist" && mkdir -p "$W/src/packaging" "$W/dist"
cp -r packaging/device "$W/src/packaging/device"
cp -r device_sdk "$W/src/device_sdk"
find "$W/src" \( -name __pycache__ -o -name build -o -name '*.egg-info' \) -prune -exec rm -rf {} +
has_setuptools='import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)'
if [ -x .venv/bin/python ] && .venv/bin/python -c "$has_setuptools" 2>/dev/null; then
  .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation "$W/src/packaging/device" -w "$W/dist"
else
  "$PY" -m pip wheel -q --no-deps "$W/src/packaging/device" -w "$W/dist"
fi
WHEEL=$(ls "$W"/dist/ecos_fleet_device-*.whl)
echo "$(basename "$WHEEL"): $(du -k "$WHEEL" | cut -f1) KiB"

say "2. cloud side (.venv): a small pool, a small encoder, a signed probe"
[ -x .venv/bin/ecos-cloud ] || scripts/setup.sh
B=$ROOT/.venv/bin
if [ ! -f "$W/data/dataset.json" ]; then
  $B/ecos-make-digits "$W/data" --per-domain 60 --domains handwritten,printed,lcd --device-local 40 --device-test 10 \
    --workers 1 -q
fi
[ -f "$W/encoder.onnx" ] || $B/ecos-cloud train-encoder "$W/data/pool" --out "$W/encoder.onnx" --feature-dim 16 \
  --width 8 --epochs 2 --threads 1 -q
$B/ecos-cloud keys show --keys-dir "$W/keys" >/dev/null
$B/ecos-cloud index "$W/data/pool" --encoder "$W/encoder.onnx" --out "$W/pool.index.npz" --probe "$W/round.probe" \
  --k 8 --iters 5 --threads 1 --signing-key "$W/keys/cloud_ed25519.pem" -q

say "3. clean venv, pip install '$(basename "$WHEEL")[$EXTRA]' from the package index"
rm -rf "$W/venv"
"$PY" -m venv "$W/venv"
V=$W/venv/bin
start=$(date +%s%N)
$V/python -m pip install -q "$WHEEL[$EXTRA]"
ms=$(( ($(date +%s%N) - start) / 1000000 ))
$V/python -m pip check
$V/python -m pip list --format=freeze 2>/dev/null | sed 's/^/   /'

say "4. ecos-device --help; ecos-device score (outside the checkout, so nothing is imported from it)"
cd "$W"
$V/ecos-device --help | head -3
$V/ecos-device --version
$V/ecos-device score data/devices/lcd/local --encoder encoder.onnx --probe round.probe --out lcd.scores \
  --ledger lcd.ledger.json --device-id lcd --epsilon 0.58 --trusted-key keys/cloud_ed25519.pub.pem
[ -s lcd.scores ] || fail "no scores written"
$V/ecos-device ledger lcd.ledger.json

say "5. a device install: no torch, no cloud code, no cloud command"
$V/python - <<'EOF'
import importlib.util, sys
bad = [m for m in ("torch", "torchvision", "cloud", "models", "onnx", "sklearn") if importlib.util.find_spec(m)]
sys.exit(f"importable in the device venv: {bad}" if bad else 0)
EOF
! $V/python -c 'import torch' 2>/dev/null || fail "torch is importable"
cmds=$(cd "$V" && ls ecos-* | tr '\n' ' ')
[ "$cmds" = "ecos-device " ] || fail "commands installed: $cmds"
cd "$ROOT"

say "result"
echo "wheel: $(basename "$WHEEL"), $(du -k "$WHEEL" | cut -f1) KiB"
echo "pip install of the wheel with [$EXTRA], clean venv: $((ms / 1000)).$((ms % 1000 / 100)) s"
echo "venv: $(du -sh "$W/venv" | cut -f1) ($(du -sk "$W/venv" | cut -f1) KiB, python $($V/python -V | cut -d" " -f2))"
echo "OK"
