"""``ecos-demo``: the whole system on one machine, in one command.

    ecos-demo --out demo-out                 # starts its own broker (Mosquitto, else amqtt)
    ecos-demo --out demo-out --broker 127.0.0.1:1883

It generates the multi-domain digits benchmark, trains the encoder, indexes the pool, starts
(or uses) an MQTT broker, the cloud daemon and three simulated devices, each holding another
visual domain, and runs one full round per device over MQTT: probe -> private scores -> ECOS
sampling -> distillation -> int8 -> signed, chunked delivery -> install -> accuracy on the
device's own labelled images. As a yardstick each device first gets a model trained the same way
on a random selection of the same size (a ``random`` round: what a cloud that does not ask the
device would do; it costs no privacy budget), measured by the device in the same way; the ECOS
model arrives second and stays installed. It ends with a table per device, ``report.json`` and
``report.png`` in the output folder. Everything real: nothing is mocked, the devices are ordinary
``DeviceAgent``s talking to the daemon through the broker.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from cloud.log import LOG
from cloud.serve.config import BrokerConfig, CloudConfig, MetricsConfig, RoundConfig, StoreConfig, TrainerConfig
from cloud.serve.store import RoundState
from cloud.tools.broker import Broker, ensure_broker, free_port
from cloud.tools.pipeline import PipelineConfig, ensure_dataset, ensure_encoder, ensure_index
from device_sdk.agent import DeviceAgent
from device_sdk.clikit import add_common, run_cli, setup_logging
from device_sdk.config import BrokerSettings, DataSettings, DeviceConfig, ModelSettings, PrivacySettings
from device_sdk.errors import EcosError, UsageError
from device_sdk.fsutil import atomic_write_text

DEVICE_DOMAINS = ("handwritten", "street", "lcd")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes picked so the demo ends in well under 10 minutes on a 2-core machine (docs/operations.md)."""

    per_domain: int = 1000
    device_local: int = 300
    device_test: int = 300
    feature_dim: int = 32
    encoder_width: int = 16
    encoder_epochs: int = 3
    k: int = 48
    budget: int = 600
    epsilon_per_probe: float = 0.58
    collect_seconds: float = 120.0
    round_timeout: float = 480.0
    seed: int = 0
    threads: int = 1  # torch threads; 2 was 3.5x slower than 1 on a 2-core machine busy with other work
    device_domains: Tuple[str, ...] = DEVICE_DOMAINS
    trainer: Dict[str, Any] = field(
        default_factory=lambda: {
            "teacher": {"arch": "resnet8", "width": 16, "epochs": 6},
            "student": {"arch": "small_cnn", "width": 16, "epochs": 15},
            "quant": {"calibration_size": 600},
        }
    )


QUICK = DemoConfig(
    per_domain=80,
    device_local=40,
    device_test=40,
    feature_dim=16,
    encoder_width=8,
    encoder_epochs=2,
    k=16,
    budget=60,
    collect_seconds=60.0,
    round_timeout=240.0,
    trainer={
        "teacher": {"width": 4, "epochs": 1},
        "student": {"width": 4, "epochs": 1},
        "quant": {"calibration_size": 32},
        "gate": {"min_agreement": 0.0, "max_accuracy_drop": 1.0},
    },
)


def simulated_device_config(
    device_id: str,
    state_dir: str,
    broker: Broker,
    public_key: str,
    encoder: str,
    local: str,
    labelled: Optional[str],
    epsilon_per_probe: float = 0.58,
) -> DeviceConfig:
    """The config of a device living in ``state_dir`` (ledger, model store) with the given data."""
    return DeviceConfig(
        device_id,
        broker=BrokerSettings(broker.host, broker.port, protocol=broker.protocol),
        privacy=PrivacySettings(ledger=os.path.join(state_dir, "ledger.json"), epsilon_per_probe=epsilon_per_probe),
        data=DataSettings(local=local, eval=labelled),
        models=ModelSettings(store=os.path.join(state_dir, "models"), cloud_public_key=public_key, encoder=encoder),
    )


