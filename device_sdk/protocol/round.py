"""The two messages of an ECOS round: the cloud's probe and the device's scores.

Both travel as ``device_sdk.protocol.envelope`` envelopes, in files (offline mode) or MQTT payloads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional, Tuple

import numpy as np

from device_sdk.errors import MessageError
from device_sdk.protocol import envelope as wire

PROBE = "probe"
SCORES = "scores"
CENTROID_CODECS = ("float16", "int8", "float32")
PROBE_SIGNING_DOMAIN = b"ecos-probe-v1\n"
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_SIGNATURE = re.compile(r"[0-9a-f]{128}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_ENCODERS = 8  # encoder artifacts one probe may name (ONNX, TFLite, ... of the same encoder)


def new_id() -> str:
    return uuid.uuid4().hex


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Probe:
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
    """

    probe_id: str
    encoder_sha256: str
    centroids: np.ndarray
    codec: str = "float16"
    max_distance: Optional[float] = None
    created: str = ""
    deadline: Optional[float] = None
    radii: Optional[np.ndarray] = None
    key_id: Optional[str] = None
    signature: Optional[str] = None
    encoders: Optional[Tuple[str, ...]] = None

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

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
        it is covered; the key id and the signature are not. Computed from the content each time (never cached), so a probe
        changed after signing no longer verifies.
        """
        centroids = np.ascontiguousarray(self.centroids, dtype="<f4")
        radii = None if self.radii is None else np.ascontiguousarray(self.radii, dtype="<f4")
        content = {
            "id": self.probe_id, "encoder_sha256": self.encoder_sha256, "k": self.k, "feature_dim": self.feature_dim,
            "codec": self.codec, "max_distance": self.max_distance, "created": self.created, "deadline": self.deadline,
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

    @property
    def feature_dim(self) -> int:
        return int(self.centroids.shape[1])

    def to_bytes(self, signer: Any = None) -> bytes:
        """The probe as a wire envelope; signed by ``signer`` (``cloud.security.keys.SigningKey``) if given.

        The signature is made over the probe exactly as a device will decode it (centroids
        after the codec's round trip, numbers after the JSON round trip), so it verifies there.
        """
        arrays = _compress(np.asarray(self.centroids, dtype=np.float32), self.codec)
        fields = {
            "id": self.probe_id,
            "encoder_sha256": self.encoder_sha256,
            "k": self.k,
            "feature_dim": self.feature_dim,
            "codec": self.codec,
            "max_distance": self.max_distance,
            "created": self.created or utc_now(),
        }
        if self.deadline is not None:
            fields["deadline"] = float(self.deadline)
        if self.radii is not None:
            arrays["radii"] = np.asarray(self.radii, dtype=np.float16)
        if self.encoders is not None:  # omitted when absent: a probe without it keeps its old bytes
            fields["encoders"] = list(self.encoders)
        if signer is not None:
            received = Probe.from_bytes(wire.encode(PROBE, fields, arrays), "outgoing probe")
            fields["key_id"] = signer.key_id
            fields["signature"] = signer.sign(received.signed_bytes())
        elif self.signature:  # a decoded signed probe, encoded again: keep its signature
            fields["key_id"] = self.key_id
            fields["signature"] = self.signature
        return wire.encode(PROBE, fields, arrays)

    def without_signature(self) -> "Probe":
        return dataclasses.replace(self, key_id=None, signature=None)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "probe") -> "Probe":
        return cls.from_envelope(wire.decode(data, PROBE, source), source)

    @classmethod
    def from_envelope(cls, env: wire.Envelope, source: str = "probe") -> "Probe":
        wire.require(env, {"id": str, "encoder_sha256": str, "k": int, "feature_dim": int, "codec": str}, source)
        f = env.fields
        centroids = _decompress(env.arrays, f["codec"], source)
        if centroids.shape != (f["k"], f["feature_dim"]) or f["k"] < 1:
            raise MessageError(f"{source}: centroids have shape {centroids.shape}, header says ({f['k']}, {f['feature_dim']})")
        if not np.all(np.isfinite(centroids)):
            raise MessageError(f"{source}: centroids contain NaN or infinity")
        max_distance = f.get("max_distance")
        if max_distance is not None and not isinstance(max_distance, (int, float)):
            raise MessageError(f"{source}: max_distance must be a number or null")
        deadline = f.get("deadline")
        if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float))):
            raise MessageError(f"{source}: deadline must be unix seconds or absent")
        if deadline is not None and not math.isfinite(float(deadline)):
            raise MessageError(f"{source}: deadline must be a finite number of unix seconds")
        if max_distance is not None and not math.isfinite(float(max_distance)):
            raise MessageError(f"{source}: max_distance must be finite")
        radii = env.arrays.get("radii")
        if radii is not None:
            radii = radii.astype(np.float32)
            if radii.shape != (f["k"],) or not np.all(np.isfinite(radii)) or np.any(radii < 0):
                raise MessageError(f"{source}: radii must be k={f['k']} finite cosine distances >= 0")
        key_id, signature = f.get("key_id"), f.get("signature")
        if (key_id is None) != (signature is None):
            raise MessageError(f"{source}: key_id and signature go together")
        if key_id is not None and not (isinstance(key_id, str) and _KEY_ID.fullmatch(key_id)):
            raise MessageError(f"{source}: key_id is not 16 lowercase hex digits")
        if signature is not None and not (isinstance(signature, str) and _SIGNATURE.fullmatch(signature)):
            raise MessageError(f"{source}: signature is not 128 lowercase hex digits")
        created = f.get("created", "")
        if not isinstance(created, str):
            raise MessageError(f"{source}: created must be a string")
        encoders = f.get("encoders")
        if encoders is not None:
            if (not isinstance(encoders, list) or not 1 <= len(encoders) <= MAX_ENCODERS
                    or not all(isinstance(e, str) and _SHA256.fullmatch(e) for e in encoders)):
                raise MessageError(f"{source}: encoders must be a list of 1 to {MAX_ENCODERS} sha256 hex digests")
            encoders = tuple(encoders)
        return cls(f["id"], f["encoder_sha256"], centroids, f["codec"], max_distance, created,
                   None if deadline is None else float(deadline), radii, key_id, signature, encoders)


@dataclass(frozen=True)
class Scores:
    """One device's noisy centroid-coverage counts for one probe: the only data it sends."""

    probe_id: str
    device_id: str
    encoder_sha256: str
    scores: np.ndarray
    sigma: float
    sensitivity: float = 1.0
    epsilon: float = 0.0
    delta: float = 0.0
    accountant: str = "gaussian"
    message_id: str = ""
    created: str = ""
    far: Optional[float] = None  # noisy count of samples outside every centroid's radius (probes with radii)

    @property
    def k(self) -> int:
        return int(self.scores.shape[0])

    def to_bytes(self) -> bytes:
        fields = {
            "id": self.message_id or new_id(),
            "probe_id": self.probe_id,
            "device_id": self.device_id,
            "encoder_sha256": self.encoder_sha256,
            "k": self.k,
            "noise": {"mechanism": "gaussian", "sigma": float(self.sigma), "sensitivity": float(self.sensitivity)},
            "privacy": {"epsilon": float(self.epsilon), "delta": float(self.delta), "accountant": self.accountant},
            "created": self.created or utc_now(),
        }
        arrays = {"scores": np.asarray(self.scores, dtype=np.float32)}
        if self.far is not None:
            arrays["far"] = np.asarray([self.far], dtype=np.float32)
        return wire.encode(SCORES, fields, arrays)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "scores") -> "Scores":
        return cls.from_envelope(wire.decode(data, SCORES, source), source)

    @classmethod
    def from_envelope(cls, env: wire.Envelope, source: str = "scores") -> "Scores":
        wire.require(env, {"id": str, "probe_id": str, "device_id": str, "encoder_sha256": str, "k": int, "noise": dict, "privacy": dict}, source)
        f = env.fields
        scores = env.arrays.get("scores")
        if scores is None or scores.shape != (f["k"],):
            raise MessageError(f"{source}: scores array missing or not of length k={f['k']}")
        if not np.all(np.isfinite(scores)):
            raise MessageError(f"{source}: scores contain NaN or infinity")
        noise, privacy = f["noise"], f["privacy"]
        try:
            sigma, sens = float(noise["sigma"]), float(noise["sensitivity"])
            eps, delta = float(privacy["epsilon"]), float(privacy["delta"])
        except (KeyError, TypeError, ValueError, OverflowError):
            raise MessageError(f"{source}: malformed noise/privacy fields") from None
        if not all(math.isfinite(v) for v in (sigma, sens, eps, delta)) or sigma < 0 or sens <= 0:
            raise MessageError(f"{source}: invalid noise parameters sigma={sigma}, sensitivity={sens}")
        far = env.arrays.get("far")
        if far is not None and (far.shape != (1,) or not np.all(np.isfinite(far))):
            raise MessageError(f"{source}: far must be one finite number")
        return cls(f["probe_id"], f["device_id"], f["encoder_sha256"], scores.astype(np.float64), sigma, sens,
                   eps, delta, str(privacy.get("accountant", "")), f["id"], str(f.get("created", "")),
                   None if far is None else float(far[0]))


def _compress(c: np.ndarray, codec: str) -> dict:
    if codec == "float16":
        return {"centroids": c.astype(np.float16)}
    if codec == "float32":
        return {"centroids": c}
    if codec == "int8":
        scale = np.maximum(np.abs(c).max(axis=1), 1e-12).astype(np.float32) / 127.0
        q = np.clip(np.rint(c / scale[:, None]), -127, 127).astype(np.int8)
        return {"centroids": q, "scale": scale}
    raise MessageError(f"unknown centroid codec {codec!r} (use one of {', '.join(CENTROID_CODECS)})")


def _decompress(arrays: dict, codec: str, source: str) -> np.ndarray:
    c = arrays.get("centroids")
    if c is None or c.ndim != 2:
        raise MessageError(f"{source}: centroids array missing or not 2-D")
    if codec in ("float16", "float32"):
        return c.astype(np.float32)
    if codec == "int8":
        scale = arrays.get("scale")
        if scale is None or scale.shape != (c.shape[0],):
            raise MessageError(f"{source}: int8 centroids need one scale per row")
        return c.astype(np.float32) * scale.astype(np.float32)[:, None]
    raise MessageError(f"{source}: unknown centroid codec {codec!r}")
