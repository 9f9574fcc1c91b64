"""Broker helpers for the integration tests: a real Mosquitto, shared or private.

``shared_broker`` is the Mosquitto on 127.0.0.1:1883 when one listens (else a private one);
tests on it use unique device ids so they never see each other's messages. ``private_broker``
is a Mosquitto of the test's own on a free port, which a test may kill and restart
(``broker.kill(); broker.start()``). ``requires_broker`` skips only when there is no mosquitto
binary and nothing listens on 1883. Import the fixtures into a test module to use them.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from typing import Any, Callable, List, Optional, Tuple

import pytest

from cloud.tools.broker import Broker, mosquitto_binary, port_open, start_mosquitto
from device_sdk.errors import MessageError
from device_sdk.protocol import CLOUD_SUBSCRIPTIONS, decode_from_device
from device_sdk.transport import MqttTransport

SHARED_HOST, SHARED_PORT = "127.0.0.1", 1883


def broker_available() -> bool:
    return mosquitto_binary() is not None or port_open(SHARED_HOST, SHARED_PORT)


requires_broker = pytest.mark.skipif(
    not broker_available(), reason="no mosquitto binary and nothing listens on 127.0.0.1:1883"
)


@pytest.fixture
def shared_broker():
    if port_open(SHARED_HOST, SHARED_PORT):
        yield Broker(SHARED_HOST, SHARED_PORT, "given")
        return
    broker = start_mosquitto()
    yield broker
    broker.stop()


@pytest.fixture
def private_broker():
    if mosquitto_binary() is None:
        pytest.skip("a private broker needs the mosquitto binary")
    broker = start_mosquitto()
    yield broker
    broker.stop()


def unique_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` passes (None)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


class CloudClient:
    """The cloud's side of the wire for tests: a transport plus a queue of decoded device messages.

    Only messages of ``device_ids`` are kept (other tests may share the broker); undecodable
    ones are counted in ``rejected``, as the daemon would log and drop them.
    """

    def __init__(self, broker: Broker, device_ids: List[str], protocol: str = "5"):
        self.device_ids = set(device_ids)
        self.messages: "queue.Queue[Tuple[str, Any]]" = queue.Queue()
        self.rejected: List[str] = []
        self._lock = threading.Lock()
        self.transport = MqttTransport(
            unique_id("test-cloud"),
            broker.host,
            broker.port,
            protocol=protocol,
            subscriptions=list(CLOUD_SUBSCRIPTIONS),
            on_message=self._on_message,
            reconnect_delay=(1, 2),
        )

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic.split("/")[3] not in self.device_ids:
            return
        try:
            self.messages.put(decode_from_device(topic, payload))
        except MessageError as err:
            with self._lock:
                self.rejected.append(str(err))

    def __enter__(self) -> "CloudClient":
        self.transport.start()
        assert self.transport.wait_connected(10), "test cloud client could not connect"
        return self

    def __exit__(self, *exc) -> None:
        self.transport.stop()

    def next(self, timeout: float = 10.0, kind: Optional[type] = None) -> Any:
        """The next message (of ``kind``, skipping others) from any watched device."""
        end = time.monotonic() + timeout
        while True:
            try:
                _, msg = self.messages.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {kind.__name__ if kind else 'message'} within {timeout}s") from None
            if kind is None or isinstance(msg, kind):
                return msg
