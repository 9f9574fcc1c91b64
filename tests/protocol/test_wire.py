"""The binary envelope and the probe/scores messages: round trips and every kind of damage."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from device_sdk.errors import MessageError
from device_sdk.protocol import envelope as wire
from device_sdk.protocol.round import Probe, Scores


def _msg() -> bytes:
    return wire.encode(
        "probe",
        {"id": "abc", "n": 3},
        {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -2], np.int8)},
    )


def test_round_trip_keeps_fields_and_arrays():
    env = wire.decode(_msg(), "probe")
    assert env.fields["id"] == "abc" and env.fields["n"] == 3 and env.fields["version"] == wire.PROTOCOL_VERSION
    np.testing.assert_array_equal(env.arrays["a"], np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(env.arrays["b"], [1, -2])


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda b: b[:-3], "truncated"),
        (lambda b: b[:10], "truncated header"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 0xFF]), "checksum"),
        (lambda b: b"XXXX" + b[4:], "not an ECOS message"),
        (lambda b: b"", "not an ECOS message"),
        (lambda b: b[:4] + bytes([9]) + b[5:], "wire format 9"),
    ],
)
def test_damaged_messages_are_rejected(damage, words):
    with pytest.raises(MessageError, match=words):
        wire.decode(damage(_msg()), "probe")


def _with_header(mutate) -> bytes:
    data = _msg()
    hlen = struct.unpack_from("<I", data, 5)[0]
    header = json.loads(data[9 : 9 + hlen])
    mutate(header)
    hb = json.dumps(header).encode()
    return data[:5] + struct.pack("<I", len(hb)) + hb + data[9 + hlen :]


def test_wrong_type_version_and_array_table():
    with pytest.raises(MessageError, match="expected a 'scores' message"):
        wire.decode(_msg(), "scores")
    with pytest.raises(MessageError, match="protocol version 99"):
        wire.decode(_with_header(lambda h: h.update(version=99)))
    with pytest.raises(MessageError, match="does not fit"):
        wire.decode(_with_header(lambda h: h["arrays"][0].update(shape=[4, 4])))
    with pytest.raises(MessageError, match="malformed array"):
        wire.decode(_with_header(lambda h: h["arrays"][0].pop("dtype")))


def test_oversized_message_is_rejected_before_parsing(monkeypatch):
    monkeypatch.setattr(wire, "MAX_MESSAGE_BYTES", 100)
    with pytest.raises(MessageError, match="limit"):
        wire.decode(_msg())


@pytest.mark.parametrize("codec, tol", [("float32", 0), ("float16", 1e-3), ("int8", 1e-2)])
def test_probe_round_trip_per_codec(codec, tol):
    c = np.random.default_rng(0).normal(size=(256, 64)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    back = Probe.from_bytes(Probe("p1", "e" * 64, c, codec, 0.5).to_bytes())
    assert back.k == 256 and back.feature_dim == 64 and back.max_distance == 0.5
    assert np.abs(back.centroids - c).max() <= tol


def test_probe_size_for_k256_d64():
    c = np.ones((256, 64), np.float32)
    assert len(Probe("p", "e" * 64, c, "float16").to_bytes()) < 256 * 64 * 2 + 1000
    assert len(Probe("p", "e" * 64, c, "int8").to_bytes()) < 256 * 64 + 256 * 4 + 1000


def test_scores_round_trip_and_validation():
    s = Scores("p1", "dev", "e" * 64, np.array([1.5, -0.5, 3.0]), sigma=6.1, epsilon=0.58, delta=1e-5)
    back = Scores.from_bytes(s.to_bytes())
    assert back.device_id == "dev" and back.sigma == pytest.approx(6.1) and back.epsilon == pytest.approx(0.58)
    np.testing.assert_allclose(back.scores, [1.5, -0.5, 3.0])
    bad = Scores("p1", "dev", "e" * 64, np.array([np.nan, 1.0]), sigma=1.0)
    with pytest.raises(MessageError, match="NaN"):
        Scores.from_bytes(bad.to_bytes())
    with pytest.raises(MessageError, match="expected a 'scores'"):
        Scores.from_bytes(Probe("p", "e", np.ones((2, 2), np.float32)).to_bytes())
