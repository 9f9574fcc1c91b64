"""Golden wire messages: the v1 bytes of every message type, decoded and re-encoded byte for byte.

``tests/protocol/golden/NAME.bin`` holds the bytes that :data:`CASES` ``[NAME]`` encodes to. Each test
decodes the file with the protocol's decoder, checks a few decoded fields, and encodes the decoded
message again: the bytes must be the file's, byte for byte. A second test builds the message from
its fields and checks it encodes to the same bytes. So neither the encoder nor the decoder can change
what goes on the wire by accident.

Everything is fixed: ids, timestamps, arrays, and the signing key (an Ed25519 key from a fixed seed;
Ed25519 signatures are deterministic). A deliberate change of the protocol regenerates the files::

    ECOS_REGEN_GOLDEN=1 .venv/bin/python -m pytest -q tests/protocol/test_golden.py

(or ``.venv/bin/python tests/protocol/test_golden.py``) and the diff of ``golden/`` is then part of
the change, to be reviewed as a change of the wire format.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

import device_sdk.protocol as P  # noqa: E402
from cloud.security.keys import SigningKey  # noqa: E402
from device_sdk.protocol import envelope as wire  # noqa: E402
from device_sdk.protocol.labels import LabelQuery, LabelVotes, decode_label_message  # noqa: E402
from device_sdk.protocol.round import Probe, Scores  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden"
REGEN = os.environ.get("ECOS_REGEN_GOLDEN") == "1"

KEY = SigningKey(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))  # a fixed test key, never a real one
NEXT_KEY = SigningKey(Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64))))
CREATED = "2026-01-02T03:04:05+00:00"
ENCODER = "e" * 64
META = {
    "kind": "classifier",
    "arch": "linear",
    "input_shape": [3, 8, 8],
    "mean": [0.5] * 3,
    "std": [0.25] * 3,
    "labels": ["a", "b"],
    "precision": "int8",
}


def _centroids(k: int = 4, d: int = 6) -> np.ndarray:
    rng = np.random.default_rng(7)
    c = rng.normal(size=(k, d)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


RADII = np.array([0.25, 0.5, 0.125, 0.75], dtype=np.float32)


def _probe(**kw) -> Probe:
    return Probe(
        **{"probe_id": "probe-0001", "encoder_sha256": ENCODER, "centroids": _centroids(), "created": CREATED, **kw}
    )


def _manifest(**kw) -> P.ArtifactManifest:
    return P.ArtifactManifest(
        "art-1", "student", 7, "onnx", "int8", 2500, "b" * 64, 1024, ["c" * 64] * 3, META, id="manifest-0001", **kw
    )


def _key_update() -> P.KeyUpdate:
    keys = [{"key_id": k.key_id, "public_key": k.public_hex} for k in (KEY, NEXT_KEY)]
    return P.KeyUpdate(3, keys, ["0123456789abcdef"], id="keyupdate-0001").signed_by(KEY)


def _scores(**kw) -> Scores:
    return Scores(
        "probe-0001",
        "pi-1",
        ENCODER,
        np.array([3.5, -1.25, 0.0, 12.0]),
        2.5,
        1.0,
        0.75,
        1e-6,
        "gaussian",
        "scores-0001",
        CREATED,
        **kw,
    )


LABELS = ["cat", "dog", "fox"]


def _label_query(**kw) -> LabelQuery:
    return LabelQuery(
        "query-0001", ENCODER, LABELS, _centroids(5, 6), **{"votes_per_sample": 3, "created": CREATED, **kw}
    )


def _label_votes() -> LabelVotes:
    votes = np.arange(15, dtype=np.float64).reshape(5, 3) - 2.5
    return LabelVotes(
        "query-0001",
        "pi-1",
        ENCODER,
        LABELS,
        votes,
        {"mechanism": "gaussian", "sigma": 4.0, "sensitivity": 1.75},
        {"epsilon": 0.5, "delta": 1e-6, "accountant": "rdp"},
        id="votes-0001",
        created=CREATED,
    )


CASES: Dict[str, Callable[[], bytes]] = {
    "probe_minimal": lambda: _probe().to_bytes(),
    "probe_full": lambda: _probe(max_distance=0.5, deadline=1767323045.5, radii=RADII).to_bytes(),
    "probe_int8": lambda: _probe(codec="int8").to_bytes(),
    "probe_float32": lambda: _probe(codec="float32", max_distance=0.25).to_bytes(),
    "probe_signed_minimal": lambda: _probe().to_bytes(signer=KEY),
    "probe_signed_full": lambda: _probe(max_distance=0.5, deadline=1767323045.5, radii=RADII).to_bytes(signer=KEY),
    "probe_encoders": lambda: _probe(encoders=(ENCODER, "f" * 64)).to_bytes(),
    "probe_signed_encoders": lambda: _probe(encoders=("f" * 64,), radii=RADII).to_bytes(signer=KEY),
    "scores": lambda: _scores().to_bytes(),
    "scores_far": lambda: _scores(far=4.5).to_bytes(),
    "artifact_manifest": lambda: _manifest(targets=["pi-1", "fleet:lab"]).signed_by(KEY).to_bytes(),
    "artifact_manifest_legacy": lambda: _manifest().with_signature("d" * 128).to_bytes(),
    "artifact_chunk": lambda: P.ArtifactChunk("art-1", 2, bytes(range(256)) * 4, id="chunk-0001").to_bytes(),
    "ack": lambda: P.Ack("pi-1", "art-1", 3, id="ack-0001").to_bytes(),
    "refusal": lambda: P.Refusal("probe-0001", "pi-1", "privacy_budget", "over budget", id="refusal-0001").to_bytes(),
    "installed": lambda: P.Installed("pi-1", "art-1", 7, "a" * 64, 0.75, 40, id="installed-0001").to_bytes(),
    "installed_no_eval": lambda: P.Installed("pi-1", "art-1", 7, "a" * 64, id="installed-0002").to_bytes(),
    "install_failed": lambda: P.InstallFailed("pi-1", "art-1", "bad_signature", "no", id="failed-0001").to_bytes(),
    "status_online": lambda: P.Status(
        "pi-1",
        "online",
        {"artifact_id": "art-1", "version": 2},
        {"artifact_id": "enc-1", "version": 1, "sha256": ENCODER},
        id="status-0001",
        keys=[KEY.key_id, NEXT_KEY.key_id],
    ).to_bytes(),
    "status_offline": lambda: P.Status("pi-1", "offline", id="status-0002").to_bytes(),
    "key_update": lambda: _key_update().to_bytes(),
    "label_query": lambda: _label_query().to_bytes(),
    "label_query_float32": lambda: _label_query(max_distance=0.5, codec="float32").to_bytes(),
    "label_query_signed": lambda: _label_query(deadline=1767323045.5).to_bytes(signer=KEY),
    "label_votes": lambda: _label_votes().to_bytes(),
}


def _decode(data: bytes, name: str):
    if name.startswith("label"):
        return decode_label_message(data, f"golden {name}")
    return P.decode_message(data, f"golden {name}")


def _check_fields(name: str, msg) -> None:
    """A few decoded fields per message, so a decoder that drops or renames one fails here."""
    if name.startswith("probe"):
        assert isinstance(msg, Probe) and msg.probe_id == "probe-0001" and msg.encoder_sha256 == ENCODER
        assert msg.k == 4 and msg.feature_dim == 6 and msg.created == CREATED
        atol = {"float32": 0, "float16": 1e-3, "int8": 1e-2}[msg.codec]
        np.testing.assert_allclose(msg.centroids, _centroids(), atol=atol)
        assert msg.signed == ("signed" in name)
        if msg.signed:
            assert msg.key_id == KEY.key_id
            KEY.public.verify(bytes.fromhex(msg.signature), msg.signed_bytes())
        if name.endswith("full"):
            assert msg.max_distance == 0.5 and msg.deadline == 1767323045.5
            np.testing.assert_array_equal(msg.radii, RADII)
        elif name.endswith("encoders"):
            assert msg.accepted_encoders == (ENCODER, "f" * 64) and msg.deadline is None
        else:
            assert msg.radii is None and msg.deadline is None and msg.encoders is None
    elif name.startswith("scores"):
        assert isinstance(msg, Scores) and msg.message_id == "scores-0001" and msg.device_id == "pi-1"
        np.testing.assert_array_equal(msg.scores, [3.5, -1.25, 0.0, 12.0])
        assert (msg.sigma, msg.sensitivity, msg.epsilon, msg.delta) == (2.5, 1.0, 0.75, 1e-6)
        assert msg.far == (4.5 if name == "scores_far" else None)
    elif name.startswith("artifact_manifest"):
        assert msg.version == 7 and msg.n_chunks == 3 and msg.meta == META and msg.format == "onnx"
        if name == "artifact_manifest":
            assert msg.targets == ["pi-1", "fleet:lab"] and msg.key_id == KEY.key_id
            KEY.public.verify(bytes.fromhex(msg.signature), msg.signed_bytes())
        else:
            assert msg.targets is None and msg.key_id is None and msg.signature == "d" * 128
    elif name == "artifact_chunk":
        assert msg.index == 2 and msg.data == bytes(range(256)) * 4
    elif name == "ack":
        assert (msg.device_id, msg.artifact_id, msg.next_chunk) == ("pi-1", "art-1", 3)
    elif name == "refusal":
        assert (msg.probe_id, msg.code, msg.reason) == ("probe-0001", "privacy_budget", "over budget")
    elif name.startswith("installed"):
        assert msg.version == 7 and msg.sha256 == "a" * 64
        assert (msg.accuracy, msg.n_eval) == ((0.75, 40) if name == "installed" else (None, 0))
    elif name == "install_failed":
        assert (msg.code, msg.reason) == ("bad_signature", "no")
    elif name.startswith("status"):
        assert msg.state == name.split("_")[1]
        if name == "status_online":
            assert msg.model == {"artifact_id": "art-1", "version": 2} and msg.keys == [KEY.key_id, NEXT_KEY.key_id]
        else:
            assert msg.model is None and msg.encoder is None and msg.keys is None
    elif name == "key_update":
        assert msg.serial == 3 and msg.revoked == ["0123456789abcdef"] and msg.key_id == KEY.key_id
        KEY.public.verify(bytes.fromhex(msg.signature), msg.signed_bytes())
    elif name.startswith("label_query"):
        assert msg.id == "query-0001" and msg.labels == LABELS and msg.votes_per_sample == 3 and msg.n_queries == 5
        atol = 0 if msg.codec == "float32" else 1e-3
        np.testing.assert_allclose(msg.features, _centroids(5, 6), atol=atol)
        assert msg.max_distance == (0.5 if name == "label_query_float32" else None)
        assert msg.signed == (name == "label_query_signed")
        assert msg.deadline == (1767323045.5 if msg.signed else None)
        if msg.signed:
            assert msg.key_id == KEY.key_id
            KEY.public.verify(bytes.fromhex(msg.signature), msg.signed_bytes())
    elif name == "label_votes":
        assert msg.query_id == "query-0001" and msg.device_id == "pi-1" and msg.labels == LABELS
        np.testing.assert_array_equal(msg.votes, np.arange(15).reshape(5, 3) - 2.5)
        assert (msg.sigma, msg.sensitivity, msg.epsilon) == (4.0, 1.75, 0.5) and msg.privacy["accountant"] == "rdp"
    else:
        raise AssertionError(f"no field checks for golden {name}")


def regenerate() -> None:
    GOLDEN.mkdir(exist_ok=True)
    for name, build in CASES.items():
        (GOLDEN / f"{name}.bin").write_bytes(build())
    for stale in set(p.stem for p in GOLDEN.glob("*.bin")) - set(CASES):
        (GOLDEN / f"{stale}.bin").unlink()


if REGEN:
    regenerate()


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_bytes_decode_and_re_encode_byte_for_byte(name):
    data = (GOLDEN / f"{name}.bin").read_bytes()
    msg = _decode(data, name)
    _check_fields(name, msg)
    assert msg.to_bytes() == data, f"{name}: decoded and re-encoded, the bytes differ"


@pytest.mark.parametrize("name", sorted(CASES))
def test_messages_built_from_their_fields_encode_to_the_golden_bytes(name):
    assert CASES[name]() == (GOLDEN / f"{name}.bin").read_bytes()


def test_every_message_type_has_a_golden_file():
    types = {wire.decode((GOLDEN / f"{name}.bin").read_bytes()).type for name in CASES}
    assert types == set(P.ALL_TYPES) | {"label_query", "label_votes"}
    assert sorted(p.stem for p in GOLDEN.glob("*.bin")) == sorted(CASES)


def test_golden_files_start_with_the_v1_envelope():
    for name in CASES:
        data = (GOLDEN / f"{name}.bin").read_bytes()
        assert data[:5] == b"ECOS\x01", name


if __name__ == "__main__":
    regenerate()
    print(f"wrote {len(CASES)} golden messages to {GOLDEN}")
