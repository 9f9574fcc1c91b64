"""Make strings that came from a message (ids, topics, reasons) safe to write into a log.

A message can carry anything: a newline that forges a second log line, an ANSI escape that
repaints a terminal, a megabyte id that makes a megabyte log line. ``clean`` escapes every
character that is not printable (``repr``-style: ``\\n``, ``\\x1b``, ``\\u2028``, lone
surrogates too; a backslash stays as it is) and cuts the result to ``limit`` characters,
saying how long it was.
"""

from __future__ import annotations

from typing import Any

DEFAULT_LIMIT = 200
_SIMPLE = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(ch: str) -> str:
    if ch in _SIMPLE:
        return _SIMPLE[ch]
    if ch.isprintable():
        return ch
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def clean(value: Any, limit: int = DEFAULT_LIMIT) -> str:
    """``value`` as one printable line of at most about ``limit`` characters.

    Strings are escaped, not quoted (``clean("pi-1") == "pi-1"``); anything else is its
    ``repr`` (bytes keep their ``b'...'`` form). Only the first ``4 * limit`` characters are
    looked at, so a huge value costs no more than a short one.
    """
    if isinstance(value, str):
        text = value
    else:
        try:
            text = repr(value)
        except Exception:  # a hostile object's __repr__ must not break the log line  # noqa: BLE001
            text = f"<{type(value).__name__}>"
    head = text[: 4 * limit + 1]
    out = head if head.isprintable() else "".join(_escape_char(c) for c in head)
    if len(out) <= limit and len(head) == len(text):
        return out
    return f"{out[:limit]}...({len(text)} chars)"
