"""One way to define a protocol message: a frozen dataclass whose fields declare their own wire schema.

Each field of a :class:`Message` says, once, how it travels: :func:`wire_field` for a header (JSON)
field (its JSON types, bounds, pattern, enum, whether null or absence is allowed, its name on the
wire) and :func:`array_field` for a payload array (its dtype or codec, shape, bounds). From that one
definition the base class encodes (``to_bytes``), decodes (``from_bytes``/``from_envelope``) and
checks a message: every defect of a received message is a ``MessageError`` naming the field. What
one field cannot say (two fields that must agree) goes in the message's ``_check``.

Types and states travel as plain strings and are :class:`WireEnum` members in Python, so the v1
bytes are unchanged (tests/protocol/golden).
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from dataclasses import MISSING, dataclass
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Callable, ClassVar, Dict, Optional, Pattern, Tuple, Type, Union

import numpy as np

from device_sdk.errors import MessageError
from device_sdk.protocol import envelope as wire
from device_sdk.protocol.topics import MAX_ID_CHARS, is_valid_id

REQUIRED: Any = type("Required", (), {"__repr__": lambda self: "REQUIRED"})()  # a field that may not be absent


def new_id() -> str:
    return uuid.uuid4().hex


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class WireEnum(str, Enum):
    """A ``str`` enum whose members read as their wire value everywhere (``str()``, f-strings, JSON)."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__
    __repr__ = str.__repr__  # error messages quote the wire value

    @classmethod
    def values(cls) -> Tuple[str, ...]:
        return tuple(m.value for m in cls)


class MessageType(WireEnum):
    """The ``type`` of every message of protocol v1."""

    PROBE = "probe"
    SCORES = "scores"
    REFUSAL = "refusal"
    ARTIFACT_MANIFEST = "artifact_manifest"
    ARTIFACT_CHUNK = "artifact_chunk"
    ACK = "ack"
    INSTALLED = "installed"
    INSTALL_FAILED = "install_failed"
    STATUS = "status"
    KEY_UPDATE = "key_update"
    LABEL_QUERY = "label_query"
    LABEL_VOTES = "label_votes"


class Codec(WireEnum):
    """How a float matrix (probe centroids, label-query features) travels: as is, half, or int8 + row scale."""

    FLOAT16 = "float16"
    INT8 = "int8"
    FLOAT32 = "float32"


# ---- the schema of one field -----------------------------------------------------------------------


@dataclass(frozen=True)
class Wire:
    """How one header field travels and what a valid value is.

    ``types``: the JSON types accepted (``bool`` only when listed; floats must be finite).
    ``name``: its key on the wire when not the attribute's; ``a.b`` is key ``b`` of object ``a``.
    ``optional``: null is valid, and a missing key reads as None; ``omit_none`` also leaves a None off
    the wire (fields added after v1, so older messages keep their bytes). ``absent``: what a missing
    key reads as for a field that is not optional. ``lo``/``hi``: bounds of a number, or of the length
    of a string or list. ``pattern`` (fullmatch), ``enum`` and ``valid`` (a predicate, described by
    ``why``) further restrict a string or value; ``item`` is the schema of each list entry.
    ``to_wire``/``from_wire`` convert a non-null value on the way out/in; ``fill`` makes a value for
    an empty one when sent (a fresh id, the time).
    """

    types: Tuple[type, ...]
    name: Optional[str] = None
    optional: bool = False
    omit_none: bool = False
    absent: Any = REQUIRED
    lo: Optional[float] = None
    hi: Optional[float] = None
    pattern: Optional[Pattern[str]] = None
    enum: Optional[Type[WireEnum]] = None
    valid: Optional[Callable[[Any], bool]] = None
    why: str = ""
    item: Optional["Wire"] = None
    to_wire: Optional[Callable[[Any], Any]] = None
    from_wire: Optional[Callable[[Any], Any]] = None
    fill: Optional[Callable[[], Any]] = None

    def problem(self, value: Any) -> Optional[str]:
        """Why ``value`` (as on the wire) is not valid here, or None."""
        if value is None:
            return None if self.optional or self.omit_none else "is missing or null"
        if not _is_a(value, self.types):
            return f"is missing or has the wrong type ({value!r:.80})"
        if self.enum is not None and value not in self.enum.values():
            return f"{value!r:.40} is not one of {', '.join(self.enum.values())}"
        sized = isinstance(value, (str, list, bytes))
        size = len(value) if sized else value
        if self.lo is not None and size < self.lo or self.hi is not None and size > self.hi:
            limits = f"[{_n(self.lo)}, {_n(self.hi)}]"
            if sized:
                unit = "characters" if isinstance(value, str) else "entries"
                return f"has {len(value)} {unit}, outside the limits {limits}"
            return f"{value} is negative" if self.lo == 0 and value < 0 else f"{value} is outside {limits}"
        if self.pattern is not None and not (isinstance(value, str) and self.pattern.fullmatch(value)):
            return f"{value!r:.80} {self.why or 'does not match ' + self.pattern.pattern}"
        if self.valid is not None and not self.valid(value):
            return f"{value!r:.80} {self.why}"
        if self.item is not None:
            for i, entry in enumerate(value):
                why = self.item.problem(entry)
                if why is not None:
                    return f"entry {i}: {why}"
        return None


