"""Over the air against a real Mosquitto: the device agent, signed delivery, probes and restarts.

Each test runs a real ``DeviceAgent`` (its MQTT transport, worker thread, ledger and model
store) and plays the cloud with a real ``MqttTransport`` and ``ArtifactSender``. Models are
real ONNX classifiers (a ridge-regression linear layer fitted with numpy on the device's local
images, exported with onnx.helper) so installing runs onnxruntime and the accuracy is real.
"""

from __future__ import annotations

import dataclasses
import queue
import time

import numpy as np
import pytest
from broker import CloudClient, private_broker, requires_broker, shared_broker, unique_id, wait_until  # noqa: F401

from cloud.security.keys import KeyRing, SigningKey, generate_keypair, sign
from cloud.serve.delivery import ArtifactSender, build_manifest
from device_sdk.agent import DeviceAgent
from device_sdk.config import load_device_config
from device_sdk.imagefolder import load_images, scan_image_folder
from device_sdk.protocol import Ack, Installed, InstallFailed, Refusal, Status, inbox
from device_sdk.protocol.envelope import encode
from device_sdk.protocol.round import Probe, Scores, new_id
from device_sdk.runtime import load_model
from device_sdk.runtime.artifact import META_KEY, ArtifactMeta

pytestmark = [pytest.mark.integration, requires_broker]
DOMAIN = "printed"


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return generate_keypair(tmp_path_factory.mktemp("cloud-keys"))


def _make_classifier(path, digits_root, ridge: float) -> None:
    """A linear classifier on raw pixels, fitted on the device's local images; ONNX with ECOS metadata."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    items = scan_image_folder(digits_root / "devices" / DOMAIN / "local")
    labels = sorted({it.label for it in items})
    x = (
        load_images([it.path for it in items], (32, 32))
        .astype(np.float32)
        .transpose(0, 3, 1, 2)
        .reshape(len(items), -1)
    )
    x = (x / 255.0 - 0.5) / 0.25
    y = np.eye(len(labels), dtype=np.float32)[[labels.index(it.label) for it in items]]
    w = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1], dtype=np.float32), x.T @ y).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "linear",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(labels)])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    meta = ArtifactMeta(
        kind="classifier",
        arch="linear",
        input_shape=(3, 32, 32),
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        labels=labels,
        precision="fp32",
    )
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, meta.to_json()
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def classifiers(digits_root, tmp_path_factory):
    """Two versions of a ~120 KB classifier (different ridge penalties)."""
    folder = tmp_path_factory.mktemp("classifiers")
    paths = [folder / "v1.onnx", folder / "v2.onnx"]
    for path, ridge in zip(paths, (1000.0, 10.0)):
        _make_classifier(path, digits_root, ridge)
    return paths


def _agent(
    tmp_path,
    broker,
    keys,
    *,
    protocol="5",
    encoder=None,
    local=None,
    evaluate=None,
    budget=3.0,
    device_id=None,
    on_event=None,
) -> DeviceAgent:
    """A device agent configured through a real device.toml."""
    lines = [
        f'device_id = "{device_id or unique_id("dev")}"',
        f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\nprotocol = "{protocol}"\nkeepalive = 5',
        f"[privacy]\nbudget_epsilon = {budget}\nepsilon_per_probe = 0.58",
        "[data]" + (f'\nlocal = "{local}"' if local else "") + (f'\neval = "{evaluate}"' if evaluate else ""),
        f'[models]\ncloud_public_key = "{keys[1]}"' + (f'\nencoder = "{encoder}"' if encoder else ""),
    ]
    (tmp_path / "device.toml").write_text("\n".join(lines) + "\n")
    return DeviceAgent(load_device_config(str(tmp_path / "device.toml")), on_event=on_event)


def _connected(agent: DeviceAgent) -> DeviceAgent:
    agent.start()
    assert agent.wait_connected(10), "device agent could not connect"
    return agent


def _drive(cloud: CloudClient, sender: ArtifactSender, timeout: float = 60.0, on_ack=None):
    """The daemon's loop for one delivery: route acks and results to the sender, tick it."""
    sender.start()
    end = time.monotonic() + timeout
    while not sender.done and time.monotonic() < end:
        try:
            _, msg = cloud.messages.get(timeout=0.05)
        except queue.Empty:
            msg = None
        if isinstance(msg, Ack):
            sender.on_ack(msg)
            if on_ack is not None:
                on_ack(msg)
        elif isinstance(msg, (Installed, InstallFailed)):
            sender.on_result(msg)
        sender.tick()
    assert sender.done, f"delivery did not finish in {timeout}s (acked {sender.acked}/{sender.manifest.n_chunks})"
    return sender.result


