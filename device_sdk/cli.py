"""``ecos-device``: the device's side of ECOS from the command line (offline mode).

    ecos-device score FOLDER --encoder encoder.onnx --probe round.probe --out round.scores \\
        --ledger ledger.json --epsilon 0.58
    ecos-device ledger ledger.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Optional, Sequence

from . import __version__
from .clikit import add_common, run_cli, setup_logging
from .device import answer_probe
from .fsutil import atomic_write_bytes
from .imagefolder import scan_image_folder
from .messages import Probe
from .privacy import DEFAULT_BUDGET_DELTA, DEFAULT_BUDGET_EPSILON, PrivacyLedger
from .runtime import load_model
from .scoring import check_compatible, encode_items
from .wire import read_file

LOG = logging.getLogger("ecos.device")


def cmd_score(args: argparse.Namespace) -> int:
    probe = Probe.from_envelope(read_file(args.probe, "probe"), args.probe)
    model = load_model(args.encoder, threads=args.threads)
    check_compatible(probe, model)  # fail before reading a single private image
    ledger = PrivacyLedger.open(args.ledger, device_id=args.device_id, budget_epsilon=args.budget_epsilon,
                                budget_delta=args.budget_delta)
    items = scan_image_folder(args.folder)
    t0, last = time.monotonic(), [time.monotonic()]

    def progress(done: int, total: int) -> None:
        if time.monotonic() - last[0] > 5 or done == total:
            last[0] = time.monotonic()
            LOG.info("encoding local images: %d/%d", done, total)

    features = encode_items(model, items, args.batch_size, progress)
    scores, result = answer_probe(probe, model, features, ledger, epsilon=args.epsilon, sigma=args.sigma,
                                  commit=lambda payload: atomic_write_bytes(args.out, payload))
    budget_eps, delta = ledger.budget
    verb = "replayed earlier answer to" if result.repeated else "answered"
    print(f"{verb} probe {probe.probe_id[:12]} with {scores.k} noisy scores (sigma={scores.sigma:.3f}) "
          f"from {len(items)} images in {time.monotonic() - t0:.1f}s -> {args.out}")
    print(f"privacy: charged epsilon {result.charged_epsilon:.4f}; spent {result.spent_epsilon:.4f} of {budget_eps:g} "
          f"at delta={delta:g} ({ledger.accountant} accountant)")
    return 0


def cmd_ledger(args: argparse.Namespace) -> int:
    ledger = PrivacyLedger(args.ledger)
    summary = ledger.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            print(f"{key:>20}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecos-device", description="ECOS device side: score a local image folder against a cloud probe, privately.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    p = sub.add_parser("score", help="answer a probe with noisy centroid-coverage scores of a local image folder",
                       description="Encode FOLDER with the encoder, count votes per probe centroid, add Gaussian noise "
                                   "calibrated to --epsilon (or --sigma), charge the privacy ledger, write the scores message.")
    p.add_argument("folder", help="local image folder (any layout; labels are not used)")
    p.add_argument("--encoder", required=True, help="ONNX encoder artifact (must be the one the probe was made for)")
    p.add_argument("--probe", required=True, help="probe message file from 'ecos-cloud index'")
    p.add_argument("--out", required=True, help="where to write the scores message")
    p.add_argument("--ledger", required=True, help="this device's privacy ledger (JSON; created on first use)")
    noise = p.add_mutually_exclusive_group(required=True)
    noise.add_argument("--epsilon", type=float, help="privacy cost of this release (epsilon at the ledger's delta)")
    noise.add_argument("--sigma", type=float, help="noise standard deviation instead of --epsilon")
    p.add_argument("--device-id", help="device id recorded in a new ledger (default: random)")
    p.add_argument("--budget-epsilon", type=float, help=f"total epsilon budget of a new ledger (default {DEFAULT_BUDGET_EPSILON})")
    p.add_argument("--budget-delta", type=float, help=f"delta of a new ledger (default {DEFAULT_BUDGET_DELTA})")
    p.add_argument("--threads", type=int, default=1, help="inference threads (default 1)")
    p.add_argument("--batch-size", type=int, default=256, help="images per inference batch (default 256)")
    add_common(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("ledger", help="show a privacy ledger: budget, spent, remaining, releases")
    p.add_argument("ledger", help="ledger file")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_common(p)
    p.set_defaults(func=cmd_ledger)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(build_parser(), argv, lambda a: setup_logging(a.verbose, a.quiet))


if __name__ == "__main__":
    raise SystemExit(main())
