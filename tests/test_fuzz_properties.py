"""Property tests (hypothesis): any bytes, any mutation of a valid input, give only typed errors.

For every message type and every file format the project reads, random bytes and mutations of
valid encodings (bit flips, truncations, splices, payload edits with the checksum fixed, and the
header JSON rewritten at a random place with a wrong type, a huge or negative integer, a
non-finite number, a control character, a lone surrogate, a huge string or deep nesting) either
decode or raise an ``EcosError`` subclass; never another exception. The daemon and the agent
handle the same inputs without an unexpected failure (no ``internal_error`` drop).

Besides the random properties, two systematic sweeps put every hostile value of ``HOSTILE_VALUES``
at every place of every valid header and JSON file (about 10,000 messages, a few seconds).
Deterministic (``derandomize``) and bounded (``FUZZ_EXAMPLES`` per property, 200 by default);
``ECOS_FUZZ_EXAMPLES=5000`` makes a longer run with fresh random examples.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from pathlib import Path
from typing import Any, Callable, Iterator, List, Tuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import device_sdk.protocol as P
from device_sdk.errors import EcosError
from device_sdk.protocol import envelope as wire
from device_sdk.protocol.round import Probe, Scores
from device_sdk.runtime.artifact import ArtifactMeta

FUZZ_EXAMPLES = int(os.environ.get("ECOS_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize="ECOS_FUZZ_EXAMPLES" not in os.environ,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DEV = "pi-1"
META = {
    "kind": "classifier",
    "arch": "linear",
    "input_shape": [3, 8, 8],
    "mean": [0.5] * 3,
    "std": [0.25] * 3,
    "labels": ["a", "b"],
    "precision": "int8",
}


def typed_only(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn``; an ``EcosError`` is a fine outcome, any other exception fails the property."""
    try:
        return fn(*args)
    except EcosError:
        return None


# ---- valid inputs and their mutations ------------------------------------------------------------------


