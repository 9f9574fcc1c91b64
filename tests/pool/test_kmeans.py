"""Spherical k-means: recovery of known clusters, invariants, determinism, validation."""

from __future__ import annotations

import numpy as np
import pytest

from cloud.pool import clustering as kmeans
from cloud.pool.clustering import spherical_kmeans
from device_sdk.errors import UsageError


def unit_rows(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def labelled_blobs(n_blobs: int = 8, per_blob: int = 250, dim: int = 16, spread: float = 0.02, seed: int = 0):
    """Points around ``n_blobs`` random directions on the unit sphere, with their blob labels."""
    rng = np.random.default_rng(seed)
    centers = unit_rows(rng.standard_normal((n_blobs, dim)))
    labels = np.repeat(np.arange(n_blobs), per_blob)
    return unit_rows(centers[labels] + spread * rng.standard_normal((len(labels), dim))), labels


def test_recovers_well_separated_blobs():
    x, labels = labelled_blobs()
    result = spherical_kmeans(x, k=8, seed=1)
    contingency = np.zeros((8, 8), dtype=int)
    np.add.at(contingency, (result.assign, labels), 1)
    # every cluster is one blob and every blob one cluster
    assert (contingency > 0).sum(axis=0).tolist() == [1] * 8
    assert (contingency > 0).sum(axis=1).tolist() == [1] * 8
    assert result.mean_cosine > 0.95


def test_result_invariants():
    x, _ = labelled_blobs(n_blobs=5, per_blob=300, spread=0.3)
    result = spherical_kmeans(x, k=7, iters=15)
    assert result.centroids.shape == (7, x.shape[1]) and result.centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, atol=1e-5)
    assert result.assign.dtype == np.int32 and result.sizes.dtype == np.int64
    assert result.sizes.sum() == len(x)
    np.testing.assert_array_equal(result.sizes, np.bincount(result.assign, minlength=7))
    # the assignment is the nearest-centroid one for the returned centroids, as on a device,
    # although the later rounds re-score only the points whose bounds allow a change
    np.testing.assert_array_equal(result.assign, (x @ result.centroids.T).argmax(axis=1))
    own = np.einsum("ij,ij->i", x, result.centroids[result.assign])
    assert result.mean_cosine == pytest.approx(own.mean(), abs=1e-6)
    assert 1 <= result.iterations <= 15


def test_deterministic_for_a_seed():
    x, _ = labelled_blobs(spread=0.4)
    first, second = spherical_kmeans(x, k=6, seed=3), spherical_kmeans(x, k=6, seed=3)
    np.testing.assert_array_equal(first.centroids, second.centroids)
    np.testing.assert_array_equal(first.assign, second.assign)


def test_stops_early_and_reports_progress():
    x, _ = labelled_blobs()
    calls = []
    result = spherical_kmeans(x, k=8, iters=50, progress=lambda *args: calls.append(args))
    assert result.converged and result.iterations < 50
    assert [c[0] for c in calls] == list(range(1, result.iterations + 1))
    assert calls[-1][2] == 0.0 and all(c[1] == 50 for c in calls)


def test_seeding_on_a_subsample_still_finds_the_blobs():
    x, labels = labelled_blobs(per_blob=500)
    result = spherical_kmeans(x, k=8, init_sample=200, seed=2)
    assert len(set(zip(result.assign.tolist(), labels.tolist()))) == 8


def test_empty_cluster_is_reseeded_with_the_farthest_point():
    x = unit_rows(np.eye(4) + 0.01)
    sums = np.zeros((3, 4))
    sums[0], sums[1] = x[0] + x[1], x[2] + x[3]
    cosine = np.array([0.99, 0.98, 0.5, 0.97], dtype=np.float32)
    centroids = kmeans._centroids(sums, np.array([2, 2, 0]), x, cosine)
    np.testing.assert_array_equal(centroids[2], x[2])
    np.testing.assert_allclose(centroids[0], unit_rows(sums[:1])[0], rtol=1e-6)


def test_more_clusters_than_distinct_points_does_not_fail():
    x = np.repeat(unit_rows(np.eye(3, 8)), 10, axis=0)
    result = spherical_kmeans(x, k=5, iters=3)
    assert result.sizes.sum() == 30 and np.isfinite(result.centroids).all()
    np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, atol=1e-5)
    assert (result.sizes > 0).sum() == 3


def test_k_equal_to_n_gives_singletons():
    x, _ = labelled_blobs(n_blobs=3, per_blob=4, spread=0.5)
    assert spherical_kmeans(x, k=len(x)).sizes.tolist() == [1] * len(x)


@pytest.mark.parametrize(
    "features, k, kwargs, message",
    [
        (np.ones((4, 2), np.float32) / np.sqrt(2), 0, {}, "k must be"),
        (np.ones((4, 2), np.float32) / np.sqrt(2), 5, {}, "k must be"),
        (np.ones(4, np.float32), 1, {}, "2-D"),
        (np.zeros((0, 3), np.float32), 1, {}, "2-D"),
        (np.ones((4, 2), np.int64), 1, {}, "floating point"),
        (np.array([[1.0, 0.0], [np.nan, 0.0]], np.float32), 1, {}, "NaN"),
        (np.array([[1.0, 0.0], [3.0, 4.0]], np.float32), 1, {}, "unit L2 norm"),
        (np.ones((4, 2), np.float32) / np.sqrt(2), 2, {"iters": -1}, "iters"),
        (np.ones((4, 2), np.float32) / np.sqrt(2), 2, {"tol": 1.5}, "tol"),
    ],
)
def test_rejects_bad_input_with_a_usage_error(features, k, kwargs, message):
    with pytest.raises(UsageError, match=message):
        spherical_kmeans(features, k, **kwargs)
