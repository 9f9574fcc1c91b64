"""The training stage behind the daemon: registry, options, the cached teacher, the int8 gate policy."""

from __future__ import annotations

import os

import pytest

from cloud.errors import QualityGateError
from cloud.sampling.selection import select, write_selection_csv
from cloud.training.trainers import TrainerContext, get_trainer
from device_sdk.errors import UsageError
from device_sdk.runtime import load_model

TINY = {"teacher": {"width": 4, "epochs": 1}, "student": {"width": 4, "epochs": 1}, "quant": {"calibration_size": 16}}
NEVER = {"min_agreement": 1.01}  # no model can agree with its fp32 twin on more than every image


@pytest.fixture(scope="module")
def selection(pool_index, tmp_path_factory):
    index, _ = pool_index
    path = tmp_path_factory.mktemp("selection") / "selection.csv"
    write_selection_csv(index, select(index, "random", 40, None), str(path))
    return str(path)


@pytest.fixture(scope="module")
def context(pool_index, tmp_path_factory):
    return TrainerContext(str(pool_index[1]), str(tmp_path_factory.mktemp("cache")), threads=1)


def test_distill_ships_a_gated_int8_onnx_classifier_and_caches_the_teacher(context, selection, tmp_path):
    trainer = get_trainer("distill", context, {**TINY, "gate": {"min_agreement": 0.0, "max_accuracy_drop": 1.0}})
    steps = []
    result = trainer.train(
        selection, "dev-1", str(tmp_path / "a"), progress=lambda d, t, note: steps.append((d, t, note))
    )
    model = load_model(result.artifact_path)
    assert (model.meta.kind, model.meta.precision, result.report["precision"]) == ("classifier", "int8", "int8")
    assert result.report["gate"]["onnx"]["passed"] and result.report["proxy_images"] == 40
    assert [s[2] for s in steps] == ["teacher", "distil", "export, int8 and gate"]
    cached = [f for f in os.listdir(context.cache_dir) if f.startswith("teacher-")]
    assert len(cached) == 1
    again = get_trainer("distill", context, TINY).teacher()  # a new daemon process: loaded, not retrained
    assert again.report == trainer.teacher().report


def test_a_failed_gate_ships_fp32_or_fails_as_configured(context, selection, tmp_path):
    fallback = get_trainer("distill", context, {**TINY, "gate": NEVER}).train(selection, "dev-1", str(tmp_path / "b"))
    assert fallback.report["precision"] == "fp32" and "agreement" in fallback.report["gate"]["failed"]
    assert load_model(fallback.artifact_path).meta.precision == "fp32"
    strict = get_trainer("distill", context, {**TINY, "gate": NEVER, "on_gate_failure": "fail"})
    with pytest.raises(QualityGateError, match="not shipped"):
        strict.train(selection, "dev-1", str(tmp_path / "c"))


def test_the_daemon_trainer_honours_the_input_size(context, selection, tmp_path):
    small = get_trainer("distill", context, {**TINY, "gate": {"min_agreement": 0.0, "max_accuracy_drop": 1.0}})
    wide = get_trainer(
        "distill",
        context,
        {**TINY, "gate": {"min_agreement": 0.0, "max_accuracy_drop": 1.0}, "input_size": 48, "channels": 1},
    )
    result = wide.train(selection, "dev-1", str(tmp_path / "w"))
    model = load_model(result.artifact_path)
    assert model.meta.input_shape == (1, 48, 48) and wide.teacher().input_shape[-2:] == (48, 48)
    assert small.teacher().input_shape[-2:] == (32, 32)  # another teacher: its own cache entry
    with pytest.raises(UsageError, match="input_size"):
        get_trainer("distill", context, {**TINY, "input_size": 4})


@pytest.mark.parametrize(
    "name,options,needle",
    [
        ("alchemy", {}, "unknown trainer 'alchemy'"),
        ("distill", {"student": {"epochz": 3}}, "[trainer.options.student]"),
        ("distill", {"precision": "int4"}, "precision must be one of int8, fp32"),
        ("distill", {"on_gate_failure": "shrug"}, "on_gate_failure one of fp32, fail"),
        ("distill", {"colour": "blue"}, "[trainer.options] for 'distill': got an unexpected keyword argument 'colour'"),
    ],
)
def test_bad_trainer_settings_are_usage_errors(context, name, options, needle):
    with pytest.raises(UsageError) as err:
        get_trainer(name, context, options)
    assert needle in str(err.value)
