"""The cloud's signing keys: generation, signing, and a key ring with a current and a next key.

Only the cloud holds private keys; devices verify (``device_sdk/signing.py``). A key ring is a
folder (``[store] keys_dir``, default ``<state_dir>/keys``)::

    cloud_ed25519.pem, cloud_ed25519.pub.pem   the current key: signs manifests, probes, key updates
    next_ed25519.pem,  next_ed25519.pub.pem    the next key (during a rotation only)
    retired/<key_id>.pem                       keys that were current before (kept until you delete them)
    keyring.json                               {"serial": n, "revoked": [key ids]}

Private keys are written readable by their owner only. Public keys are always derived from the
private ones (a ``.pub.pem`` that disagrees is rewritten), so a rotation interrupted between two
renames cannot make the ring sign with one key and announce another.

A rotation (docs/security.md) is ``next`` (make the next key), a key update signed by the
current key that adds the next key to every device's trust store (the daemon sends it before
each probe; ``ecos-cloud keys update`` writes it to a file), ``promote`` (the next key becomes
current), and ``revoke`` of the old key (in a key update signed by the new one). ``serial``
goes up with every change, so a device applies each update once and ignores older ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from device_sdk.errors import UsageError
from device_sdk.fsutil import PathLike, atomic_write_bytes, atomic_write_text
from device_sdk.protocol import MAX_TRUST_KEYS, KeyUpdate
from device_sdk.protocol.envelope import parse_json
from device_sdk.signing import is_key_id, key_id, public_raw

PRIVATE_NAME = "cloud_ed25519.pem"
PUBLIC_NAME = "cloud_ed25519.pub.pem"
NEXT_PRIVATE_NAME = "next_ed25519.pem"
NEXT_PUBLIC_NAME = "next_ed25519.pub.pem"
RING_NAME = "keyring.json"
RETIRED_DIR = "retired"
RING_KIND = "ecos.keyring"


def public_pem(key: Ed25519PublicKey) -> bytes:
    """The public key as PEM (SubjectPublicKeyInfo), what ``ecos-device --trusted-key`` reads."""
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private_key(path: PathLike) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise UsageError(f"cannot load the Ed25519 private key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"{path} is not an Ed25519 private key")
    return key


def _write_private(path: Path, key: Ed25519PrivateKey) -> None:
    """Write a private key readable by its owner only; never over an existing file."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())


def generate_keypair(
    directory: PathLike, private_name: str = PRIVATE_NAME, public_name: str = PUBLIC_NAME
) -> Tuple[Path, Path]:
    """Write a new key pair into ``directory``; refuses to overwrite an existing private key."""
    directory = Path(directory)
    private_path, public_path = directory / private_name, directory / public_name
    if private_path.exists():
        raise UsageError(f"{private_path} exists: refusing to replace the key devices were provisioned with")
    key = Ed25519PrivateKey.generate()
    _write_private(private_path, key)
    atomic_write_bytes(public_path, public_pem(key.public_key()))
    return private_path, public_path


def ensure_keypair(directory: PathLike) -> Tuple[Path, Path]:
    """The current key pair in ``directory``, generated on first use (what a daemon calls at start)."""
    directory = Path(directory)
    private_path, public_path = directory / PRIVATE_NAME, directory / PUBLIC_NAME
    if not private_path.exists():
        return generate_keypair(directory)
    _sync_public(private_path, public_path)
    return private_path, public_path


def _sync_public(private_path: Path, public_path: Path) -> None:
    """(Re)write the public key file from the private key when it is missing or disagrees."""
    pem = public_pem(load_private_key(private_path).public_key())
    try:
        same = public_path.read_bytes() == pem
    except OSError:
        same = False
    if not same:
        atomic_write_bytes(public_path, pem)


class SigningKey:
    """A private key and its key id: what signs (``device_sdk.signing.Signer``)."""

    def __init__(self, private: Ed25519PrivateKey, path: Optional[Path] = None):
        self._private = private
        self.path = path
        self.public = private.public_key()
        self.key_id = key_id(self.public)

    @classmethod
    def load(cls, path: PathLike) -> "SigningKey":
        return cls(load_private_key(path), Path(path))

    @property
    def public_hex(self) -> str:
        return public_raw(self.public).hex()

    def sign(self, data: bytes) -> str:
        """Hex Ed25519 signature of ``data``."""
        return self._private.sign(data).hex()

    def __repr__(self) -> str:
        return f"SigningKey({self.key_id})"


def as_signer(key: Any) -> SigningKey:
    """A ``SigningKey`` (or anything with ``key_id`` and ``sign``) as is; a path is loaded."""
    if hasattr(key, "key_id") and callable(getattr(key, "sign", None)):
        return key
    return SigningKey.load(key)


def sign(private_key_path: PathLike, data: bytes) -> str:
    """Hex Ed25519 signature of ``data`` with the private key at ``private_key_path``."""
    return SigningKey.load(private_key_path).sign(data)


