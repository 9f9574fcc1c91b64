"""Structured log lines for the daemon: one event name plus fields, as key=value or JSON.

A daemon's log is read by machines (Loki, Elasticsearch, ``jq``) as often as by people, so
every line the daemon writes about rounds, messages and jobs is an event with named fields:

    2026-11-24T23:50:01Z INFO ecos.daemon event=round_state round=3f2a... state=collecting
    {"ts": "...", "level": "INFO", "logger": "ecos.daemon", "event": "round_state", "round": "3f2a...", ...}

Lines from other loggers (paho transport, training epochs) pass through with their message.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Dict

FIELDS_ATTR = "ecos_fields"


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``event`` with ``fields``; the message text is the key=value form for plain handlers."""
    if logger.isEnabledFor(level):
        record_fields = {"event": event, **fields}
        logger.log(level, "%s", _kv(record_fields), extra={FIELDS_ATTR: record_fields})


def _kv(fields: Dict[str, Any]) -> str:
    return " ".join(f"{k}={_kv_value(v)}" for k, v in fields.items())


def _kv_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    # quoted (JSON escapes) whenever it could split the line or fake a field: a space, '"', '=', any control char
    return json.dumps(text) if (not text or not text.isprintable() or any(c in text for c in ' "=')) else text


class StructuredFormatter(logging.Formatter):
    """``kv``: timestamp, level, logger, then the event's fields; ``json``: one object per line."""

    def __init__(self, style: str = "kv"):
        super().__init__()
        if style not in ("kv", "json"):
            raise ValueError(f"log style must be 'kv' or 'json', got {style!r}")
        self.style_name = style

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        fields = getattr(record, FIELDS_ATTR, None)
        exc = self.formatException(record.exc_info) if record.exc_info else None
        if self.style_name == "kv":
            line = f"{ts} {record.levelname} {record.name} {record.getMessage()}"
            return line if exc is None else f"{line}\n{exc}"
        body = dict(fields) if fields is not None else {"msg": record.getMessage()}
        if exc is not None:
            body["exc"] = exc
        return json.dumps({"ts": ts, "level": record.levelname, "logger": record.name, **body}, default=str)


def setup_structured_logging(style: str = "kv", verbose: bool = False, quiet: bool = False) -> None:
    """Root logger -> stderr through ``StructuredFormatter`` (replaces earlier handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(StructuredFormatter(style))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
