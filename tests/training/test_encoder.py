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
    from cloud.training.encoder import (
        EncoderConfig,
        _to_tensor,
        embed,
        nt_xent,
        permute_channels,
        random_views,
        train_encoder,
    )
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
        a, b = (
            permute_channels(random_views(x[:256], gen, cfg.max_shift, (cfg.min_zoom, cfg.max_zoom)), gen)
            for _ in range(2)
        )
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


# ---- the fixed raw-pixel branch (models/hybrid.py) ---------------------------------------------


def test_pixel_branch_is_the_pca_of_pooled_pixels():
    import torch

    from cloud.training.pixels import fit_pixel_branch

    class Source:  # serves normalised images by index, as the training data sources do
        def take(self, idx):
            return x[torch.as_tensor(idx)]

    x = torch.randn(300, 3, 32, 32)
    branch = fit_pixel_branch(Source(), np.arange(300), dim=8, batch=128)
    pooled = torch.nn.functional.avg_pool2d(x, 2).flatten(1).double().numpy()
    centred = pooled - pooled.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    # the same subspace as numpy's PCA (component signs may differ), unit-norm projections
    np.testing.assert_allclose(np.abs(vt[:8] @ branch.projection.double().numpy()), np.eye(8), atol=1e-4)
    with torch.no_grad():
        z = branch(x[:5])
    expected = centred[:5] @ branch.projection.double().numpy()
    np.testing.assert_allclose(z.numpy(), expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-4)
    assert branch.factor == 2 and branch.feature_dim == 8


def test_hybrid_cosine_mixes_the_two_branches():
    import torch

    from models import get_model
    from models.hybrid import HybridEncoder, PixelBranch

    torch.manual_seed(0)
    learned = get_model("conv_encoder", feature_dim=12, width=8).eval()
    pixels = PixelBranch(torch.randn(768), torch.randn(768, 4), factor=2)
    hybrid = HybridEncoder(learned, pixels, pixel_weight=0.3).eval()
    a, b = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        cos = (hybrid(a) * hybrid(b)).sum(1)
        want = 0.7 * (learned(a) * learned(b)).sum(1) + 0.3 * (pixels(a) * pixels(b)).sum(1)
    assert hybrid.feature_dim == 16 and torch.allclose(cos, want, atol=1e-5)
    with pytest.raises(ValueError):
        HybridEncoder(learned, pixels, pixel_weight=1.5)
    with pytest.raises(ValueError):
        PixelBranch(torch.randn(10), torch.randn(11, 4), factor=2)


def test_pixel_branch_settings_are_checked():
    from cloud.training.encoder import EncoderConfig, learned_dim
    from device_sdk.errors import InputError

    assert learned_dim(EncoderConfig(feature_dim=64, pixel_dim=24, pixel_weight=0.0)) == 64
    assert learned_dim(EncoderConfig(feature_dim=64, pixel_dim=24, pixel_weight=0.4)) == 40
    assert learned_dim(EncoderConfig(feature_dim=16, pixel_dim=0, pixel_weight=0.4)) == 8  # 0: half
    for bad in (dict(pixel_dim=64, pixel_weight=0.4), dict(pixel_dim=-1, pixel_weight=0.4), dict(pixel_weight=1.0)):
        with pytest.raises(InputError):
            learned_dim(EncoderConfig(feature_dim=64, **bad))
    with pytest.raises(InputError):
        learned_dim(EncoderConfig(feature_dim=1, pixel_weight=0.4))


def test_hybrid_encoder_exports_to_one_onnx_the_device_scores_with(digits_root, tmp_path):
    """Trained with a pixel branch: one ONNX file, the device's features equal torch's, and the
    device answers a probe against its clusters with the usual K + 1 counts."""
    import torch

    from cloud.export.formats import export_onnx
    from cloud.pool.dataset import load_folder
    from cloud.pool.index import build_index
    from cloud.tools.pipeline import encoder_meta
    from cloud.training.encoder import EncoderConfig, train_encoder
    from device_sdk.device import answer_probe
    from device_sdk.imagefolder import normalize
    from device_sdk.privacy.ledger import PrivacyLedger
    from device_sdk.scoring import encode_items
    from models.hybrid import HybridEncoder

    torch.set_num_threads(1)
    data = load_folder(str(digits_root / "pool"))
    # objective contrastive: the domain folders are ignored, as in a pool without them (which gets the branch)
    cfg = EncoderConfig(
        feature_dim=16, pixel_dim=6, pixel_weight=0.4, width=8, epochs=1, batch_size=64, seed=0, objective="contrastive"
    )
    encoder, report = train_encoder(data, cfg)
    assert isinstance(encoder, HybridEncoder) and encoder.feature_dim == 16 and report["pixel_weight"] == 0.4
    path = tmp_path / "hybrid.onnx"
    export_onnx(encoder, encoder_meta(cfg, data, report), str(path), output_name="features")
    model = load_model(str(path))
    items = scan_image_folder(digits_root / "devices" / "lcd" / "test")[:40]
    x = load_images([it.path for it in items], (32, 32))
    with torch.no_grad():
        ref = encoder(torch.from_numpy(normalize(x, model.meta.mean, model.meta.std))).numpy()
    got = model.run(x)
    assert got.shape == (40, 16) and float(np.min(np.sum(ref * got, axis=1))) >= 0.999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    index = build_index(str(digits_root / "pool"), str(path), k=8, iters=5, seed=0, threads=1)
    probe = index.probe(radius_quantile=0.95)
    ledger = PrivacyLedger.open(str(tmp_path / "ledger.json"), device_id="d", budget_epsilon=1e5)
    scores, _ = answer_probe(probe, model, encode_items(model, items), ledger, sigma=0.01)
    assert scores.scores.shape == (8,) and float(np.sum(scores.scores)) + float(scores.far) == pytest.approx(
        40, abs=0.5
    )


def test_a_pool_with_domain_folders_gets_no_pixel_branch(digits_root):
    """With a domain head the learned features already separate the domains: the branch is left out."""
    import torch

    from cloud.pool.dataset import load_folder
    from cloud.training.encoder import EncoderConfig, train_encoder
    from models.hybrid import HybridEncoder

    torch.set_num_threads(1)
    data = load_folder(str(digits_root / "pool"))
    assert len(data.domain_names) > 1
    cfg = EncoderConfig(feature_dim=16, pixel_weight=0.4, width=8, epochs=1, batch_size=64, seed=0)
    encoder, report = train_encoder(data, cfg)
    assert not isinstance(encoder, HybridEncoder) and report["pixel_weight"] == 0.0
    with torch.no_grad():
        assert encoder(torch.zeros(2, 3, 32, 32)).shape == (2, 16)
