"""The device agent's configuration: typed sections read from TOML, then the environment.

    ecos-device run --config device.toml

``device_id`` at the top, then one table per section below (``[broker]``, ``[privacy]``,
``[data]``, ``[models]``). Any scalar key can be overridden by ``ECOS_DEVICE_<TABLE>_<KEY>``
(``ECOS_DEVICE_BROKER_PASSWORD``, ``ECOS_DEVICE_DEVICE_ID``), so a secret need not sit in the
file; a variable with that prefix that names no key is an error. Relative paths are taken
relative to the file's folder. Every value is checked once, at load, and a bad one is a
``UsageError`` that names the key and what would be accepted.

``from_mapping`` and ``apply_env`` are generic (any dataclass with dataclass-typed sections).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from device_sdk.errors import UsageError
from device_sdk.privacy.accounting import ACCOUNTANTS, DEFAULT_ACCOUNTANT, DEFAULT_BUDGET_DELTA, DEFAULT_BUDGET_EPSILON
from device_sdk.protocol import is_valid_id
from device_sdk.transport import PROTOCOLS, TLS_VERSIONS, TlsConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python < 3.11
    import tomli as tomllib

ENV_PREFIX = "ECOS_DEVICE_"
DEFAULT_EPSILON_PER_PROBE = 0.58  # the paper's cost of one sampling, at delta 1e-5
DEFAULT_EPSILON_PER_LABEL_QUERY = 2.0  # one label vote of automated client labelling (docs/tasks.md)


@dataclass(frozen=True)
class BrokerSettings:
    """Where the MQTT broker is and how to log in: see ``check_broker_login`` for the TLS keys."""

    host: str = "127.0.0.1"
    port: int = 1883
    protocol: str = "5"
    keepalive: int = 30
    session_expiry: int = 3600
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)  # better: password_file or ECOS_DEVICE_BROKER_PASSWORD
    password_file: Optional[str] = None
    tls: bool = False
    ca_file: Optional[str] = None
    cert_file: Optional[str] = None
    key_file: Optional[str] = None
    tls_version: str = "1.2"
    tls_insecure: bool = False


@dataclass(frozen=True)
class PrivacySettings:
    """The ledger and what one answer costs: ``epsilon_per_probe`` or a fixed ``sigma`` (not both) for a probe,
    ``epsilon_per_label_query`` for a label vote (docs/tasks.md)."""

    ledger: str = "state/ledger.json"
    budget_epsilon: float = DEFAULT_BUDGET_EPSILON
    budget_delta: float = DEFAULT_BUDGET_DELTA
    accountant: str = DEFAULT_ACCOUNTANT
    epsilon_per_probe: Optional[float] = None
    sigma: Optional[float] = None
    accept_unsigned_probes: bool = False  # development only: answer probes (and label queries) that carry no signature
    epsilon_per_label_query: float = DEFAULT_EPSILON_PER_LABEL_QUERY  # one label vote (automated client labelling)

    @property
    def epsilon(self) -> Optional[float]:
        if self.sigma is not None:
            return None
        return DEFAULT_EPSILON_PER_PROBE if self.epsilon_per_probe is None else self.epsilon_per_probe


@dataclass(frozen=True)
class DataSettings:
    """Local images scored against probes, an optional labelled set to evaluate installed models, and an
    optional labelled set (``<label>/<image>``) the device votes with when the cloud asks it to label
    (automated client labelling; without it label queries are refused with ``input``)."""

    local: str = "data/local"
    eval: Optional[str] = None
    labelled: Optional[str] = None
    batch_size: int = 64


@dataclass(frozen=True)
class ModelSettings:
    """The model store, the cloud keys the device trusts, and an optional provisioned encoder.

    Trusted signing keys: ``cloud_public_key`` (one file, the setting before key rotation) and/or
    ``trusted_keys`` (several files, e.g. the current and the next key); ``revoked_keys`` lists
    key ids refused whatever else says so; ``fleets`` the fleet ids whose ``fleet:<id>`` models
    this device installs. Keys learned from signed key updates live in ``<store>/trust.json``.
    """

    store: str = "state/models"
    cloud_public_key: str = ""
    trusted_keys: List[str] = field(default_factory=list)
    revoked_keys: List[str] = field(default_factory=list)
    fleets: List[str] = field(default_factory=list)
    encoder: Optional[str] = None
    runtime: str = "auto"
    threads: int = 1
    max_artifact_mb: float = 256.0
    allow_downgrade: bool = False  # development only: install a version not above the slot's highest

    @property
    def key_files(self) -> List[str]:
        """Every provisioned public key file: ``cloud_public_key`` then ``trusted_keys``."""
        return list(dict.fromkeys(([self.cloud_public_key] if self.cloud_public_key else []) + list(self.trusted_keys)))


@dataclass(frozen=True)
class DeviceConfig:
    device_id: str
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    data: DataSettings = field(default_factory=DataSettings)
    models: ModelSettings = field(default_factory=ModelSettings)


_PATH_LIST_KEYS = {("models", "trusted_keys")}
_PATH_KEYS = {
    ("privacy", "ledger"),
    ("data", "local"),
    ("data", "eval"),
    ("data", "labelled"),
    ("models", "store"),
    ("models", "cloud_public_key"),
    ("models", "encoder"),
    ("broker", "ca_file"),
    ("broker", "cert_file"),
    ("broker", "key_file"),
    ("broker", "password_file"),
}


def load_device_config(path: str, env: Optional[Mapping[str, str]] = None) -> DeviceConfig:
    """Read, override from the environment, resolve paths, validate."""
    raw = read_toml(path)
    apply_env(raw, DeviceConfig, ENV_PREFIX, os.environ if env is None else env, path)
    cfg = _resolve_paths(from_mapping(DeviceConfig, raw, path), os.path.dirname(os.path.abspath(path)))
    validate(cfg, path)
    return cfg


def _resolve_paths(cfg: DeviceConfig, base: str) -> DeviceConfig:
    """Relative paths (given or default) are relative to the config file's folder."""
    sections = {}
    for section in {s for s, _ in _PATH_KEYS}:
        table = getattr(cfg, section)
        changes = {
            key: os.path.normpath(os.path.join(base, os.path.expanduser(getattr(table, key))))
            for s, key in _PATH_KEYS
            if s == section and getattr(table, key)
        }
        changes.update(
            {
                key: [os.path.normpath(os.path.join(base, os.path.expanduser(p))) for p in getattr(table, key)]
                for s, key in _PATH_LIST_KEYS
                if s == section
            }
        )
        sections[section] = dataclasses.replace(table, **changes)
    return dataclasses.replace(cfg, **sections)


