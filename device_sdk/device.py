"""The device's side of an ECOS round, independent of how messages travel.

``answer_probe`` turns a probe and the device's local features into a scores message, spending
privacy budget through the ledger (the only way to spend): the noise is drawn inside the
ledger's ``release`` call, after the budget check, and a repeated probe id replays the stored
answer for free. Used by the ``ecos-device score`` command and by the MQTT agent alike.

With a trust store (``trust=``) the probe's signature is checked first (``verify_probe``):
unsigned or wrongly signed probes are refused before anything is computed or charged. A probe
that reuses the id of an answered probe with other content is refused too (``ProbeConflict``),
never charged as a new question.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Optional, Tuple

import numpy as np

from device_sdk.errors import ProbeConflict, UsageError
from device_sdk.privacy.accounting import calibrate_sigma, gaussian_noise
from device_sdk.privacy.accounting import epsilon as compose_epsilon
from device_sdk.privacy.ledger import PrivacyLedger, ReleaseResult
from device_sdk.protocol.round import Probe, Scores
from device_sdk.runtime import Model
from device_sdk.scoring import check_compatible, coverage_counts
from device_sdk.trust import verify_probe


def resolve_sigma(ledger: PrivacyLedger, epsilon: Optional[float], sigma: Optional[float]) -> float:
    """The noise scale of one release: given directly, or calibrated to ``epsilon`` at the ledger's delta."""
    if (epsilon is None) == (sigma is None):
        raise UsageError("give exactly one of epsilon (per release) or sigma (noise scale)")
    if sigma is not None:
        if not sigma > 0:
            raise UsageError(f"sigma must be > 0 (got {sigma}); a device never releases exact counts")
        return float(sigma)
    _, delta = ledger.budget
    return calibrate_sigma(float(epsilon), delta, 1.0, ledger.accountant)


def release_key(probe: Probe) -> str:
    """Ledger key of a probe: its id plus a digest of its content.

    A repeat of the same probe replays the stored answer for free; a different probe that
    reuses an id is refused (``ProbeConflict``): never answered with old counts, never charged.
    """
    h = hashlib.sha256(np.ascontiguousarray(probe.centroids, dtype=np.float32).tobytes())
    h.update(f"{probe.encoder_sha256}|{probe.max_distance}".encode())
    if probe.radii is not None:
        h.update(np.ascontiguousarray(probe.radii, dtype=np.float32).tobytes())
    return f"{probe.probe_id}:{h.hexdigest()[:16]}"


def _same_id_other_content(probe: Probe) -> Callable[[str], bool]:
    """Predicate over ledger keys: a release for this probe id made for other content."""
    key = release_key(probe)
    prefix = key.rsplit(":", 1)[0] + ":"
    return lambda other: other != key and other.startswith(prefix) and ":" not in other[len(prefix) :]


def check_probe_conflict(probe: Probe, ledger: PrivacyLedger) -> None:
    """Refuse (``ProbeConflict``) a probe whose id was answered for other content; before any work.

    ``answer_probe`` checks again under the ledger's lock; this early check spares the encoding.
    """
    conflicts = _same_id_other_content(probe)
    if any(conflicts(r["key"]) for r in ledger.releases()):
        raise ProbeConflict(
            f"probe {probe.probe_id[:40]} was answered before with other content; "
            "refused, nothing charged (a new question needs a new probe id)"
        )


def answer_probe(
    probe: Probe,
    model: Model,
    features: np.ndarray,
    ledger: PrivacyLedger,
    *,
    epsilon: Optional[float] = None,
    sigma: Optional[float] = None,
    commit: Callable[[bytes], None] = lambda payload: None,
    rng: Optional[np.random.Generator] = None,
    trust: Any = None,
    accept_unsigned: bool = False,
) -> Tuple[Scores, ReleaseResult]:
    """Score ``features`` against ``probe``, add calibrated Gaussian noise, charge the ledger.

    ``trust`` (a ``TrustStore`` or ``DeviceTrust``): the probe must be signed by a trusted,
    unrevoked key (unsigned ones pass only with ``accept_unsigned``); checked first. Without
    ``trust`` the probe is not verified: the caller has (the agent and ``ecos-device score``
    verify before they encode a single image) or runs offline by choice.
    ``commit(payload)`` delivers the message (writes the file, publishes it); if it raises, the
    ledger is rolled back. ``rng`` is for tests only: a device's noise must be unpredictable.
    """
    verify_probe(probe, trust, accept_unsigned)
    check_compatible(probe, model)
    noise_sigma = resolve_sigma(ledger, epsilon, sigma)
    _, delta = ledger.budget
    release_eps = compose_epsilon([(noise_sigma, 1.0)], delta, ledger.accountant)

    def produce() -> bytes:
        # One histogram (K bins, plus the far bin when the probe asks for coverage), one noise draw per
        # bin, one release: every sample is in exactly one bin, so the sensitivity stays 1.
        counts = coverage_counts(features, probe.centroids, probe.max_distance, radii=probe.radii)
        noisy = counts + gaussian_noise(len(counts), noise_sigma, rng)
        far = None if probe.radii is None else float(noisy[-1])
        return Scores(
            probe.probe_id,
            ledger.device_id,
            probe.encoder_sha256,
            noisy[: probe.k],
            noise_sigma,
            1.0,
            release_eps,
            delta,
            ledger.accountant,
            far=far,
        ).to_bytes()

    n_values = probe.k + (probe.radii is not None)
    result = ledger.release(
        release_key(probe), noise_sigma, 1.0, n_values, produce, commit, conflicts=_same_id_other_content(probe)
    )
    return Scores.from_bytes(result.payload, "released scores"), result
