"""The wire format shared by files (offline mode) and MQTT payloads.

One message = ``MAGIC | u8 format version | u32 header length | header JSON | payload``.
The header is compact UTF-8 JSON: the message ``type``, the protocol ``version``, an ``id``,
typed fields, and a table of arrays (name, dtype, shape, offset) stored as raw little-endian
bytes in the payload. The header also holds the payload's length and sha256, so a truncated or
corrupted file is detected before any field is trusted. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple, Type

import numpy as np

from device_sdk.errors import EcosError, MessageError
from device_sdk.logsafe import clean

MAGIC = b"ECOS"
FORMAT_VERSION = 1
PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 1 << 20
MAX_MESSAGE_BYTES = 64 << 20
MAX_JSON_DEPTH = 32  # nesting of any JSON we read (a header, a ledger, a state file, artifact metadata)
MAX_JSON_INT = 2**53  # larger integers are refused: they fit neither a float exactly nor every SQLite column
MAX_INT_DIGITS = 17  # len(str(-2**53)); longer digit strings are refused before int() sees them
MAX_STRING_CHARS = 1 << 16  # any one JSON string or key
MAX_TYPE_CHARS = 64  # a message type, an array name
MAX_ARRAYS = 64
MAX_NDIM = 8

_PREFIX = struct.Struct("<4sBI")
_DTYPES = {
    "float16": "<f2",
    "float32": "<f4",
    "float64": "<f8",
    "int8": "i1",
    "uint8": "u1",
    "int32": "<i4",
    "int64": "<i8",
}


@dataclass
class Envelope:
    """A decoded message: its JSON fields and its named numpy arrays."""

    type: str
    fields: Dict[str, Any]
    arrays: Dict[str, np.ndarray] = field(default_factory=dict)


def encode(msg_type: str, fields: Mapping[str, Any], arrays: Mapping[str, np.ndarray] = ()) -> bytes:
    """Serialise a message; arrays are written as little-endian bytes in a fixed order."""
    table, chunks, offset = [], [], 0
    for name, arr in dict(arrays).items():
        arr = np.asarray(arr)
        dtype_name = arr.dtype.name
        if dtype_name not in _DTYPES:
            raise MessageError(f"array {name!r}: dtype {dtype_name} cannot go on the wire")
        raw = np.ascontiguousarray(arr, dtype=_DTYPES[dtype_name]).tobytes()
        table.append(
            {"name": name, "dtype": dtype_name, "shape": list(arr.shape), "offset": offset, "nbytes": len(raw)}
        )
        chunks.append(raw)
        offset += len(raw)
    payload = b"".join(chunks)
    header = {
        "type": msg_type,
        "version": PROTOCOL_VERSION,
        **dict(fields),
        "arrays": table,
        "payload_len": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    hbytes = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(hbytes)) + hbytes + payload


def decode(data: bytes, expected_type: str | None = None, source: str = "message") -> Envelope:
    """Parse and verify a message; every defect is a ``MessageError`` naming ``source``.

    Total: any bytes give an ``Envelope`` or a ``MessageError``, never another exception. The
    header JSON is bounded (see :func:`parse_json`), the array table is checked entry by entry
    (shapes are lists of non-negative integers whose product must fit the payload).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError(f"{source}: a message is bytes, not {type(data).__name__}")
    header, payload = _split(bytes(data), source)
    msg_type = header.get("type")
    if not isinstance(msg_type, str) or not 0 < len(msg_type) <= MAX_TYPE_CHARS:
        raise MessageError(f"{source}: message type {short(msg_type)} is not a string of 1-{MAX_TYPE_CHARS} characters")
    if expected_type is not None and msg_type != expected_type:
        raise MessageError(f"{source}: expected a {expected_type!r} message, got {short(msg_type)}")
    version = header.get("version")
    if not _is_int(version) or version != PROTOCOL_VERSION:
        raise MessageError(f"{source}: protocol version {short(version)} is not supported (this is {PROTOCOL_VERSION})")
    arrays = _read_arrays(header.get("arrays"), payload, source)
    fields = {k: v for k, v in header.items() if k not in ("arrays", "payload_len", "payload_sha256")}
    return Envelope(msg_type, fields, arrays)


