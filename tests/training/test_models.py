"""Model registry, export parity, checkpoints, TFLite metadata, and the typed refusals around them."""

from __future__ import annotations

import csv
import sys

import numpy as np
import pytest
import torch

from cloud import cli as cloud_cli
from cloud.export.formats import export_onnx, export_tflite
from cloud.training.classifier import (
    DistillConfig,
    Trained,
    distill,
    distillation_loss,
    load_checkpoint,
    load_selection,
    save_checkpoint,
)
from device_sdk import cli as device_cli
from device_sdk.errors import ArtifactError, InputError, MismatchError, RuntimeUnavailable, UsageError
from device_sdk.imagefolder import scan_image_folder
from device_sdk.predict import Predictor
from device_sdk.runtime import load_model
from device_sdk.runtime.artifact import META_KEY, ArtifactMeta
from device_sdk.runtime.tflite_meta import read_tflite_metadata
from models import get_model, list_models, model_info

LABELS = [str(i) for i in range(10)]
MEAN, STD = (0.45, 0.45, 0.45), (0.25, 0.25, 0.25)


@pytest.fixture(autouse=True, scope="module")
def _threads():
    torch.set_num_threads(2)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _trained(arch: str = "small_cnn", width: int = 8, seed: int = 0) -> Trained:
    torch.manual_seed(seed)
    return Trained(
        get_model(arch, num_classes=10, width=width).eval(),
        arch,
        {"num_classes": 10, "width": width},
        MEAN,
        STD,
        LABELS,
    )


# ---- registry -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_builds_with_the_right_output_shape(name):
    info = model_info(name)
    if info.kind == "encoder":
        model, expected = get_model(name, feature_dim=12, width=8), 12
    else:
        model, expected = get_model(name, num_classes=7, width=8), 7
    out = model.eval()(torch.zeros(3, 3, 32, 32))
    assert out.shape == (3, expected), name


def test_registry_has_teachers_and_students():
    assert {"resnet8", "resnet20"} <= set(list_models("teacher"))
    assert {"small_cnn", "mobilenet_v3_small_32"} <= set(list_models("student"))


# ---- export parity ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder_artifacts(tmp_path_factory):
    """A conv encoder (random weights, nonzero BN statistics) exported to ONNX and TFLite."""
    torch.manual_seed(3)
    encoder = get_model("conv_encoder", feature_dim=16, width=8)
    encoder.train()
    with torch.no_grad():
        for _ in range(3):
            encoder(torch.randn(16, 3, 32, 32))  # move BN running stats off their defaults
    encoder.eval()
    meta = ArtifactMeta(
        kind="encoder", arch="conv_encoder", input_shape=(3, 32, 32), mean=MEAN, std=STD, feature_dim=16
    )
    folder = tmp_path_factory.mktemp("enc")
    export_onnx(encoder, meta, str(folder / "enc.onnx"), output_name="features")
    export_tflite(encoder, meta, str(folder / "enc.tflite"))
    return encoder, folder


@pytest.mark.parametrize("name", ["enc.onnx", "enc.tflite"])
def test_device_encoder_features_match_the_cloud_torch_features(encoder_artifacts, digits_root, name):
    from device_sdk.imagefolder import load_images, normalize

    encoder, folder = encoder_artifacts
    images = load_images([it.path for it in scan_image_folder(str(digits_root / "devices"))[:32]], (32, 32))
    with torch.no_grad():
        cloud = encoder(torch.from_numpy(normalize(images, MEAN, STD))).numpy()
    model = load_model(str(folder / name))
    device = model.run(images)
    cosine = np.sum(cloud * device, axis=1) / np.linalg.norm(cloud, axis=1) / np.linalg.norm(device, axis=1)
    assert cosine.min() >= 0.999
    assert model.meta.kind == "encoder" and model.meta.feature_dim == 16


def test_tflite_carries_its_metadata_inside(encoder_artifacts, tmp_path):
    """The metadata is read from the flatbuffer itself: the sidecar is for people, not needed."""
    _, folder = encoder_artifacts
    alone = tmp_path / "alone.tflite"
    alone.write_bytes((folder / "enc.tflite").read_bytes())
    assert load_model(str(alone)).meta.feature_dim == 16
    data = (folder / "enc.tflite").read_bytes()
    meta = ArtifactMeta.from_json(read_tflite_metadata(data)[META_KEY].decode())
    assert meta.arch == "conv_encoder" and meta.input_shape == (3, 32, 32)
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        read_tflite_metadata(data[:200])
    with pytest.raises(ArtifactError, match="not a TFLite"):
        read_tflite_metadata(b"not a model at all")


