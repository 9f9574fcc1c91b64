"""The cloud daemon against a real Mosquitto, with real device agents, training and delivery.

* a fleet round with two devices ends with the same signed int8 model installed on both;
* ``kill -9`` of the daemon process while collecting and again while training: restarted, the
  round completes, each device answered (and was charged) once, a replayed answer counted once;
* malformed and oversized messages are rejected and logged, and the daemon keeps working;
* a device publishing on another device's topic (or for a round that did not ask it) is ignored.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from broker import requires_broker, unique_id, wait_until

from cloud.security.keys import PUBLIC_NAME
from cloud.serve.config import BrokerConfig, CloudConfig, MetricsConfig, RoundConfig, StoreConfig, TrainerConfig
from cloud.serve.daemon import build_daemon
from cloud.serve.store import RoundState, SqliteStore
from cloud.tools.broker import Broker, free_port, mosquitto_binary, start_mosquitto
from cloud.tools.demo import simulated_device_config
from device_sdk.agent import DeviceAgent
from device_sdk.imagefolder import load_images, scan_image_folder
from device_sdk.protocol import Status, device_status, inbox, outbox
from device_sdk.protocol.envelope import decode, encode
from device_sdk.protocol.round import Probe, Scores
from device_sdk.transport import MqttTransport

pytestmark = [pytest.mark.integration, requires_broker]

TINY_TRAINER = {
    "teacher": {"width": 4, "epochs": 1},
    "student": {"width": 4, "epochs": 1},
    "quant": {"calibration_size": 32},
    "gate": {"min_agreement": 0.0, "max_accuracy_drop": 1.0},
}
BUDGET = 60


@pytest.fixture
def broker():
    """A private Mosquitto (nobody else's messages), else the shared one on 1883 (unique ids keep tests apart)."""
    if mosquitto_binary() is None:
        yield Broker("127.0.0.1", 1883, "given")
        return
    b = start_mosquitto()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teacher-cache")


def cloud_config(
    tmp_path: Path, broker: Broker, index_path: Path, cache: Path, metrics_port: int = 0, **rounds
) -> CloudConfig:
    return CloudConfig(
        broker=BrokerConfig(broker.host, broker.port, client_id=unique_id("cloud")),
        store=StoreConfig(state_dir=str(tmp_path / "cloud"), index=str(index_path)),
        rounds=RoundConfig(**{"budget": BUDGET, "collect_seconds": 60.0, **rounds}),
        metrics=MetricsConfig(port=metrics_port),
        trainer=TrainerConfig(threads=1, cache_dir=str(cache), options=TINY_TRAINER),
    )


def start_agent(
    device_id: str, domain: str, tmp_path: Path, broker: Broker, public_key: Path, encoder: Path, digits_root: Path
) -> DeviceAgent:
    folder = digits_root / "devices" / domain
    cfg = simulated_device_config(
        device_id,
        str(tmp_path / device_id),
        broker,
        str(public_key),
        str(encoder),
        str(folder / "local"),
        str(folder / "test"),
    )
    agent = DeviceAgent(cfg).start()
    assert agent.wait_connected(10)
    return agent


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return resp.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    label_text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(f"{name}{{{label_text}}}" if labels else name) + r" (\S+)"
    found = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


# ---- a full round --------------------------------------------------------------------------------


def test_a_fleet_round_with_two_devices_installs_one_signed_model_on_both(
    tmp_path, broker, digits_root, encoder_path, pool_index, teacher_cache
):
    index, index_path = pool_index
    port = free_port()
    daemon = build_daemon(cloud_config(tmp_path, broker, index_path, teacher_cache, port)).start()
    devices = {unique_id("hand"): "handwritten", unique_id("street"): "street"}
    agents = [
        start_agent(d, dom, tmp_path, broker, daemon.public_key_path, encoder_path, digits_root)
        for d, dom in devices.items()
    ]
    try:
        r = daemon.wait_round(daemon.submit_round(list(devices), fleet=True).round_id, 120)
        assert r.state is RoundState.DONE, r.error
        assert sorted(x.device_id for x in daemon.store.responses(r.round_id)) == sorted(devices)
        assert sum(r.result["composition"].values()) == BUDGET and r.result["selected"] == BUDGET
        for agent in agents:
            installed = agent.store.current("classifier")
            assert installed.sha256 == r.result["sha256"] and installed.artifact_id == r.result["artifact_id"]
            delivery = r.result["deliveries"][agent.device_id]
            assert delivery["state"] == "installed" and delivery["n_eval"] == 40 and 0.0 <= delivery["accuracy"] <= 1.0
            assert len(agent.ledger.releases()) == 1  # charged once for the one probe
            images = load_images(
                [it.path for it in scan_image_folder(digits_root / "devices" / devices[agent.device_id] / "test")[:3]],
                (32, 32),
            )
            assert len(agent.predict(images)) == 3
            traffic = {
                (t.direction, t.msg_type): t
                for t in daemon.store.traffic(round_id=r.round_id, device_id=agent.device_id)
            }
            assert traffic[("down", "probe")].messages == 1 and traffic[("up", "scores")].messages == 1
            assert traffic[("down", "artifact_chunk")].bytes > r.result["size"]  # every byte of the model, plus headers
        text = scrape(port)
        assert metric(text, "ecos_rounds", state="done") == 1
        assert metric(text, "ecos_responses_total", kind="scores", outcome="new") == 2
        assert metric(text, "ecos_deliveries_total", outcome="installed") == 2
    finally:
        for agent in agents:
            agent.stop()
        daemon.stop()


# ---- kill -9 and restart ---------------------------------------------------------------------------


def _serve(config: Path, log: Path) -> subprocess.Popen:
    out = open(log, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloud.cli", "serve", "--config", str(config)],
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    out.close()
    return proc


def _kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


def _write_toml(path: Path, broker: Broker, index_path: Path, cache: Path, state: Path, metrics_port: int) -> None:
    path.write_text(f"""
[broker]
host = "{broker.host}"
port = {broker.port}
client_id = "{unique_id("cloud")}"
[store]
state_dir = "{state}"
index = "{index_path}"
[rounds]
budget = {BUDGET}
collect_seconds = 120
[metrics]
port = {metrics_port}
[trainer]
threads = 1
cache_dir = "{cache}"
[trainer.options]
teacher = {{ width = 4, epochs = 1 }}
student = {{ width = 4, epochs = 5 }}
quant = {{ calibration_size = 32 }}
gate = {{ min_agreement = 0.0, max_accuracy_drop = 1.0 }}
""")


def test_kill_9_mid_round_then_restart_completes_and_counts_each_answer_once(
    tmp_path, broker, digits_root, encoder_path, pool_index, teacher_cache
):
    index, index_path = pool_index
    state, config, log, port = tmp_path / "cloud", tmp_path / "cloud.toml", tmp_path / "daemon.log", free_port()
    _write_toml(config, broker, index_path, teacher_cache, state, port)
    a, b = unique_id("kill-a"), unique_id("kill-b")
    probes = []  # what the cloud sent to device a, seen from the broker
    spy = MqttTransport(
        unique_id("spy"),
        broker.host,
        broker.port,
        subscriptions=[inbox(a)],
        on_message=lambda topic, payload: probes.append(payload),
    ).start()
    proc = _serve(config, log)
    agents = []
    try:
        assert spy.wait_connected(10)
        public_key = state / "keys" / PUBLIC_NAME  # written by the daemon on its first start
        assert wait_until(lambda: _up(port), 60), log.read_text()
        agents.append(start_agent(a, "handwritten", tmp_path, broker, public_key, encoder_path, digits_root))
        submitted = subprocess.run(
            [sys.executable, "-m", "cloud.cli", "round", "--config", str(config), a, b, "--fleet"],
            capture_output=True,
            text=True,
            check=True,
        )
        round_id = re.search(r"round (\w+)", submitted.stdout).group(1)
        store = SqliteStore(str(state / "ecos.db"))
        assert wait_until(lambda: len(store.responses(round_id)) == 1, 30), log.read_text()
        spy.publish(inbox(a), probes[0])  # the same probe again: the device replays its answer for free
        assert wait_until(
            lambda: metric(scrape(port), "ecos_responses_total", kind="scores", outcome="duplicate") == 1, 20
        )

        _kill9(proc)  # 1: while collecting (b has not answered: it is not even running)
        assert store.get_round(round_id).state is RoundState.COLLECTING and len(store.responses(round_id)) == 1
        agents.append(start_agent(b, "street", tmp_path, broker, public_key, encoder_path, digits_root))
        proc = _serve(config, log)
        assert wait_until(lambda: store.get_round(round_id).state is RoundState.TRAINING, 60, interval=0.01), (
            log.read_text()
        )
        assert wait_until(
            lambda: (
                (store.get_job(f"{round_id}:train") or None) and store.get_job(f"{round_id}:train").state == "running"
            ),
            10,
            0.01,
        )

        _kill9(proc)  # 2: while training
        assert (
            store.get_round(round_id).state is RoundState.TRAINING
            and store.get_job(f"{round_id}:train").state == "running"
        )
        proc = _serve(config, log)
        assert wait_until(lambda: store.get_round(round_id).state.terminal, 120), log.read_text()

        r = store.get_round(round_id)
        assert r.state is RoundState.DONE, r.error
        assert sorted(x.device_id for x in store.responses(round_id)) == sorted([a, b])
        assert store.get_job(f"{round_id}:train").attempt == 2
        assert [len(agent.ledger.releases()) for agent in agents] == [1, 1]  # the replay and re-probes cost nothing
        for agent in agents:
            assert agent.store.current("classifier").sha256 == r.result["sha256"]
        sent = [Probe.from_bytes(p).probe_id for p in probes if decode(p).type == "probe"]
        assert sent == [
            round_id,
            round_id,
        ]  # the original and our replay: restarts did not re-probe a device that answered
        assert "round_state" in log.read_text() and "daemon_start" in log.read_text()
        store.close()
    finally:
        for agent in agents:
            agent.stop()
        spy.stop()
        if proc.poll() is None:
            proc.terminate()
            proc.wait(20)


def _up(port: int) -> bool:
    try:
        scrape(port)
        return True
    except OSError:
        return False


# ---- hostile and broken input ----------------------------------------------------------------------


@pytest.fixture
def daemon(tmp_path, broker, pool_index, teacher_cache):
    index, index_path = pool_index
    d = build_daemon(cloud_config(tmp_path, broker, index_path, teacher_cache, collect_seconds=30.0)).start()
    assert d.transport.wait_connected(10)
    yield d
    d.stop()


def _publisher(broker: Broker) -> MqttTransport:
    t = MqttTransport(unique_id("raw"), broker.host, broker.port).start()
    assert t.wait_connected(10)
    return t


def test_malformed_and_oversized_messages_are_rejected_logged_and_the_daemon_goes_on(daemon, broker, caplog):
    dev = unique_id("noisy")
    limit = daemon.cfg.broker.max_message_bytes
    bad = {
        "garbage": b"hello, cloud",
        "truncated": Status(dev, "online").to_bytes()[:-3],
        "unknown type": encode("gossip", {"id": "x1", "device_id": dev}),
        "bad field": encode(
            "status", {"id": "x2", "device_id": dev, "state": "dancing", "model": None, "encoder": None}
        ),
        "oversized": b"\0" * (limit + 1),
    }
    raw = _publisher(broker)
    try:
        with caplog.at_level("WARNING", logger="ecos.daemon"):
            for payload in bad.values():
                raw.publish(outbox(dev), payload)
            raw.publish(device_status(dev), Status(dev, "online").to_bytes())  # and then a valid one
            assert wait_until(lambda: daemon.store.get_device(dev), 10)
        text = daemon.metrics.render()
        assert metric(text, "ecos_errors_total", reason="malformed") == 4
        assert metric(text, "ecos_errors_total", reason="oversized") == 1
        rejected = [
            rec.getMessage()
            for rec in caplog.records
            if "message_rejected" in rec.getMessage() and dev in rec.getMessage()
        ]
        assert len(rejected) == 5 and any("oversized" in m for m in rejected) and any("gossip" in m for m in rejected)
        assert daemon._thread.is_alive() and daemon.store.get_device(dev).state == "online"
    finally:
        raw.stop()


def test_a_device_publishing_on_another_devices_topic_is_ignored(
    daemon, broker, tmp_path, digits_root, encoder_path, pool_index, caplog
):
    index, _ = pool_index
    victim, attacker = unique_id("victim"), unique_id("attacker")
    r = daemon.submit_round([victim])
    assert wait_until(lambda: daemon.store.get_round(r.round_id).state is RoundState.COLLECTING, 10)
    forged = {
        name: Scores(r.round_id, claimed, index.encoder_sha256, np.full(index.k, 1000.0), 1.0, message_id=name)
        for name, claimed in (("as-victim", victim), ("as-self", attacker))
    }
    raw = _publisher(broker)
    agent = None
    try:
        with caplog.at_level("WARNING", logger="ecos.daemon"):
            raw.publish(outbox(attacker), forged["as-victim"].to_bytes())  # claims to be the victim, on its own topic
            raw.publish(outbox(victim), forged["as-self"].to_bytes())  # its own id, on the victim's topic
            raw.publish(outbox(attacker), forged["as-self"].to_bytes())  # honest id, but the round did not ask it
            assert wait_until(lambda: len([x for x in caplog.records if "message_rejected" in x.getMessage()]) >= 3, 10)
        assert daemon.store.responses(r.round_id) == []
        agent = start_agent(victim, "printed", tmp_path, broker, daemon.public_key_path, encoder_path, digits_root)
        done = daemon.wait_round(r.round_id, 120)
        assert done.state is RoundState.DONE, done.error
        (only,) = daemon.store.responses(r.round_id)
        assert only.device_id == victim and only.message_id not in forged
        assert daemon.store.get_device(attacker) is None and daemon.store.traffic(device_id=attacker) == []
        messages = " ".join(x.getMessage() for x in caplog.records)
        assert "claims device" in messages and "did not ask it" in messages
    finally:
        raw.stop()
        if agent is not None:
            agent.stop()
