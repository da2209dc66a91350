"""The k-means engine, checked against scikit-learn's KMeans and brute-force numpy distances."""

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans as SklearnKMeans
from sklearn.cluster import kmeans_plusplus
from sklearn.datasets import make_blobs
from threadpoolctl import threadpool_limits

from lr2vq_analysis._threads import single_threaded
from lr2vq_analysis._validation import InvalidParameterError, InvalidWeightsError
from lr2vq_analysis.exceptions import NotFittedError
from lr2vq_analysis.kmeans import (
    QUANTIZE_KMEANS,
    KMeans,
    KMeansConfig,
    KMeansResult,
    _faiss_module,
    _kmeans_plusplus,
    _lloyd,
    _PointSet,
    _start_sample,
    assign,
    kmeans,
)

SEEDS = range(5)


def brute_force_sqdist(x, centroids) -> np.ndarray:
    """(n × k) squared distances in float64, from differences."""
    x = np.asarray(x, dtype=np.float64)
    c = np.asarray(centroids, dtype=np.float64)
    return ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)


def assert_labels_are_nearest(x, centroids, labels, rtol=1e-5):
    """Each label's distance equals the smallest distance, up to float32 rounding of the GEMM."""
    dist = brute_force_sqdist(x, centroids)
    chosen = dist[np.arange(len(dist)), np.asarray(labels)]
    best = dist.min(1)
    scale = (np.asarray(x, dtype=np.float64) ** 2).sum(1) + (np.asarray(centroids, dtype=np.float64) ** 2).sum(1).max()
    assert np.all(chosen <= best + rtol * scale)


# Datasets on which k-means' outcome varies little from seed to seed (per-seed sd 0.4–1 % over 20 seeds),
# so that a 5-seed mean can be held to 1 %. Over 20 seeds the two engines agreed within 0.4 % on each.
def gaussian_blobs():
    return make_blobs(n_samples=3000, n_features=4, centers=8, random_state=0)[0], 32


def anisotropic_gaussian():
    return np.random.default_rng(1).standard_normal((3000, 4)) * np.array([2.0, 1.0, 0.5, 0.2]) + 5.0, 16


def conv_weight_subvectors():
    """Subvectors (m = 9: one 3×3 kernel each) of a randomly initialised Conv2d, smoothed along the kernel."""
    torch.manual_seed(0)
    w = torch.nn.Conv2d(48, 64, 3).weight.detach()
    w = w + 0.5 * w.roll(1, dims=3) + 0.25 * w.roll(1, dims=2)  # neighbouring taps correlate, as in trained convs
    return w.reshape(-1, 9).numpy().astype(np.float64), 64


def one_dimensional():
    return np.random.default_rng(2).gamma(3.0, size=(4000, 1)), 6


DATASETS = [gaussian_blobs, anisotropic_gaussian, conv_weight_subvectors, one_dimensional]


def sklearn_fit(x, k, **kwargs):
    with threadpool_limits(1):  # tiny fits: threads only add scheduling delays on a shared machine
        return SklearnKMeans(k, n_init=1, **kwargs).fit(x)


