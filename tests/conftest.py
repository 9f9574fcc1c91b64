"""Shared fixtures: a small generated digits benchmark and a tiny trained encoder.

Everything here is real (generated images, a trained and exported ONNX encoder, real
onnxruntime); sizes are small so the whole suite stays fast on a 2-core machine.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

# Tests are laid out like the packages (tests/device, tests/serve, ...) and some share helpers by
# importing a sibling test module by name (``from test_daemon_rounds import make_daemon``); every
# test folder is importable, whatever order pytest collects them in.
_TESTS = Path(__file__).resolve().parent
for _folder in sorted(p for p in _TESTS.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

SMALL_DOMAINS = ("handwritten", "printed", "street", "lcd")


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """``pool/<domain>/<label>`` (80 per domain) and ``devices/<domain>/{local,test}/<label>``."""
    from cloud.tools.datagen.digits import generate

    root = tmp_path_factory.mktemp("digits")
    generate(root, per_domain=80, domains=SMALL_DOMAINS, seed=1, layout="benchmark", device_local=40, device_test=40)
    return root


@pytest.fixture(scope="session")
def encoder_path(digits_root, tmp_path_factory) -> Path:
    """A tiny encoder trained for a few epochs on the small pool, exported to ONNX (10 epochs: the
    contrastive objective needs more steps than 5 batches a few times to find the domains)."""
    import torch

    from cloud.export.formats import export_onnx
    from cloud.pool.dataset import load_folder
    from cloud.training.encoder import EncoderConfig, train_encoder
    from device_sdk.runtime.artifact import ArtifactMeta

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    data = load_folder(str(digits_root / "pool"))
    cfg = EncoderConfig(feature_dim=16, width=8, epochs=10, batch_size=64, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder, report = train_encoder(data, cfg)
        meta = ArtifactMeta(
            kind="encoder",
            arch=cfg.arch,
            input_shape=(3, 32, 32),
            mean=report["mean"],
            std=report["std"],
            feature_dim=cfg.feature_dim,
            labels=data.label_names,
            domains=data.domain_names,
        )
        path = tmp_path_factory.mktemp("encoder") / "encoder.onnx"
        export_onnx(encoder, meta, str(path), output_name="features")
    return path


@pytest.fixture(scope="session")
def pool_index(digits_root, encoder_path, tmp_path_factory):
    """The small pool encoded and clustered (k=16), saved to disk; returns ``(index, path)``."""
    from cloud.pool.index import build_index

    index = build_index(str(digits_root / "pool"), str(encoder_path), k=16, iters=10, seed=0, threads=1)
    path = tmp_path_factory.mktemp("index") / "pool.index.npz"
    index.save(str(path))
    return index, path
