"""The typed records the daemon's stages hand each other write the JSON the daemon stored before them."""

from __future__ import annotations

import dataclasses

import pytest

from cloud.errors import StoreError
from cloud.serve.config import CloudConfig, RoundConfig
from cloud.serve.round_types import CollectResult, DeliverResult, RoundParams, SampleResult, SignResult, TrainOutcome
from cloud.serve.rounds import round_params
from device_sdk.errors import UsageError


def test_round_params_hold_every_rounds_setting_and_write_the_same_keys_as_before():
    cfg = CloudConfig()
    before = {**dataclasses.asdict(cfg.rounds), "budget": 7, "ask_devices": True}  # what round_params used to return
    params = round_params(cfg, budget=7, codec=None)  # None: not overridden
    assert {f.name for f in dataclasses.fields(RoundConfig)} <= {f.name for f in dataclasses.fields(RoundParams)}
    assert params.to_json() == {**before, "index": ""}
    assert RoundParams.from_json(params.to_json()) == params
    assert round_params(cfg, method="random").ask_devices is False


def test_an_unknown_round_setting_is_a_usage_error():
    with pytest.raises(UsageError, match="budjet"):
        round_params(CloudConfig(), budjet=3)


def test_params_of_a_round_from_an_older_version_read_with_what_it_ran_with():
    old = {
        "method": "ecos",
        "budget": 5,
        "collect_seconds": 10.0,
        "min_responses": 1,
        "codec": "float16",
        "max_distance": None,
        "threshold_sigmas": 2.0,
        "seed": 0,
        "ask_devices": True,
        "index": "p1",
        "some_future_key": 1,
    }
    p = RoundParams.from_json(old)
    assert p.coverage_quantile is None and (p.max_epsilon, p.delta, p.max_samples) == (5.0, 1e-5, 100_000)
    assert RoundParams.from_json({**old, "radius_quantile": 0.9}).coverage_quantile == 0.9
    assert p.use_domains is False  # it ran before ECOS's domain rule; new rounds get [rounds] use_domains (true)
    assert round_params(CloudConfig()).use_domains is True
    assert p.misfit_diversity == 0.0 and round_params(CloudConfig()).misfit_diversity == 0.5  # the same: misfit rule
    damaged = {k: v for k, v in old.items() if k != "budget"}
    with pytest.raises(StoreError, match="budget"):
        RoundParams.from_json(damaged)


def test_stage_results_write_the_keys_the_round_result_always_had():
    assert CollectResult(["a"], {"b": "privacy_budget"}, []).to_json() == {
        "answered": ["a"],
        "refused": {"b": "privacy_budget"},
        "missing": [],
    }
    assert CollectResult([], {}, ["c"], {"c": "noise_too_low"}).to_json()["implausible"] == {"c": "noise_too_low"}
    sampled = SampleResult("/s.csv", 3, {"d": 3}, {"a": 1.0}, 2.5)
    assert sampled.to_json() == {
        "selection": "/s.csv",
        "selected": 3,
        "composition": {"d": 3},
        "epsilon": {"a": 1.0},
        "noise_sigma": 2.5,
    }
    assert SampleResult.from_json({**sampled.to_json(), "timings": {}}) == sampled
    trained = TrainOutcome("/m.onnx", {"precision": "int8"})
    assert trained.to_json() == {"model_path": "/m.onnx", "train_report": {"precision": "int8"}}
    assert TrainOutcome.from_job(trained.job_json()) == trained == TrainOutcome.from_json(trained.to_json())
    assert set(SignResult("x", 1, "ab", 10, 1).to_json()) == {
        "artifact_id",
        "artifact_version",
        "sha256",
        "size",
        "chunks",
    }
    done = DeliverResult({"a": {"state": "installed", "accuracy": 0.9}, "b": {"state": "failed", "code": "timeout"}})
    assert done.installed_anywhere and done.to_json() == {"deliveries": done.deliveries}
    assert not DeliverResult({"b": {"state": "failed"}}).installed_anywhere