@pytest.mark.parametrize("dataset", DATASETS, ids=lambda f: f.__name__)
def test_distortion_matches_sklearn_within_one_percent_over_five_seeds(dataset):
    x, k = dataset()
    ours = [kmeans(torch.from_numpy(x), k, seed=s).inertia for s in SEEDS]
    theirs = [sklearn_fit(x, k, init="k-means++", random_state=s).inertia_ for s in SEEDS]
    assert np.mean(ours) / np.mean(theirs) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("dataset", DATASETS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("use_numpy", [True, False], ids=["numpy-cpu", "torch"])
def test_lloyd_from_the_same_start_follows_sklearn_exactly(dataset, use_numpy):
    # Same initial centres, float64: same iterations, labels and centres as scikit-learn's Lloyd,
    # including its tolerance rule and its re-seeding of the two clusters emptied by duplicate starts.
    x, k = dataset()
    rng = np.random.default_rng(3)
    init = x[rng.choice(len(x), k, replace=False)].copy()
    init[1], init[3] = init[0], init[2]
    reference = sklearn_fit(x, k, init=init, tol=1e-4)

    centred = x - x.mean(0)
    points = _PointSet(torch.from_numpy(centred), k, use_numpy=use_numpy)
    tol = 1e-4 * float(centred.var(0).mean())
    centres, labels, sqdist, n_iter, objective = _lloyd(points, torch.from_numpy(init - x.mean(0)), 300, tol)
    assert n_iter == reference.n_iter_ and len(objective) == n_iter
    np.testing.assert_array_equal(labels.numpy(), reference.labels_)
    np.testing.assert_allclose(centres.numpy() + x.mean(0), reference.cluster_centers_, rtol=1e-9, atol=1e-9)
    assert float(sqdist.sum()) == pytest.approx(reference.inertia_, rel=1e-9)


def test_same_seed_gives_identical_results_and_other_seeds_differ():
    x, k = anisotropic_gaussian()
    a, b = kmeans(x, k, seed=7), kmeans(x, k, seed=7)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.labels, b.labels)
    assert a.inertia == b.inertia and a.objective == b.objective
    others = [kmeans(x, k, seed=s) for s in (8, 9)]
    assert all(not torch.equal(a.centroids, o.centroids) for o in others)


@pytest.mark.parametrize(
    ("d", "k", "dtype"),
    [(1, 24, torch.float32), (5, 16, torch.float32), (5, 32, torch.float32), (5, 33, torch.float32),
     (9, 100, torch.float32), (3, 20, torch.float64)],
)  # fmt: skip
def test_labels_are_the_nearest_returned_centroid_and_inertia_is_their_distance(d, k, dtype):
    x = np.random.default_rng(d * k).normal(size=(3000, d)) * np.linspace(1.0, 0.3, d) + 2.0
    result = kmeans(torch.from_numpy(x), k, seed=1, max_iter=7, dtype=dtype)  # stopped early: the last update moved
    assert isinstance(result, KMeansResult)
    assert result.labels.dtype == torch.int64 and result.labels.shape == (3000,)
    assert result.centroids.shape == (k, d) and result.centroids.dtype == dtype
    assert result.n_iter == 7 and len(result.objective) == 7
    assert_labels_are_nearest(x, result.centroids.numpy(), result.labels)
    dist = brute_force_sqdist(x, result.centroids.numpy())
    exact = dist[np.arange(3000), result.labels.numpy()].sum()
    assert result.inertia == pytest.approx(exact, rel=1e-6)
    assert result.train_inertia == result.inertia and result.n_train == 3000
    # Lloyd never increases the objective; the final inertia is at most the last assignment's.
    assert np.all(np.diff(result.objective) <= 1e-6 * result.objective[0])
    assert result.inertia <= result.objective[-1] * (1 + 1e-6)


@pytest.mark.parametrize("k", [8, 40])
@pytest.mark.parametrize("use_numpy", [True, False], ids=["numpy-cpu", "torch"])
def test_both_backends_find_the_nearest_centroid_in_float32(k, use_numpy):
    rng = np.random.default_rng(k)
    x = rng.normal(size=(1500, 3)).astype(np.float32)
    centroids = x[rng.choice(1500, k, replace=False)] + np.float32(0.01)
    points = _PointSet(torch.from_numpy(x), k, chunk_size=256, use_numpy=use_numpy)
    labels, sqdist, total = points.nearest(torch.from_numpy(centroids))
    dist = brute_force_sqdist(x, centroids)
    np.testing.assert_array_equal(labels.numpy(), dist.argmin(1))
    np.testing.assert_allclose(sqdist.numpy(), dist.min(1), rtol=1e-4, atol=1e-5)
    assert total == pytest.approx(dist.min(1).sum(), rel=1e-5)