def test_runtime_is_chosen_from_the_file_type(encoder_artifacts):
    _, folder = encoder_artifacts
    assert load_model(str(folder / "enc.onnx")).runtime == "onnxruntime"
    assert load_model(str(folder / "enc.tflite")).runtime == "litert"
    with pytest.raises(UsageError, match="cannot run it"):
        load_model(str(folder / "enc.tflite"), runtime="onnxruntime")
    with pytest.raises(UsageError, match="unknown runtime"):
        load_model(str(folder / "enc.onnx"), runtime="tensorrt")


# ---- refusals: artifacts and runtimes -------------------------------------------------------------


def test_wrong_hash_and_missing_metadata_are_artifact_errors(encoder_artifacts, tmp_path):
    import io

    import onnx

    encoder, folder = encoder_artifacts
    with pytest.raises(ArtifactError, match="does not match the expected"):
        load_model(str(folder / "enc.tflite"), expected_sha256="0" * 64)
    buf = io.BytesIO()
    torch.onnx.export(encoder, (torch.zeros(1, 3, 32, 32),), buf, dynamo=False)
    bare = tmp_path / "bare.onnx"
    onnx.save(onnx.load_from_string(buf.getvalue()), str(bare))
    with pytest.raises(ArtifactError, match="no ECOS metadata"):
        load_model(str(bare))
    raw = tmp_path / "bare.tflite"
    raw.write_bytes(_without_metadata((folder / "enc.tflite").read_bytes()))
    with pytest.raises(ArtifactError, match="no ECOS metadata"):
        load_model(str(raw))


