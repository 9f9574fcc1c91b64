"""Records as rows: the tables a backend stores, the checks every value passes, and the codecs
between records and rows of plain values (JSON text for dicts and tuples, states as their values)."""

from __future__ import annotations

import dataclasses
import json
import numbers
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any, Dict, Mapping, Tuple, Type, TypeVar

from cloud.errors import StoreError
from cloud.serve.store.records import (
    ArtifactRecord,
    DeliveryRecord,
    DeliveryState,
    DeviceRecord,
    DeviceState,
    JobRecord,
    JobState,
    ResponseRecord,
    RoundRecord,
    RoundState,
    TrafficRow,
)
from device_sdk.logsafe import clean

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