def read_toml(path: str) -> Dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML ({exc})") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not valid TOML (TOML files are UTF-8 text)") from None
    except OSError as exc:  # a folder, no permission, an I/O error
        raise UsageError(f"config file {path} cannot be read: {exc.strerror or exc}") from None


def from_mapping(cls: Any, raw: Any, source: str, section: str = "") -> Any:
    """Build dataclass ``cls`` from a parsed TOML table, checking every key and type."""
    where = f"[{section}]" if section else "top level"
    if not isinstance(raw, dict):
        raise UsageError(f"{source}: {where} must be a table")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise UsageError(f"{source}: unknown key(s) {', '.join(unknown)} at {where}; valid: {', '.join(hints)}")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise UsageError(f"{source}: {where} needs {', '.join(missing)}")
    values = {}
    for key, value in raw.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = from_mapping(hint, value, source, key)
        else:
            values[key] = _check_type(f"{where} {key}", value, hint, source)
    return cls(**values)


def _base_type(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        return _base_type(args[0])
    return typing.get_origin(hint) or hint


def _check_type(what: str, value: Any, hint: Any, source: str) -> Any:
    kind = _base_type(hint)
    if value is None and type(None) in typing.get_args(hint):
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise UsageError(f"{source}: {what} must be {kind.__name__}, got {value!r}")
    if kind is list and not all(isinstance(v, str) for v in value):
        raise UsageError(f"{source}: {what} must be a list of strings, got {value!r}")
    return value


def apply_env(raw: Dict[str, Any], cls: Any, prefix: str, env: Mapping[str, str], source: str) -> None:
    """Override scalar keys from ``<prefix><KEY>`` (top level) and ``<prefix><TABLE>_<KEY>``.

    A variable with the prefix that names no key is an error, not ignored: a misspelt
    ``..._CA_FILE`` must not quietly leave the connection without TLS."""
    known = set()
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            table = raw.setdefault(name, {})
            for key, sub in typing.get_type_hints(hint).items():
                var = f"{prefix}{name.upper()}_{key.upper()}"
                known.add(var)
                if isinstance(table, dict):
                    _env_value(table, key, sub, var, env)
        else:
            known.add(f"{prefix}{name.upper()}")
            _env_value(raw, name, hint, f"{prefix}{name.upper()}", env)
    unknown = sorted(var for var in env if var.startswith(prefix) and var not in known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        raise UsageError(
            f"environment variable {unknown[0]} is not a setting"
            + (f" (did you mean {close[0]}?)" if close else "")
            + f"; unset it or use one of {prefix}<TABLE>_<KEY> for the keys of {source}"
        )


def _env_value(table: Dict[str, Any], key: str, hint: Any, var: str, env: Mapping[str, str]) -> None:
    if var not in env:
        return
    text, kind = env[var], _base_type(hint)
    if type(None) in typing.get_args(hint) and text.strip().lower() in ("", "none", "null"):
        table[key] = None
    elif kind is list:  # a list of strings: comma-separated
        table[key] = [part.strip() for part in text.split(",") if part.strip()]
    elif kind is bool:
        if text.strip().lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise UsageError(f"environment variable {var}={text!r}: expected true or false")
        table[key] = text.strip().lower() in ("1", "true", "yes")
    else:
        try:
            table[key] = kind(text) if kind in (int, float, str) else text
        except ValueError:
            raise UsageError(f"environment variable {var}={text!r}: expected {kind.__name__}") from None


def validate(cfg: DeviceConfig, source: str) -> None:
    """Range checks; each message says which key to change and to what."""
    b, p, d, m = cfg.broker, cfg.privacy, cfg.data, cfg.models
    _need(is_valid_id(cfg.device_id), f"{source}: device_id {cfg.device_id!r} must be 1-64 of A-Z a-z 0-9 _ . -")
    _need(1 <= b.port <= 65535, f"{source}: [broker] port must be 1..65535, got {b.port}")
    _need(
        b.protocol in PROTOCOLS,
        f"{source}: [broker] protocol must be one of {sorted(PROTOCOLS)} (a string), got {b.protocol!r}",
    )
    _need(
        b.keepalive >= 5 and b.session_expiry >= 0,
        f"{source}: [broker] keepalive must be >= 5 s and session_expiry >= 0",
    )
    check_broker_login(b, source)
    _need(
        p.accountant in ACCOUNTANTS,
        f"{source}: [privacy] accountant must be one of {ACCOUNTANTS}, got {p.accountant!r}",
    )
    _need(
        p.budget_epsilon > 0 and 0 < p.budget_delta < 1,
        f"{source}: [privacy] need budget_epsilon > 0 and 0 < budget_delta < 1",
    )
    _need(
        p.epsilon_per_probe is None or p.sigma is None, f"{source}: [privacy] set epsilon_per_probe or sigma, not both"
    )
    _need(
        (p.epsilon or 1.0) > 0 and (p.sigma is None or p.sigma > 0),
        f"{source}: [privacy] epsilon_per_probe and sigma must be > 0",
    )
    _need(
        p.epsilon_per_label_query > 0,
        f"{source}: [privacy] epsilon_per_label_query must be > 0, got {p.epsilon_per_label_query}",
    )
    _need(d.batch_size >= 1, f"{source}: [data] batch_size must be >= 1, got {d.batch_size}")
    _need(
        bool(m.key_files),
        f"{source}: [models] cloud_public_key (or trusted_keys) is required: the cloud's Ed25519 "
        "public key(s) (PEM, or 64 hex digits) this device verifies every model and probe with",
    )
    for path in m.key_files:
        key = "cloud_public_key" if path == m.cloud_public_key else "trusted_keys"
        _need(os.path.isfile(path), f"{source}: [models] {key} {path} does not exist")
    bad = [k for k in m.revoked_keys if not (len(k) == 16 and all(c in "0123456789abcdef" for c in k))]
    _need(not bad, f"{source}: [models] revoked_keys must be key ids (16 lowercase hex digits), got {bad[:1]}")
    _need(all(is_valid_id(f) for f in m.fleets), f"{source}: [models] fleets must be ids of 1-64 of A-Z a-z 0-9 _ . -")
    _need(m.threads >= 1 and m.max_artifact_mb > 0, f"{source}: [models] need threads >= 1 and max_artifact_mb > 0")


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


# ---- TLS and login: shared by the device's [broker] and the cloud's ----------------------------------


def check_broker_login(b: Any, source: str) -> None:
    """The TLS and login keys of a ``[broker]`` table (the device's or the cloud's), checked at load.

    TLS is on when ``tls = true`` or ``ca_file`` is set: ``ca_file`` is the CA that signed the
    broker's certificate (without it, the system's CAs); ``cert_file`` + ``key_file`` a client
    certificate; ``tls_version`` the lowest version accepted; ``tls_insecure`` skips the host name
    check (tests only). The password comes from ``password`` (better: the environment variable)
    or the first line of ``password_file``, never both; it needs ``username``. Every file is
    opened here, so a wrong path stops the process at start with the key's name.
    """
    where = f"{source}: [broker]"
    _need(
        b.tls_version in TLS_VERSIONS,
        f"{where} tls_version must be one of {', '.join(TLS_VERSIONS)} (a string), got {b.tls_version!r}",
    )
    tls_on = b.tls or b.ca_file is not None
    _need(
        tls_on or (b.cert_file is None and b.key_file is None and not b.tls_insecure),
        f"{where} cert_file, key_file and tls_insecure need TLS: set ca_file (or tls = true for the system's CAs)",
    )
    _need((b.cert_file is None) == (b.key_file is None), f"{where} cert_file and key_file go together")
    _need(b.password is None or b.password_file is None, f"{where} set password or password_file, not both")
    _need(
        b.username is not None or (b.password is None and b.password_file is None),
        f"{where} a password needs username (MQTT sends no password without a user name)",
    )
    if b.ca_file is not None:
        _need(os.path.isfile(b.ca_file), f"{where} ca_file {b.ca_file} does not exist")
    for key in ("cert_file", "key_file"):
        path = getattr(b, key)
        _need(path is None or os.path.isfile(path), f"{where} {key} {path} does not exist")
    if tls_on:
        try:
            broker_tls(b).context()  # loads the CA, the certificate and its key: a wrong file fails here
        except UsageError as err:
            raise UsageError(f"{where} {err}") from None
    if b.password_file is not None:
        try:
            broker_password(b)
        except UsageError as err:
            raise UsageError(f"{where} {err}") from None


def broker_tls(b: Any) -> Optional[TlsConfig]:
    """The transport's TLS settings from a ``[broker]`` table, None without TLS."""
    if not (b.tls or b.ca_file is not None):
        return None
    return TlsConfig(b.ca_file, b.cert_file, b.key_file, version=b.tls_version, insecure=b.tls_insecure)


def broker_password(b: Any) -> Optional[str]:
    """``password``, or the first line of ``password_file`` (read when called, never logged)."""
    if b.password_file is None:
        return b.password
    try:
        with open(b.password_file, "r", encoding="utf-8") as fh:
            line = fh.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise UsageError(f"password_file {b.password_file}: cannot read it ({reason})") from None
    if not line:
        raise UsageError(f"password_file {b.password_file} is empty (its first line is the password)")
    return line
