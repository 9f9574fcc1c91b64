"""Read the ECOS metadata out of a TFLite flatbuffer, with no dependency at all.

A TFLite model keeps named metadata entries (``Model.metadata``: name + index into
``Model.buffers``). The cloud stores the artifact's JSON metadata there under ``ecos``, so a
``.tflite`` file describes itself exactly as an ``.onnx`` file does. The device may only have
``tflite-runtime``, which ships no schema, so this walks the few flatbuffer tables it needs by
hand (the layout is the flatbuffers wire format: little-endian offsets and vtables).
"""

from __future__ import annotations

import struct
from typing import Dict, Optional

from device_sdk.errors import ArtifactError

_FILE_ID = b"TFL3"
_MODEL_BUFFERS, _MODEL_METADATA = 4, 6  # field numbers in tflite's schema.fbs, table Model
_METADATA_NAME, _METADATA_BUFFER = 0, 1  # table Metadata
_BUFFER_DATA = 0  # table Buffer


class _Reader:
    """Bounds-checked access to flatbuffer tables, vectors and strings in ``data``."""

    def __init__(self, data: bytes, source: str):
        self.data, self.source = data, source

    def u32(self, pos: int) -> int:
        return self._unpack("<I", pos)

    def _unpack(self, fmt: str, pos: int) -> int:
        if pos < 0 or pos + struct.calcsize(fmt) > len(self.data):
            raise ArtifactError(f"{self.source}: truncated or corrupt TFLite flatbuffer")
        return struct.unpack_from(fmt, self.data, pos)[0]

    def field(self, table: int, number: int) -> Optional[int]:
        """Absolute position of field ``number`` of the table at ``table``, or None if absent."""
        vtable = table - self._unpack("<i", table)
        vt_size = self._unpack("<H", vtable)
        slot = 4 + 2 * number
        if slot + 2 > vt_size:
            return None
        offset = self._unpack("<H", vtable + slot)
        return table + offset if offset else None

    def deref(self, pos: int) -> int:
        return pos + self.u32(pos)

    def vector(self, pos: int) -> range:
        """Positions of the 4-byte elements of the vector referenced at ``pos``."""
        start = self.deref(pos)
        return range(start + 4, start + 4 + 4 * self.u32(start), 4)

    def blob(self, pos: int) -> bytes:
        start = self.deref(pos)
        n = self.u32(start)
        if start + 4 + n > len(self.data):
            raise ArtifactError(f"{self.source}: truncated or corrupt TFLite flatbuffer")
        return self.data[start + 4 : start + 4 + n]


def read_tflite_metadata(data: bytes, source: str = "model") -> Dict[str, bytes]:
    """All ``name -> bytes`` metadata entries of a TFLite model held in ``data``."""
    if len(data) < 8 or data[4:8] != _FILE_ID:
        raise ArtifactError(f"{source}: not a TFLite flatbuffer (no TFL3 identifier)")
    r = _Reader(data, source)
    model = r.deref(0)
    meta_field, buffers_field = r.field(model, _MODEL_METADATA), r.field(model, _MODEL_BUFFERS)
    if meta_field is None or buffers_field is None:
        return {}
    buffers = r.vector(buffers_field)
    out = {}
    for pos in r.vector(meta_field):
        entry = r.deref(pos)
        name_pos, index_pos = r.field(entry, _METADATA_NAME), r.field(entry, _METADATA_BUFFER)
        if name_pos is None or index_pos is None or r.u32(index_pos) >= len(buffers):
            continue
        data_pos = r.field(r.deref(buffers[r.u32(index_pos)]), _BUFFER_DATA)
        out[r.blob(name_pos).decode("utf-8", "replace")] = r.blob(data_pos) if data_pos is not None else b""
    return out
