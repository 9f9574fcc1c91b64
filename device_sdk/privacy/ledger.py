"""The privacy ledger: one JSON file per device holding the total budget and every release.

:meth:`PrivacyLedger.release` is the only way to spend; it refuses
(:class:`~device_sdk.errors.PrivacyBudgetExceeded`) any release that would take the composed
epsilon past the budget. The accountants it composes with live in ``accounting``.

Over 400 lines on purpose: the ledger's file format, its lock and the release transaction are
privacy-critical and are audited together.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import json
import math
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from device_sdk.errors import (
    LedgerCorrupt,
    LedgerUnavailable,
    MessageError,
    PrivacyBudgetExceeded,
    ProbeConflict,
    RuntimeUnavailable,
    UsageError,
)
from device_sdk.fsutil import atomic_write_bytes, atomic_write_text
from device_sdk.privacy.accounting import (
    ACCOUNTANTS,
    DEFAULT_ACCOUNTANT,
    DEFAULT_BUDGET_DELTA,
    DEFAULT_BUDGET_EPSILON,
    ReleaseLike,
    _check_accountant,
    _check_delta,
    _check_positive,
    epsilon,
)
from device_sdk.protocol.envelope import parse_json

__all__ = ["LEDGER_KIND", "LEDGER_VERSION", "PrivacyLedger", "ReleaseResult"]

# --------------------------------------------------------------------------------------------
# Ledger
# --------------------------------------------------------------------------------------------

LEDGER_KIND = "ecos.privacy_ledger"
LEDGER_VERSION = 1
LEDGER_MAX_STRING = 16 << 20  # base64 of the largest payload a device could release (4 MiB), with room


@dataclass(frozen=True)
class ReleaseResult:
    """What :meth:`PrivacyLedger.release` hands back."""

    payload: bytes  # the released message (the stored one when ``repeated``)
    charged_epsilon: float  # increase of the composed epsilon caused by this call (0 on a repeat)
    spent_epsilon: float  # composed epsilon of the whole ledger after this call
    repeated: bool  # True when the key had been released before


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive advisory lock (``fcntl.flock``) on a sidecar file, held for the block."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        raise RuntimeUnavailable("the privacy ledger needs fcntl.flock (a POSIX system)") from None
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(lock_path), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:  # read-only filesystem, no inode left, permissions
        raise _unavailable(lock_path, exc, "locked") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class PrivacyLedger:
    """Persistent per-device privacy ledger: one JSON file, spent only through :meth:`release`.

    Every read goes back to the file (another process may have spent in between); every spend
    holds an exclusive ``flock`` on ``<file>.lock``. Use :meth:`open` to get one.
    """

    def __init__(self, path: Union[str, "os.PathLike[str]"]) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._load()  # fail early on a missing or corrupt ledger

    # ---- opening -------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: Union[str, "os.PathLike[str]"],
        device_id: Optional[str] = None,
        budget_epsilon: Optional[float] = None,
        budget_delta: Optional[float] = None,
        accountant: Optional[str] = None,
        allow_budget_change: bool = False,
    ) -> "PrivacyLedger":
        """Open the ledger at ``path``, creating it on first use.

        A new ledger gets the given budget (defaults: epsilon 3.0, delta 1e-5, accountant
        ``"gaussian"``) and ``device_id`` (a random one if None). On an existing ledger every
        argument given must match what is stored, else :class:`UsageError`; with
        ``allow_budget_change=True`` a different budget or accountant is written to the ledger
        (and the change is recorded in it), the releases are kept. The device id never changes.
        """
        path = Path(path)
        if budget_epsilon is not None:
            budget_epsilon = _check_positive("budget epsilon", budget_epsilon)
        if budget_delta is not None:
            budget_delta = _check_delta(budget_delta)
        if accountant is not None:
            _check_accountant(accountant)
        if device_id is not None and (not isinstance(device_id, str) or not device_id):
            raise UsageError(f"device id must be a non-empty string, got {device_id!r}")
        lock_path = path.with_name(path.name + ".lock")
        with _exclusive_lock(lock_path):
            if not path.exists():
                state = {
                    "kind": LEDGER_KIND,
                    "version": LEDGER_VERSION,
                    "device_id": device_id if device_id is not None else uuid.uuid4().hex,
                    "created_utc": _utc_now(),
                    "accountant": accountant if accountant is not None else DEFAULT_ACCOUNTANT,
                    "budget": {
                        "epsilon": budget_epsilon if budget_epsilon is not None else DEFAULT_BUDGET_EPSILON,
                        "delta": budget_delta if budget_delta is not None else DEFAULT_BUDGET_DELTA,
                    },
                    "budget_changes": [],
                    "releases": [],
                }
                _write_state(path, state)
                return cls(path)
            state = _read_state(path)
            if device_id is not None and device_id != state["device_id"]:
                raise UsageError(f"privacy ledger {path} belongs to device {state['device_id']!r}, not {device_id!r}")
            want = {
                "epsilon": budget_epsilon if budget_epsilon is not None else state["budget"]["epsilon"],
                "delta": budget_delta if budget_delta is not None else state["budget"]["delta"],
                "accountant": accountant if accountant is not None else state["accountant"],
            }
            have = {
                "epsilon": state["budget"]["epsilon"],
                "delta": state["budget"]["delta"],
                "accountant": state["accountant"],
            }
            if want != have:
                if not allow_budget_change:
                    raise UsageError(
                        f"privacy ledger {path} has budget epsilon={have['epsilon']}, "
                        f"delta={have['delta']}, accountant={have['accountant']!r}; asked for "
                        f"epsilon={want['epsilon']}, delta={want['delta']}, "
                        f"accountant={want['accountant']!r} (changing the budget of an existing "
                        f"ledger must be allowed explicitly)"
                    )
                state["budget_changes"].append({"time_utc": _utc_now(), "from": have, "to": want})
                state["budget"] = {"epsilon": want["epsilon"], "delta": want["delta"]}
                state["accountant"] = want["accountant"]
                _write_state(path, state)
        return cls(path)

    # ---- reading -------------------------------------------------------------------------

    def _load(self) -> Dict[str, Any]:
        return _read_state(self.path)

    @property
    def device_id(self) -> str:
        return self._load()["device_id"]

    @property
    def accountant(self) -> str:
        return self._load()["accountant"]

    @property
    def budget(self) -> Tuple[float, float]:
        """(epsilon, delta) total budget."""
        b = self._load()["budget"]
        return b["epsilon"], b["delta"]

    @staticmethod
    def _spent_of(state: Dict[str, Any], extra: Sequence[ReleaseLike] = ()) -> float:
        rels = [(r["sigma"], r["sensitivity"]) for r in state["releases"]]
        rels.extend(extra)
        return epsilon(rels, state["budget"]["delta"], state["accountant"])

    def spent(self) -> Tuple[float, float]:
        """(epsilon, delta) spent so far: composed epsilon at the ledger's delta."""
        state = self._load()
        return self._spent_of(state), state["budget"]["delta"]

    def remaining_epsilon(self) -> float:
        state = self._load()
        return max(0.0, state["budget"]["epsilon"] - self._spent_of(state))

    def would_spend(self, sigma: float, sensitivity: float = 1.0) -> float:
        """Composed epsilon the ledger would show after one more release ``(sigma, sensitivity)``."""
        sigma = _check_positive("sigma", sigma)
        sensitivity = _check_positive("sensitivity", sensitivity)
        return self._spent_of(self._load(), [(sigma, sensitivity)])

    def lookup(self, key: str) -> Optional[bytes]:
        """The payload released earlier under ``key``, or None."""
        entry = _find(self._load(), key)
        return None if entry is None else _payload_of(entry, self.path)

    def releases(self) -> List[Dict[str, Any]]:
        """The release records (without payloads), oldest first."""
        return [{k: v for k, v in r.items() if k != "payload_b64"} for r in self._load()["releases"]]

    def summary(self) -> Dict[str, Any]:
        state = self._load()
        spent = self._spent_of(state)
        return {
            "path": str(self.path),
            "device_id": state["device_id"],
            "accountant": state["accountant"],
            "budget_epsilon": state["budget"]["epsilon"],
            "delta": state["budget"]["delta"],
            "spent_epsilon": spent,
            "remaining_epsilon": max(0.0, state["budget"]["epsilon"] - spent),
            "releases": len(state["releases"]),
        }

    # ---- spending ------------------------------------------------------------------------

    def release(
        self,
        key: str,
        sigma: float,
        sensitivity: float,
        n_values: int,
        produce: Callable[[], bytes],
        commit: Callable[[bytes], None],
        conflicts: Optional[Callable[[str], bool]] = None,
    ) -> ReleaseResult:
        """Release one Gaussian-noised message under ``key`` (the probe id), or replay it.

        Under the exclusive lock:

        * ``key`` already released: the stored bytes are returned, nothing is charged, and
          ``commit(stored)`` is still called so the caller can (re)write its output. Fresh noise
          on a repeat would leak more, so the same bytes are always returned, whatever sigma is
          passed this time.
        * ``conflicts(other_key)`` true for a release on file (e.g. the same probe id with other
          content): :class:`ProbeConflict`, nothing called, nothing written;
        * otherwise, if the composed epsilon with this release would exceed the budget at the
          ledger's delta: :class:`PrivacyBudgetExceeded`, nothing called, nothing written;
        * else ``produce()`` draws the noise and builds the message, the ledger entry (with the
          message) is written atomically, then ``commit(payload)`` writes the output. If
          ``commit`` raises, the previous ledger file is restored byte for byte and the error is
          re-raised. So a payload never leaves uncharged, and a failed release costs nothing.
          (A crash between the two writes leaves the release charged; the next call with the
          same key replays it.)
        """
        if not isinstance(key, str) or not key:
            raise UsageError(f"release key must be a non-empty string, got {key!r}")
        sigma = _check_positive("sigma", sigma)
        sensitivity = _check_positive("sensitivity", sensitivity)
        if isinstance(n_values, bool) or not isinstance(n_values, (int, np.integer)) or n_values < 0:
            raise UsageError(f"n_values must be a non-negative integer, got {n_values!r}")
        with _exclusive_lock(self.lock_path):
            before = _read_raw(self.path)
            state = _parse_state(before, self.path)
            spent_before = self._spent_of(state)
            entry = _find(state, key)
            if entry is not None:
                payload = _payload_of(entry, self.path)
                commit(payload)
                return ReleaseResult(payload, 0.0, spent_before, True)
            if conflicts is not None and any(conflicts(r["key"]) for r in state["releases"]):
                raise ProbeConflict(
                    f"release {key[:80]!r} refused: the same question was answered before with "
                    "other content; nothing charged"
                )

            budget_eps = state["budget"]["epsilon"]
            after = self._spent_of(state, [(sigma, sensitivity)])
            if after > budget_eps:
                raise PrivacyBudgetExceeded(
                    f"release {key!r} refused: spent epsilon {spent_before:.4f}, this release "
                    f"(sigma={sigma:g}, sensitivity={sensitivity:g}) would bring it to "
                    f"{after:.4f} > budget {budget_eps:g} at delta={state['budget']['delta']:g} "
                    f"({state['accountant']} accountant)"
                )

            payload = produce()
            if isinstance(payload, (bytearray, memoryview)):
                payload = bytes(payload)
            if not isinstance(payload, bytes):
                raise TypeError(f"produce() must return bytes, got {type(payload).__name__}")
            state["releases"].append(
                {
                    "key": key,
                    "mechanism": "gaussian",
                    "sigma": sigma,
                    "sensitivity": sensitivity,
                    "n_values": int(n_values),
                    "time_utc": _utc_now(),
                    "epsilon_after": after,
                    "payload_sha256": hashlib.sha256(payload).hexdigest(),
                    "payload_b64": base64.b64encode(payload).decode("ascii"),
                }
            )
            _write_state(self.path, state)
            try:
                commit(payload)
            except BaseException:
                try:
                    atomic_write_bytes(self.path, before)
                except OSError:  # the disk filled up meanwhile: the release stays charged (the safe side), and
                    pass  # the caller's error is the one that matters; a repeat replays the stored answer
                raise
            return ReleaseResult(payload, max(0.0, after - spent_before), after, False)


