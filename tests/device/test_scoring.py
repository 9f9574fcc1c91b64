"""Coverage counts: correct votes, the radius, and the sensitivity the privacy proof relies on."""

from __future__ import annotations

import numpy as np
import pytest

from device_sdk.errors import MismatchError
from device_sdk.scoring import coverage_counts


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_counts_match_brute_force_nearest_centroid():
    rng = np.random.default_rng(0)
    f, c = _unit(rng.normal(size=(500, 8))), _unit(rng.normal(size=(12, 8)))
    expected = np.bincount(np.argmax(f @ c.T, axis=1), minlength=12)
    np.testing.assert_array_equal(coverage_counts(f, c, chunk=64), expected)
    assert coverage_counts(f, c).sum() == 500


def test_max_distance_drops_far_samples():
    c = np.eye(3, dtype=np.float32)
    f = _unit(np.array([[1, 0.01, 0], [1, 1, 0], [0, 0, 1]], np.float32))
    np.testing.assert_array_equal(coverage_counts(f, c), [2, 0, 1])
    np.testing.assert_array_equal(coverage_counts(f, c, max_distance=0.1), [1, 0, 1])


def test_adding_or_removing_one_sample_changes_one_count_by_one():
    """L2 sensitivity 1 under add/remove, whatever the data and K."""
    rng = np.random.default_rng(1)
    c = _unit(rng.normal(size=(32, 16)))
    for _ in range(20):
        f = _unit(rng.normal(size=(int(rng.integers(2, 60)), 16)))
        drop = int(rng.integers(len(f)))
        diff = coverage_counts(f, c) - coverage_counts(np.delete(f, drop, axis=0), c)
        assert np.abs(diff).sum() == 1 and np.linalg.norm(diff) == 1.0


def test_dimension_mismatch_is_typed():
    with pytest.raises(MismatchError):
        coverage_counts(np.ones((3, 4)), np.ones((2, 5)))
