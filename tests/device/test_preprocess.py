"""One preprocessing for cloud and device: any size and mode in, the artifact's tensor out, the same on both sides."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from device_sdk.errors import ArtifactError, InputError
from device_sdk.imagefolder import ImageItem
from device_sdk.preprocess import LEGACY, Preprocess
from device_sdk.runtime.artifact import ArtifactMeta

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _thirds(w: int, h: int) -> Image.Image:
    """Left third red, middle green, right third blue."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 3, 0] = 255
    a[:, w // 3 : 2 * w // 3, 1] = 255
    a[:, 2 * w // 3 :, 2] = 255
    return Image.fromarray(a)


def _photo_files(folder):
    """Files a user's pool holds: a rotated phone JPEG, a wide PNG, greyscale, RGBA, palette GIF, a tiny one."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (90, 160, 3), dtype=np.uint8)).filter(
        __import__("PIL.ImageFilter", fromlist=["GaussianBlur"]).GaussianBlur(2)
    )
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(folder / "phone.jpg", quality=90, exif=exif)
    _thirds(300, 100).save(folder / "wide.png")
    Image.fromarray(rng.integers(0, 256, (70, 50), dtype=np.uint8), "L").save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), "RGBA").save(folder / "alpha.png")
    _thirds(48, 48).convert("P").save(folder / "palette.gif")
    Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(folder / "tiny.bmp")
    return sorted(str(p) for p in folder.iterdir())


def test_center_crop_keeps_the_middle_and_stretch_keeps_everything(tmp_path):
    _thirds(300, 100).save(tmp_path / "wide.png")
    crop = Preprocess(size=(16, 16), resize="center-crop").decode(str(tmp_path / "wide.png"))
    stretch = Preprocess(size=(16, 16), resize="stretch").decode(str(tmp_path / "wide.png"))
    assert crop.shape == stretch.shape == (16, 16, 3)
    assert crop[:, :, 1].min() > 200 and crop[:, :, 0].max() < 60  # only the green middle third survives
    assert stretch[:, 0, 0].min() > 200 and stretch[:, -1, 2].min() > 200  # red left edge, blue right edge


def test_exif_orientation_is_applied_when_asked(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :20] = 255  # left half white: a 90-degree clockwise turn (orientation 6) puts it on top
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(img).save(tmp_path / "r.jpg", quality=95, exif=exif)
    upright = Preprocess(size=(40, 20), resize="stretch", exif=True, draft=False).decode(str(tmp_path / "r.jpg"))
    raw = Preprocess(size=(20, 40), resize="stretch", exif=False, draft=False).decode(str(tmp_path / "r.jpg"))
    assert upright.shape == (40, 20, 3) and upright[:15].mean() > 200 and upright[25:].mean() < 50
    assert raw[:, :15].mean() > 200 and raw[:, 25:].mean() < 50  # as stored: left half white


def test_greyscale_models_get_one_channel(tmp_path):
    files = _photo_files(tmp_path / "p")
    spec = Preprocess(size=(24, 24), channels=1, mean=(0.5,), std=(0.25,))
    x = spec.normalize(spec.decode_many(files))
    assert x.shape == (len(files), 1, 24, 24) and x.dtype == np.float32


def test_old_artifacts_without_preprocess_read_as_the_first_version():
    meta = ArtifactMeta.from_json(
        json.dumps({"kind": "encoder", "arch": "a", "input_shape": [3, 32, 32], "mean": list(MEAN), "std": list(STD)})
    )
    spec = meta.preprocessing()
    assert meta.preprocess == {} and spec.size == (32, 32) and spec.channels == 3
    assert spec.policy() == LEGACY and spec.mean == MEAN


@pytest.mark.parametrize("policy", [{"resize": "zoom"}, {"interpolation": 3}, {"exif": "yes"}, []])
def test_malformed_preprocess_metadata_is_an_artifact_error(policy):
    doc = {
        "kind": "encoder",
        "arch": "a",
        "input_shape": [3, 32, 32],
        "mean": list(MEAN),
        "std": list(STD),
        "preprocess": policy,
    }
    with pytest.raises(ArtifactError, match="malformed metadata"):
        ArtifactMeta.from_json(json.dumps(doc))


def test_bad_specs_and_unreadable_files_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="channels"):
        Preprocess(channels=4, mean=(0,) * 4, std=(1,) * 4)
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8\xff not really")
    with pytest.raises(InputError, match="x.jpg: not a readable image"):
        Preprocess().decode(str(tmp_path / "x.jpg"))


def test_cloud_and_device_give_the_same_tensor_for_the_same_file(tmp_path):
    """An encoder exported at 64x64 with the default policy: the device's input (through the runtime it
    runs) equals the cloud's training input (in memory and streamed) for every kind of file."""
    import torch

    from cloud.export.formats import export_onnx
    from cloud.pool.dataset import default_preprocess, load_image_set, pool_set
    from cloud.training.data import batch_source
    from device_sdk.runtime import load_model
    from models import get_model

    files = _photo_files(tmp_path / "pool")
    items = [ImageItem(p, "", "") for p in files]
    cloud_spec = default_preprocess((64, 64)).with_stats(MEAN, STD)
    torch.manual_seed(0)
    encoder = get_model("conv_encoder", feature_dim=8, width=4, input_size=64).eval()
    meta = ArtifactMeta(
        kind="encoder",
        arch="conv_encoder",
        input_shape=cloud_spec.input_shape,
        mean=MEAN,
        std=STD,
        feature_dim=8,
        preprocess=cloud_spec.policy(),
    )
    export_onnx(encoder, meta, str(tmp_path / "enc.onnx"), output_name="features")

    model = load_model(str(tmp_path / "enc.onnx"))
    assert model.meta.preprocessing() == cloud_spec
    device_x = model.preprocess(model.meta.preprocessing().decode_many(files))

    in_memory = batch_source(load_image_set(items, preprocess=cloud_spec), MEAN, STD).take(np.arange(len(files)))
    streamed = batch_source(pool_set(items, cloud_spec), MEAN, STD).take(np.arange(len(files)))
    assert device_x.shape == (len(files), 3, 64, 64)
    np.testing.assert_array_equal(device_x, in_memory.numpy())
    np.testing.assert_array_equal(device_x, streamed.numpy())
    # and the features the device computes are the cloud's (same graph, same input)
    with torch.no_grad():
        np.testing.assert_allclose(
            model.run(model.meta.preprocessing().decode_many(files)), encoder(in_memory).numpy(), atol=1e-5
        )
