"""Automated client labelling end to end over the real Mosquitto (127.0.0.1:1883, or a private one).

The daemon probes, samples with ECOS, sends the signed label query, collects the device agent's
private label votes (real thumbnails of its labelled folder, charged to its ledger), keeps the
confident labels, trains the semi-supervised student (trainer ``semisup``), signs and delivers it;
the agent installs it with real onnxruntime. The round's result records the traffic and epsilon.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from broker import requires_broker, shared_broker, unique_id  # noqa: F401 - shared_broker is a fixture

from cloud.serve.config import BrokerConfig, CloudConfig, MetricsConfig, RoundConfig, StoreConfig, TrainerConfig
from cloud.serve.daemon import build_daemon
from cloud.serve.store import RoundState
from cloud.tools.demo import simulated_device_config
from device_sdk.agent import DeviceAgent, EventKind

pytestmark = [pytest.mark.integration, requires_broker]

LABELS = [str(i) for i in range(10)]
TINY_SEMISUP = {
    "semisup": {"width": 4, "epochs": 1, "min_steps": 4, "max_unlabelled": 40},
    "quant": {"calibration_size": 16},
    "gate": {"min_agreement": 0.0, "max_accuracy_drop": 1.0},
}


def test_a_client_labelling_round_over_mqtt_charges_the_ledger_and_ships_a_model(
    tmp_path, shared_broker, digits_root, encoder_path, pool_index
):
    _, index_path = pool_index
    broker = shared_broker
    # min_margin 0: every group takes its top label (the margin rule is tested in tests/serve), so the round never
    # depends on how the device's random noise fell
    cfg = CloudConfig(
        broker=BrokerConfig(broker.host, broker.port, client_id=unique_id("cloud")),
        store=StoreConfig(state_dir=str(tmp_path / "cloud"), index=str(index_path)),
        rounds=RoundConfig(
            budget=60, collect_seconds=60.0, label_groups=6, votes_per_sample=1, min_margin=0.0, label_seconds=60.0
        ),
        metrics=MetricsConfig(port=0),
        trainer=TrainerConfig(name="semisup", threads=1, cache_dir=str(tmp_path / "cache"), options=TINY_SEMISUP),
    )
    daemon = build_daemon(cfg).start()
    device = unique_id("labeller")
    folder = digits_root / "devices" / "printed"
    dcfg = simulated_device_config(
        device,
        str(tmp_path / device),
        broker,
        str(daemon.public_key_path),
        str(encoder_path),
        str(folder / "local"),
        str(folder / "test"),
    )
    dcfg = dataclasses.replace(dcfg, data=dataclasses.replace(dcfg.data, labelled=str(folder / "local")))
    events = []
    agent = DeviceAgent(dcfg, on_event=events.append).start()
    try:
        assert agent.wait_connected(10)
        r = daemon.wait_round(daemon.submit_round([device], task="client", labels=LABELS).round_id, 180)
        assert r.state is RoundState.DONE, r.error

        # the device answered the probe and the label query, each charged once to its ledger, the votes last
        keys = [x["key"] for x in agent.ledger.releases()]
        assert len(keys) == 2 and keys[0].startswith(f"{r.round_id}:") and keys[1].startswith(f"labels:{r.round_id}.")
        (answered,) = [e for e in events if e.kind == EventKind.LABEL_QUERY_ANSWERED]
        assert answered.detail["charged_epsilon"] > 0 and not answered.detail["repeated"]
        spent = agent.ledger.spent()[0]
        assert math.isclose(answered.detail["spent_epsilon"], spent, rel_tol=1e-9)

        # what the round recorded: who voted, epsilon (the votes' and composed with the probe's), traffic
        summary = r.result["client_labelling"]
        assert summary["answered"] == [device] and summary["groups_labelled"] >= 1
        assert math.isclose(summary["epsilon"][device], 2.0, rel_tol=1e-3)  # [privacy] epsilon_per_label_query
        assert math.isclose(summary["epsilon_with_probe"][device], spent, rel_tol=1e-6)
        assert summary["label_bytes_down"] == summary["query_bytes"]  # sent once, answered at once
        traffic = {(t.direction, t.msg_type): t.bytes for t in daemon.store.traffic(round_id=r.round_id)}
        assert traffic[("down", "label_query")] == summary["label_bytes_down"]
        assert traffic[("up", "label_votes")] == summary["label_bytes_up"] > 0

        # the semi-supervised student trained on the voted labels is installed on the device
        installed = agent.store.current("classifier")
        assert installed is not None and installed.sha256 == r.result["sha256"]
        assert agent.model("classifier").meta.labels == LABELS  # the round's labels, without [trainer.options]
        assert r.result["deliveries"][device]["state"] == "installed"
        down, up = (
            sum(b for (d, _), b in traffic.items() if d == "down"),
            sum(b for (d, _), b in traffic.items() if d == "up"),
        )
        print(
            f"\nclient labelling round: query {summary['query_bytes']} B down, votes {summary['label_bytes_up']} B up, "
            f"{summary['groups_labelled']}/{summary['queries']} groups, {summary['images_labelled']}/"
            f"{summary['images']} images labelled; epsilon votes {summary['epsilon'][device]:.4f}, "
            f"with the probe {summary['epsilon_with_probe'][device]:.4f}; round traffic {down} B down, {up} B up "
            f"({dict(sorted(traffic.items()))})"
        )
    finally:
        agent.stop()
        daemon.stop()
