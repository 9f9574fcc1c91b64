"""The labelling hand-off: a selection out as Label Studio tasks or CSV, labels back in, resumable.

Export (``export_tasks``) writes, for a proxy-set selection CSV:

- ``tasks.json``: Label Studio tasks, one per image: ``{"data": {"image": URL, "ecos_path": PATH,
  "ecos_rank": RANK}}`` (plus ``predictions`` with a ``choices`` result where a pre-label is
  given). Label Studio keeps every ``data`` field through its exports, so labels come back matched
  by ``ecos_path``, never by position;
- ``tasks.csv``: ``image,ecos_path,ecos_rank,label`` with an empty label column, for a spreadsheet
  or any tool that reads CSV;
- ``label_config.xml``: the Label Studio labelling interface (an ``Image`` and single-choice
  ``Choices`` named ``label`` over the label names);
- ``labels.state.json``: the resume state: the selection, its label names and, per image, the
  label imported so far (none yet).

Import (``import_labels``) reads Label Studio's JSON export (full: ``annotations[].result[]`` with
``value.choices``; or JSON-MIN: one flat object per task, the label under ``label``) or a CSV
(Label Studio's CSV export or the filled ``tasks.csv``: columns ``ecos_path`` or ``image``, and
``label``). Rules, each a typed error naming the file:

- a label that is not one of the selection's label names: ``MismatchError`` (nothing is kept);
- a task that is not in this selection (extra): ``InputError`` (nothing is kept);
- a task with two different labels in one answer: ``MismatchError``;
- a task without an answer (skipped, cancelled, empty) stays unlabelled;
- images still unlabelled after the import (missing): the labels read so far are saved in the state
  and the command fails with ``InputError`` naming how many are missing and the first ones; a
  later import of the rest resumes from the state (``partial=True`` writes the labelled CSV anyway,
  with empty labels where none came back: unlabelled images for the semi-supervised trainer).

Several annotations of one task: the latest one that was not cancelled counts (by ``updated_at``,
then ``created_at``, then position). A label imported again for an image replaces the earlier one
and the change is counted in the state's import log.

Over 400 lines on purpose: every format of the Label Studio hand-off (tasks JSON, JSON-MIN,
CSV) and its resume state, so that export and import are checked against one definition.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

from cloud.log import LOG
from device_sdk.errors import InputError, MismatchError, UsageError
from device_sdk.fsutil import atomic_write_text
from device_sdk.protocol.envelope import read_json_file

STATE_KIND = "ecos-labelling-state"
STATE_VERSION = 1
FROM_NAME = "label"
TO_NAME = "image"
LOCAL_FILES_PREFIX = "/data/local-files/?d="
MAX_LISTED = 5  # names shown in an error message


@dataclass
class SelectionRow:
    path: str
    label: str
    domain: str
    cluster: str
    rank: str


def read_selection(csv_path: str) -> List[SelectionRow]:
    try:
        with open(csv_path, newline="", encoding="utf-8", errors="surrogateescape") as fh:  # paths: any bytes
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read selection {csv_path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not rows or "path" not in rows[0]:
        raise InputError(f"{csv_path}: not a selection CSV (header path,label,domain,cluster,rank)")
    out = [
        SelectionRow(
            r["path"],
            (r.get("label") or "").strip(),
            (r.get("domain") or "").strip(),
            r.get("cluster") or "",
            r.get("rank") or str(i),
        )
        for i, r in enumerate(rows)
    ]
    seen = set()
    for r in out:
        if r.path in seen:
            raise InputError(f"{csv_path}: image {r.path} is listed twice")
        seen.add(r.path)
    return out


def write_selection(rows: Sequence[SelectionRow], labels: Dict[str, str], path: str) -> None:
    """The selection CSV again, its label column replaced by ``labels`` (empty where none)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("path", "label", "domain", "cluster", "rank"))
    for r in rows:
        w.writerow((r.path, labels.get(r.path, ""), r.domain, r.cluster, r.rank))
    atomic_write_text(path, buf.getvalue())


