"""A real Mosquitto started with the configuration ``ecos-cloud broker-config`` writes.

Two deployments (certificate mode and password mode), each with its own broker on a free
loopback port, per-device credentials from ``ecos-cloud enroll``, and clients built from the
bundles by the project's own transport. Checked:

* TLS: a client that trusts another CA refuses the broker; the broker refuses a certificate from
  another CA (even one named like the cloud), an expired certificate, anonymous and wrong logins;
* the ACL: device A reads nothing of B's (nor anything else), and nothing A writes on B's or the
  cloud's topics arrives anywhere; what A writes on its own outbox does (the control);
* client ids: A logging in with B's or the cloud's client id disconnects neither (with the
  previous documentation's configuration, without ``use_username_as_clientid``, it kicks B);
* rotation and revocation: after ``enroll --rotate``/``--revoke`` and a reload (SIGHUP) the old
  certificate or password is refused, the new one accepted;
* a real daemon and agent complete a round over TLS with certificates from ``enroll``.

ACL denials are silent (a QoS 1 PUBACK still comes under MQTT 3.1.1), so every assertion is on
what the other clients receive, or whether they were disconnected.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import List, Optional, Tuple

import pytest
from broker import wait_until
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cloud.security import pki
from cloud.security.brokerconf import write_broker_config
from cloud.security.enroll import Deployment, enroll, revoke
from cloud.serve.config import load_config
from cloud.tools.broker import Broker, free_port, mosquitto_binary
from device_sdk.config import broker_password, broker_tls, load_device_config
from device_sdk.protocol import CLOUD_STATUS, device_status, inbox, outbox
from device_sdk.transport import MqttTransport, TlsConfig

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(mosquitto_binary() is None, reason="needs the mosquitto binary"),
]

HOST = "127.0.0.1"
DEVICES = ("dev-a", "dev-b", "dev-r")  # dev-r runs the round, with a session nobody else touched


def start_broker(d: Deployment, workdir: Path, conf_text: Optional[str] = None) -> Broker:
    """Mosquitto with the generated ecos.conf (or ``conf_text``), plus what a test run needs."""
    workdir.mkdir(parents=True, exist_ok=True)
    extra = ["persistence false", f"log_dest file {workdir / 'mosquitto.log'}"] + [
        f"log_type {t}" for t in ("error", "warning", "notice", "information")
    ]  # a file log is flushed per line
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        extra.append("user root")  # else it drops to 'mosquitto', who cannot enter pytest's 0700 folders
    conf = workdir / "mosquitto.conf"
    conf.write_text((conf_text or (d.broker_dir / "ecos.conf").read_text()) + "\n".join(extra) + "\n")
    return Broker(HOST, d.port, "mosquitto", "5", [mosquitto_binary(), "-c", str(conf)], str(workdir)).start()


def deployment(root: Path, mode: str) -> Deployment:
    write_broker_config(root, mode=mode, hostnames=[HOST, "localhost"], port=free_port(), bind=HOST, broker_group=None)
    for device in DEVICES:
        enroll(root, device)
    return Deployment.load(root)


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    root = tmp_path_factory.mktemp("cert-deployment")
    d = deployment(root / "dep", "certificate")
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=10)
    enroll(d.root, "dev-old", not_before=past, not_after=past + datetime.timedelta(days=1))  # signed by our CA, expired
    rogue_ca, rogue_key = pki.create_ca("rogue CA")  # someone else's CA: its certificate says it is the cloud
    rogue_cert, rogue_cert_key = pki.issue(rogue_ca, rogue_key, d.cloud_id)
    for name, data in (
        ("ca.pem", pki.cert_pem(rogue_ca)),
        ("client.pem", pki.cert_pem(rogue_cert)),
        ("client.key", pki.key_pem(rogue_cert_key)),
    ):
        (root / "rogue").mkdir(exist_ok=True)
        (root / "rogue" / name).write_bytes(data)
    broker = start_broker(d, root / "broker")
    yield d, broker, root / "rogue"
    broker.stop()


@pytest.fixture(scope="module")
def password(tmp_path_factory):
    root = tmp_path_factory.mktemp("password-deployment")
    d = deployment(root / "dep", "password")
    broker = start_broker(d, root / "broker")
    yield d, broker
    broker.stop()


class Client(MqttTransport):
    """A transport that records what it receives and counts the times it was disconnected."""

    def __init__(self, client_id: str, port: int, subscriptions=(), **login):
        self.received: List[Tuple[str, bytes]] = []
        self.disconnects = 0
        super().__init__(
            client_id,
            HOST,
            port,
            protocol="3.1.1",
            subscriptions=subscriptions,
            clean=True,
            on_message=lambda topic, payload: self.received.append((topic, payload)),
            reconnect_delay=(1, 1),
            **login,
        )

    def _on_disconnect(self, *args) -> None:
        if not self._stopping:
            self.disconnects += 1
        super()._on_disconnect(*args)


def login(d: Deployment, identity: str, bundle: Optional[Path] = None) -> dict:
    """The transport's login for ``identity``, from its bundle's broker.toml as its config would read it."""
    bundle = bundle or d.bundle(identity)
    if identity == d.cloud_id:
        b = load_config(str(bundle / "broker.toml"), env={}).broker
    else:
        key = bundle / "test-cloud.pub"  # any Ed25519 public key: this config only connects
        key.write_text(Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex())
        (bundle / "device.toml").write_text(
            f'device_id = "{identity}"\n'
            + (bundle / "broker.toml").read_text()
            + '[models]\ncloud_public_key = "test-cloud.pub"\n'
        )
        b = load_device_config(str(bundle / "device.toml"), env={}).broker
    return {"username": b.username, "password": broker_password(b), "tls": broker_tls(b)}


def connected(client: Client, timeout: float = 10.0) -> Client:
    client.start()
    assert client.wait_connected(timeout), client.last_error
    return client


def refused(client: Client, timeout: float = 5.0) -> str:
    """Start ``client``; it must fail (and never connect): returns why."""
    client.start()
    try:
        reason = wait_until(lambda: client.last_error, timeout)
        time.sleep(0.2)
        assert not client.connected and client.connect_count == 0, "the broker accepted it"
        assert reason, "neither connected nor refused"
        return reason
    finally:
        client.stop()


def handshake_error(tls: TlsConfig, port: int) -> str:
    """The error a TLS 1.2 handshake with ``tls`` ends in ("" if it succeeds)."""
    ctx = tls.context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection((HOST, port), timeout=5) as sock:
        try:
            with ctx.wrap_socket(sock, server_hostname=HOST):
                return ""
        except ssl.SSLError as exc:
            return str(exc)


def log_of(broker: Broker) -> str:
    return (Path(broker.workdir) / "mosquitto.log").read_text(errors="replace")


# ---- TLS and logins ----------------------------------------------------------------------------------


def test_wrong_ca_and_expired_certificates_are_refused(cert):
    d, broker, rogue = cert
    good = login(d, "dev-a")["tls"]
    # the client trusts another CA: it refuses the broker's certificate
    reason = refused(Client("dev-a", d.port, tls=dataclasses.replace(good, ca_file=str(rogue / "ca.pem"))))
    assert "CERTIFICATE_VERIFY_FAILED" in reason
    # a certificate from another CA, even one naming the cloud, an expired one of ours, and none: the broker refuses,
    # with the TLS alert that says why (seen in a TLS 1.2 handshake; under 1.3 it comes after, as a disconnect)
    for tls, alert in (
        (TlsConfig(good.ca_file, str(rogue / "client.pem"), str(rogue / "client.key")), "UNKNOWN_CA"),
        (login(d, "dev-old")["tls"], "CERTIFICATE_EXPIRED"),
        (TlsConfig(good.ca_file), "HANDSHAKE_FAILURE"),
    ):
        assert alert in handshake_error(tls, d.port)
        refused(Client("intruder", d.port, tls=tls))
    assert log_of(broker).count("certificate verify failed") == 4  # two by handshake, two by the transport
    refused(Client("plain", d.port))  # no TLS at all on the TLS port
    assert connected(Client("dev-a", d.port, **login(d, "dev-a"))).stop() is None  # and the real one gets in


def test_password_mode_refuses_anonymous_wrong_and_borrowed_logins(password):
    d, broker = password
    a = login(d, "dev-a")
    cloud = connected(Client(d.cloud_id, d.port, **login(d, d.cloud_id)))
    try:
        for attempt in (
            {"tls": a["tls"]},  # anonymous
            {**a, "password": a["password"] + "x"},  # wrong password
            {**a, "username": d.cloud_id},  # the cloud's user name with a device's password
            {**a, "username": "dev-b"},
        ):  # another device's user name
            assert "refused" in refused(Client("dev-a", d.port, **attempt))
        assert cloud.connected and cloud.disconnects == 0
    finally:
        cloud.stop()
    assert connected(Client("dev-a", d.port, **a)).stop() is None


# ---- the ACL ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["certificate", "password"])
def test_a_device_can_neither_read_nor_write_another_devices_topics(mode, cert, password):
    d = cert[0] if mode == "certificate" else password[0]
    cloud = connected(
        Client(d.cloud_id, d.port, ["ecos/v1/dev/+/out", "ecos/v1/dev/+/status", CLOUD_STATUS], **login(d, d.cloud_id))
    )
    b = connected(Client("dev-b", d.port, [inbox("dev-b")], **login(d, "dev-b")))
    a = connected(
        Client(
            "dev-a",
            d.port,
            [inbox("dev-a"), inbox("dev-b"), outbox("dev-b"), device_status("dev-b"), "ecos/v1/#", "#"],
            **login(d, "dev-a"),
        )
    )
    try:
        time.sleep(0.3)  # subscriptions in place
        cloud.publish(inbox("dev-b"), b"cloud to b")
        cloud.publish(inbox("dev-a"), b"cloud to a")
        b.publish(outbox("dev-b"), b"b answers")
        b.publish(device_status("dev-b"), b"b online", retain=True)
        for topic in (outbox("dev-b"), device_status("dev-b"), inbox("dev-b"), CLOUD_STATUS, inbox("dev-r")):
            a.publish(topic, b"forged by a", retain=topic.endswith("status"))
        a.publish(outbox("dev-a"), b"a answers")  # the control: after every forgery, on A's own topic
        assert wait_until(lambda: (outbox("dev-a"), b"a answers") in cloud.received, 10)
        assert wait_until(lambda: len(cloud.received) >= 3 and a.received and b.received, 10)
        time.sleep(0.5)
        assert a.received == [(inbox("dev-a"), b"cloud to a")]  # nothing of B's, nothing under '#'
        assert b.received == [(inbox("dev-b"), b"cloud to b")]  # A's message to B's inbox never came
        assert sorted(cloud.received) == sorted(
            [(outbox("dev-b"), b"b answers"), (device_status("dev-b"), b"b online"), (outbox("dev-a"), b"a answers")]
        )
    finally:
        for client in (a, b, cloud):
            client.stop()
    late = connected(Client(d.cloud_id, d.port, [CLOUD_STATUS, device_status("dev-b")], **login(d, d.cloud_id)))
    try:  # what stayed retained: B's own status, and nothing A claimed
        assert wait_until(lambda: late.received, 5) and (time.sleep(0.3) is None)
        assert late.received == [(device_status("dev-b"), b"b online")]
    finally:
        late.stop()


# ---- client ids ---------------------------------------------------------------------------------------


def take_ids(d: Deployment, port: int, ids: List[str]) -> Tuple[int, int]:
    """B and the cloud connected; A logs in (its own credentials) with each client id in turn.
    Returns how often B and the cloud were disconnected."""
    b = connected(Client("ecos-device-dev-b", port, [inbox("dev-b")], **login(d, "dev-b")))
    cloud = connected(Client(d.cloud_id, port, **login(d, d.cloud_id)))
    try:
        for client_id in ids:
            attacker = Client(client_id, port, **login(d, "dev-a"))
            connected(attacker)  # the broker lets A in, as A, whatever client id it asked for
            time.sleep(0.3)
            attacker.stop()
        time.sleep(0.3)
        return b.disconnects, cloud.disconnects
    finally:
        b.stop()
        cloud.stop()


@pytest.mark.parametrize("mode", ["certificate", "password"])
def test_a_device_cannot_take_another_devices_or_the_clouds_client_id(mode, cert, password):
    d, broker = (cert[0], cert[1]) if mode == "certificate" else password
    assert take_ids(d, d.port, ["ecos-device-dev-b", "dev-b", d.cloud_id, "ecos-device-dev-b", d.cloud_id]) == (0, 0)
    assert "as ecos-device-dev-b " not in log_of(broker)  # a client id asked for is never the one used


def test_without_use_username_as_clientid_a_device_kicks_another(password, tmp_path):
    """The control: the previous documentation's configuration lacked the line, and A kicked B."""
    d, _ = password
    conf = (d.broker_dir / "ecos.conf").read_text()
    assert "use_username_as_clientid true\n" in conf
    old = dataclasses.replace(d, port=free_port())
    conf = conf.replace("use_username_as_clientid true\n", "").replace(f"listener {d.port} ", f"listener {old.port} ")
    broker = start_broker(old, tmp_path / "old-broker", conf)
    try:
        kicked_b, kicked_cloud = take_ids(old, old.port, ["ecos-device-dev-b", d.cloud_id])
        assert kicked_b >= 1 and kicked_cloud >= 1
    finally:
        broker.stop()


