"""device_sdk.sdnotify (systemd's notify protocol in the standard library) and ``ecos-device run``
feeding systemd's watchdog through it, against a real Unix datagram socket standing in for systemd."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

from device_sdk import sdnotify


@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def test_notify_sends_the_state_to_the_socket(notify_socket):
    path, sock = notify_socket
    assert sdnotify.notify("READY=1\nSTATUS=up", env={"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_notify_abstract_namespace():
    name = f"ecos-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert sdnotify.notify("WATCHDOG=1", env={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(64) == b"WATCHDOG=1"


def test_notify_without_systemd_or_with_a_broken_socket_does_not_raise(tmp_path):
    assert sdnotify.notify("READY=1", env={}) is False
    assert sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False
    assert sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": "vsock:2:1234"}) is False


def test_watchdog_interval():
    pid = str(os.getpid())
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": pid}) == 0.5
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "1"}) is None  # another process's
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def _device_config(tmp_path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = tmp_path / "cloud.pub.pem"
    key.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with socket.socket() as s:  # a port nothing listens on: the agent starts and keeps retrying the broker
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "device.toml"
    config.write_text(
        f'device_id = "sdnotify-test"\n[broker]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[models]\ncloud_public_key = "{key.name}"\n'
    )
    return config


def _receive(sock: socket.socket, until: bytes, limit: float = 20.0) -> List[bytes]:
    got: List[bytes] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            got.append(sock.recv(4096))
        except socket.timeout:
            continue
        if got[-1].startswith(until):
            break
    return got


def test_ecos_device_run_notifies_ready_feeds_the_watchdog_and_says_stopping(tmp_path, notify_socket):
    path, sock = notify_socket
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="200000")
    env.pop("WATCHDOG_PID", None)
    command = [
        sys.executable,
        "-m",
        "device_sdk.cli",
        "run",
        "--config",
        str(_device_config(tmp_path)),
        "--connect-timeout",
        "0.2",
        "-q",
    ]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = _receive(sock, b"READY=1")
        assert first and first[-1].startswith(b"READY=1"), first
        assert b"STATUS=device sdnotify-test running" in first[-1]
        pings = _receive(sock, b"WATCHDOG=1") + _receive(sock, b"WATCHDOG=1")
        assert pings[-1] == b"WATCHDOG=1" and len(pings) == 2, pings  # every 0.1 s: half the period
        proc.send_signal(signal.SIGTERM)
        assert _receive(sock, b"STOPPING=1")[-1] == b"STOPPING=1"
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()


def test_ecos_device_run_outside_systemd_sends_nothing(tmp_path, notify_socket):
    path, sock = notify_socket
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    command = [
        sys.executable,
        "-m",
        "device_sdk.cli",
        "run",
        "--config",
        str(_device_config(tmp_path)),
        "--connect-timeout",
        "0.2",
        "-q",
    ]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out
        sock.settimeout(0.2)
        with pytest.raises(socket.timeout):
            sock.recv(64)
    finally:
        if proc.poll() is None:
            proc.kill()