def parse_label_names(text: str) -> List[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if len(names) < 2 or len(set(names)) != len(names):
        raise UsageError(f"--labels needs at least two distinct comma-separated names, got {text!r}")
    return names


def image_url(path: str, document_root: Optional[str], url_prefix: str) -> str:
    """The URL Label Studio shows: ``url_prefix`` + the path relative to ``document_root`` (URL-quoted).

    The default prefix is Label Studio's local-files route (``LOCAL_FILES_SERVING_ENABLED=true``,
    ``LOCAL_FILES_DOCUMENT_ROOT=<document_root>``).
    """
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(document_root)) if document_root else path
    if document_root and rel.startswith(".."):
        raise UsageError(f"image {path} is not under --document-root {document_root}")
    return url_prefix + quote(rel.replace(os.sep, "/"), safe="/", errors="surrogateescape")  # a non-UTF-8 byte: %XX


def label_config(labels: Sequence[str]) -> str:
    choices = "\n".join(f"    <Choice value={quoteattr(v)}/>" for v in labels)
    return (
        f'<View>\n  <Image name="{TO_NAME}" value="$image"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" showInline="true">\n'
        f"{choices}\n  </Choices>\n</View>\n"
    )


def _choice_result(label: str) -> Dict[str, Any]:
    return {"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": [label]}}


def export_tasks(
    selection_csv: str,
    labels: Sequence[str],
    out_dir: str,
    document_root: Optional[str] = None,
    url_prefix: str = LOCAL_FILES_PREFIX,
    prefill: Optional[Dict[str, Tuple[str, float]]] = None,
    model_version: str = "ecos",
) -> Dict[str, str]:
    """Write tasks.json, tasks.csv, label_config.xml and a fresh labels.state.json; returns their paths.

    ``prefill`` maps an image path to ``(label, score)``: a Label Studio prediction (pre-label)
    the labeller confirms or corrects. The selection's own label column is never exported (the
    labels are what we pay for; a pool's labels, if any, are hidden).
    """
    labels = list(labels)
    rows = read_selection(selection_csv)
    bad = sorted({lab for lab, _ in (prefill or {}).values()} - set(labels))
    if bad:
        raise MismatchError(f"pre-labels not among the label names: {', '.join(bad[:MAX_LISTED])}")
    os.makedirs(out_dir, exist_ok=True)
    tasks, urls = [], {}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("image", "ecos_path", "ecos_rank", FROM_NAME))
    for r in rows:
        url = image_url(r.path, document_root, url_prefix)
        urls[r.path] = url
        task: Dict[str, Any] = {"data": {"image": url, "ecos_path": r.path, "ecos_rank": _rank(r.rank)}}
        if prefill and r.path in prefill:
            label, score = prefill[r.path]
            task["predictions"] = [
                {"model_version": model_version, "score": float(score), "result": [_choice_result(label)]}
            ]
        tasks.append(task)
        w.writerow((url, r.path, r.rank, ""))
    paths = {
        name: os.path.join(out_dir, name)
        for name in ("tasks.json", "tasks.csv", "label_config.xml", "labels.state.json")
    }
    atomic_write_text(paths["tasks.json"], json.dumps(tasks, indent=1) + "\n")
    atomic_write_text(paths["tasks.csv"], buf.getvalue())
    atomic_write_text(paths["label_config.xml"], label_config(labels))
    state = {
        "kind": STATE_KIND,
        "version": STATE_VERSION,
        "selection": os.path.abspath(selection_csv),
        "selection_sha256": _sha256_file(selection_csv),
        "labels": labels,
        "urls": urls,
        "items": {},
        "imports": [],
    }
    LabelState(paths["labels.state.json"], state).save()
    return paths


def _rank(value: str) -> Any:
    return int(value) if value.strip().lstrip("-").isdigit() else value


