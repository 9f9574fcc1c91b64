"""The encoder as TFLite too: the parity gate at export, probes naming both artifacts, and a device
that has only a TFLite runtime scoring with it (ai-edge-litert here; tflite-runtime in its own venv
when one is given in ECOS_TFLITE_RUNTIME_PYTHON, see the last test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from cloud import cli as cloud_cli
from cloud.errors import QualityGateError
from cloud.pool.index import PoolIndex
from device_sdk import cli as device_cli
from device_sdk.errors import MessageError, MismatchError
from device_sdk.protocol import envelope as wire
from device_sdk.protocol.round import Probe
from device_sdk.runtime import load_model
from device_sdk.scoring import check_compatible

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
A, B = "a" * 64, "b" * 64


def _probe(**kw) -> Probe:
    c = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    return Probe("p1", A, c, created="2026-01-01T00:00:00+00:00", **kw)


def test_probe_without_encoders_keeps_its_bytes_and_signed_content():
    plain = _probe()
    env = wire.decode(plain.to_bytes(), "probe")
    assert "encoders" not in env.fields
    assert b"encoders" not in plain.signed_bytes()
    assert Probe.from_bytes(plain.to_bytes()).encoders is None
    assert plain.accepted_encoders == (A,)


def test_probe_names_its_encoders_and_signs_them():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from cloud.security.keys import SigningKey
    from device_sdk.errors import SignatureError
    from device_sdk.trust import DeviceTrust, verify_probe

    key = SigningKey(Ed25519PrivateKey.generate())
    trust = DeviceTrust([key.public])
    probe = Probe.from_bytes(_probe(encoders=(B,)).to_bytes(signer=key))
    assert probe.encoders == (B,) and probe.accepted_encoders == (A, B)
    assert verify_probe(probe, trust) == key.key_id
    # the list is covered by the signature: another list under the same signature does not verify
    env = wire.decode(probe.to_bytes(), "probe")
    forged = Probe.from_bytes(wire.encode("probe", dict(env.fields, encoders=["c" * 64]), env.arrays))
    with pytest.raises(SignatureError):
        verify_probe(forged, trust)


@pytest.mark.parametrize("bad", [[], "a" * 64, ["A" * 64], ["ab"], [1], ["a" * 64] * 9])
def test_malformed_encoders_are_message_errors(bad):
    env = wire.decode(_probe().to_bytes(), "probe")
    fields = dict(env.fields, encoders=bad)
    with pytest.raises(MessageError, match="encoders"):
        Probe.from_bytes(wire.encode("probe", fields, env.arrays))


def test_check_compatible_accepts_any_named_encoder(encoder_path):
    model = load_model(str(encoder_path))
    c = np.zeros((2, model.meta.feature_dim), np.float32)
    c[:, 0] = 1
    check_compatible(Probe("p", A, c, encoders=(model.sha256,)), model)
    with pytest.raises(MismatchError, match="this device runs"):
        check_compatible(Probe("p", A, c, encoders=(B,)), model)


# ---- export: ONNX + TFLite from train-encoder, the gate, and scoring with each runtime --------------------


@pytest.fixture(scope="module")
def both_encoders(digits_root, tmp_path_factory):
    """``ecos-cloud train-encoder`` (tiny settings): encoder.onnx and its parity-checked encoder.tflite."""
    out = tmp_path_factory.mktemp("enc2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = cloud_cli.main(
            [
                "train-encoder",
                str(digits_root / "pool"),
                "--out",
                str(out / "encoder.onnx"),
                "--feature-dim",
                "16",
                "--width",
                "8",
                "--epochs",
                "2",
                "--threads",
                "1",
                "--parity-images",
                "256",
                "-q",
            ]
        )
    assert rc == 0
    return out


def test_train_encoder_writes_both_and_records_each_in_the_others_sidecar(both_encoders):
    onnx_model = load_model(str(both_encoders / "encoder.onnx"))
    tflite_model = load_model(str(both_encoders / "encoder.tflite"))
    assert tflite_model.runtime in ("litert", "tflite-runtime") and onnx_model.runtime == "onnxruntime"
    onnx_side = json.loads((both_encoders / "encoder.onnx.json").read_text())
    tflite_side = json.loads((both_encoders / "encoder.tflite.json").read_text())
    [v] = onnx_side["variants"]
    assert (v["format"], v["sha256"]) == ("tflite", tflite_model.sha256)
    assert v["parity"]["n"] == 256 and v["parity"]["agreement"] >= 0.99 and v["parity"]["max_cosine_distance"] <= 1e-3
    assert tflite_side["variants"][0]["sha256"] == onnx_model.sha256


def test_parity_gate_refuses_an_encoder_with_other_features(both_encoders, digits_root, tmp_path):
    import torch

    from cloud.export.parity import export_encoder_tflite
    from cloud.pool.dataset import load_folder
    from models.registry import get_model

    torch.manual_seed(7)
    other = get_model("conv_encoder", feature_dim=16, width=8).eval()  # same architecture, other weights
    meta = load_model(str(both_encoders / "encoder.onnx")).meta
    onnx = tmp_path / "encoder.onnx"
    onnx.write_bytes((both_encoders / "encoder.onnx").read_bytes())
    (tmp_path / "encoder.onnx.json").write_text((both_encoders / "encoder.onnx.json").read_text())
    images = load_folder(str(digits_root / "pool")).images[:128]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(QualityGateError, match="TFLite encoder refused"):
            export_encoder_tflite(other, meta, str(onnx), str(tmp_path / "bad.tflite"), images)
    assert not (tmp_path / "bad.tflite").exists() and not (tmp_path / "bad.tflite.json").exists()


@pytest.fixture(scope="module")
def round_files(both_encoders, digits_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("round")
    rc = cloud_cli.main(
        [
            "index",
            str(digits_root / "pool"),
            "--encoder",
            str(both_encoders / "encoder.onnx"),
            "--k",
            "8",
            "--out",
            str(out / "pool.index.npz"),
            "--probe",
            str(out / "round.probe"),
            "--threads",
            "1",
            "-q",
        ]
    )
    assert rc == 0
    return out


def test_index_and_probe_name_both_encoders(both_encoders, round_files):
    onnx_sha = load_model(str(both_encoders / "encoder.onnx")).sha256
    tflite_sha = load_model(str(both_encoders / "encoder.tflite")).sha256
    index = PoolIndex.load(str(round_files / "pool.index.npz"))
    assert index.accepted_encoders == (onnx_sha, tflite_sha)
    probe = Probe.from_bytes((round_files / "round.probe").read_bytes())
    assert probe.accepted_encoders == (onnx_sha, tflite_sha)


def _score(encoder, probe, folder, tmp_path, python=sys.executable, block_onnxruntime=False):
    """``ecos-device score`` in a fresh interpreter; with ``block_onnxruntime`` it cannot import onnxruntime."""
    args = [
        "score",
        str(folder),
        "--encoder",
        str(encoder),
        "--probe",
        str(probe),
        "--out",
        str(tmp_path / "s.scores"),
        "--ledger",
        str(tmp_path / "ledger.json"),
        "--epsilon",
        "0.5",
        "--device-id",
        "dev1",
        "-q",
    ]
    code = (
        "import sys\n"
        + ("sys.modules['onnxruntime'] = None\n" if block_onnxruntime else "")
        + "from device_sdk import cli\nraise SystemExit(cli.main(sys.argv[1:]))"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([python, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("name", ["encoder.onnx", "encoder.tflite"])
def test_device_scores_with_either_encoder(both_encoders, round_files, digits_root, tmp_path, name):
    from device_sdk.protocol.round import Scores

    done = _score(
        both_encoders / name,
        round_files / "round.probe",
        digits_root / "devices" / "printed" / "local",
        tmp_path,
        block_onnxruntime=name.endswith(".tflite"),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    scores = Scores.from_bytes((tmp_path / "s.scores").read_bytes())
    assert scores.k == 8 and scores.encoder_sha256 == load_model(str(both_encoders / "encoder.onnx")).sha256


def test_onnx_only_probe_still_refuses_the_tflite_encoder(both_encoders, round_files, digits_root, tmp_path):
    probe = Probe.from_bytes((round_files / "round.probe").read_bytes())
    plain = tmp_path / "plain.probe"
    plain.write_bytes(Probe(probe.probe_id + "x", probe.encoder_sha256, probe.centroids).to_bytes())
    rc = device_cli.main(
        [
            "score",
            str(digits_root / "devices" / "printed" / "local"),
            "--encoder",
            str(both_encoders / "encoder.tflite"),
            "--probe",
            str(plain),
            "--out",
            str(tmp_path / "s"),
            "--ledger",
            str(tmp_path / "l.json"),
            "--epsilon",
            "0.5",
            "-q",
        ]
    )
    assert rc == MismatchError.exit_code and not (tmp_path / "l.json").exists()


@pytest.mark.skipif(
    not os.environ.get("ECOS_TFLITE_RUNTIME_PYTHON"),
    reason="set ECOS_TFLITE_RUNTIME_PYTHON to a python with tflite-runtime and numpy<2 (no onnxruntime)",
)
def test_tflite_runtime_device_scores(both_encoders, round_files, digits_root, tmp_path):
    python = os.environ["ECOS_TFLITE_RUNTIME_PYTHON"]
    done = _score(
        both_encoders / "encoder.tflite",
        round_files / "round.probe",
        digits_root / "devices" / "printed" / "local",
        tmp_path,
        python=python,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    probe = subprocess.run(
        [python, "-c", "import tflite_runtime, numpy; print(numpy.__version__)"], capture_output=True, text=True
    )
    assert probe.returncode == 0 and probe.stdout.startswith("1.")