def _signing_key():
    """A fixed signing key (issue 8: signed probes, manifests and key updates are in the corpus too)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from cloud.security.keys import SigningKey

    return SigningKey(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))


def _signed_corpus() -> List[bytes]:
    key = _signing_key()
    centroids = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32)
    manifest = P.ArtifactManifest(
        "art-2", "student", 8, "onnx", "int8", 2500, "b" * 64, 1024, ["c" * 64] * 3, META, targets=[DEV, "fleet:f1"]
    )
    return [
        Probe(
            "r2",
            "e" * 64,
            centroids,
            "float16",
            None,
            "2026-01-01T00:00:00+00:00",
            1e9,
            radii=np.full(4, 0.25, np.float32),
        ).to_bytes(signer=key),
        manifest.signed_by(key).to_bytes(),
        P.KeyUpdate(2, [{"key_id": key.key_id, "public_key": key.public_hex}], ["0" * 16]).signed_by(key).to_bytes(),
        P.Status(DEV, "online", None, None, keys=[key.key_id]).to_bytes(),
    ]


def _corpus() -> List[bytes]:
    centroids = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    return _signed_corpus() + [
        Probe("r1", "e" * 64, centroids, "float16", 0.5, "2026-01-01T00:00:00+00:00", 1e9).to_bytes(),
        Probe("r1", "e" * 64, centroids, "int8").to_bytes(),
        Probe("r1", "e" * 64, centroids, "float32").to_bytes(),
        Scores("r1", DEV, "e" * 64, np.arange(4.0), 3.0, epsilon=0.5, delta=1e-5).to_bytes(),
        P.Ack(DEV, "art-1", 1).to_bytes(),
        P.Refusal("r1", DEV, "privacy_budget", "over budget").to_bytes(),
        P.Installed(DEV, "art-1", 1, "a" * 64, 0.75, 40).to_bytes(),
        P.Installed(DEV, "art-1", 1, "a" * 64, None, 0).to_bytes(),
        P.InstallFailed(DEV, "art-1", "bad_hash", "nope").to_bytes(),
        P.Status(DEV, "online", {"artifact_id": "art-1", "version": 2, "name": "n", "sha256": "a" * 64}).to_bytes(),
        P.Status(DEV, "offline").to_bytes(),
        P.ArtifactChunk("art-1", 2, bytes(range(256)) * 4).to_bytes(),
        P.ArtifactManifest(
            "art-1", "student", 7, "onnx", "int8", 2500, "b" * 64, 1024, ["c" * 64] * 3, META, "d" * 128
        ).to_bytes(),
    ]


CORPUS = _corpus()
PREFIX = struct.Struct("<4sBI")


def split(data: bytes):
    _, _, hlen = PREFIX.unpack_from(data)
    return json.loads(data[PREFIX.size : PREFIX.size + hlen]), data[PREFIX.size + hlen :]


def join(header: Any, payload: bytes, fix: bool = True) -> bytes:
    """An envelope around ``header`` (any JSON value); with ``fix`` its length and checksum are right."""
    if fix and isinstance(header, dict):
        header = {**header, "payload_len": len(payload), "payload_sha256": hashlib.sha256(payload).hexdigest()}
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8", "surrogatepass")
    return PREFIX.pack(wire.MAGIC, wire.FORMAT_VERSION, len(hb)) + hb + payload


class Raw:
    """JSON text put in a document as is: what ``json.dumps`` cannot write (deep nesting, 5000 digits)."""

    MARK = "\x00raw\x00"

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:30]!r}... {len(self.text)} chars)"


def dumps(doc: Any, raw: Any = None) -> bytes:
    text = json.dumps(doc, separators=(",", ":"))
    if raw is not None:
        text = text.replace(json.dumps(Raw.MARK), raw.text)
    return text.encode("utf-8")


def join(header: Any, payload: bytes, fix: bool = True, raw: Any = None) -> bytes:
    """An envelope around ``header`` (any JSON value); with ``fix`` its length and checksum are right."""
    if fix and isinstance(header, dict):
        header = {**header, "payload_len": len(payload), "payload_sha256": hashlib.sha256(payload).hexdigest()}
    hb = dumps(header, raw)
    return PREFIX.pack(wire.MAGIC, wire.FORMAT_VERSION, len(hb)) + hb + payload


def paths(doc: Any, prefix: tuple = ()) -> List[tuple]:
    """The path (keys and indices) of every value inside ``doc``."""
    out = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        out.append(prefix + (key,))
        out.extend(paths(value, prefix + (key,)))
    return out


def replaced(doc: Any, path: tuple, value: Any) -> Tuple[Any, Any]:
    """``(copy of doc with the value at path replaced, Raw or None)``."""
    doc = json.loads(json.dumps(doc))
    node = doc
    for key in path[:-1]:
        node = node[key]
    raw = value if isinstance(value, Raw) else None
    node[path[-1]] = Raw.MARK if raw is not None else value
    return doc, raw


# What a hostile header holds where a valid one has something else: each found a bug in one reader.
HOSTILE_VALUES = [
    -1,
    0,
    2**31 - 1,
    2**31,
    2**32,
    2**53 + 1,
    2**63,
    2**70,
    -(2**63) - 1,
    10**400,
    Raw("9" * 400),
    Raw("1" * 5000),
    Raw("1e999"),
    Raw("-1e999"),
    Raw("NaN"),
    Raw("Infinity"),
    True,
    False,
    None,
    1.5,
    -0.0,
    1e308,
    5e-324,
    "",
    "x" * 70_000,
    "y" * 3000,
    "\ud800",
    "a\nb\x00\x1b[2J",
    "../..",
    "ecos/v1/dev/+/out",
    [],
    {},
    [[]],
    [-1, -1],
    [2**32, 2**32],
    [2**62, 0],
    [True],
    ["3"],
    [1.5],
    [0],
    [1] * 40,
    {"sigma": 10**400},
    {"artifact_id": "a", "version": 2**40},
    [{"name": "x"}],
    Raw("[" * 3000 + "]" * 3000),
    Raw("[" * 40 + "]" * 40),
    Raw('{"a":' * 2000 + "1" + "}" * 2000),
]
HOSTILE = st.one_of(
    st.sampled_from(HOSTILE_VALUES),
    st.integers(),
    st.floats(),
    st.text(max_size=40),
    st.lists(st.integers(min_value=-3, max_value=2**40), max_size=10),
    st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8) | st.none(), max_size=4),
)


@st.composite
def rewritten(draw, corpus: List[bytes] = CORPUS) -> bytes:
    """A valid message whose header has one value (at a random path) replaced by a hostile one."""
    header, payload = split(draw(st.sampled_from(corpus)))
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        header[draw(st.text(max_size=12))] = draw(st.integers() | st.text(max_size=8))  # an extra key
        doc, raw = header, None
    else:
        doc, raw = replaced(header, draw(st.sampled_from(paths(header))), draw(HOSTILE))
    return join(doc, payload, fix=draw(st.integers(min_value=0, max_value=9)) > 0, raw=raw)


@st.composite
def mutated(draw, corpus: List[bytes] = CORPUS) -> bytes:
    """A valid message damaged byte-wise: bit flips, truncation, a splice, or its payload edited (checksum fixed)."""
    data = bytearray(draw(st.sampled_from(corpus)))
    kind = draw(st.sampled_from(["flip", "truncate", "splice", "payload"]))
    if kind == "flip":
        for _ in range(draw(st.integers(min_value=1, max_value=8))):
            i = draw(st.integers(min_value=0, max_value=len(data) - 1))
            data[i] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        return bytes(data)
    if kind == "truncate":
        return bytes(data[: draw(st.integers(min_value=0, max_value=len(data)))])
    if kind == "splice":
        i = draw(st.integers(min_value=0, max_value=len(data)))
        j = draw(st.integers(min_value=i, max_value=min(len(data), i + 64)))
        return bytes(data[:i]) + draw(st.binary(max_size=64)) + bytes(data[j:])
    header, payload = split(bytes(data))
    payload = bytearray(payload)
    for _ in range(draw(st.integers(min_value=1, max_value=16))):
        if payload:
            payload[draw(st.integers(min_value=0, max_value=len(payload) - 1))] = draw(st.integers(0, 255))
    return join(header, bytes(payload))


ANY_MESSAGE = st.one_of(
    st.binary(max_size=512), rewritten(), mutated(), st.binary(max_size=256).map(lambda b: wire.MAGIC + b"\x01" + b)
)


def header_sweep() -> Iterator[Tuple[str, bytes]]:
    """Every value of every valid message's header replaced by every hostile value, in turn."""
    for data in CORPUS:
        header, payload = split(data)
        for path in paths(header):
            for value in HOSTILE_VALUES:
                doc, raw = replaced(header, path, value)
                yield f"{header['type']} {path} = {value!r:.60}", join(doc, payload, raw=raw)


