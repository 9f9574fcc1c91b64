"""The wire protocol shared by the device and the cloud (protocol v1).

``envelope`` is the binary envelope and bounded JSON parsing; ``schema`` the one way a message is
defined (a dataclass whose fields declare how they travel) and the :class:`MessageType` enum;
``topics`` the MQTT topics, ids and bounds; the messages are in ``round`` (probe, scores, refusal),
``delivery`` (artifact manifest and chunks, ack, installed, install_failed), ``control`` (status,
key update) and ``labels`` (label query and votes); ``routing`` decodes a payload with the rules of
which message may arrive where. The names below are the public API: ``from device_sdk.protocol
import Probe, inbox, decode_message``.
"""

from device_sdk.protocol.control import STATES, DeviceState, KeyUpdate, Status
from device_sdk.protocol.delivery import (
    FORMATS,
    Ack,
    ArtifactChunk,
    ArtifactFormat,
    ArtifactManifest,
    Installed,
    InstallFailed,
)
from device_sdk.protocol.envelope import Envelope, decode, encode, parse_json, read_file, read_json_file
from device_sdk.protocol.labels import LabelQuery, LabelVotes, decode_label_message
from device_sdk.protocol.round import CENTROID_CODECS, PROBE, SCORES, Probe, Refusal, Scores
from device_sdk.protocol.routing import (
    ALL_TYPES,
    CLOUD_TO_DEVICE,
    DEVICE_TO_CLOUD,
    check_probe,
    check_scores,
    decode_for_device,
    decode_from_device,
    decode_message,
)
from device_sdk.protocol.schema import Codec, Message, MessageType, WireEnum, new_id, utc_now
from device_sdk.protocol.topics import *  # noqa: F403 - the topics, ids and bounds
from device_sdk.protocol.topics import __all__ as _topics_all

__all__ = [
    "ALL_TYPES",
    "CENTROID_CODECS",
    "CLOUD_TO_DEVICE",
    "DEVICE_TO_CLOUD",
    "FORMATS",
    "PROBE",
    "SCORES",
    "STATES",
    "Ack",
    "ArtifactChunk",
    "ArtifactFormat",
    "ArtifactManifest",
    "Codec",
    "DeviceState",
    "Envelope",
    "Installed",
    "InstallFailed",
    "KeyUpdate",
    "LabelQuery",
    "LabelVotes",
    "Message",
    "MessageType",
    "Probe",
    "Refusal",
    "Scores",
    "Status",
    "WireEnum",
    "check_probe",
    "check_scores",
    "decode",
    "decode_label_message",
    "decode_for_device",
    "decode_from_device",
    "decode_message",
    "encode",
    "new_id",
    "parse_json",
    "read_file",
    "read_json_file",
    "utc_now",
    *_topics_all,
]
