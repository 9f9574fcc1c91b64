"""ECOS over MQTT, protocol version 1: topic names and the schema of every message.

Both sides import this module (the cloud from the device SDK, never the other way round), so
the two ends cannot drift apart. Topics live under a versioned root, one inbox (cloud -> device)
and one outbox (device -> cloud) per device, so a broker ACL can confine a device to its own
topics. Payloads are ``device_sdk.protocol.envelope`` envelopes; every message has an ``id`` and is checked
against its schema on receipt, and every defect (unknown type, wrong field type, a device id
that is not the topic's, an oversized payload) is a ``MessageError`` that the receiver logs and
drops. The exact rules are written down in docs/protocol.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import numpy as np

from device_sdk.protocol import envelope as wire
from device_sdk.runtime.artifact import ArtifactMeta
from device_sdk.errors import ArtifactError, MessageError, UsageError
from device_sdk.protocol.round import PROBE, SCORES, Probe, Scores, new_id
from device_sdk.signing import Signer, is_key_id, is_public_hex, is_signature, key_id_of_raw

ROOT = "ecos/v1"
CLOUD_STATUS = f"{ROOT}/cloud/status"
CLOUD_SUBSCRIPTIONS = (f"{ROOT}/dev/+/out", f"{ROOT}/dev/+/status")

MAX_PAYLOAD_BYTES = 4 << 20  # the largest MQTT payload either side decodes
DEFAULT_CHUNK_SIZE = 64 << 10
MIN_CHUNK_SIZE = 1 << 10
MAX_CHUNK_SIZE = 192 << 10  # a chunk message stays under a 256 KB broker packet limit
FORMATS = ("onnx", "tflite")
STATES = ("online", "offline")
# Bounds of every integer and string a message may carry: checked on receipt, so nothing larger
# reaches the store (SQLite holds 64-bit integers), a log line or an allocation.
MAX_CHUNKS = 1 << 31  # chunk index and next_chunk are below this
MAX_VERSION = (1 << 31) - 1
MAX_ARTIFACT_BYTES = 1 << 32
MAX_COUNT = (1 << 31) - 1  # n_eval, k
MAX_ID_CHARS = 128  # message ids, probe ids, hashes named in a message
MAX_NAME_CHARS = 128
MAX_CODE_CHARS = 64
MAX_REASON_CHARS = 2000
MAX_REF_KEYS = 8
MAX_TARGETS = 4096  # devices (or fleets) one manifest may name
MAX_TRUST_KEYS = 64  # public keys in a key update, key ids in a status
MAX_REVOKED = 1024  # key ids a key update may revoke
FLEET_PREFIX = "fleet:"  # a manifest target "fleet:<id>" is every device configured with that fleet id

_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SIGNATURE = re.compile(r"[0-9a-f]{128}")
_PROBE_ID = re.compile(r"[\x21-\x7e]{1,%d}" % MAX_ID_CHARS)  # names a round and a ledger entry: no control characters
_CODE = re.compile(r"[A-Za-z0-9_.-]{1,%d}" % MAX_CODE_CHARS)
_NUMBER = (int, float)
_NONE = type(None)


# ---- topics ----------------------------------------------------------------------------------

def is_valid_id(value: Any) -> bool:
    """Device and artifact ids: ``[A-Za-z0-9_.-]{1,64}``, and not ``.``/``..`` (they name folders)."""
    return isinstance(value, str) and bool(_ID_RE.fullmatch(value)) and value not in (".", "..")


def check_device_id(device_id: Any) -> str:
    if not is_valid_id(device_id):
        raise UsageError(f"device id {device_id!r} is invalid: use 1-64 of A-Z a-z 0-9 _ . - (not '.' or '..')")
    return device_id


def inbox(device_id: str) -> str:
    """Cloud -> device: probes, manifests and chunks for this device."""
    return f"{ROOT}/dev/{check_device_id(device_id)}/in"


def outbox(device_id: str) -> str:
    """Device -> cloud: scores, refusals, acks and install reports of this device."""
    return f"{ROOT}/dev/{check_device_id(device_id)}/out"


def device_status(device_id: str) -> str:
    """Retained ``status`` of this device: ``online`` on connect, ``offline`` as its last will."""
    return f"{ROOT}/dev/{check_device_id(device_id)}/status"


def parse_topic(topic: str) -> Optional[Tuple[str, str]]:
    """``(device_id, channel)`` of a per-device topic (channel ``in``/``out``/``status``), else None."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != f"{ROOT}/dev" or parts[4] not in ("in", "out", "status"):
        return None
    return (parts[3], parts[4]) if is_valid_id(parts[3]) else None