def json_sweep(valid: Any) -> Iterator[Tuple[str, bytes]]:
    for path in paths(valid):
        for value in HOSTILE_VALUES:
            yield f"{path} = {value!r:.60}", dumps(*replaced(valid, path, value))


def untyped_failures(cases: Iterator[Tuple[str, bytes]], check: Callable[[bytes], Any]) -> List[str]:
    """The cases where ``check`` raised something other than an ``EcosError`` (all of them, to report)."""
    failures = []
    for what, data in cases:
        try:
            check(data)
        except EcosError:
            pass
        except Exception as exc:  # noqa: BLE001 - that is what is being looked for
            failures.append(f"{what}: {exc.__class__.__name__}: {str(exc)[:100]}")
    return failures


def decode_everywhere(data: bytes) -> None:
    for decode in (wire.decode, P.decode_message, Probe.from_bytes, Scores.from_bytes):
        typed_only(decode, data)
    typed_only(P.decode_from_device, P.outbox(DEV), data)
    typed_only(P.decode_from_device, P.device_status(DEV), data)
    typed_only(P.decode_for_device, DEV, P.inbox(DEV), data)
    manifest = typed_only(P.ArtifactManifest.from_bytes, data)
    if manifest is not None:
        _ = manifest.artifact_meta


# ---- 1. the decoders --------------------------------------------------------------------------------------


def test_every_header_value_replaced_by_every_hostile_value_gives_only_typed_errors():
    cases = list(header_sweep())
    assert len(cases) > 10_000
    assert untyped_failures(iter(cases), decode_everywhere) == []