def test_converges_before_max_iter_and_stops_when_labels_repeat():
    x, k = gaussian_blobs()
    result = kmeans(x, k, seed=0, tol=0.0)
    assert result.n_iter < 300
    labels_again, _ = assign(torch.from_numpy(x).float(), result.centroids)
    np.testing.assert_array_equal(labels_again.numpy(), result.labels.numpy())


def test_subsampling_trains_on_k_times_max_points_and_reports_all_points():
    x = np.random.default_rng(4).normal(size=(20000, 3))
    result = kmeans(x, 8, seed=0, max_points_per_centroid=64)
    assert result.n_train == 8 * 64
    assert result.labels.shape == (20000,)
    assert_labels_are_nearest(x, result.centroids.numpy(), result.labels)
    dist = brute_force_sqdist(x, result.centroids.numpy())
    assert result.inertia == pytest.approx(dist[np.arange(20000), result.labels.numpy()].sum(), rel=1e-6)
    # train_inertia sums the same per-point distances over the 512 training points only.
    assert result.train_inertia < result.inertia
    assert result.train_inertia / 512 == pytest.approx(result.inertia / 20000, rel=0.25)
    again = kmeans(x, 8, seed=0, max_points_per_centroid=64)
    assert torch.equal(again.centroids, result.centroids)
    assert not torch.equal(kmeans(x, 8, seed=1, max_points_per_centroid=64).centroids, result.centroids)


def test_no_subsampling_when_n_is_within_the_cap():
    x = np.random.default_rng(5).normal(size=(1000, 2))
    capped = kmeans(x, 4, seed=0, max_points_per_centroid=250)
    assert capped.n_train == 1000 and capped.train_inertia == capped.inertia
    assert torch.equal(capped.centroids, kmeans(x, 4, seed=0).centroids)


@pytest.mark.parametrize("use_numpy", [True, False])
def test_kmeans_plusplus_picks_k_distinct_data_points(use_numpy):
    x = torch.from_numpy(np.random.default_rng(6).normal(size=(2000, 4)).astype(np.float32))
    centres = _kmeans_plusplus(x, 64, torch.Generator().manual_seed(0), use_numpy=use_numpy)
    rows = [(x == c).all(1).nonzero().flatten().tolist() for c in centres]
    assert all(len(r) == 1 for r in rows)
    assert len({r[0] for r in rows}) == 64


@pytest.mark.parametrize("use_numpy", [True, False])
def test_kmeans_plusplus_never_picks_a_duplicate_of_a_chosen_point(use_numpy):
    # 40 distinct integer points, each 10 times: a chosen point and its copies carry no probability mass,
    # so 40 centres must be the 40 distinct points.
    distinct = np.random.default_rng(7).choice(1000, size=(40, 2), replace=False).astype(np.float32)
    x = torch.from_numpy(np.repeat(distinct, 10, axis=0))
    for seed in range(3):
        centres = _kmeans_plusplus(x, 40, torch.Generator().manual_seed(seed), use_numpy=use_numpy)
        assert {tuple(c) for c in centres.tolist()} == {tuple(p) for p in distinct.tolist()}


def test_kmeans_plusplus_numpy_and_torch_paths_choose_the_same_points():
    # The CPU (numpy) loop and the torch loop (CUDA) consume the same draws: in float64 they must pick
    # the same centres in the same order.
    x = torch.from_numpy(np.random.default_rng(9).normal(size=(3000, 6)) * np.linspace(2.0, 0.5, 6))
    for seed in range(3):
        by_numpy = _kmeans_plusplus(x, 48, torch.Generator().manual_seed(seed), use_numpy=True)
        by_torch = _kmeans_plusplus(x, 48, torch.Generator().manual_seed(seed), use_numpy=False)
        assert torch.equal(by_numpy, by_torch)


