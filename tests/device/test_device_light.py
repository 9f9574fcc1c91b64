"""The device stays light: device_sdk never imports torch, torchvision or the cloud.

Two checks: a static scan of every device_sdk module's imports, and a real device run
(``ecos-device score``) in a fresh interpreter where importing torch, torchvision, cloud,
models, scipy or sklearn raises, i.e. as on a device-only install.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

try:  # Python 3.11+
    import tomllib
except ImportError:  # pragma: no cover
    tomllib = None

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("torch", "torchvision", "cloud", "models", "scipy", "sklearn", "onnx")
BLOCKER = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {forbidden!r}:
            raise ImportError('device-only install has no ' + name)
sys.meta_path.insert(0, Block())
from device_sdk.cli import main
sys.exit(main({argv!r}))
"""


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


@pytest.mark.parametrize(
    "module", sorted(p.relative_to(ROOT / "device_sdk").as_posix() for p in (ROOT / "device_sdk").rglob("*.py"))
)
def test_no_heavy_imports_in_device_sdk(module):
    bad = [m for m in _imports(ROOT / "device_sdk" / module) if m.split(".")[0] in FORBIDDEN]
    assert not bad, f"device_sdk/{module} imports {bad}"


def test_base_dependencies_pull_no_torch():
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    deps = tomllib.loads((ROOT / "packaging/device/pyproject.toml").read_text())["project"]["dependencies"]
    assert not [
        d for d in deps if d.split(">")[0].split("=")[0].split("<")[0].strip().lower() in ("torch", "torchvision")
    ]


def test_device_scores_without_cloud_packages(pool_index, encoder_path, digits_root, tmp_path):
    _, index_path = pool_index
    probe = tmp_path / "p.probe"
    from cloud.pool.index import PoolIndex
    from cloud.security.keys import KeyRing

    ring = KeyRing(tmp_path / "keys")  # the cloud signs; the device only verifies, without cloud code
    probe.write_bytes(PoolIndex.load(str(index_path)).probe().to_bytes(signer=ring.current))
    argv = [
        "score",
        str(digits_root / "devices" / "lcd" / "local"),
        "--encoder",
        str(encoder_path),
        "--probe",
        str(probe),
        "--out",
        str(tmp_path / "s.scores"),
        "--ledger",
        str(tmp_path / "l.json"),
        "--epsilon",
        "1",
        "--trusted-key",
        str(ring.public_key_path),
    ]
    code = BLOCKER.format(forbidden=set(FORBIDDEN), argv=argv)  # onnxruntime (a different package) stays
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "s.scores").exists()