def _split(data: bytes, source: str) -> Tuple[Dict[str, Any], bytes]:
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(f"{source}: {len(data)} bytes is over the {MAX_MESSAGE_BYTES}-byte message limit")
    if len(data) < _PREFIX.size or data[:4] != MAGIC:
        raise MessageError(f"{source}: not an ECOS message (bad magic or too short)")
    _, fmt, hlen = _PREFIX.unpack_from(data)
    if fmt != FORMAT_VERSION:
        raise MessageError(f"{source}: wire format {fmt} is not supported (this is {FORMAT_VERSION})")
    if hlen > MAX_HEADER_BYTES or _PREFIX.size + hlen > len(data):
        raise MessageError(f"{source}: truncated header")
    header = parse_json(data[_PREFIX.size : _PREFIX.size + hlen], f"{source}: header")
    if not isinstance(header, dict):
        raise MessageError(f"{source}: header is not a JSON object")
    payload = data[_PREFIX.size + hlen :]
    payload_len = header.get("payload_len")
    if not _is_int(payload_len) or payload_len != len(payload):
        raise MessageError(f"{source}: payload is {len(payload)} bytes, header says {short(payload_len)} (truncated?)")
    if hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
        raise MessageError(f"{source}: payload checksum mismatch (corrupted)")
    return header, payload