def test_kmeans_plusplus_numpy_and_torch_paths_choose_the_same_points_with_weights():
    x = torch.from_numpy(np.random.default_rng(9).normal(size=(3000, 6)) * np.linspace(2.0, 0.5, 6))
    weights = torch.from_numpy(np.random.default_rng(10).uniform(0.5, 20.0, size=3000))
    for seed in range(3):
        by_numpy = _kmeans_plusplus(x, 48, torch.Generator().manual_seed(seed), weights=weights, use_numpy=True)
        by_torch = _kmeans_plusplus(x, 48, torch.Generator().manual_seed(seed), weights=weights, use_numpy=False)
        assert torch.equal(by_numpy, by_torch)


def _potential(x: np.ndarray, centres: np.ndarray, weights: np.ndarray) -> float:
    return float(brute_force_sqdist(x, centres).min(1) @ weights)


def test_weighted_kmeans_plusplus_is_the_start_on_the_repeated_points():
    # Integer weights: the weighted start must be distributed as the unweighted start on the points
    # repeated weight times, and as scikit-learn's weighted k-means++ (its potential, 40 seeds each).
    rng = np.random.default_rng(11)
    x = np.concatenate([rng.normal(size=(300, 2)), rng.normal(size=(20, 2)) * 0.3 + 8.0])
    counts = np.concatenate([np.ones(300, dtype=int), np.full(20, 15)])  # a small far group, weighted 15x
    weights = counts.astype(np.float64)
    repeated = np.repeat(x, counts, axis=0)
    seeds = range(40)
    ours = [
        _potential(
            x,
            _kmeans_plusplus(
                torch.from_numpy(x), 8, torch.Generator().manual_seed(s), weights=torch.from_numpy(weights)
            ).numpy(),
            weights,
        )
        for s in seeds
    ]
    on_repeated = [
        _potential(
            x, _kmeans_plusplus(torch.from_numpy(repeated), 8, torch.Generator().manual_seed(s)).numpy(), weights
        )
        for s in seeds
    ]
    theirs = [_potential(x, kmeans_plusplus(x, 8, sample_weight=weights, random_state=s)[0], weights) for s in seeds]
    unweighted = [
        _potential(x, _kmeans_plusplus(torch.from_numpy(x), 8, torch.Generator().manual_seed(s)).numpy(), weights)
        for s in seeds
    ]
    se = np.std(ours, ddof=1) / np.sqrt(len(ours))
    assert abs(np.mean(ours) - np.mean(on_repeated)) < 4 * np.hypot(se, np.std(on_repeated, ddof=1) / np.sqrt(40))
    assert abs(np.mean(ours) - np.mean(theirs)) < 4 * np.hypot(se, np.std(theirs, ddof=1) / np.sqrt(40))
    assert np.mean(ours) < np.mean(unweighted)  # the weights matter: ignoring them is worse for Σ w·D²


def test_tail_start_sample_keeps_the_farthest_points_and_counts_every_point_once():
    x = torch.from_numpy(np.random.default_rng(12).standard_t(3, size=(50_000, 4)))
    sample, weights = _start_sample(x, 4096, 0.25, torch.Generator().manual_seed(0))
    farthest = torch.topk((x**2).sum(1), 1024).indices
    assert torch.equal(sample[:1024], x[farthest])
    assert weights is not None and float(weights.sum()) == pytest.approx(50_000)
    assert torch.unique(sample, dim=0).shape[0] == 4096  # drawn without replacement, no tail point twice
    uniform, none = _start_sample(x, 4096, 0.0, torch.Generator().manual_seed(0))
    assert none is None and uniform.shape == (4096, 4)


def test_tail_start_finds_rare_outlier_rows_that_a_uniform_start_misses():
    # 0.2 % of the rows scaled 10-40x (outlier channels): a uniform 4096-point start of 60,000 points
    # rarely sees them; the tail start matches the start on every point.
    rng = np.random.default_rng(13)
    x = rng.normal(size=(60_000, 4)) * np.array([1.0, 0.7, 0.4, 0.2])
    rows = rng.choice(60_000, 120, replace=False)
    x[rows] *= rng.uniform(10, 40, size=(120, 1))
    x = x.astype(np.float32)
    base = KMeansConfig(max_iter=25, tol=0.0, backend="torch")

    def mean_inertia(**fields):
        return np.mean([kmeans(x, 32, seed=s, config=dataclasses.replace(base, **fields)).inertia for s in range(3)])

    every_point = mean_inertia(init_points_per_centroid=None)
    assert mean_inertia(init_tail_share=0.25) == pytest.approx(every_point, rel=0.03)
    assert mean_inertia(init_tail_share=0.0) > 1.1 * every_point