class KeyRing:
    """The keys folder: the current signing key, an optional next key, revocations, a serial.

    ``KeyRing(directory)`` makes the current key on first use (as the daemon always did).
    Methods that change the ring (``new_next``, ``promote``, ``revoke``) bump ``serial``.
    """

    def __init__(self, directory: PathLike, create: bool = True):
        self.directory = Path(directory)
        private, public = self.directory / PRIVATE_NAME, self.directory / PUBLIC_NAME
        if create:
            ensure_keypair(self.directory)
        elif not private.exists():
            raise UsageError(f"no signing key in {self.directory} (the daemon makes one on its first start)")
        else:
            _sync_public(private, public)
        self.current = SigningKey.load(private)
        self.public_key_path = public
        next_private = self.directory / NEXT_PRIVATE_NAME
        self.next: Optional[SigningKey] = None
        if next_private.exists():
            _sync_public(next_private, self.directory / NEXT_PUBLIC_NAME)
            self.next = SigningKey.load(next_private)
        self.serial, self.revoked = self._read_ring()

    @property
    def private_key_path(self) -> Path:
        return self.directory / PRIVATE_NAME

    @property
    def next_public_key_path(self) -> Optional[Path]:
        return None if self.next is None else self.directory / NEXT_PUBLIC_NAME

    def _read_ring(self) -> Tuple[int, List[str]]:
        path = self.directory / RING_NAME
        if not path.exists():
            return 0, []
        try:
            doc = parse_json(path.read_bytes(), str(path), UsageError)
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from None
        doc = doc if isinstance(doc, dict) else {}
        serial, revoked = doc.get("serial"), doc.get("revoked")
        if (
            doc.get("kind") != RING_KIND
            or not isinstance(serial, int)
            or isinstance(serial, bool)
            or serial < 0
            or not isinstance(revoked, list)
            or not all(is_key_id(r) for r in revoked)
        ):
            raise UsageError(f"{path} is not a key ring file (kind, serial >= 0, revoked key ids); fix or restore it")
        return serial, list(revoked)

    def _write_ring(self) -> None:
        doc = {"kind": RING_KIND, "version": 1, "serial": self.serial, "revoked": sorted(set(self.revoked))}
        atomic_write_text(self.directory / RING_NAME, json.dumps(doc, indent=1) + "\n")

    # ---- changes (ecos-cloud keys ...) --------------------------------------------------------

    def new_next(self) -> SigningKey:
        """Make the next key pair (a rotation's first step)."""
        if self.next is not None:
            raise UsageError(
                f"a next key ({self.next.key_id}) exists already: promote it or delete "
                f"{self.directory / NEXT_PRIVATE_NAME}"
            )
        private, _ = generate_keypair(self.directory, NEXT_PRIVATE_NAME, NEXT_PUBLIC_NAME)
        self.next = SigningKey.load(private)
        self.serial += 1
        self._write_ring()
        return self.next

    def promote(self) -> SigningKey:
        """The next key becomes the current one; the old current is kept under ``retired/``."""
        if self.next is None:
            raise UsageError(f"no next key in {self.directory}: run 'ecos-cloud keys next' first")
        old = self.current
        retired = self.directory / RETIRED_DIR / f"{old.key_id}.pem"
        if not retired.exists():
            _write_private(retired, old._private)
        atomic_write_bytes(retired.with_suffix(".pub.pem"), public_pem(old.public))
        os.replace(self.directory / NEXT_PRIVATE_NAME, self.directory / PRIVATE_NAME)
        os.replace(self.directory / NEXT_PUBLIC_NAME, self.directory / PUBLIC_NAME)
        self.current, self.next = self.next, None
        self.serial += 1
        self._write_ring()
        return self.current

    def revoke(self, key_id_: str) -> None:
        """Add ``key_id_`` to the revocation list that key updates carry (never the current or next key)."""
        if not is_key_id(key_id_):
            raise UsageError(f"a key id is 16 lowercase hex digits, got {key_id_!r:.40}")
        if key_id_ == self.current.key_id or (self.next is not None and key_id_ == self.next.key_id):
            raise UsageError(
                f"{key_id_} is the {'current' if key_id_ == self.current.key_id else 'next'} key: "
                "revoking it would leave devices without the key this cloud signs with"
            )
        if key_id_ in self.revoked:
            return
        if len(self.revoked) >= 1024:
            raise UsageError("1024 keys revoked already: that is the most a key update carries")
        self.revoked.append(key_id_)
        self.serial += 1
        self._write_ring()

    # ---- what goes to devices -------------------------------------------------------------------

    def signing_keys(self) -> List[SigningKey]:
        return [self.current] + ([self.next] if self.next is not None else [])

    def key_update(self) -> Optional[KeyUpdate]:
        """The signed key update devices need now, or None before the first rotation step.

        It lists the current and next public keys and every revoked id, and is signed by the
        current key, which the devices trust already.
        """
        if self.serial == 0:
            return None
        keys = [{"key_id": k.key_id, "public_key": k.public_hex} for k in self.signing_keys()]
        assert len(keys) <= MAX_TRUST_KEYS
        update = KeyUpdate(self.serial, keys, sorted(set(self.revoked)))
        return update.signed_by(self.current)

    def describe(self) -> Dict[str, Any]:
        return {
            "keys_dir": str(self.directory),
            "current": self.current.key_id,
            "current_public_key": str(self.public_key_path),
            "next": None if self.next is None else self.next.key_id,
            "next_public_key": None if self.next is None else str(self.next_public_key_path),
            "revoked": sorted(set(self.revoked)),
            "serial": self.serial,
        }