# ---- message schemas -------------------------------------------------------------------------

class Message:
    """Base of the protocol's messages: dataclass fields travel as the envelope's JSON fields.

    ``SPEC`` gives the accepted JSON types of each field (``NoneType`` where null is allowed);
    ``WIRE_NAMES`` renames a field on the wire where its name would clash with the envelope's
    own keys (``version`` is the protocol version there). Subclasses add semantic checks in
    ``_check``; ``from_envelope`` runs both, so a decoded message is always a valid one.
    """

    TYPE: ClassVar[str] = ""
    SPEC: ClassVar[Dict[str, Tuple[type, ...]]] = {}
    WIRE_NAMES: ClassVar[Dict[str, str]] = {}

    def to_bytes(self) -> bytes:
        self._check(f"outgoing {self.TYPE}")
        return wire.encode(self.TYPE, self._json_fields(), self._arrays())

    def _json_fields(self) -> Dict[str, Any]:
        return {self.WIRE_NAMES.get(name, name): getattr(self, name) for name in self.SPEC}

    def _arrays(self) -> Dict[str, np.ndarray]:
        return {}

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "message") -> "Message":
        return cls.from_envelope(wire.decode(data, cls.TYPE, source), source)

    @classmethod
    def from_envelope(cls, env: wire.Envelope, source: str = "message") -> "Message":
        values = {}
        for name, types in cls.SPEC.items():
            key = cls.WIRE_NAMES.get(name, name)
            value = env.fields.get(key)
            if not _is_a(value, types):
                raise MessageError(f"{source}: {cls.TYPE} field {key!r} is missing or has the wrong type ({value!r:.80})")
            values[name] = value
        msg = cls(**values, **cls._from_arrays(env, source))
        msg._check(source)
        return msg

    @classmethod
    def _from_arrays(cls, env: wire.Envelope, source: str) -> Dict[str, Any]:
        return {}

    def _check(self, source: str) -> None:
        _require(0 < len(self.id) <= 128, source, "id must be 1-128 characters")
        if "device_id" in self.SPEC:
            _require(is_valid_id(self.device_id), source, f"invalid device_id {self.device_id!r:.80}")
        if "artifact_id" in self.SPEC:
            _require(is_valid_id(self.artifact_id), source, f"invalid artifact_id {self.artifact_id!r:.80}")


def _is_a(value: Any, types: Tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, float) and float in types:
        return math.isfinite(value)
    return isinstance(value, types)


def _require(ok: bool, source: str, why: str) -> None:
    if not ok:
        raise MessageError(f"{source}: {why}")


def _model_ref_ok(ref: Any) -> bool:
    """None, or ``{"artifact_id": id, "version": int, ...}`` with a few short scalar entries."""
    if ref is None:
        return True
    if not isinstance(ref, dict) or len(ref) > MAX_REF_KEYS or not is_valid_id(ref.get("artifact_id")):
        return False
    version = ref.get("version")
    return _is_a(version, (int,)) and 0 <= version <= MAX_VERSION and all(_short_scalar(v) for v in ref.values())


