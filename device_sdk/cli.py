"""``ecos-device``: the device's side of ECOS from the command line (offline mode).

    ecos-device score FOLDER --encoder encoder.onnx --probe round.probe --out round.scores \\
        --ledger ledger.json --epsilon 0.58 [--trusted-key cloud.pub.pem]
    ecos-device ledger ledger.json
    ecos-device keys --config device.toml [--apply update.keys]
    ecos-device run --config device.toml
    ecos-device doctor|status|models --config device.toml [--rollback classifier]
    ecos-device predict student.int8.tflite (IMAGE... | --folder DIR) [--runtime auto|onnxruntime|litert|tflite-runtime]

Over 400 lines on purpose: the argument definitions of every ``ecos-device`` command, whose
help texts are most of it; the work is done in the modules each command calls.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Optional, Sequence

# Before numpy loads (the imports below): one BLAS thread unless the environment asks for more. The
# device's matrix products are tiny (local features x K centroids); OpenBLAS's thread pool made one of
# them 100x slower on a busy 2-core machine and its spinning threads compete with onnxruntime's
# (benchmarks/bench_device_speed.py). Same results: OpenBLAS splits rows, not sums, between threads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from device_sdk import __version__  # noqa: E402
from device_sdk.clikit import add_common, add_trust_arguments, positive_int, run_cli, setup_logging  # noqa: E402
from device_sdk.device import answer_probe, check_probe_conflict  # noqa: E402
from device_sdk.errors import InputError  # noqa: E402
from device_sdk.fsutil import atomic_write_bytes  # noqa: E402
from device_sdk.imagefolder import scan_image_folder  # noqa: E402
from device_sdk.labelling_cli import add_command as add_label_vote_command  # noqa: E402
from device_sdk.privacy.accounting import DEFAULT_BUDGET_DELTA, DEFAULT_BUDGET_EPSILON  # noqa: E402
from device_sdk.privacy.ledger import PrivacyLedger  # noqa: E402
from device_sdk.protocol import check_probe  # noqa: E402
from device_sdk.protocol.envelope import read_file  # noqa: E402
from device_sdk.protocol.round import Probe  # noqa: E402
from device_sdk.runtime import load_model  # noqa: E402
from device_sdk.scoring import check_compatible, encode_items, log_unreadable  # noqa: E402
from device_sdk.trust import DeviceTrust, read_key_update, trust_from_settings, verify_probe  # noqa: E402

LOG = logging.getLogger("ecos.device")


def _score_trust(args: argparse.Namespace) -> Optional[DeviceTrust]:
    """The trust store of an offline ``score``: the ``--trusted-key`` files, or None (not verified)."""
    if args.trusted_key:
        return DeviceTrust.from_files(args.trusted_key, args.revoked_key or ())
    if args.revoked_key:
        from device_sdk.errors import UsageError

        raise UsageError("--revoked-key needs --trusted-key (the keys to trust)")
    return None


def cmd_score(args: argparse.Namespace) -> int:
    probe = check_probe(Probe.from_envelope(read_file(args.probe, "probe"), args.probe), args.probe)
    trust = _score_trust(args)
    signer = verify_probe(probe, trust, args.accept_unsigned)  # before the encoder, an image or the ledger
    if trust is None:
        LOG.warning("probe %s not verified: no --trusted-key given (offline use only)", probe.probe_id[:12])
    elif signer is None:
        LOG.warning("probe %s is unsigned and accepted (--accept-unsigned)", probe.probe_id[:12])
    model = load_model(args.encoder, threads=args.threads)
    check_compatible(probe, model)  # fail before reading a single private image
    ledger = PrivacyLedger.open(
        args.ledger, device_id=args.device_id, budget_epsilon=args.budget_epsilon, budget_delta=args.budget_delta
    )
    check_probe_conflict(probe, ledger)
    items = scan_image_folder(args.folder)
    t0, last = time.monotonic(), [time.monotonic()]

    def progress(done: int, total: int) -> None:
        if time.monotonic() - last[0] > 5 or done == total:
            last[0] = time.monotonic()
            LOG.info("encoding local images: %d/%d", done, total)

    unreadable: list = []
    features = encode_items(model, items, args.batch_size, progress, unreadable)
    log_unreadable(LOG, args.folder, unreadable)
    if len(features) == 0:
        first = f"; first: {unreadable[0][1]}" if unreadable else ""
        raise InputError(f"{args.folder}: none of its {len(items)} image file(s) is readable{first}")
    scores, result = answer_probe(
        probe,
        model,
        features,
        ledger,
        epsilon=args.epsilon,
        sigma=args.sigma,
        commit=lambda payload: atomic_write_bytes(args.out, payload),
        trust=trust,
        accept_unsigned=args.accept_unsigned,
    )
    budget_eps, delta = ledger.budget
    verb = "replayed earlier answer to" if result.repeated else "answered"
    print(
        f"{verb} probe {probe.probe_id[:12]} with {scores.k} noisy scores (sigma={scores.sigma:.3f}) "
        f"from {len(features)} images"
        + (f" ({len(unreadable)} unreadable skipped)" if unreadable else "")
        + f" in {time.monotonic() - t0:.1f}s -> {args.out}"
    )
    print(
        f"privacy: charged epsilon {result.charged_epsilon:.4f}; spent {result.spent_epsilon:.4f} of {budget_eps:g} "
        f"at delta={delta:g} ({ledger.accountant} accountant)"
    )
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


def cmd_keys(args: argparse.Namespace) -> int:
    """Show the signing keys a configured device trusts; apply a key update file with ``--apply``."""
    from device_sdk.config import load_device_config

    trust = trust_from_settings(load_device_config(args.config).models)
    if args.apply:
        result = trust.apply(read_key_update(args.apply))
        print(
            f"key update {result.serial}: "
            + ("applied" if result.applied else "already applied (nothing changed)")
            + (f"; added {', '.join(result.added)}" if result.added else "")
            + (f"; no longer trusted {', '.join(result.revoked)}" if result.revoked else "")
        )
    info = trust.describe()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>12}: {', '.join(value) if isinstance(value, list) else value}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run the device agent until SIGTERM or Ctrl-C (what the systemd unit starts)."""
    import signal
    import threading

    from device_sdk import sdnotify
    from device_sdk.agent import DeviceAgent
    from device_sdk.config import load_device_config

    config = load_device_config(args.config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before start: a SIGTERM right after "online" still stops cleanly
        signal.signal(sig, lambda *_: stop.set())
    agent = DeviceAgent(config, on_event=lambda event: LOG.info("%s %s", event.kind, event.detail)).start()
    if not agent.wait_connected(args.connect_timeout):
        LOG.warning(
            "broker %s:%d not reachable yet; retrying in the background", config.broker.host, config.broker.port
        )
    LOG.info("device %s running (inbox %s); Ctrl-C to stop", config.device_id, agent.transport.subscriptions[0])
    # Under systemd (Type=notify, WatchdogSec=): ready now; then a watchdog ping every half period
    # while the message worker lives, so a dead or hung agent is restarted. Outside systemd: no-ops.
    sdnotify.notify(f"READY=1\nSTATUS=device {config.device_id} running")
    interval = sdnotify.watchdog_interval()
    while not stop.wait(interval / 2 if interval else None):
        if agent._worker is not None and agent._worker.is_alive():
            sdnotify.notify("WATCHDOG=1")
    sdnotify.notify("STOPPING=1")
    agent.stop()
    print(
        f"stopped; {agent.stats.messages_in} messages in ({agent.stats.bytes_in} bytes), "
        f"{agent.stats.messages_out} out ({agent.stats.bytes_out} bytes)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecos-device",
        description=(
            "ECOS device side: answer cloud probes privately (offline or over MQTT), keep the privacy ledger, "
            "run delivered models."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    p = sub.add_parser(
        "score",
        help="answer a probe with noisy centroid-coverage scores of a local image folder",
        description="Encode FOLDER with the encoder, count votes per probe centroid, add Gaussian noise "
        "calibrated to --epsilon (or --sigma), charge the privacy ledger, write the scores message.",
    )
    p.add_argument(
        "folder",
        help="local image folder (any layout; labels are not used; unreadable files are skipped with a warning)",
    )
    p.add_argument(
        "--encoder", required=True, help="encoder artifact, .onnx or .tflite (one the probe accepts: it names them)"
    )
    p.add_argument("--probe", required=True, help="probe message file from 'ecos-cloud index'")
    p.add_argument("--out", required=True, help="where to write the scores message")
    p.add_argument("--ledger", required=True, help="this device's privacy ledger (JSON; created on first use)")
    noise = p.add_mutually_exclusive_group(required=True)
    noise.add_argument("--epsilon", type=float, help="privacy cost of this release (epsilon at the ledger's delta)")
    noise.add_argument("--sigma", type=float, help="noise standard deviation instead of --epsilon")
    p.add_argument("--device-id", help="device id recorded in a new ledger (default: random)")
    p.add_argument(
        "--budget-epsilon", type=float, help=f"total epsilon budget of a new ledger (default {DEFAULT_BUDGET_EPSILON})"
    )
    p.add_argument("--budget-delta", type=float, help=f"delta of a new ledger (default {DEFAULT_BUDGET_DELTA})")
    p.add_argument("--threads", type=int, default=1, help="inference threads (default 1)")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        help="images decoded and encoded per batch (default 32: as fast as larger batches, less memory)",
    )
    add_trust_arguments(p, "probe", "anything is computed or charged")
    add_common(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("ledger", help="show a privacy ledger: budget, spent, remaining, releases")
    p.add_argument("ledger", help="ledger file")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_common(p)
    p.set_defaults(func=cmd_ledger)

    p = sub.add_parser(
        "keys",
        help="show the signing keys this device trusts; apply a key update file",
        description="Print the key ids the device configured in --config trusts (provisioned in "
        "[models], or learned from signed key updates) and the ones it revoked. With "
        "--apply FILE (from 'ecos-cloud keys update'), verify the update with a key the "
        "device trusts and apply it first.",
    )
    p.add_argument("--config", required=True, help="device configuration (TOML)")
    p.add_argument("--apply", metavar="FILE", help="a key update message file to verify and apply")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_common(p)
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser(
        "run",
        help="run the device agent: answer probes over MQTT, receive and install models",
        description="Connect to the broker in device.toml, answer probes within the privacy ledger, "
        "verify and install signed models, until SIGTERM or Ctrl-C.",
    )
    p.add_argument("--config", required=True, help="device configuration (TOML; see examples/raspberry_pi/device.toml)")
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        help="seconds to wait before warning that the broker is unreachable",
    )
    add_common(p)
    p.set_defaults(func=cmd_run)
    _add_predict_command(sub)
    add_label_vote_command(sub, add_common)
    _add_inspection_commands(sub)
    return parser


# ---- predict: run a shipped classifier (docs/models.md) ---------------------------------------


def cmd_predict(args: argparse.Namespace) -> int:
    from device_sdk.errors import UsageError
    from device_sdk.imagefolder import ImageItem
    from device_sdk.predict import Predictor, evaluate

    if bool(args.images) == bool(args.folder):
        raise UsageError("give image files or --folder DIR, not both and not neither")
    predictor = Predictor.open(args.model, runtime=args.runtime, threads=args.threads, expected_sha256=args.sha256)
    items = scan_image_folder(args.folder) if args.folder else [ImageItem(p, "", "") for p in args.images]
    unreadable: Optional[list] = [] if args.folder else None  # files asked for by name must be readable
    predictions = predictor.predict_items(items, strict=args.strict, batch=args.batch_size, unreadable=unreadable)
    log_unreadable(LOG, args.folder, unreadable or [])
    if not predictions:
        raise InputError(f"{args.folder}: none of its {len(items)} image file(s) is readable")
    result = evaluate(predictions, predictor.labels)
    if args.json:
        print(
            json.dumps(
                {
                    "model": args.model,
                    "runtime": predictor.model.runtime,
                    "sha256": predictor.model.sha256,
                    "predictions": [p.__dict__ for p in predictions],
                    "accuracy": result.accuracy if result.labelled else None,
                    "labelled": result.labelled,
                },
                indent=2,
            )
        )
        return 0
    if not result.labelled or args.show:
        for p in predictions:
            print(f"{p.path}\t{p.label}\t{p.probability:.4f}")
    if result.labelled:
        print(
            f"accuracy {result.accuracy:.4f} ({result.correct}/{result.labelled} labelled images; "
            f"{predictor.model.meta.arch} {predictor.model.meta.precision} on {predictor.model.runtime})"
        )
    return 0


def _add_predict_command(sub) -> None:
    from device_sdk.runtime import RUNTIMES

    p = sub.add_parser(
        "predict",
        help="classify images with a shipped model (ONNX or TFLite, fp32 or int8)",
        description="Run a classifier artifact on IMAGE files or on every image under --folder. Prints "
        "path, label and probability per image; on a folder whose subfolders are the "
        "model's labels, prints the accuracy instead (add --show for both).",
    )
    p.add_argument("model", help="classifier artifact (.onnx or .tflite) exported by ecos-cloud")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files")
    p.add_argument(
        "--folder", help="image folder (labels = parent folder names; unreadable files are skipped with a warning)"
    )
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="auto",
        help="inference runtime (default auto: onnxruntime for .onnx; ai-edge-litert, else tflite-runtime, "
        "for .tflite)",
    )
    p.add_argument(
        "--strict", action="store_true", help="refuse images whose size is not the model's input size (default: resize)"
    )
    p.add_argument("--sha256", help="refuse the model unless its sha256 is this")
    p.add_argument("--threads", type=int, default=1, help="inference threads (default 1)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="images decoded per batch (default 256)")
    p.add_argument("--show", action="store_true", help="print every prediction on a labelled folder too")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_common(p)
    p.set_defaults(func=cmd_predict)


# ---- doctor, status, models: look after a configured device (device_sdk/doctor.py) ---------------


def cmd_doctor(args: argparse.Namespace) -> int:
    from device_sdk.doctor import FAIL, run_checks

    checks = run_checks(args.config, timeout=args.timeout)
    if args.json:
        print(json.dumps([c.__dict__ for c in checks], indent=2))
    else:
        for c in checks:
            print(c.line())
    failed = [c.name for c in checks if c.status == FAIL]
    if failed and not args.json:
        print(f"{len(failed)} check(s) failed: {', '.join(failed)}")
    return 1 if failed else 0


def cmd_status(args: argparse.Namespace) -> int:
    from device_sdk.config import load_device_config
    from device_sdk.doctor import device_report

    report = device_report(load_device_config(args.config))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"device {report['device_id']}: broker {report['broker']} ({'TLS' if report['tls'] else 'no TLS'}); "
        f"runtimes {', '.join(report['runtimes']) or 'none'}"
    )
    _print_models(report["models"])
    ledger = report["ledger"]
    print(
        "ledger: not created yet"
        if ledger is None
        else f"ledger: spent epsilon {ledger['spent_epsilon']:.3f} of {ledger['budget_epsilon']:g}, remaining "
        f"{ledger['remaining_epsilon']:.3f} ({ledger['releases']} releases)"
    )
    keys = report["trusted_keys"]
    print(f"trusted keys: {', '.join(keys) if isinstance(keys, list) else keys}")
    return 0


def _print_models(models: dict) -> None:
    if not models:
        print("models: none installed")
    for kind, slots in sorted(models.items()):
        for which in ("current", "previous"):
            m = slots.get(which)
            if m is None:
                continue
            what = (
                f"{m['name']} v{m['version']} ({m['format']}, sha256 {m['sha256'][:12]}..., installed "
                f"{m['installed_utc']})"
                if "version" in m
                else f"{m['path']} (configured, not installed)"
            )
            print(f"{kind:>10} {which:<8} {what}")


def cmd_models(args: argparse.Namespace) -> int:
    from device_sdk.config import load_device_config
    from device_sdk.delivery.install import ModelStore
    from device_sdk.doctor import models_report

    config = load_device_config(args.config)
    if args.rollback:
        restored = ModelStore(config.models.store).rollback(args.rollback)
        print(
            f"rolled back {args.rollback} to {restored.name} v{restored.version} (a running agent uses it from its "
            "next prediction or probe; the status it publishes says so after its restart)"
        )
    report = models_report(config)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_models(report)
    return 0


def _add_inspection_commands(sub) -> None:
    p = sub.add_parser(
        "doctor",
        help="check a configured device: config, broker, keys, runtime, ledger, disk, clock",
        description="One line per check (ok, warn or fail); exits 1 if any check failed. The broker "
        "check connects and completes the TLS handshake but does not log in (a login "
        "would take over the running agent's session). A clock not synchronised only "
        "warns; one before 2025 fails.",
    )
    p.add_argument("--config", required=True, help="device configuration (TOML)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds for the broker connection (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_common(p)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser(
        "status",
        help="what this device has: identity, broker, models, ledger, trusted keys",
        description="Local state only (nothing is sent): the configured broker, the runtimes "
        "installed, the current and previous model per kind, the privacy ledger's "
        "spending and the signing keys trusted.",
    )
    p.add_argument("--config", required=True, help="device configuration (TOML)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_common(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "models",
        help="list the installed models; roll one back",
        description="List the current and previous model of each kind in the model store; with "
        "--rollback KIND make the previous one current again.",
    )
    p.add_argument("--config", required=True, help="device configuration (TOML)")
    p.add_argument(
        "--rollback", metavar="KIND", help="roll back this kind (classifier or encoder) to its previous model"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    add_common(p)
    p.set_defaults(func=cmd_models)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(build_parser(), argv, lambda a: setup_logging(a.verbose, a.quiet))


if __name__ == "__main__":
    raise SystemExit(main())
