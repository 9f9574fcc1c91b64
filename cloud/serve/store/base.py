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
(``to_row``/``from_row`` in rows.py: JSON for dicts and tuples, enum values for states) sit above it, so
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
import time
from abc import ABC, abstractmethod
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Type

from cloud.errors import StoreError
from cloud.serve.store.records import (
    RESPONSE_KINDS,
    ROUND_KINDS,
    TRANSITIONS,
    ArtifactRecord,
    DeliveryRecord,
    DeliveryState,
    DeviceRecord,
    DeviceState,
    JobRecord,
    JobState,
    NewRound,
    ResponseRecord,
    RoundRecord,
    RoundState,
    TrafficRow,
)
from cloud.serve.store.rows import (
    TABLES,
    R,
    Row,
    _cell,
    _enum,
    _int,
    _text,
    from_row,
    to_row,
)
from device_sdk.logsafe import clean

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
