"""The exported encoder: self-describing, identified by hash, and the same features on both sides."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from device_sdk.errors import ArtifactError, MismatchError
from device_sdk.imagefolder import load_images, scan_image_folder
from device_sdk.runtime import load_model


def test_metadata_sidecar_and_hash(encoder_path):
    model = load_model(str(encoder_path))
    side = json.loads((encoder_path.parent / (encoder_path.name + ".json")).read_text())
    assert side["sha256"] == model.sha256
    assert model.meta.kind == "encoder" and model.meta.input_shape == (3, 32, 32) and model.meta.feature_dim == 16
    assert len(model.meta.domains) == 4 and model.meta.labels == [str(i) for i in range(10)]


def test_features_are_unit_norm_and_match_torch(encoder_path, digits_root):
    """Device (onnxruntime) features equal the cloud's (PyTorch) ones: cosine >= 0.999."""
    import torch

    from cloud.dataset import load_folder
    from cloud.encoder_train import EncoderConfig, train_encoder

    model = load_model(str(encoder_path))
    items = scan_image_folder(digits_root / "devices" / "lcd" / "test")[:64]
    feats = model.run(load_images([it.path for it in items], (32, 32)))
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    # Re-train the same config with the same seed: torch is deterministic on CPU, so compare graphs.
    torch.set_num_threads(1)
    data = load_folder(str(digits_root / "pool"))
    encoder, _ = train_encoder(data, EncoderConfig(feature_dim=16, width=8, epochs=1, batch_size=64, seed=3))
    from cloud.export import export_onnx
    from device_sdk.imagefolder import normalize

    path = encoder_path.parent / "check.onnx"
    export_onnx(encoder, model.meta, str(path), output_name="features")
    x = load_images([it.path for it in items], (32, 32))
    with torch.no_grad():
        ref = encoder(torch.from_numpy(normalize(x, model.meta.mean, model.meta.std))).numpy()
    got = load_model(str(path)).run(x)
    assert float(np.min(np.sum(ref * got, axis=1))) >= 0.999


def test_bad_artifacts_are_typed(encoder_path, tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        load_model(str(tmp_path / "none.onnx"))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ArtifactError, match="cannot load"):
        load_model(str(junk))
    proto = onnx.load(str(encoder_path))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(ArtifactError, match="no ECOS metadata"):
        load_model(str(bare))
    with pytest.raises(ArtifactError, match="does not match"):
        load_model(str(encoder_path), expected_sha256="0" * 64)


def test_wrong_input_shape_is_typed(encoder_path):
    with pytest.raises(MismatchError, match="expected uint8 images"):
        load_model(str(encoder_path)).run(np.zeros((1, 28, 28, 3), np.uint8))
