"""Issue 8, items 2, 5 and 6: signed probes, manifests bound to their device, key rotation and revocation.

Each test first plays the attack the issue reports (it succeeded before these changes: 19 forged
probes emptied a default ledger, another device's model and an older fleet model installed and
the device's own newer model was deleted, a new signing key bricked every install) and checks
that it now fails with a typed error and costs nothing.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import device_sdk.protocol as P
from cloud.security.keys import KeyRing, SigningKey, generate_keypair
from cloud.serve.delivery import build_manifest
from device_sdk.delivery.install import DeliveryReceiver, ModelStore
from device_sdk.device import answer_probe
from device_sdk.errors import (
    MessageError,
    ProbeConflict,
    RevokedKey,
    SignatureError,
    TrustError,
    UnknownKey,
    Unsigned,
    UsageError,
)
from device_sdk.privacy.ledger import PrivacyLedger
from device_sdk.protocol import envelope as wire
from device_sdk.protocol.round import Probe
from device_sdk.signing import TrustStore, key_id, load_public_key
from device_sdk.trust import DeviceTrust

ROOT = Path(__file__).resolve().parents[2]
META = {
    "kind": "classifier",
    "arch": "linear",
    "input_shape": [3, 8, 8],
    "mean": [0.5] * 3,
    "std": [0.25] * 3,
    "labels": ["a", "b"],
    "precision": "int8",
}
ENCODER = "e" * 64


# ---- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def ring(tmp_path):
    return KeyRing(tmp_path / "cloud-keys")


def _artifact(tmp_path: Path, name: str, seed: int, size: int = 3000) -> Path:
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def _deliver(receiver: DeliveryReceiver, manifest: P.ArtifactManifest, path: Path):
    """Manifest then every chunk, as the cloud sends them; the last reply."""
    replies = receiver.handle(manifest)
    data = path.read_bytes()
    for i in range(manifest.n_chunks):
        replies = receiver.handle(P.ArtifactChunk(manifest.artifact_id, i, data[i * 1024 : (i + 1) * 1024])) or replies
    return replies[-1]


def _manifest(path, signer, name="classifier-pi-1", version=1, targets=("pi-1",)):
    return build_manifest(path, signer, name=name, version=version, targets=list(targets), chunk_size=1024, meta=META)


class FakeEncoder:
    """Stands in for the ONNX encoder: answer_probe only needs its hash and feature dimension."""

    sha256 = ENCODER
    meta = SimpleNamespace(feature_dim=4)


def _probe(probe_id="round-1", signer=None, **changes) -> Probe:
    """A probe as a device decodes it from the wire (signed by ``signer`` if given)."""
    probe = Probe(probe_id, ENCODER, np.eye(4, dtype=np.float32), created="2026-01-01T00:00:00+00:00", **changes)
    return Probe.from_bytes(probe.to_bytes(signer=signer))


FEATURES = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)


# ---- key ids and the trust store -----------------------------------------------------------------


def test_a_key_id_is_the_sha256_prefix_of_the_raw_public_key(ring):
    raw = ring.current.public.public_bytes_raw()
    assert ring.current.key_id == hashlib.sha256(raw).hexdigest()[:16] == key_id(load_public_key(ring.public_key_path))


def test_every_way_a_signature_fails_is_its_own_typed_error(ring, tmp_path):
    trusted = TrustStore([ring.current.public])
    data = b"manifest bytes"
    assert trusted.verify(data, ring.current.key_id, ring.current.sign(data)) == ring.current.key_id
    stranger = SigningKey.load(generate_keypair(tmp_path / "stranger")[0])
    cases = [
        (Unsigned, ring.current.key_id, ""),
        (UnknownKey, None, ring.current.sign(data)),
        (UnknownKey, stranger.key_id, stranger.sign(data)),
        (SignatureError, ring.current.key_id, stranger.sign(data)),  # a trusted id on someone else's signature
        (SignatureError, ring.current.key_id, ring.current.sign(b"other bytes")),
    ]
    for error, kid, signature in cases:
        with pytest.raises(error) as info:
            trusted.verify(data, kid, signature)
        assert info.type is error
    revoked = TrustStore([ring.current.public], revoked=[ring.current.key_id])
    with pytest.raises(RevokedKey):  # revocation wins over trust
        revoked.verify(data, ring.current.key_id, ring.current.sign(data))
    assert revoked.key_ids == []


def test_key_generation_and_signing_live_in_the_cloud_only():
    import device_sdk.signing as device_signing

    for name in ("generate_keypair", "ensure_keypair", "load_private_key", "sign"):
        assert not hasattr(device_signing, name), name
    for path in (ROOT / "device_sdk").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert "Ed25519PrivateKey" not in names, f"{path.name} imports the private key class"


# ---- item 6: rotation and revocation -------------------------------------------------------------


def test_a_new_key_without_a_rotation_is_refused_typed_and_installs_nothing(ring, tmp_path):
    """The issue: after a new key pair every install failed with bad_signature. Now it is unknown_key."""
    store = ModelStore(tmp_path / "store")
    receiver = DeliveryReceiver(store, TrustStore([ring.current.public]), "pi-1")
    stranger = SigningKey.load(generate_keypair(tmp_path / "new")[0])
    reply = _deliver(receiver, _manifest(_artifact(tmp_path, "m.onnx", 1), stranger), tmp_path / "m.onnx")
    assert isinstance(reply, P.InstallFailed) and reply.code == "unknown_key" and store.current("classifier") is None


def test_the_documented_rotation_never_bricks_a_device(ring, tmp_path):
    """docs/security.md: ship the next key signed by the current one, switch, then revoke the old key."""
    state = tmp_path / "device" / "trust.json"
    old_public = tmp_path / "provisioned.pub.pem"
    old_public.write_bytes(ring.public_key_path.read_bytes())
    trust = DeviceTrust.from_files([old_public], state_path=state)
    store = ModelStore(tmp_path / "device" / "models")
    receiver = DeliveryReceiver(store, trust, "pi-1")
    old = ring.current

    assert ring.key_update() is None  # nothing to announce before a rotation
    nxt = ring.new_next()
    update = P.decode_message(ring.key_update().to_bytes())  # over the wire, signed by the old key
    assert update.key_id == old.key_id and {k["key_id"] for k in update.keys} == {old.key_id, nxt.key_id}
    assert trust.apply(update).added == [nxt.key_id]
    assert trust.apply(update).applied is False  # a repeat changes nothing
    assert trust.key_ids == sorted([old.key_id, nxt.key_id])

    # in-flight deliveries signed with the old key still install; so do those signed with the new one
    v1 = _manifest(_artifact(tmp_path, "v1.onnx", 1), old, version=1)
    assert isinstance(_deliver(receiver, v1, tmp_path / "v1.onnx"), P.Installed)
    ring.promote()
    assert ring.current.key_id == nxt.key_id and ring.next is None
    assert (ring.directory / "retired" / f"{old.key_id}.pem").exists()
    v2 = _manifest(_artifact(tmp_path, "v2.onnx", 2), ring.current, version=2)
    assert isinstance(_deliver(receiver, v2, tmp_path / "v2.onnx"), P.Installed)

    ring.revoke(old.key_id)
    revocation = ring.key_update()
    assert revocation.key_id == nxt.key_id and revocation.revoked == [old.key_id]
    assert trust.apply(revocation).revoked == [old.key_id]
    v3_old_key = _manifest(_artifact(tmp_path, "v3.onnx", 3), old, version=3)
    assert _deliver(receiver, v3_old_key, tmp_path / "v3.onnx").code == "revoked_key"
    assert store.current("classifier").sha256 == v2.sha256

    # a restarted device keeps what it learned: the new key, and the revocation over its provisioned key
    again = DeviceTrust.from_files([old_public], state_path=state)
    assert again.key_ids == [nxt.key_id] and again.revoked == {old.key_id}
    with pytest.raises(RevokedKey):
        again.apply(update)  # the old key can no longer speak, not even to re-add itself


def test_key_updates_cannot_brick_or_be_forged(ring, tmp_path):
    trust = DeviceTrust([ring.current.public])
    stranger = SigningKey.load(generate_keypair(tmp_path / "attacker")[0])
    forged = P.KeyUpdate(5, [{"key_id": stranger.key_id, "public_key": stranger.public_hex}], [ring.current.key_id])
    with pytest.raises(UnknownKey):
        trust.apply(forged.signed_by(stranger))
    with pytest.raises(SignatureError):  # a trusted key id on a signature it did not make
        trust.apply(
            dataclasses.replace(forged, key_id=ring.current.key_id, signature=stranger.sign(forged.signed_bytes()))
        )
    with pytest.raises(TrustError, match="no trusted key"):  # the only key revoked: refused, nothing changes
        trust.apply(P.KeyUpdate(6, [], [ring.current.key_id]).signed_by(ring.current))
    assert trust.key_ids == [ring.current.key_id] and trust.serial == 0
    with pytest.raises(MessageError, match="key id is the key's"):  # a key filed under another key's id
        P.KeyUpdate(1, [{"key_id": ring.current.key_id, "public_key": stranger.public_hex}], []).to_bytes()


def test_configured_revocations_win_and_a_device_with_no_usable_key_does_not_start(ring, tmp_path):
    with pytest.raises(UsageError, match="no usable signing key"):
        DeviceTrust.from_files([ring.public_key_path], revoked=[ring.current.key_id])
    nxt = ring.new_next()
    trust = DeviceTrust.from_files([ring.public_key_path], revoked=[nxt.key_id])
    trust.apply(ring.key_update())  # announces the next key, which the operator revoked in the config
    assert trust.key_ids == [ring.current.key_id]


def test_the_key_ring(ring, tmp_path):
    assert stat.S_IMODE(os.stat(ring.private_key_path).st_mode) == 0o600
    with pytest.raises(UsageError, match="no next key"):
        ring.promote()
    with pytest.raises(UsageError, match="current"):
        ring.revoke(ring.current.key_id)
    nxt = ring.new_next()
    assert stat.S_IMODE(os.stat(ring.directory / "next_ed25519.pem").st_mode) == 0o600
    with pytest.raises(UsageError, match="exists already"):
        ring.new_next()
    ring.public_key_path.write_bytes(b"a stale or tampered public key file")
    again = KeyRing(ring.directory, create=False)  # public keys always come from the private ones
    assert key_id(load_public_key(again.public_key_path)) == again.current.key_id and again.next.key_id == nxt.key_id
    assert again.serial == 1
    with pytest.raises(UsageError, match="no signing key"):
        KeyRing(tmp_path / "empty", create=False)


def test_the_device_config_takes_several_trusted_keys_revocations_and_fleets(ring, tmp_path):
    from device_sdk.config import load_device_config
    from device_sdk.trust import trust_from_settings

    nxt = ring.new_next()
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "a.pem").write_bytes(ring.public_key_path.read_bytes())
    (tmp_path / "keys" / "b.hex").write_text(nxt.public_hex + "\n")
    config = tmp_path / "device.toml"
    config.write_text(
        'device_id = "pi-1"\n[models]\ntrusted_keys = ["keys/a.pem", "keys/b.hex"]\n'
        f'revoked_keys = ["{"0" * 16}"]\nfleets = ["kitchen"]\n'
    )
    cfg = load_device_config(str(config))
    assert cfg.models.key_files == [str(tmp_path / "keys" / "a.pem"), str(tmp_path / "keys" / "b.hex")]
    assert trust_from_settings(cfg.models).key_ids == sorted([ring.current.key_id, nxt.key_id])
    env = {"ECOS_DEVICE_MODELS_REVOKED_KEYS": f"{nxt.key_id}, {'1' * 16}", "ECOS_DEVICE_MODELS_FLEETS": "a,b"}
    cfg = load_device_config(str(config), env=env)
    assert cfg.models.revoked_keys == [nxt.key_id, "1" * 16] and cfg.models.fleets == ["a", "b"]
    assert trust_from_settings(cfg.models).key_ids == [ring.current.key_id]
    for text, why in (
        ('[models]\ntrusted_keys = ["nope.pem"]\n', "does not exist"),
        ('[models]\ncloud_public_key = "keys/a.pem"\nrevoked_keys = ["XYZ"]\n', "revoked_keys"),
        ('[models]\ncloud_public_key = "keys/a.pem"\nfleets = ["a/b"]\n', "fleets"),
        ("[models]\n", "cloud_public_key"),
    ):
        config.write_text('device_id = "pi-1"\n' + text)
        with pytest.raises(UsageError, match=why):
            load_device_config(str(config))


# ---- item 2: signed probes -----------------------------------------------------------------------


def test_forged_probes_are_refused_before_anything_is_computed_or_charged(ring, tmp_path):
    """The issue: 19 forged probes used up a default ledger in 1.6 s. Now none is charged."""
    trust = TrustStore([ring.current.public])
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", device_id="pi-1")
    stranger = SigningKey.load(generate_keypair(tmp_path / "attacker")[0])
    real = _probe("round-1", ring.current)
    forgeries = []
    for n in range(200):
        kind = n % 4
        if kind == 0:
            forgeries.append((Unsigned, _probe(f"forged-{n}")))
        elif kind == 1:
            forgeries.append((UnknownKey, _probe(f"forged-{n}", stranger)))
        elif kind == 2:  # the trusted key's id on the attacker's signature
            p = _probe(f"forged-{n}", stranger)
            forgeries.append((SignatureError, dataclasses.replace(p, key_id=ring.current.key_id)))
        else:  # a real signed probe under another id
            forgeries.append((SignatureError, dataclasses.replace(real, probe_id=f"forged-{n}")))
    for error, forged in forgeries:
        with pytest.raises(error) as info:  # model=None: had it got past the signature it would have failed on it
            answer_probe(forged, None, None, ledger, epsilon=0.58, trust=trust)
        assert info.type is error
    assert ledger.releases() == [] and ledger.spent()[0] == 0.0
    scores, result = answer_probe(real, FakeEncoder(), FEATURES, ledger, epsilon=0.58, trust=trust)
    assert result.charged_epsilon > 0 and scores.probe_id == "round-1"


def test_radii_and_every_field_are_covered_by_the_signature(ring):
    trust = TrustStore([ring.current.public])
    radii = np.full(4, 0.25, dtype=np.float32)
    signed = _probe("round-2", ring.current, radii=radii, deadline=2e9, max_distance=0.5)
    trust.verify(signed.signed_bytes(), signed.key_id, signed.signature)
    for change in (
        {"radii": radii * 2},
        {"radii": None},
        {"deadline": 3e9},
        {"max_distance": 0.9},
        {"encoder_sha256": "f" * 64},
        {"created": "2030-01-01"},
        {"codec": "float32"},
    ):
        tampered = dataclasses.replace(signed, **change)
        with pytest.raises(SignatureError):
            trust.verify(tampered.signed_bytes(), tampered.key_id, tampered.signature)
    for codec in ("float16", "int8", "float32"):  # signed as the device decodes it, whatever the codec
        p = Probe.from_bytes(
            Probe("c", ENCODER, np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32), codec).to_bytes(
                signer=ring.current
            )
        )
        trust.verify(p.signed_bytes(), p.key_id, p.signature)


def test_unsigned_probes_only_with_the_explicit_dev_option(ring, tmp_path):
    trust = TrustStore([ring.current.public])
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", device_id="pi-1")
    unsigned = _probe("dev-1")
    with pytest.raises(Unsigned):
        answer_probe(unsigned, FakeEncoder(), FEATURES, ledger, epsilon=0.58, trust=trust)
    _, result = answer_probe(unsigned, FakeEncoder(), FEATURES, ledger, epsilon=0.58, trust=trust, accept_unsigned=True)
    assert result.charged_epsilon > 0
    stranger = SigningKey.load(generate_keypair(tmp_path / "attacker")[0])
    with pytest.raises(UnknownKey):  # accept_unsigned never lets a wrong signature through
        answer_probe(
            _probe("dev-2", stranger), FakeEncoder(), FEATURES, ledger, epsilon=0.58, trust=trust, accept_unsigned=True
        )


def test_same_id_other_content_is_refused_and_an_exact_replay_is_free(ring, tmp_path):
    """The issue: the same probe id with new centroids was charged each time."""
    trust = TrustStore([ring.current.public])
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", device_id="pi-1")
    first = _probe("round-3", ring.current)
    scores, result = answer_probe(first, FakeEncoder(), FEATURES, ledger, epsilon=0.58, trust=trust)
    spent = ledger.spent()[0]
    reordered = dataclasses.replace(first.without_signature(), centroids=np.eye(4, dtype=np.float32)[::-1].copy())
    other = Probe.from_bytes(reordered.to_bytes(ring.current))
    for _ in range(5):
        with pytest.raises(ProbeConflict):
            answer_probe(other, FakeEncoder(), FEATURES, ledger, epsilon=0.58, trust=trust)
    assert ledger.spent()[0] == spent and len(ledger.releases()) == 1
    sent = []
    again, replay = answer_probe(
        Probe.from_bytes(first.to_bytes()),
        FakeEncoder(),
        FEATURES,
        ledger,
        epsilon=0.58,
        trust=trust,
        commit=sent.append,
    )
    assert replay.repeated and replay.charged_epsilon == 0 and sent == [ledger.lookup(ledger.releases()[0]["key"])]
    assert again.message_id == scores.message_id and np.array_equal(again.scores, scores.scores)


@pytest.mark.parametrize("probe_id", ["a\nfake log line", "x" * 129, "with space", "tab\there", "\u00e9t\u00e9"])
def test_probe_ids_are_short_printable_ascii(probe_id):
    raw = Probe(probe_id, ENCODER, np.eye(2, dtype=np.float32)).to_bytes()
    with pytest.raises(MessageError, match="probe id"):
        P.decode_message(raw)


def test_signature_fields_of_a_probe_are_checked_on_decode(ring):
    env = wire.decode(Probe("p", ENCODER, np.eye(2, dtype=np.float32)).to_bytes(signer=ring.current))
    fields = {k: v for k, v in env.fields.items() if k not in ("type", "version")}
    without_key_id = {k: v for k, v in fields.items() if k != "key_id"}
    for changed, why in (
        ({**fields, "key_id": "XYZ"}, "key_id"),
        ({**fields, "signature": "00"}, "signature"),
        (without_key_id, "go together"),
        ({**fields, "created": 5}, "created"),
    ):
        with pytest.raises(MessageError, match=why):
            P.decode_message(wire.encode("probe", changed, env.arrays))


# ---- item 5: manifests bound to their device, versions only going up --------------------------------


def test_another_devices_model_and_an_older_fleet_model_are_refused_and_nothing_is_deleted(ring, tmp_path):
    """The issue: both installed on the device, and its own newer model was deleted from disk."""
    store = ModelStore(tmp_path / "store")
    receiver = DeliveryReceiver(store, TrustStore([ring.current.public]), "pi-1")
    own1 = _manifest(_artifact(tmp_path, "own1.onnx", 1), ring.current, version=1)
    own2 = _manifest(_artifact(tmp_path, "own2.onnx", 2), ring.current, version=2)
    for manifest, name in ((own1, "own1.onnx"), (own2, "own2.onnx")):
        assert isinstance(_deliver(receiver, manifest, tmp_path / name), P.Installed)
    other = _manifest(
        _artifact(tmp_path, "other.onnx", 3), ring.current, "classifier-pi-2", version=7, targets=["pi-2"]
    )
    old_fleet = _manifest(
        _artifact(tmp_path, "fleet.onnx", 4), ring.current, "classifier-fleet", version=1, targets=["pi-1", "pi-2"]
    )
    replayed_own = own1
    for manifest, name, code in (
        (other, "other.onnx", "wrong_target"),
        (old_fleet, "fleet.onnx", "stale_version"),
        (replayed_own, "own1.onnx", "stale_version"),
    ):
        reply = _deliver(receiver, manifest, tmp_path / name)
        assert isinstance(reply, P.InstallFailed) and reply.code == code, (name, reply)
    assert store.current("classifier").sha256 == own2.sha256 and store.previous("classifier").sha256 == own1.sha256
    assert {p.name for p in store.models_dir.iterdir()} == {f"classifier-{m.sha256[:16]}.onnx" for m in (own1, own2)}
    newer_fleet = _manifest(
        _artifact(tmp_path, "fleet3.onnx", 5), ring.current, "classifier-fleet", version=3, targets=["pi-1", "pi-2"]
    )
    assert isinstance(_deliver(receiver, newer_fleet, tmp_path / "fleet3.onnx"), P.Installed)
    assert store.previous("classifier").sha256 == own2.sha256 and store.max_version("classifier") == 3


def test_fleet_targets_and_manifests_from_before_targets(ring, tmp_path):
    path = _artifact(tmp_path, "f.onnx", 1)
    fleet = _manifest(path, ring.current, "classifier-kitchen", version=1, targets=["fleet:kitchen"])
    outsider = DeliveryReceiver(ModelStore(tmp_path / "a"), TrustStore([ring.current.public]), "pi-1")
    assert _deliver(outsider, fleet, path).code == "wrong_target"
    member = DeliveryReceiver(ModelStore(tmp_path / "b"), TrustStore([ring.current.public]), "pi-1", fleets=["kitchen"])
    assert isinstance(_deliver(member, fleet, path), P.Installed)
    legacy = dataclasses.replace(fleet, targets=None, key_id=None, signature="")
    legacy = legacy.with_signature(ring.current.sign(legacy.signed_bytes()))  # signed as before key ids and targets
    assert P.decode_message(legacy.to_bytes()) == legacy  # still decodes...
    assert member.handle(legacy)[0].code == "unknown_key"  # ...and is refused, typed
    with_id = dataclasses.replace(legacy, key_id=ring.current.key_id)
    assert member.handle(with_id)[0].code == "wrong_target"


def test_a_key_revoked_during_a_transfer_stops_the_install(ring, tmp_path):
    trust = DeviceTrust([ring.current.public])
    store = ModelStore(tmp_path / "store")
    receiver = DeliveryReceiver(store, trust, "pi-1")
    path = _artifact(tmp_path, "m.onnx", 1)
    old = ring.current
    manifest = _manifest(path, old)
    receiver.handle(manifest)
    receiver.handle(P.ArtifactChunk(manifest.artifact_id, 0, path.read_bytes()[:1024]))
    ring.new_next()
    trust.apply(ring.key_update())
    ring.promote()
    ring.revoke(old.key_id)
    trust.apply(ring.key_update())
    data = path.read_bytes()
    replies = [
        r
        for i in (1, 2)
        for r in receiver.handle(P.ArtifactChunk(manifest.artifact_id, i, data[i * 1024 : (i + 1) * 1024]))
    ]
    assert replies[-1].code == "revoked_key" and store.current("classifier") is None


def test_messages_of_this_change_round_trip():
    entry = {"key_id": "0" * 16, "public_key": "1" * 64}
    entry["key_id"] = hashlib.sha256(bytes.fromhex(entry["public_key"])).hexdigest()[:16]
    for msg in (
        P.KeyUpdate(3, [entry], ["a" * 16], "b" * 16, "c" * 128),
        P.Status("pi-1", "online", None, None, keys=["a" * 16, "b" * 16]),
        P.ArtifactManifest(
            "art-1",
            "s",
            7,
            "onnx",
            "int8",
            2500,
            "b" * 64,
            1024,
            ["c" * 64] * 3,
            META,
            "d" * 128,
            targets=["pi-1", "fleet:f1"],
            key_id="e" * 16,
        ),
    ):
        assert P.decode_message(msg.to_bytes()) == msg
    with pytest.raises(MessageError, match="targets"):
        P.decode_message(dataclasses.replace(msg, targets=["../x"]).to_bytes())


# ---- the daemon: signed probes, key updates ahead of them, versions that only go up per device --------

from test_daemon_rounds import cache, make_daemon, tick_until  # noqa: E402,F401 (cache: a fixture)


def test_the_daemon_signs_probes_and_sends_the_next_key_ahead_of_them(tmp_path, pool_index, cache):  # noqa: F811
    from cloud.serve.store import RoundState

    ring = KeyRing(tmp_path / "cloud" / "keys")  # the daemon's default keys folder
    nxt = ring.new_next()
    daemon = make_daemon(tmp_path, pool_index, cache, collect_seconds=5.0)
    assert daemon.keyring.current.key_id == ring.current.key_id
    r = daemon.submit_round(["pi-1"])
    tick_until(daemon, r.round_id, RoundState.COLLECTING)
    daemon.tick()
    sent = [(t, wire.decode(p).type, p) for t, p in daemon.transport.published if t == P.inbox("pi-1")]
    assert [kind for _, kind, _ in sent] == ["key_update", "probe"]  # the next key is trusted before it signs
    trust = DeviceTrust([ring.current.public])
    trust.apply(P.KeyUpdate.from_bytes(sent[0][2]))
    assert nxt.key_id in trust.key_ids
    probe = Probe.from_bytes(sent[1][2])
    assert probe.key_id == ring.current.key_id and trust.verify(probe.signed_bytes(), probe.key_id, probe.signature)


def test_the_daemon_versions_go_up_per_device_across_device_and_fleet_models(tmp_path, pool_index, cache):  # noqa: F811
    from cloud.serve.store import ArtifactRecord

    daemon = make_daemon(tmp_path, pool_index, cache)
    model = _artifact(tmp_path, "model.onnx", 1)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    (tmp_path / "model.onnx.json").write_text(json.dumps({"meta": META, "sha256": digest}))
    rounds = {}
    for name, devices, fleet in (
        ("own", ["pi-1"], False),
        ("fleet", ["pi-1", "pi-2"], True),
        ("own2", ["pi-2"], False),
    ):
        r = daemon.submit_round(devices, fleet=fleet)
        rounds[name] = dataclasses.replace(r, result={"model_path": str(model)})
    daemon.store.add_artifact(ArtifactRecord("old-pi-1", "r0", "classifier-pi-1", 6, "a" * 64, 1, "x", b""))
    manifests = {name: P.ArtifactManifest.from_bytes(daemon._sign(r).manifest) for name, r in rounds.items()}
    assert manifests["own"].targets == ["pi-1"] and manifests["own"].version == 7  # above pi-1's v6
    assert manifests["fleet"].targets == ["pi-1", "pi-2"] and manifests["fleet"].version == 8  # above pi-1's v7
    assert manifests["own2"].version == 9  # pi-2 holds the fleet's v8
    assert all(m.key_id == daemon.keyring.current.key_id for m in manifests.values())
