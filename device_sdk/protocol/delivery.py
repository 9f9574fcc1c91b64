"""The messages of model delivery: a signed manifest, the chunks, the device's acks and install reports.

The cloud sends an :class:`ArtifactManifest` and then :class:`ArtifactChunk` messages to a device's
inbox; the device answers with :class:`Ack` (chunks held so far), then :class:`Installed` or
:class:`InstallFailed` (docs/protocol.md).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from device_sdk.errors import ArtifactError, MessageError
from device_sdk.protocol.schema import (
    Message,
    MessageType,
    Wire,
    WireEnum,
    array_field,
    id_field,
    name_id_field,
    require,
    wire_field,
)
from device_sdk.protocol.topics import (
    CODE,
    FLEET_PREFIX,
    HEX64,
    MAX_ARTIFACT_BYTES,
    MAX_CHUNK_SIZE,
    MAX_CHUNKS,
    MAX_CODE_CHARS,
    MAX_COUNT,
    MAX_NAME_CHARS,
    MAX_REASON_CHARS,
    MAX_TARGETS,
    MAX_VERSION,
    MIN_CHUNK_SIZE,
    is_valid_id,
)
from device_sdk.signing import Signer, is_key_id, is_signature

_HEX_WHY = "is not 64 lowercase hex digits"
_SIGNATURE_WHY = "is not 128 lowercase hex digits"


class ArtifactFormat(WireEnum):
    """The file formats an artifact may travel in."""

    ONNX = "onnx"
    TFLITE = "tflite"


FORMATS = ArtifactFormat.values()


def _is_target(target: str) -> bool:
    return is_valid_id(target[len(FLEET_PREFIX) :] if target.startswith(FLEET_PREFIX) else target)


@dataclass(frozen=True)
class ArtifactManifest(Message):
    """What the device needs to fetch, check and install one artifact, signed by the cloud.

    ``signature`` is the hex Ed25519 signature of :meth:`signed_bytes`: the canonical JSON of
    every other field except the message ``id`` (a per-transmission id) and ``key_id`` (which
    names the key that made the signature), so re-sending the same manifest never needs a new
    signature. ``targets`` names who may install it: device ids, or ``fleet:<fleet id>``;
    ``version`` (``artifact_version`` on the wire, where ``version`` is the protocol's) only goes up
    per device and slot (the artifact kind). A manifest without ``targets`` or ``key_id`` (made
    before they existed) still decodes, and every device refuses it (``wrong_target`` /
    ``unknown_key``).
    """

    TYPE = MessageType.ARTIFACT_MANIFEST

    artifact_id: str = name_id_field()
    name: str = wire_field(str, lo=1, hi=MAX_NAME_CHARS)
    version: int = wire_field(int, name="artifact_version", lo=0, hi=MAX_VERSION)
    format: str = wire_field(str, enum=ArtifactFormat)
    precision: str = wire_field(str, lo=1, hi=32)
    size: int = wire_field(int, hi=MAX_ARTIFACT_BYTES)
    sha256: str = wire_field(str, pattern=HEX64, why=_HEX_WHY)
    chunk_size: int = wire_field(int, lo=MIN_CHUNK_SIZE, hi=MAX_CHUNK_SIZE)
    chunk_sha256: List[str] = wire_field(list, item=Wire((str,), pattern=HEX64, why=_HEX_WHY))
    meta: Dict[str, Any] = wire_field(dict)
    signature: str = wire_field(str, default="", valid=lambda v: v == "" or is_signature(v), why=_SIGNATURE_WHY)
    id: str = id_field()
    targets: Optional[List[str]] = wire_field(
        list,
        default=None,
        optional=True,
        lo=1,
        hi=MAX_TARGETS,
        item=Wire((str,), valid=_is_target, why="is not a device id or fleet:<id>"),
    )
    key_id: Optional[str] = wire_field(
        str, default=None, optional=True, valid=is_key_id, why="is not 16 lowercase hex digits"
    )

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_sha256)

    @property
    def artifact_meta(self) -> Any:
        """The artifact's metadata (``device_sdk.runtime.artifact.ArtifactMeta``); ``ArtifactError`` if malformed."""
        from device_sdk.runtime.artifact import ArtifactMeta  # here: the runtime package imports this one

        return ArtifactMeta.from_json(json.dumps(self.meta), f"manifest {self.artifact_id}")

    def signed_bytes(self) -> bytes:
        """The bytes the signature covers: sorted-key compact JSON of all fields but signature, id
        and key_id, under their attribute names (``targets`` left out only when absent, as in
        manifests made before it)."""
        content = {
            name: getattr(self, name) for name, _ in self.wire_fields() if name not in ("signature", "id", "key_id")
        }
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
        require(
            self.size > 0 and self.n_chunks == -(-self.size // self.chunk_size),
            source,
            f"{self.n_chunks} chunk hashes for {self.size} bytes in chunks of {self.chunk_size}",
        )
        try:
            _ = self.artifact_meta
        except ArtifactError as exc:
            raise MessageError(f"{source}: {exc}") from None


@dataclass(frozen=True)
class ArtifactChunk(Message):
    """Bytes ``[index * chunk_size, ...)`` of an artifact, as a raw uint8 array ``data``."""

    TYPE = MessageType.ARTIFACT_CHUNK

    artifact_id: str = name_id_field()
    index: int = wire_field(int, lo=0, hi=MAX_CHUNKS - 1)
    data: bytes = array_field(decoded="bytes", lo=1, hi=MAX_CHUNK_SIZE)
    id: str = id_field()


@dataclass(frozen=True)
class Ack(Message):
    """The device holds chunks ``[0, next_chunk)`` of an artifact, each checked against its hash."""

    TYPE = MessageType.ACK

    device_id: str = name_id_field()
    artifact_id: str = name_id_field()
    next_chunk: int = wire_field(int, lo=0, hi=MAX_CHUNKS - 1)
    id: str = id_field()


@dataclass(frozen=True)
class Installed(Message):
    """The device verified and installed an artifact; ``accuracy`` on its labelled data, if any."""

    TYPE = MessageType.INSTALLED

    device_id: str = name_id_field()
    artifact_id: str = name_id_field()
    version: int = wire_field(int, name="artifact_version", lo=0, hi=MAX_VERSION)
    sha256: str = wire_field(str, pattern=HEX64, why=_HEX_WHY)
    accuracy: Optional[float] = wire_field(int, float, default=None, optional=True, lo=0.0, hi=1.0)
    n_eval: int = wire_field(int, default=0, lo=0, hi=MAX_COUNT)
    id: str = id_field()


@dataclass(frozen=True)
class InstallFailed(Message):
    """The device refused an artifact (``bad_signature``, ``bad_hash``, ``bad_chunk``, ...) and kept its model."""

    TYPE = MessageType.INSTALL_FAILED

    device_id: str = name_id_field()
    artifact_id: str = name_id_field()
    code: str = wire_field(str, pattern=CODE, why=f"is not 1-{MAX_CODE_CHARS} of A-Z a-z 0-9 _ . -")
    reason: str = wire_field(str, hi=MAX_REASON_CHARS)
    id: str = id_field()