def test_duplicated_points_give_zero_distortion_and_full_clusters():
    centres = np.random.default_rng(8).normal(size=(8, 3)) * 10
    x = np.repeat(centres, 50, axis=0)
    result = kmeans(x, 8, seed=0)
    assert result.inertia == pytest.approx(0.0, abs=1e-6)
    assert np.bincount(result.labels.numpy(), minlength=8).tolist() == [50] * 8


def test_fewer_distinct_points_than_clusters_leaves_finite_centroids():
    x = np.repeat(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0]]), 20, axis=0)
    result = kmeans(x, 5, seed=0)
    assert torch.isfinite(result.centroids).all()
    assert result.inertia == pytest.approx(0.0, abs=1e-6)


def test_empty_clusters_from_a_duplicated_start_are_reseeded():
    x, k = gaussian_blobs()
    init = x[:k].copy()
    init[1:5] = init[0]  # four clusters empty at the first assignment
    result = kmeans(x, k, init=init)
    assert np.bincount(result.labels.numpy(), minlength=k).min() > 0
    assert len({tuple(c) for c in result.centroids.tolist()}) == k


def test_init_skips_kmeans_plusplus():
    x = np.random.default_rng(9).normal(size=(500, 2))
    result = kmeans(x, 3, init=x[:3], max_iter=1)
    labels = brute_force_sqdist(x, x[:3]).argmin(1)
    expected = np.stack([x[labels == j].mean(0) for j in range(3)])
    np.testing.assert_allclose(result.centroids.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_accepts_numpy_and_integer_points():
    x = np.repeat(np.arange(10).reshape(5, 2), 3, axis=0)
    result = kmeans(x, 5, seed=0)
    assert result.inertia == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("x", "k", "kwargs", "error", "match"),
    [
        (np.zeros((10, 2)), 1, {}, InvalidParameterError, "k=1"),
        (np.zeros((10, 2)), 10, {}, InvalidParameterError, "2 <= k < 10"),
        (np.zeros((10, 2)), 2.5, {}, InvalidParameterError, "k=2.5"),
        (np.array([[0.0, 1.0], [np.nan, 0.0], [1.0, 1.0]]), 2, {}, InvalidWeightsError, "NaN"),
        (np.array([[0.0, 1.0], [np.inf, 0.0], [1.0, 1.0]]), 2, {}, InvalidWeightsError, "NaN/Inf"),
        (np.zeros(10), 2, {}, InvalidWeightsError, "2-D"),
        (np.zeros((10, 2, 1)), 2, {}, InvalidWeightsError, "2-D"),
        (np.zeros((0, 2)), 2, {}, InvalidWeightsError, "empty"),
        (np.zeros((10, 2)), 2, {"seed": -1}, InvalidParameterError, "seed"),
        (np.zeros((10, 2)), 2, {"max_iter": 0}, InvalidParameterError, "max_iter"),
        (np.zeros((10, 2)), 2, {"tol": -1.0}, InvalidParameterError, "tol"),
        (np.zeros((10, 2)), 2, {"max_points_per_centroid": 0}, InvalidParameterError, "max_points_per_centroid"),
        (np.zeros((10, 2)), 2, {"init": np.zeros((3, 2))}, InvalidParameterError, r"\(2, 2\)"),
        (np.zeros((10, 2)), 2, {"init": np.full((2, 2), np.nan)}, InvalidWeightsError, "init"),
        (np.zeros((10, 2)), 2, {"dtype": torch.int32}, InvalidParameterError, "dtype"),
        (np.zeros((10, 2)), 2, {"chunk_size": 0}, InvalidParameterError, "chunk_size"),
    ],
)
def test_bad_input_raises_a_clear_error(x, k, kwargs, error, match):
    with pytest.raises(error, match=match):
        kmeans(x, k, **kwargs)


