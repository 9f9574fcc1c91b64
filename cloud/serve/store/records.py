"""The job store's records (frozen dataclasses) and states (``str`` enums whose values are what
the database, JSON, logs and metrics hold); see base.py for the interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, Optional, Sequence, Tuple


class StrEnum(str, Enum):
    """A ``str`` enum that prints and formats as its value on every Python version (3.9+)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class RoundState(StrEnum):
    PROBING = "probing"
    COLLECTING = "collecting"
    SAMPLING = "sampling"
    LABELLING = "labelling"  # selective manual labelling: waiting for the proxy set's labels (docs/tasks.md)
    VOTING = "voting"  # automated client labelling: waiting for the devices' label votes (docs/tasks.md)
    TRAINING = "training"
    SIGNING = "signing"
    DELIVERING = "delivering"
    DONE = "done"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (RoundState.DONE, RoundState.FAILED)


# Where each working state may go next (besides FAILED, which every working state may reach);
# DONE and FAILED are final. A new state is one member above and one line here.
_NEXT: Dict[RoundState, Tuple[RoundState, ...]] = {
    RoundState.PROBING: (RoundState.COLLECTING,),
    RoundState.COLLECTING: (RoundState.SAMPLING,),
    RoundState.SAMPLING: (RoundState.TRAINING, RoundState.LABELLING, RoundState.VOTING),
    RoundState.LABELLING: (RoundState.TRAINING,),
    RoundState.VOTING: (RoundState.TRAINING,),
    RoundState.TRAINING: (RoundState.SIGNING,),
    RoundState.SIGNING: (RoundState.DELIVERING,),
    RoundState.DELIVERING: (RoundState.DONE,),
}
TRANSITIONS: Dict[RoundState, Tuple[RoundState, ...]] = {a: (*b, RoundState.FAILED) for a, b in _NEXT.items()}


class RoundKind(StrEnum):
    DEVICE = "device"  # one device, its own model
    FLEET = "fleet"  # summed scores, one model for all


class ResponseKind(StrEnum):
    SCORES = "scores"
    REFUSAL = "refusal"
    LABEL_VOTES = "label_votes"  # stored under the label query's id (``<round>.labels``), not the round's


class DeliveryState(StrEnum):
    SENDING = "sending"
    INSTALLED = "installed"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self is not DeliveryState.SENDING


class JobState(StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class DeviceState(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    UNKNOWN = "unknown"  # seen only through a delivery result, never through a status


ROUND_KINDS = tuple(k.value for k in RoundKind)
DELIVERY_FINAL = tuple(s.value for s in DeliveryState if s.final)
RESPONSE_KINDS = tuple(k.value for k in ResponseKind)


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    state: DeviceState
    model: Optional[Dict[str, Any]]
    first_seen: float
    last_seen: float


@dataclass(frozen=True)
class RoundRecord:
    round_id: str
    kind: str  # RoundKind value
    devices: Tuple[str, ...]
    state: RoundState
    params: Dict[str, Any]  # persisted JSON; the daemon reads it as cloud.serve.round_types.RoundParams
    result: Dict[str, Any]  # persisted JSON, merged over the stages (cloud.serve.round_types)
    deadline: Optional[float]
    error: str
    created: float
    updated: float


@dataclass(frozen=True)
class ResponseRecord:
    round_id: str
    device_id: str
    kind: str  # ResponseKind value
    message_id: str
    payload: bytes
    received: float


@dataclass(frozen=True)
class ArtifactRecord:
    artifact_id: str
    round_id: str
    name: str
    version: int
    sha256: str
    size: int
    path: str
    manifest: bytes  # the signed manifest message, sent as is
    created: float = 0.0


@dataclass(frozen=True)
class DeliveryRecord:
    artifact_id: str
    device_id: str
    round_id: str
    state: DeliveryState
    next_chunk: int
    total_chunks: int
    result: Dict[str, Any]
    updated: float


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    round_id: str
    kind: str
    state: JobState
    attempt: int
    done: int
    total: int
    note: str
    result: Dict[str, Any]
    error: str
    started: float
    updated: float


@dataclass(frozen=True)
class TrafficRow:
    device_id: str
    round_id: str
    direction: str  # "up" (device -> cloud) | "down"
    msg_type: str
    messages: int
    bytes: int


@dataclass(frozen=True)
class NewRound:
    """What a caller asks for; the store assigns nothing but timestamps."""

    round_id: str
    kind: str
    devices: Sequence[str]
    params: Dict[str, Any] = field(default_factory=dict)
