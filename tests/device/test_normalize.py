"""``normalize`` (uint8 NHWC -> float32 NCHW) gives exactly the bits of the per-pixel float32 arithmetic.

It works in place, in cache-sized blocks of images, for speed (benchmarks/bench_device_speed.py);
features, hence scores, must not move by a single bit because of it.
"""

import numpy as np
import pytest

from device_sdk.errors import InputError
from device_sdk.preprocess import normalize


def reference(images, mean, std):
    x = images.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


@pytest.mark.parametrize(
    "channels,mean,std",
    [
        (3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
        (3, (0.22731331699359048, 0.23069665713519533, 0.21897012867660962), (0.2764775, 0.2748877, 0.2702122)),
        (3, (0.485,), (0.229,)),  # one value for every channel
        (1, (0.1307,), (0.3081,)),
    ],
)
def test_bitwise_equal_to_per_pixel_arithmetic(channels, mean, std):
    rng = np.random.default_rng(channels)
    images = rng.integers(0, 256, size=(5, 7, 9, channels), dtype=np.uint8)
    images[0, 0, :, 0] = [0, 1, 127, 128, 200, 254, 255, 3, 4]  # the ends of the range
    got = normalize(images, mean, std)
    want = reference(images, mean, std)
    assert got.dtype == np.float32 and got.shape == (5, channels, 7, 9) and got.flags["C_CONTIGUOUS"]
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_every_value_of_every_channel():
    images = np.stack([np.arange(256, dtype=np.uint8)] * 3, axis=-1).reshape(1, 16, 16, 3)
    mean, std = (0.1, 0.6, 0.9), (0.3, 0.05, 1.7)
    assert np.array_equal(normalize(images, mean, std), reference(images, mean, std))


def test_float_input_and_bad_stats():
    images = np.random.default_rng(0).random((2, 4, 4, 3)).astype(np.float32) * 255
    assert np.array_equal(normalize(images, (0.5,) * 3, (0.25,) * 3), reference(images, (0.5,) * 3, (0.25,) * 3))
    with pytest.raises(InputError, match="need 1 or 3"):  # two values for three channels: a typed refusal
        normalize(np.zeros((1, 2, 2, 3), np.uint8), (0.5, 0.5), (0.25, 0.25))
    with pytest.raises(ValueError):
        reference(np.zeros((1, 2, 2, 3), np.uint8), (0.5, 0.5), (0.25, 0.25))


@pytest.mark.parametrize("n,size", [(100, 32), (3, 224), (1, 8)])
def test_blocks_cover_the_batch(n, size):
    """Batches larger than one block (32 px: 42 images a block; 224 px: one image) are done whole."""
    rng = np.random.default_rng(n)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    assert np.array_equal(normalize(images, mean, std), reference(images, mean, std))
