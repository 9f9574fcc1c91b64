"""The accounting of benchmarks/vs_fedavg.py: MACs, Flower's serialized bytes, wire bytes, DP noise."""

import io
import math
import socket
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from benchmarks.vs_fedavg import (  # noqa: E402
    CountingProxy,
    fedavg_device_macs,
    flower_bytes,
    forward_macs,
    localdp_sigma,
    train_macs,
)


def test_conv_and_linear_macs_by_hand():
    assert forward_macs(nn.Conv2d(3, 16, 3, padding=1), (3, 32, 32)) == 16 * 32 * 32 * 3 * 3 * 3
    # stride 2 halves each side; groups divide the input channels each output sees
    assert forward_macs(nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4), (8, 32, 32)) == 16 * 16 * 16 * 2 * 9
    assert forward_macs(nn.Linear(1024, 10), (1024,)) == 10240
    # pooling, batch norm and activations are not counted; layers add up
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 16 * 16, 5)
    )
    assert forward_macs(model, (3, 32, 32)) == 4 * 32 * 32 * 3 + 4 * 16 * 16 * 5


def test_benchmark_student_macs():
    from benchmarks.classifier import small_cnn

    by_hand = 16 * 32 * 32 * 3 * 9 + 32 * 16 * 16 * 16 * 9 + 64 * 8 * 8 * 32 * 9 + 1024 * 10
    assert forward_macs(small_cnn(10), (3, 32, 32)) == by_hand


def test_training_and_client_macs():
    assert train_macs(1000, 300, 2) == 3 * 1000 * 300 * 2
    client = {"samples": 300, "local_epochs": 1, "fit_rounds": 4, "eval_rounds": 5}
    assert fedavg_device_macs(1000, client, test_images=50) == 3 * 1000 * 300 * 4 + 1000 * 50 * 5


def test_flower_bytes_are_np_save_bytes():
    pytest.importorskip("flwr")
    arrays = [np.zeros(10, np.float32), np.ones((3, 4, 5), np.float64)]

    def saved(a):
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        return len(buf.getvalue())

    assert flower_bytes(arrays) == saved(arrays[0]) + saved(arrays[1])
    assert flower_bytes(arrays) > sum(a.nbytes for a in arrays)  # a header per array
    assert flower_bytes([np.zeros(1000, np.float32)]) - flower_bytes([np.zeros(10, np.float32)]) == 990 * 4


def test_localdp_sigma_is_the_gaussian_mechanism():
    assert localdp_sigma(1.0, 0.5, 1e-5) == pytest.approx(math.sqrt(2 * math.log(1.25e5)) / 0.5)
    assert localdp_sigma(2.0, 0.058, 1e-5) == pytest.approx(2 * localdp_sigma(1.0, 0.058, 1e-5))


def test_counting_proxy_counts_each_way():
    echo = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = echo.accept()
        with conn:
            data = conn.recv(65536)
            while len(data) < 1000:
                data += conn.recv(65536)
            conn.sendall(data[:600])

    threading.Thread(target=serve, daemon=True).start()
    proxy = CountingProxy(echo.getsockname())
    try:
        with socket.create_connection(("127.0.0.1", proxy.port)) as c:
            c.sendall(b"x" * 1000)
            got = b""
            while len(got) < 600:
                got += c.recv(65536)
        for _ in range(50):
            if proxy.up == 1000 and proxy.down == 600:
                break
            time.sleep(0.05)
        assert (proxy.up, proxy.down, proxy.connections) == (1000, 600, 1)
    finally:
        proxy.close()
        echo.close()


def test_wheel_sizes_and_closure(tmp_path):
    import zipfile

    from benchmarks.vs_fedavg import closure_size, wheel_sizes

    wheel = tmp_path / "x-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x/a.bin", b"\0" * 5000)
        z.writestr("x/b.txt", b"hello")
        meta = b"Name: x\nRequires-Dist: numpy\nRequires-Dist: nvidia-cudnn-cu13==9; platform_system == 'Linux'\n"
        z.writestr("x-1.0.dist-info/METADATA", meta)
    sizes = wheel_sizes(str(wheel))
    assert sizes == {
        "wheel_bytes": wheel.stat().st_size,
        "unpacked_bytes": 5005 + len(meta),
        "cuda_requirements": ["nvidia-cudnn-cu13==9; platform_system == 'Linux'"],
    }
    assert sizes["wheel_bytes"] < sizes["unpacked_bytes"]  # compressed
    numpy_only = closure_size(["numpy"])
    assert numpy_only["packages"]["numpy"] == numpy_only["bytes"] > 1_000_000  # numpy requires nothing
    assert closure_size(["no-such-distribution-xyz"])["bytes"] == 0
