"""Benchmark signed artifact delivery over a real MQTT broker: time and bytes per direction.

A cloud-side ``ArtifactSender`` sends a random artifact to a device-side ``DeliveryReceiver``
(both on their own ``MqttTransport``) through the broker, for several artifact sizes, chunk
sizes and windows. Measured per case: wall time from the manifest to the ``installed`` reply,
payload bytes cloud -> device (manifest + chunks) and device -> cloud (acks + report), and the
protocol's overhead over the artifact's own size. The device verifies every chunk, the whole
file and the Ed25519 signature and installs into a model store on disk, as a real device does
(only the runtime load check is left out: the artifact is random bytes).

By default each case runs on two private Mosquittos, one with its default ``set_tcp_nodelay
false`` and one with ``set_tcp_nodelay true``: with Nagle's algorithm on the broker's sockets a
small ack waits for the peer's delayed ACK, which dominates a windowed transfer (the clients
already set TCP_NODELAY).

    python benchmarks/bench_delivery.py                          # private brokers, both settings
    python benchmarks/bench_delivery.py --broker 127.0.0.1:1883 --sizes-kb 1000 --out /tmp/d.json
"""

from __future__ import annotations

import argparse
import json
import platform
import queue
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud.security.keys import generate_keypair  # noqa: E402
from cloud.serve.delivery import ArtifactSender, build_manifest  # noqa: E402
from cloud.tools.broker import start_mosquitto  # noqa: E402
from device_sdk.delivery.install import DeliveryReceiver, ModelStore  # noqa: E402
from device_sdk.fsutil import atomic_write_text  # noqa: E402
from device_sdk.protocol import (
    CLOUD_SUBSCRIPTIONS,
    Ack,
    Installed,
    InstallFailed,
    decode_for_device,
    decode_from_device,
    inbox,
    outbox,
)
from device_sdk.signing import load_public_key  # noqa: E402
from device_sdk.transport import MqttTransport  # noqa: E402

META = {
    "kind": "classifier",
    "arch": "bench",
    "input_shape": [3, 32, 32],
    "mean": [0.5] * 3,
    "std": [0.25] * 3,
    "labels": [str(i) for i in range(10)],
    "precision": "int8",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", help="HOST:PORT of a running broker (default: start private Mosquittos)")
    parser.add_argument("--sizes-kb", type=int, nargs="+", default=[100, 1000, 8000], help="artifact sizes (KB)")
    parser.add_argument("--chunks-kb", type=int, nargs="+", default=[16, 64, 192], help="chunk sizes (KiB)")
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 8], help="unacknowledged chunks in flight")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case (the median is reported)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "delivery.json"))
    args = parser.parse_args()
    args.host, args.port = (
        (args.broker.rsplit(":", 1)[0], int(args.broker.rsplit(":", 1)[1])) if args.broker else ("", 0)
    )
    return args


class Device:
    """A device's delivery end on its own MQTT connection; counts what it sends."""

    def __init__(self, args: argparse.Namespace, device_id: str, public_key: Path, store: Path):
        self.device_id, self.bytes_up = device_id, 0
        self.receiver = DeliveryReceiver(ModelStore(store), load_public_key(public_key), device_id, formats=("onnx",))
        self.transport = MqttTransport(
            f"bench-{device_id}",
            args.host,
            args.port,
            subscriptions=[inbox(device_id)],
            on_message=self.on_message,
            clean=True,
        )

    def on_message(self, topic: str, payload: bytes) -> None:
        for reply in self.receiver.handle(decode_for_device(self.device_id, topic, payload)):
            data = reply.to_bytes()
            self.bytes_up += len(data)
            self.transport.publish(outbox(self.device_id), data)


def run_case(args, keys, workdir: Path, size: int, chunk: int, window: int, run: int) -> Dict[str, float]:
    device_id = f"bench-{size}-{chunk}-{window}-{run}"
    artifact = workdir / f"{device_id}.onnx"
    artifact.write_bytes(np.random.default_rng(run).integers(0, 256, size, dtype=np.uint8).tobytes())
    manifest = build_manifest(
        artifact, keys[0], name="bench", version=1, targets=[device_id], chunk_size=chunk, meta=META
    )
    device = Device(args, device_id, keys[1], workdir / device_id)
    replies: "queue.Queue" = queue.Queue()
    cloud = MqttTransport(
        f"bench-cloud-{device_id}",
        args.host,
        args.port,
        subscriptions=list(CLOUD_SUBSCRIPTIONS),
        on_message=lambda t, p: replies.put(decode_from_device(t, p)[1]),
        clean=True,
    )
    for transport in (device.transport, cloud):
        transport.start()
        if not transport.wait_connected(10):
            raise SystemExit(f"no MQTT broker at {args.host}:{args.port}")
    sender = ArtifactSender(cloud, device_id, artifact, manifest, window=window, timeout=10)
    t0 = time.perf_counter()
    sender.start()
    while not sender.done:
        msg = replies.get(timeout=60)
        if isinstance(msg, Ack):
            sender.on_ack(msg)
        elif isinstance(msg, (Installed, InstallFailed)):
            sender.on_result(msg)
    seconds = time.perf_counter() - t0
    for transport in (device.transport, cloud):
        transport.stop()
    if sender.outcome != "installed":
        raise SystemExit(f"{device_id}: {sender.outcome} {sender.result}")
    return {
        "seconds": seconds,
        "bytes_down": sender.bytes_sent,
        "bytes_up": device.bytes_up,
        "chunks": manifest.n_chunks,
        "chunks_sent": sender.chunks_sent,
    }


def run_cases(args: argparse.Namespace, broker: str, results: List[Dict[str, object]]) -> None:
    with tempfile.TemporaryDirectory(prefix="ecos-bench-delivery-") as tmp:
        workdir = Path(tmp)
        keys = generate_keypair(workdir / "keys")
        for size_kb in args.sizes_kb:
            for chunk_kb in args.chunks_kb:
                for window in args.windows:
                    size, chunk = size_kb * 1000, chunk_kb * 1024
                    runs = [run_case(args, keys, workdir, size, chunk, window, r) for r in range(args.repeats)]
                    best = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
                    row = {
                        "broker": broker,
                        "size_bytes": size,
                        "chunk_bytes": chunk,
                        "window": window,
                        **best,
                        "overhead": (best["bytes_down"] + best["bytes_up"]) / size - 1.0,
                        "mb_per_s": size / best["seconds"] / 1e6,
                    }
                    results.append(row)
                    print(
                        f"{broker:>14} {size_kb:>6} KB  chunk {chunk_kb:>3} KiB  window {window}: "
                        f"{best['seconds'] * 1000:8.1f} ms  "
                        f"down {best['bytes_down']:>9}  up {best['bytes_up']:>6}  overhead "
                        f"{row['overhead'] * 100:5.2f} %"
                    )


def main() -> None:
    args = parse_args()
    results: List[Dict[str, object]] = []
    if args.broker:
        run_cases(args, args.broker, results)
    else:
        for nodelay in ("false", "true"):
            broker = start_mosquitto(extra_config=f"set_tcp_nodelay {nodelay}\n")
            args.host, args.port = broker.host, broker.port
            try:
                run_cases(args, f"nodelay={nodelay}", results)
            finally:
                broker.stop()
    doc = {
        "benchmark": "artifact delivery over MQTT (median of repeats)",
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "results": results,
    }
    atomic_write_text(args.out, json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
