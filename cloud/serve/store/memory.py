"""A backend that keeps everything in this process's memory, behind one lock.

Nothing survives the process: for tests, trials and as the proof that ``Store``'s interface is
all a backend needs (it passes the same contract suite as SQLite). Rows are stored as the
plain values ``to_row`` makes (JSON text for dicts), so what comes back is a copy with the same
types SQLite would give, never an object a caller could change behind the store's back.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from cloud.errors import StoreError
from cloud.serve.store.base import Store
from cloud.serve.store.rows import TABLE_NAMES, Row


def _matches(row: Row, where: Mapping[str, Any]) -> bool:
    for column, value in where.items():
        if isinstance(value, (list, tuple)):
            if row[column] not in value:
                return False
        elif row[column] != value:
            return False
    return True


class MemoryStore(Store):
    """One dict per table (primary key -> row), in insertion order; every operation holds one lock."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._tables: Dict[str, Dict[Tuple[Any, ...], Row]] = {name: {} for name in TABLE_NAMES}

    def _read(self, table: str, where: Mapping[str, Any]) -> List[Row]:
        with self._lock:
            return [dict(row) for row in self._tables[table].values() if _matches(row, where)]

    def _write(self, table: str, key: Mapping[str, Any], update: Callable[[Optional[Row]], Optional[Row]]) -> bool:
        spec = TABLE_NAMES[table]
        with self._lock:
            rows = self._tables[table]
            if tuple(key) == spec.keys[0]:
                found_key: Optional[Tuple[Any, ...]] = tuple(key.values())
                if found_key not in rows:
                    found_key = None
            else:
                found_key = next((k for k, row in rows.items() if _matches(row, key)), None)
            new = update(None if found_key is None else dict(rows[found_key]))
            if new is None:
                return False
            primary = tuple(new[c] for c in spec.keys[0])
            clash = primary != found_key and primary in rows  # what a database's UNIQUE constraints refuse
            for unique in spec.keys[1:]:
                values = tuple(new[c] for c in unique)
                clash = clash or any(
                    k != found_key and tuple(row[c] for c in unique) == values for k, row in rows.items()
                )
            if clash:
                raise StoreError(f"{table}: a row with the same unique key exists already")
            if found_key is not None and found_key != primary:
                del rows[found_key]
            rows[primary] = dict(new)
            return True

    def close(self) -> None:
        pass