def _accuracy(model_path, folder):
    model = load_model(str(model_path))
    items = scan_image_folder(folder)
    pred = model.run(load_images([it.path for it in items], (32, 32))).argmax(axis=1)
    return float(np.mean([model.meta.labels[p] == it.label for p, it in zip(pred, items)])), len(items)


# ---- delivery ----------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_full_delivery_installs_reports_accuracy_and_predicts(
    protocol, shared_broker, keys, classifiers, digits_root, tmp_path
):
    eval_folder = digits_root / "devices" / DOMAIN / "test"
    agent = _agent(tmp_path, shared_broker, keys, protocol=protocol, evaluate=eval_folder)
    with CloudClient(shared_broker, [agent.device_id], protocol) as cloud:
        _connected(agent)
        assert cloud.next(kind=Status).state == "online"
        manifest = build_manifest(
            classifiers[0], keys[0], name="student", version=1, targets=[agent.device_id], chunk_size=8 << 10
        )
        sender = ArtifactSender(cloud.transport, agent.device_id, classifiers[0], manifest, window=4, timeout=5)
        result = _drive(cloud, sender)

        assert isinstance(result, Installed) and result.sha256 == manifest.sha256
        accuracy, n = _accuracy(classifiers[0], eval_folder)
        assert (result.accuracy, result.n_eval) == (pytest.approx(accuracy), n) and n == 40
        assert accuracy > 0.2  # a fitted model, well above chance (0.1) on the device's own test images
        status = cloud.next(kind=Status)
        assert status.state == "online" and status.model["artifact_id"] == manifest.artifact_id
        images = load_images([it.path for it in scan_image_folder(eval_folder)][:5], (32, 32))
        expected = load_model(str(classifiers[0])).run(images).argmax(axis=1)
        assert agent.predict(images) == [load_model(str(classifiers[0])).meta.labels[i] for i in expected]
        assert sender.chunks_sent == manifest.n_chunks and agent.stats.bytes_in >= manifest.size
        agent.stop()
        assert cloud.next(kind=Status).state == "offline"


def test_corrupted_chunk_and_bad_signature_are_refused_and_the_old_model_kept(
    shared_broker, keys, classifiers, tmp_path
):
    agent = _connected(_agent(tmp_path, shared_broker, keys))
    try:
        with CloudClient(shared_broker, [agent.device_id]) as cloud:
            good = build_manifest(
                classifiers[0], keys[0], name="student", version=1, targets=[agent.device_id], chunk_size=8 << 10
            )
            assert isinstance(
                _drive(cloud, ArtifactSender(cloud.transport, agent.device_id, classifiers[0], good)), Installed
            )

            new = build_manifest(
                classifiers[1], keys[0], name="student", version=2, targets=[agent.device_id], chunk_size=8 << 10
            )
            corrupted = tmp_path / "corrupted.onnx"
            data = bytearray(classifiers[1].read_bytes())
            data[3 * (8 << 10) + 100] ^= 0x01  # one bit of chunk 3
            corrupted.write_bytes(bytes(data))
            failed = _drive(cloud, ArtifactSender(cloud.transport, agent.device_id, corrupted, new))
            assert isinstance(failed, InstallFailed) and failed.code == "bad_chunk"

            other_private, _ = generate_keypair(tmp_path / "attacker")
            forged = new.with_signature(sign(other_private, new.signed_bytes()))
            refused = _drive(cloud, ArtifactSender(cloud.transport, agent.device_id, classifiers[1], forged))
            assert isinstance(refused, InstallFailed) and refused.code == "bad_signature"

            assert agent.store.current("classifier").sha256 == good.sha256
            assert not any(agent.store.incoming_dir.glob("*/chunk-*"))  # nothing of the refused artifacts kept
            assert agent.model("classifier").sha256 == good.sha256
    finally:
        agent.stop()


