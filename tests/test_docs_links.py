"""Every file the docs, README, scripts and code comments name exists in the repository.

Looks for markdown links to relative paths and for repository paths written inline
(``cloud/...py``, ``docs/...md``, ``scripts/...``, ...). A path that a command creates at run
time (``runs/``, ``state/``, build output) is not a reference to a repository file and is skipped.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = ("cloud", "device_sdk", "models", "tests", "docs", "scripts", "benchmarks", "examples", "packaging")
# a repository path: a known top folder, then path characters, ending in a file name with an extension
PATH_RE = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*\w\.(?:py|md|sh|toml|json|png|service|txt))\b" % "|".join(TOP))
LINK_RE = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
GENERATED = ("benchmarks/results/", "docs/results/")  # written by benchmark runs; checked when they are linked
# paths inside other packages, not this repository
EXTERNAL = {"examples/data/digits.png"}  # opencv-doc's digits sheet (cloud/tools/datagen/realdigits.py)


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [
        f for f in out.splitlines() if f.endswith((".md", ".py", ".sh", ".toml", ".service")) and (ROOT / f).exists()
    ]


def _exists(ref: str, base: Path) -> bool:
    ref = ref.rstrip(".")
    return (ROOT / ref).exists() or (base / ref).exists()


def _refs():
    for name in _tracked():
        if name == "tests/test_docs_links.py":  # names missing files on purpose
            continue
        text = (ROOT / name).read_text(encoding="utf-8", errors="replace")
        base = (ROOT / name).parent
        for m in PATH_RE.finditer(text):
            ref = m.group(1)
            if "*" in ref or "<" in ref or "{" in ref or ref.startswith(GENERATED) or ref in EXTERNAL:
                continue
            yield name, ref, base
        if name.endswith(".md"):
            for m in LINK_RE.finditer(text):
                ref = m.group(1)
                if re.match(r"[a-z]+:", ref):
                    continue
                yield name, ref, base


def test_every_named_file_exists():
    missing = sorted({f"{name}: {ref}" for name, ref, base in _refs() if not _exists(ref, base)})
    assert not missing, "files named but not in the repository:\n" + "\n".join(missing)


@pytest.mark.parametrize("ref", ["cloud/nowhere.py", "docs/missing.md"])
def test_a_missing_file_is_caught(ref):
    assert PATH_RE.search(f"see `{ref}`") and not _exists(ref, ROOT)
