"""The messages of an ECOS round: the cloud's probe, the device's scores, or its refusal.

Each is a :class:`~device_sdk.protocol.schema.Message`: its fields declare how they travel in a
``device_sdk.protocol.envelope`` envelope, in files (offline mode) or MQTT payloads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np

from device_sdk.errors import MessageError
from device_sdk.protocol.schema import (
    Codec,
    Message,
    MessageType,
    Wire,
    array_field,
    id_field,
    name_id_field,
    new_id,
    require,
    utc_now,
    wire_field,
)
from device_sdk.protocol.topics import (
    CODE,
    HEX64,
    MAX_CODE_CHARS,
    MAX_COUNT,
    MAX_ENCODERS,
    MAX_ID_CHARS,
    MAX_REASON_CHARS,
    PROBE_ID,
)
from device_sdk.signing import is_key_id, is_signature

PROBE = MessageType.PROBE
SCORES = MessageType.SCORES
CENTROID_CODECS = Codec.values()
PROBE_SIGNING_DOMAIN = b"ecos-probe-v1\n"

__all__ = ["CENTROID_CODECS", "PROBE", "SCORES", "Probe", "Refusal", "Scores", "new_id", "utc_now"]


@dataclass(frozen=True)
class Probe(Message):
    """K centroids in the encoder's feature space, and which encoder made them.

    ``max_distance`` (cosine distance, optional) limits votes to samples that close to their
    nearest centroid; it does not change the sensitivity (still one vote per sample at most).
    ``deadline`` (unix seconds, optional) is when the cloud stops collecting answers: a device
    does not spend budget on a probe whose answer would arrive too late.
    ``radii`` (K cosine distances, optional) turns on coverage reporting: a sample whose nearest
    centroid ``k`` lies farther than ``radii[k]`` votes in one extra "far" bin instead of for
    ``k``. Each sample still votes exactly once, so the K + 1 counts keep L2 sensitivity 1 and the
    same noise buys the same epsilon (docs/sampling.md).
    ``key_id`` and ``signature`` (optional on the wire, required by a device with a trust store)
    are the cloud's Ed25519 signature of :meth:`signed_bytes`, checked before anything is
    computed or charged (docs/security.md).
    ``encoders`` (optional, omitted from the wire when None) names further encoder artifacts whose
    features the probe accepts: the same encoder exported in other formats (e.g. TFLite next to
    ONNX) that passed the cloud's parity gate. A device runs whichever of them its runtime can
    load; see :attr:`accepted_encoders`.

    On the wire ``k`` and ``feature_dim`` are the centroids' shape, ``created`` is filled with the
    time when empty; a probe is checked where it is received (the cloud may write one a device
    refuses).
    """

    TYPE = MessageType.PROBE
    DERIVED = {"k": Wire((int,), lo=1, hi=MAX_COUNT), "feature_dim": Wire((int,), lo=1)}
    CHECKED_ON_SEND = False

    probe_id: str = wire_field(
        str,
        name="id",
        pattern=PROBE_ID,
        why=f"is not a valid probe id: 1-{MAX_ID_CHARS} printable ASCII characters without spaces",
    )
    encoder_sha256: str = wire_field(str, lo=1, hi=MAX_ID_CHARS)
    centroids: np.ndarray = array_field(codec="codec", shape=("k", "feature_dim"))
    codec: str = wire_field(str, default=Codec.FLOAT16.value, enum=Codec)
    max_distance: Optional[float] = wire_field(int, float, default=None, optional=True)
    created: str = wire_field(str, default="", absent="", fill=utc_now)
    deadline: Optional[float] = wire_field(int, float, default=None, omit_none=True, to_wire=float, from_wire=float)
    radii: Optional[np.ndarray] = array_field(
        default=None,
        optional=True,
        dtype="float16",
        shape=("k",),
        valid=lambda r: bool(np.all(r >= 0)),
        why="must be k finite cosine distances >= 0",
    )
    key_id: Optional[str] = wire_field(
        str, default=None, omit_none=True, valid=is_key_id, why="is not 16 lowercase hex digits"
    )
    signature: Optional[str] = wire_field(
        str, default=None, omit_none=True, valid=is_signature, why="is not 128 lowercase hex digits"
    )
    encoders: Optional[Tuple[str, ...]] = wire_field(
        list,
        default=None,
        omit_none=True,
        lo=1,
        hi=MAX_ENCODERS,
        to_wire=list,
        from_wire=tuple,
        item=Wire((str,), pattern=HEX64, why="is not a sha256 (64 lowercase hex digits)"),
    )

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def accepted_encoders(self) -> Tuple[str, ...]:
        """sha256 of every encoder artifact whose features this probe's centroids are meant for."""
        return (self.encoder_sha256,) + tuple(e for e in (self.encoders or ()) if e != self.encoder_sha256)

    @property
    def signed(self) -> bool:
        return bool(self.signature)

    def signed_bytes(self) -> bytes:
        """What the probe's signature covers: every field a device acts on, as the device decodes it.

        A domain tag, then sorted-key compact JSON of the id, encoder hash, k, feature_dim, codec,
        max_distance, created, deadline and the sha256 of the decoded float32 centroids and radii
        (null without radii), and the list of ``encoders`` when the probe names one (a probe without
        it signs the same bytes as before the field existed). The message ``id`` is the probe id, so
        it is covered; the key id and the signature are not. Computed from the content each time
        (never cached), so a probe changed after signing no longer verifies.
        """
        centroids = np.ascontiguousarray(self.centroids, dtype="<f4")
        radii = None if self.radii is None else np.ascontiguousarray(self.radii, dtype="<f4")
        content = {
            "id": self.probe_id,
            "encoder_sha256": self.encoder_sha256,
            "k": self.k,
            "feature_dim": self.feature_dim,
            "codec": self.codec,
            "max_distance": self.max_distance,
            "created": self.created,
            "deadline": self.deadline,
            "centroids_sha256": hashlib.sha256(centroids.tobytes()).hexdigest(),
            "radii_sha256": None if radii is None else hashlib.sha256(radii.tobytes()).hexdigest(),
        }
        if self.encoders is not None:
            content["encoders"] = list(self.encoders)
        try:
            text = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise MessageError(f"probe {self.probe_id[:40]!r}: fields cannot be signed ({exc})") from None
        return PROBE_SIGNING_DOMAIN + text.encode("utf-8")

    def to_bytes(self, signer: Any = None) -> bytes:
        """The probe as a wire envelope; signed by ``signer`` (``cloud.security.keys.SigningKey``) if given.

        The signature is made over the probe exactly as a device will decode it (centroids
        after the codec's round trip, numbers after the JSON round trip), so it verifies there.
        A decoded signed probe encoded again keeps its signature.
        """
        if signer is None:
            return super().to_bytes()
        probe = dataclasses.replace(self, created=self.created or utc_now(), key_id=None, signature=None)
        received = Probe.from_bytes(probe.to_bytes(), "outgoing probe")
        signature = signer.sign(received.signed_bytes())
        return dataclasses.replace(probe, key_id=signer.key_id, signature=signature).to_bytes()

    def without_signature(self) -> "Probe":
        return dataclasses.replace(self, key_id=None, signature=None)

    def _check(self, source: str) -> None:
        require((self.key_id is None) == (self.signature is None), source, "key_id and signature go together")


