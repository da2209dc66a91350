"""The trade-off model: low-rank error vs clustering error over d̃, and the predicted d̃.

For a layer with subvector matrix X (n × m) and k centroids, LR²VQ's reconstruction error at
clustering dimensionality d̃ is ``lowrank(d̃) + clustering(d̃)`` (both relative to ‖W‖²). The low-rank
term is exact (the spectrum). The clustering term is the k-means distortion of the top-d̃ principal
coordinates Z; this module *predicts* it over d̃ = 1..m from the spectrum, a density estimate and at
most three k-means probes, instead of running k-means at every d̃. The total that the predicted d̃
minimises is ``rho · lowrank(d̃) + clustering(d̃)``: end-to-end training recovers most of the low-rank
error, ρ is the share it does not recover.

The model (derivation, assumptions, failure modes and measured accuracy: ``docs/theory.md``):

1. **High-rate theory** (Zador, Gersho): a k-point quantizer of a d-dimensional density p has
   distortion ``D ≈ d·G(d)·k^(−2/d)·‖p‖_{d/(d+2)}``. The functional ‖p‖ is estimated from the data,
   per principal coordinate (product of marginals; nearest-neighbour estimator), which captures
   heavy tails and non-zero means that a Gaussian with the same eigenvalues would miss.
2. **Reverse water-filling knee**: components with λ_i ≤ θ, where Σ max(0, ½·log2(λ_i/θ)) = log2 k, get
   no bits; past the knee adding a dimension adds its eigenvalue to the error ("capped Zador"). The
   modelled curve is the minimum over the number j ≤ knee of quantized dimensions of
   ``quantized(j) + (1 − 1/r)·Σ_{j<i≤d̃} λ_i`` (r = n/k; in-sample, cell means absorb 1/r of it).
3. **Finite points per centroid**: the in-sample distortion with r points per centroid is
   ``D∞·r/(r + β)``. β is read off each probe from the gap between its error on held-out subvectors
   (far outliers capped) and on its training subvectors, ``β ≈ κ(r)·r·(held-out/train − 1)`` with
   κ(r) = ½ + 0.47/√r (κ → ½ is the asymptotic M-estimation value), so probes can train on subsamples.
4. **Calibration**: a factor ``c(d) = c0·d^c1`` (slope shrunk towards 0) matches the model to the
   probes, placed at the knee, where the curve reaches 1/8 of its knee value, and between.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, cast

import numpy as np
import torch
from scipy.special import gammaln

from ._html import html_block, html_text
from ._threads import single_threaded
from ._validation import (
    InvalidParameterError,
    check_d_tilde_array,
    check_k,
    check_m,
    check_param,
    check_rho,
    check_seed,
    layer_label,
)
from .calibration import block_metric, collect_second_moments, lowrank_output_curve, output_error
from .kmeans import kmeans
from .probes import ProbeResult, run_probe
from .spectrum import Spectrum, compute_spectrum
from .subvectors import to_subvectors

__all__ = [
    "DEFAULT_RHO",
    "PREDICTORS",
    "DEFAULT_PREDICTOR",
    "DEFAULT_CALIBRATED_PREDICTOR",
    "DEFAULT_TOLERANCE",
    "FLAT_MESSAGE",
    "choose_d_tilde",
    "crossing_d_tilde",
    "near_best_range",
    "is_flat",
    "global_d_tilde",
    "prediction_note",
    "with_output_curves",
    "calibrate_models",
    "DEFAULT_MAX_POINTS_PER_CENTROID",
    "PROBE_COST_POINTS_PER_CENTROID",
    "TradeoffModel",
    "fit_tradeoff",
    "water_filling",
    "quantizer_constant",
    "zador_estimate",
    "in_sample_factor",
]

DEFAULT_RHO: float = 0.85
"""Default share of the low-rank error that end-to-end training does not recover.

Calibrated by the evidence sweeps (``benchmarks/calibrate_rho.py``, docs/results.md): over 7 settings of
a digits CNN, an MNIST-1D CNN and all-MiniLM-L6-v2 (5 seeds each; short fine-tuning budgets), ρ = 0.85
put the most predictions inside the plateau of fine-tuned accuracy (3 of 7) and within ±1 of the best d̃
(5 of 7) of any ρ in 0.05–1.00. The ρ consistent with single settings spans 0.25–1.00: it is a default,
not a law; set ``rho`` for your training budget.
"""

PREDICTORS: tuple[str, ...] = ("rho", "rho-output", "crossing", "crossing-output", "half", "knee", "pq")
"""The d̃ rules, selectable by name (``predictor=``):

- ``"rho"``: argmin of ``ρ·lowrank + clustering`` (weight space, relative to ‖W‖²);
- ``"rho-output"``: the same on the output-space curves (needs calibration data);
- ``"crossing"``: the smallest d̃ whose clustering error reaches the low-rank error (no constant);
- ``"crossing-output"``: the same on the output-space curves (needs calibration data);
- ``"half"``: ⌊m/2⌋ (at least 1), blind to the weights;
- ``"knee"``: the reverse water-filling knee (:func:`water_filling`);
- ``"pq"``: d̃ = m (no projection: plain PQ).
"""

DEFAULT_PREDICTOR: str = "half"
"""The rule used without calibration data: ⌊m/2⌋, blind to the weights.

Chosen by the pre-registered zoo study (``benchmarks/zoo/PREREGISTRATION.md``, docs/results.md): it had the
lowest mean regret of the data-free rules on the development half (0.57 accuracy points; ρ-model 1.07,
weight-space crossing 1.67, knee 2.13, d̃ = m 2.17), and on the held-out half no data-free rule beat it
(crossing 0.59, ⌊m/2⌋ 0.63, ρ-model 1.44, d̃ = m 2.57 points). The weight-space analysis is therefore not
what picks d̃ without data; it still reports the curves, the near-best range and the flat flag.
"""

DEFAULT_CALIBRATED_PREDICTOR: str = "crossing-output"
"""The rule used when calibration data (a model and its inputs) is given: the output-space crossing.

Lowest held-out mean regret of the zoo (0.29 points against 0.63 for ⌊m/2⌋), but the paired difference,
−0.34 ± 0.26 points, is not beyond two standard errors, so it is not proven better than ⌊m/2⌋ (the rule
the development half chose, ``rho-output``, failed held-out). See docs/results.md.
"""

DEFAULT_TOLERANCE: float = 0.05
"""d̃ whose predicted total is within this relative tolerance of the minimum form the reported range."""

FLAT_MESSAGE = "d̃ barely matters here; PQ (d̃ = m) is as good"

DEFAULT_MAX_POINTS_PER_CENTROID: int = 16
"""Probes train on at most this many subvectors per centroid (faiss's knob; faiss's default is 256)."""

PROBE_COST_POINTS_PER_CENTROID: int = 64
"""With ``n_probes=None``, one subsampled probe per this many subvectors per centroid (at most 3).

