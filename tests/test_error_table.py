"""The error table in docs/offline.md ("Checks and errors") is the error classes of the code.

Every row names a code, an exit code, a class, its parent and the module that defines it
(device_sdk: device_sdk/errors.py, cloud: cloud/errors.py); every ``EcosError`` subclass of those
two modules has exactly one row, and nothing else in the code defines an error with a code of its own.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import cloud.errors
import device_sdk.errors
from device_sdk.errors import EcosError

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "offline.md"
MODULES = {"device_sdk": device_sdk.errors, "cloud": cloud.errors}
HEADER = ["code", "exit", "class", "parent", "defined in", "when"]


def _doc_rows():
    lines = DOC.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if [c.strip() for c in line.strip().strip("|").split("|")] == HEADER]
    assert len(starts) == 1, f"{DOC.name} must hold one error table with the columns {HEADER}"
    rows = []
    for line in lines[starts[0] + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(HEADER), f"malformed row: {line}"
        code, exit_code, cls, parent, module, when = cells
        assert re.fullmatch(r"`\w+`", cls) and re.fullmatch(r"`\w+`", parent), f"class and parent in backticks: {line}"
        rows.append((code, int(exit_code), cls.strip("`"), parent.strip("`"), module, when))
    return rows


def _code_rows():
    rows = []
    for where, module in MODULES.items():
        for name, cls in vars(module).items():
            if inspect.isclass(cls) and issubclass(cls, EcosError) and cls.__module__ == module.__name__:
                rows.append((cls.code, cls.exit_code, name, cls.__bases__[0].__name__, where))
    return rows


def test_the_table_lists_every_error_class_with_its_code_exit_code_parent_and_module():
    doc = sorted(row[:5] for row in _doc_rows())
    code = sorted(_code_rows())
    assert doc == code, (
        f"only in docs/offline.md: {sorted(set(doc) - set(code))}; only in the code: {sorted(set(code) - set(doc))}"
    )


def test_codes_are_unique_and_every_row_says_when():
    rows = _doc_rows()
    codes = [row[0] for row in rows]
    assert len(codes) == len(set(codes)), "two classes share a code"
    assert all(row[5] for row in rows)


def test_the_table_can_fail(monkeypatch):
    """A changed exit code, a moved class or a new class without a row is caught."""
    monkeypatch.setattr(cloud.errors.StoreError, "exit_code", 99)
    assert sorted(r[:5] for r in _doc_rows()) != sorted(_code_rows())
    monkeypatch.undo()

    class Extra(EcosError):
        code = "extra"

    monkeypatch.setattr(device_sdk.errors, "Extra", Extra, raising=False)
    Extra.__module__ = device_sdk.errors.__name__
    assert sorted(r[:5] for r in _doc_rows()) != sorted(_code_rows())


def test_every_exit_code_and_parent_holds_at_run_time():
    for code, exit_code, name, parent, where, _ in _doc_rows():
        cls = getattr(MODULES[where], name)
        assert cls.code == code and cls.exit_code == exit_code
        assert cls.__bases__[0].__name__ == parent and issubclass(cls, EcosError)


def _error_class_names():
    return {row[2] for row in _doc_rows()}


@pytest.mark.parametrize("package", ["cloud", "device_sdk", "models"])
def test_no_error_with_a_code_of_its_own_is_defined_elsewhere(package):
    """Subclasses elsewhere (e.g. MissingSourceError(InputError)) may exist, but they keep their
    parent's code and exit code, so the table stays complete."""
    known = _error_class_names()
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if path.name == "errors.py" and path.parent.name in MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
            if not bases & known:
                continue
            assigned = {
                t.id
                for stmt in node.body
                if isinstance(stmt, (ast.Assign, ast.AnnAssign))
                for t in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target])
                if isinstance(t, ast.Name)
            }
            if assigned & {"code", "exit_code"}:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not offenders, (
        f"define these in device_sdk/errors.py or cloud/errors.py and add them to the table: {offenders}"
    )