@dataclass(frozen=True)
class Scores(Message):
    """One device's noisy centroid-coverage counts for one probe: the only data it sends.

    On the wire the noise parameters travel as ``noise`` {mechanism, sigma, sensitivity} and the
    privacy cost as ``privacy`` {epsilon, delta, accountant}; ``id`` (``message_id``) and
    ``created`` are filled when empty. ``far`` (probes with radii) is the noisy count of samples
    outside every centroid's radius. Scores are checked where they are received.
    """

    TYPE = MessageType.SCORES
    DERIVED = {"k": Wire((int,), lo=0, hi=MAX_COUNT)}
    CONSTANTS = {"noise.mechanism": "gaussian"}
    CHECKED_ON_SEND = False

    probe_id: str = wire_field(str, lo=1, hi=MAX_ID_CHARS)
    device_id: str = wire_field(str)
    encoder_sha256: str = wire_field(str, lo=1, hi=MAX_ID_CHARS)
    scores: np.ndarray = array_field(dtype="float32", decoded="float64", shape=("k",))
    sigma: float = wire_field(int, float, name="noise.sigma", lo=0, to_wire=float, from_wire=float)
    sensitivity: float = wire_field(
        int,
        float,
        default=1.0,
        name="noise.sensitivity",
        valid=lambda v: v > 0,
        why="must be above 0",
        to_wire=float,
        from_wire=float,
    )
    epsilon: float = wire_field(int, float, default=0.0, name="privacy.epsilon", to_wire=float, from_wire=float)
    delta: float = wire_field(int, float, default=0.0, name="privacy.delta", to_wire=float, from_wire=float)
    accountant: str = wire_field(str, default="gaussian", name="privacy.accountant", absent="", hi=MAX_CODE_CHARS)
    message_id: str = wire_field(str, default="", name="id", lo=1, hi=MAX_ID_CHARS, fill=new_id)
    created: str = wire_field(str, default="", absent="", fill=utc_now)
    far: Optional[float] = array_field(default=None, optional=True, dtype="float32", decoded="float", shape=(1,))

    @property
    def k(self) -> int:
        return int(self.scores.shape[0])


@dataclass(frozen=True)
class Refusal(Message):
    """A normal reply to a probe the device will not answer; ``code`` is the error's stable code."""

    TYPE = MessageType.REFUSAL

    probe_id: str = wire_field(str, lo=1, hi=MAX_ID_CHARS)
    device_id: str = name_id_field()
    code: str = wire_field(str, pattern=CODE, why=f"is not 1-{MAX_CODE_CHARS} of A-Z a-z 0-9 _ . -")
    reason: str = wire_field(str, hi=MAX_REASON_CHARS)
    id: str = id_field()
