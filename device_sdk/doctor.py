"""``ecos-device doctor``, ``status`` and ``models``: what a configured device has, and whether it can work.

``run_checks(config_path)`` returns one :class:`Check` per concern, in order: config, broker,
keys, runtime, ledger, data, disk, clock. Each is ``ok``, ``warn`` (works, but look at it) or
``fail`` (the agent cannot do its job); ``ecos-device doctor`` prints one line per check and
exits non-zero if any failed. Nothing here spends privacy budget, reads a private image's
pixels, or logs in to the broker: with one identity per device (client id = user name) a
login would take over the running agent's session, so the broker check stops after the TCP
connection and the TLS handshake (the broker's certificate verified against ``ca_file``, the
client certificate offered).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from device_sdk.errors import EcosError, InputError

OK, WARN, FAIL = "ok", "warn", "fail"
MIN_FREE_MB = 20  # below this a ledger write or a small install fails
EARLIEST_PLAUSIBLE = 1735689600  # 2025-01-01 UTC: a clock before it was never set (a Pi without RTC boots in 1970)
_TIME_ERROR = 5  # adjtimex(2): the kernel's clock is not synchronised


@dataclass(frozen=True)
class Check:
    """One line of ``doctor``: ``name``, ``status`` (ok / warn / fail) and what was found."""

    name: str
    status: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<4}  {self.name:<7}  {self.detail}"


def run_checks(config_path: str, timeout: float = 5.0) -> List[Check]:
    """Every check, in order; a failed config stops there (the others need it)."""
    from device_sdk.config import load_device_config

    try:
        config = load_device_config(config_path)
    except EcosError as err:
        return [Check("config", FAIL, str(err))]
    except (OSError, ValueError) as err:  # doctor reports, it never ends in a traceback
        return [Check("config", FAIL, f"{config_path}: {err}")]
    checks = [Check("config", OK, f"{config_path}: device {config.device_id}")]
    for name, fn in (
        ("broker", lambda: check_broker(config.broker, timeout)),
        ("keys", lambda: check_keys(config)),
        ("runtime", lambda: check_runtime(config)),
        ("ledger", lambda: check_ledger(config)),
        ("data", lambda: check_data(config)),
        ("disk", lambda: check_disk(config)),
        ("clock", check_clock),
    ):
        checks.append(_guarded(name, fn))
    return checks


def _guarded(name: str, fn: Callable[[], Tuple[str, str]]) -> Check:
    """A check that raises becomes a failed line, never a traceback."""
    try:
        status, detail = fn()
    except (EcosError, OSError, ValueError) as err:
        status, detail = FAIL, f"{type(err).__name__}: {err}"
    return Check(name, status, detail)


def check_broker(b: Any, timeout: float = 5.0) -> Tuple[str, str]:
    """TCP connection to the broker, then (with TLS) the handshake with the configured CA and client certificate."""
    import ssl

    from device_sdk.config import broker_tls

    where = f"{b.host}:{b.port}"
    try:
        sock = socket.create_connection((b.host, b.port), timeout=timeout)
    except OSError as exc:
        return FAIL, f"{where} not reachable ({getattr(exc, 'strerror', None) or exc})"
    with sock:
        tls = broker_tls(b)
        if tls is None:
            return OK, f"{where} reachable (no TLS: credentials and messages travel in clear; not logged in)"
        try:
            with tls.context().wrap_socket(sock, server_hostname=b.host) as tls_sock:
                version = tls_sock.version()
                cert = tls_sock.getpeercert() or {}
        except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
            return FAIL, f"{where} reachable, but the TLS handshake failed ({getattr(exc, 'reason', None) or exc})"
    expires = cert.get("notAfter")
    return OK, f"{where} reachable, {version}, broker certificate verified" + (
        f" (valid until {expires})" if expires else ""
    )


def check_keys(config: Any) -> Tuple[str, str]:
    """The cloud keys the device trusts (probes and models must be signed by one), and its own TLS certificate."""
    from device_sdk.trust import trust_from_settings

    trust = trust_from_settings(config.models)
    detail = f"trusts {len(trust.key_ids)} signing key(s): {', '.join(trust.key_ids)}"
    status = OK
    if config.privacy.accept_unsigned_probes:
        status, detail = WARN, detail + "; accept_unsigned_probes is on (development only)"
    days = _cert_days_left(config.broker.cert_file)
    if days is not None:
        if days < 0:
            return FAIL, detail + f"; client certificate {config.broker.cert_file} expired {-days:.0f} days ago"
        if days < 30:
            status = WARN
        detail += f"; client certificate valid for {days:.0f} more days"
    return status, detail


def _cert_days_left(path: Optional[str]) -> Optional[float]:
    if not path:
        return None
    from cryptography import x509

    with open(path, "rb") as fh:
        cert = x509.load_pem_x509_certificate(fh.read())
    not_after = getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after
    return (not_after.timestamp() - time.time()) / 86400.0


def encoder_path(config: Any) -> Tuple[Optional[str], str]:
    """The encoder the agent would score with: the installed one, else ``[models] encoder``; and where it comes from."""
    from device_sdk.delivery.install import ModelStore

    installed = ModelStore(config.models.store).current("encoder")
    if installed is not None:
        return installed.path, f"installed v{installed.version}"
    return config.models.encoder, "[models] encoder"


def check_runtime(config: Any) -> Tuple[str, str]:
    """An inference runtime is installed and loads the encoder the probes are made for."""
    from device_sdk.agent import supported_formats
    from device_sdk.runtime import load_model

    formats = supported_formats()
    if not formats:
        return FAIL, "no inference runtime installed (pip install 'ecos-fleet-device[onnx]', [litert] or [tflite])"
    path, origin = encoder_path(config)
    if path is None:
        return (
            WARN,
            f"runtimes for {', '.join(formats)}; no encoder yet (set [models] encoder or let the cloud deliver one)",
        )
    model = load_model(path, config.models.runtime, config.models.threads)
    return OK, (
        f"encoder {os.path.basename(path)} ({origin}, sha256 {model.sha256[:12]}..., "
        f"{model.meta.feature_dim}-d) runs on {model.runtime}"
    )


def check_ledger(config: Any) -> Tuple[str, str]:
    """The privacy ledger reads back and its folder takes a new file (the ledger is replaced atomically)."""
    from device_sdk.privacy.ledger import PrivacyLedger

    path = config.privacy.ledger
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return FAIL, f"ledger folder {folder} does not exist"
    fd, probe = tempfile.mkstemp(prefix=".doctor-", dir=folder)  # an OSError here is the failure to report
    os.close(fd)
    os.remove(probe)
    if not os.path.exists(path):
        return OK, f"{path}: not created yet (the first probe creates it); folder writable"
    s = PrivacyLedger(path).summary()
    status = WARN if s["remaining_epsilon"] <= 0 else OK
    return status, (
        f"{path}: writable; spent epsilon {s['spent_epsilon']:.3f} of {s['budget_epsilon']:g} "
        f"({s['releases']} releases, {s['accountant']})"
    )


def check_data(config: Any) -> Tuple[str, str]:
    """The local folder the agent scores (an app may supply frames instead: a DataSource)."""
    from device_sdk.imagefolder import scan_image_folder

    folder = config.data.local
    if not os.path.isdir(folder):
        return WARN, f"[data] local {folder} does not exist (fine if the app supplies frames through a DataSource)"
    try:
        n = len(scan_image_folder(folder))
    except InputError as err:  # a folder without images: probes are refused until it has some
        return WARN, f"{err} (fine if the app supplies frames through a DataSource)"
    return OK, f"[data] local {folder}: {n} images"


def check_disk(config: Any) -> Tuple[str, str]:
    """Free space where the ledger and the model store live."""
    need = 2 * config.models.max_artifact_mb  # a delivery stages the file, then keeps current and previous
    worst: Optional[Tuple[float, str]] = None
    for path in (os.path.dirname(os.path.abspath(config.privacy.ledger)), config.models.store):
        existing = _existing_ancestor(path)
        free = shutil.disk_usage(existing).free / (1 << 20)
        if worst is None or free < worst[0]:
            worst = (free, existing)
    free, where = worst
    if free < MIN_FREE_MB:
        return FAIL, f"{free:.0f} MB free under {where} (< {MIN_FREE_MB} MB: ledger writes and installs fail)"
    status = WARN if free < need else OK
    return status, f"{free:.0f} MB free under {where}" + (
        f" (< {need:.0f} MB: a largest artifact may not fit)" if status == WARN else ""
    )


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_clock(now: Optional[float] = None) -> Tuple[str, str]:
    """A clock before 2025 fails (probe deadlines would be misjudged); unsynchronised or unknown only warns."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    if now < EARLIEST_PLAUSIBLE:
        return FAIL, f"clock says {stamp}: never set (probe deadlines would be misjudged); enable NTP"
    synced, how = clock_synchronised()
    if synced is None:
        return WARN, f"{stamp}; synchronisation unknown ({how})"
    if not synced:
        return WARN, f"{stamp}; not synchronised ({how}): enable NTP (systemd-timesyncd or chrony)"
    return OK, f"{stamp}; synchronised ({how})"


