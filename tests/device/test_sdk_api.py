"""The SDK as an app uses it: only the public API of docs/sdk.md on the device side.

A real Mosquitto (127.0.0.1:1883, or a private one), a real encoder, a signed probe answered from
a FrameBuffer the app fills (the configured folder does not exist: the frames are all the agent
has), typed events, a classifier delivered and installed, ``predict`` and ``model_info``, ``stop``.
The cloud's side of the wire is played with the cloud's own code (signing key, ArtifactSender).
Also: the committed docs/sdk-reference.md is what scripts/gen-sdk-reference.py writes now.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from broker import CloudClient, requires_broker, shared_broker, unique_id, wait_until  # noqa: F401  (fixture)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from PIL import Image

from device_sdk import DeviceAgent, EventKind, FrameBuffer, load_device_config  # the public API
from device_sdk.errors import ArtifactError

ROOT = Path(__file__).resolve().parents[2]


def test_sdk_reference_is_up_to_date():
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen-sdk-reference.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_frame_buffer_is_a_bounded_thread_safe_ring():
    from device_sdk.errors import InputError

    buf = FrameBuffer(capacity=50)
    frame = np.zeros((24, 40, 3), np.uint8)

    def writer(value):
        for _ in range(200):
            buf.append(frame + value)

    threads = [threading.Thread(target=writer, args=(v,)) for v in range(4)]
    keys = {buf.key()}
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    keys.add(buf.key())
    assert len(buf) == 50 and len(keys) == 2
    frame[:] = 99  # the buffer holds copies
    assert all(int(f.max()) < 99 for f in buf.snapshot())
    with pytest.raises(InputError):
        buf.append(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(InputError):
        FrameBuffer(0)


def test_frames_and_files_of_one_picture_give_the_same_input(encoder_path, digits_root, tmp_path):
    from device_sdk.datasource import FolderSource
    from device_sdk.runtime import load_model

    spec = load_model(str(encoder_path)).meta.preprocessing()
    files = sorted((digits_root / "devices" / "lcd" / "local").rglob("*.png"))[:5]
    big = tmp_path / "big"
    big.mkdir()
    frames = []
    for i, f in enumerate(files):  # the app's frames are larger than the model input: fitted the same way
        array = np.asarray(Image.open(f).convert("RGB").resize((96, 80)))
        frames.append(array)
        Image.fromarray(array).save(big / f"{i}.png")
    buf = FrameBuffer(8)
    buf.extend(frames)
    from_frames = np.concatenate(list(buf.batches(spec, 4)))
    from_files = np.concatenate(list(FolderSource(big).batches(spec, 4)))
    assert from_frames.shape == (5,) + spec.size + (3,)
    np.testing.assert_array_equal(from_frames, from_files)


def test_a_folder_source_skips_unreadable_files(tmp_path, caplog):
    from device_sdk.datasource import FolderSource, encode_source
    from device_sdk.preprocess import Preprocess

    spec = Preprocess(size=(16, 16))
    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "half.png").write_bytes((tmp_path / "0.png").read_bytes()[:30])  # e.g. still being written
    (tmp_path / "empty.jpg").write_bytes(b"")
    with caplog.at_level("WARNING"):
        batches = list(FolderSource(tmp_path).batches(spec, 2))
    assert sorted(int(image[0, 0, 0]) for batch in batches for image in batch) == [0, 40, 80]
    assert "2 unreadable image(s) skipped" in caplog.text and "half.png" in caplog.text

    class Identity:
        class meta:
            feature_dim = 3

            @staticmethod
            def preprocessing():
                return spec

        @staticmethod
        def run(images):
            return images[:, 0, 0, :].astype(np.float32)

    (tmp_path / "link.png").symlink_to(tmp_path / "later.png")  # a broken link: no stat, yet a key
    key = FolderSource(tmp_path).key()
    (tmp_path / "later.png").write_bytes((tmp_path / "0.png").read_bytes())
    assert FolderSource(tmp_path).key() != key  # the link now points at a file: features are computed again
    for f in ("0.png", "1.png", "2.png", "later.png"):
        (tmp_path / f).unlink()
    assert encode_source(Identity, FolderSource(tmp_path)).shape == (0, 3)  # the agent: "no local images"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A small classifier (untrained weights: the test is about the API, not accuracy) exported to ONNX."""
    import torch

    from cloud.export.formats import export_onnx
    from device_sdk.runtime.artifact import ArtifactMeta
    from models.registry import get_model

    torch.manual_seed(0)
    model = get_model("small_cnn", num_classes=10).eval()
    meta = ArtifactMeta(
        kind="classifier",
        arch="small_cnn",
        input_shape=(3, 32, 32),
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        labels=[str(d) for d in range(10)],
    )
    path = tmp_path_factory.mktemp("clf") / "student.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, meta, str(path), output_name="logits")
    return path


