"""A selective-manual-labelling round in the daemon: it waits in 'labelling', survives a restart, then trains.

Driven tick by tick with a recording transport (as tests/serve/test_daemon_rounds.py); the labels are
imported with the real ``ecos-cloud round-labels`` code path, from the simulated labeller's Label
Studio export.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import pytest

from cloud.labelling.cli import cmd_round_labels
from cloud.labelling.labelstudio import LabelState
from cloud.labelling.simulate import simulate_labels, write_labelstudio_export
from cloud.serve.config import BrokerConfig, CloudConfig, MetricsConfig, RoundConfig, StoreConfig, TrainerConfig
from cloud.serve.daemon import build_daemon
from cloud.serve.rounds import create_round
from cloud.serve.store import RoundState
from device_sdk.errors import InputError, UsageError


class RecordingTransport:
    """Stands in for MqttTransport (a random-method round publishes nothing until delivery)."""

    def __init__(self, client_id: str, host: str, port: int, **options):
        self.published = []

    def start(self) -> "RecordingTransport":
        return self

    def stop(self) -> None:
        pass

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.published.append((topic, payload))


LABELS = [str(i) for i in range(10)]
TINY_SEMISUP = {
    "semisup": {"width": 4, "epochs": 1, "min_steps": 2, "max_unlabelled": 20},
    "quant": {"calibration_size": 16},
    "gate": {"min_agreement": 0.0, "max_accuracy_drop": 1.0},
}


def _daemon(tmp_path, pool_index):
    _, index_path = pool_index
    cfg = CloudConfig(
        broker=BrokerConfig(),
        store=StoreConfig(state_dir=str(tmp_path / "cloud"), index=str(index_path)),
        rounds=RoundConfig(budget=30, collect_seconds=30.0, method="random"),
        metrics=MetricsConfig(port=0),
        trainer=TrainerConfig(name="semisup", threads=1, cache_dir=str(tmp_path / "cache"), options=TINY_SEMISUP),
    )
    return cfg, build_daemon(cfg, transport_factory=RecordingTransport)


def _tick(daemon, round_id, state, seconds=120.0, ticks=None):
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end and (ticks is None or n < ticks):
        daemon.tick()
        n += 1
        r = daemon.store.get_round(round_id)
        if r.state is state or r.state.terminal:
            return r
        time.sleep(0.02)
    return daemon.store.get_round(round_id)


def test_manual_round_waits_for_labels_across_a_restart_then_trains(tmp_path, pool_index):
    index, _ = pool_index
    cfg, daemon = _daemon(tmp_path, pool_index)
    r = daemon.submit_round(["dev1"], task="manual", labels=LABELS)
    waiting = _tick(daemon, r.round_id, RoundState.LABELLING)
    assert waiting.state is RoundState.LABELLING, waiting.error
    lab = waiting.result["labelling"]
    state = LabelState.load(lab["state"])
    assert len(state.rows()) == 30
    # a restart: a new daemon over the same state directory keeps waiting
    _, daemon = _daemon(tmp_path, pool_index)
    assert _tick(daemon, r.round_id, RoundState.TRAINING, seconds=1.0, ticks=20).state is RoundState.LABELLING
    # the labellers answer half, then the rest: the round moves on only when every image is labelled
    truth = {str(p): str(v) for p, v in zip(index.paths, index.labels)}
    paths = [row.path for row in state.rows()]
    half = simulate_labels(paths, truth, LABELS, fraction=0.5, seed=1)
    write_labelstudio_export(half, state, str(tmp_path / "half.json"))
    args = argparse.Namespace(config=None, round_id=r.round_id, files=[str(tmp_path / "half.json")], partial=False)
    config_file = tmp_path / "cloud.toml"
    config_file.write_text(f'[store]\nstate_dir = "{cfg.store.state_dir}"\n')
    args.config = str(config_file)
    with pytest.raises(InputError, match="have no label yet"):
        cmd_round_labels(args)
    assert _tick(daemon, r.round_id, RoundState.TRAINING, seconds=1.0, ticks=20).state is RoundState.LABELLING
    write_labelstudio_export(simulate_labels(paths, truth, LABELS, seed=2), state, str(tmp_path / "all.json"))
    args.files = [str(tmp_path / "all.json")]
    assert cmd_round_labels(args) == 0
    trained = _tick(daemon, r.round_id, RoundState.SIGNING, seconds=300)
    assert trained.state in (RoundState.SIGNING, RoundState.DELIVERING), trained.error
    assert trained.result["selection"] == lab["labelled"]
    with pytest.raises(UsageError, match="not waiting for labels"):
        cmd_round_labels(args)


def test_manual_round_needs_label_names(tmp_path, pool_index):
    _, daemon = _daemon(tmp_path, pool_index)
    with pytest.raises(UsageError, match="two label names"):
        daemon.submit_round(["dev1"], task="manual")
    with pytest.raises(UsageError, match="unknown round task"):
        daemon.submit_round(["dev1"], task="other")


def test_manual_round_needs_the_semisup_trainer(tmp_path, pool_index):
    cfg, daemon = _daemon(tmp_path, pool_index)
    distill = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, name="distill"))
    with pytest.raises(UsageError, match='name = "semisup"'):
        create_round(daemon.store, distill, daemon.index, ["dev1"], task="manual", labels=LABELS)


def test_labels_of_one_class_train_a_student_over_the_rounds_labels(tmp_path, pool_index):
    """The round's label list goes to the trainer: labellers who answer with one label only still get a student over
    the round's ten labels, with no [trainer.options] labels (before, the trainer took its classes from the labelled
    selection and failed with one class)."""
    from cloud.labelling.labelstudio import read_selection
    from device_sdk.runtime import load_model

    cfg, daemon = _daemon(tmp_path, pool_index)
    assert "labels" not in cfg.trainer.options
    r = daemon.submit_round(["dev1"], task="manual", labels=LABELS)
    lab = _tick(daemon, r.round_id, RoundState.LABELLING).result["labelling"]
    state = LabelState.load(lab["state"])
    write_labelstudio_export({row.path: "3" for row in state.rows()}, state, str(tmp_path / "all.json"))
    config_file = tmp_path / "cloud.toml"
    config_file.write_text(f'[store]\nstate_dir = "{cfg.store.state_dir}"\n')
    args = argparse.Namespace(
        config=str(config_file), round_id=r.round_id, files=[str(tmp_path / "all.json")], partial=False
    )
    assert cmd_round_labels(args) == 0
    trained = _tick(daemon, r.round_id, RoundState.SIGNING, seconds=300)
    assert trained.state in (RoundState.SIGNING, RoundState.DELIVERING), trained.error
    assert {row.label for row in read_selection(trained.result["selection"])} == {"3"}
    assert load_model(trained.result["model_path"]).meta.labels == LABELS
