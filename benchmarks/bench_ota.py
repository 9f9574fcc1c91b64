"""Benchmark whole rounds over the air: bytes on the wire per direction and type, latency per stage.

The real system on one machine: a private Mosquitto, the cloud daemon, and three
``DeviceAgent``s holding different domains of the generated digits benchmark. One fleet round
per centroid codec (float16, int8, float32) runs probe -> scores -> ECOS sampling ->
distillation -> int8 -> signed chunked delivery -> install. Bytes are MQTT payload bytes as the
daemon counted them per device (its traffic table), split into the probe (down), the scores
(up), the model (manifest and chunks, down) and the delivery replies (acks and the install
report, up); latency is the time each round spent in each state. For scale, the bytes of the
device's local images (what uploading the data would cost) are reported too.

    python benchmarks/bench_ota.py
    python benchmarks/bench_ota.py --codecs float16 --workdir /tmp/ota
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud.serve.config import BrokerConfig, CloudConfig, MetricsConfig, RoundConfig, StoreConfig, TrainerConfig
from cloud.serve.daemon import build_daemon  # noqa: E402
from cloud.serve.store import RoundState  # noqa: E402
from cloud.tools.broker import start_mosquitto  # noqa: E402
from cloud.tools.demo import simulated_device_config  # noqa: E402
from cloud.tools.pipeline import PipelineConfig, ensure_dataset, ensure_encoder, ensure_index  # noqa: E402
from device_sdk.agent import DeviceAgent  # noqa: E402
from device_sdk.fsutil import atomic_write_text  # noqa: E402
from device_sdk.imagefolder import scan_image_folder  # noqa: E402

DOMAINS = ("handwritten", "street", "lcd")
MODEL_DOWN = ("artifact_manifest", "artifact_chunk")
REPLIES_UP = ("ack", "installed", "install_failed")
STAGES = ("collecting", "sampling", "training", "signing", "delivering")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codecs", nargs="+", default=["float16", "int8", "float32"])
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--per-domain", type=int, default=200)
    parser.add_argument("--budget", type=int, default=300)
    parser.add_argument(
        "--workdir",
        default=os.path.join(tempfile.gettempdir(), "ecos-bench-ota"),
        help="data, encoder and index are kept here between runs",
    )
    parser.add_argument("--out", default="benchmarks/results/ota.json")
    parser.add_argument("--markdown", default="docs/results/ota.md")
    return parser.parse_args()


def prepare(args: argparse.Namespace):
    cfg = PipelineConfig(
        per_domain=args.per_domain, device_local=100, device_test=100, feature_dim=args.dim, width=8, epochs=2, k=args.k
    )
    data = ensure_dataset(args.workdir, cfg)
    encoder = ensure_encoder(args.workdir, os.path.join(data, "pool"), cfg)
    ensure_index(args.workdir, os.path.join(data, "pool"), encoder, cfg)
    return data, encoder, os.path.join(args.workdir, "pool.index.npz")


def per_device_bytes(daemon, round_id: str, device_id: str) -> Dict[str, int]:
    rows = daemon.store.traffic(round_id=round_id, device_id=device_id)
    total = lambda direction, types: sum(t.bytes for t in rows if t.direction == direction and t.msg_type in types)  # noqa: E731
    return {
        "probe_down": total("down", ("probe",)),
        "scores_up": total("up", ("scores",)),
        "model_down": total("down", MODEL_DOWN),
        "replies_up": total("up", REPLIES_UP),
        "chunks": sum(t.messages for t in rows if t.msg_type == "artifact_chunk"),
        "up": total("up", ("scores",) + REPLIES_UP),
        "down": total("down", ("probe",) + MODEL_DOWN),
    }


def run(args: argparse.Namespace) -> Dict[str, object]:
    data, encoder, index_path = prepare(args)
    broker = start_mosquitto(extra_config="set_tcp_nodelay true\n")
    state = tempfile.mkdtemp(prefix="ecos-ota-state-")
    daemon = build_daemon(
        CloudConfig(
            broker=BrokerConfig(broker.host, broker.port, client_id="bench-ota-cloud"),
            store=StoreConfig(state_dir=os.path.join(state, "cloud"), index=index_path),
            rounds=RoundConfig(budget=args.budget, collect_seconds=120.0),
            metrics=MetricsConfig(port=0),
            trainer=TrainerConfig(
                threads=2,
                cache_dir=os.path.join(args.workdir, "trainer-cache"),
                options={"teacher": {"width": 8, "epochs": 2}, "student": {"width": 16, "epochs": 3}},
            ),
        )
    )
    agents: List[DeviceAgent] = []
    rounds = []
    try:
        daemon.trainer.teacher()  # trained (or loaded) once up front, so stage times are per round
        daemon.start()
        for domain in DOMAINS:
            folder = os.path.join(data, "devices", domain)
            agents.append(
                DeviceAgent(
                    simulated_device_config(
                        f"ota-{domain}",
                        os.path.join(state, domain),
                        broker,
                        str(daemon.public_key_path),
                        encoder,
                        os.path.join(folder, "local"),
                        os.path.join(folder, "test"),
                    )
                ).start()
            )
        assert all(a.wait_connected(15) for a in agents)
        for codec in args.codecs:
            t0 = time.perf_counter()
            r = daemon.wait_round(
                daemon.submit_round([a.device_id for a in agents], fleet=True, codec=codec).round_id, 600
            )
            if r.state is not RoundState.DONE:
                raise SystemExit(f"round with codec {codec} ended {r.state.value}: {r.error}")
            rounds.append(
                {
                    "codec": codec,
                    "k": args.k,
                    "dim": args.dim,
                    "wall_seconds": round(time.perf_counter() - t0, 3),
                    "stage_seconds": {s: r.result["timings"].get(s) for s in STAGES},
                    "artifact_bytes": r.result["size"],
                    "precision": r.result["train_report"]["precision"],
                    "per_device": {a.device_id: per_device_bytes(daemon, r.round_id, a.device_id) for a in agents},
                }
            )
            print(json.dumps(rounds[-1]))
    finally:
        for a in agents:
            a.stop()
        daemon.stop()
        broker.stop()
    local = {
        d: sum(os.path.getsize(it.path) for it in scan_image_folder(os.path.join(data, "devices", d, "local")))
        for d in DOMAINS
    }
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "markdown")},
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        },
        "rounds": rounds,
        "local_image_bytes": local,
    }


def markdown(report: Dict[str, object]) -> str:
    cfg = report["config"]
    lines = [
        "# Over the air: bytes and latency of one round",
        "",
        "`python benchmarks/bench_ota.py` (raw numbers: benchmarks/results/ota.json). Private Mosquitto, the real "
        f"daemon and three device agents on one machine ({report['machine']['cpu_count']} CPUs, load average "
        f"{report['machine']['load_average_1m_at_end']} at the end); K={cfg['k']} centroids of dimension {cfg['dim']}, "
        f"budget {cfg['budget']}, one fleet round per centroid codec. MQTT payload bytes per device.",
        "",
        "| codec | probe down | scores up | model down (chunks) | acks + report up | total up | total down | model "
        "file |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rounds"]:
        b = next(iter(r["per_device"].values()))
        lines.append(
            f"| {r['codec']} | {b['probe_down']:,} | {b['scores_up']:,} | {b['model_down']:,} ({b['chunks']}) | "
            f"{b['replies_up']:,} | {b['up']:,} | {b['down']:,} | {r['artifact_bytes']:,} ({r['precision']}) |"
        )
    lines += [
        "",
        "Seconds per stage (collecting includes the devices encoding their images; training is the "
        "student's distillation, int8 and gate on 2 threads; the teacher is trained once and cached):",
        "",
        "| codec | " + " | ".join(STAGES) + " | round |",
        "|---" * (len(STAGES) + 2) + "|",
    ]
    for r in report["rounds"]:
        s = r["stage_seconds"]
        lines.append(f"| {r['codec']} | " + " | ".join(f"{s[x]:.2f}" for x in STAGES) + f" | {r['wall_seconds']:.2f} |")
    local = report["local_image_bytes"]
    lines += [
        "",
        "For scale, uploading a device's local images (PNG files) would cost: "
        + ", ".join(f"{d} {v:,} bytes" for d, v in local.items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    report = run(args)
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    atomic_write_text(args.markdown, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
