"""The embedded backend: one SQLite file in WAL mode.

Every write is a single transaction, so a daemon killed with ``kill -9`` restarts from a
consistent state; a second process (``ecos-cloud round`` submitting work) can write to the same
file safely. A database that cannot be written now (full disk, read-only, I/O error, busy) is a
``StoreUnavailable`` with its reason, and nothing is half-written.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

from cloud.errors import StoreError, StoreUnavailable
from cloud.serve.store.base import Store
from cloud.serve.store.records import RoundState
from cloud.serve.store.rows import TABLE_NAMES, Row

SCHEMA_VERSION = 1

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

# What SQLite cannot take, or sqlite3 refuses to bind: a typed StoreError instead.
_BIND_ERRORS = (OverflowError, UnicodeEncodeError, sqlite3.InterfaceError, sqlite3.DataError)
# SQLite result codes (primary, extended ones share the name's prefix) of a database that cannot be written *now*
_UNAVAILABLE = {
    "SQLITE_FULL": "disk_full",
    "SQLITE_READONLY": "read_only",
    "SQLITE_IOERR": "io_error",
    "SQLITE_BUSY": "busy",
    "SQLITE_LOCKED": "busy",
    "SQLITE_CANTOPEN": "cant_open",
}
_UNAVAILABLE_TEXT = (
    ("disk is full", "disk_full"),
    ("readonly", "read_only"),
    ("read-only", "read_only"),
    ("disk i/o error", "io_error"),
    ("locked", "busy"),
    ("busy", "busy"),
    ("unable to open", "cant_open"),
)


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


def _condition(where: Mapping[str, Any]) -> tuple:
    """``WHERE`` text and its arguments; a list or tuple value is ``IN``."""
    parts: List[str] = []
    args: List[Any] = []
    for column, value in where.items():
        if isinstance(value, (list, tuple)):
            parts.append(f"{column} IN ({','.join('?' * len(value))})")
            args.extend(value)
        else:
            parts.append(f"{column}=?")
            args.append(value)
    return (" WHERE " + " AND ".join(parts)) if parts else "", args


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
            raise StoreError(
                f"{self.path}: database schema {version} is newer than this ecos ({SCHEMA_VERSION}); upgrade ecos"
            )
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
            except sqlite3.IntegrityError as exc:
                self._rollback()
                raise StoreError(f"{self.path}: a value breaks a unique key ({str(exc)[:120]})") from None
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

    # -- the backend interface
    def _read(self, table: str, where: Mapping[str, Any]) -> List[Row]:
        columns = TABLE_NAMES[table].columns
        condition, args = _condition(where)
        rows = self._query(f"SELECT {', '.join(columns)} FROM {table}{condition} ORDER BY rowid", args)
        return [dict(zip(columns, r)) for r in rows]

    def _write(self, table: str, key: Mapping[str, Any], update: Callable[[Optional[Row]], Optional[Row]]) -> bool:
        columns = TABLE_NAMES[table].columns
        condition, args = _condition(key)
        with self._tx() as db:
            found = db.execute(f"SELECT {', '.join(columns)} FROM {table}{condition}", args).fetchone()
            new = update(None if found is None else dict(zip(columns, found)))
            if new is None:
                return False
            values = [new[c] for c in columns]
            if found is None:
                db.execute(
                    f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})", values
                )
            else:
                db.execute(f"UPDATE {table} SET {', '.join(c + '=?' for c in columns)}{condition}", values + args)
        return True

    def round_counts(self) -> Dict[str, int]:
        """One GROUP BY instead of reading every round (the metrics ask at each scrape)."""
        counts = {s.value: 0 for s in RoundState}
        counts.update(dict(self._query("SELECT state, COUNT(*) FROM rounds GROUP BY state")))
        return counts

    def close(self) -> None:
        with self._lock:
            self._db.close()
