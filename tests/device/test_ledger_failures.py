"""A ledger that cannot be written (disk full, read-only) or is corrupt (issue 8, item 8).

Before: ENOSPC or EROFS while charging escaped as a bare OSError, the agent dropped the probe as
an internal error and sent nothing, so the cloud saw the device as "missing"; a corrupt ledger
gave a refusal whose reason held the ledger's full path. Now the ledger raises typed errors
(``ledger_unavailable``, ``ledger_corrupt``) that charge nothing and carry a path-free public
reason; the agent sends that as its refusal and keeps answering once the disk has room again.

The full and read-only filesystems are real (a small tmpfs, tests/fullfs.py), skipped with the
reason where mounting is impossible; the monkeypatched ENOSPC tests run everywhere.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import List, Tuple

import pytest
from fullfs import fill, remount, requires_mount, small_tmpfs

from device_sdk import fsutil
from device_sdk.errors import LedgerCorrupt, LedgerUnavailable, MessageError
from device_sdk.privacy.ledger import PrivacyLedger
from device_sdk.protocol import Refusal, outbox
from device_sdk.protocol.envelope import decode
from device_sdk.protocol.round import Probe, Scores


def spend(ledger: PrivacyLedger, key: str = "probe-1") -> bytes:
    out: List[bytes] = []
    ledger.release(key, 6.0, 1.0, 4, lambda: b"payload of " + key.encode(), out.append)
    return out[0]


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ---- the ledger -----------------------------------------------------------------------------------


def test_enospc_while_charging_is_typed_charges_nothing_and_names_no_path(tmp_path, monkeypatch):
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", device_id="dev")
    monkeypatch.setattr(fsutil.os, "fsync", no_space)
    with pytest.raises(LedgerUnavailable) as info:
        spend(ledger)
    err = info.value
    assert err.code == "ledger_unavailable" and err.errno_name == "ENOSPC"
    assert str(tmp_path) in str(err)  # the local log says which file
    assert str(tmp_path) not in err.public and "/" not in err.public and "ENOSPC" in err.public
    monkeypatch.undo()
    assert ledger.releases() == [] and ledger.spent()[0] == 0.0  # nothing charged
    assert spend(ledger) == b"payload of probe-1" and len(ledger.releases()) == 1  # and it works again


def test_a_corrupt_ledger_is_typed_and_its_public_reason_names_no_path(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path, device_id="dev")
    path.write_text('{"kind": "ecos.privacy_ledger", "version": 1')
    with pytest.raises(LedgerCorrupt) as info:
        spend(ledger)
    assert isinstance(info.value, MessageError) and info.value.code == "ledger_corrupt"
    assert str(path) in str(info.value) and str(tmp_path) not in info.value.public and "/" not in info.value.public


def test_a_missing_ledger_is_unavailable(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path, device_id="dev")
    path.unlink()
    with pytest.raises(LedgerUnavailable) as info:
        spend(ledger)
    assert info.value.errno_name == "ENOENT" and "/" not in info.value.public


@requires_mount
def test_a_really_full_filesystem_refuses_typed_and_recovers_when_freed():
    with small_tmpfs(64) as fs:
        ledger = PrivacyLedger.open(fs / "ledger.json", device_id="dev")
        spend(ledger, "before")
        before = (fs / "ledger.json").read_bytes()
        filler = fill(fs)
        with pytest.raises(LedgerUnavailable) as info:
            spend(ledger, "while-full")
        assert info.value.errno_name == "ENOSPC"
        assert (fs / "ledger.json").read_bytes() == before  # the old ledger is intact: the write was atomic
        assert [p.name for p in fs.iterdir() if p.name.endswith(".tmp")] == []  # no half-written temporary left
        filler.unlink()
        spend(ledger, "after")
        assert [r["key"] for r in ledger.releases()] == ["before", "after"]


@requires_mount
def test_a_read_only_ledger_refuses_typed():
    with small_tmpfs(64) as fs:
        ledger = PrivacyLedger.open(fs / "ledger.json", device_id="dev")
        remount(fs, "ro")
        try:
            with pytest.raises(LedgerUnavailable) as info:
                spend(ledger)
            assert info.value.errno_name == "EROFS" and "read-only" in info.value.public
            assert ledger.releases() == []  # still readable, nothing charged
        finally:
            remount(fs, "rw")


# ---- the agent: a refusal reaches the cloud, no path in it, and the agent goes on -------------------


class Recorder:
    def __init__(self):
        self.sent: List[Tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.sent.append((topic, payload))

    def stop(self) -> None:
        pass

    def replies(self) -> list:
        out = []
        for _, p in self.sent:
            kind = decode(p).type
            out.append(Scores.from_bytes(p) if kind == "scores" else Refusal.from_bytes(p))
        return out


def _cloud_key():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from cloud.security.keys import SigningKey

    return SigningKey(Ed25519PrivateKey.generate())


CLOUD_KEY = _cloud_key()  # signs the probes: a device answers only probes signed by a key it trusts


def raw_public_key(folder: Path) -> str:
    path = folder / "cloud.pub"
    path.write_text(CLOUD_KEY.public_hex + "\n")
    return str(path)


def make_agent(state: Path, keys: Path, digits_root: Path, encoder_path: Path):
    from cloud.tools.broker import Broker
    from cloud.tools.demo import simulated_device_config
    from device_sdk.agent import DeviceAgent

    folder = digits_root / "devices" / "street"
    cfg = simulated_device_config(
        "dev-full",
        str(state),
        Broker("127.0.0.1", 1, "given"),
        raw_public_key(keys),
        str(encoder_path),
        str(folder / "local"),
        None,
    )
    agent = DeviceAgent(cfg)
    agent.transport = Recorder()  # no broker needed: the test reads what the agent publishes
    return agent


def probe_of(pool_index, probe_id: str) -> Probe:
    index, _ = pool_index
    p = index.probe()
    return Probe.from_bytes(
        Probe(probe_id, p.encoder_sha256, p.centroids, p.codec, p.max_distance, p.created).to_bytes(signer=CLOUD_KEY)
    )


def assert_no_local_path(text: str, *paths: Path) -> None:
    for p in paths:
        assert str(p) not in text, text
    assert not re.search(r"(^|[\s'\"(=])/[\w.-]+/", text), text


def test_agent_refuses_with_a_typed_code_when_charging_fails_and_keeps_answering(
    tmp_path, monkeypatch, pool_index, digits_root, encoder_path
):
    agent = make_agent(tmp_path / "dev", tmp_path, digits_root, encoder_path)
    monkeypatch.setattr(fsutil.os, "fsync", no_space)
    agent._on_probe(probe_of(pool_index, "round-1"))
    monkeypatch.undo()
    (refusal,) = agent.transport.replies()
    assert isinstance(refusal, Refusal) and refusal.code == "ledger_unavailable" and "ENOSPC" in refusal.reason
    assert_no_local_path(refusal.reason, tmp_path)
    assert agent.ledger.releases() == []
    agent._on_probe(probe_of(pool_index, "round-2"))  # room again: answered and charged
    assert isinstance(agent.transport.replies()[-1], Scores) and len(agent.ledger.releases()) == 1


def test_agent_refusal_after_a_corrupt_ledger_names_no_path(tmp_path, pool_index, digits_root, encoder_path):
    agent = make_agent(tmp_path / "dev", tmp_path, digits_root, encoder_path)
    Path(agent.ledger.path).write_text("{not json")
    agent.handle(*_probe_message(agent, probe_of(pool_index, "round-c")))
    (refusal,) = agent.transport.replies()
    assert refusal.code == "ledger_corrupt"
    assert_no_local_path(refusal.reason, tmp_path)
    assert agent.stats.dropped == 0  # a reply, not a dropped message


def _probe_message(agent, probe: Probe) -> Tuple[str, bytes]:
    from device_sdk.protocol import inbox

    return inbox(agent.device_id), probe.to_bytes()


@requires_mount
def test_agent_on_a_really_full_disk_refuses_then_answers_when_freed(tmp_path, pool_index, digits_root, encoder_path):
    with small_tmpfs(256) as fs:
        agent = make_agent(fs / "dev", tmp_path, digits_root, encoder_path)
        filler = fill(fs)
        agent._on_probe(probe_of(pool_index, "round-full"))
        (refusal,) = agent.transport.replies()
        assert refusal.code == "ledger_unavailable" and "no space left" in refusal.reason.lower()
        assert_no_local_path(refusal.reason, fs, tmp_path)
        filler.unlink()
        agent._on_probe(probe_of(pool_index, "round-full"))  # the cloud re-sends the probe: now answered
        assert isinstance(agent.transport.replies()[-1], Scores) and len(agent.ledger.releases()) == 1
    assert outbox("dev-full") == agent.transport.sent[0][0]