@FUZZ
@given(ANY_MESSAGE)
def test_every_decoder_gives_only_typed_errors(data):
    typed_only(wire.decode, data)
    typed_only(P.decode_message, data)
    typed_only(P.decode_from_device, P.outbox(DEV), data)
    typed_only(P.decode_from_device, P.device_status(DEV), data)
    typed_only(P.decode_for_device, DEV, P.inbox(DEV), data)
    typed_only(Probe.from_bytes, data)
    typed_only(Scores.from_bytes, data)
    manifest = typed_only(P.ArtifactManifest.from_bytes, data)
    if manifest is not None:
        typed_only(lambda: manifest.artifact_meta)


@FUZZ
@given(rewritten())
def test_header_rewrites_give_only_typed_errors_for_every_message_type(data):
    for cls in (
        P.Ack,
        P.Refusal,
        P.Installed,
        P.InstallFailed,
        P.Status,
        P.ArtifactChunk,
        P.ArtifactManifest,
        P.KeyUpdate,
    ):
        typed_only(cls.from_bytes, data)
    msg = typed_only(P.decode_message, data)
    if msg is not None:  # what decodes is within bounds: it re-encodes and decodes to itself
        assert P.decode_message(msg.to_bytes()) == msg if not isinstance(msg, (Probe, Scores)) else True


# ---- files ------------------------------------------------------------------------------------------------


