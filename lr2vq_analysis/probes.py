"""Measured k-means clustering error of a layer's low-rank coordinates Z (the "probes").

The clustering error at d̃ is the k-means distortion of Z = X·V_d̃, the top-d̃ principal coordinates of
the (n × m) subvector matrix X, as a fraction of ‖W‖². Because the centroids lie in span(V_d̃), the
reconstruction error of LR²VQ is exactly ``lowrank(d̃) + clustering(d̃)``.

:func:`clustering_error_curve` measures it at every d̃ (the exhaustive sweep, one k-means run per d̃);
:func:`run_probe` is the single measurement that :func:`~lr2vq_analysis.tradeoff.fit_tradeoff` uses to
calibrate its model, and reports both the error on the points that trained the centroids and the
error on all subvectors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._threads import single_threaded
from ._validation import (
    check_d_tilde,
    check_d_tilde_array,
    check_k,
    check_m,
    check_param,
    check_seed,
)
from .kmeans import assign, kmeans
from .spectrum import Spectrum, compute_spectrum
from .subvectors import to_subvectors

__all__ = ["DEFAULT_MAX_HELDOUT", "ProbeResult", "run_probe", "clustering_error", "clustering_error_curve"]


@dataclass(frozen=True)
class ProbeResult:
    """One k-means run on the top-d̃ principal coordinates of a layer.

    Errors are fractions of ‖W‖²; "scaled to the layer" means a mean over some subvectors times n.

    Attributes
    ----------
    d_tilde : int
        Clustering dimensionality.
    k : int
        Number of centroids.
    n_subvectors : int
        Number of subvectors of the layer (n).
    n_train : int
        Number of subvectors that trained the centroids (n unless subsampled).
    train_error : float
        Distortion on the training points, scaled to the layer: the in-sample error at
        ``n_train / k`` points per centroid.
    error : float
        Distortion of all n subvectors with the trained centroids; equal to ``train_error`` when not
        subsampled.
    n_iter : int
        Lloyd iterations run.
    n_isolated : int
        Held-out subvectors farther from every centroid than τ = ``(2/d̃)·(n/k)·`` the mean training
        distortion — the high-rate value of one centroid in k-means on all n subvectors, which would
        rather spend a centroid near such a point than leave it there; 0 when not subsampled.
    isolated_error : float
        By how much their summed distortion exceeds τ each (a fraction of ‖W‖², not scaled).
    """

    d_tilde: int
    k: int
    n_subvectors: int
    n_train: int
    train_error: float
    error: float
    n_iter: int
    n_isolated: int = 0
    isolated_error: float = 0.0

    @property
    def points_per_centroid(self) -> float:
        """Training points per centroid, ``n_train / k``."""
        return self.n_train / self.k

    @property
    def subsampled(self) -> bool:
        """True when fewer than all subvectors trained the centroids."""
        return self.n_train < self.n_subvectors

    @property
    def heldout_error(self) -> float:
        """Distortion of the subvectors that did not train the centroids, scaled to the layer.

        Equals :attr:`train_error` when not subsampled.
        """
        if not self.subsampled:
            return self.train_error
        n, t = self.n_subvectors, self.n_train
        return (self.error - self.train_error * t / n) * n / (n - t)

    @property
    def heldout_capped_error(self) -> float:
        """:attr:`heldout_error` with each held-out subvector's distortion capped at τ, scaled to the layer.

        A few far outliers missed by the subsample (a single subvector can hold 5 % of a
        transformer layer's energy) would otherwise dominate the held-out error.
        """
        if not self.subsampled:
            return self.train_error
        n, t = self.n_subvectors, self.n_train
        heldout_sum = self.error - self.train_error * t / n - self.isolated_error
        return heldout_sum * n / (n - t)


#: A subsampled probe measures its held-out error on at most this many held-out subvectors: the
#: :data:`HELDOUT_TOP` largest (where far outliers hide) exactly, plus a uniform sample of the rest.
DEFAULT_MAX_HELDOUT: int = 2**16
HELDOUT_TOP: int = 2**12


def _coordinates(
    spectrum: Spectrum, subvectors: np.ndarray, d_tilde: int, scale: float, rows: np.ndarray | None, device: Any
) -> torch.Tensor:
    """Float32 principal coordinates of the given rows (all rows when None), divided by ``scale``.

    Dividing by the subvectors' RMS norm puts k-means on unit-scale data, so its float32 distances
    neither overflow (weights at 1e19) nor underflow (weights at 1e-23).
    """
    x = subvectors if rows is None else subvectors[rows]
    z = np.asarray(x, dtype=np.float64) @ (spectrum.projection(d_tilde).T / scale)
    return torch.as_tensor(z, dtype=torch.float32, device=device)


def _heldout_sample(
    subvectors: np.ndarray, train_rows: np.ndarray, max_heldout: int | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out rows to assign and the number of held-out subvectors each stands for.

    All held-out rows when they are at most ``max_heldout``; else the :data:`HELDOUT_TOP` rows of
    largest norm (weight 1, so a far outlier is never missed) and a uniform sample of the others
    (each standing for its share of them): an unbiased estimate of the held-out sums.
    """
    n = subvectors.shape[0]
    heldout = np.ones(n, dtype=bool)
    heldout[train_rows] = False
    n_heldout = n - train_rows.size
    if max_heldout is None or n_heldout <= max_heldout:
        rows = np.flatnonzero(heldout)
        return rows, np.ones(rows.size)
    top_count = min(HELDOUT_TOP, max_heldout // 2)
    norms = np.einsum("ij,ij->i", subvectors, subvectors)
    norms[train_rows] = -1.0
    top = np.argpartition(norms, n - top_count)[n - top_count :]
    heldout[top] = False
    rest = np.flatnonzero(heldout)
    sample = rng.choice(rest, max_heldout - top_count, replace=False)
    weights = np.concatenate([np.ones(top_count), np.full(sample.size, rest.size / sample.size)])
    return np.concatenate([top, sample]), weights


def run_probe(
    spectrum: Spectrum,
    subvectors: np.ndarray,
    k: int,
    d_tilde: int,
    *,
    seed: int = 0,
    max_points_per_centroid: int | None = None,
    max_iter: int = 300,
    device: str | torch.device | None = None,
    name: str | None = None,
    max_heldout: int | None = DEFAULT_MAX_HELDOUT,
) -> ProbeResult:
    """Run k-means once on Z = top-d̃ principal coordinates and report its errors.

    Only the rows a probe uses are projected (each d̃ slices the same eigenvectors), and k-means runs
    on coordinates divided by the subvectors' RMS norm, so the errors do not depend on the scale.

    Parameters
    ----------
    spectrum : Spectrum
        Spectrum of ``subvectors`` (:func:`~lr2vq_analysis.spectrum.compute_spectrum`).
    subvectors : numpy.ndarray of shape (n, m)
        The layer's subvectors.
    k : int
        Number of centroids, ``2 <= k < n``.
    d_tilde : int
        Clustering dimensionality in 1..m.
    seed : int, default 0
        Seeds the subsample and k-means++.
    max_points_per_centroid : int, optional
        Train on at most ``k * max_points_per_centroid`` randomly chosen subvectors (faiss's knob).
    max_iter : int, default 300
        Maximum number of Lloyd iterations (the engine's default).
    device : str or torch.device, optional
        Where k-means runs (default CPU).
    name : str, optional
        Layer name, used in error messages.
    max_heldout : int or None, default DEFAULT_MAX_HELDOUT
        When subsampled, estimate the held-out errors from at most this many held-out subvectors
        (the :data:`HELDOUT_TOP` largest exactly, a uniform sample of the rest); None assigns all.

    Returns
    -------
    ProbeResult

    Raises
    ------
    InvalidParameterError
        If k, d_tilde, seed, max_points_per_centroid or max_heldout is invalid.

    Examples
    --------
    >>> import numpy as np
    >>> from lr2vq_analysis.spectrum import compute_spectrum
    >>> x = np.random.default_rng(0).normal(size=(400, 4))
    >>> probe = run_probe(compute_spectrum(x), x, k=8, d_tilde=2, max_points_per_centroid=25)
    >>> probe.n_train, probe.subsampled
    (200, True)
    """
    n = int(subvectors.shape[0])
    k = check_k(k, n, name=name)
    d_tilde = check_d_tilde(d_tilde, spectrum.m, name=name)
    seed = check_seed(seed)
    max_points_per_centroid = check_param("max_points_per_centroid", max_points_per_centroid)
    max_heldout = check_param("max_points_per_centroid", max_heldout, label="max_heldout")  # the same rule
    # Sums below are in units of the mean squared subvector norm, energy / n.
    scale = math.sqrt(spectrum.total_energy / n)
    with single_threaded(device):
        if max_points_per_centroid is None or n <= k * max_points_per_centroid:
            z = _coordinates(spectrum, subvectors, d_tilde, scale, None, device)
            result = kmeans(z, k, seed=seed, max_iter=max_iter, name=name)
            train_sum = error_sum = result.inertia
            n_train, n_isolated, isolated_sum = n, 0, 0.0
        else:
            # Subsample here rather than in kmeans(): the held-out subvectors must be known.
            n_train = k * max_points_per_centroid
            rng = np.random.default_rng(seed)
            train_rows = rng.choice(n, n_train, replace=False)
            z = _coordinates(spectrum, subvectors, d_tilde, scale, train_rows, device)
            result = kmeans(z, k, seed=seed, max_iter=max_iter, name=name)
            train_sum = result.inertia
            rows, counts = _heldout_sample(subvectors, train_rows, max_heldout, rng)
            _, sqdist_t = assign(_coordinates(spectrum, subvectors, d_tilde, scale, rows, device), result.centroids)
            sqdist = sqdist_t.to(dtype=torch.float64, device="cpu").numpy()
            error_sum = train_sum + float(sqdist @ counts)
            # Held-out subvectors farther from every centroid than the high-rate value of one centroid,
            # (2/d̃)·(total distortion)/k: k-means on all n would move a centroid towards them.
            threshold = 2.0 / d_tilde * (n / k) * train_sum / n_train
            isolated = sqdist > threshold
            n_isolated = round(float(counts[isolated].sum()))
            isolated_sum = float((sqdist[isolated] - threshold) @ counts[isolated])
    return ProbeResult(
        d_tilde=d_tilde,
        k=k,
        n_subvectors=n,
        n_train=n_train,
        train_error=train_sum / n_train,
        error=error_sum / n,
        n_iter=int(result.n_iter),
        n_isolated=n_isolated,
        isolated_error=isolated_sum / n,
    )


def clustering_error(
    spectrum: Spectrum,
    subvectors: np.ndarray,
    k: int,
    d_tilde: int,
    *,
    seed: int = 0,
    max_points_per_centroid: int | None = None,
) -> float:
    """Relative k-means distortion of the top-d̃ principal coordinates: ``inertia / ‖W‖²``.

    One k-means run (k-means++ then Lloyd to convergence) on Z = X·V_d̃. The inertia covers all n
    subvectors; with ``max_points_per_centroid`` the centroids are trained on a random subsample
    and then applied to every subvector.

    Parameters
    ----------
    spectrum : Spectrum
        Spectrum of ``subvectors``.
    subvectors : numpy.ndarray of shape (n, m)
        The layer's subvectors.
    k : int
        Number of centroids, ``2 <= k < n``.
    d_tilde : int
        Clustering dimensionality in 1..m.
    seed : int, default 0
        Seeds the subsample and k-means++.
    max_points_per_centroid : int, optional
        Train on at most ``k * max_points_per_centroid`` subvectors.

    Returns
    -------
    float

    Raises
    ------
    InvalidParameterError
        If k or d_tilde is out of range.

    Examples
    --------
    >>> import numpy as np
    >>> from lr2vq_analysis.spectrum import compute_spectrum
    >>> x = np.random.default_rng(0).normal(size=(300, 4))
    >>> spectrum = compute_spectrum(x)
    >>> e1 = clustering_error(spectrum, x, k=16, d_tilde=1)
    >>> e4 = clustering_error(spectrum, x, k=16, d_tilde=4)
    >>> 0 < e1 < e4 < 1
    True
    """
    probe = run_probe(spectrum, subvectors, k, d_tilde, seed=seed, max_points_per_centroid=max_points_per_centroid)
    return probe.error


def clustering_error_curve(
    weight: Any,
    k: int,
    m: int,
    *,
    d_tilde: int | Iterable[int] | None = None,
    seed: int = 0,
    max_points_per_centroid: int | None = None,
    name: str | None = None,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Measured relative k-means clustering error of a layer for d̃ = 1..m (the exhaustive sweep).

    One k-means run per d̃ on the top-d̃ principal coordinates of the layer's subvectors, on all
    subvectors unless ``max_points_per_centroid`` subsamples.

    Parameters
    ----------
    weight : array-like or torch.Tensor
        A Linear, Conv1d or Conv2d weight.
    k : int
        Number of centroids, ``2 <= k <`` number of subvectors.
    m : int
        Subvector size; must divide the row length.
    d_tilde : int or iterable of int, optional
        The d̃ values to measure (each in 1..m); default all of 1..m.
    seed : int, default 0
        Seed of every k-means run.
    max_points_per_centroid : int, optional
        Train each run on at most ``k * max_points_per_centroid`` subvectors.
    name : str, optional
        Layer name, used in error messages.
    device : str or torch.device, optional
        Where k-means runs (default CPU).

    Returns
    -------
    numpy.ndarray
        One value per requested d̃, in the order given (shape (m,) by default).

    Raises
    ------
    InvalidParameterError
        If k, m or a d̃ is out of range, or m does not divide the row length.
    InvalidWeightsError
        If the weight has the wrong rank or holds NaN/Inf.

    Examples
    --------
    >>> import numpy as np
    >>> w = np.random.default_rng(0).normal(size=(32, 4, 3, 3))
    >>> curve = clustering_error_curve(w, k=8, m=9, d_tilde=[1, 9])
    >>> curve.shape, bool(curve[0] < curve[1])
    ((2,), True)
    """
    check_m(m, name=name)
    x = to_subvectors(weight, m, name=name)
    check_k(k, x.shape[0], name=name)
    if d_tilde is None:
        dims = np.arange(1, m + 1)
    else:
        requested = [d_tilde] if isinstance(d_tilde, (int, np.integer)) else list(d_tilde)
        dims = np.atleast_1d(check_d_tilde_array(np.asarray(requested), m, name=name))
    with single_threaded(device):
        spectrum = compute_spectrum(x, name=name)
    return np.array(
        [
            run_probe(
                spectrum,
                x,
                k,
                int(d),
                seed=seed,
                max_points_per_centroid=max_points_per_centroid,
                device=device,
                name=name,
            ).error
            for d in dims
        ]
    )
