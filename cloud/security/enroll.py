"""Per-identity broker credentials: one login per device, and one for the cloud.

    ecos-cloud broker-config --dir ecos-broker --mode certificate --hostname broker.example.com
    ecos-cloud enroll pi-kitchen --dir ecos-broker            # -> ecos-broker/clients/pi-kitchen/
    ecos-cloud enroll pi-kitchen --dir ecos-broker --rotate   # new credentials; the old ones stop working
    ecos-cloud enroll pi-kitchen --dir ecos-broker --revoke   # no credentials at all

The deployment folder (``--dir``) holds the deployment's CA (``ca/``, the key never leaves this
host), the files the broker reads (``broker/``, see ``cloud/security/brokerconf.py``) and one credential
bundle per identity (``clients/<id>/``, a 0700 folder of 0600 files): ``ca.pem``, either a client
certificate (``client.pem`` + ``client.key``, common name = the identity, signed by the CA) or a
random password (``broker.password``; the broker's password file gets only its PBKDF2-SHA512
hash, in the ``$7$`` format of Mosquitto 2), and ``broker.toml``, the ``[broker]`` table to put
in that identity's config, with paths relative to the config file. ``ecos-broker.json`` records
the settings, every identity's certificate serial and the revoked serials.

Rotation: in certificate mode the old certificate's serial goes into the CRL the broker checks
(``broker/crl.pem``); in password mode the identity's line in the password file is replaced.
Either way the broker must re-read its files: copy ``broker/`` to it and reload Mosquitto
(SIGHUP). Measured with Mosquitto 2.0.11: after a reload the old credentials are refused; a
client connected with a withdrawn password is disconnected at once, one connected with a revoked
certificate only when it reconnects (restart Mosquitto to cut it off).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from cloud.security import pki
from device_sdk.errors import UsageError
from device_sdk.fsutil import atomic_write_bytes
from device_sdk.protocol import is_valid_id

SETTINGS = "ecos-broker.json"
MODES = ("certificate", "password")
PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes; the passwords are 256 random bits, not guessable
SALT_BYTES = 12


# ---- Mosquitto password hashes ---------------------------------------------------------------------


def mosquitto_hash(password: str, salt: Optional[bytes] = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """``$7$<iterations>$<salt>$<hash>``: PBKDF2-HMAC-SHA512 as Mosquitto 2 reads it (``mosquitto_passwd``'s
    default). Written here rather than by ``mosquitto_passwd -b``, which would put the password on a
    command line that every user of the host can read in ``ps``."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_mosquitto_hash(password: str, hashed: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash (ours or ``mosquitto_passwd``'s)."""
    try:
        _, kind, iterations, salt, digest = hashed.split("$")
        if kind != "7":
            return False
        expected = base64.b64decode(digest, validate=True)
        got = hashlib.pbkdf2_hmac(
            "sha512", password.encode("utf-8"), base64.b64decode(salt, validate=True), int(iterations), len(expected)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def read_password_file(path: Path) -> Dict[str, str]:
    """``user -> hash`` of a Mosquitto password file (missing file: empty)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return {}
    entries = {}
    for line in lines:
        if line.strip() and not line.startswith("#") and ":" in line:
            user, hashed = line.split(":", 1)
            entries[user] = hashed
    return entries


def write_password_file(path: Path, entries: Dict[str, str], group: Optional[str]) -> None:
    text = "".join(f"{user}:{hashed}\n" for user, hashed in sorted(entries.items()))
    write_private(path, text.encode("utf-8"), group=group)


# ---- files ---------------------------------------------------------------------------------------------


def write_private(path: Path, data: bytes, group: Optional[str] = None) -> None:
    """Write atomically, readable by the owner only (0600), or also by ``group`` (0640)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mkstemp: 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if group:
            shutil.chown(tmp, group=group)
            os.chmod(tmp, 0o640)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_public(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)
    os.chmod(path, 0o644)


# ---- the deployment folder -------------------------------------------------------------------------


@dataclass
class Deployment:
    """What ``ecos-broker.json`` records, and where everything lives in the folder."""

    root: Path
    mode: str
    cloud_id: str
    hostnames: List[str]
    port: int
    bind: Optional[str] = None
    tls_version: str = "1.2"
    broker_path: str = ""  # where broker/'s files are on the broker host ("" = this folder's broker/)
    broker_group: Optional[str] = None  # the group the broker runs as: its secret files are 0640 to it
    identities: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # id -> kind, serial, not_after, issued
    revoked: List[str] = field(default_factory=list)  # certificate serials (hex) in the CRL

    @property
    def ca_cert_path(self) -> Path:
        return self.root / "ca" / "ca.pem"

    @property
    def ca_key_path(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    @property
    def password_path(self) -> Path:
        return self.broker_dir / "passwd"

    @property
    def crl_path(self) -> Path:
        return self.broker_dir / "crl.pem"

    def bundle(self, identity: str) -> Path:
        return self.root / "clients" / identity

    def on_broker(self, name: str) -> str:
        """The path of broker/``name`` as the broker host sees it (what mosquitto.conf names)."""
        return os.path.join(self.broker_path or str(self.broker_dir.resolve()), name)

    @classmethod
    def load(cls, root: Path) -> "Deployment":
        path = Path(root) / SETTINGS
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            raw.pop("version", None)
            return cls(root=Path(root), **raw)
        except FileNotFoundError:
            raise UsageError(
                f"{root} is not a deployment folder (no {SETTINGS}); create it with 'ecos-cloud "
                f"broker-config --dir {root} --mode certificate|password --hostname HOST'"
            ) from None
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{path} is damaged: {exc}") from None

    def save(self) -> None:
        raw = {k: v for k, v in asdict(self).items() if k != "root"}
        text = json.dumps({"version": 1, **raw}, indent=2, sort_keys=True) + "\n"
        write_public(self.root / SETTINGS, text.encode())

    def ca(self) -> Tuple[Any, pki.Key]:
        return pki.load_cert(self.ca_cert_path), pki.load_key(self.ca_key_path)

    def write_crl(self) -> None:
        ca, ca_key = self.ca()
        write_public(self.crl_path, pki.crl_pem(pki.build_crl(ca, ca_key, (int(s, 16) for s in self.revoked))))


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """One enroll / broker-config at a time per folder (they read, change and rewrite the same files)."""
    Path(root).mkdir(parents=True, exist_ok=True)
    with open(Path(root) / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---- enroll, rotate, revoke --------------------------------------------------------------------------


def enroll(
    root: Path,
    identity: Optional[str] = None,
    *,
    cloud: bool = False,
    rotate: bool = False,
    days: int = pki.CERT_DAYS,
    not_before: Optional[datetime.datetime] = None,
    not_after: Optional[datetime.datetime] = None,
) -> Path:
    """Issue credentials for device ``identity`` (or the cloud's, ``cloud=True``); returns the bundle folder."""
    with locked(root):
        d = Deployment.load(root)
        return issue_credentials(
            d,
            _identity(d, identity, cloud),
            cloud=cloud,
            rotate=rotate,
            days=days,
            not_before=not_before,
            not_after=not_after,
        )


def revoke(root: Path, identity: str) -> None:
    """Withdraw a device's credentials: its serial into the CRL, or its line out of the password file."""
    with locked(root):
        d = Deployment.load(root)
        identity = _identity(d, identity, cloud=False)
        if identity not in d.identities:
            raise UsageError(f"{identity} is not enrolled in {root}")
        _withdraw(d, identity)
        del d.identities[identity]
        d.save()
        shutil.rmtree(d.bundle(identity), ignore_errors=True)


def _identity(d: Deployment, identity: Optional[str], cloud: bool) -> str:
    if cloud:
        return d.cloud_id
    if not is_valid_id(identity):
        raise UsageError(f"device id {identity!r} is invalid: use 1-64 of A-Z a-z 0-9 _ . - (not '.' or '..')")
    if identity == d.cloud_id:
        raise UsageError(f"{identity!r} is the cloud's identity in this deployment: a device cannot have it")
    return identity


def issue_credentials(
    d: Deployment,
    identity: str,
    *,
    cloud: bool,
    rotate: bool,
    days: int = pki.CERT_DAYS,
    not_before: Optional[datetime.datetime] = None,
    not_after: Optional[datetime.datetime] = None,
) -> Path:
    """Make the identity's credentials and bundle (caller holds the lock); the old ones are withdrawn."""
    if identity in d.identities and not rotate:
        raise UsageError(f"{identity} is enrolled already; --rotate issues new credentials (and withdraws the old)")
    files: Dict[str, bytes] = {"ca.pem": pki.cert_pem(d.ca()[0])}
    table: Dict[str, Any] = {"host": d.hostnames[0], "port": d.port}
    if cloud:
        table["client_id"] = identity
    record: Dict[str, Any] = {
        "kind": "cloud" if cloud else "device",
        "issued": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if d.mode == "certificate":
        ca, ca_key = d.ca()
        cert, key = pki.issue(ca, ca_key, identity, days=days, not_before=not_before, not_after=not_after)
        files.update({"client.pem": pki.cert_pem(cert), "client.key": pki.key_pem(key)})
        table.update(ca_file="ca.pem", cert_file="client.pem", key_file="client.key")
        record.update(serial=f"{cert.serial_number:x}", not_after=pki.not_after(cert).isoformat())
    else:
        password = secrets.token_urlsafe(32)
        files["broker.password"] = (password + "\n").encode()
        table.update(ca_file="ca.pem", username=identity, password_file="broker.password")
    if d.tls_version != "1.2":
        table["tls_version"] = d.tls_version
    files["broker.toml"] = _snippet(identity, d.mode, cloud, table).encode()
    _write_bundle(d.bundle(identity), files)
    if identity in d.identities:
        _withdraw(d, identity)
    if d.mode == "password":
        entries = read_password_file(d.password_path)
        entries[identity] = mosquitto_hash(password)
        write_password_file(d.password_path, entries, d.broker_group)
    d.identities[identity] = record
    d.save()
    return d.bundle(identity)


def _withdraw(d: Deployment, identity: str) -> None:
    if d.mode == "certificate":
        serial = d.identities[identity].get("serial")
        if serial and serial not in d.revoked:
            d.revoked.append(serial)
            d.write_crl()
    else:
        entries = read_password_file(d.password_path)
        if entries.pop(identity, None) is not None:
            write_password_file(d.password_path, entries, d.broker_group)


def _snippet(identity: str, mode: str, cloud: bool, table: Dict[str, Any]) -> str:
    who = "the cloud daemon" if cloud else f"device {identity}"
    target = "cloud.toml" if cloud else "device.toml"
    lines = [
        f"# The [broker] table of {who} ({mode} mode), written by 'ecos-cloud enroll'. Put it in {target}",
        "# and keep this folder's files next to that file (paths are relative to it), readable by the",
        "# service only (0600). Set host to the name the broker's certificate was made for.",
        "[broker]",
    ]
    lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


def _write_bundle(folder: Path, files: Dict[str, bytes]) -> None:
    """A fresh 0700 folder of 0600 files, swapped in for the old one."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))  # mkdtemp: 0700
    for name, data in files.items():
        write_private(tmp / name, data)
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
