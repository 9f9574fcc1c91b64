"""A simulated labeller, for benchmarks and the demo: it reveals the pool's hidden labels.

``simulate_labels`` answers each image with its true label (from a CSV ``path,label``, e.g. the
selection as ``ecos-cloud sample`` wrote it from a labelled pool folder) or, with probability
``error_rate``, with another label drawn uniformly; ``fraction`` < 1 answers only a random part
of the tasks (a labelling job half done, to exercise resuming). ``write_labelstudio_export``
writes the answers as Label Studio's full JSON export, so the import path is the real one.
"""

from __future__ import annotations

import csv
import json
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence

import numpy as np

from cloud.labelling.labelstudio import FROM_NAME, TO_NAME, LabelState, _rank
from device_sdk.errors import InputError, UsageError
from device_sdk.fsutil import atomic_write_text


def read_truth(csv_path: str) -> Dict[str, str]:
    try:
        with open(csv_path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {csv_path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not rows or "path" not in rows[0] or "label" not in rows[0]:
        raise InputError(f"{csv_path}: the truth CSV needs path and label columns")
    return {r["path"]: (r["label"] or "").strip() for r in rows}


def simulate_labels(
    paths: Sequence[str],
    truth: Dict[str, str],
    labels: Sequence[str],
    error_rate: float = 0.0,
    fraction: float = 1.0,
    seed: int = 0,
) -> Dict[str, str]:
    """``{path: label}`` for a ``fraction`` of ``paths``; each wrong with probability ``error_rate``.

    An image whose true label is not one of ``labels`` (out-of-class junk) is skipped, as a
    labeller would: it stays unlabelled.
    """
    if not 0.0 <= error_rate <= 1.0 or not 0.0 <= fraction <= 1.0:
        raise UsageError(f"error_rate and fraction must be in [0, 1] (got {error_rate}, {fraction})")
    missing = [p for p in paths if p not in truth]
    if missing:
        raise InputError(f"{len(missing)} image(s) have no true label in the truth file; first: {missing[0]}")
    rng = np.random.default_rng(seed)
    labels = list(labels)
    answer = rng.random(len(paths)) < fraction
    wrong = rng.random(len(paths)) < error_rate
    out = {}
    for p, a, w in zip(paths, answer, wrong):
        if not a:
            continue
        true = truth[p]
        if true not in labels:
            continue
        if w:
            others = [v for v in labels if v != true]
            out[p] = others[int(rng.integers(len(others)))]
        else:
            out[p] = true
    return out


def labelstudio_export(answers: Dict[str, str], state: LabelState) -> List[dict]:
    """Label Studio's full JSON export format: tasks with ``data`` and one annotation each."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    tasks = []
    for i, r in enumerate(state.rows()):
        task = {
            "id": i + 1,
            "data": {"image": state.state["urls"].get(r.path, r.path), "ecos_path": r.path, "ecos_rank": _rank(r.rank)},
            "annotations": [],
            "predictions": [],
        }
        if r.path in answers:
            task["annotations"].append(
                {
                    "id": i + 1,
                    "completed_by": 1,
                    "was_cancelled": False,
                    "ground_truth": False,
                    "created_at": now,
                    "updated_at": now,
                    "lead_time": 1.0,
                    "result": [
                        {
                            "id": f"r{i}",
                            "from_name": FROM_NAME,
                            "to_name": TO_NAME,
                            "type": "choices",
                            "origin": "manual",
                            "value": {"choices": [answers[r.path]]},
                        }
                    ],
                }
            )
        tasks.append(task)
    return tasks


def write_labelstudio_export(answers: Dict[str, str], state: LabelState, out: str, fmt: Optional[str] = None) -> None:
    """The answers as Label Studio's JSON export (``.json``) or its CSV export (``.csv``)."""
    fmt = fmt or ("csv" if out.lower().endswith(".csv") else "json")
    if fmt == "json":
        atomic_write_text(out, json.dumps(labelstudio_export(answers, state), indent=1) + "\n")
        return
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("image", "ecos_path", "ecos_rank", "id", FROM_NAME, "annotator", "annotation_id"))
    for i, r in enumerate(state.rows()):
        if r.path in answers:
            w.writerow((state.state["urls"].get(r.path, r.path), r.path, r.rank, i + 1, answers[r.path], 1, i + 1))
    atomic_write_text(out, buf.getvalue())
