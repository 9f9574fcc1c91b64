"""What the daemon's stages hand each other: a round's parameters and each stage's result, typed.

The store keeps a round's ``params`` and ``result`` as JSON objects (``RoundRecord.params`` /
``.result``); these frozen dataclasses are how the daemon reads and writes them. ``to_json``
gives exactly the keys and values the daemon stored before they existed, so the database,
``ecos-cloud status --json`` and everything that reads a round's result see the same JSON; the
``from_json`` readers accept rounds created by older versions (keys added since get the value
such a round ran with).

    probing/collecting -> CollectResult -> sampling -> SampleResult -> training -> TrainOutcome
    -> signing -> SignResult -> delivering -> DeliverResult
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

from cloud.errors import StoreError
from cloud.sampling.selection import DEFAULT_MAX_EPSILON, DEFAULT_MAX_SAMPLES


@dataclass(frozen=True)
class RoundParams:
    """A round's settings, frozen at creation (``[rounds]`` of the config, the caller's overrides,
    and what the daemon adds) so that a restart with another config finishes it unchanged."""

    method: str
    budget: int
    collect_seconds: float
    min_responses: int
    codec: str
    max_distance: Optional[float]
    threshold_sigmas: float
    seed: int
    index: str  # the pool index's probe id: its centroids are what the devices score
    ask_devices: bool  # False for the baselines (random, kcenter): no probe, epsilon 0
    radius_quantile: float = 0.0  # 0: no coverage (also what rounds from before coverage ran with)
    max_epsilon: float = DEFAULT_MAX_EPSILON  # plausibility limits (rounds from before them get the defaults)
    delta: float = 1e-5
    max_samples: int = DEFAULT_MAX_SAMPLES
    probe_resend_seconds: Optional[float] = None  # stored for the record; the daemon's own setting is used
    # "compression" (train on the selection as it is) or "manual" (selective manual labelling: the round waits in
    # "labelling" until the proxy set's labels are imported; docs/tasks.md); labels = the names labellers choose from
    # "client" (automated client labelling): after sampling the round sends the devices a signed label query and
    # waits in "voting" for their private label votes; labels = the names they vote over; the label_* settings,
    # votes_per_sample and min_margin are [rounds] keys (docs/tasks.md)
    task: str = "compression"
    labels: Optional[List[str]] = None
    label_groups: int = 50
    votes_per_sample: int = 2
    label_max_distance: Optional[float] = None
    label_feature_space: str = "thumb16"
    label_seconds: float = 120.0
    min_margin: float = 2.0
    use_domains: bool = False  # ECOS's domain rule; rounds stored before it existed ran without it
    misfit_diversity: float = 0.0  # ECOS's misfit rule (docs/sampling.md); 0 for rounds stored before it

    @property
    def coverage_quantile(self) -> Optional[float]:
        """The radius quantile probes carry, or None when coverage is off."""
        return self.radius_quantile or None

    @classmethod
    def from_json(cls, params: Mapping[str, Any]) -> "RoundParams":
        """The typed view of a stored round's params; keys this version does not know are ignored."""
        fields = dataclasses.fields(cls)
        needed = [
            f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in needed if name not in params]
        if missing:
            raise StoreError(
                f"a stored round lacks its parameter(s) {', '.join(missing)}: the state database is damaged"
            )
        names = {f.name for f in fields}
        return cls(**{k: v for k, v in params.items() if k in names})

    def to_json(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.task == "compression" and self.labels is None:  # a compression round: the keys of before
            del out["task"], out["labels"]
        return out


@dataclass(frozen=True)
class CollectResult:
    """Who answered the probe by the deadline: scores, refusals (device -> code), nothing."""

    answered: List[str]
    refused: Dict[str, str]
    missing: List[str]
    implausible: Dict[str, str] = dataclasses.field(default_factory=dict)  # missing devices whose scores were refused

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "answered": list(self.answered),
            "refused": dict(self.refused),
            "missing": list(self.missing),
        }
        if self.implausible:
            out["implausible"] = dict(self.implausible)
        return out


@dataclass(frozen=True)
class SampleResult:
    """The proxy set: where its CSV is, its size and domains, what each device's answer cost."""

    selection: str  # path of selection.csv
    selected: int
    composition: Dict[str, int]
    epsilon: Dict[str, float]
    noise_sigma: Optional[float]

    @classmethod
    def from_json(cls, result: Mapping[str, Any]) -> "SampleResult":
        return cls(
            result["selection"], result["selected"], result["composition"], result["epsilon"], result["noise_sigma"]
        )

    def to_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainOutcome:
    """The trained model file and the trainer's report (also the training job's stored result)."""

    model_path: str
    train_report: Dict[str, Any]

    @classmethod
    def from_json(cls, result: Mapping[str, Any]) -> "TrainOutcome":
        # signing needs only the model; a result written without its report (older rounds) still signs
        return cls(result["model_path"], result.get("train_report") or {})

    @classmethod
    def from_job(cls, job_result: Mapping[str, Any]) -> "TrainOutcome":
        return cls(job_result["artifact_path"], job_result["report"])

    def job_json(self) -> Dict[str, Any]:
        """What the training job stores (``artifact_path``, ``report``)."""
        return {"artifact_path": self.model_path, "report": self.train_report}

    def to_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SignResult:
    """The signed artifact the round delivers."""

    artifact_id: str
    artifact_version: int
    sha256: str
    size: int
    chunks: int

    def to_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DeliverResult:
    """Per device: the delivery's final state and what the device reported (accuracy, or a code)."""

    deliveries: Dict[str, Dict[str, Any]]

    @property
    def installed_anywhere(self) -> bool:
        return any(x["state"] == "installed" for x in self.deliveries.values())

    def to_json(self) -> Dict[str, Any]:
        return {"deliveries": {d: dict(x) for d, x in self.deliveries.items()}}
