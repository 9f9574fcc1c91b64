"""Ed25519 signatures on artifact manifests: the cloud signs, the device verifies.

A device is provisioned with the cloud's public key (a PEM file or a file holding the 32-byte
raw key as 64 hex digits) and installs nothing whose manifest it cannot verify with it. The
manifest lists the sha256 of the whole artifact and of every chunk, so one signature covers
every byte the device installs. Only verification runs on the device; the private key stays
with the cloud (``generate_keypair`` writes it readable by its owner only).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Tuple

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import SignatureError, UsageError
from .fsutil import PathLike, atomic_write_bytes

PRIVATE_NAME = "cloud_ed25519.pem"
PUBLIC_NAME = "cloud_ed25519.pub.pem"


def generate_keypair(directory: PathLike) -> Tuple[Path, Path]:
    """Write a new key pair into ``directory``; refuses to overwrite an existing private key."""
    directory = Path(directory)
    private_path, public_path = directory / PRIVATE_NAME, directory / PUBLIC_NAME
    if private_path.exists():
        raise UsageError(f"{private_path} exists: refusing to replace the key devices were provisioned with")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    atomic_write_bytes(public_path, public_pem(key.public_key()))
    return private_path, public_path


def ensure_keypair(directory: PathLike) -> Tuple[Path, Path]:
    """The key pair in ``directory``, generated on first use (what a daemon calls at start)."""
    directory = Path(directory)
    private_path, public_path = directory / PRIVATE_NAME, directory / PUBLIC_NAME
    if not private_path.exists():
        return generate_keypair(directory)
    if not public_path.exists():
        atomic_write_bytes(public_path, public_pem(load_private_key(private_path).public_key()))
    return private_path, public_path


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private_key(path: PathLike) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise UsageError(f"cannot load the Ed25519 private key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"{path} is not an Ed25519 private key")
    return key


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


def sign(private_key_path: PathLike, data: bytes) -> str:
    """Hex Ed25519 signature of ``data`` with the private key at ``private_key_path``."""
    return load_private_key(private_key_path).sign(data).hex()


def verify(public_key: Ed25519PublicKey, data: bytes, signature_hex: str) -> None:
    """Raise ``SignatureError`` unless ``signature_hex`` is a valid signature of ``data``."""
    try:
        public_key.verify(bytes.fromhex(signature_hex), data)
    except (InvalidSignature, ValueError, TypeError):
        raise SignatureError("signature does not verify with the provisioned cloud public key") from None
