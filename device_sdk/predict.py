"""Run a shipped classifier on the device: images in, labels and probabilities out.

The artifact says how to preprocess (size, channels, fitting, mean, std: device_sdk/preprocess.py)
and what its outputs mean (labels), so
the caller only picks images, and optionally a runtime. ONNX and TFLite artifacts, fp32 and
int8, behave the same from here; a TFLite model takes one image at a time and the runtime
loops over a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from device_sdk.errors import ArtifactError, MismatchError
from device_sdk.imagefolder import ImageItem, batched
from device_sdk.runtime import Model, load_model


@dataclass(frozen=True)
class Prediction:
    path: str
    label: str
    probability: float
    truth: str = ""  # the image's parent folder name: its label, if the folder is one


@dataclass(frozen=True)
class Evaluation:
    images: int
    labelled: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.labelled if self.labelled else float("nan")


class Predictor:
    """A loaded classifier artifact with batch and single-image prediction."""

    def __init__(self, model: Model):
        if model.meta.kind != "classifier" or not model.meta.labels:
            raise ArtifactError(
                f"{model.path}: a {model.meta.kind!r} artifact with {len(model.meta.labels)} labels is not a classifier"
            )
        self.model = model
        self.labels = list(model.meta.labels)

    @classmethod
    def open(
        cls, path: str, runtime: str = "auto", threads: int = 1, expected_sha256: Optional[str] = None
    ) -> "Predictor":
        return cls(load_model(path, runtime=runtime, threads=threads, expected_sha256=expected_sha256))

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Softmax over the labels for uint8 NHWC ``images`` (one image: add a batch axis)."""
        logits = self.model.run(images)
        if logits.ndim != 2 or logits.shape[1] != len(self.labels):
            raise MismatchError(
                f"{self.model.path}: output shape {logits.shape} does not match {len(self.labels)} labels"
            )
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def predict_items(
        self,
        items: Sequence[ImageItem],
        strict: bool = False,
        batch: int = 256,
        progress: Optional[Callable[[int, int], None]] = None,
        unreadable: Optional[List[Tuple[str, str]]] = None,
    ) -> List[Prediction]:
        """Predict image files; ``strict`` refuses an image of the wrong size instead of resizing it.

        An unreadable file is an ``InputError``; with an ``unreadable`` list (and not ``strict``) it is
        skipped (no prediction) and ``(path, reason)`` appended to the list."""
        spec = self.model.meta.preprocessing()
        out: List[Prediction] = []
        for start, chunk in batched(items, batch):
            kept = chunk
            if unreadable is None or strict:
                probs = self.probabilities(spec.decode_many([it.path for it in chunk], strict=strict))
            else:
                images, ok = spec.decode_readable([it.path for it in chunk], unreadable)
                kept = [it for it, good in zip(chunk, ok) if good]
                probs = self.probabilities(images) if kept else np.zeros((0, len(self.labels)))
            best = probs.argmax(axis=1)
            out.extend(
                Prediction(it.path, self.labels[k], float(probs[i, k]), it.label)
                for i, (it, k) in enumerate(zip(kept, best))
            )
            if progress is not None:
                progress(start + len(chunk), len(items))
        return out


def evaluate(predictions: Sequence[Prediction], labels: Sequence[str]) -> Evaluation:
    """Accuracy over the images whose folder name is one of the model's ``labels``.

    Other folder names (``photos/``, ``local/``) are not labels, so those images are not judged.
    """
    known = set(labels)
    judged = [p.label == p.truth for p in predictions if p.truth in known]
    return Evaluation(len(predictions), len(judged), sum(judged))