def _sha256_file(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


class LabelState:
    """The resume state of one labelling job (a JSON file written atomically after every import)."""

    def __init__(self, path: str, state: Dict[str, Any]):
        self.path, self.state = path, state

    @classmethod
    def load(cls, path: str) -> "LabelState":
        state = read_json_file(path, f"labelling state {path}", InputError)
        if not isinstance(state, dict) or state.get("kind") != STATE_KIND or state.get("version") != STATE_VERSION:
            raise InputError(f"{path} is not a labelling state file (kind {STATE_KIND!r}, version {STATE_VERSION})")
        for key, typ in (("selection", str), ("labels", list), ("urls", dict), ("items", dict), ("imports", list)):
            if not isinstance(state.get(key), typ):
                raise InputError(f"labelling state {path}: field {key!r} is missing or not a {typ.__name__}")
        return cls(path, state)

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.state, indent=1) + "\n")

    @property
    def labels(self) -> List[str]:
        return list(self.state["labels"])

    def rows(self) -> List[SelectionRow]:
        rows = read_selection(self.state["selection"])
        if _sha256_file(self.state["selection"]) != self.state.get("selection_sha256"):
            raise MismatchError(
                f"selection {self.state['selection']} changed since the tasks were exported; export again"
            )
        return rows

    @property
    def items(self) -> Dict[str, str]:
        return dict(self.state["items"])

    def missing(self) -> List[str]:
        items = self.state["items"]
        return [r.path for r in self.rows() if r.path not in items]


# ---- reading exports -------------------------------------------------------------------------


def _latest_answer(task: Dict[str, Any]) -> Optional[List[Dict[str, Any]]]:
    """The result list of the task's latest non-cancelled annotation, or None."""
    anns = task.get("annotations")
    if anns is None:
        anns = task.get("completions")  # Label Studio < 1.0 wrote "completions"
    if not isinstance(anns, list):
        return None
    live = [
        (str(a.get("updated_at") or ""), str(a.get("created_at") or ""), i, a)
        for i, a in enumerate(anns)
        if isinstance(a, dict) and not a.get("was_cancelled") and isinstance(a.get("result"), list)
    ]
    if not live:
        return None
    return max(live, key=lambda t: t[:3])[3]["result"]


def _choices_of(result: Iterable[Any]) -> List[str]:
    out = []
    for item in result:
        if not isinstance(item, dict) or item.get("type") != "choices":
            continue
        if item.get("from_name", FROM_NAME) != FROM_NAME:
            continue
        choices = (item.get("value") or {}).get("choices")
        if isinstance(choices, list):
            out.extend(str(c) for c in choices)
    return out


def _min_label(value: Any) -> List[str]:
    """A JSON-MIN / CSV cell: ``"3"``, ``{"choices": ["3"]}``, or a JSON string of the latter."""
    if value is None or value == "":
        return []
    if isinstance(value, dict):
        return [str(c) for c in value.get("choices", [])]
    if isinstance(value, list):
        return [str(c) for c in value]
    text = str(value).strip()
    if text.startswith("{"):
        try:
            return _min_label(json.loads(text))
        except ValueError:
            pass
    return [text] if text else []


def read_export(path: str) -> List[Tuple[str, str, List[str]]]:
    """``(ecos_path or "", image url or "", labels)`` per task of a Label Studio JSON/JSON-MIN export or a CSV."""
    if path.lower().endswith(".csv"):
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
        if rows and not ({"ecos_path", "image", "path"} & set(rows[0])):
            raise InputError(f"{path}: a labels CSV needs an ecos_path (or image, or path) column")
        if rows and FROM_NAME not in rows[0]:
            raise InputError(f"{path}: a labels CSV needs a {FROM_NAME!r} column")
        return [
            (
                (r.get("ecos_path") or r.get("path") or "").strip(),
                (r.get("image") or "").strip(),
                _min_label(r.get(FROM_NAME)),
            )
            for r in rows
        ]
    data = read_json_file(path, f"labels export {path}", InputError)
    if not isinstance(data, list):
        raise InputError(f"{path}: a Label Studio export is a JSON list of tasks")
    out = []
    for i, task in enumerate(data):
        if not isinstance(task, dict):
            raise InputError(f"{path}: task #{i} is not an object")
        if "data" in task and isinstance(task["data"], dict):  # the full JSON export
            d = task["data"]
            result = _latest_answer(task)
            out.append(
                (
                    str(d.get("ecos_path") or ""),
                    str(d.get("image") or ""),
                    _choices_of(result) if result is not None else [],
                )
            )
        else:  # JSON-MIN: data fields and control values flattened into one object
            out.append(
                (str(task.get("ecos_path") or ""), str(task.get("image") or ""), _min_label(task.get(FROM_NAME)))
            )
    return out