# ---- rotation and revocation ---------------------------------------------------------------------


def reload(broker: Broker) -> None:
    """What 'systemctl reload mosquitto' does: SIGHUP, which re-reads the password file, ACL and CRL."""
    os.kill(broker.process.pid, signal.SIGHUP)
    time.sleep(0.5)


@pytest.mark.parametrize("mode", ["certificate", "password"])
def test_rotated_and_revoked_credentials_are_refused_after_a_reload(mode, cert, password, tmp_path):
    d, broker = (cert[0], cert[1]) if mode == "certificate" else password
    enroll(d.root, "dev-rot")
    reload(broker)  # a new password is in the password file; a new certificate needs nothing
    old = login(d, "dev-rot", Path(shutil.copytree(d.bundle("dev-rot"), tmp_path / "old")))
    connected(Client("dev-rot", d.port, **old)).stop()
    enroll(d.root, "dev-rot", rotate=True)
    reload(broker)
    refused(Client("dev-rot", d.port, **old))
    new = login(d, "dev-rot", Path(shutil.copytree(d.bundle("dev-rot"), tmp_path / "new")))
    connected(Client("dev-rot", d.port, **new)).stop()
    revoke(d.root, "dev-rot")
    reload(broker)
    refused(Client("dev-rot", d.port, **new))


