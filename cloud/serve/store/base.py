"""The job store's interface: typed records, states, and the rules every backend shares.

``Store`` is what the daemon programs against. Its public methods (rounds, responses,
artifacts, deliveries, jobs, devices, traffic) are implemented once, here, on top of a small
backend interface of two operations on rows of named tables (``TABLES``):

* ``_read(table, where)``: the rows whose columns equal ``where`` (a list or tuple value: any
  of them), in insertion order;
* ``_write(table, key, update)``: atomically read the row with the unique ``key`` (None if
  there is none), call ``update`` with it and write what it returns (None: write nothing);
  True if something was written;

plus ``close()`` (and ``writable()``, True unless the backend knows better). A row is a dict of
column name -> str, int, float, bytes or None; the codecs between rows and records
(``to_row``/``from_row``: JSON for dicts and tuples, enum values for states) live here too, so
a backend stores values and never interprets them. Because the rules live above the backend,
every backend keeps the guarantees the daemon relies on (tests/serve/test_store_contract.py
runs one suite against each):

* a round moves only along ``TRANSITIONS``, by compare-and-set, so a stage that is retried
  after a crash cannot move a round twice;
* ``add_response`` keeps one response per (round, device): a repeated answer counts once;
* one artifact per round (a retried signing stage finds the first one);
* a delivery that reached ``installed`` or ``failed`` stays there.

States are ``str`` enums whose values are the strings stored in the database and shown in
JSON, logs and metrics, so they compare equal to (and print as) those strings.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar

from cloud.errors import StoreError
from device_sdk.logsafe import clean


class StrEnum(str, Enum):
    """A ``str`` enum that prints and formats as its value on every Python version (3.9+)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class RoundState(StrEnum):
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


# Where each working state may go next (besides FAILED, which every working state may reach);
# DONE and FAILED are final. A new state is one member above and one line here.
_NEXT: Dict[RoundState, Tuple[RoundState, ...]] = {
    RoundState.PROBING: (RoundState.COLLECTING,),
    RoundState.COLLECTING: (RoundState.SAMPLING,),
    RoundState.SAMPLING: (RoundState.TRAINING,),
    RoundState.TRAINING: (RoundState.SIGNING,),
    RoundState.SIGNING: (RoundState.DELIVERING,),
    RoundState.DELIVERING: (RoundState.DONE,),
}
TRANSITIONS: Dict[RoundState, Tuple[RoundState, ...]] = {a: (*b, RoundState.FAILED) for a, b in _NEXT.items()}


class RoundKind(StrEnum):
    DEVICE = "device"  # one device, its own model
    FLEET = "fleet"  # summed scores, one model for all


class ResponseKind(StrEnum):
    SCORES = "scores"
    REFUSAL = "refusal"


class DeliveryState(StrEnum):
    SENDING = "sending"
    INSTALLED = "installed"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self is not DeliveryState.SENDING


class JobState(StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class DeviceState(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    UNKNOWN = "unknown"  # seen only through a delivery result, never through a status


ROUND_KINDS = tuple(k.value for k in RoundKind)
DELIVERY_FINAL = tuple(s.value for s in DeliveryState if s.final)
RESPONSE_KINDS = tuple(k.value for k in ResponseKind)


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    state: DeviceState
    model: Optional[Dict[str, Any]]
    first_seen: float
    last_seen: float


@dataclass(frozen=True)
class RoundRecord:
    round_id: str
    kind: str  # RoundKind value
    devices: Tuple[str, ...]
    state: RoundState
    params: Dict[str, Any]  # persisted JSON; the daemon reads it as cloud.serve.round_types.RoundParams
    result: Dict[str, Any]  # persisted JSON, merged over the stages (cloud.serve.round_types)
    deadline: Optional[float]
    error: str
    created: float
    updated: float


@dataclass(frozen=True)
class ResponseRecord:
    round_id: str
    device_id: str
    kind: str  # ResponseKind value
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
    state: DeliveryState
    next_chunk: int
    total_chunks: int
    result: Dict[str, Any]
    updated: float


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    round_id: str
    kind: str
    state: JobState
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


# ---- tables: what a backend stores -------------------------------------------------------------

Row = Dict[str, Any]
R = TypeVar("R")


@dataclass(frozen=True)
class Table:
    """One kind of record: its table name, unique keys (the first is the primary key), and the
    order the store returns several in (empty: insertion order)."""

    name: str
    record: type
    keys: Tuple[Tuple[str, ...], ...]
    order: Tuple[str, ...] = ()

    @property
    def columns(self) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.record))


