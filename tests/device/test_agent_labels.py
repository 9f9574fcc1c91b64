"""The device agent answering label queries (automated client labelling over MQTT), without a broker.

A label query spends privacy budget like a probe, so the agent handles it the same way: the
signature first (an unsigned, forged or tampered query is dropped without a reply, nothing read or
charged), then the vote over the ``[data] labelled`` folder, charged to the ledger before the
``label_votes`` go out, or a typed ``refusal`` (another encoder, budget exhausted, deadline, no
labelled images). Malformed and oversized payloads are rejected and the agent goes on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.labelling.client import build_label_query, thumbnail_query_features
from cloud.security.keys import SigningKey
from device_sdk.agent import DeviceAgent, EventKind
from device_sdk.config import DataSettings, DeviceConfig, ModelSettings, PrivacySettings
from device_sdk.imagefolder import scan_image_folder
from device_sdk.labelling import THUMB16
from device_sdk.protocol import MAX_PAYLOAD_BYTES, Refusal, inbox, outbox
from device_sdk.protocol.envelope import decode, encode
from device_sdk.protocol.labels import LabelQuery, LabelVotes

CLOUD = SigningKey(Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33))))
FORGER = SigningKey(Ed25519PrivateKey.from_private_bytes(bytes(range(2, 34))))
LABELS = [str(i) for i in range(10)]
DEV = "dev-labels"
NOISE = {"mechanism": "gaussian", "sigma": 3.0, "sensitivity": 1.0}
PRIVACY = {"epsilon": 1.0, "delta": 1e-5, "accountant": "gaussian"}


class Recorder:
    """Stands in for the MQTT transport: keeps what the agent publishes."""

    def __init__(self):
        self.sent: List[Tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.sent.append((topic, payload))

    def set_online(self, online) -> None:
        pass

    def stop(self) -> None:
        pass

    def replies(self) -> list:
        return [
            LabelVotes.from_bytes(p) if decode(p).type == "label_votes" else Refusal.from_bytes(p) for _, p in self.sent
        ]


def make_agent(tmp_path: Path, digits_root: Path, encoder: str = None, **privacy) -> Tuple[DeviceAgent, list]:
    key_file = tmp_path / "cloud.pub"
    key_file.write_text(CLOUD.public_hex + "\n")
    folder = digits_root / "devices" / "printed"
    cfg = DeviceConfig(
        DEV,
        privacy=PrivacySettings(ledger=str(tmp_path / "ledger.json"), **privacy),
        data=DataSettings(local=str(folder / "local"), labelled=str(folder / "local")),
        models=ModelSettings(store=str(tmp_path / "models"), cloud_public_key=str(key_file), encoder=encoder),
    )
    events: list = []
    agent = DeviceAgent(cfg, on_event=events.append)
    agent.transport = Recorder()
    return agent, events


def query_of(digits_root: Path, query_id: str = "round-1.labels", **kw) -> LabelQuery:
    paths = [it.path for it in scan_image_folder(digits_root / "pool" / "printed")][:40]
    features = thumbnail_query_features(paths)[::4]  # ten groups of the public pool
    return dataclasses.replace(build_label_query(features, THUMB16, LABELS, 2, query_id=query_id), **kw)


def deliver(agent: DeviceAgent, payload: bytes) -> None:
    agent.handle(inbox(DEV), payload)


def test_a_signed_query_is_answered_charged_first_and_a_repeat_is_free(tmp_path, digits_root):
    agent, events = make_agent(tmp_path, digits_root)
    payload = query_of(digits_root, deadline=time.time() + 60).to_bytes(signer=CLOUD)
    deliver(agent, payload)
    (votes,) = agent.transport.replies()
    assert isinstance(votes, LabelVotes) and votes.query_id == "round-1.labels" and votes.device_id == DEV
    assert votes.votes.shape == (10, 10) and math.isclose(votes.sensitivity, math.sqrt(2))
    assert agent.transport.sent[0][0] == outbox(DEV)
    (release,) = agent.ledger.releases()
    assert release["key"].startswith("labels:round-1.labels:")
    assert math.isclose(votes.epsilon, 2.0, rel_tol=1e-3)  # [privacy] epsilon_per_label_query, default 2
    assert math.isclose(agent.ledger.spent()[0], votes.epsilon, rel_tol=1e-9)
    (event,) = events
    assert event.kind == EventKind.LABEL_QUERY_ANSWERED and not event.detail["repeated"]
    assert event.detail["voters"] == 40 and event.detail["queries"] == 10
    deliver(agent, payload)  # QoS 1 or a resend: the same bytes again, nothing charged
    assert agent.transport.sent[1][1] == agent.transport.sent[0][1] and len(agent.ledger.releases()) == 1
    assert events[-1].detail["repeated"] and events[-1].detail["charged_epsilon"] == 0


@pytest.mark.parametrize(
    "forge, code",
    [
        (lambda q: q.to_bytes(), "unsigned"),
        (lambda q: q.to_bytes(signer=FORGER), "unknown_key"),
        (  # the trusted key id on the forger's signature
            lambda q: dataclasses.replace(
                LabelQuery.from_bytes(q.to_bytes(signer=FORGER)), key_id=CLOUD.key_id
            ).to_bytes(),
            "bad_signature",
        ),
        (  # signed by the cloud, then the features changed
            lambda q: dataclasses.replace(
                LabelQuery.from_bytes(q.to_bytes(signer=CLOUD)), features=q.features[::-1].copy()
            ).to_bytes(),
            "bad_signature",
        ),
    ],
)
def test_unsigned_forged_or_tampered_queries_get_no_reply_and_cost_nothing(tmp_path, digits_root, forge, code):
    agent, events = make_agent(tmp_path, digits_root)
    deliver(agent, forge(query_of(digits_root)))
    assert agent.transport.sent == [] and agent.ledger.releases() == []
    assert agent.stats.rejected == 1
    (event,) = events
    assert event.kind == EventKind.LABEL_QUERY_REJECTED and event.detail["code"] == code


def test_accept_unsigned_probes_lets_an_unsigned_query_through(tmp_path, digits_root):
    agent, _ = make_agent(tmp_path, digits_root, accept_unsigned_probes=True)
    deliver(agent, query_of(digits_root).to_bytes())
    assert isinstance(agent.transport.replies()[0], LabelVotes) and len(agent.ledger.releases()) == 1


def test_a_query_for_another_encoder_is_refused_with_mismatch_and_charges_nothing(tmp_path, digits_root, encoder_path):
    agent, events = make_agent(tmp_path, digits_root, encoder=str(encoder_path))
    query = query_of(digits_root)
    other = LabelQuery(query.id, "f" * 64, LABELS, np.ones((3, 16), np.float32), 2)
    deliver(agent, other.to_bytes(signer=CLOUD))
    (refusal,) = agent.transport.replies()
    assert isinstance(refusal, Refusal) and refusal.code == "mismatch" and refusal.probe_id == query.id
    assert agent.ledger.releases() == [] and events[-1].kind == EventKind.LABEL_QUERY_REFUSED
    # the device's own encoder's feature space is answered (its features, 16-d)
    own = LabelQuery("round-2.labels", agent.model("encoder").sha256, LABELS, np.eye(16, dtype=np.float32)[:5], 1)
    deliver(agent, own.to_bytes(signer=CLOUD))
    assert isinstance(agent.transport.replies()[-1], LabelVotes) and len(agent.ledger.releases()) == 1


def test_beyond_the_budget_a_query_is_refused_and_nothing_is_charged(tmp_path, digits_root):
    agent, events = make_agent(tmp_path, digits_root, budget_epsilon=2.5, epsilon_per_label_query=2.0)
    deliver(agent, query_of(digits_root, "round-1.labels").to_bytes(signer=CLOUD))
    deliver(agent, query_of(digits_root, "round-2.labels").to_bytes(signer=CLOUD))  # 2 and 2 compose to 2.9, past 2.5
    first, second = agent.transport.replies()
    assert isinstance(first, LabelVotes)
    assert isinstance(second, Refusal) and second.code == "privacy_budget" and second.probe_id == "round-2.labels"
    assert len(agent.ledger.releases()) == 1 and events[-1].detail["code"] == "privacy_budget"


def test_late_or_unanswerable_queries_are_refused_with_their_code(tmp_path, digits_root):
    agent, _ = make_agent(tmp_path, digits_root)
    deliver(agent, query_of(digits_root, "late.labels", deadline=time.time() - 5).to_bytes(signer=CLOUD))
    odd = dataclasses.replace(query_of(digits_root, "odd.labels"), labels=["cat", "dog"])
    deliver(agent, odd.to_bytes(signer=CLOUD))  # none of the device's labels is among the query's
    assert [r.code for r in agent.transport.replies()] == ["deadline", "mismatch"]
    assert agent.ledger.releases() == []
    # the refusal names no label of the device's: its label names are private data (the local log has them)
    mismatch = agent.transport.replies()[-1].reason
    assert mismatch == "none of this device's labels is among the query's labels"
    assert not any(label in mismatch for label in LABELS)
    plain = dataclasses.replace(agent.config, data=dataclasses.replace(agent.config.data, labelled=None))
    agent.config = plain  # no labelled folder configured
    deliver(agent, query_of(digits_root, "nolabels.labels").to_bytes(signer=CLOUD))
    refusal = agent.transport.replies()[-1]
    assert refusal.code == "input" and "[data] labelled" in refusal.reason and agent.ledger.releases() == []


def test_malformed_and_oversized_queries_are_rejected_and_the_agent_goes_on(tmp_path, digits_root):
    agent, events = make_agent(tmp_path, digits_root)
    good = query_of(digits_root).to_bytes(signer=CLOUD)
    env = decode(good)
    votes = LabelVotes("round-1.labels", DEV, THUMB16, LABELS, np.zeros((2, 10)), NOISE, PRIVACY).to_bytes()
    for payload in [
        good[:-10],  # truncated: the payload checksum fails
        encode(env.type, {**env.fields, "id": "round 1\nforged log line"}, env.arrays),  # not a valid query id
        encode(env.type, {k: v for k, v in env.fields.items() if k != "labels"}, env.arrays),  # a field missing
        good + b"\0" * (MAX_PAYLOAD_BYTES + 1 - len(good)),  # oversized
        votes,  # a device's message on the device's inbox
    ]:
        deliver(agent, payload)
    assert agent.stats.rejected == 5 and agent.transport.sent == [] and agent.ledger.releases() == []
    assert all(e.kind == EventKind.REJECTED for e in events)
    deliver(agent, good)  # the real one afterwards is answered
    assert isinstance(agent.transport.replies()[0], LabelVotes) and len(agent.ledger.releases()) == 1


def test_the_votes_are_charged_to_the_ledger_before_they_are_published(tmp_path, digits_root):
    agent, _ = make_agent(tmp_path, digits_root)
    charged_at_publish = []
    publish = agent.transport.publish

    def checking_publish(topic, payload, qos=1, retain=False):
        charged_at_publish.append([r["payload_sha256"] for r in agent.ledger.releases()])
        publish(topic, payload, qos, retain)

    agent.transport.publish = checking_publish
    deliver(agent, query_of(digits_root).to_bytes(signer=CLOUD))
    ((_, published),) = agent.transport.sent
    assert charged_at_publish == [[hashlib.sha256(published).hexdigest()]]


def test_votes_that_cannot_be_published_cost_nothing_and_the_agent_goes_on(tmp_path, digits_root):
    agent, events = make_agent(tmp_path, digits_root)
    publish = agent.transport.publish

    def broken_publish(topic, payload, qos=1, retain=False):
        raise OSError("the network is down")

    agent.transport.publish = broken_publish
    payload = query_of(digits_root).to_bytes(signer=CLOUD)
    deliver(agent, payload)
    assert agent.ledger.releases() == [] and agent.stats.dropped == 1  # the release was rolled back
    agent.transport.publish = publish
    deliver(agent, payload)  # the resend is answered, charged once
    assert isinstance(agent.transport.replies()[0], LabelVotes) and len(agent.ledger.releases()) == 1


def test_a_query_id_comes_back_with_other_content_is_refused_the_same_content_is_replayed(tmp_path, digits_root):
    agent, events = make_agent(tmp_path, digits_root)
    query = query_of(digits_root, deadline=time.time() + 60)
    deliver(agent, query.to_bytes(signer=CLOUD))
    (first,) = agent.transport.sent
    for other in (
        dataclasses.replace(query, features=query.features[::-1].copy()),
        dataclasses.replace(query, labels=LABELS[::-1]),
        dataclasses.replace(query, votes_per_sample=1),
        dataclasses.replace(query, max_distance=0.5),
    ):
        deliver(agent, other.to_bytes(signer=CLOUD))  # signed by the cloud: only the ledger stops it
        refusal = agent.transport.replies()[-1]
        assert isinstance(refusal, Refusal) and refusal.code == "probe_conflict" and refusal.probe_id == query.id
    assert len(agent.ledger.releases()) == 1
    # the same question signed again with another deadline: the same bytes, for free
    deliver(agent, dataclasses.replace(query, deadline=time.time() + 120).to_bytes(signer=CLOUD))
    assert agent.transport.sent[-1] == first and len(agent.ledger.releases()) == 1
    assert events[-1].kind == EventKind.LABEL_QUERY_ANSWERED and events[-1].detail["repeated"]


def test_an_installed_classifier_is_evaluated_on_the_readable_images_of_the_eval_folder(tmp_path, digits_root, caplog):
    """A damaged file in ``[data] eval`` costs that file, not the whole accuracy report of an install."""
    import shutil

    from device_sdk.delivery.install import InstalledModel
    from device_sdk.predict import Predictor
    from device_sdk.preprocess import Preprocess

    agent, _ = make_agent(tmp_path, digits_root)
    folder = tmp_path / "eval"
    for label in ("3", "7"):
        (folder / label).mkdir(parents=True)
        for src in sorted((digits_root / "devices" / "printed" / "test" / label).glob("*.png"))[:2]:
            shutil.copy(src, folder / label / src.name)
    (folder / "7" / "half.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    agent.config = dataclasses.replace(agent.config, data=dataclasses.replace(agent.config.data, eval=str(folder)))

    class Says7:
        path = "says7.onnx"

        class meta:
            kind, labels = "classifier", LABELS

            @staticmethod
            def preprocessing():
                return Preprocess(size=(32, 32))

        @staticmethod
        def run(images):
            return np.tile(np.eye(10, dtype=np.float32)[7], (len(images), 1))

    agent.predictor = lambda: Predictor(Says7)
    installed = InstalledModel("classifier", "a1", "student", 1, "0" * 64, "onnx", "says7.onnx", "now")
    with caplog.at_level("WARNING"):
        accuracy, judged = agent._evaluate(installed)
    assert (accuracy, judged) == (0.5, 4) and "1 unreadable image(s) skipped" in caplog.text