def test_error_names_the_layer():
    with pytest.raises(InvalidParameterError, match=r"layer 'fc\.weight'"):
        kmeans(np.zeros((4, 2)), 8, name="fc.weight")


@pytest.mark.parametrize(("d", "k"), [(1, 7), (4, 16), (4, 64)])
def test_assign_matches_brute_force_far_from_the_origin(d, k):
    rng = np.random.default_rng(10)
    x = torch.from_numpy(rng.normal(size=(2000, d)).astype(np.float32) + 1000.0)
    centroids = x[torch.from_numpy(rng.choice(2000, k, replace=False))] + 0.01
    labels, sqdist = assign(x, centroids)
    assert labels.dtype == torch.int64
    dist = brute_force_sqdist(x.numpy() - 1000.0, centroids.numpy() - 1000.0)  # the same distances, exactly
    np.testing.assert_array_equal(labels.numpy(), dist.argmin(1))
    np.testing.assert_allclose(sqdist.numpy(), dist.min(1), rtol=1e-3, atol=1e-3)


def test_assign_rejects_mismatched_shapes():
    with pytest.raises(InvalidParameterError, match=r"\(5, 3\).*\(4, 2\)"):
        assign(torch.zeros(5, 3), torch.zeros(4, 2))
    with pytest.raises(InvalidParameterError, match="torch tensors"):
        assign(np.zeros((5, 2)), torch.zeros(4, 2))


def test_estimator_returns_numpy_float64_centres_and_predicts_the_nearest():
    x, k = gaussian_blobs()
    km = KMeans(k, seed=3).fit(x)
    assert isinstance(km.cluster_centers_, np.ndarray) and km.cluster_centers_.dtype == np.float64
    assert km.cluster_centers_.shape == (k, 4)
    assert km.labels_.dtype == np.int64 and km.labels_.shape == (3000,)
    assert km.inertia_ == pytest.approx(kmeans(x, k, seed=3).inertia)
    assert km.n_iter_ == len(km.objective_)
    new = np.random.default_rng(11).normal(size=(100, 4)) * 5
    np.testing.assert_array_equal(km.predict(new), brute_force_sqdist(new, km.cluster_centers_).argmin(1))
    np.testing.assert_array_equal(KMeans(k, seed=3).fit_predict(x), km.labels_)


def test_estimator_errors():
    with pytest.raises(NotFittedError, match="not fitted"):
        KMeans(3).predict(np.zeros((2, 2)))
    km = KMeans(2).fit(np.random.default_rng(12).normal(size=(50, 3)))
    with pytest.raises(InvalidWeightsError, match="3"):
        km.predict(np.zeros((4, 2)))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"max_iter": 0}, "max_iter=0"),
        ({"max_iter": 2.5}, "max_iter=2.5"),
        ({"tol": float("nan")}, "tol=nan"),
        ({"tol": "x"}, "tol='x'"),
        ({"max_points_per_centroid": 0}, "max_points_per_centroid=0"),
        ({"init_points_per_centroid": -3}, "init_points_per_centroid=-3"),
        ({"init_tail_share": 1.0}, r"init_tail_share=1.0 .*\[0, 1\)"),
        ({"chunk_size": True}, "chunk_size=True"),
        ({"dtype": torch.int64}, "dtype"),
        ({"backend": "cuda"}, r"backend='cuda'.*'auto', 'torch', 'faiss'"),
    ],
)
def test_config_is_validated_at_construction(options, match):
    with pytest.raises(InvalidParameterError, match=match):
        KMeansConfig(**options)


