"""The k-means engine where it hands Lloyd's loop to faiss, checked against scikit-learn and brute force."""

import importlib

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans as SklearnKMeans
from threadpoolctl import threadpool_limits

from lr2vq_analysis.kmeans import KMeansConfig, kmeans

pytest.importorskip("faiss")
kmeans_module = importlib.import_module("lr2vq_analysis.kmeans")  # the package exports the function `kmeans`

CAPPED = KMeansConfig(max_iter=25, tol=0.0)  # the quantize defaults: tol = 0 hands the loop to faiss


def points(n=16384, d=8, seed=0) -> np.ndarray:
    """Anisotropic Gaussian with n·d = 2^17 coordinates at the defaults: where "auto" hands over."""
    return (np.random.default_rng(seed).standard_normal((n, d)) * np.linspace(1.0, 0.2, d) + 3.0).astype(np.float32)


def brute_force_sqdist(x, centroids) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    c = np.asarray(centroids, dtype=np.float64)
    return (x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]


@pytest.fixture
def faiss_calls(monkeypatch):
    """Records each hand-over to faiss's Lloyd loop (so a test can tell which path ran)."""
    calls = []
    real = kmeans_module._faiss_lloyd

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(kmeans_module, "_faiss_lloyd", spy)
    return calls


def sklearn_fit(x, k, **kwargs):
    with threadpool_limits(1):
        return SklearnKMeans(k, n_init=1, **kwargs).fit(x)


def test_hand_over_follows_sklearns_lloyd_from_the_same_start(faiss_calls):
    x = points()
    init = x[np.random.default_rng(1).choice(len(x), 64, replace=False)]
    ours = kmeans(x, 64, init=init, config=KMeansConfig(max_iter=8, tol=0.0))
    reference = sklearn_fit(x.astype(np.float64), 64, init=init.astype(np.float64), max_iter=8, tol=0.0)
    assert len(faiss_calls) == 1
    assert ours.n_iter == reference.n_iter_ == 8
    assert ours.inertia == pytest.approx(reference.inertia_, rel=1e-4)
    np.testing.assert_allclose(ours.centroids.numpy(), reference.cluster_centers_, atol=2e-3)


def test_hand_over_distortion_within_one_percent_of_sklearn_over_five_seeds(faiss_calls):
    x = points(seed=2)
    ours = [kmeans(x, 64, seed=s, config=CAPPED).inertia for s in range(5)]
    theirs = [sklearn_fit(x, 64, init="k-means++", max_iter=25, tol=0.0, random_state=s).inertia_ for s in range(5)]
    assert len(faiss_calls) == 5
    assert np.mean(ours) / np.mean(theirs) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("max_points_per_centroid", [None, 256])
def test_hand_over_keeps_the_result_contract(faiss_calls, max_points_per_centroid):
    x = points(n=40000, d=4, seed=3)
    result = kmeans(x, 128, seed=0, config=CAPPED, max_points_per_centroid=max_points_per_centroid)
    assert len(faiss_calls) == 1
    n_train = 40000 if max_points_per_centroid is None else 128 * 256
    assert faiss_calls[0] == (n_train, 4) and result.n_train == n_train
    # Labels over all n points are the brute-force nearest centroid; inertia is their exact distance.
    dist = brute_force_sqdist(x, result.centroids.numpy())
    labels = result.labels.numpy()
    assert result.labels.dtype == torch.int64 and labels.shape == (40000,)
    chosen = dist[np.arange(len(x)), labels]
    assert np.all(chosen <= dist.min(1) + 1e-4 * (1 + dist.min(1)))
    assert result.inertia == pytest.approx(chosen.sum(), rel=1e-5)
    assert isinstance(result.inertia, float) and isinstance(result.train_inertia, float)
    if max_points_per_centroid is None:
        assert result.train_inertia == result.inertia
    else:
        assert result.train_inertia < result.inertia
    # Objective: one value per iteration, non-increasing (to float32 rounding); the final
    # centroids do at least as well on the training points as the last assignment.
    assert 1 <= result.n_iter == len(result.objective) <= 25
    assert np.all(np.diff(result.objective) <= 1e-6 * result.objective[0])
    assert result.train_inertia <= result.objective[-1] * (1 + 1e-5)


def test_hand_over_stops_when_the_labels_repeat(faiss_calls):
    x = points(n=33000, d=4, seed=4)
    result = kmeans(x, 40, seed=0, config=KMeansConfig(max_iter=300, tol=0.0))
    assert len(faiss_calls) == 1 and result.n_iter < 300
    # A fixed point of Lloyd: every centroid is the mean of its points (computed here in float64).
    labels = result.labels.numpy()
    means = np.stack([x[labels == c].astype(np.float64).mean(0) for c in range(40)])
    np.testing.assert_allclose(result.centroids.numpy(), means, atol=1e-4)


def test_same_seed_same_result_other_seed_differs(faiss_calls):
    x = points(seed=5)
    a, b, c = (kmeans(x, 64, seed=s, config=CAPPED) for s in (3, 3, 4))
    assert len(faiss_calls) == 3
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.labels, b.labels)
    assert a.inertia == b.inertia and a.objective == b.objective
    assert not torch.equal(a.centroids, c.centroids)


def test_no_hand_over_with_a_tolerance_small_inputs_or_backend_torch(faiss_calls):
    kmeans(points(), 64, seed=0, config=KMeansConfig(max_iter=5))  # tol > 0: our loop
    kmeans(points(n=8000), 64, seed=0, config=CAPPED)  # n·d below faiss's fast search
    kmeans(points(d=4, n=40000), 16, seed=0, config=CAPPED)  # k <= 32 and d < 8: the packed kernel
    kmeans(points(), 64, seed=0, config=KMeansConfig(max_iter=25, tol=0.0, backend="torch"))
    assert faiss_calls == []
    kmeans(points(), 16, seed=0, config=CAPPED)  # k <= 32 but d >= 8: faiss's loop
    kmeans(points(n=2000), 64, seed=0, config=KMeansConfig(max_iter=5, tol=0.0, backend="faiss"))
    assert len(faiss_calls) == 2


def test_backend_torch_and_auto_without_faiss_give_the_same_result(monkeypatch):
    x = points(seed=6)
    config = KMeansConfig(max_iter=10, tol=0.0, backend="torch")
    with_faiss = kmeans(x, 64, seed=1, config=config)
    monkeypatch.setattr(kmeans_module, "_faiss", False)  # faiss "not importable"
    without = kmeans(x, 64, seed=1, config=config)
    auto_without = kmeans(x, 64, seed=1, config=KMeansConfig(max_iter=10, tol=0.0))
    assert torch.equal(with_faiss.centroids, without.centroids) and with_faiss.objective == without.objective
    assert torch.equal(auto_without.centroids, without.centroids)
