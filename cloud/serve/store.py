"""The cloud's durable state: devices, rounds, responses, artifacts, deliveries, jobs, traffic.

``Store`` is the interface the daemon programs against; ``SqliteStore`` is the embedded
implementation (one file, WAL mode). Every write is a single transaction, so a daemon killed
with ``kill -9`` restarts from a consistent state. The guarantees the daemon relies on are
properties of the store, tested once for every backend (tests/test_store.py):

* a round moves only along ``TRANSITIONS``, by compare-and-set, so a stage that is retried
  after a crash cannot move a round twice;
* ``add_response`` keeps one response per (round, device): a repeated answer counts once;
* one artifact per round (a retried signing stage finds the first one);
* a delivery that reached ``installed`` or ``failed`` stays there.
"""

from __future__ import annotations

import json
import numbers
import re
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from device_sdk.errors import StoreError, StoreUnavailable
from device_sdk.logsafe import clean

SCHEMA_VERSION = 1


class RoundState(str, Enum):
    PROBING = "probing"
    COLLECTING = "collecting"
    SAMPLING = "sampling"
    TRAINING = "training"
    SIGNING = "signing"
    DELIVERING = "delivering"
    DONE = "done"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (RoundState.DONE, RoundState.FAILED)


_ORDER = [RoundState.PROBING, RoundState.COLLECTING, RoundState.SAMPLING, RoundState.TRAINING,
          RoundState.SIGNING, RoundState.DELIVERING, RoundState.DONE]
# Each working state goes to the next one, or fails; DONE and FAILED are final.
TRANSITIONS: Dict[RoundState, Tuple[RoundState, ...]] = {
    a: (b, RoundState.FAILED) for a, b in zip(_ORDER, _ORDER[1:])
}
ROUND_KINDS = ("device", "fleet")
DELIVERY_FINAL = ("installed", "failed")
RESPONSE_KINDS = ("scores", "refusal")


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    state: str  # "online" | "offline" | "unknown"
    model: Optional[Dict[str, Any]]
    first_seen: float
    last_seen: float


@dataclass(frozen=True)
class RoundRecord:
    round_id: str
    kind: str  # "device": one device, its own model; "fleet": summed scores, one model for all
    devices: Tuple[str, ...]
    state: RoundState
    params: Dict[str, Any]
    result: Dict[str, Any]
    deadline: Optional[float]
    error: str
    created: float
    updated: float


@dataclass(frozen=True)
class ResponseRecord:
    round_id: str
    device_id: str
    kind: str  # "scores" | "refusal"
    message_id: str
    payload: bytes
    received: float


@dataclass(frozen=True)
class ArtifactRecord:
    artifact_id: str
    round_id: str
    name: str
    version: int
    sha256: str
    size: int
    path: str
    manifest: bytes  # the signed manifest message, sent as is
    created: float = 0.0


@dataclass(frozen=True)
class DeliveryRecord:
    artifact_id: str
    device_id: str
    round_id: str
    state: str  # "sending" | "installed" | "failed"
    next_chunk: int
    total_chunks: int
    result: Dict[str, Any]
    updated: float


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    round_id: str
    kind: str
    state: str  # "running" | "done" | "failed"
    attempt: int
    done: int
    total: int
    note: str
    result: Dict[str, Any]
    error: str
    started: float
    updated: float


@dataclass(frozen=True)
class TrafficRow:
    device_id: str
    round_id: str
    direction: str  # "up" (device -> cloud) | "down"
    msg_type: str
    messages: int
    bytes: int


@dataclass(frozen=True)
class NewRound:
    """What a caller asks for; the store assigns nothing but timestamps."""

    round_id: str
    kind: str
    devices: Sequence[str]
    params: Dict[str, Any] = field(default_factory=dict)


