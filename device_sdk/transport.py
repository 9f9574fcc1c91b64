"""One MQTT client for both ends (paho-mqtt 2.x), with the settings ECOS relies on.

What it takes care of, so the cloud daemon and the device agent do not each get it wrong:

* a persistent session (MQTT 5: ``clean_start=False`` and a SessionExpiryInterval on every
  connect; 3.1.1: ``clean_session=False``), so QoS 1 messages sent while a client was away are
  queued by the broker;
* reconnecting in the background with exponential backoff (paho's ``reconnect_delay_set``),
  resubscribing and republishing the retained ``online`` status in ``on_connect``;
* a last will, and an explicit ``offline`` status on a clean ``stop()``;
* a message callback that cannot kill the network thread (its exceptions are logged).

A PUBACK does not mean the peer acted on a message (a broker ACL may drop it silently), so the
protocol confirms delivery with its own ``ack`` messages.
"""

from __future__ import annotations

import logging
import socket
import ssl
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_sdk.errors import UsageError
from device_sdk.logsafe import clean

LOG = logging.getLogger("ecos.transport")
PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}
RetainedMessage = Tuple[str, bytes, bool]  # (topic, payload, retain)
MessageCallback = Callable[[str, bytes], None]


TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True)
class TlsConfig:
    """TLS to the broker: the CA bundle that must have signed the broker's certificate (None: the
    system's CAs), a client certificate and key when the broker asks for one, the lowest TLS
    version accepted, and ``insecure`` (tests only: the host name is not checked against the
    certificate; the chain still is)."""

    ca_file: Optional[str] = None
    cert_file: Optional[str] = None
    key_file: Optional[str] = None
    version: str = "1.2"
    insecure: bool = False

    def context(self) -> ssl.SSLContext:
        """A client context that verifies the broker; a ``UsageError`` names a file it cannot use."""
        if self.version not in TLS_VERSIONS:
            raise UsageError(f"TLS version must be one of {', '.join(TLS_VERSIONS)}, got {self.version!r}")
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"ca_file {self.ca_file}: not a readable PEM CA bundle ({_reason(exc)})") from None
        ctx.minimum_version = TLS_VERSIONS[self.version]
        if self.cert_file or self.key_file:
            try:
                ctx.load_cert_chain(self.cert_file or "", self.key_file)
            except (OSError, ssl.SSLError) as exc:
                raise UsageError(
                    f"cert_file {self.cert_file} / key_file {self.key_file}: not a readable PEM "
                    f"certificate and its private key ({_reason(exc)})"
                ) from None
        if self.insecure:
            ctx.check_hostname = False  # verify_mode stays CERT_REQUIRED
        return ctx


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc) or type(exc).__name__


