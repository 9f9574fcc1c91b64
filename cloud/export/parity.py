"""The encoder in a second format (TFLite next to ONNX), admitted only if it computes the same features.

A probe is bound to encoder hashes: a device that has only a TFLite runtime (ai-edge-litert or
tflite-runtime) needs a TFLite encoder whose features are those of the ONNX encoder the pool was
indexed with. :func:`export_encoder_tflite` exports it and runs the parity gate on calibration
images with the device runtimes themselves (onnxruntime against LiteRT):

* features close: the cosine distance between the two artifacts' features of the same image is
  at most ``max_cosine_distance`` for every image;
* same nearest centroid: with centroids from k-means on the reference features, both artifacts
  pick the same nearest centroid for at least ``min_agreement`` (99 %) of the images.

A candidate that fails is deleted and the export refused (``QualityGateError``). One that passes
is recorded in both sidecars (``variants``: file, sha256, parity figures); :func:`accepted_encoders`
reads them, so the pool index and every probe made from it name both hashes
(``Probe.encoders``), and a device scores with whichever its runtime can load.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Any, Dict, Tuple

import numpy as np

from cloud.errors import QualityGateError
from cloud.log import LOG
from device_sdk.errors import EcosError
from device_sdk.fsutil import atomic_write_text, sha256_file
from device_sdk.protocol.envelope import read_json_file
from device_sdk.runtime import Model, load_model

MAX_COSINE_DISTANCE = 1e-3
MIN_AGREEMENT = 0.99
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ParityReport:
    """How closely a candidate artifact reproduces the reference's features on ``n`` images."""

    n: int
    k: int
    max_cosine_distance: float
    mean_cosine_distance: float
    agreement: float  # share of images with the same nearest centroid
    reference_sha256: str
    candidate_sha256: str
    candidate_runtime: str

    def passed(self, max_cosine_distance: float = MAX_COSINE_DISTANCE, min_agreement: float = MIN_AGREEMENT) -> bool:
        return self.max_cosine_distance <= max_cosine_distance and self.agreement >= min_agreement


def encoder_parity(
    reference: Model, candidate: Model, images: np.ndarray, k: int = 16, seed: int = 0, batch: int = 256
) -> ParityReport:
    """Compare two encoder artifacts on uint8 ``N x H x W x 3`` ``images`` (see the module docstring)."""
    from cloud.pool.clustering import spherical_kmeans

    if len(images) < 2:
        raise QualityGateError(f"parity needs at least 2 calibration images, got {len(images)}")
    ref = _unit(np.concatenate([reference.run(images[i : i + batch]) for i in range(0, len(images), batch)]))
    cand = _unit(np.concatenate([candidate.run(images[i : i + batch]) for i in range(0, len(images), batch)]))
    if ref.shape != cand.shape:
        raise QualityGateError(f"the candidate outputs {cand.shape[1:]} features, the reference {ref.shape[1:]}")
    distance = 1.0 - np.einsum("ij,ij->i", ref, cand)
    k = max(2, min(k, len(images) // 4))
    centroids = spherical_kmeans(ref, k, iters=20, seed=seed).centroids.astype(np.float32)
    agreement = float(np.mean((ref @ centroids.T).argmax(axis=1) == (cand @ centroids.T).argmax(axis=1)))
    return ParityReport(
        len(images),
        k,
        float(distance.max()),
        float(distance.mean()),
        agreement,
        reference.sha256,
        candidate.sha256,
        candidate.runtime,
    )


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def calibration_images(images: np.ndarray, n: int = 512, seed: int = 0) -> np.ndarray:
    """Up to ``n`` images drawn without replacement (the pool's own images are the calibration set)."""
    if len(images) <= n:
        return images
    return images[np.sort(np.random.default_rng(seed).choice(len(images), n, replace=False))]


def export_encoder_tflite(
    encoder: Any,
    meta: Any,
    onnx_path: str,
    tflite_path: str,
    images: np.ndarray,
    *,
    runtime: str = "auto",
    max_cosine_distance: float = MAX_COSINE_DISTANCE,
    min_agreement: float = MIN_AGREEMENT,
    seed: int = 0,
) -> ParityReport:
    """Export ``encoder`` (the torch module behind ``onnx_path``) to TFLite and admit it through the parity gate.

    ``images`` are the calibration images. On success both sidecars list the other artifact under
    ``variants``; on failure the TFLite file and its sidecar are removed and ``QualityGateError`` is raised.
    """
    from cloud.export.formats import export_tflite

    export_tflite(encoder, meta, tflite_path)
    try:
        report = encoder_parity(load_model(onnx_path), load_model(tflite_path, runtime), images, seed=seed)
    except Exception:
        _remove(tflite_path)
        raise
    LOG.info(
        "encoder parity %s vs %s on %d images: cosine distance max %.2e, mean %.2e; same nearest of k=%d "
        "centroids for %.2f%%",
        os.path.basename(tflite_path),
        os.path.basename(onnx_path),
        report.n,
        report.max_cosine_distance,
        report.mean_cosine_distance,
        report.k,
        100 * report.agreement,
    )
    if not report.passed(max_cosine_distance, min_agreement):
        _remove(tflite_path)
        raise QualityGateError(
            f"TFLite encoder refused: features differ from the ONNX ones (max cosine distance "
            f"{report.max_cosine_distance:.2e}, limit {max_cosine_distance:.0e}; same nearest centroid for "
            f"{100 * report.agreement:.2f}% of {report.n} images, need {100 * min_agreement:.0f}%)"
        )
    figures = {k: v for k, v in asdict(report).items() if k not in ("reference_sha256", "candidate_sha256")}
    _add_variant(onnx_path, tflite_path, "tflite", report.candidate_sha256, figures)
    _add_variant(tflite_path, onnx_path, "onnx", report.reference_sha256, figures)
    return report


def _remove(path: str) -> None:
    for p in (path, path + ".json"):
        if os.path.exists(p):
            os.remove(p)


def _read_sidecar(path: str) -> Dict[str, Any]:
    """The artifact's ``.json`` sidecar (the project's bounded JSON reader); ``{}`` when missing or unusable."""
    try:
        doc = read_json_file(path + ".json", f"{path}.json")
    except EcosError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _add_variant(path: str, other: str, fmt: str, digest: str, parity: Dict[str, Any]) -> None:
    doc = _read_sidecar(path)
    if not doc:
        raise QualityGateError(f"{path}.json: no sidecar to record the {fmt} variant in")
    variants = [v for v in doc.get("variants", []) if isinstance(v, dict) and v.get("format") != fmt]
    variants.append({"format": fmt, "file": os.path.basename(other), "sha256": digest, "parity": parity})
    doc["variants"] = variants
    atomic_write_text(path + ".json", json.dumps(doc, indent=2, sort_keys=True) + "\n")


def accepted_encoders(encoder_path: str) -> Tuple[str, ...]:
    """sha256 of the artifacts recorded as computing ``encoder_path``'s features (its sidecar's ``variants``).

    Empty when there is no sidecar, or when the sidecar's own sha256 is not the file's (a sidecar
    left from an earlier export says nothing about this file).
    """
    doc = _read_sidecar(encoder_path)
    if not doc.get("variants"):
        return ()
    if doc.get("sha256") != sha256_file(encoder_path):
        LOG.warning("%s.json describes another file (sha256 differs): its variants are ignored", encoder_path)
        return ()
    out = []
    for v in doc["variants"]:
        digest = v.get("sha256") if isinstance(v, dict) else None
        if isinstance(digest, str) and _SHA256.fullmatch(digest) and digest not in out:
            out.append(digest)
    return tuple(out)