# ---- a round over TLS -----------------------------------------------------------------------------

TINY_TRAINER = {
    "teacher": {"width": 4, "epochs": 1},
    "student": {"width": 4, "epochs": 1},
    "quant": {"calibration_size": 16},
    "gate": {"min_agreement": 0.0, "max_accuracy_drop": 1.0},
}


def test_a_daemon_and_an_agent_complete_a_round_over_tls_with_certificates_from_enroll(
    cert, tmp_path, pool_index, encoder_path, digits_root
):
    from cloud.serve.daemon import build_daemon
    from cloud.serve.store import RoundState
    from cloud.tools.demo import simulated_device_config
    from device_sdk.agent import DeviceAgent

    d, broker, _ = cert
    _, index_path = pool_index
    cloud_toml = d.bundle(d.cloud_id) / "cloud.toml"  # the bundle's [broker] table, as an operator would use it
    cloud_toml.write_text(
        (d.bundle(d.cloud_id) / "broker.toml").read_text()
        + f"""
[store]
state_dir = "{tmp_path / "cloud"}"
index = "{index_path}"
[rounds]
budget = 40
collect_seconds = 60
[metrics]
port = 0
[trainer]
threads = 1
cache_dir = "{tmp_path / "cache"}"
"""
    )
    cfg = load_config(str(cloud_toml), env={})
    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, options=TINY_TRAINER))
    assert cfg.broker.cert_file == str(d.bundle(d.cloud_id) / "client.pem") and cfg.broker.port == d.port
    daemon = build_daemon(cfg).start()
    agent = None
    try:
        assert daemon.transport.wait_connected(10), daemon.transport.last_error
        folder = digits_root / "devices" / "printed"
        device = simulated_device_config(
            "dev-r",
            str(tmp_path / "dev-r"),
            broker,
            str(daemon.public_key_path),
            str(encoder_path),
            str(folder / "local"),
            str(folder / "test"),
        )
        login(d, "dev-r")  # writes the bundle's device.toml
        device = dataclasses.replace(
            device, broker=load_device_config(str(d.bundle("dev-r") / "device.toml"), env={}).broker
        )
        agent = DeviceAgent(device).start()
        assert agent.wait_connected(10), agent.transport.last_error
        r = daemon.wait_round(daemon.submit_round(["dev-r"]).round_id, 120)
        assert r.state is RoundState.DONE, r.error
        assert agent.store.current("classifier").sha256 == r.result["sha256"]
        assert r.result["deliveries"]["dev-r"]["state"] == "installed"
        text = log_of(broker)
        assert "as dev-r " in text and f"as {d.cloud_id} " in text  # both logged in as their certificates say
    finally:
        if agent is not None:
            agent.stop()
        daemon.stop()