def test_broker_restart_mid_delivery_resumes_from_the_last_good_chunk(private_broker, keys, classifiers, tmp_path):
    agent = _connected(_agent(tmp_path, private_broker, keys))
    manifest = build_manifest(
        classifiers[0], keys[0], name="student", version=1, targets=[agent.device_id], chunk_size=2 << 10
    )
    state = {"acked_at_restart": None, "acks_after": []}

    def restart_broker_once(ack: Ack) -> None:
        if state["acked_at_restart"] is None and ack.next_chunk >= manifest.n_chunks // 3:
            state["acked_at_restart"] = ack.next_chunk
            private_broker.kill()
            private_broker.start()
        elif state["acked_at_restart"] is not None:
            state["acks_after"].append(ack.next_chunk)

    try:
        with CloudClient(private_broker, [agent.device_id]) as cloud:
            sender = ArtifactSender(cloud.transport, agent.device_id, classifiers[0], manifest, window=2, timeout=2)
            result = _drive(cloud, sender, on_ack=restart_broker_once)
        assert isinstance(result, Installed) and result.sha256 == manifest.sha256
        assert state["acked_at_restart"] is not None and min(state["acks_after"]) >= state["acked_at_restart"]
        assert agent.transport.connect_count >= 2  # the outage was real: the device had to reconnect
        assert sender.chunks_sent <= manifest.n_chunks + 2 * (sender.attempts + 1)  # never from zero again
    finally:
        agent.stop()


def test_device_restart_mid_delivery_resumes_from_its_persisted_chunks(shared_broker, keys, classifiers, tmp_path):
    first = _connected(_agent(tmp_path, shared_broker, keys))
    manifest = build_manifest(
        classifiers[0], keys[0], name="student", version=1, targets=[first.device_id], chunk_size=2 << 10
    )
    agents = [first]
    state = {"stopped_at": None, "acks_after": []}

    def restart_device_once(ack: Ack) -> None:
        if state["stopped_at"] is None and ack.next_chunk >= manifest.n_chunks // 2:
            state["stopped_at"] = ack.next_chunk
            first.stop()  # the process ends; chunks in flight are lost
            agents.append(_connected(_agent(tmp_path, shared_broker, keys, device_id=first.device_id)))
        elif state["stopped_at"] is not None:
            state["acks_after"].append(ack.next_chunk)

    try:
        with CloudClient(shared_broker, [first.device_id]) as cloud:
            sender = ArtifactSender(cloud.transport, first.device_id, classifiers[0], manifest, window=2, timeout=2)
            result = _drive(cloud, sender, on_ack=restart_device_once)
        assert isinstance(result, Installed) and agents[-1].store.current("classifier").sha256 == manifest.sha256
        assert len(agents) == 2 and min(state["acks_after"]) >= state["stopped_at"]
        assert sender.chunks_sent < manifest.n_chunks + 2 * (sender.attempts + 2)
    finally:
        agents[-1].stop()


# ---- probes ------------------------------------------------------------------------------------


def _answered(events):
    """``repeated`` flag of each probe the agent answered, in order."""
    return [e.detail["repeated"] for e in events if e.kind == "probe_answered"]


