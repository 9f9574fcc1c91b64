"""An automated-client-labelling round in the daemon: the signed label query, the 'voting' state, the votes.

Driven tick by tick with a recording transport (as tests/serve/test_labelling_round.py). The device's
side is the real device code (``answer_label_query`` over a ledger and a labelled folder), its votes
handed to the daemon as the broker would; bad answers are refused with typed errors and the daemon
goes on; a restart while voting sends the same signed query again.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from test_labelling_round import RecordingTransport

from cloud.labelling.labelstudio import read_selection
from cloud.serve.config import BrokerConfig, CloudConfig, MetricsConfig, RoundConfig, StoreConfig, TrainerConfig
from cloud.serve.daemon import build_daemon
from cloud.serve.store import RoundState
from device_sdk.errors import InputError, UsageError
from device_sdk.imagefolder import load_images, scan_image_folder
from device_sdk.labelling import THUMB16, THUMB_SIZE, answer_label_query, thumbnail_features
from device_sdk.privacy.ledger import PrivacyLedger
from device_sdk.protocol import Refusal, inbox, outbox
from device_sdk.protocol.envelope import decode
from device_sdk.protocol.labels import LabelQuery, LabelVotes
from device_sdk.runtime import load_model
from device_sdk.signing import TrustStore

LABELS = [str(i) for i in range(10)]
DEV = "dev-client"
TINY_SEMISUP = {
    "semisup": {"width": 4, "epochs": 1, "min_steps": 2, "max_unlabelled": 20},
    "quant": {"calibration_size": 16},
    "gate": {"min_agreement": 0.0, "max_accuracy_drop": 1.0},
}


def _daemon(tmp_path: Path, pool_index, **rounds):
    _, index_path = pool_index
    settings = {"budget": 40, "method": "random", "label_groups": 8, "votes_per_sample": 1, "min_margin": 0.5}
    cfg = CloudConfig(
        broker=BrokerConfig(),
        store=StoreConfig(state_dir=str(tmp_path / "cloud"), index=str(index_path)),
        rounds=RoundConfig(**{**settings, **rounds}),
        metrics=MetricsConfig(port=0),
        trainer=TrainerConfig(name="semisup", threads=1, cache_dir=str(tmp_path / "cache"), options=TINY_SEMISUP),
    )
    return build_daemon(cfg, transport_factory=RecordingTransport)


def _tick(daemon, round_id, state, seconds=60.0, ticks=None):
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end and (ticks is None or n < ticks):
        daemon.tick()
        n += 1
        r = daemon.store.get_round(round_id)
        if r.state is state or r.state.terminal:
            return r
        time.sleep(0.02)
    return daemon.store.get_round(round_id)


def _sent(daemon, msg_type):
    return [p for topic, p in daemon.transport.published if topic == inbox(DEV) and decode(p).type == msg_type]


def _device_votes(
    digits_root: Path, tmp_path: Path, query: LabelQuery, epsilon: float = 4.0, relabel: Optional[str] = None
) -> bytes:
    """What the device publishes: the real vote over its labelled folder, charged to its ledger (``relabel``: every
    image carries that label instead of its own)."""
    items = [it for it in scan_image_folder(digits_root / "devices" / "printed" / "local") if it.label]
    features = thumbnail_features(load_images([it.path for it in items], THUMB_SIZE))
    ledger = PrivacyLedger.open(tmp_path / "device-ledger.json", device_id=DEV, budget_epsilon=10.0)
    out = []
    labels = [relabel or it.label for it in items]
    rng = np.random.default_rng(0)  # tests only: a device's noise must be unpredictable
    answer_label_query(query, THUMB16, features, labels, ledger, epsilon=epsilon, commit=out.append, rng=rng)
    return out[0]


def test_a_client_round_sends_a_signed_query_waits_across_a_restart_and_trains_on_the_votes(
    tmp_path, pool_index, digits_root
):
    daemon = _daemon(tmp_path, pool_index)
    r = daemon.submit_round([DEV], task="client", labels=LABELS)
    voting = _tick(daemon, r.round_id, RoundState.VOTING)
    assert voting.state is RoundState.VOTING, voting.error
    _tick(daemon, r.round_id, RoundState.TRAINING, seconds=0.5)  # the voting stage sends the query
    (payload,) = _sent(daemon, "label_query")
    query = LabelQuery.from_bytes(payload)
    assert query.id == f"{r.round_id}.labels" and query.feature_space == THUMB16 and query.labels == LABELS
    assert query.n_queries == 8 and query.votes_per_sample == 1 and query.deadline == pytest.approx(voting.deadline)
    TrustStore([daemon.keyring.current.public]).verify(query.signed_bytes(), query.key_id, query.signature)
    info = voting.result["client_labelling"]
    assert Path(info["query"]).read_bytes() == payload and info["query_bytes"] == len(payload)

    # a restart while voting: the new daemon sends the same signed bytes again (the device answers a repeat for free)
    daemon = _daemon(tmp_path, pool_index)
    assert _tick(daemon, r.round_id, RoundState.TRAINING, seconds=0.5).state is RoundState.VOTING
    assert _sent(daemon, "label_query") == [payload]

    # bad answers: refused with a typed reason, nothing recorded, the daemon goes on
    honest = _device_votes(digits_root, tmp_path, query)
    votes = LabelVotes.from_bytes(honest)
    forged = {
        "malformed": honest[:-7],
        "implausible_votes": LabelVotes(  # far too little noise for the round's max_epsilon
            votes.query_id, DEV, THUMB16, LABELS, votes.votes, {**votes.noise, "sigma": 0.01}, votes.privacy
        ).to_bytes(),
        "mismatch": LabelVotes(
            votes.query_id, DEV, THUMB16, LABELS, np.zeros((3, 10)), votes.noise, votes.privacy
        ).to_bytes(),
        "message": LabelVotes(  # the votes of a query nobody asked
            "other-round.labels", DEV, THUMB16, LABELS, votes.votes, votes.noise, votes.privacy
        ).to_bytes(),
    }
    for reason, bad in forged.items():
        daemon.handle_message(outbox(DEV), bad)
        assert daemon.metrics.dropped.value(reason=reason) == 1, reason
    assert daemon.store.responses(query.id) == []
    assert _tick(daemon, r.round_id, RoundState.TRAINING, seconds=0.3).state is RoundState.VOTING

    # the honest answer: stored once (a duplicate counts once), then the round trains on the confident labels
    daemon.handle_message(outbox(DEV), honest)
    daemon.handle_message(outbox(DEV), honest)
    assert len(daemon.store.responses(query.id)) == 1
    trained = _tick(daemon, r.round_id, RoundState.TRAINING)
    assert trained.state is RoundState.TRAINING, trained.error
    summary = trained.result["client_labelling"]
    assert summary["answered"] == [DEV] and summary["refused"] == {} and summary["missing"] == []
    assert summary["epsilon"] == {DEV: pytest.approx(4.0, rel=1e-3)}
    assert summary["epsilon_with_probe"] == {DEV: pytest.approx(4.0, rel=1e-3)}  # a random round asks no probe
    assert summary["label_bytes_down"] == 2 * len(payload)  # sent twice: before and after the restart
    # every decoded answer for the round counts (the refused ones too: the link carried them); undecodable ones cannot
    assert summary["label_bytes_up"] == 2 * len(honest) + len(forged["implausible_votes"]) + len(forged["mismatch"])
    assert summary["traffic"]["down"] == {"label_query": 2 * len(payload)}
    rows = read_selection(trained.result["selection"])
    labelled = [row for row in rows if row.label]
    assert trained.result["selection"] == summary["labelled"] and len(rows) == 40
    assert summary["images_labelled"] == len(labelled) >= 1 and summary["groups_labelled"] >= 1
    assert all(row.label in LABELS for row in labelled)


def test_votes_confident_about_one_label_train_a_student_over_the_rounds_labels(tmp_path, pool_index, digits_root):
    """The round's label list goes to the trainer: votes confident about one label only (every device image says
    "3") train a student over the round's ten labels, with no [trainer.options] labels in the daemon config
    (before, the trainer took its classes from the labelled selection and failed with one class)."""
    daemon = _daemon(tmp_path, pool_index, min_margin=2.5)  # no noise-only group passes
    assert "labels" not in daemon.cfg.trainer.options
    r = daemon.submit_round([DEV], task="client", labels=LABELS)
    assert _tick(daemon, r.round_id, RoundState.VOTING).state is RoundState.VOTING
    daemon.tick()
    query = LabelQuery.from_bytes(_sent(daemon, "label_query")[0])
    daemon.handle_message(outbox(DEV), _device_votes(digits_root, tmp_path, query, relabel="3"))
    trained = _tick(daemon, r.round_id, RoundState.SIGNING, seconds=300)
    assert trained.state in (RoundState.SIGNING, RoundState.DELIVERING), trained.error
    assert {row.label for row in read_selection(trained.result["selection"]) if row.label} == {"3"}
    assert load_model(trained.result["model_path"]).meta.labels == LABELS


def test_a_round_nobody_votes_in_fails_at_its_deadline_with_the_refusals(tmp_path, pool_index):
    daemon = _daemon(tmp_path, pool_index, label_seconds=0.5)
    r = daemon.submit_round([DEV], task="client", labels=LABELS)
    assert _tick(daemon, r.round_id, RoundState.VOTING).state is RoundState.VOTING
    daemon.tick()
    query = LabelQuery.from_bytes(_sent(daemon, "label_query")[0])
    refusal = Refusal(query.id, DEV, "privacy_budget", "over budget").to_bytes()
    daemon.handle_message(outbox(DEV), refusal)
    failed = _tick(daemon, r.round_id, RoundState.TRAINING, seconds=5.0)
    assert failed.state is RoundState.FAILED and "no device sent label votes" in failed.error
    assert failed.result["client_labelling"]["refused"] == {DEV: "privacy_budget"}
    assert failed.result["client_labelling"]["label_bytes_up"] == len(refusal)
    # a late answer is counted, not stored, and harms nothing
    daemon.handle_message(outbox(DEV), refusal)
    assert daemon.metrics.responses.value(kind="label_refusal", outcome="late") == 1


def test_votes_that_label_no_group_with_confidence_fail_the_round_with_the_reason(tmp_path, pool_index, digits_root):
    daemon = _daemon(tmp_path, pool_index, min_margin=1e6)
    r = daemon.submit_round([DEV], task="client", labels=LABELS)
    assert _tick(daemon, r.round_id, RoundState.VOTING).state is RoundState.VOTING
    daemon.tick()
    query = LabelQuery.from_bytes(_sent(daemon, "label_query")[0])
    daemon.handle_message(outbox(DEV), _device_votes(digits_root, tmp_path, query))
    failed = _tick(daemon, r.round_id, RoundState.TRAINING, seconds=5.0)
    assert failed.state is RoundState.FAILED and "labelled with confidence" in failed.error
    assert failed.result["client_labelling"]["groups_labelled"] == 0
    assert failed.result["client_labelling"]["answered"] == [DEV]


def test_a_client_round_needs_labels_semisup_and_room_for_its_query_id(tmp_path, pool_index):
    import dataclasses

    from cloud.serve.rounds import create_round

    daemon = _daemon(tmp_path, pool_index)
    with pytest.raises(UsageError, match="two label names, all different"):
        daemon.submit_round([DEV], task="client", labels=["a"])
    distill = dataclasses.replace(daemon.cfg, trainer=dataclasses.replace(daemon.cfg.trainer, name="distill"))
    with pytest.raises(UsageError, match='name = "semisup"'):
        create_round(daemon.store, distill, daemon.index, [DEV], task="client", labels=LABELS)
    with pytest.raises(InputError, match="too long"):
        create_round(daemon.store, daemon.cfg, daemon.index, [DEV], round_id="r" * 125, task="client", labels=LABELS)
    with pytest.raises(UsageError, match="two label names, all different"):
        daemon.submit_round([DEV], task="client", labels=["a", "a"])
    r = daemon.submit_round([DEV], labels=None)  # a compression round: no task, no labels, as before
    assert "task" not in r.params and "labels" not in r.params and r.params["label_groups"] == 8
    assert math.isclose(daemon.store.get_round(r.round_id).params["budget"], 40)


def test_the_query_is_resent_by_timer_and_on_reconnect_but_never_to_an_offline_device(tmp_path, pool_index):
    from device_sdk.protocol import Status, device_status

    daemon = _daemon(tmp_path, pool_index, probe_resend_seconds=0.2)
    r = daemon.submit_round([DEV], task="client", labels=LABELS)
    assert _tick(daemon, r.round_id, RoundState.VOTING).state is RoundState.VOTING
    _tick(daemon, r.round_id, RoundState.TRAINING, seconds=0.7)
    sent = _sent(daemon, "label_query")
    assert len(sent) >= 3 and len(set(sent)) == 1  # the same signed bytes each time
    assert daemon.metrics.probes_resent.value(reason="timer") == len(sent) - 1
    daemon.handle_message(device_status(DEV), Status(DEV, "offline").to_bytes())
    before = len(_sent(daemon, "label_query"))
    _tick(daemon, r.round_id, RoundState.TRAINING, seconds=0.7)
    assert len(_sent(daemon, "label_query")) == before  # the broker holds one for it: not piled up
    time.sleep(1.1)  # past RECONNECT_RESEND_SECONDS
    daemon.handle_message(device_status(DEV), Status(DEV, "online").to_bytes())
    assert len(_sent(daemon, "label_query")) == before + 1  # at once, not at the next timer
    assert daemon.metrics.probes_resent.value(reason="reconnect") == 1
    assert _sent(daemon, "label_query")[-1] == sent[0]


def test_a_daemon_restarted_past_the_deadline_does_not_send_the_query_again(tmp_path, pool_index):
    daemon = _daemon(tmp_path, pool_index, label_seconds=0.5)
    r = daemon.submit_round([DEV], task="client", labels=LABELS)
    voting = _tick(daemon, r.round_id, RoundState.VOTING)
    assert voting.state is RoundState.VOTING and _sent(daemon, "label_query") == []  # stopped before it was sent
    time.sleep(max(0.0, voting.deadline - time.time()) + 0.1)
    daemon = _daemon(tmp_path, pool_index, label_seconds=0.5)  # the restart, past the deadline
    failed = _tick(daemon, r.round_id, RoundState.TRAINING, seconds=5.0)
    assert _sent(daemon, "label_query") == []  # the device would only refuse it (deadline)
    assert failed.state is RoundState.FAILED and failed.result["client_labelling"]["missing"] == [DEV]
    assert daemon._label_queries == {}  # nothing left in memory for a round that no longer votes


def test_a_deleted_query_file_fails_its_round_and_leaves_status_handling_alone(tmp_path, pool_index):
    from device_sdk.protocol import Status, device_status

    daemon = _daemon(tmp_path, pool_index, collect_seconds=60.0)
    r = daemon.submit_round([DEV], task="client", labels=LABELS)
    assert _tick(daemon, r.round_id, RoundState.VOTING).state is RoundState.VOTING
    other = daemon.submit_round([DEV], method="ecos")  # a compression round waiting for the same device's scores
    assert _tick(daemon, other.round_id, RoundState.COLLECTING).state is RoundState.COLLECTING
    daemon.tick()  # the probe goes out
    probes = len(_sent(daemon, "probe"))
    assert probes == 1
    Path(daemon.store.get_round(r.round_id).result["client_labelling"]["query"]).unlink()
    daemon.handle_message(device_status(DEV), Status(DEV, "offline").to_bytes())
    time.sleep(1.1)  # past RECONNECT_RESEND_SECONDS
    daemon.handle_message(device_status(DEV), Status(DEV, "online").to_bytes())  # the query cannot be read
    assert len(_sent(daemon, "probe")) == probes + 1  # the other round's probe still went out at once
    daemon._label_queries.clear()  # as after a restart: the stage must read the file again
    daemon._probed.discard(r.round_id + ".labels")
    failed = _tick(daemon, r.round_id, RoundState.FAILED, seconds=10)
    assert failed.state is RoundState.FAILED and "internal error" in failed.error
