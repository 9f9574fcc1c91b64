"""``ecos-cloud``: the cloud's side of ECOS from the command line (offline mode).

    ecos-cloud train-encoder POOL --out encoder.onnx     (and encoder.tflite, parity-checked)
    ecos-cloud index POOL --encoder encoder.onnx --out pool.index.npz --probe round.probe
    ecos-cloud sample --index pool.index.npz --scores dev1.scores [...] --method ecos --budget 1000 --out sel.csv
    ecos-cloud train-teacher POOL --out teacher.safetensors
    ecos-cloud distill --selection sel.csv --teacher teacher.safetensors --out-dir student/ [--eval FOLDER]
    ecos-cloud export student/student.safetensors --selection sel.csv --out-dir student/

and the daemon (online mode, over MQTT; see docs/operations.md):

    ecos-cloud serve --config cloud.toml
    ecos-cloud round --config cloud.toml DEVICE [DEVICE ...] [--fleet] [--wait SECONDS]
    ecos-cloud status --config cloud.toml
    ecos-cloud keys show|next|promote|update|revoke [KEY_ID] --config cloud.toml   (signing keys, docs/security.md)

and the broker's security (TLS, one identity per device, topic ACL; see cloud/security/brokerconf.py):

    ecos-cloud broker-config --dir ecos-broker --mode certificate --hostname broker.example.com
    ecos-cloud enroll DEVICE_ID --dir ecos-broker [--rotate | --revoke]
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from cloud.cli import daemon, keys, models, pool
from cloud.labelling.cli import add_commands as add_labelling_commands
from cloud.security.brokerconf import add_commands as add_broker_commands
from device_sdk.clikit import add_common, run_cli, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecos-cloud",
        description=(
            "ECOS cloud side: encoder, pool index and probe, proxy-set sampling, teacher/student training "
            "and export, and the MQTT daemon."
        ),
    )
    sub = parser.add_subparsers(metavar="COMMAND")

    pool.add_commands(sub)
    daemon._add_daemon_commands(sub)
    models._add_model_commands(sub)
    keys._add_key_commands(sub)
    add_broker_commands(sub, add_common)
    add_labelling_commands(sub, add_common)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(build_parser(), argv, lambda a: setup_logging(a.verbose, a.quiet))