def _n(bound: Optional[float]) -> str:
    return "..." if bound is None else str(bound)


def _is_a(value: Any, types: Tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, float) and float in types:
        return math.isfinite(value)
    return isinstance(value, types)


def wire_field(*types: type, default: Any = MISSING, default_factory: Any = MISSING, **spec: Any) -> Any:
    """A dataclass field that travels in the header, with the schema :class:`Wire` ``(types, **spec)``."""
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata={"wire": Wire(tuple(types), **spec)}
    )


# ---- the schema of one payload array ---------------------------------------------------------------

Dim = Union[int, str, None]


@dataclass(frozen=True)
class Array:
    """How one payload array travels and what a valid one is.

    ``dtype``: its dtype on the wire; ``codec``: instead, the name of the field whose :class:`Codec`
    says how (``int8`` adds a per-row float32 ``scale`` array right after it). ``decoded``: the numpy
    dtype of the attribute, or ``bytes`` (a raw uint8 array), or ``float`` (a number travelling as a
    one-element array). ``shape``: per dimension an int, the name of an integer header field, or None
    (any); ``lo``/``hi`` bound the first dimension. ``optional``: may be absent (None). Values must
    be finite, and satisfy ``valid`` (described by ``why``) if given.
    """

    dtype: Optional[str] = None
    codec: Optional[str] = None
    decoded: str = "float32"
    shape: Tuple[Dim, ...] = (None,)
    lo: int = 0
    hi: Optional[int] = None
    optional: bool = False
    valid: Optional[Callable[[np.ndarray], bool]] = None
    why: str = ""

    def pack(self, name: str, value: Any, codec: Any) -> Dict[str, np.ndarray]:
        if self.decoded == "bytes":
            return {name: np.frombuffer(value, dtype=np.uint8)}
        if self.decoded == "float":
            return {name: np.asarray([value], dtype=self.dtype)}
        if self.codec is None:
            return {name: np.asarray(value, dtype=self.dtype)}
        c = np.asarray(value, dtype=np.float32)
        if codec == Codec.INT8:
            scale = np.maximum(np.abs(c).max(axis=1), 1e-12).astype(np.float32) / 127.0
            q = np.clip(np.rint(c / scale[:, None]), -127, 127).astype(np.int8)
            return {name: q, "scale": scale}
        if codec in (Codec.FLOAT16, Codec.FLOAT32):
            return {name: c.astype(np.float16) if codec == Codec.FLOAT16 else c}
        raise MessageError(f"unknown codec {codec!r} (use one of {', '.join(Codec.values())})")

    def unpack(self, name: str, arrays: Dict[str, np.ndarray], codec: Any, dims: Dict[str, int]) -> Tuple[Any, str]:
        """``(value, problem)`` of the array ``name``: the decoded value, or None and why it is not valid."""
        a = arrays.get(name)
        if a is None:
            return None, "" if self.optional else "is missing"
        if self.decoded == "bytes":
            if a.ndim != 1 or a.dtype != np.uint8:
                return None, "is not a 1-D uint8 array"
            return a.tobytes(), self._size_problem(len(a), "bytes")
        shape = tuple(dims.get(d, -1) if isinstance(d, str) else d for d in self.shape)
        if a.ndim != len(shape) or any(want is not None and got != want for got, want in zip(a.shape, shape)):
            return None, f"has shape {a.shape}, expected {tuple('n' if d is None else d for d in shape)}"
        if codec == Codec.INT8:
            scale = arrays.get("scale")
            if scale is None or scale.shape != (a.shape[0],):
                return None, "needs one scale per row (int8)"
            value = a.astype(np.float32) * scale.astype(np.float32)[:, None]
        else:
            value = a.astype(np.float32 if self.decoded == "float" else self.decoded)
        problem = self.problem(value) or self._size_problem(len(value), "rows")
        return (float(value[0]) if self.decoded == "float" else value), problem

    def send_problem(self, value: Any) -> str:
        """Why ``value`` (the attribute of a message being sent) is not valid here, or ``""``."""
        if self.decoded == "bytes":
            return self._size_problem(len(value), "bytes")
        a = np.asarray(value, dtype=float if self.decoded == "float" else None)
        if self.decoded != "float" and a.ndim != len(self.shape):
            return f"has {a.ndim} dimensions, expected {len(self.shape)}"
        return self.problem(a) or ("" if self.decoded == "float" else self._size_problem(a.shape[0], "rows"))

    def problem(self, value: np.ndarray) -> str:
        if not np.all(np.isfinite(value)):
            return "contains NaN or infinity"
        if self.valid is not None and not self.valid(value):
            return self.why
        return ""

    def _size_problem(self, n: int, unit: str) -> str:
        if n < self.lo or self.hi is not None and n > self.hi:
            return f"of {n} {unit} is outside the limits [{self.lo}, {_n(self.hi)}]"
        return ""