class Store(ABC):
    """Everything the daemon persists. Implementations must be safe to call from several threads."""

    # -- devices
    @abstractmethod
    def record_status(self, device_id: str, state: str, model: Optional[Dict[str, Any]], at: float) -> None:
        """Upsert a device's online state and the model it says it runs."""

    @abstractmethod
    def set_device_model(self, device_id: str, model: Dict[str, Any], at: float) -> None:
        """Record the model a device reported installed."""

    @abstractmethod
    def get_device(self, device_id: str) -> Optional[DeviceRecord]: ...

    @abstractmethod
    def list_devices(self) -> List[DeviceRecord]: ...

    # -- rounds
    @abstractmethod
    def create_round(self, spec: NewRound) -> RoundRecord:
        """Insert a round in state PROBING; an existing id is a StoreError."""

    @abstractmethod
    def get_round(self, round_id: str) -> Optional[RoundRecord]: ...

    @abstractmethod
    def list_rounds(self, states: Optional[Sequence[RoundState]] = None) -> List[RoundRecord]:
        """Rounds in creation order, optionally only those in ``states``."""

    @abstractmethod
    def transition(self, round_id: str, expected: RoundState, target: RoundState, *,
                   result: Optional[Dict[str, Any]] = None, deadline: Optional[float] = None, error: str = "") -> bool:
        """Move ``expected`` -> ``target`` if the round is still in ``expected`` (False otherwise);
        ``result`` is merged into the round's result. An illegal transition is a StoreError."""

    @abstractmethod
    def round_counts(self) -> Dict[str, int]:
        """Number of rounds per state (every state present)."""

    # -- responses
    @abstractmethod
    def add_response(self, response: ResponseRecord) -> bool:
        """Keep the first response of a (round, device); True if this one was new."""

    @abstractmethod
    def responses(self, round_id: str) -> List[ResponseRecord]: ...

    # -- artifacts
    @abstractmethod
    def next_version(self, name: str) -> int:
        """1 + the highest version of artifacts called ``name`` (1 for the first)."""

    @abstractmethod
    def add_artifact(self, artifact: ArtifactRecord) -> ArtifactRecord:
        """Insert, or return the artifact the round already has (one per round)."""

    @abstractmethod
    def get_artifact(self, artifact_id: str) -> Optional[ArtifactRecord]: ...

    @abstractmethod
    def artifact_of_round(self, round_id: str) -> Optional[ArtifactRecord]: ...

    # -- deliveries
    @abstractmethod
    def add_delivery(self, artifact_id: str, device_id: str, round_id: str, total_chunks: int) -> DeliveryRecord:
        """Insert a delivery in state ``sending`` at chunk 0, or return the existing one."""

    @abstractmethod
    def update_delivery(self, artifact_id: str, device_id: str, *, state: Optional[str] = None,
                        next_chunk: Optional[int] = None, result: Optional[Dict[str, Any]] = None) -> bool:
        """Update a delivery still in progress; False if it is unknown or already final."""

    @abstractmethod
    def get_delivery(self, artifact_id: str, device_id: str) -> Optional[DeliveryRecord]: ...

    @abstractmethod
    def deliveries(self, round_id: str) -> List[DeliveryRecord]: ...

    # -- jobs
    @abstractmethod
    def start_job(self, job_id: str, round_id: str, kind: str) -> JobRecord:
        """Mark a job running (again): a restart after a crash increments ``attempt``."""

    @abstractmethod
    def job_progress(self, job_id: str, done: int, total: int, note: str = "") -> None: ...

    @abstractmethod
    def finish_job(self, job_id: str, state: str, result: Optional[Dict[str, Any]] = None, error: str = "") -> None: ...

    @abstractmethod
    def get_job(self, job_id: str) -> Optional[JobRecord]: ...

    # -- traffic
    @abstractmethod
    def add_traffic(self, device_id: str, round_id: str, direction: str, msg_type: str, nbytes: int) -> None:
        """Count one message of ``nbytes`` on the wire."""

    @abstractmethod
    def traffic(self, round_id: Optional[str] = None, device_id: Optional[str] = None) -> List[TrafficRow]: ...

    @abstractmethod
    def close(self) -> None: ...

    def writable(self) -> bool:
        """False while the last write failed for want of room or access (``StoreUnavailable``)."""
        return True


_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, state TEXT NOT NULL, model TEXT,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, round_id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL,
    devices TEXT NOT NULL, state TEXT NOT NULL, params TEXT NOT NULL, result TEXT NOT NULL,
    deadline REAL, error TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL);
CREATE INDEX IF NOT EXISTS rounds_state ON rounds(state);
CREATE TABLE IF NOT EXISTS responses (
    round_id TEXT NOT NULL, device_id TEXT NOT NULL, kind TEXT NOT NULL, message_id TEXT NOT NULL,
    payload BLOB NOT NULL, received REAL NOT NULL, UNIQUE(round_id, device_id));
