"""The two messages of automated client labelling: the cloud's label query and the device's votes.

``label_query`` (cloud -> device): the ECOS proxy set's features (float16 by default, as a probe's
centroids) in a named feature space (an encoder's sha256, or ``thumb16``: the numpy-only
thumbnails of device_sdk/labelling.py), the label names the votes are counted over, and the
vote's public parameters (votes per device sample, an optional cosine-distance limit).
``label_votes`` (device -> cloud): one noisy label histogram per query, with the noise and the
privacy cost of the release (docs/tasks.md, device_sdk/labelling.py).

A label query spends a device's privacy budget like a probe, so over MQTT it is signed by the cloud
like a probe (``key_id``, ``signature`` over :meth:`LabelQuery.signed_bytes`, domain
``ecos-label-query-v1``) and may carry a ``deadline``; the three fields are left off the wire when
absent, so an unsigned query keeps its earlier bytes (docs/security.md).

Both are :class:`~device_sdk.protocol.schema.Message` s: their fields declare how they travel,
and every decoded message is checked against that schema.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from device_sdk.errors import MessageError
from device_sdk.protocol import envelope as wire
from device_sdk.protocol.schema import (
    Message,
    MessageType,
    array_field,
    id_field,
    name_id_field,
    require,
    utc_now,
    wire_field,
)
from device_sdk.protocol.topics import MAX_CODE_CHARS, MAX_ID_CHARS, MAX_NAME_CHARS, PROBE_ID
from device_sdk.signing import is_key_id, is_signature

LABEL_QUERY = MessageType.LABEL_QUERY
LABEL_VOTES = MessageType.LABEL_VOTES
FEATURE_CODECS = ("float16", "float32")
MAX_QUERIES = 20_000  # a float16 query of 20,000 x 64 features is 2.5 MB: under the 4 MB MQTT payload limit
MAX_LABELS = 1000
MAX_VOTES_PER_SAMPLE = 1000
_LABELS_WHY = f"must be 2-{MAX_LABELS} distinct non-empty names"
_QUERY_ID_WHY = f"is not a valid label query id: 1-{MAX_ID_CHARS} printable ASCII characters without spaces"
LABEL_QUERY_SIGNING_DOMAIN = b"ecos-label-query-v1\n"


def _labels_ok(labels: Any) -> bool:
    return (
        2 <= len(labels) <= MAX_LABELS
        and all(isinstance(v, str) and 0 < len(v) <= MAX_NAME_CHARS for v in labels)
        and len(set(labels)) == len(labels)
    )


def _noise_ok(noise: Any) -> bool:
    """``{"mechanism": "gaussian", "sigma": > 0, "sensitivity": > 0}``, finite numbers."""
    numbers = _numbers(noise, "sigma", "sensitivity")
    return noise.get("mechanism") == "gaussian" and numbers is not None and min(numbers) > 0


def _privacy_ok(privacy: Any) -> bool:
    """``{"epsilon", "delta"}`` finite numbers, an optional ``accountant`` name."""
    accountant = privacy.get("accountant", "")
    return (
        _numbers(privacy, "epsilon", "delta") is not None
        and isinstance(accountant, str)
        and (len(accountant) <= MAX_CODE_CHARS)
    )


def _numbers(d: dict, *keys: str) -> Optional[tuple]:
    try:
        values = tuple(float(d[k]) for k in keys)
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    return values if all(math.isfinite(v) for v in values) else None


@dataclass(frozen=True)
class LabelQuery(Message):
    """Features of the proxy set the device is asked to label, in the encoder's feature space.

    ``votes_per_sample`` (m) and ``max_distance`` are the vote's public parameters: each device
    sample votes, with its own label, for at most m queries (its m most similar, within
    ``max_distance`` if given), so one sample changes at most m histogram entries by one.
    ``deadline`` (unix seconds, optional): a device does not spend budget on a query whose answer
    would come too late. ``key_id`` and ``signature`` (optional on the wire, required by a device
    with a trust store): the cloud's Ed25519 signature of :meth:`signed_bytes`.
    """

    TYPE = MessageType.LABEL_QUERY

    id: str = wire_field(str, pattern=PROBE_ID, why=_QUERY_ID_WHY)
    feature_space: str = wire_field(str, lo=1, hi=MAX_ID_CHARS)
    labels: list = wire_field(list, valid=_labels_ok, why=_LABELS_WHY)
    features: np.ndarray = array_field(
        codec="codec",
        shape=(None, None),
        lo=1,
        hi=MAX_QUERIES,
        valid=lambda f: f.ndim == 2 and f.shape[1] >= 1,
        why="must be (n, d) with d >= 1",
    )
    votes_per_sample: int = wire_field(int, default=10, lo=1, hi=MAX_VOTES_PER_SAMPLE)
    max_distance: Optional[float] = wire_field(int, float, default=None, optional=True, lo=0, hi=2)
    codec: str = wire_field(
        str, default="float16", valid=lambda c: c in FEATURE_CODECS, why=f"is not one of {', '.join(FEATURE_CODECS)}"
    )
    created: str = wire_field(str, default_factory=utc_now)
    deadline: Optional[float] = wire_field(int, float, default=None, omit_none=True, to_wire=float, from_wire=float)
    key_id: Optional[str] = wire_field(
        str, default=None, omit_none=True, valid=is_key_id, why="is not 16 lowercase hex digits"
    )
    signature: Optional[str] = wire_field(
        str, default=None, omit_none=True, valid=is_signature, why="is not 128 lowercase hex digits"
    )

    @property
    def n_queries(self) -> int:
        return int(self.features.shape[0])

    @property
    def signed(self) -> bool:
        return bool(self.signature)

    def signed_bytes(self) -> bytes:
        """What the query's signature covers: every field a device acts on, as the device decodes it.

        A domain tag (so a probe's signature cannot pass for a query's), then sorted-key compact JSON
        of the id, feature space, labels, votes per sample, max_distance, codec, created, deadline,
        the features' shape and the sha256 of the features as decoded (float32, after the codec).
        The key id and the signature are not covered. Computed from the content each time, so a
        query changed after signing no longer verifies.
        """
        features = np.ascontiguousarray(self.features, dtype="<f4")
        content = {
            "id": self.id,
            "feature_space": self.feature_space,
            "labels": list(self.labels),
            "votes_per_sample": self.votes_per_sample,
            "max_distance": self.max_distance,
            "codec": self.codec,
            "created": self.created,
            "deadline": self.deadline,
            "shape": list(features.shape),
            "features_sha256": hashlib.sha256(features.tobytes()).hexdigest(),
        }
        try:
            text = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise MessageError(f"label query {self.id[:40]!r}: fields cannot be signed ({exc})") from None
        return LABEL_QUERY_SIGNING_DOMAIN + text.encode("utf-8")

    def to_bytes(self, signer: Any = None) -> bytes:
        """The query as a wire envelope; signed by ``signer`` (``cloud.security.keys.SigningKey``) if given.

        As for a probe, the signature is made over the query exactly as a device will decode it
        (features after the codec's round trip), so it verifies there.
        """
        if signer is None:
            return super().to_bytes()
        query = dataclasses.replace(self, key_id=None, signature=None)
        received = LabelQuery.from_bytes(query.to_bytes(), "outgoing label query")
        signature = signer.sign(received.signed_bytes())
        return dataclasses.replace(query, key_id=signer.key_id, signature=signature).to_bytes()

    def _check(self, source: str) -> None:
        require((self.key_id is None) == (self.signature is None), source, "key_id and signature go together")


@dataclass(frozen=True)
class LabelVotes(Message):
    """One device's noisy label histograms, ``votes[i, c]`` for query i and label ``labels[c]``."""

    TYPE = MessageType.LABEL_VOTES

    query_id: str = wire_field(str, pattern=PROBE_ID, why=_QUERY_ID_WHY)
    device_id: str = name_id_field()
    feature_space: str = wire_field(str, lo=1, hi=MAX_ID_CHARS)
    labels: list = wire_field(list, valid=_labels_ok, why=_LABELS_WHY)
    votes: np.ndarray = array_field(dtype="float32", decoded="float64", shape=(None, None), lo=1, hi=MAX_QUERIES)
    noise: dict = wire_field(dict, valid=_noise_ok, why="must be {mechanism: gaussian, sigma > 0, sensitivity > 0}")
    privacy: dict = wire_field(dict, valid=_privacy_ok, why="must be {epsilon, delta, accountant}, finite numbers")
    id: str = id_field()
    created: str = wire_field(str, default_factory=utc_now)

    @property
    def sigma(self) -> float:
        return float(self.noise["sigma"])

    @property
    def sensitivity(self) -> float:
        return float(self.noise["sensitivity"])

    @property
    def epsilon(self) -> float:
        return float(self.privacy["epsilon"])

    def _check(self, source: str) -> None:
        require(np.asarray(self.votes).shape[1:] == (len(self.labels),), source, "votes must be (queries, labels)")


def decode_label_message(data: bytes, source: str = "message") -> Any:
    """A label query or label votes message, whichever ``data`` holds."""
    env = wire.decode(data, None, source)
    cls = {LABEL_QUERY: LabelQuery, LABEL_VOTES: LabelVotes}.get(env.type)
    if cls is None:
        raise MessageError(f"{source}: a {env.type!r:.40} message, not a label query or label votes")
    return cls.from_envelope(env, source)
