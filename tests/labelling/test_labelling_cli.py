"""The two labelling tasks through the real console scripts (docs/tasks.md), on the small generated benchmark."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from device_sdk.privacy.ledger import PrivacyLedger

BIN = Path(sys.executable).parent
LABELS = ",".join(str(i) for i in range(10))


def run(tool: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / tool), *map(str, args)], capture_output=True, text=True, timeout=600)


def _selection(digits_root: Path, out: Path, n: int = 60) -> Path:
    from device_sdk.imagefolder import scan_image_folder

    items = scan_image_folder(str(digits_root / "pool"))[::5][:n]
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("path", "label", "domain", "cluster", "rank"))
        for i, it in enumerate(items):
            w.writerow((it.path, it.label, it.domain, 0, i))
    return out


def test_manual_labelling_round_trip_with_resume(digits_root, tmp_path):
    sel = _selection(digits_root, tmp_path / "sel.csv")
    job = tmp_path / "job"
    proc = run(
        "ecos-cloud",
        "export-labels",
        "--selection",
        sel,
        "--labels",
        LABELS,
        "--out-dir",
        job,
        "--document-root",
        digits_root,
    )
    assert proc.returncode == 0, proc.stderr
    tasks = json.loads((job / "tasks.json").read_text())
    assert tasks[0]["data"]["image"].startswith("/data/local-files/?d=pool/")
    state = job / "labels.state.json"
    assert (
        run(
            "ecos-cloud",
            "simulate-labels",
            "--state",
            state,
            "--truth",
            sel,
            "--fraction",
            "0.5",
            "--out",
            tmp_path / "half.json",
        ).returncode
        == 0
    )
    out = tmp_path / "labelled.csv"
    proc = run("ecos-cloud", "import-labels", "--state", state, tmp_path / "half.json", "--out", out)
    assert proc.returncode == 3 and proc.stderr.strip().splitlines()[-1].startswith("error[input]:"), proc.stderr
    assert "have no label yet" in proc.stderr and not out.exists()
    assert (
        run(
            "ecos-cloud",
            "simulate-labels",
            "--state",
            state,
            "--truth",
            sel,
            "--out",
            tmp_path / "all.csv",
            "--seed",
            "1",
        ).returncode
        == 0
    )
    proc = run("ecos-cloud", "import-labels", "--state", state, tmp_path / "all.csv", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "60 of 60 images labelled, 0 missing" in proc.stdout
    truth = {r["path"]: r["label"] for r in csv.DictReader(open(sel))}
    assert {r["path"]: r["label"] for r in csv.DictReader(open(out))} == truth
    bad = json.loads((tmp_path / "half.json").read_text())
    next(t for t in bad if t["annotations"])["annotations"][0]["result"][0]["value"]["choices"] = ["seven"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    proc = run("ecos-cloud", "import-labels", "--state", state, tmp_path / "bad.json", "--out", tmp_path / "x.csv")
    assert proc.returncode == 5 and "error[mismatch]" in proc.stderr and not (tmp_path / "x.csv").exists()


def test_client_labelling_vote_apply_and_train(digits_root, tmp_path):
    sel = _selection(digits_root, tmp_path / "sel.csv")
    query = tmp_path / "round.labelquery"
    proc = run("ecos-cloud", "label-query", "--selection", sel, "--labels", LABELS, "--groups", "12", "--out", query)
    assert proc.returncode == 0, proc.stderr
    votes, ledger = tmp_path / "printed.votes", tmp_path / "ledger.json"
    local = digits_root / "devices" / "printed" / "local"
    proc = run(
        "ecos-device",
        "label-vote",
        local,
        "--query",
        query,
        "--out",
        votes,
        "--ledger",
        ledger,
        "--epsilon",
        "2",
        "--device-id",
        "printed",
        "--budget-epsilon",
        "2.5",
    )
    assert proc.returncode == 0, proc.stderr
    assert "charged epsilon 2.0000" in proc.stdout and "L2 sensitivity 1.414" in proc.stdout
    led = PrivacyLedger(ledger)
    assert len(led.releases()) == 1 and led.releases()[0]["key"].startswith("labels:")
    # the same query again: replayed, free; a second query past the budget: refused, nothing written
    proc = run(
        "ecos-device", "label-vote", local, "--query", query, "--out", votes, "--ledger", ledger, "--epsilon", "2"
    )
    assert proc.returncode == 0 and "replayed" in proc.stdout and "charged epsilon 0.0000" in proc.stdout
    query2 = tmp_path / "second.labelquery"
    assert run("ecos-cloud", "label-query", "--selection", sel, "--labels", LABELS, "--out", query2).returncode == 0
    proc = run(
        "ecos-device",
        "label-vote",
        local,
        "--query",
        query2,
        "--out",
        tmp_path / "v2",
        "--ledger",
        ledger,
        "--epsilon",
        "2",
    )
    assert proc.returncode == 6 and "error[privacy_budget]" in proc.stderr and not (tmp_path / "v2").exists()
    labelled = tmp_path / "labelled.csv"
    proc = run("ecos-cloud", "apply-votes", "--query", query, "--votes", votes, "--out", labelled, "--min-margin", "1")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(labelled)))
    assert len(rows) == 60 and all(r["label"] in ("",) + tuple(LABELS.split(",")) for r in rows)
    n_labelled = sum(1 for r in rows if r["label"])
    assert f"{n_labelled} of 60 images labelled" in proc.stdout
    proc = run(
        "ecos-cloud", "apply-votes", "--query", query, "--votes", tmp_path / "nope.votes", "--out", tmp_path / "z"
    )
    assert proc.returncode == 3 and "error[input]" in proc.stderr and "Traceback" not in proc.stderr
    # the votes of another query do not apply
    proc = run("ecos-cloud", "apply-votes", "--query", query2, "--votes", votes, "--out", tmp_path / "y.csv")
    assert proc.returncode == 5 and "error[mismatch]" in proc.stderr
    if n_labelled >= 2:
        out_dir = tmp_path / "student"
        proc = run(
            "ecos-cloud",
            "train-semisup",
            "--selection",
            labelled,
            "--labels",
            LABELS,
            "--out-dir",
            out_dir,
            "--epochs",
            "1",
            "--min-steps",
            "4",
            "--width",
            "8",
            "--unlabelled",
            "0",
            "--formats",
            "onnx",
            "--min-agreement",
            "0",
            "--max-drop",
            "100",
            "--threads",
            "1",
        )
        assert proc.returncode == 0, proc.stderr
        assert (out_dir / "student.safetensors").exists() and (out_dir / "student.int8.onnx").exists()


def test_offline_label_queries_are_signed_and_checked_like_probes(digits_root, tmp_path):
    from cloud.security.keys import generate_keypair

    private, public = generate_keypair(tmp_path / "keys")
    sel = _selection(digits_root, tmp_path / "sel.csv", n=20)
    local = digits_root / "devices" / "printed" / "local"
    signed, unsigned = tmp_path / "signed.labelquery", tmp_path / "unsigned.labelquery"
    common = ("--selection", sel, "--labels", LABELS, "--groups", "4")
    assert run("ecos-cloud", "label-query", *common, "--out", signed, "--signing-key", private).returncode == 0
    proc = run("ecos-cloud", "label-query", *common, "--out", unsigned)
    assert proc.returncode == 0 and "not signed" in proc.stderr
    vote = ("label-vote", local, "--ledger", tmp_path / "ledger.json", "--epsilon", "1", "--trusted-key", public)
    proc = run("ecos-device", *vote, "--query", unsigned, "--out", tmp_path / "u.votes")
    assert proc.returncode == 10 and "error[unsigned]" in proc.stderr and not (tmp_path / "u.votes").exists()
    assert not (tmp_path / "ledger.json").exists()  # refused before the ledger was opened
    proc = run("ecos-device", *vote, "--query", signed, "--out", tmp_path / "s.votes")
    assert proc.returncode == 0, proc.stderr
    assert len(PrivacyLedger(tmp_path / "ledger.json").releases()) == 1
    # another key's signature: refused; --accept-unsigned does not let a badly signed query through
    other, _ = generate_keypair(tmp_path / "other")
    forged = tmp_path / "forged.labelquery"
    assert run("ecos-cloud", "label-query", *common, "--out", forged, "--signing-key", other).returncode == 0
    proc = run("ecos-device", *vote, "--accept-unsigned", "--query", forged, "--out", tmp_path / "f.votes")
    assert proc.returncode == 10 and "error[unknown_key]" in proc.stderr
    proc = run("ecos-device", *vote, "--accept-unsigned", "--query", unsigned, "--out", tmp_path / "u.votes")
    assert proc.returncode == 0 and "unsigned and accepted" in proc.stderr


def test_label_vote_skips_unreadable_images_as_score_does(digits_root, tmp_path):
    """A half-written or junk file in the labelled folder is skipped with a warning (count and reason);
    the vote is made from the readable images; a folder with none readable is still an error."""
    import shutil

    sel = _selection(digits_root, tmp_path / "sel.csv")
    query = tmp_path / "round.labelquery"
    assert run("ecos-cloud", "label-query", "--selection", sel, "--labels", LABELS, "--out", query).returncode == 0
    local = tmp_path / "local"
    shutil.copytree(digits_root / "devices" / "printed" / "local", local)
    readable = sum(1 for p in local.rglob("*.png"))
    (local / "3" / "junk.png").write_text("not a picture")
    (local / "7" / "empty.jpg").write_bytes(b"")
    args = ("--query", query, "--ledger", tmp_path / "ledger.json", "--epsilon", "2")
    proc = run("ecos-device", "label-vote", local, *args, "--out", tmp_path / "votes")
    assert proc.returncode == 0, proc.stderr
    assert "2 unreadable image(s) skipped" in proc.stderr and "junk.png" in proc.stderr
    assert f"from {readable} labelled images" in proc.stdout
    bad = tmp_path / "bad"
    (bad / "1").mkdir(parents=True)
    (bad / "1" / "junk.png").write_text("not a picture")
    proc = run("ecos-device", "label-vote", bad, *args, "--out", tmp_path / "votes2")
    assert proc.returncode == 3 and "no readable labelled image" in proc.stderr and not (tmp_path / "votes2").exists()