def import_labels(
    state_path: str, files: Sequence[str], out_csv: Optional[str] = None, partial: bool = False
) -> Dict[str, Any]:
    """Merge the labels of ``files`` into the state; write the labelled selection CSV when complete.

    Returns a summary ``{"read", "new", "changed", "labelled", "missing", "total", "out"}``. Unknown
    labels and extra tasks refuse the whole import (the state is left as it was); missing images
    are saved as progress and then refused unless ``partial``.
    """
    st = LabelState.load(state_path)
    rows = st.rows()
    names = set(st.labels)
    by_path = {r.path for r in rows}
    by_url = {u: p for p, u in st.state["urls"].items()}
    found: Dict[str, str] = {}
    for f in files:
        unknown, extra, multi = [], [], []
        for ecos_path, url, labels in read_export(f):
            p = ecos_path if ecos_path in by_path else by_url.get(url)
            if p is None:
                extra.append(ecos_path or url or "(no ecos_path or image field)")
                continue
            distinct = sorted(set(labels))
            if not distinct:
                continue
            if len(distinct) > 1:
                multi.append(f"{p} ({', '.join(distinct)})")
                continue
            if distinct[0] not in names:
                unknown.append(f"{distinct[0]!r} for {p}")
                continue
            found[p] = distinct[0]
        if extra:
            raise InputError(
                f"{f}: {len(extra)} task(s) are not in this selection ({st.state['selection']}); first: "
                f"{', '.join(extra[:MAX_LISTED])}; nothing imported"
            )
        if unknown:
            raise MismatchError(
                f"{f}: {len(unknown)} label(s) are not among the {len(names)} label names "
                f"({', '.join(st.labels[:10])}); first: {', '.join(unknown[:MAX_LISTED])}; nothing imported"
            )
        if multi:
            raise MismatchError(
                f"{f}: {len(multi)} task(s) have more than one label; first: "
                f"{', '.join(multi[:MAX_LISTED])}; nothing imported"
            )
    items = st.state["items"]
    new = sum(1 for p in found if p not in items)
    changed = sum(1 for p, v in found.items() if p in items and items[p] != v)
    if changed:
        LOG.warning("%d image(s) got a different label than in an earlier import; the new one counts", changed)
    items.update(found)
    st.state["imports"].append(
        {
            "files": [os.path.abspath(f) for f in files],
            "read": len(found),
            "new": new,
            "changed": changed,
            "time_utc": _now(),
        }
    )
    st.save()
    missing = [r.path for r in rows if r.path not in items]
    summary = {
        "read": len(found),
        "new": new,
        "changed": changed,
        "labelled": len(rows) - len(missing),
        "missing": len(missing),
        "total": len(rows),
        "out": None,
    }
    if missing and not partial:
        raise InputError(
            f"{len(missing)} of {len(rows)} images have no label yet (first: "
            f"{', '.join(missing[:MAX_LISTED])}); the {summary['labelled']} labels so far are saved in "
            f"{state_path}: import the rest to resume, or pass --partial to train with them unlabelled"
        )
    if out_csv:
        write_selection(rows, items, out_csv)
        summary["out"] = out_csv
    return summary


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")
