"""The cloud's durable state: devices, rounds, responses, artifacts, deliveries, jobs, traffic.

``Store`` (base.py) is the interface the daemon programs against, with its records and states;
backends: ``SqliteStore`` (sqlite.py, one file, WAL mode: what the daemon runs on) and
``MemoryStore`` (memory.py, this process only: tests and trials). ``open_store`` picks one by
name (``[store] backend`` in cloud.toml), URL or path. A new backend (PostgreSQL, say)
implements ``_read``, ``_write`` and ``close``, registers itself in ``BACKENDS`` and passes
tests/serve/test_store_contract.py.
"""

from __future__ import annotations

from typing import Any, Callable, Union

from cloud.serve.store.base import Store
from cloud.serve.store.memory import MemoryStore
from cloud.serve.store.records import (
    DELIVERY_FINAL,
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
    ResponseKind,
    ResponseRecord,
    RoundKind,
    RoundRecord,
    RoundState,
    StrEnum,
    TrafficRow,
)
from cloud.serve.store.rows import TABLES
from cloud.serve.store.sqlite import SCHEMA_VERSION, SqliteStore
from device_sdk.registry import Registry

__all__ = [
    "BACKENDS",
    "DELIVERY_FINAL",
    "RESPONSE_KINDS",
    "ROUND_KINDS",
    "SCHEMA_VERSION",
    "TABLES",
    "TRANSITIONS",
    "ArtifactRecord",
    "DeliveryRecord",
    "DeliveryState",
    "DeviceRecord",
    "DeviceState",
    "JobRecord",
    "JobState",
    "MemoryStore",
    "NewRound",
    "ResponseKind",
    "ResponseRecord",
    "RoundKind",
    "RoundRecord",
    "RoundState",
    "SqliteStore",
    "Store",
    "StrEnum",
    "TrafficRow",
    "open_store",
]

# backend name -> factory(location): the database path for SQLite, ignored by the memory backend
BACKENDS: Registry[Callable[[str], Store]] = Registry("store backend")
BACKENDS.register("sqlite", SqliteStore)
BACKENDS.register("memory", lambda location="": MemoryStore())


def open_store(where: Union[str, Any]) -> Store:
    """The store that ``where`` names.

    * a ``StoreConfig`` (anything with ``backend`` and ``database``): that backend, on that database;
    * ``"memory:"`` or ``"memory://"``: a new in-memory store;
    * ``"sqlite:///path/to/ecos.db"`` or ``"sqlite://relative.db"``: SQLite on that file;
    * any other string: an SQLite database path (``":memory:"``: a private in-memory SQLite database).

    An unknown backend is a UsageError that lists the known ones.
    """
    if not isinstance(where, str):
        return BACKENDS.get(getattr(where, "backend", "sqlite"))(where.database)
    scheme, sep, rest = where.partition(":")
    if sep and scheme in BACKENDS and scheme != "":
        return BACKENDS.get(scheme)(rest[2:] if rest.startswith("//") else rest)
    return BACKENDS.get("sqlite")(where)