@st.composite
def json_files(draw, valid: Any) -> bytes:
    """A JSON file: ``valid`` with one value replaced, or damaged bytes of it, or random bytes."""
    kind = draw(st.sampled_from(["rewrite", "rewrite", "flip", "truncate", "random"]))
    text = json.dumps(valid).encode()
    if kind == "rewrite":
        return dumps(*replaced(valid, draw(st.sampled_from(paths(valid))), draw(HOSTILE)))
    if kind == "flip":
        data = bytearray(text)
        for _ in range(draw(st.integers(min_value=1, max_value=4))):
            data[draw(st.integers(min_value=0, max_value=len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if kind == "truncate":
        return text[: draw(st.integers(min_value=0, max_value=len(text)))]
    return draw(st.binary(max_size=300))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-files")


def test_every_value_of_every_json_file_replaced_by_every_hostile_value_gives_only_typed_errors(files):
    from device_sdk.delivery.install import ModelStore
    from device_sdk.privacy.ledger import PrivacyLedger

    def ledger(data: bytes) -> None:
        (files / "ledger.json").write_bytes(data)
        read = PrivacyLedger(files / "ledger.json")
        read.summary(), read.lookup("r1"), read.would_spend(1.0)

    def state(data: bytes) -> None:
        (files / "models").mkdir(exist_ok=True)
        (files / "models" / "state.json").write_bytes(data)
        store = ModelStore(files / "models")
        store.current("classifier"), store.previous("classifier"), store.kinds()

    def trust(data: bytes) -> None:
        from device_sdk.trust import DeviceTrust

        (files / "trust.json").write_bytes(data)
        _ = DeviceTrust([_signing_key().public], state_path=files / "trust.json").key_ids

    def ring(data: bytes) -> None:
        from cloud.security.keys import KeyRing

        (files / "ring").mkdir(exist_ok=True)
        (files / "ring" / "keyring.json").write_bytes(data)
        KeyRing(files / "ring").describe()

    assert untyped_failures(json_sweep(META), ArtifactMeta.from_json) == []
    assert untyped_failures(json_sweep(_ledger_doc()), ledger) == []
    assert untyped_failures(json_sweep(_state_doc()), state) == []
    assert untyped_failures(json_sweep(_trust_doc()), trust) == []
    assert (
        untyped_failures(json_sweep({"kind": "ecos.keyring", "version": 1, "serial": 3, "revoked": ["0" * 16]}), ring)
        == []
    )


def _trust_doc() -> dict:
    key = _signing_key()
    return {
        "kind": "ecos.trust_state",
        "version": 1,
        "serial": 2,
        "keys": {key.key_id: key.public_hex},
        "revoked": ["0" * 16],
    }


@FUZZ
@given(json_files(META))
def test_artifact_metadata_gives_only_artifact_errors(data):
    typed_only(ArtifactMeta.from_json, data)
    typed_only(ArtifactMeta.from_json, data.decode("utf-8", "replace"))


def _ledger_doc() -> dict:
    payload = b"released"
    return {
        "kind": "ecos.privacy_ledger",
        "version": 1,
        "device_id": DEV,
        "created_utc": "2026-01-01T00:00:00Z",
        "accountant": "gaussian",
        "budget": {"epsilon": 3.0, "delta": 1e-5},
        "budget_changes": [],
        "releases": [
            {
                "key": "r1",
                "mechanism": "gaussian",
                "sigma": 2.0,
                "sensitivity": 1.0,
                "n_values": 4,
                "time_utc": "",
                "epsilon_after": 1.0,
                "payload_sha256": hashlib.sha256(payload).hexdigest(),
                "payload_b64": "cmVsZWFzZWQ=",
            }
        ],
    }


@FUZZ
@given(json_files(_ledger_doc()))
def test_the_privacy_ledger_file_gives_only_typed_errors(files, data):
    from device_sdk.privacy.ledger import PrivacyLedger

    path = files / "ledger.json"
    path.write_bytes(data)
    ledger = typed_only(PrivacyLedger, path)
    if ledger is not None:
        typed_only(ledger.summary)
        typed_only(ledger.lookup, "r1")
        typed_only(ledger.would_spend, 1.0)


def _state_doc() -> dict:
    record = {
        "kind": "classifier",
        "artifact_id": "art-1",
        "name": "n",
        "version": 1,
        "sha256": "a" * 64,
        "format": "onnx",
        "path": "/tmp/none.onnx",
        "installed_utc": "",
    }
    return {"slots": {"classifier": {"current": record, "previous": dict(record, version=0), "max_version": 1}}}


@FUZZ
@given(json_files(_state_doc()))
def test_the_model_store_state_gives_only_typed_errors(files, data):
    from device_sdk.delivery.install import ModelStore

    root = files / "models"
    root.mkdir(exist_ok=True)
    (root / "state.json").write_bytes(data)
    store = ModelStore(root)
    for kind in ("classifier", "encoder"):
        typed_only(store.current, kind)
        typed_only(store.previous, kind)
        typed_only(store.max_version, kind)
    typed_only(store.kinds)


@FUZZ
@given(st.one_of(rewritten(), mutated(), st.binary(max_size=300)))
def test_probe_scores_and_manifest_files_give_only_typed_errors(files, data):
    from cloud.sampling.selection import load_scores

    path = files / "message.bin"
    path.write_bytes(data)
    probe = typed_only(lambda: Probe.from_envelope(wire.read_file(str(path), "probe"), str(path)))
    if probe is not None:
        typed_only(P.check_probe, probe)
    typed_only(load_scores, [str(path)])
    typed_only(lambda: P.ArtifactManifest.from_bytes(wire.read_file(str(path)), str(path)).artifact_meta)


def _index_arrays() -> dict:
    return {
        "paths": np.array(["a.png", "b.png", "c.png"]),
        "labels": np.array(["0", "1", "1"]),
        "domains": np.array(["d", "d", "e"]),
        "features": np.eye(3, 4, dtype=np.float32),
        "assign": np.array([0, 1, 1], np.int32),
        "centroids": np.eye(2, 4, dtype=np.float32),
        "meta": np.array(json.dumps({"format": 1, "encoder_sha256": "e" * 64, "probe_id": "p1", "created": ""})),
    }


ARRAY_STRATEGY = hnp.arrays(
    st.sampled_from([np.float32, np.float64, np.int32, np.uint8, np.dtype("U4"), np.bool_]),
    hnp.array_shapes(min_dims=0, max_dims=3, max_side=4),
)


@st.composite
def index_files(draw) -> bytes:
    arrays = _index_arrays()
    kind = draw(st.sampled_from(["array", "meta", "drop", "flip", "truncate"]))
    if kind == "array":
        arrays[draw(st.sampled_from(sorted(arrays)))] = draw(ARRAY_STRATEGY)
    elif kind == "meta":
        arrays["meta"] = np.array(draw(json_files(json.loads(str(arrays["meta"])))).decode("utf-8", "replace"))
    elif kind == "drop":
        arrays.pop(draw(st.sampled_from(sorted(arrays))))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = bytearray(buf.getvalue())
    if kind == "flip":
        for _ in range(draw(st.integers(min_value=1, max_value=8))):
            data[draw(st.integers(min_value=0, max_value=len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
    if kind == "truncate":
        data = data[: draw(st.integers(min_value=0, max_value=len(data)))]
    return bytes(data)


@FUZZ
@given(index_files())
def test_the_pool_index_file_gives_only_typed_errors(files, data):
    from cloud.pool.index import PoolIndex

    path = files / "pool.npz"
    path.write_bytes(data)
    index = typed_only(PoolIndex.load, str(path))
    if index is not None:  # what loads fits together: its probe encodes, and decodes or is refused
        probe = Probe(index.probe_id, index.encoder_sha256, index.centroids, "float32")
        typed_only(lambda: P.check_probe(Probe.from_bytes(probe.to_bytes())))


@pytest.fixture(scope="module")
def key_pems(tmp_path_factory) -> List[bytes]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from cloud.security.keys import generate_keypair
    from device_sdk.signing import load_public_key

    private, public = generate_keypair(tmp_path_factory.mktemp("fuzz-keys"))
    other = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    raw_hex = load_public_key(public).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    return [private.read_bytes(), public.read_bytes(), other, raw_hex.encode()]


@FUZZ
@given(st.data())
def test_key_files_give_only_usage_errors(files, key_pems, data):
    """A damaged key file: bit flips anywhere, the base64 body included (its DER then names odd key types)."""
    from cloud.security.keys import load_private_key
    from device_sdk.signing import load_public_key

    pem = bytearray(data.draw(st.sampled_from(key_pems)))
    for _ in range(data.draw(st.integers(min_value=0, max_value=4))):
        pem[data.draw(st.integers(min_value=0, max_value=len(pem) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    path = files / "key.pem"
    path.write_bytes(bytes(pem))
    typed_only(load_public_key, path)
    typed_only(load_private_key, path)


@FUZZ
@given(st.binary(max_size=200), st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=24))
def test_tflite_metadata_gives_only_artifact_errors(tail, words):
    from device_sdk.runtime.tflite_meta import read_tflite_metadata

    data = struct.pack("<I", 8) + b"TFL3" + b"".join(struct.pack("<I", w) for w in words) + tail
    typed_only(read_tflite_metadata, data)


@FUZZ
@given(
    st.one_of(st.integers(), st.floats(), st.booleans(), st.none(), st.text(max_size=20)),
    st.one_of(st.text(max_size=20), st.sampled_from(["\ud800", "a\x00b"]), st.integers()),
)
def test_store_inputs_give_only_store_errors(number, text):
    from cloud.serve.store import SqliteStore

    store = SqliteStore(":memory:")
    store.add_delivery("art-1", DEV, "r1", 3)
    typed_only(lambda: store.update_delivery("art-1", DEV, next_chunk=number))
    typed_only(store.add_traffic, DEV, "r1", "up", "ack", number)
    typed_only(store.record_status, text, "online", None, 0.0)
    typed_only(store.job_progress, "j", number, 1)
    store.close()


# ---- 3. the message loops: no unexpected failure for any of these inputs ---------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from test_hostile_input import small_daemon

    return small_daemon(tmp_path_factory.mktemp("fuzz-daemon") / "cloud")


def test_the_daemon_handles_every_swept_message_without_an_unexpected_failure(daemon):
    for _, data in header_sweep():
        daemon.handle_message(P.outbox(DEV), data)
        daemon.handle_message(P.device_status(DEV), data)
    assert daemon.metrics.dropped.value(reason="internal_error") == 0
    assert daemon.metrics.dropped.value(reason="malformed") > 10_000


@FUZZ
@given(ANY_MESSAGE, st.sampled_from(["out", "status", "in", "bogus"]))
def test_the_daemon_handles_any_message_without_an_unexpected_failure(daemon, data, channel):
    topic = f"ecos/v1/dev/{DEV}/{channel}"
    daemon.handle_message(topic, data)
    assert daemon.metrics.dropped.value(reason="internal_error") == 0


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    from test_hostile_input import offline_agent

    return offline_agent(tmp_path_factory.mktemp("fuzz-agent"))


@FUZZ
@given(ANY_MESSAGE)
def test_the_agent_handles_any_message_without_an_unexpected_failure(agent, data):
    agent.handle(P.inbox(DEV), data)
    assert agent.stats.dropped == agent.stats.rejected  # every drop was a rejection, none a failure
