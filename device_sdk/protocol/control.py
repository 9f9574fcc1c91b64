"""The messages that say what a device runs and which keys it trusts: its status and key updates."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from device_sdk.protocol.schema import Message, MessageType, Wire, WireEnum, id_field, name_id_field, wire_field
from device_sdk.protocol.topics import (
    MAX_NAME_CHARS,
    MAX_REF_KEYS,
    MAX_REVOKED,
    MAX_TRUST_KEYS,
    MAX_VERSION,
    is_valid_id,
)
from device_sdk.signing import Signer, is_key_id, is_public_hex, is_signature, key_id_of_raw

_KEY_ID = Wire((str,), valid=is_key_id, why="is not 16 lowercase hex digits")


class DeviceState(WireEnum):
    """A device's presence: ``online`` on connect, ``offline`` as its last will."""

    ONLINE = "online"
    OFFLINE = "offline"


STATES = DeviceState.values()


def _model_ref_ok(ref: Any) -> bool:
    """``{"artifact_id": id, "version": int, ...}`` with a few short scalar entries."""
    if len(ref) > MAX_REF_KEYS or not is_valid_id(ref.get("artifact_id")):
        return False
    version = ref.get("version")
    return (
        _short_number(version)
        and isinstance(version, int)
        and 0 <= version <= MAX_VERSION
        and all(_short_scalar(v) for v in ref.values())
    )


def _short_scalar(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) <= MAX_NAME_CHARS
    return value is None or _short_number(value)


def _short_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= 2**53


_REF_WHY = "must be null or {artifact_id, version} with a few short scalar entries"


@dataclass(frozen=True)
class Status(Message):
    """Retained presence of a device and what it runs: ``model`` (classifier) and ``encoder`` refs.

    A ref is ``{"artifact_id": str, "version": int, ...}`` or null. ``keys`` (optional) lists
    the ids of the signing keys the device trusts, so a rotation can wait until every device
    trusts the next key (docs/security.md).
    """

    TYPE = MessageType.STATUS

    device_id: str = name_id_field()
    state: str = wire_field(str, enum=DeviceState)
    model: Optional[Dict[str, Any]] = wire_field(dict, default=None, optional=True, valid=_model_ref_ok, why=_REF_WHY)
    encoder: Optional[Dict[str, Any]] = wire_field(dict, default=None, optional=True, valid=_model_ref_ok, why=_REF_WHY)
    id: str = id_field()
    keys: Optional[List[str]] = wire_field(list, default=None, optional=True, hi=MAX_TRUST_KEYS, item=_KEY_ID)


def _key_entry_ok(entry: Any) -> bool:
    if set(entry) != {"key_id", "public_key"}:
        return False
    public = entry["public_key"]
    return (
        is_public_hex(public) and is_key_id(entry["key_id"]) and key_id_of_raw(bytes.fromhex(public)) == entry["key_id"]
    )


@dataclass(frozen=True)
class KeyUpdate(Message):
    """Cloud -> device: public keys to trust and key ids to revoke, signed by a key the device trusts.

    ``keys`` is a list of ``{"key_id", "public_key"}`` (raw Ed25519 key, 64 hex digits; the id
    must be the key's); ``revoked`` lists key ids. ``serial`` goes up with every change of the
    cloud's key ring: a device applies an update once and ignores one whose serial is not above
    the last it applied. The signature covers :meth:`signed_bytes` (domain-separated from every
    other signed message).
    """

    TYPE = MessageType.KEY_UPDATE
    DOMAIN = b"ecos-key-update-v1\n"

    serial: int = wire_field(int, lo=0, hi=MAX_VERSION)
    keys: List[Dict[str, str]] = wire_field(
        list,
        hi=MAX_TRUST_KEYS,
        item=Wire((dict,), valid=_key_entry_ok, why="is not {key_id, public_key} whose key id is the key's"),
    )
    revoked: List[str] = wire_field(list, hi=MAX_REVOKED, item=_KEY_ID)
    key_id: str = wire_field(
        str, default="", valid=lambda v: v == "" or is_key_id(v), why="is not 16 lowercase hex digits"
    )
    signature: str = wire_field(
        str, default="", valid=lambda v: v == "" or is_signature(v), why="is not 128 lowercase hex digits"
    )
    id: str = id_field()

    def signed_bytes(self) -> bytes:
        content = {"serial": self.serial, "keys": self.keys, "revoked": self.revoked}
        return self.DOMAIN + json.dumps(content, sort_keys=True, separators=(",", ":")).encode("utf-8")

    def signed_by(self, signer: Signer) -> "KeyUpdate":
        return dataclasses.replace(self, key_id=signer.key_id, signature=signer.sign(self.signed_bytes()))
