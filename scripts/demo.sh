#!/usr/bin/env bash
# The main job: set up .venv if needed, then run the over-the-air ECOS demo (ecos-demo):
# generated data, encoder, pool index, an MQTT broker (the one given with --broker HOST:PORT,
# else Mosquitto if installed, else a pure-Python broker), the cloud daemon and three simulated
# devices; one full round each; a table, report.json and report.png in the output folder.
# Arguments go to ecos-demo (default output folder: runs/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
args=("$@")
[[ " ${args[*]-} " == *" --out "* ]] || args+=(--out runs/demo)
exec .venv/bin/ecos-demo "${args[@]}"