A probe's cost is mostly its k-means++ initialisation (k sequential steps), nearly independent of its
sample size, while the exhaustive sweep it replaces costs m full runs whose Lloyd iterations grow with
n/k. Below 64 points per centroid a sweep is cheap, and more than one probe would cost more than 1/20
of it; layers whose probes use every subvector (n/k ≤ ``max_points_per_centroid``) get 3 probes.
"""

MAX_PROBES = 3

# Quantizer constants G(d) (normalised second moment) of the best known lattice quantizers:
# Z, A2, A3*, D4, D5*, E6*, E7*, E8 (Conway & Sloane, "Sphere Packings, Lattices and Groups", table 2.3).
_LATTICE_G = (
    1.0 / 12.0,
    5.0 / (36.0 * math.sqrt(3.0)),
    0.0785432,
    0.0766032,
    0.0756254,
    0.0742437,
    0.0731165,
    0.0716821,
)

# Prior shapes, measured once on synthetic Gaussian data with k-means++ and Lloyd (k = 256, r = 4..256
# points per centroid); the probes correct both. Not tuned on any benchmark layer.
_EFFICIENCY_EXPONENT = -0.045  # k-means distortion / Zador estimate ≈ d^-0.045 (0.99 at d = 1, 0.90 at d = 9)
_PRIOR_BETA = (2.0, 6.5)  # β(d) ≈ 2 + 6.5/d for Gaussian data
_SLOPE_SHRINKAGE = 0.2  # probe noise (≈ 2 %) / prior spread of the calibration slope (≈ 0.1)
_LOW_END_FRACTION = 1.0 / 8.0  # the lowest probe sits where the curve reaches 1/8 of its value at the knee
_NEIGHBOURS = 8  # w-th nearest neighbour of the density estimator
_DENSITY_SAMPLE = 4096  # subvectors used by the density estimate
# Lloyd iterations of a probe: after 20 the distortion was within 0.2 % of its converged value on every
# MiniLM layer tried (0.5 % after 10), far below the model's other errors; a few probes need 30–40.
_PROBE_MAX_ITER = 20


# --------------------------------------------------------------------------------------------------
# Theory
# --------------------------------------------------------------------------------------------------


def water_filling(eigenvalues: Any, k: int) -> tuple[float, int]:
    """Reverse water-filling of log2(k) bits over Gaussian components: the water level and the knee.

    Solves ``Σ_i max(0, ½·log2(λ_i / θ)) = log2(k)`` for θ. Components with ``λ_i ≤ θ`` get no bits;
    the knee is the number of components above the water level, ``#{λ_i > θ}``.

    Parameters
    ----------
    eigenvalues : array-like of shape (m,)
        Non-negative component variances (any scale, any order).
    k : int
        Number of centroids (log2(k) bits per subvector), k >= 2.

    Returns
    -------
    theta : float
        Water level, in the units of ``eigenvalues``.
    knee : int
        Number of components with λ_i > θ (at least 1).

    Raises
    ------
    InvalidParameterError
        If k < 2 or no eigenvalue is positive.

    Examples
    --------
    Two components, 2 bits (k = 4): θ = √(λ1·λ2)/4 when both are active.

    >>> theta, knee = water_filling([4.0, 1.0], k=4)
    >>> round(theta, 6), knee
    (0.5, 2)
    >>> water_filling([4.0, 0.01], k=4)[1]
    1
    """
    k = check_k(k)
    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64).ravel())[::-1]
    if lam.size == 0 or not lam[0] > 0:
        raise InvalidParameterError(f"eigenvalues={eigenvalues!r} hold no positive value; water-filling needs one")
    rate = math.log2(k)
    positive = int(np.sum(lam > 0))
    log_theta = 0.0
    for active in range(positive, 0, -1):
        log_theta = (float(np.sum(np.log2(lam[:active]))) - 2.0 * rate) / active
        if math.log2(lam[active - 1]) > log_theta:
            return 2.0**log_theta, active
    return 2.0**log_theta, 1  # unreachable: one component is always above its own level (k >= 2)


def quantizer_constant(d: int) -> float:
    """Normalised second moment G(d) of a good d-dimensional quantizer cell.

    The best known lattice quantizers for d ≤ 8 (1/12 for d = 1, the hexagonal lattice for d = 2, …,
    E8); above 8 the sphere lower bound ``Γ(d/2+1)^(2/d) / ((d+2)·π)``, scaled to meet E8 at d = 8.

    Examples
    --------
    >>> round(quantizer_constant(1), 6), round(quantizer_constant(8), 6)
    (0.083333, 0.071682)
    >>> quantizer_constant(16) < quantizer_constant(8)
    True
    """
    if d <= len(_LATTICE_G):
        return _LATTICE_G[d - 1]

    def sphere(n: int) -> float:
        return math.exp(2.0 / n * float(gammaln(n / 2.0 + 1.0))) / ((n + 2) * math.pi)

    return sphere(d) * _LATTICE_G[-1] / sphere(len(_LATTICE_G))


def _nearest_neighbour_distance_1d(values: np.ndarray, w: int) -> np.ndarray:
    """Distance of every sample to its w-th nearest neighbour among the others (1-D, O(n·w))."""
    xs = np.sort(values)
    n = xs.size
    padded = np.concatenate([np.full(w, -np.inf), xs, np.full(w, np.inf)])
    best = np.full(n, np.inf)
    for right in range(w + 1):  # `right` neighbours above the point and w − right below
        upper = padded[w + right : w + right + n] - xs
        lower = xs - padded[right : right + n]
        np.minimum(best, np.maximum(upper, lower), out=best)
    return best


def _log_density_power_integral(values: np.ndarray, alphas: np.ndarray, w: int = _NEIGHBOURS) -> np.ndarray:
    """log ∫ p(x)^α dx of a 1-D sample for each α in (0, 1): Leonenko–Pronzato–Savani kNN estimator."""
    n = values.size
    w = min(w, n - 1)
    distance = np.maximum(_nearest_neighbour_distance_1d(values, w), np.finfo(np.float64).tiny)
    log_volume = math.log(n - 1) + math.log(2.0) + np.log(distance)  # (n − 1)·V_1·ρ, V_1 = 2
    out = np.empty(alphas.size)
    for i, alpha in enumerate(alphas):
        q = 1.0 - alpha
        log_c = (float(gammaln(w)) - float(gammaln(w + 1.0 - alpha))) / q
        z = q * (log_volume + log_c)
        top = float(z.max())
        out[i] = top + math.log(float(np.mean(np.exp(z - top))))
    return out


def zador_estimate(coordinates: np.ndarray, k: int) -> np.ndarray:
    """High-rate (Zador) distortion estimate of k-means on the first d columns, for d = 1..m.

    ``Q(d) = d · G(d) · k^(−2/d) · Π_{i≤d} (∫ p_i^α)^(1/α)`` with α = d/(d+2): Zador's formula for
    the product of the coordinates' marginal densities p_i, estimated from the sample. For Gaussian
    coordinates it equals the Gaussian formula ``d·G(d)·2π((d+2)/d)^((d+2)/2)·(Π σ_i²)^(1/d)·k^(−2/d)``.

    Parameters
    ----------
    coordinates : numpy.ndarray of shape (n, m)
        A sample of principal coordinates (columns in decreasing order of energy).
    k : int
        Number of centroids.

    Returns
    -------
    numpy.ndarray of shape (m,)
        Mean squared distortion per point (the units of ``coordinates`` squared).

    Examples
    --------
    >>> import numpy as np
    >>> z = np.random.default_rng(0).normal(size=(20000, 2))
    >>> gaussian = 2 * quantizer_constant(2) * 2 * np.pi * 2.0**2 / 256  # d = 2, unit variances
    >>> bool(abs(zador_estimate(z, 256)[1] / gaussian - 1) < 0.05)
    True
    """
    z = np.asarray(coordinates, dtype=np.float64)
    m = z.shape[1]
    dims = np.arange(1, m + 1)
    alphas = dims / (dims + 2.0)
    log_integrals = np.array([_log_density_power_integral(z[:, i], alphas) for i in range(m)])  # (coordinate, d)
    estimate = np.empty(m)
    for j, d in enumerate(dims):
        log_norm = float(np.sum(log_integrals[:d, j])) / alphas[j]
        estimate[j] = d * quantizer_constant(int(d)) * k ** (-2.0 / d) * math.exp(log_norm)
    return estimate


def in_sample_factor(points_per_centroid: Any, beta: Any) -> Any:
    """In-sample k-means distortion with r points per centroid, as a fraction of its r → ∞ value.

    ``r / (r + β)``: k-means fits its own training points, so its distortion on them falls short of
    the population value by a relative ``β/r`` to first order.

    Examples
    --------
    >>> in_sample_factor(16, 4.0)
    0.8
    """
    return points_per_centroid / (points_per_centroid + beta)


def _kappa(points_per_centroid: float) -> float:
    """Ratio of the in-sample shortfall β to r·(held-out/train − 1); ½ asymptotically."""
    return 0.5 + 0.47 / math.sqrt(points_per_centroid)


def _beta_from_probe(probe: ProbeResult) -> float:
    """β of r/(r+β) read off the held-out (far outliers capped) vs training error of a probe."""
    r = probe.points_per_centroid
    gap = probe.heldout_capped_error / probe.train_error - 1.0 if probe.train_error > 0 else 0.0
    return max(_kappa(r) * r * gap, 0.0)


def _capped_curve(quantized: np.ndarray, eigenvalues: np.ndarray, knee: int, skip_factor: float) -> np.ndarray:
    """min over j ≤ min(d̃, knee) of quantized(j) + skip_factor·Σ_{j<i≤d̃} λ_i, for d̃ = 1..m."""
    m = eigenvalues.size
    skipped = skip_factor * np.concatenate([[0.0], np.cumsum(eigenvalues)])  # skipped[i] = Σ_{l<i} λ_l
    with_zero = np.concatenate([[0.0], quantized])  # j = 0: every dimension skipped
    curve = np.empty(m)
    for d in range(1, m + 1):
        j = np.arange(0, min(d, knee) + 1)
        curve[d - 1] = float(np.min(with_zero[j] + skipped[d] - skipped[j]))
    return curve


def crossing_d_tilde(lowrank: Any, clustering: Any) -> int:
    """Smallest d̃ (1-based) at which the clustering error reaches the low-rank error.

    The low-rank error falls to 0 at d̃ = m, so a crossing always exists.

    Parameters
    ----------
    lowrank, clustering : array-like of shape (m,)
        The two error curves at d̃ = 1..m.

    Examples
    --------
    >>> crossing_d_tilde([0.5, 0.3, 0.1, 0.0], [0.05, 0.2, 0.35, 0.4])
    3
    """
    low = np.asarray(lowrank, dtype=np.float64)
    clu = np.asarray(clustering, dtype=np.float64)
    return int(np.argmax(clu >= low)) + 1


def _check_predictor(predictor: Any, has_output: bool, name: str | None = None) -> str:
    if predictor not in PREDICTORS:
        raise InvalidParameterError(f"{layer_label(name)}predictor={predictor!r} is invalid; allowed: {PREDICTORS}")
    if predictor.endswith("-output") and not has_output:
        raise InvalidParameterError(
            f"{layer_label(name)}predictor={predictor!r} needs output-space curves: pass calibration= (inputs) and "
            "model= (the nn.Module) to analyze/predict_d_tilde"
        )
    return str(predictor)


def objective_curve(
    predictor: str,
    rho: float,
    lowrank: np.ndarray,
    clustering: np.ndarray,
    lowrank_output: np.ndarray | None = None,
    clustering_output: np.ndarray | None = None,
) -> np.ndarray:
    """The predicted total each rule trades off, d̃ = 1..m (what the d̃ range is read from).

    ``rho``: ρ·lowrank + clustering; ``crossing``: max(lowrank, clustering), whose minimum sits at the
    crossing; the ``-output`` rules use the output-space curves; the weight-blind rules (``half``,
    ``knee``, ``pq``) are judged by the ρ-model's total (output space when available).
    """
    output = lowrank_output is not None and clustering_output is not None
    if predictor in ("crossing", "crossing-output"):
        low, clu = (lowrank_output, clustering_output) if predictor == "crossing-output" else (lowrank, clustering)
        return np.maximum(np.asarray(low), np.asarray(clu))
    if predictor == "rho" or not output:
        return rho * lowrank + clustering
    return rho * np.asarray(lowrank_output) + np.asarray(clustering_output)


def choose_d_tilde(
    predictor: str,
    m: int,
    knee: int,
    rho: float,
    lowrank: np.ndarray,
    clustering: np.ndarray,
    lowrank_output: np.ndarray | None = None,
    clustering_output: np.ndarray | None = None,
) -> int:
    """d̃ by the named rule of :data:`PREDICTORS` (curves are d̃ = 1..m; ties go to the smallest d̃).

    Parameters
    ----------
    predictor : str
        A rule of :data:`PREDICTORS`.
    m, knee : int
        Subvector size and reverse water-filling knee.
    rho : float
        Share of the low-rank error training does not recover (``rho`` rules).
    lowrank, clustering : numpy.ndarray of shape (m,)
        Weight-space curves.
    lowrank_output, clustering_output : numpy.ndarray of shape (m,), optional
        Output-space curves (the ``-output`` rules).

    Examples
    --------
    >>> low, clu = np.array([0.5, 0.2, 0.0]), np.array([0.1, 0.25, 0.3])
    >>> [choose_d_tilde(p, 3, 3, 0.85, low, clu) for p in ("rho", "crossing", "half", "knee", "pq")]
    [3, 2, 1, 3, 3]
    """
    if predictor == "half":
        return max(1, m // 2)
    if predictor == "pq":
        return m
    if predictor == "knee":
        return int(knee)
    if predictor == "crossing":
        return crossing_d_tilde(lowrank, clustering)
    if predictor == "crossing-output":
        return crossing_d_tilde(lowrank_output, clustering_output)
    total = objective_curve(predictor, rho, lowrank, clustering, lowrank_output, clustering_output)
    return int(np.argmax(total <= total.min() + 1e-12)) + 1


def _within(total: np.ndarray, tolerance: float) -> np.ndarray:
    """1-based d̃ whose total is within ``tolerance`` (relative) of the minimum."""
    return np.nonzero(total <= total.min() * (1.0 + tolerance) + 1e-12)[0] + 1


def near_best_range(
    objective: Any, tolerance: float = DEFAULT_TOLERANCE, d_tilde: int | None = None
) -> tuple[int, int]:
    """The reported d̃ range: smallest and largest d̃ whose objective is within ``tolerance`` of its minimum.

    Every d̃ range of the package (``TradeoffModel.d_tilde_range_``, the global range of
    :func:`global_d_tilde`, report.md, ``to_frame()`` and the shaded bands of :mod:`~lr2vq_analysis.plots`)
    is this function of a rule's objective (:func:`objective_curve`). The range spans the d̃ with
    ``objective(d̃) <= min · (1 + tolerance)`` (1e-12 absolute slack for rounding) and, when given,
    ``d_tilde`` (a rule such as ⌊m/2⌋ may choose a d̃ outside that set); the d̃ inside the span need
    not all be within the tolerance when the objective has two valleys.

    Parameters
    ----------
    objective : array-like of shape (m,)
        The predicted total at d̃ = 1..m.
    tolerance : float, default DEFAULT_TOLERANCE
        Relative tolerance, >= 0.
    d_tilde : int, optional
        The rule's d̃, always inside the range.

    Returns
    -------
    (int, int)

    Raises
    ------
    InvalidParameterError
        If ``tolerance`` is not a finite number >= 0 or ``objective`` is empty.

    Examples
    --------
    >>> near_best_range([0.30, 0.104, 0.100, 0.1045, 0.2], tolerance=0.05)
    (2, 4)
    >>> near_best_range([0.30, 0.104, 0.100, 0.1045, 0.2], tolerance=0.02)
    (3, 3)
    >>> near_best_range([0.30, 0.104, 0.100, 0.1045, 0.2], tolerance=0.02, d_tilde=1)
    (1, 3)
    """
    values = np.asarray(objective, dtype=np.float64).ravel()
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise InvalidParameterError(f"tolerance={tolerance!r} is invalid; it must be a number >= 0")
    if values.size == 0:
        raise InvalidParameterError("the objective is empty; it needs one value per d̃ = 1..m")
    inside = [int(d) for d in _within(values, float(tolerance))]
    if d_tilde is not None:
        inside.append(int(d_tilde))
    return min(inside), max(inside)


def is_flat(objective: Any, tolerance: float = DEFAULT_TOLERANCE) -> bool:
    """True when d̃ = m (plain PQ) is within ``tolerance`` of the objective's minimum: d̃ barely matters.

    The one flatness test behind ``TradeoffModel.flat_``, :func:`global_d_tilde` and the figures.

    Parameters
    ----------
    objective : array-like of shape (m,)
        The predicted total at d̃ = 1..m.
    tolerance : float, default DEFAULT_TOLERANCE
        Relative tolerance, >= 0.

    Returns
    -------
    bool

    Examples
    --------
    >>> is_flat([0.30, 0.104, 0.100, 0.1045], tolerance=0.05), is_flat([0.3, 0.1, 0.2])
    (True, False)
    """
    values = np.asarray(objective, dtype=np.float64).ravel()
    return near_best_range(values, tolerance)[1] == values.size


# --------------------------------------------------------------------------------------------------
# The fitted model
# --------------------------------------------------------------------------------------------------


class TradeoffModel:
    """Fitted model of a layer's low-rank, clustering and total error over d̃ = 1..m.

    Built by :func:`fit_tradeoff`; constructor arguments are the fitted state (used by
    :meth:`from_dict`). Errors are fractions of ‖W‖².

    Parameters
    ----------
    k, m : int
        Number of centroids and subvector size.
    rho : float
        Share of the low-rank error that training does not recover, in (0, 1].
    eigenvalues : array of shape (m,)
        Relative eigenvalues of the subvectors' Gram matrix (decreasing, sum 1).
    lowrank_curve, clustering_curve : array of shape (m,)
        Exact low-rank error and modelled clustering error for d̃ = 1..m.
    knee : int
        Reverse water-filling knee (:func:`water_filling` on the eigenvalues).
    probes : mapping int -> float
        Measured clustering error at each probed d̃: the error over all subvectors of the probe's
        codebook. A subsampled probe's codebook was trained on ``k · max_points_per_centroid``
        subvectors, so it lies above the curve, which models k-means on all subvectors;
        ``params["probe{i}_estimate"]`` holds the probe's estimate of the latter.
    params : mapping str -> float
        Fitted parameters and probe details (see :func:`fit_tradeoff`).
    n_subvectors : int
        Number of subvectors n.
    name : str, optional
        Layer name.
    predictor : str, optional
        The d̃ rule of :data:`PREDICTORS`; default :data:`DEFAULT_CALIBRATED_PREDICTOR` when the
        output-space curves are given, else :data:`DEFAULT_PREDICTOR`.
    lowrank_output_curve, clustering_output_curve : array of shape (m,), optional
        Output-space curves (both or neither; :func:`with_output_curves`).
    tolerance : float, default DEFAULT_TOLERANCE
        Relative tolerance of ``d_tilde_range_``.
    d_tilde_by_seed : mapping int -> int, optional
        d̃ given by the rule with the probes of other seeds (``fit_tradeoff(stability_seeds=...)``).

    Attributes
    ----------
    eigenvalues_, lowrank_curve_, clustering_curve_ : numpy.ndarray
    lowrank_output_curve_, clustering_output_curve_ : numpy.ndarray or None
    d_tilde_range_ : tuple of int
        Smallest and largest d̃ whose predicted total is within ``tolerance`` of the minimum.
    flat_ : bool
        d̃ = m is within the tolerance (:data:`FLAT_MESSAGE`).
    d_tilde_by_seed_ : dict[int, int]
    knee_ : int
    probes_ : dict[int, float]
    params_ : dict[str, float]
    n_subvectors_ : int
    """

    def __init__(
        self,
        k: int,
        m: int,
        rho: float,
        *,
        eigenvalues: Any,
        lowrank_curve: Any,
        clustering_curve: Any,
        knee: int,
        probes: Mapping[int, float],
        params: Mapping[str, float],
        n_subvectors: int,
        name: str | None = None,
        predictor: str | None = None,
        lowrank_output_curve: Any = None,
        clustering_output_curve: Any = None,
        tolerance: float = DEFAULT_TOLERANCE,
        d_tilde_by_seed: Mapping[int, int] | None = None,
    ) -> None:
        self.k = check_k(k, name=name)
        self.m = check_m(m, name=name)
        self.name = name
        self._rho = check_rho(rho)
        arrays = {}
        for label, value in (
            ("eigenvalues", eigenvalues),
            ("lowrank_curve", lowrank_curve),
            ("clustering_curve", clustering_curve),
        ):
            array = np.array(value, dtype=np.float64)
            if array.shape != (self.m,):
                raise InvalidParameterError(
                    f"{layer_label(name)}{label} has shape {array.shape}; it must have shape ({self.m},) for m={self.m}"
                )
            array.setflags(write=False)
            arrays[label] = array
        self.eigenvalues_: np.ndarray = arrays["eigenvalues"]
        self.lowrank_curve_: np.ndarray = arrays["lowrank_curve"]
        self.clustering_curve_: np.ndarray = arrays["clustering_curve"]
        self.knee_ = int(knee)
        self.probes_: dict[int, float] = {int(d): float(v) for d, v in sorted(probes.items())}
        self.params_: dict[str, float] = {str(key): float(v) for key, v in params.items()}
        self.n_subvectors_ = int(n_subvectors)
        outputs: list[np.ndarray | None] = []
        for label, value in (
            ("lowrank_output_curve", lowrank_output_curve),
            ("clustering_output_curve", clustering_output_curve),
        ):
            if value is None:
                outputs.append(None)
                continue
            array = np.array(value, dtype=np.float64)
            if array.shape != (self.m,):
                raise InvalidParameterError(
                    f"{layer_label(name)}{label} has shape {array.shape}; it must have shape ({self.m},) for m={self.m}"
                )
            array.setflags(write=False)
            outputs.append(array)
        if (outputs[0] is None) != (outputs[1] is None):
            raise InvalidParameterError(f"{layer_label(name)}give both output-space curves or neither")
        self.lowrank_output_curve_: np.ndarray | None = outputs[0]
        self.clustering_output_curve_: np.ndarray | None = outputs[1]
        if predictor is None:
            predictor = DEFAULT_CALIBRATED_PREDICTOR if outputs[0] is not None else DEFAULT_PREDICTOR
        self.predictor = _check_predictor(predictor, outputs[0] is not None, name)
        if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
            raise InvalidParameterError(
                f"{layer_label(name)}tolerance={tolerance!r} is invalid; it must be a number >= 0"
            )
        self.tolerance = float(tolerance)
        self.d_tilde_by_seed_: dict[int, int] = {int(s): int(d) for s, d in (d_tilde_by_seed or {}).items()}
        self._seed_clustering_curves: dict[int, np.ndarray] = {}  # set by fit_tradeoff(stability_seeds=...)

    # -- curves ---------------------------------------------------------------------------------------

    def _lookup(self, curve: np.ndarray, d: Any) -> Any:
        index = check_d_tilde_array(d, self.m, name=self.name) - 1
        values = curve[index]
        return float(values) if np.ndim(values) == 0 else values.copy()

    def lowrank(self, d: Any) -> Any:
        """Exact relative low-rank error at d̃ (int → float, array → array)."""
        return self._lookup(self.lowrank_curve_, d)

    def clustering(self, d: Any) -> Any:
        """Modelled relative k-means clustering error at d̃ (int → float, array → array)."""
        return self._lookup(self.clustering_curve_, d)

    def total(self, d: Any) -> Any:
        """``rho · lowrank(d̃) + clustering(d̃)`` (int → float, array → array)."""
        return self._lookup(self.total_curve, d)

    @property
    def total_curve(self) -> np.ndarray:
        """Total error for d̃ = 1..m."""
        return self._rho * self.lowrank_curve_ + self.clustering_curve_

    # -- read-only summaries --------------------------------------------------------------------------

    @property
    def rho(self) -> float:
        """Share of the low-rank error that end-to-end training does not recover."""
        return self._rho

    @property
    def has_output(self) -> bool:
        """True when output-space (calibrated) curves are present."""
        return self.lowrank_output_curve_ is not None

    def lowrank_output(self, d: Any) -> Any:
        """Exact relative output-space low-rank error at d̃ (needs calibration data)."""
        return self._lookup(self._output("lowrank_output_curve_"), d)

    def clustering_output(self, d: Any) -> Any:
        """Modelled relative output-space clustering error at d̃ (needs calibration data)."""
        return self._lookup(self._output("clustering_output_curve_"), d)

    def _output(self, attribute: str) -> np.ndarray:
        curve = getattr(self, attribute)
        if curve is None:
            raise InvalidParameterError(
                f"{layer_label(self.name)}no output-space curves: fit with calibration data (calibration= and model=)"
            )
        return cast(np.ndarray, curve)

    def objective(self, predictor: str | None = None) -> np.ndarray:
        """The predicted total the rule trades off, d̃ = 1..m (see :func:`objective_curve`)."""
        rule = self.predictor if predictor is None else _check_predictor(predictor, self.has_output, self.name)
        return objective_curve(
            rule,
            self._rho,
            self.lowrank_curve_,
            self.clustering_curve_,
            self.lowrank_output_curve_,
            self.clustering_output_curve_,
        )

    def predict(self, predictor: str | None = None) -> int:
        """d̃ by a named rule of :data:`PREDICTORS` (default: this model's ``predictor``)."""
        rule = self.predictor if predictor is None else _check_predictor(predictor, self.has_output, self.name)
        return choose_d_tilde(
            rule,
            self.m,
            self.knee_,
            self._rho,
            self.lowrank_curve_,
            self.clustering_curve_,
            self.lowrank_output_curve_,
            self.clustering_output_curve_,
        )

    @property
    def d_tilde(self) -> int:
        """Predicted clustering dimensionality by this model's ``predictor`` (:data:`PREDICTORS`).

        For ``"rho"``: argmin of the total over d̃ = 1..m (smallest on ties; totals within 1e-12 of the
        minimum count as ties, rounding in the eigenvalue tails).
        """
        return self.predict()

    @property
    def d_tilde_set_(self) -> list[int]:
        """Every d̃ whose predicted total (:meth:`objective`) is within ``tolerance`` of the minimum."""
        return [int(d) for d in _within(self.objective(), self.tolerance)]

    @property
    def d_tilde_range_(self) -> tuple[int, int]:
        """(smallest, largest) d̃ whose predicted total is within ``tolerance`` of the minimum, d̃ included."""
        return near_best_range(self.objective(), self.tolerance, self.d_tilde)

    @property
    def flat_(self) -> bool:
        """True when d = m (PQ) is within the tolerance: the curve is too flat for d̃ to matter."""
        return is_flat(self.objective(), self.tolerance)

    @property
    def flat_message_(self) -> str:
        """:data:`FLAT_MESSAGE` for a flat curve, else ``""``."""
        return FLAT_MESSAGE if self.flat_ else ""

    @property
    def knee(self) -> int:
        """Reverse water-filling knee: number of eigenvalues above the water level of log2(k) bits."""
        return self.knee_

    @property
    def probes(self) -> dict[int, float]:
        """Measured clustering error at each probed d̃ (error over all subvectors of the probe's codebook)."""
        return dict(self.probes_)

    @property
    def params(self) -> dict[str, float]:
        """Fitted parameters and probe details."""
        return dict(self.params_)

    def with_rho(self, rho: float) -> TradeoffModel:
        """The same fitted model with another ρ (no refit); d̃ moves, the curves do not.

        ρ only acts through the ρ-model, so a model whose rule is not ``"rho"``/``"rho-output"`` switches
        to ``"rho"``.
        """
        clone = TradeoffModel.from_dict(self.to_dict())
        clone._rho = check_rho(rho)
        if clone.predictor not in ("rho", "rho-output"):
            clone.predictor = "rho"
        return clone

    def with_clustering(self, clustering_curve: Any, clustering_output_curve: Any = None) -> TradeoffModel:
        """The same model with other clustering curves (e.g. from other probe seeds); no refit."""
        data = self.to_dict()
        data["clustering_curve"] = list(map(float, clustering_curve))
        if clustering_output_curve is not None:
            data["clustering_output_curve"] = list(map(float, clustering_output_curve))
        return TradeoffModel.from_dict(data)

    def with_predictor(self, predictor: str) -> TradeoffModel:
        """The same fitted model with another rule of :data:`PREDICTORS` (no refit)."""
        clone = TradeoffModel.from_dict(self.to_dict())
        clone.predictor = _check_predictor(predictor, self.has_output, self.name)
        return clone

    # -- serialisation --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; :meth:`from_dict` restores an identical model."""
        return {
            "k": self.k,
            "m": self.m,
            "rho": self._rho,
            "name": self.name,
            "eigenvalues": [float(v) for v in self.eigenvalues_],
            "lowrank_curve": [float(v) for v in self.lowrank_curve_],
            "clustering_curve": [float(v) for v in self.clustering_curve_],
            "knee": self.knee_,
            "probes": {str(d): v for d, v in self.probes_.items()},
            "params": dict(self.params_),
            "n_subvectors": self.n_subvectors_,
            "predictor": self.predictor,
            "tolerance": self.tolerance,
            "lowrank_output_curve": None
            if self.lowrank_output_curve_ is None
            else list(map(float, self.lowrank_output_curve_)),
            "clustering_output_curve": None
            if self.clustering_output_curve_ is None
            else list(map(float, self.clustering_output_curve_)),
            "d_tilde_by_seed": {str(seed): d for seed, d in self.d_tilde_by_seed_.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TradeoffModel:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(
                int(data["k"]),
                int(data["m"]),
                float(data["rho"]),
                eigenvalues=data["eigenvalues"],
                lowrank_curve=data["lowrank_curve"],
                clustering_curve=data["clustering_curve"],
                knee=int(data["knee"]),
                probes={int(d): float(v) for d, v in data["probes"].items()},
                params=data["params"],
                n_subvectors=int(data["n_subvectors"]),
                name=data.get("name"),
                predictor=data.get("predictor", "rho"),  # reports written before the rules existed used ρ
                lowrank_output_curve=data.get("lowrank_output_curve"),
                clustering_output_curve=data.get("clustering_output_curve"),
                tolerance=float(data.get("tolerance", DEFAULT_TOLERANCE)),
                d_tilde_by_seed={int(s): int(d) for s, d in (data.get("d_tilde_by_seed") or {}).items()},
            )
        except KeyError as exc:
            raise InvalidParameterError(f"trade-off model dict lacks the key {exc}") from None

    @property
    def d_tilde_(self) -> int:
        """Fitted-attribute name of :attr:`d_tilde` (scikit-learn's convention)."""
        return self.d_tilde

    @property
    def total_curve_(self) -> np.ndarray:
        """Fitted-attribute name of :attr:`total_curve`."""
        return self.total_curve

    def _repr_html_(self) -> str:
        """The curves over d̃ as a table, for Jupyter."""
        best = self.d_tilde_
        total = self.total_curve_
        rows = [
            [
                f"{d}{' ★' if d == best else ''}",
                f"{self.lowrank_curve_[d - 1]:.4g}",
                f"{self.clustering_curve_[d - 1]:.4g}",
                f"{self.probes_[d]:.4g}" if d in self.probes_ else "",
                f"{total[d - 1]:.4g}",
            ]
            for d in range(1, self.m + 1)
        ]
        summary = (
            f"<b>TradeoffModel</b>{' of ' + html_text(self.name) if self.name else ''}: k = {self.k}, m = {self.m}, "
            f"ρ = {self._rho:.3g}, knee = {self.knee_}, <b>d̃ = {best}</b> by rule {html_text(self.predictor)}, "
            "near-best {}–{} (within {:.0%} of the rule's minimum){} (errors: fraction of ‖W‖²)".format(
                *self.d_tilde_range_, self.tolerance, f"; {FLAT_MESSAGE}" if self.flat_ else ""
            )
        )
        header = ["d̃", "low-rank", "clustering (model)", "probe", f"total = {self._rho:.3g}·low-rank + clustering"]
        return html_block(summary, header, rows)

    def __repr__(self) -> str:
        label = f"name={self.name!r}, " if self.name else ""
        return (
            f"TradeoffModel({label}k={self.k}, m={self.m}, rho={self._rho:g}, predictor={self.predictor!r}, "
            f"d_tilde={self.d_tilde}, d_tilde_range={self.d_tilde_range_}, knee={self.knee_}, "
            f"probes={sorted(self.probes_)})"
        )


# --------------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------------


def _probe_dims(prior_curve: np.ndarray, knee: int, n_probes: int) -> list[int]:
    """Probe at the knee, where the prior curve reaches 1/8 of its knee value, and between (log scale)."""
    high = knee
    reaches = np.nonzero(prior_curve >= prior_curve[high - 1] * _LOW_END_FRACTION)[0]
    low = min(int(reaches[0]) + 1, high)
    middle = min(range(low, high + 1), key=lambda d: abs(math.log(d) - 0.5 * (math.log(low) + math.log(high))))
    chosen = {1: [middle], 2: [low, high], 3: [low, middle, high]}[n_probes]
    return sorted(set(chosen))


def _check_probe_options(n_probes: Any, max_points_per_centroid: Any) -> tuple[int | None, int | None]:
    return (
        check_param("n_probes", n_probes, high=MAX_PROBES),
        check_param("max_points_per_centroid", max_points_per_centroid),
    )


def _default_n_probes(points_per_centroid: float, max_points_per_centroid: int | None) -> int:
    """3 probes on small layers (every subvector), else one per 64 points per centroid, 1..3."""
    if max_points_per_centroid is None or points_per_centroid <= max_points_per_centroid:
        return MAX_PROBES
    return int(min(MAX_PROBES, max(1, points_per_centroid // PROBE_COST_POINTS_PER_CENTROID)))


def fit_tradeoff(
    weight: Any,
    k: int,
    m: int,
    *,
    rho: float = DEFAULT_RHO,
    seed: int = 0,
    name: str | None = None,
    n_probes: int | None = None,
    max_points_per_centroid: int | None = DEFAULT_MAX_POINTS_PER_CENTROID,
    device: str | torch.device | None = None,
    predictor: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    stability_seeds: int = 0,
) -> TradeoffModel:
    """Fit the trade-off model of one layer: exact low-rank curve, modelled clustering curve, d̃.

    The clustering error over d̃ = 1..m is predicted from the spectrum, a density estimate of the
    principal coordinates (capped Zador curve with the reverse water-filling knee) and ``n_probes``
    k-means runs, each on at most ``k · max_points_per_centroid`` subvectors; the n/k dependence of
    k-means' in-sample error is modelled so that the prediction refers to k-means on *all*
    subvectors. See the module docstring and ``docs/theory.md``.

    Parameters
    ----------
    weight : array-like or torch.Tensor
        A Linear, Conv1d or Conv2d weight.
    k : int
        Number of centroids, ``2 <= k <`` number of subvectors.
    m : int
        Subvector size; must divide the row length.
    rho : float, default DEFAULT_RHO
        Share of the low-rank error that training does not recover, in (0, 1].
    seed : int, default 0
        Seed of the density sample and of the probes.
    name : str, optional
        Layer name, used in messages and kept on the model.
    n_probes : int, optional
        Number of k-means probes, 1..3. Default: 3 when the probes use every subvector, else one per
        :data:`PROBE_COST_POINTS_PER_CENTROID` subvectors per centroid (1..3), which keeps the fit
        about 20× cheaper than an exhaustive sweep.
    max_points_per_centroid : int or None, default 16
        Subsample size of each probe per centroid; ``None`` probes on all subvectors.
    device : str or torch.device, optional
        Where the probes run (default CPU).
    predictor : str, optional
        The d̃ rule (:data:`PREDICTORS`); default :data:`DEFAULT_PREDICTOR` (no calibration data here;
        :func:`with_output_curves` adds the output-space curves and rules).
    tolerance : float, default DEFAULT_TOLERANCE
        Relative tolerance of the reported d̃ range (``d_tilde_range_``).
    stability_seeds : int, default 0
        Refit the probes with this many further seeds (``seed + 1``, …) and keep the d̃ each gives in
        ``d_tilde_by_seed_`` (the stability of d̃ across probe seeds).

    Returns
    -------
    TradeoffModel
        ``params_`` holds ``calibration`` (c0), ``calibration_slope`` (c1), ``beta_const`` and
        ``beta_inv_d`` (β(d) = a + b/d), ``points_per_centroid`` (n/k), ``water_level`` (θ) and, per
        probe ``i``, ``probe{i}_d_tilde``, ``probe{i}_points_per_centroid``, ``probe{i}_train_error``,
        ``probe{i}_heldout_error``, ``probe{i}_isolated`` (held-out subvectors farther from every
        centroid than one centroid's worth of distortion, their error capped), ``probe{i}_beta`` and
        ``probe{i}_estimate`` (the probe's estimate of
        the in-sample error on all subvectors).

    Raises
    ------
    InvalidParameterError
        If k, m, rho, seed, n_probes or max_points_per_centroid is invalid, or m does not divide the
        row length.
    InvalidWeightsError
        If the weight has the wrong rank or holds NaN/Inf, or is all zeros.

    Examples
    --------
    >>> import numpy as np
    >>> w = np.random.default_rng(0).laplace(size=(64, 32, 3, 3))
    >>> model = fit_tradeoff(w, k=32, m=9, rho=0.85)
    >>> 1 <= model.d_tilde <= 9, len(model.probes) <= 3
    (True, True)
    >>> round(model.lowrank(9), 12), bool(model.clustering(1) < model.clustering(9))
    (0.0, True)
    """
    rho = check_rho(rho)
    seed = check_seed(seed)
    n_probes, max_points_per_centroid = _check_probe_options(n_probes, max_points_per_centroid)
    m = check_m(m, name=name)
    x = to_subvectors(weight, m, name=name)
    n = int(x.shape[0])
    k = check_k(k, n, name=name)
    if n_probes is None:
        n_probes = _default_n_probes(n / k, max_points_per_centroid)
    if not isinstance(stability_seeds, (int, np.integer)) or isinstance(stability_seeds, bool) or stability_seeds < 0:
        raise InvalidParameterError(f"stability_seeds={stability_seeds!r} is invalid; it must be an integer >= 0")
    rule = predictor or DEFAULT_PREDICTOR
    with single_threaded(device):
        spectrum = compute_spectrum(x, name=name)
        model = _fit(spectrum, x, k, rho, seed, name, n_probes, max_points_per_centroid, device)
        seed_curves = {seed: model.clustering_curve_}
        for extra in range(1, int(stability_seeds) + 1):
            other = _fit(spectrum, x, k, rho, seed + extra, name, n_probes, max_points_per_centroid, device)
            seed_curves[seed + extra] = other.clustering_curve_
    data = model.to_dict()
    data.update(predictor=rule, tolerance=tolerance)
    fitted = TradeoffModel.from_dict(data)
    if stability_seeds:
        fitted.d_tilde_by_seed_ = {s: fitted.with_clustering(c).predict() for s, c in seed_curves.items()}
    fitted._seed_clustering_curves = seed_curves if stability_seeds else {}
    return fitted


def _fit(
    spectrum: Spectrum,
    x: np.ndarray,
    k: int,
    rho: float,
    seed: int,
    name: str | None,
    n_probes: int,
    max_points_per_centroid: int | None,
    device: Any,
) -> TradeoffModel:
    n, m = x.shape
    energy = spectrum.total_energy
    eigenvalues = spectrum.relative_eigenvalues
    points_per_centroid = n / k
    # Past the knee a dimension adds its energy λ, less what the cell means absorb in-sample (1/r).
    skip_factor = 1.0 - 1.0 / points_per_centroid
    dims = np.arange(1, m + 1)
    water_level, knee = water_filling(eigenvalues, k)

    # Theory: Zador estimate from a sample of the principal coordinates, in units of ‖W‖².
    rng = np.random.default_rng(seed)
    sample = spectrum.project(x if n <= _DENSITY_SAMPLE else x[rng.choice(n, _DENSITY_SAMPLE, replace=False)], m)
    zador = zador_estimate(sample, k) * n / energy
    efficiency = dims**_EFFICIENCY_EXPONENT
    prior_beta = _PRIOR_BETA[0] + _PRIOR_BETA[1] / dims

    # Where to probe: at the knee, where the prior curve reaches 1/8 of its knee value, and between.
    prior_quantized = efficiency * zador * in_sample_factor(points_per_centroid, prior_beta)
    prior_curve = _capped_curve(prior_quantized, eigenvalues, knee, skip_factor)
    probe_dims = _probe_dims(prior_curve, knee, n_probes)

    subsample = (
        max_points_per_centroid if max_points_per_centroid and points_per_centroid > max_points_per_centroid else None
    )
    probes: list[ProbeResult] = [
        run_probe(
            spectrum,
            x,
            k,
            d,
            seed=seed + i,
            max_points_per_centroid=subsample,
            max_iter=_PROBE_MAX_ITER,
            device=device,
            name=name,
        )
        for i, d in enumerate(probe_dims)
    ]

    # β(d) from the probes (a + b/d), or the Gaussian prior when the probes used every subvector.
    betas = {p.d_tilde: _beta_from_probe(p) for p in probes if p.subsampled}
    measured_betas = np.array(list(betas.values()))
    if len(betas) >= 2:
        design = np.column_stack([np.ones(len(betas)), 1.0 / np.array(list(betas))])
        beta_const, beta_inv_d = np.linalg.lstsq(design, measured_betas, rcond=None)[0]
        # Two or three noisy points: do not extrapolate beyond the range they span.
        beta = np.clip(beta_const + beta_inv_d / dims, measured_betas.min(), measured_betas.max())
    else:
        scale = 1.0
        if len(betas) == 1:
            ((d0, b0),) = betas.items()
            scale = b0 / prior_beta[d0 - 1]
        beta_const, beta_inv_d = _PRIOR_BETA[0] * scale, _PRIOR_BETA[1] * scale
        beta = beta_const + beta_inv_d / dims

    # Each probe's estimate of the in-sample error on all n subvectors.
    estimates = {}
    for p in probes:
        if p.subsampled:
            b = betas[p.d_tilde]
            estimates[p.d_tilde] = (
                p.train_error * in_sample_factor(points_per_centroid, b) / in_sample_factor(p.points_per_centroid, b)
            )
        else:
            estimates[p.d_tilde] = p.train_error

    # Calibration c(d) = c0·d^c1 through the probes (least squares in log space, slope shrunk to 0).
    shape = efficiency * zador * in_sample_factor(points_per_centroid, beta)
    probed = np.array(sorted(estimates))
    log_ratio = np.log([max(estimates[d], 1e-300) / max(shape[d - 1], 1e-300) for d in probed])
    centre = float(np.mean(np.log(probed)))
    design = np.column_stack([np.ones(probed.size), np.log(probed) - centre])
    penalty = np.diag([0.0, _SLOPE_SHRINKAGE**2])
    log_c0, slope = np.linalg.solve(design.T @ design + penalty, design.T @ log_ratio)
    calibration = np.exp(log_c0 + slope * (np.log(dims) - centre))

    clustering = _capped_curve(calibration * shape, eigenvalues, knee, skip_factor)
    # Optimal k-means error cannot fall when a coordinate is added (drop it from the centroids), nor
    # exceed the energy kept; the density estimate can break the first with atoms (pruned weights).
    clustering = np.clip(np.maximum.accumulate(clustering), 0.0, np.cumsum(eigenvalues))

    params: dict[str, float] = {
        "calibration": float(math.exp(log_c0 - slope * centre)),
        "calibration_slope": float(slope),
        "beta_const": float(beta_const),
        "beta_inv_d": float(beta_inv_d),
        "points_per_centroid": float(points_per_centroid),
        "water_level": float(water_level),
    }
    for i, p in enumerate(probes):
        params[f"probe{i}_d_tilde"] = float(p.d_tilde)
        params[f"probe{i}_points_per_centroid"] = float(p.points_per_centroid)
        params[f"probe{i}_train_error"] = float(p.train_error)
        params[f"probe{i}_heldout_error"] = float(p.heldout_error)
        params[f"probe{i}_isolated"] = float(p.n_isolated)
        params[f"probe{i}_beta"] = float(betas.get(p.d_tilde, beta[p.d_tilde - 1]))
        params[f"probe{i}_estimate"] = float(estimates[p.d_tilde])

    return TradeoffModel(
        k,
        m,
        rho,
        eigenvalues=eigenvalues,
        lowrank_curve=spectrum.lowrank_error(),
        clustering_curve=clustering,
        knee=knee,
        probes={p.d_tilde: p.error for p in probes},
        params=params,
        n_subvectors=n,
        name=name,
    )


# --------------------------------------------------------------------------------------------------
# Output space (calibration data)
# --------------------------------------------------------------------------------------------------


def _even_spread_factor(spectrum: Spectrum, hbar: np.ndarray, output_energy: float) -> np.ndarray:
    """Output / weight ratio of an error spread evenly over the top-d̃ directions, d̃ = 1..m.

    An error with covariance ``s·V_d V_dᵀ`` per subvector costs ``s·tr(V_dᵀ H̄ V_d)`` in the output
    (:func:`~lr2vq_analysis.calibration.block_metric`), against ``s·d̃`` in weight space.
    """
    v = spectrum.eigenvectors
    per_direction = np.einsum("ai,ab,bi->i", v, hbar, v)
    dims = np.arange(1, spectrum.m + 1)
    return np.cumsum(per_direction) / dims * spectrum.total_energy / output_energy


def with_output_curves(
    model: TradeoffModel,
    weight: Any,
    metric: Any,
    *,
    seed: int = 0,
    max_points_per_centroid: int | None = DEFAULT_MAX_POINTS_PER_CENTROID,
    predictor: str | None = None,
) -> TradeoffModel:
    """The model with output-space curves: exact low-rank error under H, modelled clustering error under H.

    - **Low rank** (exact): :func:`~lr2vq_analysis.calibration.lowrank_output_curve`, the output error
      ``tr(ΔW H ΔWᵀ)/tr(W H Wᵀ)`` of projecting every subvector on the top-d̃ weight-space directions.
    - **Clustering** (modelled): k-means residuals are independent between subvectors and, in the
      high-rate regime, spread evenly over the d̃ kept directions; so the weight-space curve is
      multiplied by ``‖W‖²·tr(V_dᵀ H̄ V_d)/(d̃·tr(W H Wᵀ))`` (H̄: :func:`~lr2vq_analysis.calibration.block_metric`),
      then by one constant fitted to k-means at the model's probe d̃ (same seeds and subsample size),
      whose output-space error is computed exactly (``params_["output_scale"]``, per probe
      ``probe{i}_output_error``).

    Parameters
    ----------
    model : TradeoffModel
        From :func:`fit_tradeoff` on ``weight``.
    weight : array-like or torch.Tensor
        The layer weight.
    metric : array of shape (groups, L, L)
        Its input second moment (:func:`~lr2vq_analysis.calibration.collect_second_moments`).
    seed : int, default 0
        Seed of the probes (as given to :func:`fit_tradeoff`).
    max_points_per_centroid : int or None, default 16
        Subsample of the probes.
    predictor : str, optional
        The rule of the returned model; default :data:`DEFAULT_CALIBRATED_PREDICTOR`.

    Returns
    -------
    TradeoffModel
    """
    name = model.name
    x = to_subvectors(weight, model.m, name=name)
    spectrum = compute_spectrum(x)
    metric = np.asarray(metric, dtype=np.float64)
    lowrank = lowrank_output_curve(weight, metric, spectrum.eigenvectors, name=name)
    hbar = block_metric(metric, model.m, name=name)
    w = np.asarray(weight.detach().cpu() if isinstance(weight, torch.Tensor) else weight, dtype=np.float64)
    grouped = w.reshape(metric.shape[0], -1, metric.shape[-1])
    output_energy = float(np.sum((grouped @ metric) * grouped))  # tr(W H Wᵀ)
    factor = _even_spread_factor(spectrum, hbar, output_energy)
    params = dict(model.params_)
    ratios = []
    probe_dims = [int(params[key]) for key in sorted(params) if key.startswith("probe") and key.endswith("_d_tilde")]
    n = x.shape[0]
    subsample = max_points_per_centroid if max_points_per_centroid and n / model.k > max_points_per_centroid else None
    with single_threaded(None):
        for i, d in enumerate(probe_dims):
            z = spectrum.project(x, d)
            result = kmeans(
                torch.as_tensor(z, dtype=torch.float32),
                model.k,
                seed=seed + i,
                max_iter=_PROBE_MAX_ITER,
                max_points_per_centroid=subsample,
                name=name,
            )
            centroids = result.centroids.double().numpy()
            residual = z - centroids[result.labels.numpy()]
            weight_error = float(np.sum(residual**2)) / spectrum.total_energy
            approx = w - (residual @ spectrum.projection(d)).reshape(w.shape)
            measured = output_error(w, approx, metric, name=name)
            params[f"probe{i}_output_error"] = measured
            if weight_error > 0 and measured > 0:
                ratios.append(math.log(measured / (weight_error * factor[d - 1])))
    scale = math.exp(float(np.mean(ratios))) if ratios else 1.0
    params["output_scale"] = scale
    clustering = np.maximum.accumulate(model.clustering_curve_ * factor * scale)
    data = model.to_dict()
    data.update(
        params=params,
        lowrank_output_curve=lowrank,
        clustering_output_curve=clustering,
        predictor=predictor or DEFAULT_CALIBRATED_PREDICTOR,
    )
    calibrated = TradeoffModel.from_dict(data)
    # d̃ per probe seed: each seed's weight-space clustering curve, mapped to the output by the same factor.
    seeds = model._seed_clustering_curves
    calibrated.d_tilde_by_seed_ = {
        s: calibrated.with_clustering(c, np.maximum.accumulate(c * factor * scale)).predict() for s, c in seeds.items()
    }
    return calibrated


def calibrate_models(
    module: torch.nn.Module,
    calibration: Any,
    fitted: Mapping[str, tuple[Any, TradeoffModel]],
    *,
    seed: int = 0,
    predictor: str | None = None,
    max_bytes: int | None = None,
) -> dict[str, TradeoffModel]:
    """Add output-space curves to every fitted layer model, one layer's H at a time.

    Parameters
    ----------
    module : torch.nn.Module
        The model whose layers were analysed (weights under the same state-dict keys).
    calibration : tensor, list of batches or DataLoader
        Inputs (see :func:`~lr2vq_analysis.calibration.collect_second_moments`).
    fitted : mapping name -> (weight, TradeoffModel)
        The layers to calibrate.
    seed : int, default 0
    predictor : str, optional
        Rule of the returned models (default :data:`DEFAULT_CALIBRATED_PREDICTOR`).
    max_bytes : int, optional
        Memory for H per calibration pass.

    Returns
    -------
    dict name -> TradeoffModel
        The per-layer output-space sensitivity: ``lowrank_output_curve_`` and ``clustering_output_curve_``.
    """
    options = {} if max_bytes is None else {"max_bytes": max_bytes}
    out: dict[str, TradeoffModel] = {}
    for moment in collect_second_moments(module, calibration, list(fitted), **options):
        weight, model = fitted[moment.name]
        out[moment.name] = with_output_curves(model, weight, moment.matrix, seed=seed, predictor=predictor)
    return out


def global_curves(models: Any, sizes: Any) -> dict[str, np.ndarray | None]:
    """Size-weighted mean curves over layers (lowrank, clustering and, when every layer has them, output)."""
    weights = np.asarray(sizes, dtype=np.float64)
    weights = weights / weights.sum()

    def mean(attribute: str) -> np.ndarray | None:
        curves = [getattr(model, attribute) for model in models]
        if any(curve is None for curve in curves):
            return None
        width = max(curve.size for curve in curves)  # per-layer m (specs): a curve stays at its d̃ = m value
        return cast(np.ndarray, weights @ np.stack([np.pad(c, (0, width - c.size), mode="edge") for c in curves]))

    return {
        "lowrank": mean("lowrank_curve_"),
        "clustering": mean("clustering_curve_"),
        "lowrank_output": mean("lowrank_output_curve_"),
        "clustering_output": mean("clustering_output_curve_"),
    }


def global_d_tilde(
    models: Any, sizes: Any, predictor: str | None = None, tolerance: float | None = None
) -> tuple[int, tuple[int, int], bool]:
    """One d̃ for a whole model by a rule of :data:`PREDICTORS`, size-weighted over layers.

    The curve rules work on the size-weighted mean curves; ``knee`` takes the size-weighted median of
    the layers' knees.

    Parameters
    ----------
    models : sequence of TradeoffModel
        One per layer, with the same m.
    sizes : sequence of int
        Weights per layer.
    predictor : str, optional
        Rule (default: the first model's ``predictor``).
    tolerance : float, optional
        Relative tolerance of the range (default: the first model's ``tolerance``).

    Returns
    -------
    d_tilde : int
    d_tilde_range : (int, int)
        Smallest and largest d̃ whose size-weighted predicted total is within the tolerance of the minimum.
    flat : bool
        True when d̃ = m is within the tolerance (:data:`FLAT_MESSAGE`).
    """
    models = list(models)
    first = models[0]
    curves = global_curves(models, sizes)
    has_output = curves["lowrank_output"] is not None
    rule = _check_predictor(first.predictor if predictor is None else predictor, has_output)
    weights = np.asarray(sizes, dtype=np.float64)
    order = np.argsort([model.knee_ for model in models])
    cumulative = np.cumsum(weights[order]) / weights.sum()
    knee = int(models[int(order[int(np.argmax(cumulative >= 0.5))])].knee_)
    low, clu = cast(np.ndarray, curves["lowrank"]), cast(np.ndarray, curves["clustering"])
    low_out, clu_out = curves["lowrank_output"], curves["clustering_output"]
    width = low.size  # the largest m over the layers
    d = choose_d_tilde(rule, width, knee, first._rho, low, clu, low_out, clu_out)
    objective = objective_curve(rule, first._rho, low, clu, low_out, clu_out)
    tolerance = first.tolerance if tolerance is None else tolerance
    return d, near_best_range(objective, tolerance, d), is_flat(objective, tolerance)


_RULE_TEXT = {
    "rho": "argmin of ρ·low-rank + clustering (weight space)",
    "rho-output": "argmin of ρ·low-rank + clustering in the layer outputs (calibration data)",
    "crossing": "smallest d̃ whose clustering error reaches the low-rank error (weight space)",
    "crossing-output": "smallest d̃ whose output-space clustering error reaches the output-space low-rank error "
    "(the default with calibration data; in the zoo 0.34 ± 0.26 points of regret below ⌊m/2⌋, not significant)",
    "half": "⌊m/2⌋: without calibration data the default, a weight-blind rule: no data-free rule beat it in the "
    "pre-registered zoo (held-out mean regret 0.63 points; crossing 0.59, ρ-model 1.44, d̃ = m 2.57; docs/results.md)",
    "knee": "the reverse water-filling knee",
    "pq": "d̃ = m (plain PQ)",
}


def prediction_note(models: Any, sizes: Any = None) -> str:
    """One sentence for reports: the rule, the d̃ range within the tolerance and the flatness flag.

    Parameters
    ----------
    models : list of TradeoffModel, or Report
        The layers' models (with ``sizes``), or a Report (its layers and sizes).
    sizes : list of int, optional
        Weights per layer.

    Examples
    --------
    >>> model = TradeoffModel(16, 4, 0.85, eigenvalues=[0.4, 0.3, 0.2, 0.1], lowrank_curve=[0.6, 0.3, 0.1, 0.0],
    ...     clustering_curve=[0.05, 0.1, 0.2, 0.3], knee=4, probes={}, params={}, n_subvectors=64)
    >>> prediction_note([model], [256])[:24]
    'rule `half`: ⌊m/2⌋: with'
    """
    if sizes is None:  # a Report
        sizes = [layer.n_weights for layer in models.layers]
        models = [layer.model for layer in models.layers]
    models = list(models)
    _, (low, high), flat = global_d_tilde(models, sizes)
    rule = models[0].predictor
    text = (
        f"rule `{rule}`: {_RULE_TEXT[rule]}; size-weighted over layers; the chosen d̃ and every d̃ whose predicted "
        f"total is within {models[0].tolerance:.0%} of the minimum span {low}–{high}"
    )
    return text + (f"; {FLAT_MESSAGE}" if flat else "")
