"""The labelling hand-off: Label Studio / CSV export and import, resume, errors; the simulated labeller."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from cloud.labelling.labelstudio import LabelState, export_tasks, import_labels, read_export
from cloud.labelling.simulate import labelstudio_export, simulate_labels, write_labelstudio_export
from device_sdk.errors import InputError, MismatchError

LABELS = ["cat", "dog", "fox"]


@pytest.fixture
def job(tmp_path):
    """A 12-image selection under a pool folder, exported; returns (state path, truth, tmp_path)."""
    pool = tmp_path / "pool"
    rows, truth = [], {}
    for i in range(12):
        label = LABELS[i % 3]
        path = pool / "siteA" / label / f"img {i}.png"  # a space: URLs must be quoted
        rows.append((str(path), label, "siteA", i % 4, i))
        truth[str(path)] = label
    sel = tmp_path / "sel.csv"
    with open(sel, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("path", "label", "domain", "cluster", "rank"))
        w.writerows(rows)
    paths = export_tasks(str(sel), LABELS, str(tmp_path / "job"), document_root=str(pool))
    return paths, truth, tmp_path


def test_export_writes_label_studio_tasks_csv_and_config(job):
    paths, truth, _ = job
    tasks = json.load(open(paths["tasks.json"]))
    assert len(tasks) == 12
    first = tasks[0]["data"]
    assert first["image"] == "/data/local-files/?d=siteA/cat/img%200.png"
    assert first["ecos_path"] in truth and first["ecos_rank"] == 0
    assert all("label" not in t["data"] for t in tasks)  # the hidden labels are not handed out
    config = open(paths["label_config.xml"]).read()
    assert '<Choices name="label" toName="image"' in config and '<Choice value="fox"/>' in config
    rows = list(csv.DictReader(open(paths["tasks.csv"])))
    assert [r["label"] for r in rows] == [""] * 12 and rows[3]["ecos_path"] in truth


def test_prefill_becomes_predictions(tmp_path, job):
    paths, truth, base = job
    state = LabelState.load(paths["labels.state.json"])
    pre = {p: ("dog", 0.7) for p in list(truth)[:2]}
    out = export_tasks(state.state["selection"], LABELS, str(base / "job2"), prefill=pre)
    tasks = json.load(open(out["tasks.json"]))
    pred = tasks[0]["predictions"][0]
    assert pred["result"][0]["value"]["choices"] == ["dog"] and pred["result"][0]["type"] == "choices"
    assert pred["result"][0]["from_name"] == "label" and pred["result"][0]["to_name"] == "image"
    assert "predictions" not in tasks[5]
    with pytest.raises(MismatchError):
        export_tasks(state.state["selection"], LABELS, str(base / "job3"), prefill={list(truth)[0]: ("cow", 1.0)})


def test_json_round_trip(job):
    paths, truth, base = job
    state = LabelState.load(paths["labels.state.json"])
    export = base / "export.json"
    write_labelstudio_export(simulate_labels(list(truth), truth, LABELS), state, str(export))
    tasks = json.load(open(export))
    assert tasks[0]["annotations"][0]["result"][0]["value"]["choices"] == [truth[tasks[0]["data"]["ecos_path"]]]
    out = base / "labelled.csv"
    summary = import_labels(paths["labels.state.json"], [str(export)], str(out))
    assert summary["labelled"] == 12 and summary["missing"] == 0
    got = {r["path"]: r["label"] for r in csv.DictReader(open(out))}
    assert got == truth


def test_csv_round_trip_and_label_studio_csv_and_json_min(job):
    paths, truth, base = job
    rows = list(csv.DictReader(open(paths["tasks.csv"])))
    filled = base / "filled.csv"
    with open(filled, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow(dict(r, label=truth[r["ecos_path"]]))
    assert import_labels(paths["labels.state.json"], [str(filled)], str(base / "a.csv"))["labelled"] == 12
    # Label Studio's own CSV export (matched by image URL only) and JSON-MIN
    state = LabelState.load(paths["labels.state.json"])
    ls_csv = base / "ls.csv"
    write_labelstudio_export(truth, state, str(ls_csv))
    assert len(read_export(str(ls_csv))) == 12
    minimal = [{"image": state.state["urls"][p], "id": i, "label": v} for i, (p, v) in enumerate(truth.items())]
    (base / "min.json").write_text(json.dumps(minimal))
    got = read_export(str(base / "min.json"))
    assert got[0] == ("", state.state["urls"][list(truth)[0]], [list(truth.values())[0]])
    assert import_labels(paths["labels.state.json"], [str(base / "min.json")], str(base / "b.csv"))["changed"] == 0


def test_missing_labels_are_saved_then_resumed(job):
    paths, truth, base = job
    state = LabelState.load(paths["labels.state.json"])
    first = simulate_labels(list(truth), truth, LABELS, fraction=0.5, seed=3)
    assert 0 < len(first) < 12
    write_labelstudio_export(first, state, str(base / "part1.json"))
    out = base / "labelled.csv"
    with pytest.raises(InputError, match="have no label yet"):
        import_labels(paths["labels.state.json"], [str(base / "part1.json")], str(out))
    assert not out.exists()
    assert len(LabelState.load(paths["labels.state.json"]).items) == len(first)  # progress kept
    partial = import_labels(paths["labels.state.json"], [], str(base / "partial.csv"), partial=True)
    assert partial["missing"] == 12 - len(first)
    empties = [r for r in csv.DictReader(open(base / "partial.csv")) if not r["label"]]
    assert len(empties) == 12 - len(first)
    rest = {p: v for p, v in truth.items() if p not in first}
    write_labelstudio_export(rest, state, str(base / "part2.json"))
    summary = import_labels(paths["labels.state.json"], [str(base / "part2.json")], str(out))
    assert summary["new"] == len(rest) and summary["missing"] == 0
    assert {r["path"]: r["label"] for r in csv.DictReader(open(out))} == truth


@pytest.mark.parametrize(
    "defect, error, match",
    [
        ("unknown", MismatchError, "not among the 3 label names"),
        ("extra", InputError, "not in this selection"),
        ("multi", MismatchError, "more than one label"),
    ],
)
def test_bad_exports_are_refused_and_keep_nothing(job, defect, error, match):
    paths, truth, base = job
    state = LabelState.load(paths["labels.state.json"])
    tasks = labelstudio_export(truth, state)
    if defect == "unknown":
        tasks[4]["annotations"][0]["result"][0]["value"]["choices"] = ["cow"]
    elif defect == "extra":
        tasks.append({"data": {"image": "/x.png", "ecos_path": "/elsewhere/x.png"}, "annotations": []})
    else:
        tasks[4]["annotations"][0]["result"][0]["value"]["choices"] = ["cat", "dog"]
    (base / "bad.json").write_text(json.dumps(tasks))
    with pytest.raises(error, match=match):
        import_labels(paths["labels.state.json"], [str(base / "bad.json")], str(base / "out.csv"))
    assert LabelState.load(paths["labels.state.json"]).items == {}
    assert not (base / "out.csv").exists()


def test_latest_annotation_counts_and_cancelled_ones_do_not(job):
    paths, truth, base = job
    state = LabelState.load(paths["labels.state.json"])
    tasks = labelstudio_export(truth, state)
    p0 = tasks[0]["data"]["ecos_path"]
    ann = tasks[0]["annotations"][0]
    older = json.loads(json.dumps(ann))
    older["updated_at"] = "2000-01-01T00:00:00+00:00"
    older["result"][0]["value"]["choices"] = ["fox"]
    cancelled = json.loads(json.dumps(ann))
    cancelled["updated_at"] = "2999-01-01T00:00:00+00:00"
    cancelled["was_cancelled"] = True
    cancelled["result"][0]["value"]["choices"] = ["dog"]
    tasks[0]["annotations"] = [older, ann, cancelled]
    (base / "multi.json").write_text(json.dumps(tasks))
    import_labels(paths["labels.state.json"], [str(base / "multi.json")], str(base / "out.csv"))
    assert LabelState.load(paths["labels.state.json"]).items[p0] == truth[p0]


def test_changed_selection_is_refused(job):
    paths, truth, base = job
    state = LabelState.load(paths["labels.state.json"])
    with open(state.state["selection"], "a") as fh:
        fh.write("/extra.png,cat,siteA,0,99\n")
    with pytest.raises(MismatchError, match="changed since"):
        import_labels(paths["labels.state.json"], [], None, partial=True)


def test_corrupt_inputs_are_typed_errors(job):
    paths, _, base = job
    (base / "junk.json").write_text("{not json")
    with pytest.raises(InputError):
        import_labels(paths["labels.state.json"], [str(base / "junk.json")])
    (base / "nolabel.csv").write_text("image,ecos_path\n/x,/y\n")
    with pytest.raises(InputError, match="'label' column"):
        read_export(str(base / "nolabel.csv"))
    (base / "state.json").write_text("[]")
    with pytest.raises(InputError, match="not a labelling state"):
        LabelState.load(str(base / "state.json"))


def test_simulated_labeller_error_rate_and_junk():
    paths = [f"/p/{i}.png" for i in range(4000)]
    truth = {p: LABELS[i % 3] for i, p in enumerate(paths)}
    truth[paths[0]] = "other"  # out of class: skipped
    got = simulate_labels(paths, truth, LABELS, error_rate=0.2, seed=1)
    assert paths[0] not in got and len(got) == 3999
    wrong = np.mean([got[p] != truth[p] for p in got])
    assert 0.17 < wrong < 0.23
    assert all(v in LABELS for v in got.values())
    assert simulate_labels(paths, truth, LABELS, error_rate=0.0, seed=1) == {
        p: v for p, v in truth.items() if v != "other"
    }
    with pytest.raises(InputError):
        simulate_labels(["/nope.png"], truth, LABELS)


def test_a_file_name_that_is_not_utf8_becomes_a_percent_escaped_url(tmp_path):
    """A selection CSV keeps such a name as its own bytes (surrogate-escaped); its URL quotes each byte."""
    from cloud.labelling.labelstudio import image_url

    name = b"caf\xe9.png".decode("utf-8", "surrogateescape")
    url = image_url(str(tmp_path / "pool" / name), str(tmp_path), "/data/local-files/?d=")
    assert url == "/data/local-files/?d=pool/caf%E9.png"
