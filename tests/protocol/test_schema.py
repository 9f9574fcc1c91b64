"""The one way a message is defined: each field's schema gives its check, encoding and decoding.

A field that has the wrong type, is out of its range, or is not one of its enum's values is a
``MessageError`` that names the field, whichever message it is in; the enums read as their wire
strings everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

import device_sdk.protocol as P
from device_sdk.errors import MessageError
from device_sdk.protocol import envelope as wire
from device_sdk.protocol.schema import Message, MessageType, Wire

META = {
    "kind": "classifier",
    "arch": "linear",
    "input_shape": [3, 8, 8],
    "mean": [0.5] * 3,
    "std": [0.25] * 3,
    "labels": ["a", "b"],
    "precision": "int8",
}


def _probe() -> P.Probe:
    return P.Probe("p1", "e" * 64, np.eye(3, 4, dtype=np.float32), created="2026-01-01T00:00:00+00:00")


def _scores() -> P.Scores:
    return P.Scores("p1", "pi-1", "e" * 64, np.zeros(3), 1.0, message_id="s1", created="t")


def _manifest() -> P.ArtifactManifest:
    return P.ArtifactManifest("art-1", "student", 7, "onnx", "int8", 2500, "b" * 64, 1024, ["c" * 64] * 3, META)


def _reencoded(msg, **changes) -> bytes:
    """``msg`` on the wire with raw header fields changed (``a.b`` changes key b of object a)."""
    env = wire.decode(msg.to_bytes())
    fields = {k: v for k, v in env.fields.items() if k not in ("type", "version")}
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            fields[outer] = {**fields[outer], inner: value}
        elif value is dataclasses.MISSING:
            fields.pop(key)
        else:
            fields[key] = value
    return wire.encode(env.type, fields, env.arrays)


CASES = [  # (message, wire field, bad value, what the error says)
    (P.Ack("pi-1", "art-1", 3), "next_chunk", "3", "wrong type"),
    (P.Ack("pi-1", "art-1", 3), "next_chunk", 2.0, "wrong type"),
    (P.Ack("pi-1", "art-1", 3), "next_chunk", P.MAX_CHUNKS, "outside"),
    (P.Ack("pi-1", "art-1", 3), "device_id", "a/b", "not a valid id"),
    (P.Ack("pi-1", "art-1", 3), "id", "", "outside the limits"),
    (P.Ack("pi-1", "art-1", 3), "artifact_id", dataclasses.MISSING, "missing"),
    (P.Installed("pi-1", "a", 1, "a" * 64, 0.5, 3), "accuracy", 1.5, "outside"),
    (P.Installed("pi-1", "a", 1, "a" * 64, 0.5, 3), "artifact_version", True, "wrong type"),
    (P.Installed("pi-1", "a", 1, "a" * 64, 0.5, 3), "sha256", "A" * 64, "hex"),
    (P.Status("pi-1", "online"), "state", "asleep", "not one of online, offline"),
    (P.Status("pi-1", "online"), "keys", ["x"], "entry 0"),
    (_manifest(), "format", "exe", "not one of onnx, tflite"),
    (_manifest(), "chunk_sha256", ["c" * 64, 5, "c" * 64], "entry 1"),
    (_manifest(), "targets", [], "outside the limits"),
    (_probe(), "codec", "int4", "not one of float16, int8, float32"),
    (_probe(), "k", 0, "outside"),
    (_probe(), "deadline", "soon", "wrong type"),
    (_probe(), "encoder_sha256", "", "outside the limits"),
    (_scores(), "noise.sigma", -1.0, "negative"),
    (_scores(), "noise.sensitivity", 0.0, "above 0"),
    (_scores(), "privacy.epsilon", "1", "wrong type"),
    (_scores(), "privacy.accountant", "x" * 65, "outside the limits"),
    (_scores(), "noise", "gaussian", "not an object"),
]


@pytest.mark.parametrize("msg, key, value, why", CASES, ids=[f"{type(c[0]).__name__}.{c[1]}" for c in CASES])
def test_a_bad_field_is_a_message_error_naming_the_field(msg, key, value, why):
    with pytest.raises(MessageError) as err:
        P.decode_message(_reencoded(msg, **{key: value}))
    text = str(err.value)
    assert repr(key.split(".")[0] if why == "not an object" else key) in text and why in text, text
    assert f"{msg.TYPE} field" in text


@pytest.mark.parametrize(
    "msg, changes, why",
    [
        (P.Ack("pi-1", "art-1", 3), {"next_chunk": -1}, "next_chunk"),
        (P.Status("pi-1", "dancing"), {}, "state"),
        (P.ArtifactChunk("art-1", 0, b""), {}, "data"),
        (P.Installed("pi-1", "art-1", 1, "a" * 64, accuracy=2.0), {}, "accuracy"),
    ],
)
def test_an_invalid_message_is_refused_when_sent(msg, changes, why):
    with pytest.raises(MessageError, match=f"outgoing {msg.TYPE}: {msg.TYPE} field '{why}'"):
        dataclasses.replace(msg, **changes).to_bytes()


def test_a_bad_array_is_a_message_error_naming_the_array():
    env = wire.decode(_probe().to_bytes())
    fields = {k: v for k, v in env.fields.items() if k not in ("type", "version")}
    for arrays, why in (
        ({"centroids": np.zeros((2, 4), np.float16)}, "'centroids' has shape (2, 4)"),
        ({"centroids": np.full((3, 4), np.inf, np.float16)}, "'centroids' contains NaN"),
        ({**env.arrays, "radii": -np.ones(3, np.float16)}, "'radii' must be k finite"),
        ({}, "'centroids' is missing"),
    ):
        with pytest.raises(MessageError, match=re.escape(why)):
            P.decode_message(wire.encode("probe", fields, arrays))


def test_every_message_declares_every_field_once():
    for msg_type, cls in P.ALL_TYPES.items():
        assert msg_type == cls.TYPE and isinstance(cls.TYPE, MessageType) and issubclass(cls, Message)
        declared = [name for name, _ in cls.wire_fields()] + [name for name, _ in cls.array_fields()]
        assert sorted(declared) == sorted(f.name for f in dataclasses.fields(cls)), cls
        names = [spec.name or name for name, spec in cls.wire_fields()] + list(cls.DERIVED) + list(cls.CONSTANTS)
        assert len(names) == len(set(names)), cls


def test_enums_are_their_wire_strings():
    assert (
        MessageType.SCORES == "scores" and f"{MessageType.SCORES}" == "scores" and str(P.DeviceState.ONLINE) == "online"
    )
    assert json.dumps({"type": MessageType.PROBE}) == '{"type": "probe"}' and repr(P.Codec.INT8) == "'int8'"
    assert P.CENTROID_CODECS == ("float16", "int8", "float32") and P.FORMATS == ("onnx", "tflite")
    assert P.STATES == ("online", "offline")
    status = P.decode_message(P.Status("pi-1", "online").to_bytes())
    assert status.state is P.DeviceState.ONLINE and status == dataclasses.replace(status, state="online")
    assert P.Probe.from_bytes(_probe().to_bytes()).codec is P.Codec.FLOAT16


def test_probe_and_scores_are_messages_like_the_others():
    for msg in (_probe(), _scores()):
        assert type(P.decode_message(msg.to_bytes())).TYPE == msg.TYPE
    assert P.Probe.TYPE == "probe" and P.Scores.TYPE == "scores" and P.Refusal.TYPE == "refusal"


def test_a_field_schema_says_why_a_value_is_refused():
    spec = Wire((int,), lo=0, hi=10)
    assert spec.problem(5) is None and "negative" in spec.problem(-1) and "outside" in spec.problem(11)
    assert "wrong type" in spec.problem(True) and "wrong type" in spec.problem(1.0)
    assert "missing" in spec.problem(None) and Wire((int,), optional=True).problem(None) is None
    assert "wrong type" in Wire((float,)).problem(float("nan"))