def _without_metadata(flatbuffer: bytes) -> bytes:
    """The same TFLite model with its ``ecos`` metadata entry removed (as a plain converter writes it)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(flatbuffer), 0)
    model.metadata = [m for m in model.metadata if m.name != META_KEY.encode()]
    builder = flatbuffers.Builder(len(flatbuffer))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


@pytest.mark.parametrize(
    "blocked,name,runtime,hint",
    [
        (
            ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"),
            "enc.tflite",
            "auto",
            "ecos-fleet-device[litert]",
        ),
        (("ai_edge_litert.interpreter",), "enc.tflite", "litert", "ecos-fleet-device[litert]"),
        (("tflite_runtime.interpreter",), "enc.tflite", "tflite-runtime", "ecos-fleet-device[tflite]"),
        (("onnxruntime",), "enc.onnx", "auto", "ecos-fleet-device[onnx]"),
    ],
)
def test_missing_runtime_is_a_typed_error_with_an_install_hint(
    encoder_artifacts, monkeypatch, blocked, name, runtime, hint
):
    _, folder = encoder_artifacts
    for module in blocked:
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(RuntimeUnavailable, match=hint.replace("[", r"\[").replace("]", r"\]")):
        load_model(str(folder / name), runtime=runtime)


def test_predict_refuses_an_encoder_and_a_wrong_size_or_mode_image_in_strict_mode(encoder_artifacts, tmp_path, capsys):
    from PIL import Image

    _, folder = encoder_artifacts
    with pytest.raises(ArtifactError, match="not a classifier"):
        Predictor.open(str(folder / "enc.onnx"))
    trained = _trained()
    export_onnx(trained.model, trained.meta(), str(tmp_path / "clf.onnx"), output_name="logits")
    Image.new("RGB", (40, 28)).save(tmp_path / "big.png")
    assert (
        device_cli.main(["predict", str(tmp_path / "clf.onnx"), str(tmp_path / "big.png"), "--strict"])
        == InputError.exit_code
    )
    err = capsys.readouterr().err
    assert err.startswith("error[input]: ") and "image is 40x28, model expects 32x32" in err
    assert (
        device_cli.main(["predict", str(tmp_path / "clf.onnx"), str(tmp_path / "big.png")]) == 0
    )  # resized when not strict
    assert capsys.readouterr().out.startswith(str(tmp_path / "big.png"))
    (tmp_path / "gray").mkdir()
    Image.new("L", (32, 32)).save(tmp_path / "gray" / "g.png")
    with pytest.raises(InputError, match="image mode is L, model expects RGB"):
        Predictor.open(str(tmp_path / "clf.onnx")).predict_items(scan_image_folder(str(tmp_path / "gray")), strict=True)


# ---- checkpoints, selections, distillation ------------------------------------------------------


def test_checkpoint_round_trip_is_exact_and_pickle_free(tmp_path):
    trained = _trained(seed=1)
    path = tmp_path / "m.safetensors"
    save_checkpoint(trained, str(path))
    back = load_checkpoint(str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back.model(x), trained.model(x))
    assert (back.arch, back.labels, back.mean) == (trained.arch, trained.labels, trained.mean)
    assert b"pickle" not in path.read_bytes()[:200]
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="not a readable safetensors"):
        load_checkpoint(str(path))
    with pytest.raises(InputError):
        load_checkpoint(str(tmp_path / "absent.safetensors"))


def _write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "domain", "cluster", "rank"])
        writer.writerows([[p, label, "d", 0, i] for i, (p, label) in enumerate(rows)])


def test_selection_with_missing_images_names_the_first_one(digits_root, tmp_path):
    items = scan_image_folder(str(digits_root / "pool"))[:5]
    _write_csv(
        tmp_path / "sel.csv", [(it.path, it.label) for it in items] + [("/nope/a.png", "1"), ("/nope/b.png", "2")]
    )
    with pytest.raises(InputError, match=r"2 of 7 selected images do not exist; first: /nope/a\.png"):
        load_selection(str(tmp_path / "sel.csv"), LABELS)


def test_selection_with_labels_the_teacher_does_not_know(digits_root, tmp_path):
    items = scan_image_folder(str(digits_root / "pool"))[:4]
    _write_csv(
        tmp_path / "sel.csv",
        [(items[0].path, "cat"), (items[1].path, "dog"), (items[2].path, "3"), (items[3].path, "")],
    )
    with pytest.raises(MismatchError, match="labels unknown to the teacher: cat, dog"):
        load_selection(str(tmp_path / "sel.csv"), LABELS)
    _write_csv(tmp_path / "ok.csv", [(items[2].path, "3"), (items[3].path, "")])
    data = load_selection(str(tmp_path / "ok.csv"), LABELS)
    assert data.labels.tolist() == [3, -1]  # an empty label is "unlabelled", not an error


def test_distill_cli_with_a_bad_selection_fails_before_training_and_writes_nothing(digits_root, tmp_path, capsys):
    save_checkpoint(_trained(), str(tmp_path / "t.safetensors"))
    _write_csv(tmp_path / "sel.csv", [("/nope/a.png", "1")])
    code = cloud_cli.main(
        [
            "distill",
            "--selection",
            str(tmp_path / "sel.csv"),
            "--teacher",
            str(tmp_path / "t.safetensors"),
            "--out-dir",
            str(tmp_path / "out"),
            "-q",
        ]
    )
    assert code == InputError.exit_code
    assert capsys.readouterr().err.startswith("error[input]: ")
    assert not (tmp_path / "out").exists()


def test_distillation_loss_terms():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    labels = torch.tensor([0, -1])
    assert float(distillation_loss(logits, logits, labels, 4.0, 1.0)) == pytest.approx(0.0, abs=1e-6)
    ce = torch.nn.functional.cross_entropy(logits[:1], labels[:1])
    assert float(distillation_loss(logits, torch.zeros_like(logits), labels, 4.0, 0.0)) == pytest.approx(float(ce))
    assert float(distillation_loss(logits, logits.flip(1), labels, 2.0, 1.0)) > 0


def test_distill_refuses_a_student_that_its_checkpoint_could_not_rebuild(digits_root):
    from cloud.pool.dataset import load_image_set

    data = load_image_set(scan_image_folder(str(digits_root / "pool"))[:8], label_names=LABELS)
    with pytest.raises(UsageError, match="not small_cnn"):
        distill(get_model("small_cnn", num_classes=10, width=16), _trained(), data, DistillConfig(width=8, epochs=1))
    with pytest.raises(UsageError, match="temperature"):
        DistillConfig(temperature=0.0)


def test_quant_config_is_validated():
    from cloud.export.quantize import QuantConfig

    with pytest.raises(UsageError, match="quant_format must be one of QDQ, QOperator"):
        QuantConfig(quant_format="QInt4")
    with pytest.raises(UsageError, match="calibration_size"):
        QuantConfig(calibration_size=0)
