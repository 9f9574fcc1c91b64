"""``ecos-cloud broker-config`` and ``ecos-cloud enroll`` without a broker: files, formats, refusals.

What a real Mosquitto makes of these files is in tests/integration/test_broker_security.py.
"""

from __future__ import annotations

import datetime
import os
import shutil
import stat
import subprocess
import sys

import pytest
from cryptography import x509

from cloud.cli import main as cloud_main
from cloud.security import pki
from cloud.security.brokerconf import render_acl, write_broker_config
from cloud.security.enroll import Deployment, check_mosquitto_hash, enroll, mosquitto_hash, read_password_file, revoke
from cloud.serve.config import BrokerConfig
from device_sdk.config import BrokerSettings, broker_password, broker_tls, from_mapping, read_toml
from device_sdk.errors import UsageError


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def cert_dep(tmp_path):
    return write_broker_config(
        tmp_path / "dep", mode="certificate", hostnames=["localhost", "127.0.0.1"], broker_group=None
    )


@pytest.fixture
def pass_dep(tmp_path):
    return write_broker_config(
        tmp_path / "dep",
        mode="password",
        hostnames=["broker.example.com"],
        port=8884,
        tls_version="1.3",
        broker_group=None,
    )


def test_our_hash_is_mosquittos_format_and_reads_mosquitto_passwd_output(tmp_path):
    hashed = mosquitto_hash("s3cret", salt=b"\x00" * 12)
    _, kind, iterations, salt, digest = hashed.split("$")
    assert (kind, iterations, salt) == ("7", "101", "AAAAAAAAAAAAAAAA") and len(digest) == 88  # 64 bytes in base64
    assert check_mosquitto_hash("s3cret", mosquitto_hash("s3cret")) and not check_mosquitto_hash("s3creT", hashed)
    assert not check_mosquitto_hash("s3cret", "$6$garbage") and not check_mosquitto_hash("x", "no dollars")
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd is not installed")
    subprocess.run([tool, "-c", "-b", str(tmp_path / "pw"), "alice", "s3cret"], check=True)
    assert check_mosquitto_hash("s3cret", read_password_file(tmp_path / "pw")["alice"])


def test_certificate_mode_config_binds_identity_and_client_id(cert_dep):
    conf = (cert_dep.broker_dir / "ecos.conf").read_text().splitlines()
    for line in (
        "listener 8883",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "allow_anonymous false",
        f"cafile {cert_dep.broker_dir.resolve()}/ca.pem",
        f"crlfile {cert_dep.broker_dir.resolve()}/crl.pem",
        f"acl_file {cert_dep.broker_dir.resolve()}/ecos.acl",
    ):
        assert line in conf
    assert not any(line.startswith("password_file") for line in conf)
    server = pki.load_cert(cert_dep.broker_dir / "server.pem")
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert mode_of(cert_dep.ca_key_path) == 0o600 and mode_of(cert_dep.broker_dir / "server.key") == 0o600


def test_the_acl_gives_the_cloud_every_device_and_a_device_only_itself():
    acl = [line for line in render_acl("ecos-cloud").splitlines() if line and not line.startswith("#")]
    assert acl == [
        "user ecos-cloud",
        "topic read ecos/v1/dev/+/out",
        "topic read ecos/v1/dev/+/status",
        "topic write ecos/v1/dev/+/in",
        "topic readwrite ecos/v1/cloud/status",
        "pattern read ecos/v1/dev/%u/in",
        "pattern write ecos/v1/dev/%u/out",
        "pattern write ecos/v1/dev/%u/status",
    ]


def test_password_mode_config_and_a_device_bundle(pass_dep):
    conf = (pass_dep.broker_dir / "ecos.conf").read_text().splitlines()
    for line in (
        "listener 8884",
        f"password_file {pass_dep.broker_dir.resolve()}/passwd",
        "tls_version tlsv1.3",
        "use_username_as_clientid true",
        "allow_anonymous false",
        "require_certificate false",
    ):
        assert line in conf
    bundle = enroll(pass_dep.root, "pi-1")
    assert mode_of(bundle) == 0o700 and sorted(os.listdir(bundle)) == ["broker.password", "broker.toml", "ca.pem"]
    assert all(mode_of(bundle / name) == 0o600 for name in os.listdir(bundle))
    password = (bundle / "broker.password").read_text().strip()
    assert len(password) >= 40 and check_mosquitto_hash(password, read_password_file(pass_dep.password_path)["pi-1"])
    assert password not in (pass_dep.password_path).read_text()
    b = _settings(bundle)
    assert (b.host, b.port, b.username, b.tls_version) == ("broker.example.com", 8884, "pi-1", "1.3")
    assert broker_password(b) == password and broker_tls(b).ca_file == str(bundle / "ca.pem")


def _settings(bundle, cls=BrokerSettings):
    """The bundle's broker.toml as a device (or the cloud) config would read it (paths relative to the file)."""
    raw = read_toml(str(bundle / "broker.toml"))["broker"]
    for key in ("ca_file", "cert_file", "key_file", "password_file"):
        if key in raw:
            raw[key] = str(bundle / raw[key])
    return from_mapping(cls, raw, "broker.toml", "broker")


