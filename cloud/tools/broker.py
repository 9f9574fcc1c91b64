"""Find or start an MQTT broker for the demo, the benchmarks and the tests.

Production uses a broker someone runs (Mosquitto, EMQX, ...): pass its address and nothing is
started. Otherwise ``ensure_broker`` starts a private one on a free loopback port: Mosquitto if
its binary is installed (MQTT 3.1.1 and 5), else the pure-Python amqtt if that package is
importable (MQTT 3.1.1 only, so clients must use protocol "3.1.1"). The private broker's
config, persistence and log live in a temporary folder that ``stop()`` removes.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import List, Optional

from cloud.errors import TransportError

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float) -> bool:
    """Poll until something accepts connections on ``host:port``, for at most ``timeout`` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if port_open(host, port, timeout=0.2):
            return True
        time.sleep(0.05)
    return False


def mosquitto_binary() -> Optional[str]:
    found = shutil.which("mosquitto")
    return found or next((p for p in MOSQUITTO_PATHS if os.access(p, os.X_OK)), None)


def amqtt_available() -> bool:
    return importlib.util.find_spec("amqtt") is not None


@dataclass
class Broker:
    """A broker address, and the process behind it when this module started it."""

    host: str
    port: int
    kind: str  # "given" | "mosquitto" | "amqtt"
    protocol: str = "5"  # the newest MQTT version it accepts
    command: List[str] = field(default_factory=list)
    workdir: Optional[str] = None
    process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> "Broker":
        """(Re)start the process (after ``kill()``, to simulate an outage) and wait for the port."""
        if not self.command:
            raise TransportError(f"the broker at {self.url} is not ours to start")
        log = open(os.path.join(self.workdir, "broker.log"), "ab")
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        atexit.register(self.stop)  # a script that dies on an exception must not leave the broker running
        if not wait_port(self.host, self.port, timeout):
            self.kill()
            raise TransportError(
                f"{self.kind} did not start listening on {self.url} within {timeout:.0f}s; "
                f"see {os.path.join(self.workdir, 'broker.log')}"
            )
        return self

    def kill(self) -> None:
        """Stop the process abruptly (SIGKILL), keeping its folder: ``start()`` resumes it."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        """Terminate a broker this module started and remove its folder; a given one is left alone."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None
        if self.workdir and self.kind != "given":
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Broker":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_mosquitto(
    port: Optional[int] = None, host: str = "127.0.0.1", persistence: bool = True, extra_config: str = ""
) -> Broker:
    """A private Mosquitto on ``host:port`` (a free port by default) with its own temp folder."""
    binary = mosquitto_binary()
    if binary is None:
        raise TransportError("mosquitto is not installed (apt install mosquitto)")
    workdir = tempfile.mkdtemp(prefix="ecos-mosquitto-")
    port = port or free_port(host)
    lines = [
        f"listener {port} {host}",
        "allow_anonymous true",
        f"persistence {'true' if persistence else 'false'}",
        f"persistence_location {workdir}/",
        "log_dest stdout",
        "max_queued_messages 100000",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        lines.append("user root")  # else it drops to user 'mosquitto', who cannot write our temp folder
    conf = os.path.join(workdir, "mosquitto.conf")
    with open(conf, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n" + extra_config)
    return Broker(host, port, "mosquitto", "5", [binary, "-c", conf], workdir).start()


def start_amqtt(port: Optional[int] = None, host: str = "127.0.0.1") -> Broker:
    """A private amqtt broker (MQTT 3.1.1 only) in a child Python process."""
    if not amqtt_available():
        raise TransportError("amqtt is not installed (pip install amqtt==0.12.1)")
    workdir = tempfile.mkdtemp(prefix="ecos-amqtt-")
    port = port or free_port(host)
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    conf = os.path.join(workdir, "amqtt.yaml")
    with open(conf, "w", encoding="utf-8") as fh:
        json.dump(config, fh)  # JSON is YAML: no YAML writer needed here
    return Broker(
        host, port, "amqtt", "3.1.1", [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", conf], workdir
    ).start()


def ensure_broker(host: Optional[str] = None, port: Optional[int] = None, wait: float = 3.0) -> Broker:
    """The broker given (``host``, checked for ``wait`` seconds), else a private Mosquitto, else amqtt."""
    if host:
        port = port or 1883
        if not wait_port(host, port, timeout=wait):
            raise TransportError(f"no MQTT broker answers at {host}:{port}; start one or leave the address out")
        return Broker(host, port, "given")
    if mosquitto_binary() is not None:
        return start_mosquitto(port)
    if amqtt_available():
        return start_amqtt(port)
    raise TransportError(
        "no MQTT broker: give one (--broker HOST:PORT), or install mosquitto "
        "(apt install mosquitto) or amqtt (pip install amqtt==0.12.1)"
    )