def run_demo(
    out_dir: str, cfg: DemoConfig = DemoConfig(), broker_address: Optional[Tuple[str, int]] = None, protocol: str = "5"
) -> Dict[str, Any]:
    """Run everything; returns the report (also written to ``out_dir/report.json``).

    ``protocol`` is the MQTT version spoken to a given broker; a started one says its own.
    """
    import torch  # the training stack loads here, not at --help

    from cloud.serve.daemon import build_daemon

    torch.set_num_threads(cfg.threads)
    started, timings = time.monotonic(), {}
    work = os.path.join(out_dir, "work")
    pcfg = PipelineConfig(
        per_domain=cfg.per_domain,
        device_local=cfg.device_local,
        device_test=cfg.device_test,
        seed=cfg.seed,
        feature_dim=cfg.feature_dim,
        width=cfg.encoder_width,
        epochs=cfg.encoder_epochs,
        k=cfg.k,
    )
    data = _timed(timings, "data", lambda: ensure_dataset(work, pcfg))
    encoder = _timed(timings, "encoder", lambda: ensure_encoder(work, os.path.join(data, "pool"), pcfg))
    _timed(timings, "index", lambda: ensure_index(work, os.path.join(data, "pool"), encoder, pcfg))
    broker = ensure_broker(*(broker_address or (None, None)))
    if broker.kind == "given":
        broker.protocol = protocol
    LOG.info("broker: %s %s (MQTT %s)", broker.kind, broker.url, broker.protocol)
    daemon = build_daemon(
        CloudConfig(
            broker=BrokerConfig(
                broker.host, broker.port, protocol=broker.protocol, client_id=f"ecos-demo-cloud-{os.getpid()}"
            ),
            store=StoreConfig(
                state_dir=os.path.join(out_dir, "state", "cloud"), index=os.path.join(work, "pool.index.npz")
            ),
            rounds=RoundConfig(budget=cfg.budget, collect_seconds=cfg.collect_seconds, seed=cfg.seed),
            metrics=MetricsConfig(port=free_port()),
            trainer=TrainerConfig(threads=cfg.threads, options=cfg.trainer),
        )
    )
    agents: List[DeviceAgent] = []
    try:
        daemon.start()
        agents = _start_devices(out_dir, cfg, broker, str(daemon.public_key_path), encoder, data)
        baselines = _timed(timings, "random_rounds", lambda: _run_rounds(daemon, agents, cfg, "random"))
        rounds = _timed(timings, "ecos_rounds", lambda: _run_rounds(daemon, agents, cfg, "ecos"))
        rows = [
            _row(daemon, agent, rounds[agent.device_id], baselines[agent.device_id], domain)
            for agent, domain in zip(agents, cfg.device_domains)
        ]
        metrics_text = daemon.metrics.render()
    finally:
        for agent in agents:
            agent.stop()
        daemon.stop()
        broker.stop()
    timings["total"] = round(time.monotonic() - started, 1)
    report = {
        "config": asdict(cfg),
        "broker": {"kind": broker.kind, "protocol": broker.protocol},
        "devices": rows,
        "seconds": timings,
        "metrics": metrics_text,
    }
    atomic_write_text(os.path.join(out_dir, "report.json"), json.dumps(report, indent=2, sort_keys=True) + "\n")
    plot_report(rows, os.path.join(out_dir, "report.png"))
    return report


def _timed(timings: Dict[str, float], what: str, fn):
    t0 = time.monotonic()
    result = fn()
    timings[what] = round(time.monotonic() - t0, 1)
    LOG.info("demo: %s took %.1fs", what, timings[what])
    return result


def _start_devices(
    out_dir: str, cfg: DemoConfig, broker: Broker, public_key: str, encoder: str, data: str
) -> List[DeviceAgent]:
    agents = []
    for domain in cfg.device_domains:
        folder = os.path.join(data, "devices", domain)
        device_cfg = simulated_device_config(
            f"demo-{domain}",
            os.path.join(out_dir, "state", f"demo-{domain}"),
            broker,
            public_key,
            encoder,
            os.path.join(folder, "local"),
            os.path.join(folder, "test"),
            cfg.epsilon_per_probe,
        )
        agents.append(DeviceAgent(device_cfg).start())
    for agent in agents:
        if not agent.wait_connected(15):
            raise EcosError(f"device {agent.device_id} could not connect to {broker.url}")
    return agents


def _run_rounds(daemon, agents: Sequence[DeviceAgent], cfg: DemoConfig, method: str) -> Dict[str, Any]:
    """One device round per device, all submitted at once (training runs one at a time)."""
    submitted = {a.device_id: daemon.submit_round([a.device_id], method=method).round_id for a in agents}
    finished = {dev: daemon.wait_round(rid, cfg.round_timeout) for dev, rid in submitted.items()}
    for dev, r in finished.items():
        if r.state is not RoundState.DONE:
            raise EcosError(
                f"{method} round {r.round_id} for {dev} ended in state {r.state.value}: {r.error or 'timed out'}"
            )
    return finished


