"""Ed25519 verification on the device: key ids, a trust store of several keys, revocation.

The cloud signs (``cloud/security/keys.py`` generates keys and signs; nothing here can); the device
verifies. Every signature travels with a **key id**, the first 16 hex digits of the sha256 of
the signer's raw 32-byte public key, so a device can trust several keys at once (the current
one and the next one during a rotation) and refuse a revoked one by id. A ``TrustStore`` holds
the public keys a device trusts and the key ids it has revoked; ``TrustStore.verify`` is the
one check every signed message (artifact manifest, probe, key update) goes through, and each
way it can fail is its own typed error:

* no signature: ``Unsigned`` (code ``unsigned``);
* no key id, or a key id the device does not trust: ``UnknownKey`` (``unknown_key``);
* a revoked key id: ``RevokedKey`` (``revoked_key``), whatever else the device trusts;
* a signature that does not verify: ``SignatureError`` (``bad_signature``).

Public keys are read from a PEM file or a file holding the raw key as 64 hex digits.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Dict, FrozenSet, Iterable, List, Mapping, Optional, Protocol, Sequence, Union

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_sdk.errors import RevokedKey, SignatureError, UnknownKey, Unsigned, UsageError
from device_sdk.fsutil import PathLike

KEY_ID_CHARS = 16
_KEY_ID = re.compile(r"[0-9a-f]{%d}" % KEY_ID_CHARS)
_SIGNATURE = re.compile(r"[0-9a-f]{128}")
_RAW_HEX = re.compile(r"[0-9a-f]{64}")


class Signer(Protocol):
    """What signs on the cloud's side (``cloud.security.keys.SigningKey``): a key id and ``sign(data) -> hex``."""

    key_id: str

    def sign(self, data: bytes) -> str: ...


def is_key_id(value: Any) -> bool:
    """16 lowercase hex digits."""
    return isinstance(value, str) and bool(_KEY_ID.fullmatch(value))


def is_signature(value: Any) -> bool:
    """An Ed25519 signature as 128 lowercase hex digits."""
    return isinstance(value, str) and bool(_SIGNATURE.fullmatch(value))


def is_public_hex(value: Any) -> bool:
    """A raw Ed25519 public key as 64 lowercase hex digits."""
    return isinstance(value, str) and bool(_RAW_HEX.fullmatch(value))


def key_id_of_raw(raw: bytes) -> str:
    """The key id of a raw 32-byte public key: the first 16 hex digits of its sha256."""
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_CHARS]


def public_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """The key id of a public key (what a signature names)."""
    return key_id_of_raw(public_raw(key))


def public_key_from_hex(text: str) -> Ed25519PublicKey:
    """A public key from its 64 hex digits; anything else is a ``UsageError``."""
    if not is_public_hex(text):
        raise UsageError("a public key is 64 lowercase hex digits")
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # pragma: no cover - any 32 bytes load
        raise UsageError(f"not an Ed25519 public key: {exc}") from None


def load_public_key(path: PathLike) -> Ed25519PublicKey:
    """A public key from a PEM file or from a file with the raw key as 64 hex digits."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the cloud public key {path}: {exc.strerror}") from None
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(raw)
        else:
            key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(raw.decode("ascii").strip()))
    except (ValueError, TypeError, UnicodeDecodeError, UnsupportedAlgorithm) as exc:
        raise UsageError(f"{path} is neither a PEM public key nor 64 hex digits: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UsageError(f"{path} is not an Ed25519 public key")
    return key


def verify(public_key: Ed25519PublicKey, data: bytes, signature_hex: str) -> None:
    """Raise ``SignatureError`` unless ``signature_hex`` is a valid signature of ``data``."""
    try:
        public_key.verify(bytes.fromhex(signature_hex), data)
    except (InvalidSignature, ValueError, TypeError):
        raise SignatureError("signature does not verify with the provisioned cloud public key") from None


class TrustStore:
    """The public keys a device trusts, by key id, and the key ids it has revoked (revocation wins).

    Immutable: a key update builds a new store (``device_sdk.trust.DeviceTrust``).
    """

    def __init__(
        self, keys: Union[Mapping[str, Ed25519PublicKey], Iterable[Ed25519PublicKey]] = (), revoked: Iterable[str] = ()
    ):
        if isinstance(keys, Mapping):
            items = dict(keys)
            for kid, key in items.items():
                if key_id(key) != kid:
                    raise UsageError(f"key id {kid!r} is not the id of the key filed under it")
        else:
            items = {key_id(k): k for k in keys}
        revoked = frozenset(revoked)
        bad = sorted(r for r in revoked if not is_key_id(r))
        if bad:
            raise UsageError(f"revoked key ids must be {KEY_ID_CHARS} lowercase hex digits, got {bad[0]!r:.40}")
        self._keys: Dict[str, Ed25519PublicKey] = items
        self.revoked: FrozenSet[str] = revoked

    @classmethod
    def from_files(cls, paths: Sequence[PathLike], revoked: Iterable[str] = ()) -> "TrustStore":
        return cls([load_public_key(p) for p in paths], revoked)

    @property
    def key_ids(self) -> List[str]:
        """Ids of the keys this store accepts signatures from (trusted and not revoked), sorted."""
        return sorted(k for k in self._keys if k not in self.revoked)

    def public_keys(self) -> Dict[str, Ed25519PublicKey]:
        """Every key filed here, revoked ones included (what a trust state file keeps)."""
        return dict(self._keys)

    def verify(self, data: bytes, key_id: Optional[str], signature: Optional[str], what: str = "message") -> str:
        """The key id that signed ``data``; else a typed error (see the module docstring)."""
        if not signature:
            raise Unsigned(f"{what} is not signed")
        if key_id is None or key_id == "":
            raise UnknownKey(f"{what} names no signing key id (made before key ids?); trusted: {self._describe()}")
        if key_id in self.revoked:
            raise RevokedKey(f"{what} is signed by key {key_id:.16}, which this device has revoked")
        key = self._keys.get(key_id)
        if key is None:
            raise UnknownKey(
                f"{what} is signed by key {str(key_id):.16}, which this device does not trust; "
                f"trusted: {self._describe()}"
            )
        try:
            key.verify(bytes.fromhex(signature), data)
        except (InvalidSignature, ValueError, TypeError):
            raise SignatureError(f"{what}: signature does not verify with trusted key {key_id}") from None
        return key_id

    def _describe(self) -> str:
        return ", ".join(self.key_ids) or "none"

    def __repr__(self) -> str:
        return f"TrustStore(keys={self.key_ids}, revoked={sorted(self.revoked)})"


def as_trust_store(trust: Any) -> Any:
    """A bare public key (the single-key API before key ids) becomes a one-key ``TrustStore``."""
    if isinstance(trust, Ed25519PublicKey):
        return TrustStore([trust])
    if not callable(getattr(trust, "verify", None)):
        raise UsageError(f"expected a TrustStore or an Ed25519 public key, got {type(trust).__name__}")
    return trust
