"""Tests of the trade-off model against independent references (hand-solved water-filling, brute-force
SVD, scikit-learn k-means, closed-form Gaussian Zador) and of every bad-input rule."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.cluster import KMeans as SklearnKMeans
from threadpoolctl import threadpool_limits

from lr2vq_analysis._validation import InvalidParameterError, InvalidWeightsError
from lr2vq_analysis.probes import clustering_error_curve
from lr2vq_analysis.tradeoff import (
    DEFAULT_RHO,
    TradeoffModel,
    fit_tradeoff,
    in_sample_factor,
    quantizer_constant,
    water_filling,
    zador_estimate,
)


def rotated_layer(n_rows: int, row: int, m: int, decay: float, seed: int, laplacian: bool = False) -> np.ndarray:
    """A (n_rows, row) weight whose subvectors have independent coordinates of variance decay^i in a random basis."""
    rng = np.random.default_rng(seed)
    n = n_rows * row // m
    noise = rng.laplace(size=(n, m)) / math.sqrt(2) if laplacian else rng.normal(size=(n, m))
    basis, _ = np.linalg.qr(rng.normal(size=(m, m)))
    return ((noise * np.sqrt(decay ** np.arange(m))) @ basis.T).reshape(n_rows, row)


@pytest.fixture(scope="module")
def layer() -> np.ndarray:
    return rotated_layer(64, 96, 6, 0.7, seed=1)  # 1024 subvectors of size 6


@pytest.fixture(scope="module")
def model(layer: np.ndarray) -> TradeoffModel:
    return fit_tradeoff(layer, k=16, m=6, seed=0, name="fc")


# -- water-filling knee ----------------------------------------------------------------------------


def test_water_filling_two_components_hand_solved() -> None:
    # 2 bits over λ = (4, 1): θ = √(4·1)/2² = 0.5; rates ½·log2(8) + ½·log2(2) = 1.5 + 0.5 = 2.
    theta, knee = water_filling([4.0, 1.0], k=4)
    assert theta == pytest.approx(0.5) and knee == 2


def test_water_filling_drops_component_below_level() -> None:
    # 4 bits over λ = (8, 2, 0.1): with all three θ = 2^((3 + 1 + log2 0.1 − 8)/3) ≈ 0.18 > 0.1, so the
    # third gets no bits; with two, θ = 2^((3 + 1 − 8)/2) = 0.25 < 2 (rates 2.5 + 1.5 = 4 bits).
    theta, knee = water_filling([0.1, 8.0, 2.0], k=16)
    assert theta == pytest.approx(0.25) and knee == 2
    theta, knee = water_filling([4.0, 0.01], k=4)
    assert theta == pytest.approx(0.25) and knee == 1


def test_water_filling_spends_exactly_log2_k_bits() -> None:
    lam = np.random.default_rng(0).exponential(size=9) ** 3
    for k in (2, 16, 256, 4096):
        theta, knee = water_filling(lam, k)
        bits = np.sum(np.maximum(0.0, 0.5 * np.log2(lam / theta)))
        assert bits == pytest.approx(math.log2(k))
        assert knee == int(np.sum(lam > theta))


def test_model_knee_is_water_filling_of_eigenvalues(model: TradeoffModel) -> None:
    assert model.knee == water_filling(model.eigenvalues_, 16)[1]


# -- theory pieces -----------------------------------------------------------------------------------


def test_zador_estimate_matches_gaussian_closed_form() -> None:
    rng = np.random.default_rng(0)
    variances = np.array([2.0, 1.0, 0.5])
    z = rng.normal(size=(30000, 3)) * np.sqrt(variances)
    estimate = zador_estimate(z, k=64)
    for d in (2, 3):
        gaussian = (
            d
            * quantizer_constant(d)
            * 2
            * math.pi
            * ((d + 2) / d) ** ((d + 2) / 2)
            * np.prod(variances[:d]) ** (1 / d)
            * 64 ** (-2 / d)
        )
        assert estimate[d - 1] == pytest.approx(gaussian, rel=0.04)


def test_panter_dite_constant() -> None:
    # d = 1: Zador's estimate of a unit Gaussian is Panter–Dite's √3·π/2 ≈ 2.72 times k^-2.
    z = np.random.default_rng(1).normal(size=(60000, 1))
    assert zador_estimate(z, k=256)[0] * 256**2 == pytest.approx(math.sqrt(3) * math.pi / 2, rel=0.1)


def test_in_sample_factor() -> None:
    assert in_sample_factor(4, 4.0) == 0.5
    assert in_sample_factor(np.array([1.0, 1e9]), 2.0)[1] == pytest.approx(1.0)


# -- curves ------------------------------------------------------------------------------------------


def test_lowrank_equals_brute_force_svd_truncation(layer: np.ndarray, model: TradeoffModel) -> None:
    x = layer.reshape(-1, 6)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    energy = float(np.sum(x * x))
    for d in range(1, 7):
        truncated = (u[:, :d] * s[:d]) @ vt[:d]
        assert model.lowrank(d) == pytest.approx(np.sum((x - truncated) ** 2) / energy, abs=1e-10)


def test_total_is_rho_lowrank_plus_clustering(model: TradeoffModel) -> None:
    d = np.arange(1, 7)
    np.testing.assert_allclose(model.total(d), model.rho * model.lowrank(d) + model.clustering(d), rtol=1e-12)
    assert model.total(3) == pytest.approx(model.rho * model.lowrank(3) + model.clustering(3))
    assert isinstance(model.total(3), float) and model.total(d).shape == (6,)


def test_d_tilde_is_argmin_of_total(model: TradeoffModel) -> None:
    totals = model.total(np.arange(1, 7))
    assert model.predict("rho") == int(np.argmin(totals)) + 1
    assert model.rho == DEFAULT_RHO


def test_with_rho_moves_d_tilde_monotonically_without_refit(model: TradeoffModel) -> None:
    previous = 0
    rho_model = model.with_rho(DEFAULT_RHO)
    assert model.predictor == "half" and rho_model.predictor == "rho"  # ρ acts through the ρ-model only
    for rho in (0.05, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0):
        other = rho_model.with_rho(rho)
        assert other.rho == rho and other.probes == model.probes
        np.testing.assert_array_equal(other.clustering_curve_, model.clustering_curve_)
        assert other.d_tilde >= previous
        previous = other.d_tilde
    assert rho_model.with_rho(0.05).d_tilde < rho_model.with_rho(1.0).d_tilde
    assert model.d_tilde == 3  # the default rule without calibration data, ⌊m/2⌋
    assert model.rho == DEFAULT_RHO  # the original is untouched


def test_rho_one_is_plain_reconstruction_which_favours_full_dimension(model: TradeoffModel) -> None:
    # With ρ = 1 the total is the reconstruction error: a codebook in a d̃-dim subspace is also one in
    # m dims, so the error cannot rise with d̃ and the optimum is d̃ = m.
    totals = model.with_rho(1.0).total(np.arange(1, 7))
    assert np.all(np.diff(totals) <= 1e-12)
    assert model.with_rho(1.0).predict("rho") == 6


def test_clustering_curve_bounded_by_spectrum(model: TradeoffModel) -> None:
    curve = model.clustering(np.arange(1, 7))
    kept = np.cumsum(model.eigenvalues_)
    assert np.all(curve >= 0) and np.all(curve <= kept + 1e-12)
    # Adding a dimension adds at most its eigenvalue (same partition, one more coordinate).
    assert np.all(np.diff(curve) <= model.eigenvalues_[1:] + 1e-12)


@pytest.mark.parametrize(
    ("decay", "laplacian", "k", "n_rows"),
    [(0.7, False, 32, 192), (0.5, True, 16, 64), (1.0, True, 32, 192)],
)
def test_model_curve_tracks_sklearn_kmeans(decay: float, laplacian: bool, k: int, n_rows: int) -> None:
    # Independent reference: scikit-learn k-means (n_init=1, k-means++) on the top-d̃ principal
    # coordinates of all subvectors. The first case has 96 points per centroid, so the probes are
    # subsampled (16 per centroid) and the n/k extrapolation is exercised.
    m = 6
    weight = rotated_layer(n_rows, 96, m, decay, seed=3, laplacian=laplacian)
    fitted = fit_tradeoff(weight, k=k, m=m, seed=0)
    x = weight.reshape(-1, m)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    energy = float(np.sum(x * x))
    for d in range(1, m + 1):
        z = x @ vt[:d].T
        with threadpool_limits(1):  # small problems: threads only add overhead on a shared machine
            inertia = [SklearnKMeans(k, n_init=1, random_state=s).fit(z).inertia_ for s in (0, 1)]
        measured = float(np.mean(inertia)) / energy
        assert abs(fitted.clustering(d) - measured) <= max(0.12 * measured, 0.005), (d, fitted.clustering(d), measured)


def test_far_outlier_missed_by_the_probe_subsample_is_capped() -> None:
    # One subvector holds ~4 % of the energy (MiniLM's output.dense layers have one with 5 %). k-means on
    # all subvectors gives it a centroid; the probes' subsamples (16 per centroid of 128) miss it, and its
    # held-out error, uncapped, would inflate the modelled curve several-fold.
    weight = rotated_layer(256, 96, 6, 0.8, seed=4)
    subvectors = weight.reshape(-1, 6)
    subvectors[123] *= 15.0
    fitted = fit_tradeoff(weight, k=32, m=6, seed=0)
    assert all(fitted.params[f"probe{i}_isolated"] >= 1 for i in range(len(fitted.probes)))
    measured = clustering_error_curve(weight, k=32, m=6, seed=0)
    np.testing.assert_array_less(np.abs(fitted.clustering_curve_ - measured), np.maximum(0.1 * measured, 0.005))


# -- probes, params, serialisation ------------------------------------------------------------------


@pytest.mark.parametrize("n_probes", [1, 2, 3])
def test_at_most_n_probes(layer: np.ndarray, n_probes: int) -> None:
    fitted = fit_tradeoff(layer, k=16, m=6, n_probes=n_probes)
    assert 1 <= len(fitted.probes) <= n_probes
    assert all(1 <= d <= fitted.knee for d in fitted.probes)
    assert all(v > 0 for v in fitted.probes.values())


@pytest.mark.parametrize(("k", "expected"), [(128, 3), (16, 1), (8, 2)])
def test_automatic_number_of_probes(layer: np.ndarray, k: int, expected: int) -> None:
    # 1024 subvectors: k = 128 leaves 8 per centroid (probes use all of them, 3 probes); otherwise one
    # subsampled probe per PROBE_COST_POINTS_PER_CENTROID = 64 subvectors per centroid, at most 3.
    fitted = fit_tradeoff(layer, k=k, m=6)
    assert len(fitted.probes) == expected
    subsampled = [fitted.params[f"probe{i}_points_per_centroid"] < 1024 / k for i in range(expected)]
    assert all(subsampled) == (k != 128)


def test_probe_on_all_subvectors_is_on_the_curve(layer: np.ndarray) -> None:
    # 1024 subvectors, k = 128: 8 points per centroid, so probes use every subvector and the measured
    # probe is the in-sample error the curve models.
    fitted = fit_tradeoff(layer, k=128, m=6, n_probes=1)
    ((d, measured),) = fitted.probes.items()
    assert fitted.params["probe0_points_per_centroid"] == pytest.approx(8.0)
    assert fitted.params["probe0_estimate"] == pytest.approx(measured)
    assert fitted.clustering(d) == pytest.approx(measured, rel=0.05)


def test_round_trip_through_json_is_exact(model: TradeoffModel) -> None:
    restored = TradeoffModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert restored.to_dict() == model.to_dict()
    for attribute in ("eigenvalues_", "lowrank_curve_", "clustering_curve_"):
        np.testing.assert_array_equal(getattr(restored, attribute), getattr(model, attribute))
    assert (restored.k, restored.m, restored.rho, restored.name) == (16, 6, model.rho, "fc")
    assert (restored.d_tilde, restored.knee, restored.n_subvectors_) == (model.d_tilde, model.knee, 1024)
    assert restored.probes == model.probes and restored.params == model.params


def test_same_seed_same_model(layer: np.ndarray, model: TradeoffModel) -> None:
    assert fit_tradeoff(layer, k=16, m=6, seed=0, name="fc").to_dict() == model.to_dict()


def test_params_are_documented_floats(model: TradeoffModel) -> None:
    for key in ("calibration", "calibration_slope", "beta_const", "beta_inv_d", "points_per_centroid", "water_level"):
        assert isinstance(model.params[key], float)
    assert model.params["points_per_centroid"] == 1024 / 16
    assert "fc" in repr(model) and "d_tilde=" in repr(model)


def test_accepts_torch_tensor(layer: np.ndarray, model: TradeoffModel) -> None:
    torch = pytest.importorskip("torch")
    fitted = fit_tradeoff(torch.from_numpy(layer), k=16, m=6, seed=0, name="fc")
    np.testing.assert_allclose(fitted.clustering_curve_, model.clustering_curve_, rtol=1e-6)


# -- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 0, -3, 2.5, "16", True])
def test_rejects_bad_k(layer: np.ndarray, k: object) -> None:
    with pytest.raises(InvalidParameterError, match="k="):
        fit_tradeoff(layer, k=k, m=6)  # type: ignore[arg-type]


def test_rejects_k_not_below_number_of_subvectors(layer: np.ndarray) -> None:
    with pytest.raises(InvalidParameterError, match=r"layer 'fc': k=1024 is too large for 1024 subvectors"):
        fit_tradeoff(layer, k=1024, m=6, name="fc")


@pytest.mark.parametrize("rho", [0.0, -0.1, 1.5, float("nan"), "high", None])
def test_rejects_bad_rho(layer: np.ndarray, model: TradeoffModel, rho: object) -> None:
    with pytest.raises(InvalidParameterError, match="rho"):
        fit_tradeoff(layer, k=16, m=6, rho=rho)  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="rho"):
        model.with_rho(rho)  # type: ignore[arg-type]


@pytest.mark.parametrize("d", [0, 7, -1, 2.5, [1, 7], np.array([0, 3])])
def test_rejects_d_tilde_outside_1_to_m(model: TradeoffModel, d: object) -> None:
    for method in (model.lowrank, model.clustering, model.total):
        with pytest.raises(InvalidParameterError, match=r"layer 'fc': d_tilde=.* 1\.\.6"):
            method(d)


def test_rejects_m_not_dividing_row_length(layer: np.ndarray) -> None:
    with pytest.raises(InvalidParameterError, match=r"layer 'fc': m=7 does not divide the row length 96"):
        fit_tradeoff(layer, k=16, m=7, name="fc")
    with pytest.raises(InvalidParameterError, match="m=0"):
        fit_tradeoff(layer, k=16, m=0)


@pytest.mark.parametrize("n_probes", [0, 4, 1.5, "2"])
def test_rejects_bad_n_probes(layer: np.ndarray, n_probes: object) -> None:
    with pytest.raises(InvalidParameterError, match="n_probes"):
        fit_tradeoff(layer, k=16, m=6, n_probes=n_probes)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0, 1, 3.5, "8"])
def test_rejects_bad_max_points_per_centroid(layer: np.ndarray, value: object) -> None:
    with pytest.raises(InvalidParameterError, match="max_points_per_centroid"):
        fit_tradeoff(layer, k=16, m=6, max_points_per_centroid=value)  # type: ignore[arg-type]


def test_rejects_bad_seed(layer: np.ndarray) -> None:
    with pytest.raises(InvalidParameterError, match="seed"):
        fit_tradeoff(layer, k=16, m=6, seed=-1)


def test_rejects_bad_weights(layer: np.ndarray) -> None:
    broken = layer.copy()
    broken[0, 0] = np.nan
    with pytest.raises(InvalidWeightsError, match=r"layer 'fc': weight holds 1 NaN/Inf"):
        fit_tradeoff(broken, k=16, m=6, name="fc")
    with pytest.raises(InvalidWeightsError, match="rank 1"):
        fit_tradeoff(layer.ravel(), k=16, m=6)
    with pytest.raises(InvalidWeightsError, match="all zeros"):
        fit_tradeoff(np.zeros_like(layer), k=16, m=6)


def test_rejects_inconsistent_state() -> None:
    with pytest.raises(InvalidParameterError, match="shape"):
        TradeoffModel(
            4,
            3,
            0.5,
            eigenvalues=[1.0, 0.0],
            lowrank_curve=[0.0, 0.0, 0.0],
            clustering_curve=[0.0, 0.0, 0.0],
            knee=1,
            probes={},
            params={},
            n_subvectors=10,
        )
    with pytest.raises(InvalidParameterError, match="lacks the key"):
        TradeoffModel.from_dict({"k": 4})


def test_water_filling_rejects_bad_input() -> None:
    with pytest.raises(InvalidParameterError, match="k="):
        water_filling([1.0, 2.0], k=1)
    with pytest.raises(InvalidParameterError, match="no positive"):
        water_filling([0.0, 0.0], k=4)