def test_config_and_shortcuts_give_the_same_result():
    x, k = anisotropic_gaussian()
    config = KMeansConfig(max_iter=5, tol=0.0)
    a = kmeans(x, k, seed=2, config=config)
    b = kmeans(x, k, seed=2, max_iter=5, tol=0.0)
    assert a.n_iter == b.n_iter == 5 and torch.equal(a.centroids, b.centroids)
    with pytest.raises(InvalidParameterError, match="KMeansConfig"):
        kmeans(x, k, config={"max_iter": 5})


def _nearest_is_brute_force(x, centroids, labels):
    dist = brute_force_sqdist(x, centroids)
    chosen = dist[np.arange(len(x)), np.asarray(labels)]
    assert np.all(chosen <= dist.min(1) * (1 + 1e-5) + 1e-6)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_backends_match_sklearn_from_the_same_start(backend):
    # d = 8, k = 64, tol = 0: backend "faiss" hands Lloyd's loop to faiss. Same start, float32: the
    # distortion equals scikit-learn's Lloyd to float32 rounding, and every label is the nearest centroid.
    if backend == "faiss" and _faiss_module() is None:
        pytest.skip("faiss is not installed")
    x = (np.random.default_rng(13).standard_normal((6000, 8)) * np.linspace(1.0, 0.2, 8)).astype(np.float32)
    init = x[np.random.default_rng(14).choice(6000, 64, replace=False)]
    reference = sklearn_fit(x.astype(np.float64), 64, init=init.astype(np.float64), max_iter=10, tol=0.0)
    config = KMeansConfig(max_iter=10, tol=0.0, backend=backend)
    ours = kmeans(x, 64, init=init, config=config)
    assert ours.n_iter == reference.n_iter_ == 10
    assert ours.inertia == pytest.approx(reference.inertia_, rel=1e-4)
    _nearest_is_brute_force(x, ours.centroids.numpy(), ours.labels)
    points = _PointSet(torch.from_numpy(x), 64, backend=backend)
    assert points.mode == ("faiss" if backend == "faiss" else "scores")
    labels, sqdist, _ = points.nearest(torch.from_numpy(init))
    _nearest_is_brute_force(x, init, labels)
    np.testing.assert_allclose(sqdist.numpy(), brute_force_sqdist(x, init).min(1), rtol=1e-4, atol=1e-4)


def test_subsampled_start_stays_within_one_percent_of_sklearn():
    # n = 20000: k-means++ runs on 4096 drawn points; the distortion after Lloyd is what a full start gives.
    x = (np.random.default_rng(15).standard_normal((20000, 4)) * np.array([1.0, 0.7, 0.4, 0.2])).astype(np.float32)
    ours = [kmeans(x, 16, seed=s).inertia for s in SEEDS]
    full = [kmeans(x, 16, seed=s, config=KMeansConfig(init_points_per_centroid=None)).inertia for s in SEEDS]
    theirs = [sklearn_fit(x, 16, init="k-means++", random_state=s).inertia_ for s in SEEDS]
    assert np.mean(ours) / np.mean(theirs) == pytest.approx(1.0, abs=0.01)
    assert np.mean(full) / np.mean(theirs) == pytest.approx(1.0, abs=0.01)


def test_start_on_every_point_matches_sklearn_on_heavy_tails():
    # Student-t (3 dof) coordinates: a start on a subsample misses the far tails (+9 % distortion with
    # 4096 of 12000 points here); the documented remedy, init_points_per_centroid=None, must
    # match scikit-learn's k-means++, which always sees every point.
    x = (np.random.default_rng(15).standard_t(3, (12000, 4)) * np.array([1.0, 0.7, 0.4, 0.2])).astype(np.float32)
    config = KMeansConfig(init_points_per_centroid=None, max_iter=50)
    full = [kmeans(x, 32, seed=s, config=config).inertia for s in range(3)]
    theirs = [sklearn_fit(x, 32, init="k-means++", max_iter=50, random_state=s).inertia_ for s in range(3)]
    assert np.mean(full) / np.mean(theirs) == pytest.approx(1.0, abs=0.01)


