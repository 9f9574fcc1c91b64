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
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from .errors import MessageError

MAGIC = b"ECOS"
FORMAT_VERSION = 1
PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 1 << 20
MAX_MESSAGE_BYTES = 64 << 20

_PREFIX = struct.Struct("<4sBI")
_DTYPES = {"float16": "<f2", "float32": "<f4", "float64": "<f8", "int8": "i1", "uint8": "u1", "int32": "<i4", "int64": "<i8"}


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
        table.append({"name": name, "dtype": dtype_name, "shape": list(arr.shape), "offset": offset, "nbytes": len(raw)})
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
    """Parse and verify a message; every defect is a ``MessageError`` naming ``source``."""
    header, payload = _split(data, source)
    msg_type = header.get("type")
    if expected_type is not None and msg_type != expected_type:
        raise MessageError(f"{source}: expected a {expected_type!r} message, got {msg_type!r}")
    if header.get("version") != PROTOCOL_VERSION:
        raise MessageError(f"{source}: protocol version {header.get('version')!r} is not supported (this is {PROTOCOL_VERSION})")
    arrays = _read_arrays(header.get("arrays"), payload, source)
    fields = {k: v for k, v in header.items() if k not in ("arrays", "payload_len", "payload_sha256")}
    return Envelope(str(msg_type), fields, arrays)


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
    try:
        header = json.loads(data[_PREFIX.size : _PREFIX.size + hlen].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError(f"{source}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise MessageError(f"{source}: header is not a JSON object")
    payload = data[_PREFIX.size + hlen :]
    if header.get("payload_len") != len(payload):
        raise MessageError(f"{source}: payload is {len(payload)} bytes, header says {header.get('payload_len')} (truncated?)")
    if hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
        raise MessageError(f"{source}: payload checksum mismatch (corrupted)")
    return header, payload


def _read_arrays(table: Any, payload: bytes, source: str) -> Dict[str, np.ndarray]:
    if not isinstance(table, list):
        raise MessageError(f"{source}: header has no array table")
    arrays = {}
    for entry in table:
        try:
            name, dtype, shape = str(entry["name"]), _DTYPES[entry["dtype"]], tuple(int(s) for s in entry["shape"])
            start, nbytes = int(entry["offset"]), int(entry["nbytes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise MessageError(f"{source}: malformed array entry {entry!r} ({exc})") from None
        if start < 0 or start + nbytes > len(payload) or int(np.prod(shape)) * np.dtype(dtype).itemsize != nbytes:
            raise MessageError(f"{source}: array {name!r} does not fit the payload")
        arrays[name] = np.frombuffer(payload, dtype=dtype, count=int(np.prod(shape)), offset=start).reshape(shape)
    return arrays


def require(env: Envelope, spec: Mapping[str, type | Tuple[type, ...]], source: str = "message") -> None:
    """Check that ``env.fields`` has each key of ``spec`` with a value of the given type(s)."""
    for key, types in spec.items():
        value = env.fields.get(key)
        if value is None or not isinstance(value, types) or isinstance(value, bool) and bool not in _as_tuple(types):
            raise MessageError(f"{source}: field {key!r} is missing or has the wrong type ({value!r})")


def _as_tuple(types: type | Tuple[type, ...]) -> Tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def read_file(path: str, expected_type: str | None = None) -> Envelope:
    """Read and decode a message file; a missing file is an ``InputError``."""
    from .errors import InputError

    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_MESSAGE_BYTES + 1)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    return decode(data, expected_type, source=str(path))
