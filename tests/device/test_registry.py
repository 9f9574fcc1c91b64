"""The one registry helper (device_sdk/registry.py) and the registries built on it."""

from __future__ import annotations

import numpy as np
import pytest

from device_sdk.errors import UsageError
from device_sdk.registry import Registry


class _Named:
    def __init__(self, name):
        self.name = name


def test_register_as_decorator_by_attribute_by_name_and_by_call():
    reg: Registry[object] = Registry("widget")

    @reg.register
    class Alpha:
        name = "alpha"

    @reg.register("beta")
    def beta():
        return "b"

    gamma = _Named("gamma")
    assert reg.register("gamma", gamma) is gamma
    delta = _Named("delta")
    assert reg.register(delta) is delta
    # decorators hand the object back unchanged, so decorated classes and functions stay usable
    assert Alpha.name == "alpha" and beta() == "b"
    assert reg.get("alpha") is Alpha and reg.get("beta") is beta and reg.get("gamma") is gamma
    assert reg.names() == ["alpha", "beta", "delta", "gamma"]  # sorted
    assert "beta" in reg and "nope" not in reg and ["unhashable"] not in reg and len(reg) == 4
    assert list(reg) == reg.names() and reg.items()[0] == ("alpha", Alpha)


def test_unknown_name_is_a_usage_error_listing_the_choices():
    reg: Registry[int] = Registry("colour")
    reg.register("red", 1)
    reg.register("blue", 2)
    with pytest.raises(UsageError) as err:
        reg.get("green")
    assert str(err.value) == "unknown colour 'green'; choose one of: blue, red"
    assert err.value.exit_code == 2
    with pytest.raises(UsageError, match="unknown colour"):
        reg.get(["not", "hashable"])  # a list from a config file is refused the same way, not a TypeError


def test_duplicates_and_missing_names_are_refused():
    reg: Registry[object] = Registry("widget")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="'a' is registered twice"):
        reg.register("a", 2)
    assert reg.get("a") == 1  # the first registration is kept
    with pytest.raises(ValueError, match="needs a non-empty string name"):
        reg.register(_Named(""))
    with pytest.raises(ValueError, match="needs a non-empty string name"):
        reg.register(object())  # no name attribute
    with pytest.raises(TypeError, match="name first"):
        reg.register(_Named("x"), 3)
    with pytest.raises(ValueError, match="kind"):
        Registry("")


def test_ordered_registry_keeps_registration_order_and_lists_extra_choices():
    reg: Registry[int] = Registry("runtime", ordered=True, also=("auto",))
    for i, name in enumerate(["zeta", "alpha", "mid"]):
        reg.register(name, i)
    assert reg.names() == ["zeta", "alpha", "mid"]
    assert reg.choices() == ["auto", "zeta", "alpha", "mid"]
    with pytest.raises(UsageError, match="choose one of: auto, zeta, alpha, mid$"):
        reg.get("nope")
    with pytest.raises(UsageError):
        reg.get("auto")  # listed for the caller to handle, never resolved by the registry
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("auto", 9)


# ---- the project's registries keep their public functions and messages -----------------------------


def test_samplers():
    from cloud.sampling import get_sampler, list_samplers
    from cloud.sampling.base import SAMPLERS

    assert list_samplers() == SAMPLERS.names() and {"ecos", "kcenter", "random"} <= set(list_samplers())
    with pytest.raises(UsageError, match=r"^unknown sampler 'nope'; choose one of: .*ecos"):
        get_sampler("nope")
    with pytest.raises(UsageError, match="does not take this configuration"):
        get_sampler("random", colour="blue")


def test_trainers():
    from cloud.training.trainers import TRAINERS, DistillTrainer, get_trainer

    assert TRAINERS.get("distill") is DistillTrainer
    with pytest.raises(UsageError, match=r"^unknown trainer 'alchemy'; choose one of: distill"):
        get_trainer("alchemy", context=None)


def test_models():
    import models  # noqa: F401  (registers the builders)
    from models.registry import get_model, list_models, model_info

    encoders = list_models("encoder")
    assert encoders and all(model_info(n).kind == "encoder" for n in encoders)
    assert set(list_models()) >= set(encoders) | set(list_models("student"))
    assert list_models("no-such-kind") == []
    with pytest.raises(UsageError, match=r"^unknown model 'nope'; choose one of: "):
        get_model("nope")


def test_accountants():
    from device_sdk.privacy.accounting import ACCOUNTANTS, epsilon

    assert ACCOUNTANTS == ("gaussian", "rdp")
    one = [(2.0, 1.0)]
    assert epsilon(one, 1e-5, "rdp") > epsilon(one, 1e-5, "gaussian") > 0  # two different functions
    with pytest.raises(UsageError, match=r"^unknown privacy accountant 'moments'; choose one of: gaussian, rdp$"):
        epsilon(one, 1e-5, "moments")


def test_runtimes():
    from device_sdk.runtime import RUNTIMES, resolve_runtime
    from device_sdk.runtime.base import RUNTIME_REGISTRY

    assert RUNTIMES == ("auto", "onnxruntime", "litert", "tflite-runtime")  # registration order: auto's preference
    assert [RUNTIME_REGISTRY.get(n).format for n in RUNTIMES[1:]] == ["onnx", "tflite", "tflite"]
    with pytest.raises(UsageError, match=r"^unknown runtime 'tensorrt'; choose one of: auto, onnxruntime"):
        resolve_runtime("model.onnx", "tensorrt")  # refused before the file is read


def test_a_registered_runtime_is_loaded_by_name(tmp_path):
    from device_sdk.runtime import Model, RuntimeSpec, load_model, register_runtime
    from device_sdk.runtime.artifact import ArtifactMeta
    from device_sdk.runtime.base import RUNTIME_REGISTRY

    class Echo(Model):
        runtime = "echo"

        def _infer(self, x):
            return x.reshape(len(x), -1)[:, :2]

    meta = ArtifactMeta.from_json(
        '{"kind": "encoder", "arch": "t", "input_shape": [3, 2, 2], "mean": [0, 0, 0], "std": [1, 1, 1], '
        '"output_dim": 2}'
    )
    spec = RuntimeSpec("echo-test", "onnx", "json", "nothing to install", lambda path, threads: Echo(path, meta, "0"))
    path = tmp_path / "m.onnx"
    path.write_bytes(b"not really onnx")
    register_runtime(spec)
    try:
        model = load_model(str(path), runtime="echo-test")
        assert isinstance(model, Echo) and model.run(np.zeros((1, 2, 2, 3), np.uint8)).shape == (1, 2)
        with pytest.raises(UsageError, match="cannot run it"):
            load_model(str(path), runtime="litert")  # a TFLite runtime on an ONNX file
    finally:
        RUNTIME_REGISTRY._items.pop("echo-test")
    with pytest.raises(TypeError):
        Model("p", meta, "0")  # the interface is abstract
