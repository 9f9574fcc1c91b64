"""Real full and read-only filesystems for tests: a small tmpfs mounted for the test, filled or remounted read-only.

``small_tmpfs(kib)`` mounts a tmpfs of that size (root, and a kernel that lets this process
mount, are needed); ``fill(folder)`` writes a filler file until the filesystem says ENOSPC and
returns it (delete it to free the space); ``remount(folder, "ro")`` makes it read-only.
``requires_mount`` skips a test, with the reason, where mounting is impossible (not root, a
container without CAP_SYS_ADMIN): the monkeypatched ENOSPC tests still run there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional

import pytest


def _mount(size_kib: int, folder: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0755", "tmpfs", folder],
        capture_output=True,
        text=True,
        timeout=10,
    )


@lru_cache(maxsize=1)
def why_no_mount() -> Optional[str]:
    """None if this process can mount a tmpfs, else why not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "mounting a small tmpfs needs root"
    if shutil.which("mount") is None:
        return "no mount command"
    folder = tempfile.mkdtemp(prefix="ecos-mount-probe-")
    try:
        proc = _mount(64, folder)
        if proc.returncode != 0:
            return f"cannot mount a tmpfs here: {proc.stderr.strip()[:200]}"
        subprocess.run(["umount", folder], capture_output=True, timeout=10)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot mount a tmpfs here: {exc}"
    finally:
        os.rmdir(folder)


requires_mount = pytest.mark.skipif(why_no_mount() is not None, reason=str(why_no_mount()))


@contextlib.contextmanager
def small_tmpfs(size_kib: int) -> Iterator[Path]:
    folder = tempfile.mkdtemp(prefix="ecos-tmpfs-")
    proc = _mount(size_kib, folder)
    if proc.returncode != 0:
        os.rmdir(folder)
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip()[:200]}")
    try:
        yield Path(folder)
    finally:
        subprocess.run(["umount", "-l", folder], capture_output=True, timeout=10)
        os.rmdir(folder)


def fill(folder: Path, name: str = ".filler") -> Path:
    """Write zeros into ``folder/name`` until the filesystem is full (ENOSPC); returns the filler's path."""
    path = folder / name
    block = b"\0" * 4096
    with open(path, "wb", buffering=0) as fh:
        while True:
            try:
                fh.write(block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    for size in (512, 64, 1):  # the last bytes a block-sized write could not take
        try:
            with open(path, "ab", buffering=0) as fh:
                while True:
                    fh.write(b"\0" * size)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return path


def remount(folder: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(folder)], check=True, capture_output=True, timeout=10)
