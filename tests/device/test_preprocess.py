"""One preprocessing for cloud and device: any size and mode in, the artifact's tensor out, the same on both sides."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from device_sdk.errors import ArtifactError, InputError
from device_sdk.imagefolder import ImageItem
from device_sdk.preprocess import INTERPOLATIONS, LEGACY, Preprocess
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


# ---- the fast paths give Pillow's bytes --------------------------------------------------------


def _jpeg_kinds(folder):
    """JPEGs of every kind a pool may hold (and a few broken ones), with PNGs among them."""
    from PIL import ImageFilter

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)

    def picture(h, w):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(1.5))

    kinds = {
        "s420.jpg": (picture(48, 48), {"subsampling": 2, "quality": 80}),
        "s422.jpg": (picture(37, 45), {"subsampling": 1}),
        "s444.jpg": (picture(45, 37), {"subsampling": 0}),
        "progressive.jpg": (picture(61, 50), {"progressive": True}),
        "grey.jpg": (picture(40, 52).convert("L"), {}),
        "tiny.jpg": (picture(3, 5), {}),
        "one.jpg": (picture(1, 1), {}),
        "photo.jpg": (picture(300, 410), {"quality": 95}),  # draft 1/8 at 32x32, 1/4 at 64
        "wide.jpg": (picture(70, 260), {}),  # draft 1/2 at 32x32
        "cmyk.jpg": (picture(40, 40).convert("CMYK"), {}),
    }
    for name, (im, options) in kinds.items():
        im.save(folder / name, "JPEG", **options)
    exif = Image.Exif()
    exif[0x0112] = 8
    picture(30, 50).save(folder / "rotated.jpg", "JPEG", exif=exif)
    picture(33, 33).save(folder / "plain.png")
    data = (folder / "s420.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "garbage.jpg").write_bytes(b"\xff\xd8\xff" + bytes(rng.integers(0, 256, 500, dtype=np.uint8)))
    return sorted(str(p) for p in folder.iterdir())


@pytest.fixture
def pillow_only(monkeypatch):
    """A function that decodes as the device does without simplejpeg (Pillow file by file)."""
    from device_sdk import preprocess

    def run(fn):
        monkeypatch.setenv(preprocess.DECODER_ENV, "pillow")
        preprocess.fast_paths(refresh=True)
        try:
            return fn()
        finally:
            monkeypatch.delenv(preprocess.DECODER_ENV)
            preprocess.fast_paths(refresh=True)

    return run


SPECS = [
    Preprocess(size=(32, 32)),
    Preprocess(size=(64, 64)),
    Preprocess(size=(20, 28), resize="stretch", interpolation="bicubic"),
    Preprocess(size=(24, 24), interpolation="lanczos", exif=False),
    Preprocess(size=(16, 16), interpolation="nearest", draft=False),
    Preprocess(size=(32, 32), channels=1, mean=(0.5,), std=(0.25,)),
    Preprocess(size=(32, 32), channels=1, mean=(0.5,), std=(0.25,), draft=False),
    Preprocess(size=(32, 32), **LEGACY),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.size}-{s.channels}-{s.resize}-{s.interpolation}-{s.draft}")
def test_fast_decoding_gives_pillows_bytes_for_every_kind_of_file(spec, tmp_path, pillow_only):
    pytest.importorskip("simplejpeg")
    from device_sdk.preprocess import fast_paths

    files = _jpeg_kinds(tmp_path / "p")
    readable = [p for p in files if not p.endswith(("truncated.jpg", "garbage.jpg"))]
    assert fast_paths().jpeg, fast_paths().reason
    taken = [p for p in files if spec._jpeg_plan(p, fast_paths().simplejpeg) is not None]
    plain = "s420.jpg" if spec.channels == 3 or spec.draft else "grey.jpg"  # colour -> L without draft: Pillow's
    pillows = ("cmyk.jpg", "plain.png", "rotated.jpg" if spec.exif else "cmyk.jpg")  # never the shortcut's
    assert any(p.endswith(plain) for p in taken) and not any(p.endswith(pillows) for p in taken)

    reference = pillow_only(lambda: spec.decode_many(readable))
    reference_batch = pillow_only(lambda: spec.decode_batch(files))
    np.testing.assert_array_equal(spec.decode_many(readable), reference)
    np.testing.assert_array_equal(np.stack([spec.decode(p) for p in readable]), reference)
    images, ok, failed = spec.decode_batch(files * 3)  # three of each size: fitted together
    rows = [i for i, p in enumerate(files * 3) if p in readable]
    np.testing.assert_array_equal(
        images[rows], np.concatenate([reference] * 3)[[readable.index(files[i % len(files)]) for i in rows]]
    )
    assert ok.sum() == len(rows) and len(failed) == 3 * 2
    assert [(i % len(files), reason) for i, reason in failed][:2] == reference_batch[2]


def test_fitting_a_batch_gives_the_bytes_of_fitting_each_picture():
    rng = np.random.default_rng(5)
    for trial in range(60):
        h, w = (int(v) for v in rng.integers(1, 90, 2))
        size = tuple(int(v) for v in rng.integers(1, 48, 2))
        channels = (1, 3)[trial % 2]
        spec = Preprocess(
            size=size,
            channels=channels,
            mean=(0.5,) * channels,
            std=(0.25,) * channels,
            resize=("stretch", "center-crop")[trial % 3 == 0],
            interpolation=INTERPOLATIONS[trial % len(INTERPOLATIONS)],
        )
        for bands in {channels, 4} if channels == 3 else {1}:
            pictures = rng.integers(0, 256, (4, h, w, bands), dtype=np.uint8)
            one_by_one = np.stack([spec._fit_one(np.ascontiguousarray(p[..., :channels])) for p in pictures])
            np.testing.assert_array_equal(spec._fit_many(pictures), one_by_one, err_msg=f"{h}x{w} -> {spec}")


def test_center_crop_of_any_size_stays_inside_the_picture(tmp_path):
    """Rounding once put the crop box a hair outside some pictures (77 wide, 79 high into 40x24), which
    Pillow refused with a ValueError that no caller caught."""
    Image.new("RGB", (77, 79), (10, 20, 30)).save(tmp_path / "odd.png")
    out = Preprocess(size=(24, 40)).decode(str(tmp_path / "odd.png"))
    assert out.shape == (24, 40, 3) and (out == (10, 20, 30)).all()


def test_decoder_env_turns_the_shortcut_off(pillow_only):
    from device_sdk.preprocess import fast_paths

    assert pillow_only(lambda: fast_paths()).simplejpeg is None
    assert "pillow" in pillow_only(lambda: fast_paths().reason)


@pytest.mark.parametrize("name", ["grey16.png", "grey16.tif"])
def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path, name):
    """A 16-bit grey picture (mode I;16) is the 8-bit one scaled by 257, not every value above 255 made white."""
    grey = np.tile(np.linspace(0, 255, 48).round().astype(np.uint8), (40, 1))
    Image.fromarray(grey).save(tmp_path / "grey8.png")
    wide = grey.astype("<u2") * 257
    Image.frombytes("I;16", (48, 40), wide.tobytes()).save(tmp_path / name)
    assert Image.open(tmp_path / name).mode.startswith("I;16")
    for channels in (1, 3):
        spec = Preprocess(size=(32, 32), channels=channels, mean=(0.5,) * channels, std=(0.25,) * channels)
        np.testing.assert_array_equal(spec.decode(str(tmp_path / name)), spec.decode(str(tmp_path / "grey8.png")))