TABLES: Dict[type, Table] = {
    t.record: t
    for t in (
        Table("devices", DeviceRecord, (("device_id",),), order=("device_id",)),
        Table("rounds", RoundRecord, (("round_id",),)),
        Table("responses", ResponseRecord, (("round_id", "device_id"),), order=("received", "device_id")),
        Table("artifacts", ArtifactRecord, (("artifact_id",), ("round_id",))),
        Table("deliveries", DeliveryRecord, (("artifact_id", "device_id"),), order=("device_id",)),
        Table("jobs", JobRecord, (("job_id",),)),
        Table(
            "traffic",
            TrafficRow,
            (("device_id", "round_id", "direction", "msg_type"),),
            order=("device_id", "round_id", "direction", "msg_type"),
        ),
    )
}
TABLE_NAMES = {t.name: t for t in TABLES.values()}

MAX_SQL_INT = (1 << 63) - 1  # a 64-bit signed integer: what SQLite (and PostgreSQL's BIGINT) can hold
_SURROGATE = re.compile("[\ud800-\udfff]")


def _dumps(value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise StoreError(f"cannot store {type(value).__name__} as JSON ({str(exc)[:120]})") from None


def _int(name: str, value: Any, lo: int = 0, hi: int = MAX_SQL_INT) -> int:
    """``value`` as an int in ``[lo, hi]`` (not a bool, not a float), else StoreError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
        raise StoreError(f"{name} must be an integer in [{lo}, {hi}], got {clean(value, 60)}")
    return int(value)


def _text(name: str, value: Any) -> str:
    """``value`` as a str that UTF-8 (and so any database) can hold, else StoreError."""
    if not isinstance(value, str) or _SURROGATE.search(value):
        raise StoreError(f"{name} must be a UTF-8 string, got {clean(value, 60)}")
    return value


def _enum(kind: Type[Enum], name: str, value: Any) -> Any:
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(str(m.value) for m in kind)  # type: ignore[attr-defined]
        raise StoreError(f"{name} must be one of {allowed}, got {clean(value, 40)}") from None


# Columns stored as something else than themselves: JSON text, enum values, bytes.
_JSON_COLUMNS = {"model", "params", "result", "devices"}
_ENUM_COLUMNS: Dict[type, Type[Enum]] = {
    DeviceRecord: DeviceState,
    RoundRecord: RoundState,
    DeliveryRecord: DeliveryState,
    JobRecord: JobState,
}


def _cell(table: str, column: str, value: Any) -> Any:
    """One value as a database can hold it; anything else is a StoreError that names the column."""
    if value is None or isinstance(value, float):
        return value
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return _text(f"{table}.{column}", value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return _int(f"{table}.{column}", value, lo=-MAX_SQL_INT - 1)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise StoreError(f"{table}.{column}: cannot store {type(value).__name__}")


def to_row(record: Any) -> Row:
    """A record as a row of plain values (dicts and tuples as JSON text, states as their values)."""
    table = TABLES[type(record)]
    row: Row = {}
    for column in table.columns:
        value = getattr(record, column)
        if column in _JSON_COLUMNS and value is not None:
            value = _dumps(value)
        row[column] = _cell(table.name, column, value)
    return row


def from_row(kind: Type[R], row: Mapping[str, Any]) -> R:
    """The record of ``kind`` a row holds (the inverse of ``to_row``)."""
    values = {}
    for column in TABLES[kind].columns:
        value = row[column]
        if column in _JSON_COLUMNS and value is not None:
            value = json.loads(value)
            if column == "devices":
                value = tuple(value)
        elif column == "state":
            value = _ENUM_COLUMNS[kind](value)
        elif isinstance(value, (bytearray, memoryview)):
            value = bytes(value)
        values[column] = value
    return kind(**values)  # type: ignore[call-arg]


# ---- the interface ----------------------------------------------------------------------------


class Store(ABC):
    """Everything the daemon persists. Implementations must be safe to call from several threads.

    A backend implements ``_read``, ``_write`` and ``close`` (see the module docstring); the
    methods below are the same for every backend.
    """

    # -- the backend interface
    @abstractmethod
    def _read(self, table: str, where: Mapping[str, Any]) -> List[Row]:
        """Rows of ``table`` whose columns equal ``where`` (a list or tuple: any of its items), in insertion order."""

    @abstractmethod
    def _write(self, table: str, key: Mapping[str, Any], update: Callable[[Optional[Row]], Optional[Row]]) -> bool:
        """Atomically: the row with the unique ``key`` (or None) -> ``update`` -> written unless None.

        A row that would break a unique key of the table is a StoreError; an exception raised by
        ``update`` leaves the table as it was and propagates."""

    @abstractmethod
    def close(self) -> None: ...

    def writable(self) -> bool:
        """False while the last write failed for want of room or access (``StoreUnavailable``)."""
        return True

    # -- records on top of rows
    def _find(self, kind: Type[R], **where: Any) -> List[R]:
        table = TABLES[kind]
        query = {
            k: ([_cell(table.name, k, x) for x in v] if isinstance(v, (list, tuple)) else _cell(table.name, k, v))
            for k, v in where.items()
        }
        records = [from_row(kind, row) for row in self._read(table.name, query)]
        if table.order:
            records.sort(key=lambda r: tuple(getattr(r, c) for c in table.order))
        return records

    def _one(self, kind: Type[R], **where: Any) -> Optional[R]:
        found = self._find(kind, **where)
        return found[0] if found else None

    def _update(self, kind: Type[R], key: Mapping[str, Any], update: Callable[[Optional[R]], Optional[R]]) -> bool:
        """``update`` gets the record (or None) and returns the one to write (or None)."""
        table = TABLES[kind]

        def on_row(row: Optional[Row]) -> Optional[Row]:
            new = update(None if row is None else from_row(kind, row))
            return None if new is None else to_row(new)

        return self._write(table.name, {k: _cell(table.name, k, v) for k, v in key.items()}, on_row)

    # -- devices
    def record_status(self, device_id: str, state: str, model: Optional[Dict[str, Any]], at: float) -> None:
        """Upsert a device's online state and the model it says it runs (None: the one it had)."""
        device_id, state = _text("device_id", device_id), _text("state", state)
        self._put_device(device_id, _enum(DeviceState, "state", state), model, at)

    def set_device_model(self, device_id: str, model: Dict[str, Any], at: float) -> None:
        """Record the model a device reported installed."""
        self._put_device(_text("device_id", device_id), None, model, at)

    def _put_device(
        self, device_id: str, state: Optional[DeviceState], model: Optional[Dict[str, Any]], at: float
    ) -> None:
        def update(d: Optional[DeviceRecord]) -> DeviceRecord:
            if d is None:
                return DeviceRecord(device_id, state or DeviceState.UNKNOWN, model, at, at)
            return dataclasses.replace(
                d, state=state or d.state, model=d.model if model is None else model, last_seen=at
            )

        self._update(DeviceRecord, {"device_id": device_id}, update)

    def get_device(self, device_id: str) -> Optional[DeviceRecord]:
        return self._one(DeviceRecord, device_id=device_id)

    def list_devices(self) -> List[DeviceRecord]:
        return self._find(DeviceRecord)

    # -- rounds
    def create_round(self, spec: NewRound) -> RoundRecord:
        """Insert a round in state PROBING; an existing id is a StoreError."""
        if spec.kind not in ROUND_KINDS or not spec.devices:
            raise StoreError(f"round {spec.round_id}: kind must be one of {ROUND_KINDS} with at least one device")
        now = time.time()
        new = RoundRecord(
            spec.round_id, spec.kind, tuple(spec.devices), RoundState.PROBING, dict(spec.params), {}, None, "", now, now
        )

        def insert(existing: Optional[RoundRecord]) -> RoundRecord:
            if existing is not None:
                raise StoreError(f"round {spec.round_id} already exists")
            return new

        self._update(RoundRecord, {"round_id": _text("round_id", spec.round_id)}, insert)
        return self.get_round(spec.round_id)

    def get_round(self, round_id: str) -> Optional[RoundRecord]:
        return self._one(RoundRecord, round_id=round_id)

    def list_rounds(self, states: Optional[Sequence[RoundState]] = None) -> List[RoundRecord]:
        """Rounds in creation order, optionally only those in ``states``."""
        return self._find(RoundRecord) if states is None else self._find(RoundRecord, state=list(states))

    def transition(
        self,
        round_id: str,
        expected: RoundState,
        target: RoundState,
        *,
        result: Optional[Dict[str, Any]] = None,
        deadline: Optional[float] = None,
        error: str = "",
    ) -> bool:
        """Move ``expected`` -> ``target`` if the round is still in ``expected`` (False otherwise);
        ``result`` is merged into the round's result. An illegal transition is a StoreError."""
        if target not in TRANSITIONS.get(expected, ()):
            raise StoreError(f"round {round_id}: illegal transition {expected.value} -> {target.value}")

        def move(r: Optional[RoundRecord]) -> Optional[RoundRecord]:
            if r is None or r.state != expected:
                return None
            return dataclasses.replace(
                r,
                state=target,
                result={**r.result, **(result or {})},
                error=error,
                deadline=r.deadline if deadline is None else deadline,
                updated=time.time(),
            )

        return self._update(RoundRecord, {"round_id": round_id}, move)

    def round_counts(self) -> Dict[str, int]:
        """Number of rounds per state (every state present)."""
        counts = {s.value: 0 for s in RoundState}
        for r in self.list_rounds():
            counts[r.state.value] += 1
        return counts

    # -- responses
    def add_response(self, response: ResponseRecord) -> bool:
        """Keep the first response of a (round, device); True if this one was new."""
        if response.kind not in RESPONSE_KINDS:
            raise StoreError(f"response kind must be one of {RESPONSE_KINDS}, got {clean(response.kind, 40)}")
        for name in ("round_id", "device_id", "message_id"):
            _text(name, getattr(response, name))
        record = dataclasses.replace(response, payload=bytes(response.payload))
        return self._update(
            ResponseRecord,
            {"round_id": response.round_id, "device_id": response.device_id},
            lambda existing: record if existing is None else None,
        )

    def responses(self, round_id: str) -> List[ResponseRecord]:
        return self._find(ResponseRecord, round_id=round_id)

    # -- artifacts
    def next_version(self, name: str) -> int:
        """1 + the highest version of artifacts called ``name`` (1 for the first)."""
        return 1 + max((a.version for a in self._find(ArtifactRecord, name=name)), default=0)

    def add_artifact(self, artifact: ArtifactRecord) -> ArtifactRecord:
        """Insert, or return the artifact the round already has (one per round)."""
        _int("version", artifact.version)
        _int("size", artifact.size)
        record = dataclasses.replace(
            artifact, manifest=bytes(artifact.manifest), created=artifact.created or time.time()
        )
        self._update(
            ArtifactRecord, {"round_id": artifact.round_id}, lambda existing: record if existing is None else None
        )
        return self.artifact_of_round(artifact.round_id)

    def get_artifact(self, artifact_id: str) -> Optional[ArtifactRecord]:
        return self._one(ArtifactRecord, artifact_id=artifact_id)

    def artifact_of_round(self, round_id: str) -> Optional[ArtifactRecord]:
        return self._one(ArtifactRecord, round_id=round_id)

    # -- deliveries
    def add_delivery(self, artifact_id: str, device_id: str, round_id: str, total_chunks: int) -> DeliveryRecord:
        """Insert a delivery in state ``sending`` at chunk 0, or return the existing one."""
        record = DeliveryRecord(
            artifact_id,
            device_id,
            round_id,
            DeliveryState.SENDING,
            0,
            _int("total_chunks", total_chunks),
            {},
            time.time(),
        )
        self._update(
            DeliveryRecord,
            {"artifact_id": artifact_id, "device_id": device_id},
            lambda existing: record if existing is None else None,
        )
        return self.get_delivery(artifact_id, device_id)

    def update_delivery(
        self,
        artifact_id: str,
        device_id: str,
        *,
        state: Optional[str] = None,
        next_chunk: Optional[int] = None,
        result: Optional[Dict[str, Any]] = None,
    ) -> bool:
        """Update a delivery still in progress; False if it is unknown or already final."""
        if next_chunk is not None:
            next_chunk = _int("next_chunk", next_chunk)
        new_state = None if state is None else _enum(DeliveryState, "state", _text("state", state))

        def update(d: Optional[DeliveryRecord]) -> Optional[DeliveryRecord]:
            if d is None or d.state.final:
                return None
            return dataclasses.replace(
                d,
                state=new_state or d.state,
                result={**d.result, **(result or {})},
                next_chunk=d.next_chunk if next_chunk is None else next_chunk,
                updated=time.time(),
            )

        return self._update(DeliveryRecord, {"artifact_id": artifact_id, "device_id": device_id}, update)

    def get_delivery(self, artifact_id: str, device_id: str) -> Optional[DeliveryRecord]:
        return self._one(DeliveryRecord, artifact_id=artifact_id, device_id=device_id)

    def deliveries(self, round_id: str) -> List[DeliveryRecord]:
        return self._find(DeliveryRecord, round_id=round_id)

    # -- jobs
    def start_job(self, job_id: str, round_id: str, kind: str) -> JobRecord:
        """Mark a job running (again): a restart after a crash increments ``attempt``."""
        now = time.time()

        def start(j: Optional[JobRecord]) -> JobRecord:
            if j is None:
                return JobRecord(job_id, round_id, kind, JobState.RUNNING, 1, 0, 0, "", {}, "", now, now)
            return dataclasses.replace(
                j, state=JobState.RUNNING, attempt=j.attempt + 1, done=0, total=0, note="", error="", updated=now
            )

        self._update(JobRecord, {"job_id": job_id}, start)
        return self.get_job(job_id)

    def job_progress(self, job_id: str, done: int, total: int, note: str = "") -> None:
        done, total = _int("done", done), _int("total", total)
        self._update(
            JobRecord,
            {"job_id": job_id},
            lambda j: (
                None if j is None else dataclasses.replace(j, done=done, total=total, note=note, updated=time.time())
            ),
        )

    def finish_job(self, job_id: str, state: str, result: Optional[Dict[str, Any]] = None, error: str = "") -> None:
        if state not in (JobState.DONE, JobState.FAILED):
            raise StoreError(f"job {job_id}: a finished job is 'done' or 'failed', not {state!r}")
        final = JobState(state)
        self._update(
            JobRecord,
            {"job_id": job_id},
            lambda j: (
                None
                if j is None
                else dataclasses.replace(j, state=final, result=dict(result or {}), error=error, updated=time.time())
            ),
        )

    def get_job(self, job_id: str) -> Optional[JobRecord]:
        return self._one(JobRecord, job_id=job_id)

    # -- traffic
    def add_traffic(self, device_id: str, round_id: str, direction: str, msg_type: str, nbytes: int) -> None:
        """Count one message of ``nbytes`` on the wire."""
        nbytes = _int("nbytes", nbytes, hi=1 << 40)  # one message; the sum stays far below 2**63
        for name, value in (("device_id", device_id), ("round_id", round_id), ("msg_type", msg_type)):
            _text(name, value)
        key = {"device_id": device_id, "round_id": round_id, "direction": direction, "msg_type": msg_type}

        def count(t: Optional[TrafficRow]) -> TrafficRow:
            if t is None:
                return TrafficRow(device_id, round_id, direction, msg_type, 1, nbytes)
            return dataclasses.replace(t, messages=t.messages + 1, bytes=t.bytes + nbytes)

        self._update(TrafficRow, key, count)

    def traffic(self, round_id: Optional[str] = None, device_id: Optional[str] = None) -> List[TrafficRow]:
        where = {k: v for k, v in (("round_id", round_id), ("device_id", device_id)) if v is not None}
        return self._find(TrafficRow, **where)
