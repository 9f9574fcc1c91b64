"""The two distributions, built as wheels from a copy of the checkout (no network, a few seconds).

- ``ecos-fleet-device`` (packaging/device/pyproject.toml): only ``device_sdk/`` and the ``ecos-device``
  command; no torch, no cloud code, no cloud command. This is what a Raspberry Pi installs.
- ``ecos-fleet`` (pyproject.toml): ``cloud/``, ``models/`` and the cloud commands; it depends on
  ``ecos-fleet-device`` pinned to the same version and ships no device_sdk file, so the two never
  write the same file into one environment.

PyPI's ``ecos`` is an unrelated cone solver, so neither name may normalise to it.
scripts/check-device-install.sh installs the device wheel into a clean venv (with network).
"""

from __future__ import annotations

import email.parser
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:  # Python 3.11+
    import tomllib
except ImportError:  # pragma: no cover
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
DEVICE_NAME, FULL_NAME = "ecos-fleet-device", "ecos-fleet"
# Not a single one of these may reach a device, whichever extra it installs.
CLOUD_ONLY = {
    "torch",
    "torchvision",
    "onnx",
    "onnxscript",
    "scikit-learn",
    "matplotlib",
    "litert-torch",
    "safetensors",
    "amqtt",
    "ecos",
    "ecos-fleet",
}
SKIP = shutil.ignore_patterns(
    ".git",
    ".venv",
    "runs",
    "work",
    ".hypothesis",
    ".pytest_cache",
    "build",
    "dist",
    "__pycache__",
    "*.pyc",
    "*.egg-info",
)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(req: str) -> str:
    return _norm(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))


class Wheel:
    def __init__(self, path: Path):
        self.path = path
        with zipfile.ZipFile(path) as zf:
            self.files = sorted(zf.namelist())
            info = next(f.split("/")[0] for f in self.files if f.split("/")[0].endswith(".dist-info"))
            self.dist_info = info
            self.meta = email.parser.Parser().parsestr(zf.read(f"{info}/METADATA").decode())
            eps = f"{info}/entry_points.txt"
            self.entry_points = zf.read(eps).decode() if eps in self.files else ""

    @property
    def requires(self):
        return self.meta.get_all("Requires-Dist") or []

    def scripts(self):
        section, out = None, {}
        for line in self.entry_points.splitlines():
            line = line.strip()
            if line.startswith("["):
                section = line.strip("[]")
            elif "=" in line:
                name, target = (s.strip() for s in line.split("=", 1))
                out[(section, name)] = target
        return out


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    """Both wheels, built with this interpreter's setuptools from a clean copy (no stale build/)."""
    try:
        import setuptools
    except ImportError:  # pragma: no cover
        pytest.skip("setuptools is not installed in this environment")
    if int(setuptools.__version__.split(".")[0]) < 77:  # pragma: no cover
        pytest.skip(f"setuptools {setuptools.__version__} < 77 (the build-system requirement)")
    tmp = tmp_path_factory.mktemp("wheels")
    src, out = tmp / "src", tmp / "out"
    shutil.copytree(ROOT, src, ignore=SKIP)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-w",
        str(out),
        str(src / "packaging" / "device"),
        str(src),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = {}
    for whl in out.glob("*.whl"):
        w = Wheel(whl)
        found[_norm(w.meta["Name"])] = w
    assert set(found) == {DEVICE_NAME, FULL_NAME}, sorted(found)
    return found


def test_device_wheel_holds_only_device_sdk(wheels):
    w = wheels[DEVICE_NAME]
    outside = [f for f in w.files if not (f.startswith("device_sdk/") or f.startswith(w.dist_info + "/"))]
    assert not outside, f"the device wheel ships {outside}"
    shipped = {f for f in w.files if f.startswith("device_sdk/")}
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "device_sdk").rglob("*.py")}
    assert shipped == source, f"missing: {sorted(source - shipped)}, extra: {sorted(shipped - source)}"
    print(f"\n{w.path.name}: {len(w.files)} files, {w.path.stat().st_size / 1024:.0f} KiB")


def test_device_wheel_has_only_the_device_command(wheels):
    assert wheels[DEVICE_NAME].scripts() == {("console_scripts", "ecos-device"): "device_sdk.cli:main"}


def test_device_wheel_requires_no_cloud_package(wheels):
    w = wheels[DEVICE_NAME]
    names = {_req_name(r) for r in w.requires}
    assert not names & CLOUD_ONLY, f"the device wheel requires {sorted(names & CLOUD_ONLY)}"
    assert {"numpy", "pillow", "paho-mqtt", "cryptography"} <= names
    assert set(w.meta.get_all("Provides-Extra")) == {"onnx", "litert", "tflite", "fastjpeg"}
    # fastjpeg is simplejpeg alone (device_sdk/preprocess.py uses it only where it gives Pillow's bytes)
    assert {_req_name(r) for r in w.requires if 'extra == "fastjpeg"' in r} == {"simplejpeg"}
    # tflite-runtime 2.14 breaks with numpy 2 ("_ARRAY_API not found"): its extra pins numpy < 2.
    tflite = [r for r in w.requires if 'extra == "tflite"' in r]
    assert any(_req_name(r) == "numpy" and "<2" in r.replace(" ", "") for r in tflite), tflite


def test_versions_agree(wheels):
    from device_sdk import __version__

    assert wheels[DEVICE_NAME].meta["Version"] == __version__
    assert wheels[FULL_NAME].meta["Version"] == __version__
    pins = [r for r in wheels[FULL_NAME].requires if _req_name(r) == DEVICE_NAME]
    assert len(pins) == 1 and pins[0].replace(" ", "").endswith(f"=={__version__}"), pins


def test_full_distribution_is_the_cloud_side(wheels):
    w = wheels[FULL_NAME]
    assert _norm(w.meta["Name"]) == FULL_NAME != "ecos"
    tops = {f.split("/")[0] for f in w.files} - {w.dist_info}
    assert tops == {"cloud", "models"}, f"ecos-fleet ships {sorted(tops)} (device_sdk comes from {DEVICE_NAME})"
    scripts = {name for (section, name) in w.scripts() if section == "console_scripts"}
    assert scripts == {"ecos-cloud", "ecos-make-digits", "ecos-demo"}
    names = {_req_name(r) for r in w.requires if "extra ==" not in r}
    assert {"torch", "torchvision", DEVICE_NAME} <= names


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_setup_installs_both_sides():
    """scripts/setup.sh installs the extras it names, and both projects, editable."""
    full = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    extras = re.search(r"ECOS_EXTRAS:-([a-z,]+)", setup).group(1).split(",")
    assert set(extras) <= set(full["optional-dependencies"])
    assert '-e ./packaging/device -e ".[$EXTRAS]"' in setup