class MqttTransport:
    """A paho client that stays connected, publishes its presence and hands payloads to a callback."""

    def __init__(
        self,
        client_id: str,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        protocol: str = "5",
        subscriptions: Sequence[str] = (),
        on_message: Optional[MessageCallback] = None,
        will: Optional[RetainedMessage] = None,
        online: Optional[RetainedMessage] = None,
        keepalive: int = 30,
        clean: bool = False,
        session_expiry: int = 3600,
        username: Optional[str] = None,
        password: Optional[str] = None,
        tls: Optional[TlsConfig] = None,
        reconnect_delay: Tuple[int, int] = (1, 30),
    ):
        if protocol not in PROTOCOLS:
            raise UsageError(f"MQTT protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
        self.client_id, self.host, self.port, self.protocol = client_id, host, int(port), protocol
        self.subscriptions = list(subscriptions)
        self.on_message = on_message
        self._will, self._online = will, online
        self._keepalive, self._clean, self._session_expiry = int(keepalive), clean, int(session_expiry)
        self._connected = threading.Event()
        self._stopping = False
        self.connect_count = 0  # successful connections so far: > 1 means it reconnected
        self.last_error: Optional[str] = None  # why the last attempt failed (TLS, refused login, ...)
        self._tls = tls is not None
        self._client = self._make_client(username, password, tls, reconnect_delay)

    def _make_client(
        self,
        username: Optional[str],
        password: Optional[str],
        tls: Optional[TlsConfig],
        reconnect_delay: Tuple[int, int],
    ) -> mqtt.Client:
        v5 = self.protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=PROTOCOLS[self.protocol],
            clean_session=None if v5 else self._clean,
        )
        client.reconnect_delay_set(*reconnect_delay)
        if username is not None:
            client.username_pw_set(username, password)
        if tls is not None:
            client.tls_set_context(tls.context())
            if tls.insecure:
                LOG.warning("%s: TLS without a host name check (tls_insecure): for tests only", self.client_id)
        if self._will is not None:
            topic, payload, retain = self._will
            client.will_set(topic, payload, qos=1, retain=retain)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> "MqttTransport":
        """Connect in the background; paho keeps reconnecting with backoff until ``stop()``."""
        kwargs = {}
        if self.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0 if self._clean else self._session_expiry
            kwargs = {"clean_start": self._clean, "properties": props}
        self._client.connect_async(self.host, self.port, keepalive=self._keepalive, **kwargs)
        self._client.loop_start()
        return self

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def stop(self, timeout: float = 2.0) -> None:
        """Publish the offline status (when a will is set), disconnect, stop the network thread."""
        self._stopping = True
        if self._will is not None and self.connected:
            topic, payload, retain = self._will
            info = self._client.publish(topic, payload, qos=1, retain=retain)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                LOG.warning("%s: offline status not confirmed before disconnect", self.client_id)
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    # ---- sending -----------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """Queue ``payload``; QoS 1 messages published while disconnected go out on reconnect."""
        return self._client.publish(topic, payload, qos=qos, retain=retain)

    def set_online(self, online: Optional[RetainedMessage]) -> None:
        """Change the status republished on every connect, and publish it now if connected."""
        self._online = online
        if online is not None and self.connected:
            self.publish(*online[:2], retain=online[2])

    # ---- paho callbacks (network thread) -------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.last_error = f"refused: {reason_code}"
            LOG.warning(
                "%s: broker %s:%d refused the connection: %s", self.client_id, self.host, self.port, reason_code
            )
            return
        sock = client.socket()
        tls = f"TLS {sock.version()}" if self._tls and hasattr(sock, "version") else "no TLS"
        LOG.info(
            "%s: connected to %s:%d (MQTT %s, %s, session present: %s)",
            self.client_id,
            self.host,
            self.port,
            self.protocol,
            tls,
            flags.session_present,
        )
        self.last_error = None
        _no_delay(sock)
        if self.subscriptions:
            client.subscribe([(topic, 1) for topic in self.subscriptions])
        if self._online is not None:
            topic, payload, retain = self._online
            client.publish(topic, payload, qos=1, retain=retain)
        self.connect_count += 1
        self._connected.set()

    def _on_connect_fail(self, client: mqtt.Client, userdata) -> None:
        """paho calls this inside its ``except OSError`` (TLS errors included): say why, once per new reason."""
        exc = sys.exc_info()[1]
        error = clean(f"{type(exc).__name__}: {exc}" if exc is not None else "connection failed")
        if error != self.last_error:
            LOG.warning(
                "%s: cannot connect to %s:%d: %s; retrying with backoff", self.client_id, self.host, self.port, error
            )
        self.last_error = error

    def _on_disconnect(self, client: mqtt.Client, userdata, flags, reason_code, properties) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if not self._stopping and (was_connected or self.last_error is None):  # keep a refusal's reason
            self.last_error = f"disconnected: {reason_code}"
            LOG.warning("%s: disconnected (%s); reconnecting with backoff", self.client_id, reason_code)

    def _on_message(self, client: mqtt.Client, userdata, message: mqtt.MQTTMessage) -> None:
        if self.on_message is None:
            return
        try:
            topic = message.topic  # paho decodes it here: a topic that is not UTF-8 raises
        except UnicodeDecodeError:
            LOG.warning("%s: dropped a message whose topic is not UTF-8", self.client_id)
            return
        try:
            self.on_message(topic, bytes(message.payload))
        except Exception:  # the network thread must survive any handler bug
            LOG.exception("%s: handler failed on a message from %s", self.client_id, clean(topic))


def _no_delay(sock) -> None:
    """Send small messages (acks, chunk tails) at once: Nagle's algorithm with delayed ACKs costs
    ~40 ms per request/reply round trip, which dominated a windowed delivery (measured)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):  # not a TCP socket (e.g. a websocket wrapper)
        pass
