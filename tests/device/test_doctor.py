"""``ecos-device doctor``, ``status`` and ``models`` on real configs, a real Mosquitto (plain and TLS)
and a real encoder; every check can fail."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cloud.tools.broker import Broker, free_port, mosquitto_binary, port_open
from device_sdk import cli as device_cli
from device_sdk import doctor

HOST = "127.0.0.1"


def write_config(
    root: Path, encoder, local, *, port: int = 1883, broker_extra: str = "", models_extra: str = ""
) -> str:
    (root / "state").mkdir(exist_ok=True)
    keys = root / "keys"
    keys.mkdir(exist_ok=True)
    raw = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    (keys / "cloud.pub").write_text(raw.hex())
    enc = f'encoder = "{encoder}"\n' if encoder else ""
    text = (
        f'device_id = "doc-1"\n[broker]\nhost = "{HOST}"\nport = {port}\n{broker_extra}'
        f'[privacy]\nledger = "state/ledger.json"\nepsilon_per_probe = 0.5\n'
        f'[data]\nlocal = "{local}"\n'
        f'[models]\nstore = "state/models"\ncloud_public_key = "keys/cloud.pub"\n{enc}{models_extra}'
    )
    path = root / "device.toml"
    path.write_text(text)
    return str(path)


def by_name(checks):
    return {c.name: c for c in checks}


@pytest.mark.skipif(not port_open(HOST, 1883), reason="needs the Mosquitto on 127.0.0.1:1883")
def test_doctor_all_good_on_a_reachable_broker(tmp_path, encoder_path, digits_root, capsys):
    cfg = write_config(tmp_path, encoder_path, digits_root / "devices" / "printed" / "local")
    rc = device_cli.main(["doctor", "--config", cfg])
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    names = [line.split()[1] for line in lines]
    assert names == ["config", "broker", "keys", "runtime", "ledger", "data", "disk", "clock"], out
    checks = by_name(doctor.run_checks(cfg))
    assert checks["broker"].status == "ok" and "reachable" in checks["broker"].detail
    assert checks["runtime"].status == "ok" and "onnxruntime" in checks["runtime"].detail
    assert checks["data"].detail.endswith("40 images")
    assert checks["clock"].status in ("ok", "warn")  # this container may have no NTP; never a failure then
    assert rc == (1 if any(c.status == "fail" for c in checks.values()) else 0)
    assert rc == 0, out


def test_doctor_fails_on_an_unreachable_port_a_missing_encoder_and_a_read_only_ledger(tmp_path, digits_root, capsys):
    cfg = write_config(
        tmp_path, tmp_path / "nope.onnx", digits_root / "devices" / "printed" / "local", port=free_port()
    )
    os.chmod(tmp_path / "state", 0o500)
    try:
        rc = device_cli.main(["doctor", "--config", cfg, "--timeout", "2"])
        checks = by_name(doctor.run_checks(cfg, timeout=2))
    finally:
        os.chmod(tmp_path / "state", 0o700)
    out = capsys.readouterr().out
    assert rc == 1 and "check(s) failed" in out
    assert checks["broker"].status == "fail" and "not reachable" in checks["broker"].detail
    assert checks["runtime"].status == "fail" and "not found" in checks["runtime"].detail
    if os.geteuid() != 0:  # root writes into a 0500 folder anyway
        assert checks["ledger"].status == "fail"


def test_doctor_stops_at_a_broken_config(tmp_path, capsys):
    bad = tmp_path / "device.toml"
    bad.write_text('device_id = "x"\n[broker]\nport = "not a number"\n')
    assert device_cli.main(["doctor", "--config", str(bad)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and out[0].startswith("fail  config")


@pytest.mark.parametrize("kind", ["not utf-8", "a folder"])
def test_an_unreadable_config_is_a_fail_line_not_a_traceback(tmp_path, capsys, kind):
    if kind == "a folder":
        path = tmp_path
    else:
        path = tmp_path / "device.toml"
        path.write_bytes(b"\xff\xfe device_id = 1\n")
    assert device_cli.main(["doctor", "--config", str(path)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("fail  config") and str(path) in out[0]
    assert device_cli.main(["status", "--config", str(path)]) == 2  # other commands: a usage error, exit 2


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    """A real Mosquitto with a TLS listener that requires a client certificate from the test CA."""
    from cloud.security import pki

    if mosquitto_binary() is None:
        pytest.skip("needs the mosquitto binary")
    root = tmp_path_factory.mktemp("tls")
    ca, ca_key = pki.create_ca("doctor CA")
    server, server_key = pki.issue(ca, ca_key, "broker", server_names=[HOST, "localhost"])
    client, client_key = pki.issue(ca, ca_key, "doc-1")
    rogue, rogue_key = pki.create_ca("rogue CA")
    for name, data in (
        ("ca.pem", pki.cert_pem(ca)),
        ("server.pem", pki.cert_pem(server)),
        ("server.key", pki.key_pem(server_key)),
        ("client.pem", pki.cert_pem(client)),
        ("client.key", pki.key_pem(client_key)),
        ("rogue.pem", pki.cert_pem(rogue)),
    ):
        (root / name).write_bytes(data)
    port = free_port()
    conf = root / "mosquitto.conf"
    lines = [
        f"listener {port} {HOST}",
        f"cafile {root / 'ca.pem'}",
        f"certfile {root / 'server.pem'}",
        f"keyfile {root / 'server.key'}",
        "require_certificate true",
        "allow_anonymous true",
        "persistence false",
        f"log_dest file {root / 'mosquitto.log'}",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n")
    broker = Broker(HOST, port, "mosquitto", "5", [mosquitto_binary(), "-c", str(conf)], str(root)).start()
    yield root, port
    broker.stop()


def test_doctor_checks_the_tls_handshake(tls_broker, tmp_path, encoder_path, digits_root):
    root, port = tls_broker
    tls = f'tls = true\ncert_file = "{root / "client.pem"}"\nkey_file = "{root / "client.key"}"\n'
    good = write_config(
        tmp_path, encoder_path, digits_root / "pool", port=port, broker_extra=tls + f'ca_file = "{root / "ca.pem"}"\n'
    )
    check = by_name(doctor.run_checks(good))["broker"]
    assert check.status == "ok" and "TLSv1." in check.detail and "verified" in check.detail, check
    assert "client certificate valid for" in by_name(doctor.run_checks(good))["keys"].detail
    other = tmp_path / "other"
    other.mkdir()
    wrong_ca = write_config(
        other, encoder_path, digits_root / "pool", port=port, broker_extra=tls + f'ca_file = "{root / "rogue.pem"}"\n'
    )
    check = by_name(doctor.run_checks(wrong_ca))["broker"]
    assert check.status == "fail" and "TLS handshake failed" in check.detail, check


def test_clock_check_fails_only_on_a_clock_never_set():
    assert doctor.check_clock(now=86400.0)[0] == "fail"
    status, detail = doctor.check_clock()
    assert status in ("ok", "warn") and ("synchronised" in detail or "unknown" in detail)
    synced, how = doctor.clock_synchronised()
    assert synced in (True, False, None) and how


def test_status_and_models_with_a_rollback(tmp_path, encoder_path, digits_root, capsys):
    import json

    from device_sdk.delivery.install import ModelStore
    from device_sdk.errors import UsageError

    cfg = write_config(tmp_path, encoder_path, digits_root / "pool")
    assert device_cli.main(["status", "--config", cfg]) == 0
    out = capsys.readouterr().out
    assert "device doc-1" in out and "ledger: not created yet" in out and "(configured, not installed)" in out
    # two installs of the classifier (the same artifact file under two manifests is enough for the store)
    store = ModelStore(tmp_path / "state" / "models")
    for version in (1, 2):
        store.install(_manifest(encoder_path, version), _staged(tmp_path, encoder_path, version))
    assert device_cli.main(["models", "--config", cfg, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["classifier"]["current"]["version"] == 2 and report["classifier"]["previous"]["version"] == 1
    assert device_cli.main(["models", "--config", cfg, "--rollback", "classifier"]) == 0
    assert "rolled back classifier to" in capsys.readouterr().out
    assert store.current("classifier").version == 1
    with pytest.raises(UsageError):
        store.rollback("encoder")
    assert device_cli.main(["models", "--config", cfg, "--rollback", "encoder"]) == UsageError.exit_code


def _staged(tmp_path, encoder_path, version):
    path = tmp_path / f"staged-{version}.onnx"
    path.write_bytes(Path(encoder_path).read_bytes() + b"\0" * version)  # distinct sha256 per version
    return path


def _manifest(encoder_path, version):
    import hashlib
    import json

    from device_sdk.protocol import ArtifactManifest
    from device_sdk.runtime import load_model

    meta = json.loads(load_model(str(encoder_path)).meta.to_json())
    meta["kind"] = "classifier"
    data = Path(encoder_path).read_bytes() + b"\0" * version
    return ArtifactManifest(
        f"a{version}",
        "student",
        version,
        "onnx",
        "fp32",
        len(data),
        hashlib.sha256(data).hexdigest(),
        len(data),
        [],
        meta,
    )
