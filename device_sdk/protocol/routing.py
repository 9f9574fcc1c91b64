"""Which message may arrive where: decoding a payload with the routing rules of protocol v1.

Every payload is checked against its message's schema on receipt, and every defect (unknown type,
wrong field type, a device id that is not the topic's, an oversized payload, a message in the
wrong direction) is a ``MessageError`` that the receiver logs and drops (docs/protocol.md).
"""

from __future__ import annotations

from typing import Any, Mapping, Tuple, Type

from device_sdk.errors import MessageError
from device_sdk.protocol import envelope as wire
from device_sdk.protocol.control import KeyUpdate, Status
from device_sdk.protocol.delivery import Ack, ArtifactChunk, ArtifactManifest, Installed, InstallFailed
from device_sdk.protocol.labels import LabelQuery, LabelVotes
from device_sdk.protocol.round import Probe, Refusal, Scores
from device_sdk.protocol.schema import Message
from device_sdk.protocol.topics import MAX_PAYLOAD_BYTES, inbox, parse_topic


def _by_type(*classes: Type[Message]) -> Mapping[str, Type[Message]]:
    return {cls.TYPE: cls for cls in classes}


CLOUD_TO_DEVICE = _by_type(Probe, ArtifactManifest, ArtifactChunk, KeyUpdate, LabelQuery)
DEVICE_TO_CLOUD = _by_type(Scores, Refusal, Ack, Installed, InstallFailed, Status, LabelVotes)
ALL_TYPES = {**CLOUD_TO_DEVICE, **DEVICE_TO_CLOUD}
_OUTBOX = {t: cls for t, cls in DEVICE_TO_CLOUD.items() if cls is not Status}
_STATUS = _by_type(Status)


def decode_message(payload: bytes, source: str = "message", allowed: Mapping[str, Type[Any]] = ALL_TYPES) -> Any:
    """Decode one payload into its message class; oversize, unknown or unexpected -> ``MessageError``."""
    if not isinstance(payload, (bytes, bytearray)):
        raise MessageError(f"{source}: payload is {type(payload).__name__}, not bytes")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise MessageError(f"{source}: {len(payload)} bytes is over the {MAX_PAYLOAD_BYTES}-byte payload limit")
    env = wire.decode(bytes(payload), None, source)
    cls = allowed.get(env.type)
    if cls is None:
        raise MessageError(f"{source}: message type {env.type!r:.40} is not accepted here")
    return cls.from_envelope(env, source)


def check_probe(probe: Probe, source: str = "probe") -> Probe:
    """``probe`` if a device would accept it (what :func:`decode_message` checks), else ``MessageError``."""
    Probe.from_bytes(probe.to_bytes(), source)
    return probe


def check_scores(scores: Scores, source: str = "scores") -> Scores:
    """``scores`` if the cloud would accept them (what :func:`decode_message` checks), else ``MessageError``."""
    Scores.from_bytes(scores.to_bytes(), source)
    return scores


def decode_for_device(device_id: str, topic: str, payload: bytes) -> Any:
    """A message on this device's inbox: a probe, an artifact manifest or chunk, a key update, a label query."""
    if topic != inbox(device_id):
        raise MessageError(f"message on {topic!r:.100} is not for device {device_id}")
    return decode_message(payload, topic, CLOUD_TO_DEVICE)


def decode_from_device(topic: str, payload: bytes) -> Tuple[str, Any]:
    """``(device_id, message)`` from a device's outbox or status topic.

    The message's ``device_id`` must be the topic's: a device that publishes on another
    device's topic (or forges another id on its own) achieves nothing but a log line.
    """
    parsed = parse_topic(topic)
    if parsed is None or parsed[1] == "in":
        raise MessageError(f"topic {topic!r:.100} is not a device outbox or status topic")
    device_id, channel = parsed
    msg = decode_message(payload, topic, _STATUS if channel == "status" else _OUTBOX)
    if msg.device_id != device_id:
        raise MessageError(f"{topic}: message claims device {msg.device_id!r:.80}, topic belongs to {device_id!r}")
    return device_id, msg