# ---- file format ------------------------------------------------------------------------------


def _write_state(path: Path, state: Dict[str, Any]) -> None:
    """Atomically (temporary file, fsync, rename): on a full or read-only disk the old ledger stays as it was."""
    try:
        atomic_write_text(path, json.dumps(state, indent=1, allow_nan=False) + "\n")
    except OSError as exc:
        raise _unavailable(path, exc, "written") from None


def _read_raw(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _unavailable(path, exc, "read") from None


def _read_state(path: Path) -> Dict[str, Any]:
    return _parse_state(_read_raw(path), path)


def _unavailable(path: Path, exc: OSError, action: str) -> LedgerUnavailable:
    """A typed error for an OS error on the ledger: the message names the file, ``public`` does not."""
    name = errno.errorcode.get(exc.errno, "") if isinstance(exc.errno, int) else ""
    what = (os.strerror(exc.errno) if name else exc.__class__.__name__).lower()
    if name == "ENOENT":
        what = "it is missing"
    tail = f"{what} ({name})" if name else what
    return LedgerUnavailable(
        f"privacy ledger {path} cannot be {action}: {tail}; nothing was charged",
        f"the privacy ledger cannot be {action}: {tail}; nothing was charged",
        name,
    )


def _bad(path: Path, why: str) -> LedgerCorrupt:
    fix = "it was left untouched, fix or restore it by hand (it is never reset automatically)"
    return LedgerCorrupt(
        f"privacy ledger {path} is corrupt ({why}); {fix}", f"the privacy ledger is corrupt ({why}); {fix}"
    )


def _parse_state(raw: bytes, path: Path) -> Dict[str, Any]:
    try:
        # bounded (nesting, integer size, finite numbers); a string may hold a whole released payload in base64
        state = parse_json(raw, "contents", max_string=LEDGER_MAX_STRING)
    except MessageError as exc:
        raise _bad(path, f"not JSON within bounds: {exc}") from None
    if not isinstance(state, dict):
        raise _bad(path, "top level is not an object")
    if state.get("kind") != LEDGER_KIND:
        raise _bad(path, f"kind is {state.get('kind')!r}, expected {LEDGER_KIND!r}")
    if state.get("version") != LEDGER_VERSION:
        raise _bad(path, f"version {state.get('version')!r} is not supported (expected {LEDGER_VERSION})")
    if not isinstance(state.get("device_id"), str) or not state["device_id"]:
        raise _bad(path, "device_id missing")
    if state.get("accountant") not in ACCOUNTANTS:
        raise _bad(path, f"unknown accountant {state.get('accountant')!r}")
    budget = state.get("budget")
    if (
        not isinstance(budget, dict)
        or not _is_number(budget.get("epsilon"))
        or not _is_number(budget.get("delta"))
        or budget["epsilon"] <= 0
        or not 0 < budget["delta"] < 1
    ):
        raise _bad(path, "budget must hold a positive epsilon and a delta in (0, 1)")
    budget["epsilon"] = float(budget["epsilon"])
    budget["delta"] = float(budget["delta"])
    if not isinstance(state.get("budget_changes", []), list):
        raise _bad(path, "budget_changes is not a list")
    state.setdefault("budget_changes", [])
    releases = state.get("releases")
    if not isinstance(releases, list):
        raise _bad(path, "releases is not a list")
    seen = set()
    for i, r in enumerate(releases):
        if not isinstance(r, dict):
            raise _bad(path, f"release #{i} is not an object")
        key = r.get("key")
        if not isinstance(key, str) or not key:
            raise _bad(path, f"release #{i} has no key")
        if key in seen:
            raise _bad(path, f"release key {key!r} appears twice")
        seen.add(key)
        if r.get("mechanism") != "gaussian":
            raise _bad(path, f"release {key!r} has unknown mechanism {r.get('mechanism')!r}")
        for field in ("sigma", "sensitivity"):
            if not _is_number(r.get(field)) or r[field] <= 0:
                raise _bad(path, f"release {key!r} has an invalid {field}")
            r[field] = float(r[field])
        n = r.get("n_values")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise _bad(path, f"release {key!r} has an invalid n_values")
        if not isinstance(r.get("payload_b64"), str):
            raise _bad(path, f"release {key!r} has no payload")
        _payload_of(r, path)
    return state


def _find(state: Dict[str, Any], key: str) -> Optional[Dict[str, Any]]:
    for r in state["releases"]:
        if r["key"] == key:
            return r
    return None


def _payload_of(entry: Dict[str, Any], path: Path) -> bytes:
    try:
        payload = base64.b64decode(entry["payload_b64"].encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise _bad(path, f"release {entry.get('key')!r} payload is not base64") from None
    digest = entry.get("payload_sha256")
    if digest is not None and hashlib.sha256(payload).hexdigest() != digest:
        raise _bad(path, f"release {entry.get('key')!r} payload does not match its sha256")
    return payload
