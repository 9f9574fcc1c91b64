#!/usr/bin/env python3
"""Write docs/sdk-reference.md: the device SDK's public API (``device_sdk.__all__``) from its docstrings.

    python scripts/gen-sdk-reference.py            # (re)write docs/sdk-reference.md
    python scripts/gen-sdk-reference.py --check    # exit 1 if the committed file is out of date

For each public name: its signature and docstring; for a class, its public methods and
properties (signature and docstring) and, for a dataclass, its fields. Uses only ``inspect``;
imports the device SDK only (no torch, no cloud code).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "sdk-reference.md")
sys.path.insert(0, ROOT)

HEADER = """# Device SDK API reference

Generated from the docstrings by `scripts/gen-sdk-reference.py` (do not edit by hand; a test
checks that this file is up to date). The guide is [sdk.md](sdk.md). Every name below is
importable from `device_sdk` (e.g. `from device_sdk import DeviceAgent`).
"""


def _doc(obj) -> str:
    return inspect.cleandoc(obj.__doc__) if obj.__doc__ else "(no docstring)"


class _Raw:
    """An annotation shown as written in the source (they are strings under ``from __future__ import annotations``)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _raw(annotation):
    return _Raw(annotation) if isinstance(annotation, str) else annotation


def _signature(obj) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    params = [p.replace(annotation=_raw(p.annotation)) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=_raw(sig.return_annotation)))


def _members(cls):
    """Public methods and properties defined on ``cls`` (not inherited from object), in source order."""
    out = []
    for name, value in cls.__dict__.items():
        if name.startswith("_") and name != "__init__":
            continue
        if isinstance(value, property):
            out.append((name, "property", value.fget))
        elif isinstance(value, (classmethod, staticmethod)):
            out.append((name, "classmethod" if isinstance(value, classmethod) else "staticmethod", value.__func__))
        elif inspect.isfunction(value):
            out.append((name, "method", value))
    return out


def render() -> str:
    import device_sdk

    lines = [HEADER]
    names = [n for n in device_sdk.__all__ if n != "__version__"]
    lines.append("Contents: " + ", ".join(f"[`{n}`](#{n.lower()})" for n in names) + "\n")
    for name in names:
        obj = getattr(device_sdk, name)
        where = obj.__module__
        if inspect.isclass(obj):
            lines.append(f"## {name}\n\n`class {where}.{name}`\n\n{_doc(obj)}\n")
            if dataclasses.is_dataclass(obj):
                fields = [f"`{f.name}: {f.type}`" for f in dataclasses.fields(obj)]
                lines.append("Fields: " + ", ".join(fields) + "\n")
            consts = [(k, v) for k, v in obj.__dict__.items() if k.isupper() and isinstance(v, (str, int, float))]
            if consts:
                lines.append("Constants: " + ", ".join(f"`{k} = {v!r}`" for k, v in consts) + "\n")
            for member, kind, fn in _members(obj):
                if member == "__init__" and dataclasses.is_dataclass(obj):
                    continue  # the fields say it
                fn.__doc__ = fn.__doc__ or inspect.getdoc(getattr(obj, member))  # inherited from the base class
                if kind == "property":
                    lines.append(f"### {name}.{member}\n\n*property*\n\n{_doc(fn)}\n")
                else:
                    label = "" if kind == "method" else f"*{kind}*\n\n"
                    lines.append(f"### {name}.{member}\n\n{label}`{member}{_signature(fn)}`\n\n{_doc(fn)}\n")
        else:
            lines.append(f"## {name}\n\n`{where}.{name}{_signature(obj)}`\n\n{_doc(obj)}\n")
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if docs/sdk-reference.md differs from the docstrings"
    )
    args = parser.parse_args()
    text = render()
    if args.check:
        try:
            with open(OUT, encoding="utf-8") as fh:
                current = fh.read()
        except OSError:
            current = ""
        if current != text:
            print(f"{OUT} is out of date: run python scripts/gen-sdk-reference.py")
            return 1
        print(f"{OUT} is up to date")
        return 0
    with open(OUT, "w", encoding="utf-8") as fh:
        fh.write(text)
    print(f"wrote {OUT} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
