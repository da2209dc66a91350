"""Eigen-decomposition of the subvectors' Gram matrix: exact low-rank error curve and projection P.

The best rank-d approximation of the (n × m) subvector matrix X is X·V_d·V_dᵀ, where V_d holds the
top d eigenvectors of the uncentred Gram matrix XᵀX. Its squared error is the sum of the m − d
smallest eigenvalues, so the whole curve d = 1..m costs one m × m eigen-decomposition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._validation import InvalidWeightsError, check_d_tilde, check_m, layer_label
from .subvectors import to_subvectors

__all__ = ["MAX_MAGNITUDE", "MIN_MAGNITUDE", "Spectrum", "compute_spectrum", "lowrank_error_curve"]

#: Largest weight magnitude the analysis accepts: n·w² stays finite in float64 for any n < 1e28.
MAX_MAGNITUDE: float = 1e140
#: Smallest largest-magnitude it accepts: w² stays a normal float64 (float32's smallest weight, 1.4e-45, passes).
MIN_MAGNITUDE: float = 1e-140


@dataclass(frozen=True)
class Spectrum:
    """Eigen-decomposition of the m × m Gram matrix XᵀX of a layer's subvectors.

    Attributes
    ----------
    eigenvalues : numpy.ndarray of shape (m,)
        Eigenvalues in decreasing order (float64, clipped at 0); they sum to ‖W‖².
    eigenvectors : numpy.ndarray of shape (m, m)
        Column i is the eigenvector of ``eigenvalues[i]``.
    total_energy : float
        ‖W‖², computed directly from the weights (not from the eigenvalues).
    n_subvectors : int
        Number of rows of X.
    """

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    total_energy: float
    n_subvectors: int

    @property
    def m(self) -> int:
        """Subvector size."""
        return int(self.eigenvalues.shape[0])

    @property
    def relative_eigenvalues(self) -> np.ndarray:
        """Eigenvalues as fractions of ‖W‖²."""
        return self.eigenvalues / self.total_energy

    def lowrank_error(self) -> np.ndarray:
        """Relative error of the best rank-d approximation for d = 1..m (last entry 0)."""
        tail = np.cumsum(self.eigenvalues[::-1])[::-1]  # tail[i] = sum of eigenvalues i..m-1
        curve = np.append(tail[1:], 0.0) / self.total_energy
        return np.clip(curve, 0.0, None)

    def projection(self, d_tilde: int) -> np.ndarray:
        """The projection P = V_dᵀ of shape (d̃ × m); Z = X·Pᵀ and X ≈ Z·P."""
        d = check_d_tilde(d_tilde, self.m)
        return np.ascontiguousarray(self.eigenvectors[:, :d].T)

    def project(self, subvectors: np.ndarray, d_tilde: int) -> np.ndarray:
        """Low-rank coordinates Z = X·V_d (n × d̃) of the subvectors."""
        return np.asarray(subvectors, dtype=np.float64) @ self.projection(d_tilde).T


def compute_spectrum(subvectors: np.ndarray, *, name: str | None = None) -> Spectrum:
    """Eigen-decompose the uncentred Gram matrix of an (n × m) subvector matrix in float64.

    Every quantity the analysis reports is relative to ‖W‖², so it does not depend on the weights'
    scale; float64 holds the sums of squares exactly enough for weights of magnitude
    :data:`MIN_MAGNITUDE` to :data:`MAX_MAGNITUDE` (any float32, bf16 or fp16 weight), and weights
    outside that range are refused rather than silently giving NaN or zero errors.

    Parameters
    ----------
    subvectors : numpy.ndarray of shape (n, m)
        Output of :func:`~lr2vq_analysis.subvectors.to_subvectors`.
    name : str, optional
        Layer name, used in error messages.

    Returns
    -------
    Spectrum

    Raises
    ------
    InvalidWeightsError
        If the largest weight magnitude lies outside [MIN_MAGNITUDE, MAX_MAGNITUDE].
    """
    x = np.asarray(subvectors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"expected an (n × m) matrix of subvectors, got shape {x.shape}")
    largest = max(float(x.max()), -float(x.min()))  # no |x| temporary: a layer can be gigabytes
    if not (largest == 0.0 or MIN_MAGNITUDE <= largest <= MAX_MAGNITUDE):
        raise InvalidWeightsError(
            f"{layer_label(name)}the largest weight magnitude is {largest:.3g}; the analysis supports "
            f"{MIN_MAGNITUDE:g} to {MAX_MAGNITUDE:g} (sums of squares must stay finite and normal in float64): "
            "rescale the weights (relative errors do not depend on the scale)"
        )
    gram = x.T @ x
    eigenvalues, eigenvectors = np.linalg.eigh(gram)  # ascending
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues = np.clip(eigenvalues[order], 0.0, None)
    eigenvectors = eigenvectors[:, order]
    # Fix the sign of each eigenvector (largest-magnitude entry positive) so results are deterministic.
    signs = np.sign(eigenvectors[np.argmax(np.abs(eigenvectors), axis=0), np.arange(x.shape[1])])
    eigenvectors = eigenvectors * np.where(signs == 0, 1.0, signs)
    return Spectrum(
        eigenvalues=eigenvalues,
        eigenvectors=eigenvectors,
        total_energy=float(np.vdot(x.ravel(), x.ravel())),  # ‖W‖², without an n × m temporary
        n_subvectors=int(x.shape[0]),
    )


def lowrank_error_curve(weight: Any, m: int, *, name: str | None = None) -> np.ndarray:
    """Exact relative low-rank error of a layer's subvectors for d̃ = 1..m.

    Entry d − 1 is ‖X − X_d‖² / ‖W‖² for the best rank-d approximation X_d of the (n × m)
    subvector matrix X; the last entry is 0.

    Parameters
    ----------
    weight : array-like or torch.Tensor
        A Linear, Conv1d or Conv2d weight.
    m : int
        Subvector size; must divide the row length.
    name : str, optional
        Layer name, used in error messages.

    Returns
    -------
    numpy.ndarray of shape (m,)

    Examples
    --------
    >>> import numpy as np
    >>> w = np.random.default_rng(0).normal(size=(16, 8, 3, 3))
    >>> curve = lowrank_error_curve(w, m=9)
    >>> curve.shape, float(curve[-1])
    ((9,), 0.0)
    """
    check_m(m, name=name)
    return compute_spectrum(to_subvectors(weight, m, name=name), name=name).lowrank_error()
