"""TLS and broker logins in both configs: every key is used or refused, never silently ignored.

``[broker] ca_file`` (which docs/protocol.md told users to set) used to be an unknown key in
cloud.toml, and ``ECOS_CLOUD_BROKER_CA_FILE`` was silently ignored; the daemon had no TLS at all.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cloud.security import pki
from cloud.serve.config import BrokerConfig, CloudConfig, MetricsConfig, StoreConfig, load_config
from device_sdk.config import broker_password, broker_tls, load_device_config
from device_sdk.errors import UsageError
from device_sdk.transport import TlsConfig


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """ca.pem, client.pem + client.key (CN pi-1), a password file, in one folder."""
    root = tmp_path_factory.mktemp("certs")
    ca, ca_key = pki.create_ca("test CA")
    cert, key = pki.issue(ca, ca_key, "pi-1")
    (root / "ca.pem").write_bytes(pki.cert_pem(ca))
    (root / "client.pem").write_bytes(pki.cert_pem(cert))
    (root / "client.key").write_bytes(pki.key_pem(key))
    (root / "broker.password").write_text("correct horse battery staple\n")
    (root / "broker.password").chmod(0o600)
    (root / "empty.password").write_text("\n")
    (root / "keys").mkdir()
    raw = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    (root / "keys" / "cloud.pub").write_text(raw.hex())
    return root


def cloud_toml(certs: Path, broker: str) -> str:
    path = certs / "cloud.toml"
    path.write_text("[broker]\n" + broker)
    return str(path)


def device_toml(certs: Path, broker: str) -> str:
    path = certs / "device.toml"
    path.write_text(f'device_id = "pi-1"\n[models]\ncloud_public_key = "keys/cloud.pub"\n[broker]\n{broker}')
    return str(path)


TLS_KEYS = 'ca_file = "ca.pem"\ncert_file = "client.pem"\nkey_file = "client.key"\ntls_version = "1.3"\n'


def test_the_cloud_accepts_the_documented_tls_keys_with_paths_relative_to_the_file(certs):
    cfg = load_config(
        cloud_toml(certs, TLS_KEYS + 'username = "ecos-cloud"\npassword_file = "broker.password"\n'), env={}
    )
    b = cfg.broker
    assert (b.ca_file, b.cert_file, b.key_file) == (
        str(certs / "ca.pem"),
        str(certs / "client.pem"),
        str(certs / "client.key"),
    )
    assert broker_tls(b) == TlsConfig(
        str(certs / "ca.pem"), str(certs / "client.pem"), str(certs / "client.key"), version="1.3"
    )
    assert broker_password(b) == "correct horse battery staple"  # the file's one line, newline stripped


def test_the_device_accepts_the_same_keys(certs):
    b = load_device_config(
        device_toml(certs, TLS_KEYS + 'username = "pi-1"\npassword_file = "broker.password"\n'), env={}
    ).broker
    assert broker_tls(b).cert_file == str(certs / "client.pem") and broker_tls(b).version == "1.3"
    assert broker_password(b) == "correct horse battery staple"


def test_environment_variables_set_tls_and_an_unknown_one_is_an_error(certs):
    cfg = load_config(env={"ECOS_CLOUD_BROKER_CA_FILE": str(certs / "ca.pem"), "ECOS_CLOUD_BROKER_PORT": "8883"})
    assert broker_tls(cfg.broker) == TlsConfig(str(certs / "ca.pem")) and cfg.broker.port == 8883
    with pytest.raises(UsageError, match="ECOS_CLOUD_BROKER_CAFILE is not a setting.*ECOS_CLOUD_BROKER_CA_FILE"):
        load_config(env={"ECOS_CLOUD_BROKER_CAFILE": str(certs / "ca.pem")})
    with pytest.raises(UsageError, match="ECOS_DEVICE_BROKER_PASSWROD is not a setting"):
        load_device_config(device_toml(certs, ""), env={"ECOS_DEVICE_BROKER_PASSWROD": "x"})


def test_tls_without_a_ca_file_uses_the_system_store_and_no_tls_is_none(certs):
    assert broker_tls(load_config(cloud_toml(certs, "tls = true\n"), env={}).broker) == TlsConfig()
    assert broker_tls(load_config(env={}).broker) is None
    assert broker_password(load_config(env={}).broker) is None


def test_the_password_never_appears_in_a_repr(certs):
    cfg = load_config(env={"ECOS_CLOUD_BROKER_USERNAME": "ecos-cloud", "ECOS_CLOUD_BROKER_PASSWORD": "hunter2-secret"})
    assert broker_password(cfg.broker) == "hunter2-secret"
    assert "hunter2" not in repr(cfg) and "hunter2" not in str(cfg.broker)
    dev = load_device_config(
        device_toml(certs, 'username = "pi-1"\n'), env={"ECOS_DEVICE_BROKER_PASSWORD": "hunter2-x"}
    )
    assert broker_password(dev.broker) == "hunter2-x" and "hunter2" not in repr(dev)


@pytest.mark.parametrize(
    "broker, needle",
    [
        ('ca_file = "nope.pem"\n', "[broker] ca_file"),
        ('ca_file = "client.key"\n', "[broker] ca_file"),
        ('ca_file = "ca.pem"\ncert_file = "client.pem"\n', "cert_file and key_file go together"),
        ('ca_file = "ca.pem"\nkey_file = "client.key"\n', "cert_file and key_file go together"),
        ('ca_file = "ca.pem"\ncert_file = "ca.pem"\nkey_file = "client.key"\n', "[broker] cert_file"),
        ('cert_file = "client.pem"\nkey_file = "client.key"\n', "need TLS"),
        ("tls_insecure = true\n", "need TLS"),
        ('tls = true\ntls_version = "1.1"\n', "tls_version must be one of 1.2, 1.3"),
        ('username = "u"\npassword = "p"\npassword_file = "broker.password"\n', "password or password_file, not both"),
        ('password_file = "broker.password"\n', "needs username"),
        ('username = "u"\npassword_file = "missing.password"\n', "[broker] password_file"),
        ('username = "u"\npassword_file = "empty.password"\n', "is empty"),
        ('cafile = "ca.pem"\n', "unknown key(s) cafile"),
    ],
)
def test_bad_tls_and_login_settings_name_the_key(certs, broker, needle):
    with pytest.raises(UsageError) as cloud_err:
        load_config(cloud_toml(certs, broker), env={})
    assert needle in str(cloud_err.value)
    with pytest.raises(UsageError) as device_err:
        load_device_config(device_toml(certs, broker), env={})
    assert needle in str(device_err.value)


def test_the_tls_context_verifies_the_chain_and_host_and_sets_the_lowest_version(certs):
    ctx = TlsConfig(str(certs / "ca.pem"), str(certs / "client.pem"), str(certs / "client.key")).context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    insecure = TlsConfig(str(certs / "ca.pem"), version="1.3", insecure=True).context()
    assert insecure.verify_mode == ssl.CERT_REQUIRED and not insecure.check_hostname  # the chain is still checked
    assert insecure.minimum_version == ssl.TLSVersion.TLSv1_3


def test_the_daemon_hands_tls_and_the_password_to_its_transport(certs, tmp_path):
    from cloud.serve.daemon import Daemon

    seen = {}

    class Recording:
        def __init__(self, client_id, host, port, **options):
            seen.update(options, client_id=client_id)

    broker = BrokerConfig(
        port=8883,
        username="ecos-cloud",
        password_file=str(certs / "broker.password"),
        ca_file=str(certs / "ca.pem"),
        cert_file=str(certs / "client.pem"),
        key_file=str(certs / "client.key"),
    )
    cfg = CloudConfig(broker=broker, store=StoreConfig(state_dir=str(tmp_path / "s")), metrics=MetricsConfig(port=0))
    Daemon(cfg, SimpleNamespace(round_counts=dict), index=None, trainer=None, transport_factory=Recording)
    assert seen["tls"] == TlsConfig(str(certs / "ca.pem"), str(certs / "client.pem"), str(certs / "client.key"))
    assert seen["username"] == "ecos-cloud" and seen["password"] == "correct horse battery staple"
