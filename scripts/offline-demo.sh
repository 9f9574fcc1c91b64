#!/usr/bin/env bash
# Set up .venv if needed, then run the ECOS round offline, step by step, on generated data.
# Every step is one command whose output is a file (see docs/offline.md). Work folder: $1 or runs/offline-demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
W=${1:-runs/offline-demo}
B=.venv/bin
mkdir -p "$W"
echo "== 1. data: six digit domains; the pool, and per domain a device with local + test images"
[ -f "$W/data/dataset.json" ] || $B/ecos-make-digits "$W/data" --per-domain 1500 --device-local 300 --device-test 300
echo "== 2. cloud: train the encoder on the pool, export it to ONNX"
[ -f "$W/encoder.onnx" ] || $B/ecos-cloud train-encoder "$W/data/pool" --out "$W/encoder.onnx"
echo "== 3. cloud: encode and cluster the pool, write the probe (centroids) for devices, signed with the cloud's key"
$B/ecos-cloud keys show --keys-dir "$W/keys" >/dev/null   # makes the key pair on first use
$B/ecos-cloud index "$W/data/pool" --encoder "$W/encoder.onnx" --out "$W/pool.index.npz" --probe "$W/round.probe" \
  --cache-dir "$W/cache" --signing-key "$W/keys/cloud_ed25519.pem"
echo "== 4. device 'street': check the probe's signature, score its private folder; only noisy counts leave it (epsilon 0.58)"
rm -f "$W/street.ledger.json"*
$B/ecos-device score "$W/data/devices/street/local" --encoder "$W/encoder.onnx" --probe "$W/round.probe" \
  --out "$W/street.scores" --ledger "$W/street.ledger.json" --device-id street --epsilon 0.58 \
  --trusted-key "$W/keys/cloud_ed25519.pub.pem"
echo "== 5. cloud: sample a proxy set of 1000 images with ECOS, and the baselines"
for m in ecos random kcenter; do
  $B/ecos-cloud sample --index "$W/pool.index.npz" --scores "$W/street.scores" --method $m --budget 1000 --out "$W/selection-$m.csv"
done
echo "== ledger of device 'street'"
$B/ecos-device ledger "$W/street.ledger.json"