def clock_synchronised() -> Tuple[Optional[bool], str]:
    """``(True/False/None, how it was found)``: timedatectl when it answers, else the kernel's adjtimex."""
    if shutil.which("timedatectl"):
        try:
            out = subprocess.run(
                ["timedatectl", "show", "-p", "NTPSynchronized", "--value"], capture_output=True, text=True, timeout=5
            )
            value = out.stdout.strip()
            if out.returncode == 0 and value in ("yes", "no"):
                return value == "yes", f"timedatectl NTPSynchronized={value}"
        except (OSError, subprocess.SubprocessError):
            pass
    state = _adjtimex_state()
    if state is None:
        return None, "no timedatectl answer and no adjtimex"
    return state != _TIME_ERROR, f"adjtimex state {state}"


def _adjtimex_state() -> Optional[int]:
    """The kernel clock state from adjtimex(2) with modes = 0 (read only), or None where there is none."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        fn = libc.adjtimex
    except (OSError, AttributeError):
        return None
    buf = ctypes.create_string_buffer(512)  # struct timex is ~208 bytes; modes (first field) = 0: read only
    state = fn(buf)
    return None if state < 0 else int(state)


# ---- status and models: what this device has --------------------------------------------------------


def device_report(config: Any) -> Dict[str, Any]:
    """What ``ecos-device status`` prints: identity, broker, models, ledger, trusted keys (local state only)."""
    from device_sdk.agent import supported_formats
    from device_sdk.config import broker_tls
    from device_sdk.privacy.ledger import PrivacyLedger
    from device_sdk.trust import trust_from_settings

    b = config.broker
    ledger = PrivacyLedger(config.privacy.ledger).summary() if os.path.exists(config.privacy.ledger) else None
    try:
        keys: Any = trust_from_settings(config.models).key_ids
    except EcosError as err:
        keys = f"unusable: {err}"
    return {
        "device_id": config.device_id,
        "broker": f"{b.host}:{b.port}",
        "tls": broker_tls(b) is not None,
        "runtimes": list(supported_formats()),
        "models": models_report(config),
        "ledger": ledger,
        "trusted_keys": keys,
    }


def models_report(config: Any) -> Dict[str, Dict[str, Any]]:
    """Per kind, the current and previous installed model (and the configured encoder when none is installed)."""
    from device_sdk.delivery.install import ModelStore

    store = ModelStore(config.models.store)
    out: Dict[str, Dict[str, Any]] = {}
    for kind in store.kinds():
        current, previous = store.current(kind), store.previous(kind)
        out[kind] = {
            "current": asdict(current) if current else None,
            "previous": asdict(previous) if previous else None,
        }
    if "encoder" not in out and config.models.encoder:
        out["encoder"] = {
            "current": {"kind": "encoder", "path": config.models.encoder, "configured": True},
            "previous": None,
        }
    return out