CREATE TABLE IF NOT EXISTS artifacts (
    artifact_id TEXT PRIMARY KEY, round_id TEXT NOT NULL UNIQUE, name TEXT NOT NULL, version INTEGER NOT NULL,
    sha256 TEXT NOT NULL, size INTEGER NOT NULL, path TEXT NOT NULL, manifest BLOB NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS deliveries (
    artifact_id TEXT NOT NULL, device_id TEXT NOT NULL, round_id TEXT NOT NULL, state TEXT NOT NULL,
    next_chunk INTEGER NOT NULL, total_chunks INTEGER NOT NULL, result TEXT NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (artifact_id, device_id));
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, round_id TEXT NOT NULL, kind TEXT NOT NULL, state TEXT NOT NULL,
    attempt INTEGER NOT NULL, done INTEGER NOT NULL, total INTEGER NOT NULL, note TEXT NOT NULL,
    result TEXT NOT NULL, error TEXT NOT NULL, started REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS traffic (
    device_id TEXT NOT NULL, round_id TEXT NOT NULL, direction TEXT NOT NULL, msg_type TEXT NOT NULL,
    messages INTEGER NOT NULL, bytes INTEGER NOT NULL, PRIMARY KEY (device_id, round_id, direction, msg_type));
"""


def _dumps(value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise StoreError(f"cannot store {type(value).__name__} as JSON ({str(exc)[:120]})") from None


MAX_SQL_INT = (1 << 63) - 1  # SQLite's INTEGER; Python's sqlite3 raises OverflowError beyond
_SURROGATE = re.compile("[\ud800-\udfff]")
# What SQLite cannot take, or sqlite3 refuses to bind: a typed StoreError instead.
_BIND_ERRORS = (OverflowError, UnicodeEncodeError, sqlite3.InterfaceError, sqlite3.DataError)
# SQLite result codes (primary, extended ones share the name's prefix) of a database that cannot be written *now*
_UNAVAILABLE = {"SQLITE_FULL": "disk_full", "SQLITE_READONLY": "read_only", "SQLITE_IOERR": "io_error",
                "SQLITE_BUSY": "busy", "SQLITE_LOCKED": "busy", "SQLITE_CANTOPEN": "cant_open"}
_UNAVAILABLE_TEXT = (("disk is full", "disk_full"), ("readonly", "read_only"), ("read-only", "read_only"),
                     ("disk i/o error", "io_error"), ("locked", "busy"), ("busy", "busy"),
                     ("unable to open", "cant_open"))


def _unavailable_reason(exc: BaseException) -> Optional[str]:
    """``disk_full``, ``read_only``, ... for an SQLite error that a later retry may not meet; None otherwise."""
    if not isinstance(exc, sqlite3.OperationalError):
        return None
    name = getattr(exc, "sqlite_errorname", "") or ""
    for prefix, reason in _UNAVAILABLE.items():
        if name.startswith(prefix):
            return reason
    text = str(exc).lower()
    return next((reason for needle, reason in _UNAVAILABLE_TEXT if needle in text), None)


def _int(name: str, value: Any, lo: int = 0, hi: int = MAX_SQL_INT) -> int:
    """``value`` as an int in ``[lo, hi]`` (not a bool, not a float), else StoreError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
        raise StoreError(f"{name} must be an integer in [{lo}, {hi}], got {clean(value, 60)}")
    return int(value)


def _text(name: str, value: Any) -> str:
    """``value`` as a str that UTF-8 (and so SQLite) can hold, else StoreError."""
    if not isinstance(value, str) or _SURROGATE.search(value):
        raise StoreError(f"{name} must be a UTF-8 string, got {clean(value, 60)}")
    return value


class SqliteStore(Store):
    """SQLite in WAL mode: readers never block the writer, and a crash loses no committed write.

    One connection shared by the daemon's threads behind a lock; ``busy_timeout`` lets a
    second process (``ecos-cloud round`` submitting work) write to the same file safely.
    ``path=":memory:"`` gives a private in-memory database (tests).
    """

    def __init__(self, path: str, timeout: float = 10.0):
        self.path = path
        self._lock = threading.RLock()
        self._writable = True
        try:
            self._db = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # in WAL mode: durable across process crashes
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path}: cannot open the state database ({exc})") from None

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path}: database schema {version} is newer than this ecos ({SCHEMA_VERSION}); upgrade ecos")
        with self._tx() as db:
            for statement in filter(str.strip, _SCHEMA.split(";")):  # executescript would commit mid-transaction
                db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes the write lock up front (no upgrade deadlock).

        A database that cannot be written now (SQLITE_FULL, READONLY, IOERR, BUSY) is a
        ``StoreUnavailable`` with its ``reason``; the transaction is rolled back (SQLite may
        already have done so), so nothing is half-written and a retry starts clean.
        """
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise self._failed(exc, "cannot start a write") from None
            try:
                yield self._db
                self._db.execute("COMMIT")
            except _BIND_ERRORS as exc:
                self._rollback()
                why = f"{exc.__class__.__name__}: {str(exc)[:120]}"
                raise StoreError(f"{self.path}: a value cannot be stored ({why})") from None
            except sqlite3.OperationalError as exc:
                self._rollback()
                if _unavailable_reason(exc) is None:
                    raise
                raise self._failed(exc, "cannot write") from None
            except BaseException:
                self._rollback()
                raise
            self._writable = True

    def _rollback(self) -> None:
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.OperationalError:  # SQLite rolled back by itself (e.g. after SQLITE_FULL)
                pass

    def _failed(self, exc: sqlite3.OperationalError, what: str) -> StoreError:
        reason = _unavailable_reason(exc)
        if reason is None:
            return StoreError(f"{self.path}: {what} ({exc})")
        if reason != "busy":
            self._writable = False
        return StoreUnavailable(f"{self.path}: {what}: {reason.replace('_', ' ')} ({exc})", reason)

    def writable(self) -> bool:
        return self._writable

    def _query(self, sql: str, args: Sequence[Any] = ()) -> List[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, tuple(args)).fetchall()
            except _BIND_ERRORS as exc:
                raise StoreError(f"{self.path}: a value cannot be looked up ({exc.__class__.__name__})") from None
            except sqlite3.OperationalError as exc:
                if _unavailable_reason(exc) is None:
                    raise
                raise StoreUnavailable(f"{self.path}: cannot read ({exc})", _unavailable_reason(exc)) from None

    # -- devices
    def record_status(self, device_id: str, state: str, model: Optional[Dict[str, Any]], at: float) -> None:
        device_id, state = _text("device_id", device_id), _text("state", state)
        with self._tx() as db:
            db.execute("INSERT INTO devices VALUES (?, ?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET "
                       "state=excluded.state, model=COALESCE(excluded.model, devices.model), last_seen=excluded.last_seen",
                       (device_id, state, None if model is None else _dumps(model), at, at))

    def set_device_model(self, device_id: str, model: Dict[str, Any], at: float) -> None:
        device_id = _text("device_id", device_id)
        with self._tx() as db:
            db.execute("INSERT INTO devices VALUES (?, 'unknown', ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET "
                       "model=excluded.model, last_seen=excluded.last_seen", (device_id, _dumps(model), at, at))

    def get_device(self, device_id: str) -> Optional[DeviceRecord]:
        rows = self._query("SELECT * FROM devices WHERE device_id=?", (device_id,))
        return _device(rows[0]) if rows else None

    def list_devices(self) -> List[DeviceRecord]:
        return [_device(r) for r in self._query("SELECT * FROM devices ORDER BY device_id")]

    # -- rounds
    def create_round(self, spec: NewRound) -> RoundRecord:
        if spec.kind not in ROUND_KINDS or not spec.devices:
            raise StoreError(f"round {spec.round_id}: kind must be one of {ROUND_KINDS} with at least one device")
        now = time.time()
        try:
            with self._tx() as db:
                db.execute("INSERT INTO rounds (round_id, kind, devices, state, params, result, deadline, error, created, updated) "
                           "VALUES (?, ?, ?, ?, ?, '{}', NULL, '', ?, ?)",
                           (spec.round_id, spec.kind, _dumps(list(spec.devices)), RoundState.PROBING.value,
                            _dumps(spec.params), now, now))
        except sqlite3.IntegrityError:
            raise StoreError(f"round {spec.round_id} already exists") from None
        return self.get_round(spec.round_id)

    def get_round(self, round_id: str) -> Optional[RoundRecord]:
        rows = self._query(f"SELECT {_ROUND_COLS} FROM rounds WHERE round_id=?", (round_id,))
        return _round(rows[0]) if rows else None

    def list_rounds(self, states: Optional[Sequence[RoundState]] = None) -> List[RoundRecord]:
        if states is None:
            return [_round(r) for r in self._query(f"SELECT {_ROUND_COLS} FROM rounds ORDER BY seq")]
        marks = ",".join("?" * len(states))
        rows = self._query(f"SELECT {_ROUND_COLS} FROM rounds WHERE state IN ({marks}) ORDER BY seq", [s.value for s in states])
        return [_round(r) for r in rows]

    def transition(self, round_id: str, expected: RoundState, target: RoundState, *,
                   result: Optional[Dict[str, Any]] = None, deadline: Optional[float] = None, error: str = "") -> bool:
        if target not in TRANSITIONS.get(expected, ()):
            raise StoreError(f"round {round_id}: illegal transition {expected.value} -> {target.value}")
        with self._tx() as db:
            row = db.execute("SELECT state, result, deadline FROM rounds WHERE round_id=?", (round_id,)).fetchone()
            if row is None or row[0] != expected.value:
                return False
            merged = {**json.loads(row[1]), **(result or {})}
            db.execute("UPDATE rounds SET state=?, result=?, deadline=?, error=?, updated=? WHERE round_id=?",
                       (target.value, _dumps(merged), row[2] if deadline is None else deadline, error, time.time(), round_id))
        return True

    def round_counts(self) -> Dict[str, int]:
        counts = {s.value: 0 for s in RoundState}
        counts.update(dict(self._query("SELECT state, COUNT(*) FROM rounds GROUP BY state")))
        return counts

    # -- responses
    def add_response(self, response: ResponseRecord) -> bool:
        if response.kind not in RESPONSE_KINDS:
            raise StoreError(f"response kind must be one of {RESPONSE_KINDS}, got {clean(response.kind, 40)}")
        for name in ("round_id", "device_id", "message_id"):
            _text(name, getattr(response, name))
        with self._tx() as db:
            cur = db.execute("INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?, ?, ?)",
                             (response.round_id, response.device_id, response.kind, response.message_id,
                              bytes(response.payload), response.received))
            return cur.rowcount == 1

    def responses(self, round_id: str) -> List[ResponseRecord]:
        rows = self._query("SELECT * FROM responses WHERE round_id=? ORDER BY received, device_id", (round_id,))
        return [ResponseRecord(r[0], r[1], r[2], r[3], bytes(r[4]), r[5]) for r in rows]

    # -- artifacts
    def next_version(self, name: str) -> int:
        return int(self._query("SELECT COALESCE(MAX(version), 0) + 1 FROM artifacts WHERE name=?", (name,))[0][0])

    def add_artifact(self, artifact: ArtifactRecord) -> ArtifactRecord:
        _int("version", artifact.version)
        _int("size", artifact.size)
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO artifacts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (artifact.artifact_id, artifact.round_id, artifact.name, artifact.version, artifact.sha256,
                        artifact.size, artifact.path, bytes(artifact.manifest), artifact.created or time.time()))
        return self.artifact_of_round(artifact.round_id)

    def get_artifact(self, artifact_id: str) -> Optional[ArtifactRecord]:
        rows = self._query("SELECT * FROM artifacts WHERE artifact_id=?", (artifact_id,))
        return _artifact(rows[0]) if rows else None

    def artifact_of_round(self, round_id: str) -> Optional[ArtifactRecord]:
        rows = self._query("SELECT * FROM artifacts WHERE round_id=?", (round_id,))
        return _artifact(rows[0]) if rows else None

    # -- deliveries
    def add_delivery(self, artifact_id: str, device_id: str, round_id: str, total_chunks: int) -> DeliveryRecord:
        total_chunks = _int("total_chunks", total_chunks)
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO deliveries VALUES (?, ?, ?, 'sending', 0, ?, '{}', ?)",
                       (artifact_id, device_id, round_id, total_chunks, time.time()))
        return self.get_delivery(artifact_id, device_id)

    def update_delivery(self, artifact_id: str, device_id: str, *, state: Optional[str] = None,
                        next_chunk: Optional[int] = None, result: Optional[Dict[str, Any]] = None) -> bool:
        if next_chunk is not None:
            next_chunk = _int("next_chunk", next_chunk)
        if state is not None:
            state = _text("state", state)
        with self._tx() as db:
            row = db.execute("SELECT state, next_chunk, result FROM deliveries WHERE artifact_id=? AND device_id=?",
                             (artifact_id, device_id)).fetchone()
            if row is None or row[0] in DELIVERY_FINAL:
                return False
            merged = {**json.loads(row[2]), **(result or {})}
            db.execute("UPDATE deliveries SET state=?, next_chunk=?, result=?, updated=? WHERE artifact_id=? AND device_id=?",
                       (state or row[0], row[1] if next_chunk is None else next_chunk, _dumps(merged), time.time(),
                        artifact_id, device_id))
        return True

    def get_delivery(self, artifact_id: str, device_id: str) -> Optional[DeliveryRecord]:
        rows = self._query("SELECT * FROM deliveries WHERE artifact_id=? AND device_id=?", (artifact_id, device_id))
        return _delivery(rows[0]) if rows else None

    def deliveries(self, round_id: str) -> List[DeliveryRecord]:
        return [_delivery(r) for r in self._query("SELECT * FROM deliveries WHERE round_id=? ORDER BY device_id", (round_id,))]

    # -- jobs
    def start_job(self, job_id: str, round_id: str, kind: str) -> JobRecord:
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT INTO jobs VALUES (?, ?, ?, 'running', 1, 0, 0, '', '{}', '', ?, ?) ON CONFLICT(job_id) DO UPDATE SET "
                       "state='running', attempt=jobs.attempt + 1, done=0, total=0, note='', error='', updated=excluded.updated",
                       (job_id, round_id, kind, now, now))
        return self.get_job(job_id)

    def job_progress(self, job_id: str, done: int, total: int, note: str = "") -> None:
        done, total = _int("done", done), _int("total", total)
        with self._tx() as db:
            db.execute("UPDATE jobs SET done=?, total=?, note=?, updated=? WHERE job_id=?", (done, total, note, time.time(), job_id))

    def finish_job(self, job_id: str, state: str, result: Optional[Dict[str, Any]] = None, error: str = "") -> None:
        if state not in ("done", "failed"):
            raise StoreError(f"job {job_id}: a finished job is 'done' or 'failed', not {state!r}")
        with self._tx() as db:
            db.execute("UPDATE jobs SET state=?, result=?, error=?, updated=? WHERE job_id=?",
                       (state, _dumps(result or {}), error, time.time(), job_id))

    def get_job(self, job_id: str) -> Optional[JobRecord]:
        rows = self._query("SELECT * FROM jobs WHERE job_id=?", (job_id,))
        if not rows:
            return None
        r = rows[0]
        return JobRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], json.loads(r[8]), r[9], r[10], r[11])

    # -- traffic
    def add_traffic(self, device_id: str, round_id: str, direction: str, msg_type: str, nbytes: int) -> None:
        nbytes = _int("nbytes", nbytes, hi=1 << 40)  # one message; the sum stays far below 2**63
        for name, value in (("device_id", device_id), ("round_id", round_id), ("msg_type", msg_type)):
            _text(name, value)
        with self._tx() as db:
            db.execute("INSERT INTO traffic VALUES (?, ?, ?, ?, 1, ?) ON CONFLICT(device_id, round_id, direction, msg_type) "
                       "DO UPDATE SET messages=traffic.messages + 1, bytes=traffic.bytes + excluded.bytes",
                       (device_id, round_id, direction, msg_type, int(nbytes)))

    def traffic(self, round_id: Optional[str] = None, device_id: Optional[str] = None) -> List[TrafficRow]:
        rows = self._query("SELECT * FROM traffic WHERE (? IS NULL OR round_id=?) AND (? IS NULL OR device_id=?) "
                           "ORDER BY device_id, round_id, direction, msg_type", (round_id, round_id, device_id, device_id))
        return [TrafficRow(*r) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


_ROUND_COLS = "round_id, kind, devices, state, params, result, deadline, error, created, updated"


def _round(r: tuple) -> RoundRecord:
    return RoundRecord(r[0], r[1], tuple(json.loads(r[2])), RoundState(r[3]), json.loads(r[4]), json.loads(r[5]),
                       r[6], r[7], r[8], r[9])


def _device(r: tuple) -> DeviceRecord:
    return DeviceRecord(r[0], r[1], None if r[2] is None else json.loads(r[2]), r[3], r[4])


def _artifact(r: tuple) -> ArtifactRecord:
    return ArtifactRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], bytes(r[7]), r[8])


def _delivery(r: tuple) -> DeliveryRecord:
    return DeliveryRecord(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7])


def open_store(path: str) -> Store:
    """The store for a database path (SQLite; the only backend so far, see docs/operations.md)."""
    return SqliteStore(path)
