"""ECOS over MQTT, protocol version 1: topic names, ids, and the bounds of every field.

Topics live under a versioned root, one inbox (cloud -> device) and one outbox (device -> cloud)
per device, so a broker ACL can confine a device to its own topics. The bounds below are checked
on receipt, so nothing larger reaches the store (SQLite holds 64-bit integers), a log line or an
allocation. The exact rules are written down in docs/protocol.md.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Tuple

from device_sdk.errors import UsageError

ROOT = "ecos/v1"
CLOUD_STATUS = f"{ROOT}/cloud/status"
CLOUD_SUBSCRIPTIONS = (f"{ROOT}/dev/+/out", f"{ROOT}/dev/+/status")

MAX_PAYLOAD_BYTES = 4 << 20  # the largest MQTT payload either side decodes
DEFAULT_CHUNK_SIZE = 64 << 10
MIN_CHUNK_SIZE = 1 << 10
MAX_CHUNK_SIZE = 192 << 10  # a chunk message stays under a 256 KB broker packet limit
MAX_CHUNKS = 1 << 31  # chunk index and next_chunk are below this
MAX_VERSION = (1 << 31) - 1
MAX_ARTIFACT_BYTES = 1 << 32
MAX_COUNT = (1 << 31) - 1  # n_eval, k
MAX_ID_CHARS = 128  # message ids, probe ids, hashes named in a message
MAX_NAME_CHARS = 128
MAX_CODE_CHARS = 64
MAX_REASON_CHARS = 2000
MAX_REF_KEYS = 8
MAX_TARGETS = 4096  # devices (or fleets) one manifest may name
MAX_TRUST_KEYS = 64  # public keys in a key update, key ids in a status
MAX_REVOKED = 1024  # key ids a key update may revoke
MAX_ENCODERS = 8  # encoder artifacts one probe may name (ONNX, TFLite, ... of the same encoder)
FLEET_PREFIX = "fleet:"  # a manifest target "fleet:<id>" is every device configured with that fleet id

HEX64 = re.compile(r"[0-9a-f]{64}")
CODE = re.compile(r"[A-Za-z0-9_.-]{1,%d}" % MAX_CODE_CHARS)
PROBE_ID = re.compile(r"[\x21-\x7e]{1,%d}" % MAX_ID_CHARS)  # names a round and a ledger entry: no control characters
_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def is_valid_id(value: Any) -> bool:
    """Device and artifact ids: ``[A-Za-z0-9_.-]{1,64}``, and not ``.``/``..`` (they name folders)."""
    return isinstance(value, str) and bool(_ID_RE.fullmatch(value)) and value not in (".", "..")


def check_device_id(device_id: Any) -> str:
    if not is_valid_id(device_id):
        raise UsageError(f"device id {device_id!r} is invalid: use 1-64 of A-Z a-z 0-9 _ . - (not '.' or '..')")
    return device_id


def inbox(device_id: str) -> str:
    """Cloud -> device: probes, manifests and chunks for this device."""
    return f"{ROOT}/dev/{check_device_id(device_id)}/in"


def outbox(device_id: str) -> str:
    """Device -> cloud: scores, refusals, acks and install reports of this device."""
    return f"{ROOT}/dev/{check_device_id(device_id)}/out"


def device_status(device_id: str) -> str:
    """Retained ``status`` of this device: ``online`` on connect, ``offline`` as its last will."""
    return f"{ROOT}/dev/{check_device_id(device_id)}/status"


def parse_topic(topic: str) -> Optional[Tuple[str, str]]:
    """``(device_id, channel)`` of a per-device topic (channel ``in``/``out``/``status``), else None."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != f"{ROOT}/dev" or parts[4] not in ("in", "out", "status"):
        return None
    return (parts[3], parts[4]) if is_valid_id(parts[3]) else None


def clip_reason(text: str) -> str:
    """A refusal or install-failure reason cut to what the protocol carries (``MAX_REASON_CHARS``)."""
    suffix = "... (truncated)"
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - len(suffix)] + suffix


__all__ = [
    "CLOUD_STATUS",
    "CLOUD_SUBSCRIPTIONS",
    "DEFAULT_CHUNK_SIZE",
    "FLEET_PREFIX",
    "MAX_ARTIFACT_BYTES",
    "MAX_CHUNKS",
    "MAX_CHUNK_SIZE",
    "MAX_CODE_CHARS",
    "MAX_COUNT",
    "MAX_ENCODERS",
    "MAX_ID_CHARS",
    "MAX_NAME_CHARS",
    "MAX_PAYLOAD_BYTES",
    "MAX_REASON_CHARS",
    "MAX_REF_KEYS",
    "MAX_REVOKED",
    "MAX_TARGETS",
    "MAX_TRUST_KEYS",
    "MAX_VERSION",
    "MIN_CHUNK_SIZE",
    "ROOT",
    "check_device_id",
    "clip_reason",
    "device_status",
    "inbox",
    "is_valid_id",
    "outbox",
    "parse_topic",
]