def test_a_certificate_bundle_is_signed_by_the_ca_with_the_device_id_as_common_name(cert_dep):
    bundle = enroll(cert_dep.root, "pi-1")
    assert sorted(os.listdir(bundle)) == ["broker.toml", "ca.pem", "client.key", "client.pem"]
    assert all(mode_of(bundle / name) == 0o600 for name in os.listdir(bundle)) and mode_of(bundle) == 0o700
    cert = pki.load_cert(bundle / "client.pem")
    ca = pki.load_cert(cert_dep.ca_cert_path)
    cert.verify_directly_issued_by(ca)
    assert pki.common_name(cert) == "pi-1" and cert.issuer == ca.subject
    tls = broker_tls(_settings(bundle))
    assert tls.cert_file == str(bundle / "client.pem") and tls.key_file == str(bundle / "client.key")
    tls.context()  # the key matches the certificate
    cloud = _settings(cert_dep.bundle("ecos-cloud"), BrokerConfig)
    assert pki.common_name(pki.load_cert(cloud.cert_file)) == "ecos-cloud"


@pytest.mark.parametrize(
    "device_id, needle",
    [
        ("ecos-cloud", "the cloud's identity"),
        ("a/b", "invalid"),
        ("+", "invalid"),
        ("#", "invalid"),
        ("..", "invalid"),
        ("", "invalid"),
    ],
)
def test_enroll_refuses_the_cloud_identity_and_ids_that_are_not_topic_safe(cert_dep, device_id, needle):
    with pytest.raises(UsageError, match=needle):
        enroll(cert_dep.root, device_id)


def test_enroll_twice_needs_rotate_and_a_folder_from_broker_config(cert_dep, tmp_path):
    enroll(cert_dep.root, "pi-1")
    with pytest.raises(UsageError, match="enrolled already; --rotate"):
        enroll(cert_dep.root, "pi-1")
    with pytest.raises(UsageError, match="not a deployment folder"):
        enroll(tmp_path / "elsewhere", "pi-1")


def test_rotation_and_revocation_in_certificate_mode_go_through_the_crl(cert_dep):
    first = pki.load_cert(enroll(cert_dep.root, "pi-1") / "client.pem")
    second = pki.load_cert(enroll(cert_dep.root, "pi-1", rotate=True) / "client.pem")

    def revoked():
        crl = x509.load_pem_x509_crl((cert_dep.broker_dir / "crl.pem").read_bytes())
        assert crl.is_signature_valid(pki.load_cert(cert_dep.ca_cert_path).public_key())
        return {r.serial_number for r in crl}

    assert revoked() == {first.serial_number} and second.serial_number != first.serial_number
    revoke(cert_dep.root, "pi-1")
    assert revoked() == {first.serial_number, second.serial_number}
    assert not cert_dep.bundle("pi-1").exists() and "pi-1" not in Deployment.load(cert_dep.root).identities
    enroll(cert_dep.root, "pi-1")  # enrolled again after a revocation: a new certificate


def test_rotation_and_revocation_in_password_mode_rewrite_the_password_file(pass_dep):
    old = (enroll(pass_dep.root, "pi-1") / "broker.password").read_text().strip()
    new = (enroll(pass_dep.root, "pi-1", rotate=True) / "broker.password").read_text().strip()
    hashed = read_password_file(pass_dep.password_path)["pi-1"]
    assert check_mosquitto_hash(new, hashed) and not check_mosquitto_hash(old, hashed)
    revoke(pass_dep.root, "pi-1")
    assert sorted(read_password_file(pass_dep.password_path)) == ["ecos-cloud"]


def test_an_expired_certificate_can_be_made_for_tests(cert_dep):
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30)
    cert = pki.load_cert(
        enroll(cert_dep.root, "old", not_before=past, not_after=past + datetime.timedelta(days=1)) / "client.pem"
    )
    assert pki.not_after(cert) < datetime.datetime.now(datetime.timezone.utc)


def test_switching_modes_with_enrolled_devices_needs_force(cert_dep):
    enroll(cert_dep.root, "pi-1")
    with pytest.raises(UsageError, match="--force"):
        write_broker_config(cert_dep.root, mode="password", hostnames=["localhost"], broker_group=None)
    d = write_broker_config(cert_dep.root, mode="password", hostnames=["localhost"], broker_group=None, force=True)
    assert sorted(d.identities) == ["ecos-cloud"] and sorted(read_password_file(d.password_path)) == ["ecos-cloud"]
    assert not d.crl_path.exists()


def test_the_commands(tmp_path, capsys):
    dep = str(tmp_path / "dep")
    assert (
        cloud_main(
            ["broker-config", "--dir", dep, "--mode", "password", "--hostname", "localhost", "--broker-group", ""]
        )
        == 0
    )
    assert cloud_main(["enroll", "pi-1", "--dir", dep]) == 0
    out = capsys.readouterr().out
    assert "ecos.conf" in out and "clients/pi-1" in out
    password = (tmp_path / "dep" / "clients" / "pi-1" / "broker.password").read_text().strip()
    assert password not in out
    assert cloud_main(["enroll", "--cloud", "--rotate", "--dir", dep]) == 0
    assert cloud_main(["enroll", "pi-1", "--revoke", "--dir", dep]) == 0
    assert cloud_main(["enroll", "--dir", dep]) == 2  # neither a device nor --cloud
    assert "DEVICE_ID" in capsys.readouterr().err


def test_device_sdk_does_not_import_the_cloud():
    code = (
        "import sys, device_sdk.config, device_sdk.transport, device_sdk.agent; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('cloud', 'torch')]; assert not bad, bad"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
