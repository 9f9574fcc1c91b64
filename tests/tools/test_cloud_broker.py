"""Finding or starting a broker: a given address is used as is, a private one is started and cleaned up."""

from __future__ import annotations

import os
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud.errors import TransportError
from cloud.tools.broker import (
    amqtt_available,
    ensure_broker,
    free_port,
    mosquitto_binary,
    port_open,
    start_amqtt,
    start_mosquitto,
)

needs_mosquitto = pytest.mark.skipif(mosquitto_binary() is None, reason="no mosquitto binary")


def round_trip(broker, protocol=mqtt.MQTTv5) -> bytes:
    """Publish one QoS 1 message to ourselves through ``broker``; the payload that came back."""
    got = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=protocol)
    client.on_message = lambda c, u, m: got.append(m.payload)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.subscribe("ecos-test/echo", qos=1)
        time.sleep(0.3)
        client.publish("ecos-test/echo", b"ping", qos=1).wait_for_publish(5)
        end = time.monotonic() + 5
        while not got and time.monotonic() < end:
            time.sleep(0.02)
    finally:
        client.loop_stop()
        client.disconnect()
    return got[0] if got else b""


@needs_mosquitto
def test_a_private_mosquitto_can_be_killed_restarted_and_is_cleaned_up():
    broker = start_mosquitto()
    assert broker.kind == "mosquitto" and broker.protocol == "5" and round_trip(broker) == b"ping"
    broker.kill()
    assert not port_open(broker.host, broker.port)
    broker.start()
    assert round_trip(broker) == b"ping"
    broker.stop()
    assert not port_open(broker.host, broker.port) and not os.path.exists(broker.workdir)


@needs_mosquitto
def test_a_given_broker_is_used_and_left_running():
    private = start_mosquitto()
    try:
        given = ensure_broker(private.host, private.port)
        assert given.kind == "given" and given.process is None
        given.stop()
        assert port_open(private.host, private.port)
        with pytest.raises(TransportError, match="not ours to start"):
            given.start()
    finally:
        private.stop()


def test_an_unreachable_given_broker_is_a_transport_error():
    with pytest.raises(TransportError, match="no MQTT broker answers"):
        ensure_broker("127.0.0.1", free_port(), wait=0.2)


@pytest.mark.skipif(not amqtt_available(), reason="amqtt is not installed")
def test_the_pure_python_fallback_speaks_mqtt_3_1_1():
    broker = start_amqtt()
    try:
        assert broker.protocol == "3.1.1" and round_trip(broker, mqtt.MQTTv311) == b"ping"
    finally:
        broker.stop()
