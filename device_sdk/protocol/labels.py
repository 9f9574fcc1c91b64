"""The two messages of automated client labelling: the cloud's label query and the device's votes.

``label_query`` (cloud -> device): the ECOS proxy set's features (float16 by default, as a probe's
centroids) in a named feature space (an encoder's sha256, or ``thumb16``: the numpy-only
thumbnails of device_sdk/labelling.py), the label names the votes are counted over, and the
vote's public parameters (votes per device sample, an optional cosine-distance limit).
``label_votes`` (device -> cloud): one noisy label histogram per query, with the noise and the
privacy cost of the release (docs/tasks.md, device_sdk/labelling.py).

Both follow ``device_sdk.protocol.messages.Message``: dataclass fields travel as the envelope's
JSON fields, arrays in its payload, every decoded message is checked against its schema.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Optional, Tuple

import numpy as np

from device_sdk.errors import MessageError
from device_sdk.protocol import envelope as wire
from device_sdk.protocol.messages import MAX_CODE_CHARS, MAX_ID_CHARS, MAX_NAME_CHARS, Message, _require, _text_ok
from device_sdk.protocol.round import new_id, utc_now

LABEL_QUERY = "label_query"
LABEL_VOTES = "label_votes"
FEATURE_CODECS = ("float16", "float32")
MAX_QUERIES = 20_000  # a float16 query of 20,000 x 64 features is 2.5 MB: under the 4 MB MQTT payload limit
MAX_LABELS = 1000
MAX_VOTES_PER_SAMPLE = 1000
_NONE = type(None)


def _labels_ok(labels: Any) -> bool:
    return (
        isinstance(labels, list)
        and 2 <= len(labels) <= MAX_LABELS
        and len(set(labels)) == len(labels)
        and all(isinstance(v, str) and 0 < len(v) <= MAX_NAME_CHARS for v in labels)
    )


@dataclass(frozen=True)
class LabelQuery(Message):
    """Features of the proxy set the device is asked to label, in the encoder's feature space.

    ``votes_per_sample`` (m) and ``max_distance`` are the vote's public parameters: each device
    sample votes, with its own label, for at most m queries (its m most similar, within
    ``max_distance`` if given), so one sample changes at most m histogram entries by one.
    """

    TYPE: ClassVar[str] = LABEL_QUERY
    SPEC: ClassVar[Dict[str, Tuple[type, ...]]] = {
        "id": (str,),
        "feature_space": (str,),
        "labels": (list,),
        "votes_per_sample": (int,),
        "max_distance": (int, float, _NONE),
        "codec": (str,),
        "created": (str,),
    }

    id: str
    feature_space: str
    labels: list
    features: np.ndarray
    votes_per_sample: int = 10
    max_distance: Optional[float] = None
    codec: str = "float16"
    created: str = field(default_factory=utc_now)

    @property
    def n_queries(self) -> int:
        return int(self.features.shape[0])

    def _arrays(self) -> Dict[str, np.ndarray]:
        f = np.asarray(self.features, dtype=np.float32)
        return {"features": f.astype(np.float16) if self.codec == "float16" else f}

    @classmethod
    def _from_arrays(cls, env: wire.Envelope, source: str) -> Dict[str, Any]:
        f = env.arrays.get("features")
        if f is None or f.ndim != 2:
            raise MessageError(f"{source}: label_query needs a 2-D features array")
        return {"features": f.astype(np.float32)}

    def _check(self, source: str) -> None:
        super()._check(source)
        _require(
            _text_ok(self.feature_space, MAX_ID_CHARS), source, f"feature_space must be 1-{MAX_ID_CHARS} characters"
        )
        _require(_labels_ok(self.labels), source, f"labels must be 2-{MAX_LABELS} distinct non-empty names")
        _require(self.codec in FEATURE_CODECS, source, f"codec must be one of {', '.join(FEATURE_CODECS)}")
        _require(
            1 <= self.votes_per_sample <= MAX_VOTES_PER_SAMPLE,
            source,
            f"votes_per_sample must be in [1, {MAX_VOTES_PER_SAMPLE}]",
        )
        if self.max_distance is not None:
            _require(
                math.isfinite(self.max_distance) and 0 <= self.max_distance <= 2,
                source,
                "max_distance must be a cosine distance in [0, 2]",
            )
        f = np.asarray(self.features)
        _require(
            f.ndim == 2 and 1 <= f.shape[0] <= MAX_QUERIES and f.shape[1] >= 1,
            source,
            f"features must be (n, d) with 1 <= n <= {MAX_QUERIES}",
        )
        _require(bool(np.all(np.isfinite(f))), source, "features contain NaN or infinity")


@dataclass(frozen=True)
class LabelVotes(Message):
    """One device's noisy label histograms, ``votes[i, c]`` for query i and label ``labels[c]``."""

    TYPE: ClassVar[str] = LABEL_VOTES
    SPEC: ClassVar[Dict[str, Tuple[type, ...]]] = {
        "query_id": (str,),
        "device_id": (str,),
        "feature_space": (str,),
        "labels": (list,),
        "noise": (dict,),
        "privacy": (dict,),
        "id": (str,),
        "created": (str,),
    }

    query_id: str
    device_id: str
    feature_space: str
    labels: list
    votes: np.ndarray
    noise: dict
    privacy: dict
    id: str = field(default_factory=new_id)
    created: str = field(default_factory=utc_now)

    @property
    def sigma(self) -> float:
        return float(self.noise["sigma"])

    @property
    def sensitivity(self) -> float:
        return float(self.noise["sensitivity"])

    @property
    def epsilon(self) -> float:
        return float(self.privacy["epsilon"])

    def _arrays(self) -> Dict[str, np.ndarray]:
        return {"votes": np.asarray(self.votes, dtype=np.float32)}

    @classmethod
    def _from_arrays(cls, env: wire.Envelope, source: str) -> Dict[str, Any]:
        v = env.arrays.get("votes")
        if v is None or v.ndim != 2:
            raise MessageError(f"{source}: label_votes needs a 2-D votes array")
        return {"votes": v.astype(np.float64)}

    def _check(self, source: str) -> None:
        super()._check(source)
        for name in ("query_id", "feature_space"):
            _require(_text_ok(getattr(self, name), MAX_ID_CHARS), source, f"{name} must be 1-{MAX_ID_CHARS} characters")
        _require(_labels_ok(self.labels), source, f"labels must be 2-{MAX_LABELS} distinct non-empty names")
        v = np.asarray(self.votes)
        _require(
            v.ndim == 2 and v.shape[1] == len(self.labels) and 1 <= v.shape[0] <= MAX_QUERIES,
            source,
            "votes must be (queries, labels)",
        )
        _require(bool(np.all(np.isfinite(v))), source, "votes contain NaN or infinity")
        noise, privacy = self.noise, self.privacy
        try:
            sigma, sens = float(noise["sigma"]), float(noise["sensitivity"])
            eps, delta = float(privacy["epsilon"]), float(privacy["delta"])
            accountant = privacy.get("accountant", "")
        except (KeyError, TypeError, ValueError, OverflowError):
            raise MessageError(f"{source}: malformed noise/privacy fields") from None
        _require(noise.get("mechanism") == "gaussian", source, "noise mechanism must be gaussian")
        _require(
            all(math.isfinite(x) for x in (sigma, sens, eps, delta)) and sigma > 0 and sens > 0,
            source,
            f"invalid noise parameters sigma={sigma}, sensitivity={sens}",
        )
        _require(isinstance(accountant, str) and len(accountant) <= MAX_CODE_CHARS, source, "invalid accountant")


def decode_label_message(data: bytes, source: str = "message"):
    """A label query or label votes message, whichever ``data`` holds."""
    env = wire.decode(data, None, source)
    cls = {LABEL_QUERY: LabelQuery, LABEL_VOTES: LabelVotes}.get(env.type)
    if cls is None:
        raise MessageError(f"{source}: a {env.type!r:.40} message, not a label query or label votes")
    return cls.from_envelope(env, source)
