"""Subvector layout and the exact low-rank curve, checked against brute-force numpy SVD."""

import numpy as np
import pytest
import torch

from lr2vq_analysis._validation import InvalidParameterError, InvalidWeightsError
from lr2vq_analysis.spectrum import compute_spectrum, lowrank_error_curve
from lr2vq_analysis.subvectors import from_subvectors, n_subvectors, row_length, to_subvectors


def brute_force_lowrank_curve(x: np.ndarray) -> np.ndarray:
    """Relative error of the best rank-d approximation, from numpy's SVD, d = 1..m."""
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    total = float(np.sum(x**2))
    curve = []
    for d in range(1, x.shape[1] + 1):
        approx = (u[:, :d] * s[:d]) @ vt[:d]
        curve.append(float(np.sum((x - approx) ** 2)) / total)
    return np.array(curve)


def test_conv_layout_is_one_spatial_kernel_per_subvector_at_m9():
    w = np.random.default_rng(0).normal(size=(4, 3, 3, 3))
    x = to_subvectors(w, 9)
    assert x.shape == (12, 9)
    # Row 5 is output channel 1, input channel 2: its 3×3 kernel flattened.
    np.testing.assert_array_equal(x[5], w[1, 2].ravel())


def test_m18_takes_two_adjacent_input_channels_of_one_filter():
    w = np.random.default_rng(1).normal(size=(2, 4, 3, 3))
    x = to_subvectors(w, 18)
    np.testing.assert_array_equal(x[1], np.concatenate([w[0, 2].ravel(), w[0, 3].ravel()]))


def test_linear_is_cut_along_input_features():
    w = np.arange(24, dtype=float).reshape(3, 8)
    x = to_subvectors(w, 4)
    np.testing.assert_array_equal(x[1], [4, 5, 6, 7])
    np.testing.assert_array_equal(x[2], [8, 9, 10, 11])


def test_conv1d_layout_and_round_trip_with_torch_input():
    w = torch.randn(6, 4, 3)
    x = to_subvectors(w, 6)
    assert x.shape == (12, 6)
    np.testing.assert_allclose(from_subvectors(x, tuple(w.shape)), w.double().numpy())
    assert row_length((6, 4, 3)) == 12 and n_subvectors((6, 4, 3), 6) == 12


@pytest.mark.parametrize("shape,m", [((32, 16, 3, 3), 9), ((32, 16, 3, 3), 18), ((48, 64), 8), ((20, 6, 5), 10)])
def test_lowrank_curve_matches_brute_force_svd(shape, m):
    rng = np.random.default_rng(2)
    # Decaying spectrum so the curve is non-trivial.
    w = rng.normal(size=shape) * rng.uniform(0.1, 2.0, size=shape)
    curve = lowrank_error_curve(w, m)
    reference = brute_force_lowrank_curve(to_subvectors(w, m))
    np.testing.assert_allclose(curve, reference, atol=1e-10)
    assert curve[-1] == 0.0
    assert np.all(np.diff(curve) <= 1e-12)


def test_spectrum_energy_and_projection():
    w = np.random.default_rng(3).normal(size=(16, 8, 3, 3))
    x = to_subvectors(w, 9)
    spec = compute_spectrum(x)
    assert spec.total_energy == pytest.approx(np.sum(w**2))
    assert spec.eigenvalues.sum() == pytest.approx(np.sum(w**2))
    p = spec.projection(4)
    assert p.shape == (4, 9)
    np.testing.assert_allclose(p @ p.T, np.eye(4), atol=1e-12)
    z = spec.project(x, 4)
    # Reconstruction error of Z·P is exactly the low-rank curve's entry.
    err = np.sum((x - z @ p) ** 2) / spec.total_energy
    assert err == pytest.approx(spec.lowrank_error()[3])


def test_bad_inputs_name_the_layer_and_the_allowed_values():
    w = np.ones((8, 5, 3, 3))
    with pytest.raises(InvalidParameterError, match=r"layer 'conv2'.*m=4 does not divide the row length 45"):
        lowrank_error_curve(w, 4, name="conv2")
    with pytest.raises(InvalidParameterError, match="positive integer"):
        lowrank_error_curve(w, 0)
    bad = np.ones((8, 9))
    bad[0, 0] = np.nan
    with pytest.raises(InvalidWeightsError, match=r"layer 'fc'.*NaN/Inf"):
        lowrank_error_curve(bad, 9, name="fc")
    with pytest.raises(InvalidWeightsError, match="rank 1"):
        lowrank_error_curve(np.ones(9), 9)
    with pytest.raises(InvalidWeightsError, match="rank 5"):
        lowrank_error_curve(np.ones((2, 2, 2, 2, 9)), 9)
    with pytest.raises(InvalidWeightsError, match="all zeros"):
        lowrank_error_curve(np.zeros((4, 9)), 9)


# -- scale: relative errors do not depend on it ------------------------------------------------------------
SCALES = [1e-40, 1e-23, 1e-9, 1e9, 1e19, 1e35]


@pytest.mark.parametrize("scale", SCALES)
def test_analysis_is_scale_invariant(scale: float) -> None:
    # Brute-force reference at scale 1 (numpy SVD); the model at scale s must give the same relative curves,
    # including subsampled probes (4096 subvectors, k = 16: 256 per centroid, so the probes train on 16 each).
    from lr2vq_analysis.tradeoff import fit_tradeoff

    rng = np.random.default_rng(0)
    weight = (rng.laplace(size=(512, 8, 9)) * np.sqrt(0.7 ** np.arange(9))).reshape(512, 8, 3, 3)
    weight = weight.astype(np.float32).astype(np.float64)  # exactly representable at every float32 scale below
    reference = fit_tradeoff(weight, k=16, m=9, seed=0)
    np.testing.assert_allclose(reference.lowrank_curve_, brute_force_lowrank_curve(weight.reshape(-1, 9)), atol=1e-9)
    scaled = weight * scale
    for source in (scaled, torch.from_numpy(scaled).float()) if 1e-30 < scale < 1e30 else (scaled,):
        model = fit_tradeoff(source, k=16, m=9, seed=0)
        assert np.all(np.isfinite(model.clustering_curve_)) and model.clustering_curve_[0] > 0
        np.testing.assert_allclose(model.lowrank_curve_, reference.lowrank_curve_, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(model.clustering_curve_, reference.clustering_curve_, rtol=2e-3)
        assert model.d_tilde == reference.d_tilde


@pytest.mark.parametrize("scale", [1e-200, 1e200])
def test_weights_beyond_the_float64_range_are_refused(scale: float) -> None:
    weight = np.random.default_rng(0).normal(size=(16, 18)) * scale
    with pytest.raises(InvalidWeightsError, match=r"layer 'fc': the largest weight magnitude is .*rescale"):
        lowrank_error_curve(weight, m=9, name="fc")