def _read_arrays(table: Any, payload: bytes, source: str) -> Dict[str, np.ndarray]:
    if not isinstance(table, list):
        raise MessageError(f"{source}: header has no array table")
    if len(table) > MAX_ARRAYS:
        raise MessageError(f"{source}: {len(table)} arrays (limit {MAX_ARRAYS})")
    arrays: Dict[str, np.ndarray] = {}
    for i, entry in enumerate(table):
        name, dtype, shape, start, nbytes = _array_entry(entry, i, source)
        if name in arrays:
            raise MessageError(f"{source}: array {short(name)} appears twice")
        count = _bounded_product(shape, len(payload) // dtype.itemsize)
        if count is None or count * dtype.itemsize != nbytes or start + nbytes > len(payload):
            raise MessageError(f"{source}: array {short(name)} does not fit the payload")
        arrays[name] = np.frombuffer(payload, dtype=dtype, count=count, offset=start).reshape(shape)
    return arrays


def _array_entry(entry: Any, i: int, source: str) -> Tuple[str, np.dtype, Tuple[int, ...], int, int]:
    """``(name, dtype, shape, offset, nbytes)`` of one array table entry, each checked."""

    def bad(why: str) -> MessageError:
        return MessageError(f"{source}: malformed array entry #{i}: {why}")

    if not isinstance(entry, dict):
        raise bad(f"not an object ({short(entry)})")
    name, dtype, shape = entry.get("name"), entry.get("dtype"), entry.get("shape")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_TYPE_CHARS:
        raise bad(f"name {short(name)} is not a string of 1-{MAX_TYPE_CHARS} characters")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise bad(f"dtype {short(dtype)} is not one of {', '.join(_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise bad(f"shape {short(shape)} is not a list of non-negative integers")
    if len(shape) > MAX_NDIM:
        raise bad(f"{len(shape)} dimensions (limit {MAX_NDIM})")
    start, nbytes = entry.get("offset"), entry.get("nbytes")
    if not (_is_int(start) and start >= 0 and _is_int(nbytes) and nbytes >= 0):
        raise bad(f"offset {short(start)} and nbytes {short(nbytes)} must be non-negative integers")
    return name, np.dtype(_DTYPES[dtype]), tuple(shape), start, nbytes


def _bounded_product(shape: Tuple[int, ...], limit: int) -> Optional[int]:
    """The product of ``shape`` (Python integers: no wrap-around), or None once it exceeds ``limit``."""
    if 0 in shape:
        return 0
    count = 1
    for s in shape:
        count *= s
        if count > limit:
            return None
    return count


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for an error message, escaped and cut to about ``limit`` characters."""
    return clean(repr(value[: 4 * limit]) if isinstance(value, str) else value, limit)


# ---- bounded JSON --------------------------------------------------------------------------------


class _Refused(ValueError):
    """A JSON value outside the bounds (raised by the parse hooks, reported as the caller's error)."""


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)  # a JSON string (or an unterminated one)
_NOT_BRACKETS = bytes(c for c in range(256) if chr(c) not in "[]{}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def json_too_deep(text: str, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """True when ``text`` nests arrays/objects deeper than ``max_depth`` (or its brackets do not balance).

    Linear and recursion-free, run before ``json.loads`` (whose C parser recurses once per level):
    strings are dropped, then everything but brackets, and the running depth of what is left
    (``+1`` per opening, ``-1`` per closing bracket) must stay within ``[0, max_depth]`` and end at 0.
    """
    if text.count("[") + text.count("{") <= max_depth:
        return False
    brackets = np.frombuffer(
        _STRING.sub("", text).encode("utf-8", "surrogatepass").translate(None, _NOT_BRACKETS), dtype=np.uint8
    )
    if brackets.size == 0:
        return False
    depth = np.cumsum(np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1), dtype=np.int64)
    return bool(depth.max() > max_depth or depth.min() < 0 or depth[-1] != 0)  # too deep, or unbalanced


def read_json_file(path: Any, source: str, error: Type[EcosError] = MessageError) -> Any:
    """Read and :func:`parse_json` a state file; an unreadable file is ``error`` naming ``source``."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise error(f"{source} is unreadable ({exc.strerror})") from None
    return parse_json(raw, source, error)


def _parse_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:  # before int(): converting a long digit string costs quadratic time
        raise _Refused(f"an integer of {len(text)} digits (limit: |n| <= 2**53)")
    return int(text)


def parse_json(
    data: Any,
    source: str = "json",
    error: Type[EcosError] = MessageError,
    *,
    max_depth: int = MAX_JSON_DEPTH,
    max_string: int = MAX_STRING_CHARS,
) -> Any:
    """``json.loads`` for untrusted text or UTF-8 bytes; every defect is ``error`` naming ``source``.

    Nesting deeper than ``max_depth`` is refused before parsing; integers must satisfy
    ``|n| <= 2**53``, numbers be finite (no NaN/Infinity), strings and keys hold at most
    ``max_string`` characters and no lone surrogate (which no UTF-8 encoder, SQLite included,
    accepts).
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{source}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not isinstance(data, str):
        raise error(f"{source}: expected JSON text, got {type(data).__name__}")
    if json_too_deep(data, max_depth):
        raise error(f"{source}: JSON nested deeper than {max_depth} levels (or unbalanced brackets)")
    try:
        value = json.loads(data, parse_int=_parse_int)
    except _Refused as exc:
        raise error(f"{source}: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise error(f"{source}: not valid JSON ({clean(str(exc), 120)})") from None
    _check_values(value, source, error, max_string)
    return value


def _check_values(value: Any, source: str, error: Type[EcosError], max_string: int) -> None:
    """Walk the parsed value without recursion; the error names the top-level key it is under."""
    stack = [(value, None)]
    while stack:
        item, top = stack.pop()
        if isinstance(item, dict):
            for key, sub in item.items():
                stack.append((key, key if top is None else top))
                stack.append((sub, key if top is None else top))
        elif isinstance(item, list):
            stack.extend((sub, top) for sub in item)
        else:
            why = _why_refused(item, max_string)
            if why is not None:
                where = "" if top is None else f" (under {short(top, 40)})"
                raise error(f"{source}: {why}{where}")


def _why_refused(item: Any, max_string: int) -> Optional[str]:
    if isinstance(item, str):
        if len(item) > max_string:
            return f"a string of {len(item)} characters (limit {max_string})"
        if _SURROGATE.search(item):
            return f"a string holds a lone surrogate: {short(item, 40)}"
    elif isinstance(item, float):
        if not math.isfinite(item):
            return f"{item} is not a finite number"
    elif isinstance(item, int) and not isinstance(item, bool) and abs(item) > MAX_JSON_INT:
        return f"integer {item} is out of range (limit: |n| <= 2**53)"
    return None


def require(env: Envelope, spec: Mapping[str, type | Tuple[type, ...]], source: str = "message") -> None:
    """Check that ``env.fields`` has each key of ``spec`` with a value of the given type(s)."""
    for key, types in spec.items():
        value = env.fields.get(key)
        if value is None or not isinstance(value, types) or isinstance(value, bool) and bool not in _as_tuple(types):
            raise MessageError(f"{source}: field {key!r} is missing or has the wrong type ({short(value)})")


def _as_tuple(types: type | Tuple[type, ...]) -> Tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def read_file(path: str, expected_type: str | None = None) -> Envelope:
    """Read and decode a message file; a missing file is an ``InputError``."""
    from device_sdk.errors import InputError

    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_MESSAGE_BYTES + 1)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    return decode(data, expected_type, source=str(path))
