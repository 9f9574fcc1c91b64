"""The MQTT protocol without a broker: topics, schemas, signing, the delivery state machines, config."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat

import numpy as np
import pytest

import device_sdk.protocol as P
from cloud.security.keys import ensure_keypair, generate_keypair, sign
from cloud.serve.delivery import ArtifactSender, build_manifest
from device_sdk.config import load_device_config
from device_sdk.delivery.install import DeliveryReceiver, ModelStore
from device_sdk.errors import MessageError, SignatureError, UsageError
from device_sdk.protocol import envelope as wire
from device_sdk.protocol.round import Probe, Scores
from device_sdk.signing import load_public_key, verify

META = {
    "kind": "classifier",
    "arch": "linear",
    "input_shape": [3, 8, 8],
    "mean": [0.5] * 3,
    "std": [0.25] * 3,
    "labels": ["a", "b"],
    "precision": "int8",
}


# ---- topics ------------------------------------------------------------------------------------


def test_topics_are_versioned_and_per_device():
    assert P.inbox("pi-1") == "ecos/v1/dev/pi-1/in"
    assert P.outbox("pi-1") == "ecos/v1/dev/pi-1/out"
    assert P.device_status("pi-1") == "ecos/v1/dev/pi-1/status"
    assert P.CLOUD_STATUS == "ecos/v1/cloud/status"
    assert P.parse_topic("ecos/v1/dev/pi-1/out") == ("pi-1", "out")
    assert P.parse_topic("ecos/v1/dev/pi-1/other") is None and P.parse_topic("ecos/v2/dev/pi-1/out") is None


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "x" * 65, "..", "dev 1", "dév", None, 7])
def test_device_ids_that_could_escape_their_topic_are_refused(bad):
    with pytest.raises(UsageError):
        P.inbox(bad)
    assert not P.is_valid_id(bad)


# ---- schemas -----------------------------------------------------------------------------------


def _messages():
    return [
        P.Ack("pi-1", "art-1", 3),
        P.Refusal("probe-1", "pi-1", "privacy_budget", "over budget"),
        P.Installed("pi-1", "art-1", 7, "a" * 64, 0.75, 40),
        P.Installed("pi-1", "art-1", 7, "a" * 64, None, 0),
        P.InstallFailed("pi-1", "art-1", "bad_signature", "nope"),
        P.Status("pi-1", "online", {"artifact_id": "art-1", "version": 2}, None),
        P.ArtifactChunk("art-1", 2, b"\x00\x01\xff" * 100),
        P.ArtifactManifest(
            "art-1", "student", 7, "onnx", "int8", 2500, "b" * 64, 1024, ["c" * 64] * 3, META, "d" * 128
        ),
    ]


@pytest.mark.parametrize("msg", _messages(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg):
    assert P.decode_message(msg.to_bytes()) == msg


def test_artifact_version_does_not_clash_with_the_protocol_version():
    manifest = _messages()[-1]
    env = wire.decode(manifest.to_bytes())
    assert env.fields["artifact_version"] == 7 and P.decode_message(manifest.to_bytes()).version == 7


def test_probe_deadline_is_optional_and_round_trips():
    probe = Probe("p1", "e" * 64, np.eye(4, dtype=np.float32), deadline=1234.5)
    assert P.decode_message(probe.to_bytes()).deadline == 1234.5
    assert P.decode_message(dataclasses.replace(probe, deadline=None).to_bytes()).deadline is None


def _with_fields(msg, **changes) -> bytes:
    """``msg`` re-encoded with raw JSON fields changed (bypassing the outgoing checks)."""
    env = wire.decode(msg.to_bytes())
    return wire.encode(
        env.type, {**{k: v for k, v in env.fields.items() if k not in ("type", "version")}, **changes}, env.arrays
    )


@pytest.mark.parametrize(
    "payload, why",
    [
        (b"garbage", "bad magic"),
        (P.Ack("pi-1", "art-1", 3).to_bytes()[:-3], "truncated"),
        (wire.encode("bogus", {"id": "x"}), "type"),
        (_with_fields(P.Ack("pi-1", "art-1", 3), next_chunk=True), "next_chunk"),
        (_with_fields(P.Ack("pi-1", "art-1", 3), next_chunk=-1), "negative"),
        (_with_fields(P.Ack("pi-1", "art-1", 3), artifact_id="../../etc"), "artifact_id"),
        (_with_fields(P.Installed("pi-1", "a", 1, "a" * 64, 0.5, 1), accuracy=float("nan")), "accuracy"),
        (_with_fields(P.Installed("pi-1", "a", 1, "a" * 64, 0.5, 1), accuracy=1.5), "accuracy"),
        (_with_fields(P.Status("pi-1", "online"), state="dancing"), "state"),
        (_with_fields(P.Status("pi-1", "online"), model={"version": 1}), "model"),
        (_with_fields(_messages()[-1], chunk_sha256=["c" * 64] * 2), "chunk hashes"),
        (_with_fields(_messages()[-1], chunk_size=512 << 10), "chunk_size"),
        (_with_fields(_messages()[-1], meta={"kind": "classifier"}), "metadata"),
        (_with_fields(_messages()[-1], format="exe"), "format"),
        (b"\0" * (P.MAX_PAYLOAD_BYTES + 1), "payload limit"),
    ],
)
def test_malformed_messages_are_message_errors(payload, why):
    with pytest.raises(MessageError, match=why):
        P.decode_message(payload)


def test_oversized_chunk_is_refused_on_both_ends():
    chunk = P.ArtifactChunk("art-1", 0, b"x" * (P.MAX_CHUNK_SIZE + 1))
    with pytest.raises(MessageError, match="limit"):
        chunk.to_bytes()
    raw = wire.encode(
        "artifact_chunk",
        {"artifact_id": "art-1", "index": 0, "id": "i"},
        {"data": np.zeros(P.MAX_CHUNK_SIZE + 1, np.uint8)},
    )
    with pytest.raises(MessageError, match="limit"):
        P.decode_message(raw)


def test_a_device_cannot_speak_for_another_device():
    assert P.decode_from_device(P.outbox("pi-1"), P.Ack("pi-1", "a", 0).to_bytes())[0] == "pi-1"
    with pytest.raises(MessageError, match="claims device 'pi-2'"):
        P.decode_from_device(P.outbox("pi-1"), P.Ack("pi-2", "a", 0).to_bytes())
    with pytest.raises(MessageError, match="claims"):
        P.decode_from_device(P.device_status("pi-1"), P.Status("pi-2", "online").to_bytes())
    scores = Scores("probe", "pi-2", "e" * 64, np.zeros(3), 1.0).to_bytes()
    with pytest.raises(MessageError, match="claims"):
        P.decode_from_device(P.outbox("pi-1"), scores)


def test_messages_only_travel_in_their_direction_and_on_their_topic():
    with pytest.raises(MessageError, match="not accepted"):  # a probe forged on a device outbox
        P.decode_from_device(P.outbox("pi-1"), Probe("p", "e" * 64, np.eye(2, dtype=np.float32)).to_bytes())
    with pytest.raises(MessageError, match="not accepted"):  # a status on the outbox, not the retained topic
        P.decode_from_device(P.outbox("pi-1"), P.Status("pi-1", "online").to_bytes())
    with pytest.raises(MessageError, match="not a device outbox"):
        P.decode_from_device(P.inbox("pi-1"), P.Ack("pi-1", "a", 0).to_bytes())
    with pytest.raises(MessageError, match="not accepted"):
        P.decode_for_device("pi-1", P.inbox("pi-1"), P.Ack("pi-1", "a", 0).to_bytes())
    with pytest.raises(MessageError, match="not for device"):
        P.decode_for_device("pi-1", P.inbox("pi-2"), P.ArtifactChunk("a", 0, b"x").to_bytes())


# ---- signing -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return generate_keypair(tmp_path_factory.mktemp("keys"))


def test_signatures_verify_only_the_signed_bytes_with_the_right_key(keys, tmp_path):
    private, public = keys
    signature = sign(private, b"model bytes")
    verify(load_public_key(public), b"model bytes", signature)
    with pytest.raises(SignatureError):
        verify(load_public_key(public), b"model bytez", signature)
    other_private, _ = generate_keypair(tmp_path / "other")
    with pytest.raises(SignatureError):
        verify(load_public_key(public), b"model bytes", sign(other_private, b"model bytes"))
    with pytest.raises(SignatureError):
        verify(load_public_key(public), b"model bytes", "zz")


def test_public_key_as_raw_hex_and_key_files(keys, tmp_path):
    private, public = keys
    raw = load_public_key(public).public_bytes_raw().hex()
    (tmp_path / "cloud.hex").write_text(raw + "\n")
    verify(load_public_key(tmp_path / "cloud.hex"), b"m", sign(private, b"m"))
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    with pytest.raises(UsageError, match="refusing"):
        generate_keypair(private.parent)
    assert ensure_keypair(private.parent) == (private, public)
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(UsageError, match="neither"):
        load_public_key(tmp_path / "junk.pem")


# ---- delivery state machines, wired back to back -----------------------------------------------


class Loopback:
    """Stands in for the broker: collects what the sender publishes."""

    def __init__(self):
        self.sent = []

    def publish(self, topic, payload, qos=1, retain=False):
        self.sent.append((topic, payload))


def _artifact(tmp_path, name="m.onnx", size=10_000, seed=0):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def _run(sender, receiver, drop=lambda msg: False, shuffle=None):
    """Deliver everything the sender publishes to the receiver and its replies back, until done or silent."""
    link = sender.transport
    replies = []
    while link.sent and not sender.done:
        batch, link.sent = link.sent, []
        msgs = [P.decode_message(payload) for _, payload in batch]
        if shuffle is not None:
            shuffle.shuffle(msgs)
        for msg in msgs:
            if drop(msg):
                continue
            for reply in receiver.handle(msg):
                reply = P.decode_message(reply.to_bytes())
                replies.append(reply)
                if isinstance(reply, P.Ack):
                    sender.on_ack(reply, now=0)
                else:
                    sender.on_result(reply)
    return replies


@pytest.fixture
def store_and_receiver(keys, tmp_path):
    store = ModelStore(tmp_path / "store")
    return store, DeliveryReceiver(store, load_public_key(keys[1]), "pi-1", max_bytes=1 << 20)


def _deliver(keys, receiver, path, version=1, **kw):
    manifest = build_manifest(
        path, keys[0], name="student", version=version, targets=["pi-1"], chunk_size=1024, meta=META
    )
    sender = ArtifactSender(Loopback(), "pi-1", path, manifest, window=3, timeout=5)
    sender.start(now=0)
    return manifest, sender, _run(sender, receiver, **kw)


def test_delivery_installs_the_exact_bytes(keys, tmp_path, store_and_receiver):
    store, receiver = store_and_receiver
    path = _artifact(tmp_path)
    manifest, sender, replies = _deliver(keys, receiver, path, shuffle=np.random.default_rng(1))
    assert sender.outcome == "installed" and manifest.n_chunks == 10
    current = store.current("classifier")
    assert current.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == manifest.sha256
    assert open(current.path, "rb").read() == path.read_bytes()
    assert not (store.incoming_dir / manifest.artifact_id).exists()
    assert sender.chunks_sent <= manifest.n_chunks + 3  # out-of-order arrival costs at most a window


def test_new_model_keeps_previous_and_rolls_back(keys, tmp_path, store_and_receiver):
    store, receiver = store_and_receiver
    first, _, _ = _deliver(keys, receiver, _artifact(tmp_path, "v1.onnx", seed=1), version=1)
    second, _, _ = _deliver(keys, receiver, _artifact(tmp_path, "v2.onnx", seed=2), version=2)
    assert store.current("classifier").sha256 == second.sha256 and store.previous("classifier").sha256 == first.sha256
    assert store.rollback("classifier").sha256 == first.sha256
    assert store.current("classifier").sha256 == first.sha256 and store.previous("classifier").sha256 == second.sha256
    assert len(list(store.models_dir.iterdir())) == 2
    _, _, replies = _deliver(keys, receiver, _artifact(tmp_path, "v0.onnx", seed=3), version=0)
    assert replies[-1].code == "stale_version" and "not above v2" in replies[-1].reason


def test_bad_chunk_and_bad_signature_are_refused_and_the_model_kept(keys, tmp_path, store_and_receiver):
    store, receiver = store_and_receiver
    good, _, _ = _deliver(keys, receiver, _artifact(tmp_path, "v1.onnx", seed=1))
    path = _artifact(tmp_path, "v2.onnx", seed=2)
    manifest = build_manifest(path, keys[0], name="student", version=2, targets=["pi-1"], chunk_size=1024, meta=META)
    data = bytearray(path.read_bytes())
    data[2500] ^= 0xFF  # corrupt chunk 2 after signing
    path.write_bytes(bytes(data))
    sender = ArtifactSender(Loopback(), "pi-1", path, manifest, window=3)
    sender.start(now=0)
    replies = _run(sender, receiver)
    assert sender.outcome == "install_failed" and replies[-1].code == "bad_chunk"
    assert store.current("classifier").sha256 == good.sha256
    assert not (store.incoming_dir / manifest.artifact_id).exists()

    forged = dataclasses.replace(manifest, size=manifest.size - 1, chunk_sha256=manifest.chunk_sha256)
    other_key, _ = generate_keypair(tmp_path / "other")
    for bad in (forged, manifest.with_signature(sign(other_key, manifest.signed_bytes()))):  # same key id, other key
        [reply] = receiver.handle(bad)
        assert reply.code == "bad_signature"
        assert receiver.handle(P.ArtifactChunk(manifest.artifact_id, 0, b"x" * 1024)) == []  # chunks ignored
    assert store.current("classifier").sha256 == good.sha256


def test_whole_file_hash_is_checked_after_the_chunks(keys, tmp_path, store_and_receiver):
    store, receiver = store_and_receiver
    path = _artifact(tmp_path, size=3000)
    manifest = build_manifest(path, keys[0], name="student", version=1, targets=["pi-1"], chunk_size=1024, meta=META)
    lying = dataclasses.replace(manifest, sha256="0" * 64, signature="")
    lying = lying.with_signature(sign(keys[0], lying.signed_bytes()))  # signed, consistent chunks, wrong whole
    sender = ArtifactSender(Loopback(), "pi-1", path, lying)
    sender.start(now=0)
    assert _run(sender, receiver)[-1].code == "bad_hash" and store.current("classifier") is None


def test_policy_limits(keys, tmp_path, store_and_receiver):
    store, _ = store_and_receiver
    small = DeliveryReceiver(store, load_public_key(keys[1]), "pi-1", max_bytes=2000)
    manifest = build_manifest(
        _artifact(tmp_path, size=3000), keys[0], name="s", version=1, targets=["pi-1"], chunk_size=1024, meta=META
    )
    assert small.handle(manifest)[0].code == "rejected"
    tflite_only = DeliveryReceiver(store, load_public_key(keys[1]), "pi-1", formats=("tflite",))
    assert "format" in tflite_only.handle(manifest)[0].reason


def test_device_restart_resumes_from_persisted_chunks(keys, tmp_path, store_and_receiver):
    store, receiver = store_and_receiver
    path = _artifact(tmp_path, size=20_000)
    manifest = build_manifest(path, keys[0], name="student", version=1, targets=["pi-1"], chunk_size=1024, meta=META)
    receiver.handle(manifest)
    for i in range(7):
        receiver.handle(P.ArtifactChunk(manifest.artifact_id, i, path.read_bytes()[i * 1024 : (i + 1) * 1024]))
    fresh = DeliveryReceiver(store, load_public_key(keys[1]), "pi-1")  # a new process, same store
    [ack] = fresh.handle(manifest)
    assert ack.next_chunk == 7
    sender = ArtifactSender(Loopback(), "pi-1", path, manifest, window=4, acked=ack.next_chunk)
    sender.start(now=0)
    _run(sender, fresh)
    assert sender.outcome == "installed" and sender.chunks_sent == manifest.n_chunks - 7
    [again] = fresh.handle(manifest)  # the cloud missed the report: it is sent again, nothing re-fetched
    assert isinstance(again, P.Installed) and again.sha256 == manifest.sha256


def test_sender_resends_from_the_last_ack_on_timeout_and_gives_up(keys, tmp_path, store_and_receiver):
    store, receiver = store_and_receiver
    path = _artifact(tmp_path, size=8000)
    manifest = build_manifest(path, keys[0], name="student", version=1, targets=["pi-1"], chunk_size=1024, meta=META)
    sender = ArtifactSender(Loopback(), "pi-1", path, manifest, window=2, timeout=5, max_attempts=3)
    sender.start(now=0)
    lost = set()
    replies = _run(sender, receiver, drop=lambda m: isinstance(m, P.ArtifactChunk) and m.index == 4 and not lost.add(4))
    assert sender.acked == 4 and not sender.done and isinstance(replies[-1], P.Ack)
    sender.tick(now=4.9)
    assert sender.transport.sent == []  # not yet
    sender.tick(now=5.0)
    kinds = [P.decode_message(p) for _, p in sender.transport.sent]
    assert isinstance(kinds[0], P.ArtifactManifest) and [c.index for c in kinds[1:]] == [4, 5]
    _run(sender, receiver)
    assert sender.outcome == "installed"

    silent = ArtifactSender(Loopback(), "pi-1", path, manifest, window=2, timeout=1, max_attempts=2)
    silent.start(now=0)
    for t in (1, 2, 3):
        silent.tick(now=t)
    assert silent.outcome == "timeout" and silent.attempts == 3


def test_sender_follows_a_device_that_lost_its_chunks(keys, tmp_path):
    path = _artifact(tmp_path, size=8000)
    manifest = build_manifest(path, keys[0], name="student", version=1, targets=["pi-1"], chunk_size=1024, meta=META)
    sender = ArtifactSender(Loopback(), "pi-1", path, manifest, window=2)
    sender.start(now=0)
    sender.on_ack(P.Ack("pi-1", manifest.artifact_id, 6), now=1)
    sender.transport.sent.clear()
    sender.on_ack(P.Ack("pi-1", manifest.artifact_id, 0), now=2)
    assert [P.decode_message(p).index for _, p in sender.transport.sent] == [0, 1]
    sender.on_ack(P.Ack("pi-2", manifest.artifact_id, 8), now=3)  # another device's ack: ignored
    assert sender.acked == 0


# ---- device configuration ----------------------------------------------------------------------


def _write_config(tmp_path, keys, extra=""):
    text = f'device_id = "pi-1"\n[models]\ncloud_public_key = "{keys[1]}"\n' + extra
    (tmp_path / "device.toml").write_text(text)
    return str(tmp_path / "device.toml")


def test_device_config_defaults_paths_and_environment(keys, tmp_path):
    cfg = load_device_config(
        _write_config(tmp_path, keys, "[privacy]\nbudget_epsilon = 2\n"),
        env={
            "ECOS_DEVICE_BROKER_PORT": "1884",
            "ECOS_DEVICE_BROKER_USERNAME": "pi-1",
            "ECOS_DEVICE_BROKER_PASSWORD": "s3cret",
        },
    )
    assert cfg.device_id == "pi-1" and cfg.broker.port == 1884 and cfg.broker.password == "s3cret"
    assert cfg.privacy.budget_epsilon == 2.0 and cfg.privacy.epsilon == 0.58
    assert cfg.models.store == str(tmp_path / "state" / "models") and cfg.privacy.ledger == str(
        tmp_path / "state" / "ledger.json"
    )


def test_the_example_device_config_loads(keys, tmp_path):
    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "raspberry_pi", "device.toml")
    cfg = load_device_config(example, env={"ECOS_DEVICE_MODELS_CLOUD_PUBLIC_KEY": str(keys[1])})
    assert P.is_valid_id(cfg.device_id) and cfg.broker.protocol in ("5", "3.1.1")


@pytest.mark.parametrize(
    "extra, env, message",
    [
        ("[broker]\nport = 99999\n", {}, "port must be"),
        ("[broker]\nprotocol = 5\n", {}, "protocol must be str"),
        ("[broker]\nhots = 'x'\n", {}, "unknown key"),
        ("[privacy]\nepsilon_per_probe = 0.5\nsigma = 3.0\n", {}, "not both"),
        ("", {"ECOS_DEVICE_DEVICE_ID": "a/b"}, "device_id"),
        ("", {"ECOS_DEVICE_MODELS_ALLOW_DOWNGRADE": "maybe"}, "true or false"),
        ("", {"ECOS_DEVICE_MODELS_CLOUD_PUBLIC_KEY": "/nonexistent.pem"}, "does not exist"),
    ],
)
def test_bad_device_config_says_what_to_fix(keys, tmp_path, extra, env, message):
    with pytest.raises(UsageError, match=message):
        load_device_config(_write_config(tmp_path, keys, extra), env=env)
