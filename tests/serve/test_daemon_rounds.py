"""The daemon's round logic, driven tick by tick with a recording transport instead of a broker.

Everything else is real (store, index, sampling, training, signing, manifests); the transport
only records what the daemon publishes, and the tests play the devices by handing the daemon
the messages a device would send. The broker-backed end-to-end runs are in
tests/integration/test_daemon.py.
"""

from __future__ import annotations

import dataclasses
import time
from typing import List, Tuple

import numpy as np
import pytest

from cloud.errors import BudgetError
from cloud.serve.config import BrokerConfig, CloudConfig, MetricsConfig, RoundConfig, StoreConfig, TrainerConfig
from cloud.serve.daemon import Daemon, build_daemon, create_round
from cloud.serve.store import RoundState
from device_sdk.errors import UsageError
from device_sdk.protocol import Ack, ArtifactChunk, ArtifactManifest, Installed, Refusal, inbox, outbox
from device_sdk.protocol.envelope import decode
from device_sdk.protocol.round import Probe, Scores

TINY_TRAINER = {
    "teacher": {"width": 4, "epochs": 1},
    "student": {"width": 4, "epochs": 1},
    "quant": {"calibration_size": 16},
    "gate": {"min_agreement": 0.0, "max_accuracy_drop": 1.0},
}