def _short_scalar(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) <= MAX_NAME_CHARS
    if isinstance(value, (int, float)):
        return _is_a(value, (int, float)) and abs(value) <= 2 ** 53
    return value is None


def _text_ok(value: str, limit: int) -> bool:
    return 0 < len(value) <= limit


def clip_reason(text: str) -> str:
    """A refusal or install-failure reason cut to what the protocol carries (``MAX_REASON_CHARS``)."""
    suffix = "... (truncated)"
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - len(suffix)] + suffix


@dataclass(frozen=True)
class ArtifactManifest(Message):
    """What the device needs to fetch, check and install one artifact, signed by the cloud.

    ``signature`` is the hex Ed25519 signature of :meth:`signed_bytes`: the canonical JSON of
    every other field except the message ``id`` (a per-transmission id) and ``key_id`` (which
    names the key that made the signature), so re-sending the same manifest never needs a new
    signature. ``targets`` names who may install it: device ids, or ``fleet:<fleet id>``;
    ``version`` only goes up per device and slot (the artifact kind). A manifest without
    ``targets`` or ``key_id`` (made before they existed) still decodes, and every device refuses
    it (``wrong_target`` / ``unknown_key``).
    """

    TYPE: ClassVar[str] = "artifact_manifest"
    SPEC: ClassVar[Dict[str, Tuple[type, ...]]] = {
        "artifact_id": (str,), "name": (str,), "version": (int,), "format": (str,), "precision": (str,),
        "size": (int,), "sha256": (str,), "chunk_size": (int,), "chunk_sha256": (list,), "meta": (dict,),
        "signature": (str,), "id": (str,), "targets": (list, _NONE), "key_id": (str, _NONE)}
    WIRE_NAMES: ClassVar[Dict[str, str]] = {"version": "artifact_version"}

    artifact_id: str
    name: str
    version: int
    format: str
    precision: str
    size: int
    sha256: str
    chunk_size: int
    chunk_sha256: List[str]
    meta: Dict[str, Any]
    signature: str = ""
    id: str = field(default_factory=new_id)
    targets: Optional[List[str]] = None
    key_id: Optional[str] = None

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_sha256)

    @property
    def artifact_meta(self) -> ArtifactMeta:
        return ArtifactMeta.from_json(json.dumps(self.meta), f"manifest {self.artifact_id}")

    def signed_bytes(self) -> bytes:
        """The bytes the signature covers: sorted-key compact JSON of all fields but signature, id
        and key_id (``targets`` left out only when absent, as in manifests made before it)."""
        content = {name: getattr(self, name) for name in self.SPEC if name not in ("signature", "id", "key_id")}
        if content["targets"] is None:
            del content["targets"]
        return json.dumps(content, sort_keys=True, separators=(",", ":")).encode("utf-8")

    def with_signature(self, signature: str, key_id: Optional[str] = None) -> "ArtifactManifest":
        return dataclasses.replace(self, signature=signature, key_id=self.key_id if key_id is None else key_id)

    def signed_by(self, signer: Signer) -> "ArtifactManifest":
        """This manifest signed by ``signer`` (a ``cloud.security.keys.SigningKey``), with its key id."""
        return self.with_signature(signer.sign(self.signed_bytes()), signer.key_id)

    def is_for(self, device_id: str, fleets: Sequence[str] = ()) -> bool:
        """Whether ``targets`` names this device, or a fleet it is configured in."""
        if not self.targets:
            return False
        return device_id in self.targets or any(FLEET_PREFIX + f in self.targets for f in fleets)

    def _check(self, source: str) -> None:
        super()._check(source)
        _require(_text_ok(self.name, MAX_NAME_CHARS), source, f"name must be 1-{MAX_NAME_CHARS} characters")
        _require(0 <= self.version <= MAX_VERSION, source, f"version {self.version} is outside [0, {MAX_VERSION}]")
        _require(_text_ok(self.precision, 32), source, "precision must be 1-32 characters")
        _require(self.size <= MAX_ARTIFACT_BYTES, source, f"size {self.size} is over {MAX_ARTIFACT_BYTES} bytes")
        _require(self.format in FORMATS, source, f"format {self.format!r:.40} is not one of {FORMATS}")
        _require(bool(_HEX64.fullmatch(self.sha256)), source, "sha256 is not 64 lowercase hex digits")
        _require(MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE, source,
                 f"chunk_size {self.chunk_size} is outside [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]")
        _require(self.size > 0 and self.n_chunks == -(-self.size // self.chunk_size), source,
                 f"{self.n_chunks} chunk hashes for {self.size} bytes in chunks of {self.chunk_size}")
        _require(all(isinstance(h, str) and _HEX64.fullmatch(h) for h in self.chunk_sha256), source,
                 "chunk_sha256 must list 64-hex-digit hashes")
        _require(self.signature == "" or bool(_SIGNATURE.fullmatch(self.signature)), source,
                 "signature is not 128 lowercase hex digits")
        _require(self.key_id is None or is_key_id(self.key_id), source, "key_id is not 16 lowercase hex digits")
        targets_ok = self.targets is None or (0 < len(self.targets) <= MAX_TARGETS
                                              and all(_target_ok(t) for t in self.targets))
        _require(targets_ok, source, f"targets must list 1-{MAX_TARGETS} device ids or fleet:<id>")
        try:
            self.artifact_meta
        except ArtifactError as exc:
            raise MessageError(f"{source}: {exc}") from None


def _target_ok(target: Any) -> bool:
    if not isinstance(target, str):
        return False
    return is_valid_id(target[len(FLEET_PREFIX):] if target.startswith(FLEET_PREFIX) else target)


@dataclass(frozen=True)
class ArtifactChunk(Message):
    """Bytes ``[index * chunk_size, ...)`` of an artifact, as a raw uint8 array ``data``."""

    TYPE: ClassVar[str] = "artifact_chunk"
    SPEC: ClassVar[Dict[str, Tuple[type, ...]]] = {"artifact_id": (str,), "index": (int,), "id": (str,)}

    artifact_id: str
    index: int
    data: bytes
    id: str = field(default_factory=new_id)

    def _arrays(self) -> Dict[str, np.ndarray]:
        return {"data": np.frombuffer(self.data, dtype=np.uint8)}

    @classmethod
    def _from_arrays(cls, env: wire.Envelope, source: str) -> Dict[str, Any]:
        data = env.arrays.get("data")
        if data is None or data.ndim != 1 or data.dtype != np.uint8:
            raise MessageError(f"{source}: artifact_chunk needs a 1-D uint8 array 'data'")
        return {"data": data.tobytes()}

    def _check(self, source: str) -> None:
        super()._check(source)
        _require(0 <= self.index < MAX_CHUNKS, source, f"chunk index {self.index} is outside [0, {MAX_CHUNKS})")
        _require(0 < len(self.data) <= MAX_CHUNK_SIZE, source, f"chunk of {len(self.data)} bytes (limit {MAX_CHUNK_SIZE})")


@dataclass(frozen=True)
class Ack(Message):
    """The device holds chunks ``[0, next_chunk)`` of an artifact, each checked against its hash."""

    TYPE: ClassVar[str] = "ack"
    SPEC: ClassVar[Dict[str, Tuple[type, ...]]] = {
        "device_id": (str,), "artifact_id": (str,), "next_chunk": (int,), "id": (str,)}

    device_id: str
    artifact_id: str
    next_chunk: int
    id: str = field(default_factory=new_id)

    def _check(self, source: str) -> None:
        super()._check(source)
        _require(self.next_chunk >= 0, source, "next_chunk is negative")
        _require(self.next_chunk < MAX_CHUNKS, source, f"next_chunk {self.next_chunk} is not below {MAX_CHUNKS}")


@dataclass(frozen=True)
class Refusal(Message):
    """A normal reply to a probe the device will not answer; ``code`` is the error's stable code."""

    TYPE: ClassVar[str] = "refusal"
    SPEC: ClassVar[Dict[str, Tuple[type, ...]]] = {
        "probe_id": (str,), "device_id": (str,), "code": (str,), "reason": (str,), "id": (str,)}

    probe_id: str
    device_id: str
    code: str
    reason: str
    id: str = field(default_factory=new_id)

    def _check(self, source: str) -> None:
        super()._check(source)
        _require(_text_ok(self.probe_id, MAX_ID_CHARS), source, f"probe_id must be 1-{MAX_ID_CHARS} characters")
        _check_code_and_reason(self.code, self.reason, source)


@dataclass(frozen=True)
class Installed(Message):
    """The device verified and installed an artifact; ``accuracy`` on its labelled data, if any."""

    TYPE: ClassVar[str] = "installed"
    SPEC: ClassVar[Dict[str, Tuple[type, ...]]] = {
        "device_id": (str,), "artifact_id": (str,), "version": (int,), "sha256": (str,),
        "accuracy": (int, float, _NONE), "n_eval": (int,), "id": (str,)}
    WIRE_NAMES: ClassVar[Dict[str, str]] = {"version": "artifact_version"}

    device_id: str
    artifact_id: str
    version: int
    sha256: str
    accuracy: Optional[float] = None
    n_eval: int = 0
    id: str = field(default_factory=new_id)

    def _check(self, source: str) -> None:
        super()._check(source)
        _require(self.accuracy is None or 0.0 <= self.accuracy <= 1.0, source, "accuracy must be null or in [0, 1]")
        _require(0 <= self.n_eval <= MAX_COUNT, source, f"n_eval {self.n_eval} is outside [0, {MAX_COUNT}]")
        _require(0 <= self.version <= MAX_VERSION, source, f"version {self.version} is outside [0, {MAX_VERSION}]")
        _require(bool(_HEX64.fullmatch(self.sha256)), source, "sha256 is not 64 lowercase hex digits")


@dataclass(frozen=True)
class InstallFailed(Message):
    """The device refused an artifact (``bad_signature``, ``bad_hash``, ``bad_chunk``, ...) and kept its model."""

    TYPE: ClassVar[str] = "install_failed"
    SPEC: ClassVar[Dict[str, Tuple[type, ...]]] = {
        "device_id": (str,), "artifact_id": (str,), "code": (str,), "reason": (str,), "id": (str,)}

    device_id: str
    artifact_id: str
    code: str
    reason: str
    id: str = field(default_factory=new_id)

    def _check(self, source: str) -> None:
        super()._check(source)
        _check_code_and_reason(self.code, self.reason, source)


def _check_code_and_reason(code: str, reason: str, source: str) -> None:
    _require(bool(_CODE.fullmatch(code)), source, f"code {code!r:.80} is not 1-{MAX_CODE_CHARS} of A-Z a-z 0-9 _ . -")
    _require(len(reason) <= MAX_REASON_CHARS, source, f"reason of {len(reason)} characters (limit {MAX_REASON_CHARS})")


@dataclass(frozen=True)
class Status(Message):
    """Retained presence of a device and what it runs: ``model`` (classifier) and ``encoder`` refs.

    A ref is ``{"artifact_id": str, "version": int, ...}`` or null. ``keys`` (optional) lists
    the ids of the signing keys the device trusts, so a rotation can wait until every device
    trusts the next key (docs/security.md).
    """

    TYPE: ClassVar[str] = "status"
    SPEC: ClassVar[Dict[str, Tuple[type, ...]]] = {
        "device_id": (str,), "state": (str,), "model": (dict, _NONE), "encoder": (dict, _NONE), "id": (str,),
        "keys": (list, _NONE)}

    device_id: str
    state: str
    model: Optional[Dict[str, Any]] = None
    encoder: Optional[Dict[str, Any]] = None
    id: str = field(default_factory=new_id)
    keys: Optional[List[str]] = None

    def _check(self, source: str) -> None:
        super()._check(source)
        _require(self.state in STATES, source, f"state {self.state!r:.40} is not one of {STATES}")
        _require(_model_ref_ok(self.model) and _model_ref_ok(self.encoder), source,
                 "model/encoder must be null or {artifact_id, version}")
        _require(self.keys is None or (len(self.keys) <= MAX_TRUST_KEYS and all(is_key_id(k) for k in self.keys)),
                 source, f"keys must list at most {MAX_TRUST_KEYS} key ids")


@dataclass(frozen=True)
class KeyUpdate(Message):
    """Cloud -> device: public keys to trust and key ids to revoke, signed by a key the device trusts.

    ``keys`` is a list of ``{"key_id", "public_key"}`` (raw Ed25519 key, 64 hex digits; the id
    must be the key's); ``revoked`` lists key ids. ``serial`` goes up with every change of the
    cloud's key ring: a device applies an update once and ignores one whose serial is not above
    the last it applied. The signature covers :meth:`signed_bytes` (domain-separated from every
    other signed message).
    """

    TYPE: ClassVar[str] = "key_update"
    SPEC: ClassVar[Dict[str, Tuple[type, ...]]] = {
        "serial": (int,), "keys": (list,), "revoked": (list,), "key_id": (str,), "signature": (str,), "id": (str,)}
    DOMAIN: ClassVar[bytes] = b"ecos-key-update-v1\n"

    serial: int
    keys: List[Dict[str, str]]
    revoked: List[str]
    key_id: str = ""
    signature: str = ""
    id: str = field(default_factory=new_id)

    def signed_bytes(self) -> bytes:
        content = {"serial": self.serial, "keys": self.keys, "revoked": self.revoked}
        return self.DOMAIN + json.dumps(content, sort_keys=True, separators=(",", ":")).encode("utf-8")

    def signed_by(self, signer: Signer) -> "KeyUpdate":
        return dataclasses.replace(self, key_id=signer.key_id, signature=signer.sign(self.signed_bytes()))

    def _check(self, source: str) -> None:
        super()._check(source)
        _require(0 <= self.serial <= MAX_VERSION, source, f"serial {self.serial} is outside [0, {MAX_VERSION}]")
        _require(len(self.keys) <= MAX_TRUST_KEYS and all(_key_entry_ok(k) for k in self.keys), source,
                 f"keys must list at most {MAX_TRUST_KEYS} {{key_id, public_key}} whose key id is the key's")
        _require(len(self.revoked) <= MAX_REVOKED and all(is_key_id(k) for k in self.revoked), source,
                 f"revoked must list at most {MAX_REVOKED} key ids")
        _require(self.key_id == "" or is_key_id(self.key_id), source, "key_id is not 16 lowercase hex digits")
        _require(self.signature == "" or is_signature(self.signature), source,
                 "signature is not 128 lowercase hex digits")


def _key_entry_ok(entry: Any) -> bool:
    if not isinstance(entry, dict) or set(entry) != {"key_id", "public_key"}:
        return False
    public = entry["public_key"]
    return (is_public_hex(public) and is_key_id(entry["key_id"])
            and key_id_of_raw(bytes.fromhex(public)) == entry["key_id"])


# ---- decoding with routing rules -------------------------------------------------------------

CLOUD_TO_DEVICE: Mapping[str, Type[Any]] = {PROBE: Probe, ArtifactManifest.TYPE: ArtifactManifest,
                                            ArtifactChunk.TYPE: ArtifactChunk, KeyUpdate.TYPE: KeyUpdate}
DEVICE_TO_CLOUD: Mapping[str, Type[Any]] = {SCORES: Scores, Refusal.TYPE: Refusal, Ack.TYPE: Ack,
                                            Installed.TYPE: Installed, InstallFailed.TYPE: InstallFailed,
                                            Status.TYPE: Status}


ALL_TYPES: Mapping[str, Type[Any]] = {**CLOUD_TO_DEVICE, **DEVICE_TO_CLOUD}


def decode_message(payload: bytes, source: str = "message", allowed: Mapping[str, Type[Any]] = ALL_TYPES) -> Any:
    """Decode one payload into its message class; oversize, unknown or unexpected -> ``MessageError``."""
    if not isinstance(payload, (bytes, bytearray)):
        raise MessageError(f"{source}: payload is {type(payload).__name__}, not bytes")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise MessageError(f"{source}: {len(payload)} bytes is over the {MAX_PAYLOAD_BYTES}-byte payload limit")
    env = wire.decode(bytes(payload), None, source)
    cls = allowed.get(env.type)
    if cls is None:
        raise MessageError(f"{source}: message type {env.type!r:.40} is not accepted here")
    msg = cls.from_envelope(env, source)
    if isinstance(msg, Probe):
        check_probe(msg, source)
    elif isinstance(msg, Scores):
        check_scores(msg, source)
    return msg


def check_probe(probe: Probe, source: str = "probe") -> Probe:
    """The protocol's bounds on a decoded probe (its id names a round and a ledger entry)."""
    _require(bool(_PROBE_ID.fullmatch(probe.probe_id)), source,
             f"probe id must be 1-{MAX_ID_CHARS} printable ASCII characters without spaces")
    _require(_text_ok(probe.encoder_sha256, MAX_ID_CHARS), source,
             f"encoder_sha256 must be 1-{MAX_ID_CHARS} characters")
    _require(1 <= probe.k <= MAX_COUNT and probe.feature_dim >= 1, source, "a probe needs k >= 1 and feature_dim >= 1")
    return probe


def check_scores(scores: Scores, source: str = "scores") -> Scores:
    """The protocol's bounds on decoded scores: short ids, finite noise and privacy numbers."""
    for name in ("probe_id", "message_id", "encoder_sha256"):
        _require(_text_ok(getattr(scores, name), MAX_ID_CHARS), source, f"{name} must be 1-{MAX_ID_CHARS} characters")
    _require(len(scores.accountant) <= MAX_CODE_CHARS, source,
             f"accountant must be at most {MAX_CODE_CHARS} characters")
    for name in ("sigma", "sensitivity", "epsilon", "delta"):
        _require(math.isfinite(getattr(scores, name)), source, f"{name} must be finite")
    return scores


def decode_for_device(device_id: str, topic: str, payload: bytes) -> Any:
    """A message on this device's inbox: a probe, an artifact manifest or an artifact chunk."""
    if topic != inbox(device_id):
        raise MessageError(f"message on {topic!r:.100} is not for device {device_id}")
    return decode_message(payload, topic, CLOUD_TO_DEVICE)


def decode_from_device(topic: str, payload: bytes) -> Tuple[str, Any]:
    """``(device_id, message)`` from a device's outbox or status topic.

    The message's ``device_id`` must be the topic's: a device that publishes on another
    device's topic (or forges another id on its own) achieves nothing but a log line.
    """
    parsed = parse_topic(topic)
    if parsed is None or parsed[1] == "in":
        raise MessageError(f"topic {topic!r:.100} is not a device outbox or status topic")
    device_id, channel = parsed
    allowed = {Status.TYPE: Status} if channel == "status" else {k: v for k, v in DEVICE_TO_CLOUD.items() if k != Status.TYPE}
    msg = decode_message(payload, topic, allowed)
    if msg.device_id != device_id:
        raise MessageError(f"{topic}: message claims device {msg.device_id!r:.80}, topic belongs to {device_id!r}")
    return device_id, msg
