"""``ecos-cloud`` serve, round, round-labels, status: the daemon and its rounds (docs/operations.md)."""

from __future__ import annotations

import argparse
import json
import time

from device_sdk.clikit import add_common


def cmd_serve(args: argparse.Namespace) -> int:
    import signal

    from cloud.serve.config import load_config
    from cloud.serve.daemon import build_daemon
    from cloud.serve.eventlog import setup_structured_logging

    cfg = load_config(args.config)
    setup_structured_logging(cfg.log_format, args.verbose, args.quiet)
    daemon = build_daemon(cfg)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.request_stop())
    daemon.serve_forever()
    return 0


def cmd_round(args: argparse.Namespace) -> int:
    from cloud.pool.index import PoolIndex
    from cloud.serve.config import load_config, require_index
    from cloud.serve.daemon import create_round
    from cloud.serve.store import open_store

    cfg = load_config(args.config)
    store = open_store(cfg.store.database)
    r = create_round(
        store,
        cfg,
        PoolIndex.load(require_index(cfg)),
        args.devices,
        args.fleet,
        budget=args.budget,
        method=args.method,
        collect_seconds=args.collect_seconds,
        task=args.task,
        labels=[v.strip() for v in args.labels.split(",") if v.strip()] if args.labels else None,
    )
    print(f"round {r.round_id} ({r.kind}: {', '.join(r.devices)}) queued; the daemon picks it up within a second")
    if not args.wait:
        return 0
    end = time.monotonic() + args.wait
    while not r.state.terminal and time.monotonic() < end:
        time.sleep(0.5)
        r = store.get_round(r.round_id)
    print(_round_line(r))
    return 0 if r.state.value == "done" else 1


def cmd_status(args: argparse.Namespace) -> int:
    from cloud.serve.config import load_config
    from cloud.serve.store import open_store

    store = open_store(load_config(args.config).store.database)
    rounds, devices = store.list_rounds()[-args.last :], store.list_devices()
    if args.json:
        print(
            json.dumps(
                {
                    "rounds": [dict(r.__dict__, state=r.state.value) for r in rounds],
                    "devices": [d.__dict__ for d in devices],
                },
                indent=2,
                default=str,
            )
        )
        return 0
    for d in devices:
        print(f"device {d.device_id:<24} {d.state:<8} model={json.dumps(d.model)}")
    for r in rounds:
        print(_round_line(r))
    return 0


def _round_line(r) -> str:
    detail = r.error or ", ".join(
        f"{dev}: {x.get('state')} acc={x.get('accuracy')}" for dev, x in r.result.get("deliveries", {}).items()
    )
    return f"round {r.round_id} {r.kind:<6} {r.state.value:<10} devices={','.join(r.devices)} {detail}"


def _add_daemon_commands(sub) -> None:
    config_help = "cloud.toml (see docs/operations.md; ECOS_CLOUD_* variables override it)"
    p = sub.add_parser(
        "serve",
        help="run the daemon: MQTT rounds, training, signed delivery, metrics",
        description="Connect to the broker, resume unfinished rounds from the state database, run new "
        "ones (submitted with 'ecos-cloud round'), serve Prometheus metrics. SIGTERM stops it.",
    )
    p.add_argument("--config", help=config_help)
    add_common(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "round",
        help="queue a round for the daemon (one device, or a fleet with --fleet)",
        description="Write a new round into the daemon's state database; the running daemon probes the "
        "devices, samples, trains and delivers. Options default to [rounds] of the config.",
    )
    p.add_argument("devices", nargs="+", metavar="DEVICE", help="device id(s)")
    p.add_argument("--config", help=config_help)
    p.add_argument("--fleet", action="store_true", help="one model for all DEVICEs from their summed scores")
    p.add_argument("--budget", type=int, help="images to select from the pool")
    p.add_argument("--method", help="ecos | random | kcenter (random and kcenter do not ask the devices)")
    p.add_argument("--collect-seconds", type=float, help="deadline for the devices' answers")
    p.add_argument(
        "--task",
        choices=("compression", "manual", "client"),
        help="manual: selective manual labelling; the round waits in 'labelling' until 'ecos-cloud round-labels' "
        "imports the proxy set's labels. client: automated client labelling; the round sends the devices a signed "
        "label query and waits in 'voting' for their private label votes ([rounds] label_* keys). Both need "
        "--labels and a [trainer] named semisup (docs/tasks.md)",
    )
    p.add_argument("--labels", help="manual, client: comma-separated label names (labellers choose, devices vote)")
    p.add_argument(
        "--wait", type=float, default=0, metavar="SECONDS", help="wait for the round to finish; exit 1 if it fails"
    )
    add_common(p)
    p.set_defaults(func=cmd_round)

    p = sub.add_parser("status", help="show devices and recent rounds from the daemon's state database")
    p.add_argument("--config", help=config_help)
    p.add_argument("--last", type=int, default=20, help="rounds to show (default 20)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_common(p)
    p.set_defaults(func=cmd_status)
