"""Tests of the measured clustering error (probes) against scikit-learn k-means and brute-force projections."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans as SklearnKMeans
from threadpoolctl import threadpool_limits

from lr2vq_analysis._validation import InvalidParameterError, InvalidWeightsError
from lr2vq_analysis.probes import clustering_error, clustering_error_curve, run_probe
from lr2vq_analysis.spectrum import compute_spectrum


@pytest.fixture(scope="module")
def weight() -> np.ndarray:
    rng = np.random.default_rng(0)
    scales = np.sqrt(0.6 ** np.arange(9))
    return (rng.laplace(size=(96, 8, 9)) * scales).reshape(96, 8, 3, 3)  # 768 subvectors of size 9


def principal_coordinates(x: np.ndarray, d: int) -> np.ndarray:
    """Brute force: top-d right singular vectors of the uncentred subvector matrix."""
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:d].T


def test_curve_matches_sklearn_kmeans(weight: np.ndarray) -> None:
    x = weight.reshape(-1, 9)
    energy = float(np.sum(x * x))
    seeds = (0, 1, 2)
    ours = np.mean([clustering_error_curve(weight, k=16, m=9, d_tilde=[2, 5, 9], seed=s) for s in seeds], axis=0)
    for value, d in zip(ours, (2, 5, 9), strict=True):
        z = principal_coordinates(x, d)
        with threadpool_limits(1):
            inertia = [SklearnKMeans(16, n_init=1, random_state=s).fit(z).inertia_ for s in seeds]
        assert value == pytest.approx(float(np.mean(inertia)) / energy, rel=0.03)


def test_curve_default_is_every_d_tilde_and_grows(weight: np.ndarray) -> None:
    curve = clustering_error_curve(weight, k=16, m=9)
    assert curve.shape == (9,)
    assert curve[0] < curve[4] < curve[8] < 1
    # Order of a requested list is kept; an int and a generator are accepted.
    np.testing.assert_array_equal(clustering_error_curve(weight, k=16, m=9, d_tilde=[9, 1]), curve[[8, 0]])
    np.testing.assert_array_equal(clustering_error_curve(weight, k=16, m=9, d_tilde=3), curve[[2]])
    np.testing.assert_array_equal(clustering_error_curve(weight, k=16, m=9, d_tilde=(d for d in (2,))), curve[[1]])


def test_clustering_error_is_relative_kmeans_inertia(weight: np.ndarray) -> None:
    x = weight.reshape(-1, 9)
    spectrum = compute_spectrum(x)
    value = clustering_error(spectrum, x, k=16, d_tilde=4, seed=3)
    assert value == clustering_error_curve(weight, k=16, m=9, d_tilde=[4], seed=3)[0]
    # One centroid per point would give 0; two centroids cannot beat the energy outside the mean.
    z = principal_coordinates(x, 4)
    assert 0 < value < float(np.sum((z - z.mean(0)) ** 2)) / float(np.sum(x * x))


def test_subsampled_probe_reports_train_and_heldout(weight: np.ndarray) -> None:
    x = weight.reshape(-1, 9)
    spectrum = compute_spectrum(x)
    probe = run_probe(spectrum, x, k=16, d_tilde=5, seed=0, max_points_per_centroid=20)
    assert probe.subsampled and probe.n_train == 320 and probe.points_per_centroid == 20
    # error on all subvectors = the train and held-out parts, weighted by their counts
    n, t = probe.n_subvectors, probe.n_train
    assert probe.error == pytest.approx((probe.train_error * t + probe.heldout_error * (n - t)) / n)
    assert probe.train_error < probe.heldout_error  # k-means fits its own training points better
    full = run_probe(spectrum, x, k=16, d_tilde=5, seed=0)
    assert not full.subsampled and full.error == full.train_error == full.heldout_error


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"k": 1}, InvalidParameterError, "k=1"),
    ({"k": 768}, InvalidParameterError, "k=768 is too large for 768 subvectors"),
    ({"d_tilde": [0]}, InvalidParameterError, r"d_tilde=.*1\.\.9"),
    ({"d_tilde": [10]}, InvalidParameterError, r"d_tilde=.*1\.\.9"),
    ({"m": 7}, InvalidParameterError, "m=7 does not divide the row length 72"),
    ({"max_points_per_centroid": 0}, InvalidParameterError, "max_points_per_centroid"),
    ({"seed": -2}, InvalidParameterError, "seed"),
])  # fmt: skip
def test_curve_rejects_bad_input(weight: np.ndarray, kwargs: dict, error: type, match: str) -> None:
    arguments = {"k": 16, "m": 9, **kwargs}
    with pytest.raises(error, match=match):
        clustering_error_curve(weight, name="conv", **arguments)


def test_curve_rejects_bad_weights(weight: np.ndarray) -> None:
    broken = weight.copy()
    broken[0, 0, 0, 0] = np.inf
    with pytest.raises(InvalidWeightsError, match="layer 'conv': weight holds 1 NaN/Inf"):
        clustering_error_curve(broken, k=16, m=9, name="conv")
    with pytest.raises(InvalidWeightsError, match="rank 5"):
        clustering_error_curve(weight[None], k=16, m=9)


def test_probe_rejects_bad_d_tilde(weight: np.ndarray) -> None:
    x = weight.reshape(-1, 9)
    with pytest.raises(InvalidParameterError, match=r"d_tilde=10"):
        run_probe(compute_spectrum(x), x, k=16, d_tilde=10)


def test_sampled_heldout_estimate_matches_assigning_every_subvector() -> None:
    # 24576 subvectors, k = 16 at 16 per centroid: 24320 held out. Sampling 2048 of them (the 1024 largest
    # exactly) must estimate what assigning all of them measures; a far outlier must never be missed.
    rng = np.random.default_rng(1)
    x = rng.laplace(size=(24576, 6)) * np.sqrt(0.7 ** np.arange(6))
    x[777] *= 40.0
    spectrum = compute_spectrum(x)
    for d in (2, 5):
        exact = run_probe(spectrum, x, k=16, d_tilde=d, seed=3, max_points_per_centroid=16, max_heldout=None)
        sampled = run_probe(spectrum, x, k=16, d_tilde=d, seed=3, max_points_per_centroid=16, max_heldout=2048)
        assert sampled.train_error == exact.train_error  # the same training subsample and k-means
        assert sampled.heldout_capped_error == pytest.approx(exact.heldout_capped_error, rel=0.03)
        assert sampled.error == pytest.approx(exact.error, rel=0.03)
        assert exact.n_isolated >= 1 and sampled.n_isolated >= 1  # the outlier sits among the largest rows
        assert sampled.isolated_error == pytest.approx(exact.isolated_error, rel=0.1)
    with pytest.raises(InvalidParameterError, match="max_heldout"):
        run_probe(spectrum, x, k=16, d_tilde=2, max_points_per_centroid=16, max_heldout=1)
