"""One hostile message must not kill anything (issue 8): each input an attacker test found, replayed.

Every decoder turns any bytes into a typed error (``MessageError`` or another ``EcosError``),
never another exception; the daemon's and the agent's message handlers survive even a bug
(the message is logged with its topic escaped and truncated, counted, dropped); the store
refuses integers SQLite cannot hold; message-derived strings are escaped before they are logged.
The random/mutation properties are in tests/test_fuzz_properties.py, the live run against
Mosquitto in tests/integration/test_hostile_broker.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from test_daemon_rounds import RecordingTransport

import device_sdk.protocol as P
from cloud.errors import StoreError
from device_sdk.errors import ArtifactError, EcosError, MessageError
from device_sdk.protocol import envelope as wire
from device_sdk.protocol.round import Probe, Scores
from device_sdk.runtime.artifact import ArtifactMeta

DEV = "pi-1"


def raw_envelope(header_text: str, payload: bytes = b"") -> bytes:
    """An envelope with a header written by hand (any JSON text), checksum and length filled in."""
    tail = f'"payload_len":{len(payload)},"payload_sha256":"{hashlib.sha256(payload).hexdigest()}"}}'
    text = header_text.rstrip()
    assert text.endswith("}")
    text = text[:-1] + ("," if text[:-1].strip() not in ("{", "") else "") + tail
    hb = text.encode("utf-8", "surrogatepass")
    return struct.pack("<4sBI", wire.MAGIC, wire.FORMAT_VERSION, len(hb)) + hb + payload


def status_header(**extra: str) -> str:
    fields = {
        "type": '"status"',
        "version": "1",
        "id": '"s1"',
        "device_id": f'"{DEV}"',
        "state": '"online"',
        "model": "null",
        "encoder": "null",
        "arrays": "[]",
        **extra,
    }
    return "{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}"


def scores_header(sigma: str, k: int = 2, shape: str = "[2]") -> str:
    return (
        '{"type":"scores","version":1,"id":"m1","probe_id":"r1","device_id":"%s","encoder_sha256":"%s","k":%d,'
        '"noise":{"mechanism":"gaussian","sigma":%s,"sensitivity":1.0},'
        '"privacy":{"epsilon":0.5,"delta":1e-5,"accountant":"gaussian"},"created":"",'
        '"arrays":[{"name":"scores","dtype":"float32","shape":%s,"offset":0,"nbytes":%d}]}'
        % (DEV, "e" * 64, k, sigma, shape, 4 * k)
    )


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# The six kinds of killer message the attacker test found, on the topic the daemon reads them from.
KILLERS = {
    "nested header": (P.device_status(DEV), raw_envelope(status_header(x=nested(100_000)))),
    "shape 1e999": (P.outbox(DEV), raw_envelope(scores_header("1.0", shape="[1e999]"), b"\0" * 8)),
    "shape -1,-1": (
        P.outbox(DEV),
        raw_envelope(scores_header("1.0", shape="[-1,-1]").replace('"nbytes":8', '"nbytes":4'), b"\0" * 8),
    ),
    "shape 2**32,2**32": (
        P.outbox(DEV),
        raw_envelope(
            scores_header("1.0", shape=f"[{2**32},{2**32}]")
            .replace('"dtype":"float32"', '"dtype":"uint8"')
            .replace('"nbytes":8', '"nbytes":0'),
            b"\0" * 8,
        ),
    ),
    "400-digit sigma": (P.outbox(DEV), raw_envelope(scores_header("9" * 400), np.zeros(2, np.float32).tobytes())),
    "next_chunk 2**70": (
        P.outbox(DEV),
        raw_envelope(
            '{"type":"ack","version":1,"id":"a1","device_id":"%s","artifact_id":"art-1","next_chunk":%d,"arrays":[]}'
            % (DEV, 2**70)
        ),
    ),
}


# ---- 1. decoders are total ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(KILLERS))
def test_each_killer_message_is_a_message_error(name):
    topic, payload = KILLERS[name]
    with pytest.raises(MessageError):
        P.decode_from_device(topic, payload)


@pytest.mark.parametrize(
    "header, why",
    [
        (status_header(x=nested(33)), "nest"),
        (status_header(x='"\\ud800"'), "surrogate"),
        (status_header(x="1" * 5000), "integer"),
        (status_header(x=str(2**70)), "integer"),
        (status_header(x="1e999"), "finite"),
        (status_header(x="NaN"), "finite"),
        (status_header(x="-Infinity"), "finite"),
        (status_header(type="7"), "type"),
        (status_header(type='"' + "t" * 10_000 + '"'), "type"),
        (status_header(x='"' + "t" * 100_000 + '"'), "string"),
        (status_header(version="true"), "version"),
        (status_header(arrays='[{"name":"a","dtype":"uint8","shape":[1.0],"offset":0,"nbytes":1}]'), "shape"),
        (status_header(arrays='[{"name":"a","dtype":"uint8","shape":[true],"offset":0,"nbytes":1}]'), "shape"),
        (status_header(arrays='[{"name":"a","dtype":["uint8"],"shape":[1],"offset":0,"nbytes":1}]'), "dtype"),
        (status_header(arrays='["a"]'), "array entry"),
        (status_header(arrays='[{"name":"a","dtype":"uint8","shape":[1],"offset":-1,"nbytes":1}]'), "offset"),
        (
            status_header(
                arrays='[{"name":"a","dtype":"uint8","shape":' + json.dumps([1] * 40) + ',"offset":0,"nbytes":1}]'
            ),
            "dimensions",
        ),
    ],
)
def test_hostile_headers_are_message_errors(header, why):
    with pytest.raises(MessageError, match=why):
        wire.decode(raw_envelope(header, b"\0"))


def test_a_header_error_quotes_the_offending_value_short():
    with pytest.raises(MessageError) as err:
        wire.decode(raw_envelope(status_header(type='"' + "t" * 10_000 + '"')))
    assert len(str(err.value)) < 400


@pytest.mark.parametrize(
    "changes, why",
    [
        ({"next_chunk": 2**31}, "next_chunk"),
        ({"id": "x" * 129}, "id"),
    ],
)
def test_ack_integers_and_strings_are_bounded(changes, why):
    env = wire.decode(P.Ack(DEV, "art-1", 3).to_bytes())
    fields = {k: v for k, v in env.fields.items() if k not in ("type", "version")}
    with pytest.raises(MessageError, match=why):
        P.decode_message(wire.encode("ack", {**fields, **changes}))


def _fields_of(msg) -> dict:
    env = wire.decode(msg.to_bytes())
    return {k: v for k, v in env.fields.items() if k not in ("type", "version")}, env.arrays


@pytest.mark.parametrize(
    "msg, changes, why",
    [
        (P.ArtifactChunk("art-1", 0, b"x"), {"index": 2**31}, "index"),
        (P.Installed(DEV, "art-1", 1, "a" * 64, 0.5, 3), {"artifact_version": 2**40}, "version"),
        (P.Installed(DEV, "art-1", 1, "a" * 64, 0.5, 3), {"n_eval": 2**40}, "n_eval"),
        (P.Refusal("r1", DEV, "privacy_budget", "no"), {"reason": "x" * 10_000}, "reason"),
        (P.Refusal("r1", DEV, "privacy_budget", "no"), {"probe_id": "x" * 1000}, "probe_id"),
        (P.InstallFailed(DEV, "art-1", "bad_hash", "no"), {"code": "c" * 1000}, "code"),
        (P.Status(DEV, "online"), {"model": {"artifact_id": "a", "version": 2**40}}, "model"),
        (P.Status(DEV, "online"), {"model": {"artifact_id": "a", "version": 1, "x": "y" * 10_000}}, "model"),
        (Scores("r1", DEV, "e" * 64, np.zeros(2), 1.0), {"noise": {"sigma": "1e999", "sensitivity": 1.0}}, "sigma"),
        (Scores("r1", DEV, "e" * 64, np.zeros(2), 1.0), {"probe_id": "p" * 1000}, "probe_id"),
        (Probe("r1", "e" * 64, np.eye(2, dtype=np.float32)), {"id": "p" * 1000}, "id"),
    ],
)
def test_fields_are_bounded(msg, changes, why):
    fields, arrays = _fields_of(msg)
    msg_type = wire.decode(msg.to_bytes()).type
    with pytest.raises(MessageError, match=why):
        P.decode_message(wire.encode(msg_type, {**fields, **changes}, arrays))


def test_replies_with_long_reasons_are_cut_to_fit_not_refused():
    refusal = P.Refusal("r1", DEV, "privacy_budget", P.clip_reason("x" * 100_000))
    assert P.decode_message(refusal.to_bytes()) == refusal


@pytest.mark.parametrize(
    "text",
    [
        "[1]",
        '"meta"',
        "5",
        "null",
        "[" * 10_000 + "]" * 10_000,
        '{"kind":"encoder","arch":"a","input_shape":[3,1e999,8],"mean":[0,0,0],"std":[1,1,1]}',
        '{"kind":"encoder","arch":"a","input_shape":[3,8,8],"mean":5,"std":[1,1,1]}',
        '{"kind":"encoder","arch":"a","input_shape":[3,8,8],"mean":[0,0,0],"std":[1,1,1],"labels":7}',
        '{"kind":"encoder","arch":"a","input_shape":[3,8,8],"mean":[0,0,"x"],"std":[1,1,1]}',
        '{"kind":"encoder","arch":"a","input_shape":"abc","mean":[0,0,0],"std":[1,1,1]}',
        '{"kind":"encoder","arch":"a","input_shape":[3,8,8],"mean":[0,0,0],"std":[1,1,1],"feature_dim":1e400}',
    ],
)
def test_artifact_metadata_is_an_artifact_error(text):
    with pytest.raises(ArtifactError):
        ArtifactMeta.from_json(text, "m")


def test_tflite_metadata_of_garbage_is_an_artifact_error():
    from device_sdk.runtime.tflite_meta import read_tflite_metadata

    data = bytearray(64)
    data[4:8] = b"TFL3"
    struct.pack_into("<I", data, 0, 8)  # root table at 8, vtable offset garbage
    struct.pack_into("<i", data, 8, -(1 << 30))
    with pytest.raises(ArtifactError):
        read_tflite_metadata(bytes(data))


@pytest.mark.parametrize(
    "state",
    [
        {"slots": []},
        {"slots": {"classifier": []}},
        {"slots": {"classifier": {"current": 5}}},
        {"slots": {"classifier": {"current": {"kind": "classifier"}}}},
        {
            "slots": {
                "classifier": {
                    "current": {
                        "kind": "classifier",
                        "artifact_id": "a",
                        "name": "n",
                        "version": "1",
                        "sha256": "s",
                        "format": "onnx",
                        "path": "/x",
                        "installed_utc": "",
                    }
                }
            }
        },
    ],
)
def test_a_corrupt_model_store_state_is_a_message_error(tmp_path, state):
    from device_sdk.delivery.install import ModelStore

    store = ModelStore(tmp_path)
    (tmp_path / "state.json").write_text(json.dumps(state))
    with pytest.raises(MessageError):
        store.current("classifier")
    with pytest.raises(MessageError):
        store.kinds()


def test_a_deeply_nested_model_store_state_is_a_message_error(tmp_path):
    from device_sdk.delivery.install import ModelStore

    (tmp_path / "state.json").write_text('{"slots":' + nested(50_000) + "}")
    with pytest.raises(MessageError):
        ModelStore(tmp_path).current("classifier")


def _ledger(tmp_path: Path, **changes) -> Path:
    from device_sdk.privacy.ledger import PrivacyLedger

    path = tmp_path / "ledger.json"
    PrivacyLedger.open(path, device_id="pi-1")
    state = json.loads(path.read_text())
    payload = b"scores"
    release = {
        "key": "r1",
        "mechanism": "gaussian",
        "sigma": 1.0,
        "sensitivity": 1.0,
        "n_values": 4,
        "payload_b64": "c2NvcmVz",
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    for key, value in changes.items():
        target, _, name = key.partition("__")
        (state["budget"] if target == "budget" else release if target == "release" else state)[name] = value
    state["releases"] = [release]
    path.write_text(json.dumps(state))
    return path


@pytest.mark.parametrize(
    "changes",
    [
        {"release__sigma": 1e-300},
        {"release__sigma": 10**400},
        {"budget__epsilon": 10**400},
        {"release__n_values": 10**400},
        {"top__device_id": "d" * 100_000},
        {"release__key": 5},
    ],
)
def test_a_hostile_ledger_is_read_as_a_typed_error_or_a_finite_number(tmp_path, changes):
    from device_sdk.privacy.ledger import PrivacyLedger

    path = _ledger(tmp_path, **changes)
    try:
        summary = PrivacyLedger(path).summary()
    except EcosError:
        return
    assert summary["spent_epsilon"] >= 0


def test_a_ledger_keeps_reading_large_released_payloads(tmp_path):
    from device_sdk.privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger.open(tmp_path / "ledger.json", device_id=DEV)
    payload = bytes(range(256)) * 1000  # scores of a large k: base64 longer than any string in a message header
    ledger.release("r1", 5.0, 1.0, 4, lambda: payload, lambda _: None)
    assert PrivacyLedger(tmp_path / "ledger.json").lookup("r1") == payload


def test_a_ledger_nested_too_deep_is_a_message_error(tmp_path):
    from device_sdk.privacy.ledger import PrivacyLedger

    path = tmp_path / "ledger.json"
    path.write_text('{"kind":' + nested(100_000) + "}")
    with pytest.raises(MessageError):
        PrivacyLedger(path)


def _index_bytes(**changes) -> bytes:
    arrays = {
        "paths": np.array(["a.png", "b.png"]),
        "labels": np.array(["0", "1"]),
        "domains": np.array(["d", "d"]),
        "features": np.eye(2, 4, dtype=np.float32),
        "assign": np.array([0, 1], np.int32),
        "centroids": np.eye(2, 4, dtype=np.float32),
        "meta": np.array(json.dumps({"format": 1, "encoder_sha256": "e" * 64, "probe_id": "p1", "created": ""})),
    }
    arrays.update(changes)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize(
    "changes",
    [
        {"meta": np.array("not json")},
        {"meta": np.array("[1]")},
        {"meta": np.array('{"format":1}')},
        {"meta": np.array(nested(100_000))},
        {"assign": np.array([0, 7], np.int32)},
        {"features": np.eye(3, dtype=np.float32)},
        {"centroids": np.array([1.0, 2.0], np.float32)},
        {"paths": np.array([1, 2])},
        {"meta": np.array(json.dumps({"format": 1, "encoder_sha256": 5, "probe_id": "p1", "created": ""}))},
    ],
)
def test_a_hostile_index_file_is_a_message_error(tmp_path, changes):
    from cloud.pool.index import PoolIndex

    path = tmp_path / "pool.npz"
    path.write_bytes(_index_bytes(**changes))
    with pytest.raises(MessageError):
        PoolIndex.load(str(path))


def test_a_damaged_index_zip_is_a_message_error(tmp_path):
    from cloud.pool.index import PoolIndex

    good = _index_bytes()
    path = tmp_path / "pool.npz"
    path.write_bytes(good)
    assert PoolIndex.load(str(path)).k == 2
    with zipfile.ZipFile(io.BytesIO(good)) as z:
        npy = z.read("features.npy")
    hacked = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(good)) as src, zipfile.ZipFile(hacked, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "features.npy":
                data = npy.replace(b"(2, 4)", b"(10000000000000, 4)")
            dst.writestr(item.filename, data)
    path.write_bytes(hacked.getvalue())
    with pytest.raises(MessageError):
        PoolIndex.load(str(path))


# ---- the store refuses what SQLite cannot hold --------------------------------------------------------


def test_the_store_refuses_integers_sqlite_cannot_hold():
    from cloud.serve.store import SqliteStore

    store = SqliteStore(":memory:")
    store.add_delivery("art-1", DEV, "r1", 3)
    for bad in (2**70, -1, True, 1.5):
        with pytest.raises(StoreError):
            store.update_delivery("art-1", DEV, next_chunk=bad)
    with pytest.raises(StoreError):
        store.add_traffic(DEV, "r1", "up", "ack", 2**64)
    with pytest.raises(StoreError):
        store.record_status("\ud800", "online", None, 0.0)
    assert store.get_delivery("art-1", DEV).next_chunk == 0


# ---- 3. message loops that cannot die --------------------------------------------------------------


class NoTrainer:
    def train(self, *args, **kwargs):
        raise RuntimeError("no training in these tests")


def small_daemon(state_dir: Path):
    """A daemon on a tiny in-memory pool (k=4, d=6) and store, with artifact ``art-1`` being sent to DEV."""
    from cloud.pool.index import PoolIndex
    from cloud.serve.config import BrokerConfig, CloudConfig, MetricsConfig, StoreConfig
    from cloud.serve.daemon import Daemon
    from cloud.serve.store import ArtifactRecord, SqliteStore

    index = PoolIndex(
        paths=np.array(["a", "b"]),
        labels=np.array(["0", "1"]),
        domains=np.array(["d", "d"]),
        features=np.eye(2, 6, dtype=np.float32),
        assign=np.array([0, 1], np.int32),
        centroids=np.eye(4, 6, dtype=np.float32),
        encoder_sha256="e" * 64,
        probe_id="p1",
        created="",
    )
    cfg = CloudConfig(broker=BrokerConfig(), store=StoreConfig(state_dir=str(state_dir)), metrics=MetricsConfig(port=0))
    store = SqliteStore(":memory:")
    store.add_artifact(ArtifactRecord("art-1", "r1", "classifier-x", 1, "a" * 64, 2500, "/nowhere", b"m"))
    store.add_delivery("art-1", DEV, "r1", 3)
    return Daemon(cfg, store, index, NoTrainer(), transport_factory=RecordingTransport)


@pytest.fixture
def daemon(tmp_path):
    return small_daemon(tmp_path / "cloud")


def dropped(daemon, reason: str) -> float:
    return daemon.metrics.dropped.value(reason=reason)


@pytest.mark.parametrize("name", sorted(KILLERS))
def test_the_daemon_survives_each_killer_message_and_counts_it(daemon, name):
    topic, payload = KILLERS[name]
    daemon.handle_message(topic, payload)
    assert dropped(daemon, "malformed") == 1
    assert 'ecos_messages_dropped_total{reason="malformed"} 1' in daemon.metrics.render()


def test_an_ack_beyond_the_last_chunk_never_reaches_the_store(daemon):
    daemon.handle_message(P.outbox(DEV), P.Ack(DEV, "art-1", 2**31 - 1).to_bytes())
    assert daemon.store.get_delivery("art-1", DEV).next_chunk == 0 and dropped(daemon, "message") == 1
    daemon.handle_message(P.outbox(DEV), P.Ack(DEV, "art-1", 2).to_bytes())
    assert daemon.store.get_delivery("art-1", DEV).next_chunk == 2


def test_a_bug_while_handling_one_message_is_logged_counted_and_the_loop_goes_on(daemon, caplog, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(daemon.store, "record_status", broken)
    topic = P.device_status(DEV)
    with caplog.at_level(logging.WARNING, logger="ecos.daemon"):
        daemon._enqueue(topic, P.Status(DEV, "online").to_bytes())
        daemon._enqueue(P.outbox(DEV), P.Ack(DEV, "art-1", 1).to_bytes())
        daemon.drain(0.1)  # would raise (and end the daemon's loop) before the fix
    assert dropped(daemon, "internal_error") == 1
    assert daemon.store.get_delivery("art-1", DEV).next_chunk == 1  # the next message was handled
    lines = [r.getMessage() for r in caplog.records if "message_dropped" in r.getMessage()]
    assert len(lines) == 1 and "ZeroDivisionError" in lines[0] and topic in lines[0]


def test_message_derived_strings_are_escaped_and_truncated_in_the_log(daemon, caplog):
    forged_topic = "ecos/v1/dev/" + "x\nFAKE event=round_state state=done " + "y" * 5000 + "/out"
    with caplog.at_level(logging.INFO, logger="ecos.daemon"):
        daemon.handle_message(forged_topic, b"garbage")
        daemon.handle_message(P.outbox(DEV), P.Refusal("r\nFAKE=1", DEV, "x", "z\r\n\x1b[31m" * 100).to_bytes())
    assert caplog.records
    for record in caplog.records:
        text = record.getMessage()
        assert "\n" not in text and "\r" not in text and "\x1b" not in text
        assert len(text) < 1000


def test_log_clean_escapes_control_characters_and_truncates():
    from device_sdk.logsafe import clean

    assert clean("pi-1") == "pi-1"
    assert clean("a\nb\rc\x00d\x1b") == "a\\nb\\rc\\x00d\\x1b"
    assert clean("\u2028x\ud800") == "\\u2028x\\ud800"
    long = clean("z" * 100_000)
    assert len(long) <= 220 and long.startswith("z" * 100) and "100000" in long
    assert clean(b"\xff\x00ab") == "b'\\xff\\x00ab'"
    assert clean(None) == "None"


@pytest.fixture
def agent(tmp_path):
    return offline_agent(tmp_path)


def offline_agent(state_dir: Path):
    """An agent of DEV (no encoder, no broker: it is never started) whose replies go nowhere."""
    from cloud.security.keys import generate_keypair
    from device_sdk.agent import DeviceAgent
    from device_sdk.config import DeviceConfig, ModelSettings, PrivacySettings

    _, public = generate_keypair(state_dir / "keys")
    cfg = DeviceConfig(
        DEV,
        privacy=PrivacySettings(ledger=str(state_dir / "ledger.json")),
        models=ModelSettings(store=str(state_dir / "models"), cloud_public_key=str(public)),
    )
    agent = DeviceAgent(cfg)
    agent._publish_out = lambda payload: None
    return agent


def test_the_agent_survives_hostile_messages_and_its_own_bugs(agent, caplog, monkeypatch):
    inbox = P.inbox(DEV)
    for payload in [
        b"",
        b"ECOS",
        raw_envelope(status_header(x=nested(100_000))),
        raw_envelope(
            '{"type":"probe","version":1,"id":"%s","encoder_sha256":"e","k":1,"feature_dim":1,'
            '"codec":"float32","arrays":[]}' % ("p\n" * 10_000)
        ),
    ]:
        agent.handle(inbox, payload)
    assert agent.stats.rejected == 4 and agent.stats.dropped == 4

    def broken(msg):
        raise KeyError("a bug")

    monkeypatch.setattr(agent.receiver, "handle", broken)
    with caplog.at_level(logging.WARNING, logger="ecos.agent"):
        agent.handle(inbox, P.ArtifactChunk("art-1", 0, b"x").to_bytes())
    assert agent.stats.dropped == 5
    (line,) = [r.getMessage() for r in caplog.records if "KeyError" in r.getMessage()]
    assert inbox in line and "\n" not in line


@pytest.mark.parametrize("sidecar", [b"[1]", b"\xff", b'{"meta": 5}', b'{"meta": {}, "sha256": 7}', b"[" * 5000])
def test_a_hostile_artifact_sidecar_is_a_usage_error(tmp_path, sidecar):
    from cloud.serve.delivery import _read_meta
    from device_sdk.errors import UsageError

    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(b"not onnx")
    Path(str(artifact) + ".json").write_bytes(sidecar)
    with pytest.raises(UsageError):
        _read_meta(artifact, "0" * 64)
    Path(str(artifact) + ".json").unlink()
    with pytest.raises(ArtifactError):  # no sidecar: the ONNX file itself is read, and is garbage
        _read_meta(artifact, "0" * 64)


def test_the_transport_survives_a_topic_that_is_not_utf8_and_a_failing_handler(caplog):
    import paho.mqtt.client as mqtt

    from device_sdk.transport import MqttTransport

    got = []

    def handler(topic, payload):
        got.append(topic)
        raise RuntimeError("a handler bug")

    transport = MqttTransport("t-hostile", "127.0.0.1", 1, on_message=handler)
    for topic in (b"ecos/v1/dev/\xff/out", b"ecos/v1/dev/a\nb/out"):
        message = mqtt.MQTTMessage(topic=topic)
        message.payload = b"x"
        transport._on_message(None, None, message)  # before the fix, the first raised on paho's network thread
    assert got == ["ecos/v1/dev/a\nb/out"]
    assert all("\n" not in r.getMessage() for r in caplog.records)