def test_replayed_probe_costs_nothing_and_refusals_are_replies(
    shared_broker, keys, pool_index, encoder_path, digits_root, tmp_path
):
    index, _ = pool_index
    events = []
    agent = _connected(
        _agent(
            tmp_path,
            shared_broker,
            keys,
            encoder=encoder_path,
            budget=0.8,
            local=digits_root / "devices" / DOMAIN / "local",
            on_event=events.append,
        )
    )
    topic = inbox(agent.device_id)
    try:
        with CloudClient(shared_broker, [agent.device_id]) as cloud:
            probe = dataclasses.replace(index.probe(), probe_id=new_id())
            signer = SigningKey.load(keys[0])
            cloud.transport.publish(topic, probe.to_bytes(signer))
            first = cloud.next(kind=Scores)
            spent = agent.ledger.spent()[0]
            cloud.transport.publish(topic, probe.to_bytes(signer))
            again = cloud.next(kind=Scores)
            assert again.message_id == first.message_id and np.array_equal(again.scores, first.scores)
            assert agent.ledger.spent()[0] == spent and len(agent.ledger.releases()) == 1
            assert wait_until(lambda: _answered(events) == [False, True], timeout=5)  # events follow the publish

            cloud.transport.publish(topic, dataclasses.replace(probe, probe_id=new_id()).to_bytes(signer))
            over = cloud.next(kind=Refusal)
            assert over.code == "privacy_budget" and agent.ledger.spent()[0] == spent
            late = dataclasses.replace(probe, probe_id=new_id(), deadline=time.time() - 5)
            cloud.transport.publish(topic, late.to_bytes(signer))
            assert cloud.next(kind=Refusal).code == "deadline"
            foreign = Probe(new_id(), "f" * 64, index.centroids)
            cloud.transport.publish(topic, foreign.to_bytes(signer))
            assert cloud.next(kind=Refusal).code == "mismatch"
            assert len(agent.ledger.releases()) == 1
    finally:
        agent.stop()


def test_malformed_and_oversized_messages_are_dropped_and_the_agent_keeps_working(
    shared_broker, keys, pool_index, encoder_path, digits_root, tmp_path
):
    index, _ = pool_index
    agent = _connected(
        _agent(tmp_path, shared_broker, keys, encoder=encoder_path, local=digits_root / "devices" / DOMAIN / "local")
    )
    topic = inbox(agent.device_id)
    try:
        with CloudClient(shared_broker, [agent.device_id]) as cloud:
            bad = [
                b"not ecos",
                b"ECOS" + b"\xff" * 64,
                encode("bogus", {"id": "x"}),
                Scores("p", agent.device_id, "e" * 64, np.zeros(2), 1.0).to_bytes(),  # wrong direction
                encode(
                    "artifact_chunk", {"artifact_id": "../../x", "index": 0, "id": "i"}, {"data": np.zeros(4, np.uint8)}
                ),
                b"\0" * (5 << 20),
            ]
            for payload in bad:
                cloud.transport.publish(topic, payload)
            probe = dataclasses.replace(index.probe(), probe_id=new_id())
            cloud.transport.publish(topic, probe.to_bytes(SigningKey.load(keys[0])))
            assert cloud.next(kind=Scores).probe_id == probe.probe_id
            assert agent.stats.rejected == len(bad)
    finally:
        agent.stop()


def test_forged_probes_over_mqtt_are_dropped_unanswered_and_cost_nothing(
    shared_broker, keys, pool_index, encoder_path, digits_root, tmp_path
):
    """Issue 8 item 2: whoever can write the inbox drained the budget (19 forged probes). Now nothing is spent."""
    index, _ = pool_index
    events = []
    agent = _connected(
        _agent(
            tmp_path,
            shared_broker,
            keys,
            encoder=encoder_path,
            budget=3.0,
            local=digits_root / "devices" / DOMAIN / "local",
            on_event=events.append,
        )
    )
    topic = inbox(agent.device_id)
    attacker = SigningKey.load(generate_keypair(tmp_path / "attacker")[0])
    signer = SigningKey.load(keys[0])
    try:
        with CloudClient(shared_broker, [agent.device_id]) as cloud:
            real = dataclasses.replace(index.probe(), probe_id=new_id())
            forged, real_signed = [], Probe.from_bytes(real.to_bytes(signer))
            for n in range(60):
                probe = dataclasses.replace(index.probe(), probe_id=new_id())
                forged.append(
                    probe.to_bytes()
                    if n % 3 == 0
                    else probe.to_bytes(attacker)
                    if n % 3 == 1
                    else dataclasses.replace(real_signed, probe_id=new_id()).to_bytes()
                )  # signature kept
            started = time.monotonic()
            for payload in forged:
                cloud.transport.publish(topic, payload)
            cloud.transport.publish(topic, real.to_bytes(signer))
            replies = [cloud.next(timeout=60)]
            while not isinstance(replies[-1], Scores):
                replies.append(cloud.next(timeout=60))
            seconds = time.monotonic() - started
            kinds = [type(m).__name__ for m in replies]
            assert replies[-1].probe_id == real.probe_id, kinds
            assert "Refusal" not in kinds, kinds  # no reply to a forgery: it could fail the round
            rejected = [e for e in events if e.kind == "probe_rejected"]
            codes = {e.detail["code"] for e in rejected}
            assert len(rejected) == 60 and codes == {"unsigned", "unknown_key", "bad_signature"}, (len(rejected), codes)
            assert len(agent.ledger.releases()) == 1
            assert wait_until(lambda: agent.stats.messages_out == 1, timeout=5), agent.stats  # counted after publish
            print(f"60 forged probes refused, 0 charged, real probe answered in {seconds:.2f}s")
    finally:
        agent.stop()