def array_field(default: Any = MISSING, **spec: Any) -> Any:
    """A dataclass field that travels as a payload array, with the schema :class:`Array` ``(**spec)``."""
    return dataclasses.field(default=default, metadata={"array": Array(**spec)})


# ---- the base class --------------------------------------------------------------------------------


class Message:
    """Base of every protocol message: a frozen dataclass whose fields carry their wire schema.

    ``TYPE`` is the message's :class:`MessageType`. ``DERIVED`` declares header fields computed from
    the message (properties such as ``k``), checked on receipt and used as array dimensions;
    ``CONSTANTS`` are header fields with a fixed value. ``CHECKED_ON_SEND``: ``to_bytes`` refuses an
    invalid message (False for the probe and scores, which v1 checks only where they are received).
    ``_check`` adds what involves several fields.
    """

    TYPE: ClassVar[MessageType]
    DERIVED: ClassVar[Dict[str, Wire]] = {}
    CONSTANTS: ClassVar[Dict[str, Any]] = {}
    CHECKED_ON_SEND: ClassVar[bool] = True

    # -- the schema, from the dataclass fields

    @classmethod
    def wire_fields(cls) -> Tuple[Tuple[str, Wire], ...]:
        """``(attribute, Wire)`` of every header field, in declaration order."""
        return tuple((f.name, f.metadata["wire"]) for f in dataclasses.fields(cls) if "wire" in f.metadata)

    @classmethod
    def array_fields(cls) -> Tuple[Tuple[str, Array], ...]:
        return tuple((f.name, f.metadata["array"]) for f in dataclasses.fields(cls) if "array" in f.metadata)

    # -- encoding

    def to_bytes(self) -> bytes:
        source = f"outgoing {self.TYPE}"
        fields: Dict[str, Any] = {}
        for key, value in self.CONSTANTS.items():
            _put(fields, key, value)
        for attr, spec in self.wire_fields():
            value = getattr(self, attr)
            if spec.fill is not None and not value:
                value = spec.fill()
            if value is None and spec.omit_none:
                continue
            if value is not None and spec.to_wire is not None:
                value = spec.to_wire(value)
            self._require_valid(spec.name or attr, spec, value, source)
            _put(fields, spec.name or attr, value)
        for key, spec in self.DERIVED.items():
            value = getattr(self, key)
            self._require_valid(key, spec, value, source)
            fields[key] = value
        arrays: Dict[str, np.ndarray] = {}
        for attr, spec in self.array_fields():
            value = getattr(self, attr)
            if value is None and spec.optional:
                continue
            if self.CHECKED_ON_SEND:
                _raise_if(spec.send_problem(value), source, self.TYPE, attr)
            arrays.update(spec.pack(attr, value, getattr(self, spec.codec) if spec.codec else None))
        if self.CHECKED_ON_SEND:
            self._check(source)
        return wire.encode(self.TYPE.value, fields, arrays)

    def _require_valid(self, key: str, spec: Wire, value: Any, source: str) -> None:
        if self.CHECKED_ON_SEND:
            _raise_if(spec.problem(value), source, self.TYPE, key)

    # -- decoding

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "") -> Any:
        """Decode and check ``data``; errors name ``source`` (default: the message type)."""
        source = source or cls.TYPE.value
        return cls.from_envelope(wire.decode(data, cls.TYPE.value, source), source)

    @classmethod
    def from_envelope(cls, env: wire.Envelope, source: str = "") -> Any:
        """The message in ``env``, every field checked against its schema; a defect is a ``MessageError``."""
        source = source or cls.TYPE.value
        values: Dict[str, Any] = {}
        for attr, spec in cls.wire_fields():
            key = spec.name or attr
            found, value = _get(env.fields, key, source, cls.TYPE)
            if not found and spec.absent is not REQUIRED:
                values[attr] = spec.absent
                continue
            _raise_if(spec.problem(value), source, cls.TYPE, key)
            if value is not None and spec.enum is not None:
                value = spec.enum(value)
            values[attr] = spec.from_wire(value) if value is not None and spec.from_wire is not None else value
        dims = {}
        for key, spec in cls.DERIVED.items():
            dims[key] = env.fields.get(key)
            _raise_if(spec.problem(dims[key]), source, cls.TYPE, key)
        for attr, spec in cls.array_fields():
            codec = values[spec.codec] if spec.codec else None
            values[attr], problem = spec.unpack(attr, env.arrays, codec, dims)
            _raise_if(problem, source, cls.TYPE, attr)
        msg = cls(**values)
        msg._check(source)
        return msg

    def _check(self, source: str) -> None:
        """What involves several fields; raises ``MessageError``."""


