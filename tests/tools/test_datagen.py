"""The generated Digits benchmark: shapes, determinism, layouts, errors and domain separability."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cloud.tools.datagen import cli, digits, renderers
from cloud.tools.datagen.digits import DOMAINS, PREVIEW_NAME, generate, image_rng, render
from device_sdk.errors import UsageError
from device_sdk.imagefolder import load_image, scan_image_folder


def _digests(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_label_renders_a_32x32_rgb_image(domain):
    rng = np.random.default_rng(0)
    for label in range(10):
        image = render(domain, label, rng)
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert image.std() > 10, "the digit must stand out from its background"


def test_font_domains_fall_back_to_pillows_font_without_truetype_files(monkeypatch):
    monkeypatch.setattr(renderers, "_font_paths", lambda: (None,))
    for domain in ("printed", "street", "synthetic"):
        image = render(domain, 4, np.random.default_rng(1))
        assert image.shape == (32, 32, 3) and image.std() > 10


def test_render_is_deterministic_per_seed():
    for domain in DOMAINS:
        a = render(domain, 7, np.random.default_rng(5))
        assert np.array_equal(a, render(domain, 7, np.random.default_rng(5)))
        assert not np.array_equal(a, render(domain, 7, np.random.default_rng(6)))


def test_unknown_domain_is_a_usage_error_listing_valid_names(tmp_path):
    with pytest.raises(UsageError, match="valid domains: handwritten, printed"):
        render("mnist", 3, np.random.default_rng(0))
    with pytest.raises(UsageError, match="unknown domain"):
        generate(tmp_path / "out", per_domain=10, domains=["lcd", "nope"])
    assert not (tmp_path / "out").exists()


def test_invalid_counts_and_layout_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="per-domain"):
        generate(tmp_path / "a", per_domain=-1)
    with pytest.raises(UsageError, match="layout"):
        generate(tmp_path / "b", per_domain=10, layout="nested")


def test_flat_layout_is_a_balanced_image_folder(tmp_path):
    summary = generate(tmp_path, per_domain=25, domains=("printed", "lcd"), layout="flat", seed=3)
    items = scan_image_folder(tmp_path)
    assert len(items) == 50 == summary["total_images"]
    assert {it.domain for it in items} == {"printed", "lcd"}
    per_label = Counter(it.label for it in items if it.domain == "lcd")
    assert sorted(per_label) == [str(k) for k in range(10)] and set(per_label.values()) == {2, 3}
    first = items[0]
    assert Path(first.path).name == f"{first.domain}_{first.label}_{int(first.label):05d}.png"
    assert load_image(first.path, (32, 32), strict=True).shape == (32, 32, 3)
    manifest = json.loads((tmp_path / "dataset.json").read_text())
    assert manifest["counts"]["lcd"]["pool"]["0"] == 3 and manifest["layout"] == "flat" and manifest["complete"]
    assert (tmp_path / PREVIEW_NAME).is_file()


def test_benchmark_layout_has_pool_and_one_device_per_domain(tmp_path):
    generate(tmp_path, per_domain=20, domains=("handwritten", "street"), device_local=10, device_test=30, seed=1)
    pool = scan_image_folder(tmp_path / "pool")
    assert Counter(it.domain for it in pool) == {"handwritten": 20, "street": 20}
    devices = scan_image_folder(tmp_path / "devices")
    assert Counter(it.domain for it in devices) == {
        "handwritten/local": 10,
        "handwritten/test": 30,
        "street/local": 10,
        "street/test": 30,
    }
    test_split = scan_image_folder(tmp_path / "devices" / "street" / "test")
    assert Counter(it.label for it in test_split) == {str(k): 3 for k in range(10)}
    manifest = json.loads((tmp_path / "dataset.json").read_text())
    assert manifest["total_images"] == 120 and manifest["counts"]["street"]["local"]["9"] == 1
    digests = _digests(tmp_path)
    images = [d for name, d in digests.items() if name.endswith(".png") and not name.startswith(".")]
    assert len(set(images)) == len(images) == 120, "every image is a distinct draw"


def test_same_seed_gives_identical_files_whatever_the_workers_and_domain_subset(tmp_path):
    generate(tmp_path / "a", per_domain=30, domains=("printed", "lcd"), device_local=10, device_test=10, seed=4)
    generate(tmp_path / "b", per_domain=30, domains=("lcd",), device_local=10, device_test=10, seed=4, workers=2)
    generate(tmp_path / "c", per_domain=30, domains=("lcd",), device_local=10, device_test=10, seed=5)
    a, b, c = (_digests(tmp_path / name) for name in "abc")
    lcd = [name for name in b if name.endswith(".png") and "lcd" in name]
    assert len(lcd) == 50 and all(a[name] == b[name] for name in lcd)
    assert all(b[name] != c[name] for name in lcd)


def _interrupted(*args):
    raise KeyboardInterrupt


def test_refuses_a_non_empty_folder_unless_overwriting_an_earlier_output(tmp_path):
    generate(tmp_path, per_domain=20, domains=("lcd",), layout="flat")
    with pytest.raises(UsageError, match="--overwrite"):
        generate(tmp_path, per_domain=10, domains=("lcd",), layout="flat")
    generate(tmp_path, per_domain=10, domains=("lcd",), layout="flat", overwrite=True)
    assert len(scan_image_folder(tmp_path)) == 10, "no stale image of the bigger run is left"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not written by ecos-make-digits"):
        generate(foreign, per_domain=10, overwrite=True)


def test_an_interrupted_run_is_marked_incomplete_and_can_be_replaced(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(digits, "_run_chunks", _interrupted)
        with pytest.raises(KeyboardInterrupt):
            generate(tmp_path, per_domain=10, domains=("lcd",))
    assert json.loads((tmp_path / "dataset.json").read_text())["complete"] is False
    generate(tmp_path, per_domain=10, domains=("lcd",), overwrite=True)
    assert json.loads((tmp_path / "dataset.json").read_text())["complete"] is True


def test_cli_writes_a_data_set_and_reports_errors_on_one_line(tmp_path, capsys):
    out = tmp_path / "digits"
    assert cli.main([str(out), "--per-domain", "10", "--domains", "lcd,printed", "--layout", "flat", "--quiet"]) == 0
    assert len(scan_image_folder(out)) == 20
    assert cli.main([str(tmp_path / "x"), "--domains", "lcd,mnist", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error[usage]: unknown domain(s) mnist; valid domains:")


def _style_features(images: np.ndarray) -> np.ndarray:
    """Colour and texture statistics that ignore which digit is drawn."""
    x = images.astype(np.float32)
    grey = x.mean(axis=3)
    gx, gy = np.abs(np.diff(grey, axis=2))[:, :-1], np.abs(np.diff(grey, axis=1))[:, :, :-1]
    edges = gx + gy
    return np.column_stack(
        [
            x.mean(axis=(1, 2)),
            x.std(axis=(1, 2)),
            (x.max(axis=3) - x.min(axis=3)).mean(axis=(1, 2)),
            (edges > 40).mean(axis=(1, 2)),
            edges.mean(axis=(1, 2)),
            (grey < 50).mean(axis=(1, 2)),
            (grey > 200).mean(axis=(1, 2)),
        ]
    )


def test_domains_are_told_apart_by_simple_style_statistics():
    n_train, n_test = 60, 30
    feats, domains = [], []
    for d, domain in enumerate(DOMAINS):
        images = np.stack([render(domain, i % 10, image_rng(9, domain, "pool", i)) for i in range(n_train + n_test)])
        feats.append(_style_features(images))
        domains.append(np.full(n_train + n_test, d))
    train = np.concatenate([f[:n_train] for f in feats])
    test = np.concatenate([f[n_train:] for f in feats])
    test_domain = np.concatenate([d[n_train:] for d in domains])
    mu, sigma = train.mean(axis=0), train.std(axis=0) + 1e-6
    centres = np.stack([((f[:n_train] - mu) / sigma).mean(axis=0) for f in feats])
    distance = (((test - mu) / sigma)[:, None, :] - centres[None]) ** 2
    accuracy = float((distance.sum(axis=2).argmin(axis=1) == test_domain).mean())
    assert accuracy >= 0.8, f"nearest-domain-mean accuracy {accuracy:.2f}"