def test_a_key_rotation_over_mqtt(shared_broker, keys, classifiers, tmp_path):
    """Issue 8 item 6: the next key reaches the device signed by the current one; models signed with it install."""
    ring_dir = tmp_path / "ring"
    ring_dir.mkdir()
    for src, name in ((keys[0], "cloud_ed25519.pem"), (keys[1], "cloud_ed25519.pub.pem")):
        (ring_dir / name).write_bytes(src.read_bytes())
    ring = KeyRing(ring_dir)
    agent = _connected(_agent(tmp_path, shared_broker, keys))
    try:
        with CloudClient(shared_broker, [agent.device_id]) as cloud:
            assert cloud.next(kind=Status).keys == [ring.current.key_id]
            nxt = ring.new_next()
            cloud.transport.publish(inbox(agent.device_id), ring.key_update().to_bytes())
            assert sorted(cloud.next(kind=Status).keys) == sorted([ring.current.key_id, nxt.key_id])
            old = ring.current.key_id
            ring.promote()
            manifest = build_manifest(
                classifiers[0], ring.current, name="student", version=1, targets=[agent.device_id], chunk_size=8 << 10
            )
            assert manifest.key_id == nxt.key_id
            assert isinstance(
                _drive(cloud, ArtifactSender(cloud.transport, agent.device_id, classifiers[0], manifest)), Installed
            )
            ring.revoke(old)
            cloud.transport.publish(inbox(agent.device_id), ring.key_update().to_bytes())
            status = cloud.next(kind=Status)
            while status.keys != [nxt.key_id]:  # the status republished after the install may come first
                status = cloud.next(kind=Status)
            stale = build_manifest(
                classifiers[1], keys[0], name="student", version=2, targets=[agent.device_id], chunk_size=8 << 10
            )
            refused = _drive(cloud, ArtifactSender(cloud.transport, agent.device_id, classifiers[1], stale))
            assert isinstance(refused, InstallFailed) and refused.code == "revoked_key"
    finally:
        agent.stop()


# ---- the command-line agent and its last will --------------------------------------------------


def test_ecos_device_run_announces_itself_and_its_will_reports_a_crash(shared_broker, keys, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    agent = _agent(tmp_path, shared_broker, keys)  # writes device.toml; this process never starts it
    command = [sys.executable, "-m", "device_sdk.cli", "run", "--config", str(tmp_path / "device.toml"), "-q"]
    with CloudClient(shared_broker, [agent.device_id]) as cloud:
        for sig, how in ((signal.SIGTERM, "clean stop"), (signal.SIGKILL, "last will")):
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                assert cloud.next(timeout=30, kind=Status).state == "online", how
                os.kill(proc.pid, sig)
                assert cloud.next(timeout=15, kind=Status).state == "offline", how  # will: 1.5 x keepalive (5 s)
                out, _ = proc.communicate(timeout=10)
            finally:
                if proc.poll() is None:
                    proc.kill()
            if sig == signal.SIGTERM:
                assert proc.returncode == 0 and "stopped;" in out, out