def _raise_if(problem: Optional[str], source: str, msg_type: Any, key: str) -> None:
    if problem:
        raise MessageError(f"{source}: {msg_type} field {key!r} {problem}")


def _get(fields: Dict[str, Any], key: str, source: str, msg_type: Any) -> Tuple[bool, Any]:
    """``(found, value)`` of ``key`` (``a.b``: key ``b`` of the object under ``a``)."""
    *parents, last = key.split(".")
    where = fields
    for i, parent in enumerate(parents):
        where = where.get(parent)
        if not isinstance(where, dict):
            _raise_if(f"is missing or not an object ({where!r:.80})", source, msg_type, ".".join(parents[: i + 1]))
    return last in where, where.get(last)


def _put(fields: Dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for parent in parents:
        fields = fields.setdefault(parent, {})
    fields[last] = value


def require(ok: bool, source: str, why: str) -> None:
    """A ``MessageError`` ``"{source}: {why}"`` unless ``ok`` (for the checks of ``_check``)."""
    if not ok:
        raise MessageError(f"{source}: {why}")


# ---- fields many messages share --------------------------------------------------------------------

_ID_WHY = "is not a valid id: 1-64 of A-Z a-z 0-9 _ . - (not '.' or '..')"


def id_field(**spec: Any) -> Any:
    """The message's own ``id`` (1-128 characters; a fresh one by default)."""
    return wire_field(str, default_factory=new_id, lo=1, hi=MAX_ID_CHARS, **spec)


def name_id_field(**spec: Any) -> Any:
    """A device or artifact id: it names a topic or a folder (:func:`~device_sdk.protocol.topics.is_valid_id`)."""
    return wire_field(str, valid=is_valid_id, why=_ID_WHY, **spec)