def test_quantize_defaults_run_lloyd_to_the_cap_at_d_1():
    # scikit-learn's tolerance can stop 1-D k-means after a few iterations; the quantize defaults run
    # Lloyd to 25 iterations (unless the labels repeat): scikit-learn's result at max_iter=25, tol=0.
    x, _ = one_dimensional()
    init = np.quantile(x, np.linspace(0.01, 0.99, 32))[:, None]
    capped = kmeans(x, 32, init=init, config=QUANTIZE_KMEANS, dtype=torch.float64)
    reference = sklearn_fit(x, 32, init=init, max_iter=25, tol=0.0)
    assert capped.n_iter == reference.n_iter_ and capped.n_iter <= 25
    assert capped.inertia == pytest.approx(reference.inertia_, rel=1e-9)
    assert capped.n_iter == 25  # tol = 0: no early stop on a small centre shift


def test_compressed_model_quantize_uses_the_quantize_defaults(monkeypatch):
    from lr2vq_analysis import nn as lr2vq_nn

    seen = []

    def spy(*args, **kwargs):
        seen.append((kwargs["config"], kwargs.get("max_iter")))
        return kmeans(*args, **kwargs)

    monkeypatch.setattr(lr2vq_nn, "kmeans", spy)
    layer = lr2vq_nn.LR2VQLinear.from_dense(torch.nn.Linear(16, 8), lr2vq_nn.LayerPlan(k=4, m=4, d_tilde=2))
    layer.quantize(seed=0)
    layer2 = lr2vq_nn.LR2VQLinear.from_dense(torch.nn.Linear(16, 8), lr2vq_nn.LayerPlan(k=4, m=4, d_tilde=2))
    layer2.quantize(seed=0, config=KMeansConfig(max_iter=3, tol=0.0))
    assert seen == [(QUANTIZE_KMEANS, None), (KMeansConfig(max_iter=3, tol=0.0), None)]


def test_random_state_is_sklearns_name_for_seed():
    x, k = gaussian_blobs()
    a = KMeans(k, random_state=4).fit(x)
    b = KMeans(k, seed=4).fit(x)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    assert a.n_features_in_ == 4
    with pytest.raises(InvalidParameterError, match="disagree"):
        KMeans(k, seed=1, random_state=2).fit(x)
    with pytest.raises(InvalidParameterError, match=r"random_state=.*int seed"):
        KMeans(k, random_state=np.random.RandomState(0)).fit(x)


def test_single_threaded_pins_torch_threads_and_restores_them():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with single_threaded():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), single_threaded():
            raise RuntimeError
        assert torch.get_num_threads() == 2
        with single_threaded("meta"):  # nothing is limited off the CPU
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_every_pass_over_the_points_runs_single_threaded(monkeypatch):
    # Input validation included: a full pass at the user's threads waits a scheduler slice per parallel
    # region on a busy machine (the thread cliff).
    seen = []
    real_isfinite = torch.isfinite

    def isfinite(tensor):
        seen.append(torch.get_num_threads())
        return real_isfinite(tensor)

    monkeypatch.setattr(torch, "isfinite", isfinite)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        kmeans(np.random.default_rng(0).normal(size=(500, 3)), 4, seed=0)
        KMeans(4).fit(np.random.default_rng(1).normal(size=(500, 3)))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    assert seen and set(seen) == {1}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, k = anisotropic_gaussian()
    cpu = kmeans(torch.from_numpy(x), k, seed=0, dtype=torch.float64)
    gpu = kmeans(torch.from_numpy(x).cuda(), k, seed=0, dtype=torch.float64)
    assert gpu.centroids.device.type == "cuda" and gpu.labels.device.type == "cuda"
    assert gpu.inertia == pytest.approx(cpu.inertia, rel=1e-9)
    np.testing.assert_array_equal(gpu.labels.cpu().numpy(), cpu.labels.numpy())