class RecordingTransport:
    """Stands in for MqttTransport: remembers every publish, connects nowhere."""

    def __init__(self, client_id: str, host: str, port: int, **options):
        self.published: List[Tuple[str, bytes]] = []

    def start(self) -> "RecordingTransport":
        return self

    def stop(self) -> None:
        pass

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.published.append((topic, payload))

    def of_type(self, msg_type: str, topic: str = "") -> List[bytes]:
        return [p for t, p in self.published if decode(p).type == msg_type and (not topic or t == topic)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("trainer-cache")


def make_daemon(tmp_path, pool_index, cache, **rounds):
    _, index_path = pool_index
    cfg = CloudConfig(
        broker=BrokerConfig(),
        store=StoreConfig(state_dir=str(tmp_path / "cloud"), index=str(index_path)),
        rounds=RoundConfig(**{"budget": 40, "collect_seconds": 30.0, **rounds}),
        metrics=MetricsConfig(port=0),
        trainer=TrainerConfig(threads=1, cache_dir=str(cache), options=TINY_TRAINER),
    )
    return build_daemon(cfg, transport_factory=RecordingTransport)


def tick_until(daemon, round_id: str, state: RoundState, timeout: float = 60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        daemon.tick()
        r = daemon.store.get_round(round_id)
        if r.state is state or r.state.terminal:
            return r
        time.sleep(0.02)
    return daemon.store.get_round(round_id)


def scores_of(daemon, round_id: str, device: str, value: float = 5.0, encoder: str = "") -> bytes:
    index = daemon.index
    return Scores(round_id, device, encoder or index.encoder_sha256, np.full(index.k, value), 1.0).to_bytes()


def test_a_round_without_answers_fails_at_its_deadline(tmp_path, pool_index, cache):
    daemon = make_daemon(tmp_path, pool_index, cache, collect_seconds=0.3)
    r = daemon.submit_round(["quiet"])
    assert tick_until(daemon, r.round_id, RoundState.COLLECTING).state is RoundState.COLLECTING
    daemon.tick()
    (probe,) = daemon.transport.of_type("probe", inbox("quiet"))
    assert Probe.from_bytes(probe).probe_id == r.round_id and Probe.from_bytes(probe).deadline == pytest.approx(
        daemon.store.get_round(r.round_id).deadline
    )
    failed = tick_until(daemon, r.round_id, RoundState.FAILED, timeout=5)
    assert failed.state is RoundState.FAILED and "0 of 1 devices sent scores" in failed.error
    assert failed.result["missing"] == ["quiet"]


def test_a_refusal_is_an_answer_and_a_round_of_refusals_fails_with_the_reason(tmp_path, pool_index, cache):
    daemon = make_daemon(tmp_path, pool_index, cache)
    r = daemon.submit_round(["broke"])
    tick_until(daemon, r.round_id, RoundState.COLLECTING)
    daemon.handle_message(outbox("broke"), Refusal(r.round_id, "broke", "privacy_budget", "budget spent").to_bytes())
    failed = tick_until(daemon, r.round_id, RoundState.FAILED, timeout=5)
    assert failed.state is RoundState.FAILED and failed.result["refused"] == {"broke": "privacy_budget"}
    assert "privacy_budget" in failed.error


def test_duplicate_late_and_foreign_encoder_answers(tmp_path, pool_index, cache):
    daemon = make_daemon(tmp_path, pool_index, cache)
    r = daemon.submit_round(["a", "b"], fleet=True)
    tick_until(daemon, r.round_id, RoundState.COLLECTING)
    daemon.handle_message(outbox("b"), scores_of(daemon, r.round_id, "b", encoder="f" * 64))  # wrong encoder: dropped
    payload = scores_of(daemon, r.round_id, "a")
    daemon.handle_message(outbox("a"), payload)
    daemon.handle_message(outbox("a"), payload)  # a replay of the same answer
    assert [x.device_id for x in daemon.store.responses(r.round_id)] == ["a"]
    daemon.handle_message(outbox("b"), scores_of(daemon, r.round_id, "b"))
    assert tick_until(daemon, r.round_id, RoundState.TRAINING).state is RoundState.TRAINING
    daemon.handle_message(outbox("b"), scores_of(daemon, r.round_id, "b", value=99.0))  # after the selection
    text = daemon.metrics.render()
    assert 'ecos_responses_total{kind="scores",outcome="new"} 2' in text
    assert 'ecos_responses_total{kind="scores",outcome="duplicate"} 1' in text
    assert 'ecos_responses_total{kind="scores",outcome="late"} 1' in text
    assert 'ecos_errors_total{reason="message"} 1' in text
    assert daemon.store.get_round(r.round_id).result["answered"] == ["a", "b"]
    tick_until(daemon, r.round_id, RoundState.DELIVERING)  # let the training thread finish before the test ends


def test_baselines_that_need_no_scores_do_not_ask_the_devices(tmp_path, pool_index, cache):
    daemon = make_daemon(tmp_path, pool_index, cache, method="random")
    r = daemon.submit_round(["untouched"])
    reached = tick_until(daemon, r.round_id, RoundState.TRAINING)
    assert reached.state is RoundState.TRAINING and reached.result["epsilon"] == {}
    assert daemon.transport.published == []  # not even a probe
    tick_until(daemon, r.round_id, RoundState.DELIVERING)


def test_a_delivery_resumes_from_the_acknowledged_chunk_after_a_restart(tmp_path, pool_index, cache):
    daemon = make_daemon(tmp_path, pool_index, cache)
    r = daemon.submit_round(["dev"])
    tick_until(daemon, r.round_id, RoundState.COLLECTING)
    daemon.handle_message(outbox("dev"), scores_of(daemon, r.round_id, "dev"))
    assert tick_until(daemon, r.round_id, RoundState.DELIVERING).state is RoundState.DELIVERING, daemon.store.get_round(
        r.round_id
    ).error
    daemon.tick()
    (manifest_bytes,) = daemon.transport.of_type("artifact_manifest", inbox("dev"))
    manifest = ArtifactManifest.from_bytes(manifest_bytes)
    daemon.handle_message(outbox("dev"), Ack("dev", manifest.artifact_id, 1).to_bytes())
    assert daemon.store.get_delivery(manifest.artifact_id, "dev").next_chunk == 1

    restarted = make_daemon(tmp_path, pool_index, cache)  # same state folder: as after kill -9
    restarted.tick()
    assert restarted.transport.of_type("artifact_manifest") == [manifest_bytes]  # same signed manifest, same id
    sent = [ArtifactChunk.from_bytes(p).index for p in restarted.transport.of_type("artifact_chunk")]
    assert sent == list(range(1, min(1 + restarted.cfg.delivery.window, manifest.n_chunks)))
    restarted.handle_message(
        outbox("dev"), Installed("dev", manifest.artifact_id, manifest.version, manifest.sha256, 0.5, 10).to_bytes()
    )
    done = tick_until(restarted, r.round_id, RoundState.DONE)
    assert done.state is RoundState.DONE and done.result["deliveries"]["dev"] == {
        "state": "installed",
        "accuracy": 0.5,
        "n_eval": 10,
        "version": manifest.version,
    }
    assert restarted.store.get_device("dev").model["sha256"] == manifest.sha256


def test_a_round_fails_if_the_daemon_restarts_with_another_pool_index(tmp_path, pool_index, cache):
    daemon = make_daemon(tmp_path, pool_index, cache)
    r = daemon.submit_round(["dev"])
    other = Daemon(
        daemon.cfg,
        daemon.store,
        dataclasses.replace(daemon.index, probe_id="another-index"),
        daemon.trainer,
        RecordingTransport,
    )
    other.tick()
    failed = other.store.get_round(r.round_id)
    assert (
        failed.state is RoundState.FAILED and "pool index changed" in failed.error and other.transport.published == []
    )


def test_create_round_checks_its_arguments(tmp_path, pool_index, cache):
    daemon = make_daemon(tmp_path, pool_index, cache)
    index, _ = pool_index
    with pytest.raises(BudgetError, match="does not fit"):
        create_round(daemon.store, daemon.cfg, index, ["a"], budget=len(index.paths) + 1)
    with pytest.raises(UsageError, match="exactly one device"):
        create_round(daemon.store, daemon.cfg, index, ["a", "b"])
    with pytest.raises(UsageError, match="device id"):
        create_round(daemon.store, daemon.cfg, index, ["../etc"], fleet=True)
    with pytest.raises(UsageError, match="unknown sampler"):
        create_round(daemon.store, daemon.cfg, index, ["a"], method="oracle")
    assert daemon.store.list_rounds() == []
    r = create_round(daemon.store, daemon.cfg, index, ["a", "b"], fleet=True, min_responses=5, budget=7)
    assert (r.params["min_responses"], r.params["budget"], r.params["ask_devices"]) == (2, 7, True)


@pytest.mark.parametrize("use_domains, misfit", [(True, 0.5), (False, 0.0)])
def test_the_round_selects_with_its_domain_settings(tmp_path, pool_index, cache, monkeypatch, use_domains, misfit):
    import cloud.serve.rounds as rounds

    seen = []

    def recording_select(*args, **kwargs):
        seen.append((kwargs["use_domains"], kwargs["misfit_diversity"]))
        return select(*args, **kwargs)

    select = rounds.select
    monkeypatch.setattr(rounds, "select", recording_select)
    daemon = make_daemon(tmp_path, pool_index, cache, use_domains=use_domains, misfit_diversity=misfit)
    r = daemon.submit_round(["a"])
    tick_until(daemon, r.round_id, RoundState.COLLECTING)
    daemon.handle_message(outbox("a"), scores_of(daemon, r.round_id, "a"))
    assert tick_until(daemon, r.round_id, RoundState.TRAINING).state is RoundState.TRAINING
    params = daemon.store.get_round(r.round_id).params
    assert seen == [(use_domains, misfit)] and params["use_domains"] is use_domains
    assert params["misfit_diversity"] == misfit
    tick_until(daemon, r.round_id, RoundState.DELIVERING)