def test_predict_on_a_folder_skips_unreadable_files(classifier, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 30, 3), 60 * i, np.uint8)).save(folder / f"{i}.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    tool = Path(sys.executable).parent / "ecos-device"
    done = subprocess.run(
        [str(tool), "predict", str(classifier), "--folder", str(folder)], capture_output=True, text=True
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stdout.strip().splitlines()) == 3 and "2 unreadable image(s) skipped" in done.stderr
    one = subprocess.run(
        [str(tool), "predict", str(classifier), str(folder / "empty.jpg")], capture_output=True, text=True
    )
    assert one.returncode == 3 and "error[input]: " in one.stderr  # a file asked for by name stays an error


def test_file_names_that_are_not_utf8_are_printed_as_their_bytes(classifier, tmp_path):
    """A UTF-8 terminal (stdout strict, as under en_US.UTF-8) and a Latin-1 file name: printed, no traceback."""
    import os

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.full((40, 30, 3), 80, np.uint8)).save(os.fsencode(folder) + b"/caf\xe9.jpg")
    tool = Path(sys.executable).parent / "ecos-device"
    done = subprocess.run(
        [str(tool), "predict", str(classifier), "--folder", str(folder)],
        capture_output=True,
        env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"},
    )
    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr
    assert done.stdout.startswith(os.fsencode(folder) + b"/caf\xe9.jpg\t")


def _config(tmp_path: Path, device_id: str, broker, encoder_path, public_hex: str) -> str:
    (tmp_path / "cloud.pub").write_text(public_hex)
    path = tmp_path / "device.toml"
    path.write_text(
        f'device_id = "{device_id}"\n[broker]\nhost = "{broker.host}"\nport = {broker.port}\n'
        f'[privacy]\nledger = "state/ledger.json"\nepsilon_per_probe = 0.5\n'
        f'[data]\nlocal = "no-such-folder"\n'  # the frames are all the agent has
        f'[models]\nstore = "state/models"\ncloud_public_key = "cloud.pub"\nencoder = "{encoder_path}"\n'
    )
    return str(path)


@requires_broker
def test_agent_through_the_public_api(shared_broker, tmp_path, encoder_path, pool_index, digits_root, classifier):  # noqa: F811
    from cloud.security.keys import SigningKey
    from cloud.serve.delivery import ArtifactSender, build_manifest
    from device_sdk.protocol import Ack, Installed, inbox
    from device_sdk.protocol.round import Scores

    key = SigningKey(Ed25519PrivateKey.generate())
    device_id = unique_id("sdk")
    public = key.public.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    config = load_device_config(_config(tmp_path, device_id, shared_broker, encoder_path, public))

    # ---- the app: frames it already holds, an event callback, start --------------------------------
    frames = FrameBuffer(capacity=64)
    pngs = sorted((digits_root / "devices" / "street" / "local").rglob("*.png"))
    frames.extend(np.asarray(Image.open(p).convert("RGB")) for p in pngs)
    events = []
    agent = DeviceAgent(config, on_event=events.append, data_source=frames).start()
    try:
        assert agent.wait_connected(10)
        with pytest.raises(ArtifactError, match="no classifier"):
            agent.predict(np.zeros((1, 32, 32, 3), np.uint8))
        info = agent.model_info()
        assert info["classifier"] is None and info["encoder"].runtime == "onnxruntime"
        assert info["encoder"].version is None  # configured, not delivered

        with CloudClient(shared_broker, [device_id]) as cloud:
            # ---- a signed probe: answered from the frames --------------------------------------------------
            index, _ = pool_index
            cloud.transport.publish(inbox(device_id), index.probe().to_bytes(signer=key), qos=1)
            scores = cloud.next(30, kind=Scores)
            assert scores.k == index.k and scores.sigma > 0
            # every frame votes once: the noisy total is len(frames) within 6 sigma of the summed noise
            assert abs(scores.scores.sum() - len(frames)) < 6 * scores.sigma * np.sqrt(scores.k)
            # the event follows the publish: wait for it
            answered = wait_until(lambda: [e for e in events if e.kind == EventKind.PROBE_ANSWERED], 10)
            assert answered and answered[0].detail["charged_epsilon"] > 0

            # ---- a classifier delivered over the same broker, then predict ----------------------------------
            manifest = build_manifest(classifier, key, name="student", version=1, targets=[device_id])
            sender = ArtifactSender(cloud.transport, device_id, classifier, manifest, timeout=5)
            sender.start()
            deadline = time.monotonic() + 60
            while not sender.done and time.monotonic() < deadline:
                msg = cloud.next(30)
                if isinstance(msg, Ack):
                    sender.on_ack(msg)
                elif isinstance(msg, Installed):
                    sender.on_result(msg)
            assert sender.outcome == "installed"
        assert wait_until(lambda: any(e.kind == EventKind.INSTALLED for e in events), 10), [e.kind for e in events]
        batch = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in pngs[:6]])
        labels = agent.predict(batch)
        assert len(labels) == 6 and set(labels) <= {str(d) for d in range(10)}
        info = agent.model_info()["classifier"]
        assert info.version == 1 and info.name == "student" and info.labels == [str(d) for d in range(10)]
    finally:
        agent.stop()
    assert agent.stats.messages_out >= 2 and not agent.transport.connected