def _row(daemon, agent: DeviceAgent, r, baseline, domain: str) -> Dict[str, Any]:
    """One line of the table: the ECOS round ``r`` and the random round ``baseline`` of one device."""
    traffic = daemon.store.traffic(round_id=r.round_id, device_id=agent.device_id)
    delivered, random_delivered = (
        r.result["deliveries"][agent.device_id],
        baseline.result["deliveries"][agent.device_id],
    )
    selected = r.result["selected"]
    return {
        "device": agent.device_id,
        "domain": domain,
        "round": r.round_id,
        "random_round": baseline.round_id,
        "epsilon_spent": agent.ledger.spent()[0],
        "bytes_up": sum(t.bytes for t in traffic if t.direction == "up"),
        "bytes_down": sum(t.bytes for t in traffic if t.direction == "down"),
        "bytes_by_type": {f"{t.direction}:{t.msg_type}": t.bytes for t in traffic},
        "own_domain_share": r.result["composition"].get(domain, 0) / selected,
        "random_own_domain_share": baseline.result["composition"].get(domain, 0) / baseline.result["selected"],
        "accuracy_ecos": delivered["accuracy"],
        "n_eval": delivered["n_eval"],
        "accuracy_random": random_delivered["accuracy"],
        "composition": r.result["composition"],
        "precision": r.result["train_report"]["precision"],
        "random_precision": baseline.result["train_report"]["precision"],
        "stage_seconds": r.result["timings"],
        "artifact_bytes": r.result["size"],
    }


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    """The per-device table; accuracies are of the shipped model (int8 unless its gate failed: see 'model')."""
    head = (
        f"{'device':<18} {'domain':<12} {'epsilon':>7} {'bytes up':>9} {'bytes down':>10} {'own share':>9} "
        f"{'(random)':>8} {'acc ECOS':>8} {'acc random':>10} {'model':>11}"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        lines.append(
            f"{row['device']:<18} {row['domain']:<12} {row['epsilon_spent']:>7.3f} {row['bytes_up']:>9,d} "
            f"{row['bytes_down']:>10,d} {row['own_domain_share']:>9.1%} {row['random_own_domain_share']:>8.1%} "
            f"{row['accuracy_ecos']:>8.1%} {row['accuracy_random']:>10.1%} "
            f"{row['precision'] + '/' + row['random_precision']:>11}"
        )
    return "\n".join(lines)


def plot_report(rows: Sequence[Dict[str, Any]], path: str) -> None:
    """Accuracy (ECOS vs random, int8, on each device's own test images) and own-domain share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names, x, w = [r["domain"] for r in rows], np.arange(len(rows)), 0.38
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (key_a, key_b, title) in zip(
        axes,
        (
            ("accuracy_ecos", "accuracy_random", "accuracy of the shipped model on the device's test images"),
            ("own_domain_share", "random_own_domain_share", "share of the selection from the device's domain"),
        ),
    ):
        ax.bar(x - w / 2, [r[key_a] for r in rows], w, label="ECOS")
        ax.bar(x + w / 2, [r[key_b] for r in rows], w, label="random")
        ax.set_xticks(x, names)
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse_broker(text: Optional[str]) -> Optional[Tuple[str, int]]:
    if not text:
        return None
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--broker must be HOST:PORT, got {text!r}")
    return host, int(port)


def _main(args: argparse.Namespace) -> int:
    cfg = QUICK if args.quick else DemoConfig()
    report = run_demo(args.out, cfg, _parse_broker(args.broker), args.protocol)
    print(format_table(report["devices"]))
    print(
        f"\nreport: {os.path.join(args.out, 'report.json')}, plot: {os.path.join(args.out, 'report.png')}; "
        f"{report['seconds']['total']:.0f}s in total ({json.dumps(report['seconds'])})"
    )
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ecos-demo", description=__doc__.split("\n\n")[2].replace("\n", " "))
    parser.add_argument("--out", default="ecos-demo-out", help="output folder (data, state, report.json, report.png)")
    parser.add_argument("--broker", metavar="HOST:PORT", help="use this MQTT broker instead of starting one")
    parser.add_argument(
        "--protocol",
        choices=("5", "3.1.1"),
        default="5",
        help="MQTT version for a given --broker (amqtt needs 3.1.1); a started broker picks its own",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test of the whole system, ~1 minute)")
    add_common(parser)
    parser.set_defaults(func=_main)
    return run_cli(parser, argv, lambda a: setup_logging(a.verbose, a.quiet))


if __name__ == "__main__":
    raise SystemExit(main())
