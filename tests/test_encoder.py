"""The exported encoder: self-describing, identified by hash, and the same features on both sides."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from device_sdk.errors import ArtifactError, MismatchError
from device_sdk.imagefolder import load_images, scan_image_folder
from device_sdk.runtime.models import load_model


def test_metadata_sidecar_and_hash(encoder_path):
    model = load_model(str(encoder_path))
    side = json.loads((encoder_path.parent / (encoder_path.name + ".json")).read_text())
    assert side["sha256"] == model.sha256
    assert model.meta.kind == "encoder" and model.meta.input_shape == (3, 32, 32) and model.meta.feature_dim == 16
    assert len(model.meta.domains) == 4 and model.meta.labels == [str(i) for i in range(10)]


def test_features_are_unit_norm_and_match_torch(encoder_path, digits_root):
    """Device (onnxruntime) features equal the cloud's (PyTorch) ones: cosine >= 0.999."""
    import torch

    from cloud.pool.dataset import load_folder
    from cloud.training.encoder import EncoderConfig, train_encoder

    model = load_model(str(encoder_path))
    items = scan_image_folder(digits_root / "devices" / "lcd" / "test")[:64]
    feats = model.run(load_images([it.path for it in items], (32, 32)))
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    # Re-train the same config with the same seed: torch is deterministic on CPU, so compare graphs.
    torch.set_num_threads(1)
    data = load_folder(str(digits_root / "pool"))
    encoder, _ = train_encoder(data, EncoderConfig(feature_dim=16, width=8, epochs=1, batch_size=64, seed=3))
    from cloud.export.formats import export_onnx
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


# ---- training objectives: a pool without labels or domain folders -----------------------------

def _hidden(data, labels: bool, domains: bool):
    import dataclasses

    if not labels:
        data = dataclasses.replace(data, labels=np.full(len(data.items), -1), label_names=[])
    if not domains:
        data = dataclasses.replace(data, domains=np.full(len(data.items), -1), domain_names=[])
    return data


def test_contrastive_encoder_needs_neither_labels_nor_domains(digits_root):
    """An unlabelled pool trains (the first version refused it): the contrastive loss on views
    it never saw drops well below an untrained encoder's (measured 5.1 vs 6.2), and its features
    still tell the pool's domains apart (4 domains: chance 0.25)."""
    import torch

    from cloud.pool.dataset import load_folder
    from cloud.training.encoder import EncoderConfig, _to_tensor, embed, nt_xent, permute_channels, random_views
    from cloud.training.encoder import train_encoder
    from models import get_model

    torch.set_num_threads(1)
    data = load_folder(str(digits_root / "pool"))
    bare = _hidden(data, labels=False, domains=False)
    cfg = EncoderConfig(feature_dim=16, width=8, epochs=3, batch_size=64, seed=0)
    encoder, report = train_encoder(bare, cfg)
    assert np.isnan(report["val_label_acc"]) and np.isnan(report["val_domain_acc"])
    x = _to_tensor(data.images, report["mean"], report["std"])

    def held_out_loss(model) -> float:
        gen = torch.Generator().manual_seed(12345)
        a, b = (permute_channels(random_views(x[:256], gen, cfg.max_shift, (cfg.min_zoom, cfg.max_zoom)), gen)
                for _ in range(2))
        with torch.no_grad():
            return float(nt_xent(model.eval()(a), model.eval()(b), cfg.temperature))

    torch.manual_seed(0)
    untrained = get_model(cfg.arch, feature_dim=16, width=8)
    assert held_out_loss(encoder) < 0.9 * held_out_loss(untrained)
    z = embed(encoder, x)
    sim = z @ z.T
    np.fill_diagonal(sim, -9)
    assert float(np.mean(data.domains[sim.argmax(1)] == data.domains)) > 0.6


def test_objectives_follow_the_pool_and_the_config(digits_root):
    from cloud.pool.dataset import load_folder
    from cloud.training.encoder import EncoderConfig, objectives
    from device_sdk.errors import InputError

    data = load_folder(str(digits_root / "pool"))
    assert objectives(data, EncoderConfig()) == (True, False, True)  # the label head is off by default
    assert objectives(data, EncoderConfig(label_weight=0.5)) == (True, True, True)
    assert objectives(_hidden(data, True, False), EncoderConfig(label_weight=0.5)) == (True, True, False)
    assert objectives(_hidden(data, True, False), EncoderConfig()) == (True, False, False)
    assert objectives(_hidden(data, False, False), EncoderConfig()) == (True, False, False)
    assert objectives(data, EncoderConfig(objective="contrastive")) == (True, False, False)
    assert objectives(data, EncoderConfig(objective="supervised")) == (False, True, True)
    with pytest.raises(InputError, match="supervised"):
        objectives(_hidden(data, False, False), EncoderConfig(objective="supervised"))
    with pytest.raises(InputError, match="unknown encoder objective"):
        objectives(data, EncoderConfig(objective="magic"))


def test_views_keep_colour_statistics_and_shape():
    """Channel shuffles and geometric views change neither the set of colours nor the shape."""
    import torch

    from cloud.training.encoder import permute_channels, random_views

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 32, 32)
    v = random_views(x, gen, 0.25, (1.0, 2.0))
    assert v.shape == x.shape and torch.isfinite(v).all()
    p = permute_channels(x, gen)
    assert torch.allclose(p.sum(1), x.sum(1)) and torch.allclose(p.sort(1).values, x.sort(1).values)
    grey = x[:, :1].expand(-1, 3, -1, -1)
    assert torch.equal(permute_channels(grey, gen), grey)


def test_style_code_encoder_exports_and_keeps_unit_norm():
    import torch

    from models import get_model

    enc = get_model("conv_encoder", feature_dim=24, width=8, style_dim=8, style_weight=0.3).eval()
    with torch.no_grad():
        z = enc(torch.randn(4, 3, 32, 32))
    assert z.shape == (4, 24) and torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)
    with pytest.raises(ValueError):
        get_model("conv_encoder", feature_dim=8, style_dim=8)
