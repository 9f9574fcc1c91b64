"""Benchmark the daemon collecting one fleet probe's answers from many devices over a real broker.

N lightweight simulated devices (one MQTT connection each, ``MqttTransport``, no model: they
answer a probe with noisy coverage counts of their own, a real ``Scores`` message) join a
private Mosquitto. The daemon (the real one: store, decoding, checks, accounting) runs one
fleet round over all of them and is stepped until the round leaves ``collecting``. Every device
sends its answer twice (as after a repeated probe), so "recorded exactly once" is tested under
load. Measured: time to connect the fleet, time from the round's creation to the last answer
recorded, answers per second, and the store's final count of answers, duplicates and late ones.
Training and delivery are not part of this benchmark (bench_ota.py measures a whole round); the
pool index is synthetic (random unit features; only the sampler reads it here).

    python benchmarks/bench_fleet.py                    # 200 devices
    python benchmarks/bench_fleet.py --devices 50 200 500
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud.pool.index import PoolIndex  # noqa: E402
from cloud.serve.config import BrokerConfig, CloudConfig, MetricsConfig, RoundConfig, StoreConfig, TrainerConfig
from cloud.serve.daemon import build_daemon  # noqa: E402
from cloud.serve.store import RoundState  # noqa: E402
from cloud.tools.broker import start_mosquitto  # noqa: E402
from device_sdk.fsutil import atomic_write_text  # noqa: E402
from device_sdk.protocol import inbox, outbox  # noqa: E402
from device_sdk.protocol.round import Probe, Scores  # noqa: E402
from device_sdk.transport import MqttTransport  # noqa: E402

ENCODER = hashlib.sha256(b"bench-fleet-encoder").hexdigest()
# paho-mqtt's network loop uses select(), which only takes file descriptors below 1024, and each
# client holds three (its socket and a wake-up socket pair): one process connected 338-340 of
# 800 clients and no more. The limit is this simulator's, not the broker's or the daemon's.
MAX_DEVICES_PER_PROCESS = 300


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[200], help="fleet sizes to run (default 200)")
    parser.add_argument("--k", type=int, default=64, help="centroids in the probe")
    parser.add_argument("--dim", type=int, default=32, help="feature dimension")
    parser.add_argument("--pool", type=int, default=20000, help="synthetic pool size")
    parser.add_argument("--replays", type=int, default=2, help="times each device sends its answer")
    parser.add_argument("--protocol", choices=("5", "3.1.1"), default="5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/fleet.json")
    parser.add_argument("--markdown", default="docs/results/fleet.md")
    return parser.parse_args()


def synthetic_index(path: str, args: argparse.Namespace) -> PoolIndex:
    """A pool index with random unit features; nothing reads its image paths in this benchmark."""
    rng = np.random.default_rng(args.seed)
    unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    centroids = unit(rng.standard_normal((args.k, args.dim)))
    features = unit(rng.standard_normal((args.pool, args.dim)))
    assign = (features @ centroids.T).argmax(axis=1).astype(np.int32)
    index = PoolIndex(
        paths=np.array([f"synthetic/{i}.png" for i in range(args.pool)]),
        labels=np.array([str(i % 10) for i in range(args.pool)]),
        domains=np.array([f"d{a % 6}" for a in assign]),
        features=features,
        assign=assign,
        centroids=centroids,
        encoder_sha256=ENCODER,
        probe_id="unused",
        created="",
    )
    index.save(path)
    return index


class FakeDevice:
    """One MQTT connection that answers every probe with ``replays`` copies of one Scores message."""

    def __init__(self, device_id: str, broker, protocol: str, rng: np.random.Generator, replays: int):
        self.device_id, self.replays = device_id, replays
        self.local = rng.integers(0, 40, size=None)  # which clusters this device's data sits near
        self.rng = rng
        self.transport = MqttTransport(
            f"fake-{device_id}",
            broker.host,
            broker.port,
            protocol=protocol,
            subscriptions=[inbox(device_id)],
            on_message=self._on_probe,
            keepalive=60,
        )

    def _on_probe(self, topic: str, payload: bytes) -> None:
        probe = Probe.from_bytes(payload)
        counts = np.zeros(probe.k)
        counts[(self.local + np.arange(5)) % probe.k] = 60.0
        noisy = counts + self.rng.normal(0.0, 8.0, probe.k)
        answer = Scores(probe.probe_id, self.device_id, probe.encoder_sha256, noisy, 8.0, 1.0, 0.58, 1e-5).to_bytes()
        for _ in range(self.replays):
            self.transport.publish(outbox(self.device_id), answer)


def run_fleet(n: int, args: argparse.Namespace, broker, workdir: str) -> Dict[str, object]:
    index_path = os.path.join(workdir, "pool.index.npz")
    synthetic_index(index_path, args)  # writes the index file the daemon loads
    cfg = CloudConfig(
        broker=BrokerConfig(broker.host, broker.port, protocol=args.protocol, client_id=f"bench-cloud-{n}"),
        store=StoreConfig(state_dir=os.path.join(workdir, f"state-{n}"), index=index_path),
        rounds=RoundConfig(budget=500, collect_seconds=300.0),
        metrics=MetricsConfig(port=0),
        trainer=TrainerConfig(threads=1),
    )
    daemon = build_daemon(cfg).start(background=False)  # stepped by hand below: it stops before training
    rng = np.random.default_rng(args.seed)
    devices = [
        FakeDevice(f"fleet-{i:04d}", broker, args.protocol, np.random.default_rng(rng.integers(1 << 31)), args.replays)
        for i in range(n)
    ]
    try:
        t0 = time.perf_counter()
        for d in devices:
            d.transport.start()
        assert daemon.transport.wait_connected(30) and all(d.transport.wait_connected(60) for d in devices)
        connect_s = time.perf_counter() - t0
        r = daemon.submit_round([d.device_id for d in devices], fleet=True)
        t0 = time.perf_counter()
        recorded_at = None
        while time.perf_counter() - t0 < 300:
            daemon.step(0.01)
            if recorded_at is None and len(daemon.store.responses(r.round_id)) == n:
                recorded_at = time.perf_counter() - t0
            state = daemon.store.get_round(r.round_id).state
            if state not in (RoundState.PROBING, RoundState.COLLECTING):
                break
        left_collecting_s = time.perf_counter() - t0
        daemon.tick()  # the sampling stage over the summed scores; training would start on the next tick
        drain_until = time.perf_counter() + 3.0  # the replays still in flight: handled, rounds not advanced
        while time.perf_counter() < drain_until:
            daemon.drain(0.05)
        m = daemon.metrics.responses
        responses = daemon.store.responses(r.round_id)
        round_rec = daemon.store.get_round(r.round_id)
        return {
            "devices": n,
            "connect_seconds": round(connect_s, 3),
            "seconds_to_last_answer_recorded": None if recorded_at is None else round(recorded_at, 3),
            "seconds_to_leave_collecting": round(left_collecting_s, 3),
            "answers_per_second": None if recorded_at is None else round(n / recorded_at, 1),
            "state_after": round_rec.state.value,
            "recorded": len(responses),
            "unique_devices": len({x.device_id for x in responses}),
            "new": int(m.value(kind="scores", outcome="new")),
            "duplicates": int(m.value(kind="scores", outcome="duplicate")),
            "late": int(m.value(kind="scores", outcome="late")),
            "messages_in": int(sum(v for k, v in daemon.metrics.messages.samples() if ("direction", "in") in k)),
            "bytes_in_scores": int(daemon.metrics.bytes.value(direction="in", type="scores")),
            "bytes_out_probes": int(daemon.metrics.bytes.value(direction="out", type="probe")),
            "stage_seconds": round_rec.result.get("timings", {}),
            "selected": round_rec.result.get("selected"),
        }
    finally:
        for d in devices:
            d.transport.stop(timeout=0.1)
        daemon.stop()


def markdown(report: Dict[str, object]) -> str:
    lines = [
        "# Fleet collection: one probe, N devices, every answer sent twice",
        "",
        "`python benchmarks/bench_fleet.py` (raw numbers: benchmarks/results/fleet.json). Real daemon, real "
        "Mosquitto, one MQTT connection per simulated device; the daemon is stepped until the round leaves "
        "`collecting` (training and delivery are measured by bench_ota.py).",
        "",
        f"Machine: {report['machine']['platform']}, {report['machine']['cpu_count']} CPUs, load average "
        f'{report["machine"]["load_average_1m_at_start"]} at start. "to last answer" runs from the round\'s '
        "creation (the probes go out on the daemon's next tick, within 0.1 s) to the last device's answer being "
        'committed to SQLite; "duplicates" are the second copies, recognised and not counted again.',
        "",
        "| devices | connect s | to last answer s | answers/s | recorded | new | duplicates | late | scores bytes in "
        "| probe bytes out |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['devices']} | {r['connect_seconds']} | {r['seconds_to_last_answer_recorded']} | "
            f"{r['answers_per_second']} | {r['recorded']} | {r['new']} | {r['duplicates']} | {r['late']} | "
            f"{r['bytes_in_scores']:,} | {r['bytes_out_probes']:,} |"
        )
    lines += [
        "",
        f"One process simulates at most {MAX_DEVICES_PER_PROCESS} devices: paho-mqtt's select() loop takes only "
        "file descriptors below 1024 and each client holds three (800 clients: 340 connected).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    if sum(args.devices) > MAX_DEVICES_PER_PROCESS:
        raise SystemExit(
            f"at most {MAX_DEVICES_PER_PROCESS} simulated devices in one process (sum of --devices); "
            "see MAX_DEVICES_PER_PROCESS"
        )
    machine = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
    }
    results: List[Dict[str, object]] = []
    broker = start_mosquitto(extra_config="set_tcp_nodelay true\n")
    try:
        with tempfile.TemporaryDirectory(prefix="ecos-fleet-") as workdir:
            for n in args.devices:
                results.append(run_fleet(n, args, broker, workdir))
                print(json.dumps(results[-1]))
    finally:
        broker.stop()
    machine["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    report = {
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "markdown")},
        "machine": machine,
        "results": results,
    }
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    atomic_write_text(args.markdown, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
