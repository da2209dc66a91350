"""Argument checks shared by every public function (the exceptions live in ``exceptions``).

Every public entry point validates its arguments here, once, so that the numerical code behind it
never re-checks shapes or dtypes. Messages name the layer, the offending value and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from .exceptions import InvalidParameterError, InvalidWeightsError, LR2VQError, WeightFileError

__all__ = [
    "LR2VQError",
    "InvalidParameterError",
    "InvalidWeightsError",
    "WeightFileError",
    "check_m",
    "check_k",
    "check_d_tilde",
    "check_rho",
    "check_seed",
    "check_count",
    "check_finite",
    "check_weight_rank",
    "as_float_array",
    "layer_label",
    "check_real",
    "check_choice",
]


def layer_label(name: str | None) -> str:
    """Return the prefix used in messages: ``"layer 'x': "`` or ``""`` when unnamed."""
    return f"layer {name!r}: " if name else ""


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_m(m: Any, row_length: int | None = None, *, name: str | None = None) -> int:
    """Check the subvector size m (a positive int dividing the row length when one is given)."""
    if not _is_int(m) or m < 1:
        raise InvalidParameterError(f"{layer_label(name)}m={m!r} is invalid; m must be a positive integer")
    if row_length is not None and row_length % int(m) != 0:
        divisors = [d for d in range(1, min(row_length, 64) + 1) if row_length % d == 0]
        raise InvalidParameterError(
            f"{layer_label(name)}m={m} does not divide the row length {row_length} "
            f"(C_in·kh·kw or in_features); allowed m include {divisors}"
        )
    return int(m)


def check_k(k: Any, n_subvectors: int | None = None, *, name: str | None = None) -> int:
    """Check the number of centroids k: an int with 2 <= k < number of subvectors."""
    if not _is_int(k) or k < 2:
        raise InvalidParameterError(f"{layer_label(name)}k={k!r} is invalid; k must be an integer >= 2")
    if n_subvectors is not None and k >= n_subvectors:
        raise InvalidParameterError(
            f"{layer_label(name)}k={k} is too large for {n_subvectors} subvectors; "
            f"k must satisfy 2 <= k < {n_subvectors}"
        )
    return int(k)


def check_d_tilde(d_tilde: Any, m: int, *, name: str | None = None) -> int:
    """Check a clustering dimensionality d̃ in 1..m."""
    if not _is_int(d_tilde) or not 1 <= d_tilde <= m:
        raise InvalidParameterError(
            f"{layer_label(name)}d_tilde={d_tilde!r} is invalid; d_tilde must be an integer in 1..{m} (m={m})"
        )
    return int(d_tilde)


def check_d_tilde_array(d: Any, m: int, *, name: str | None = None) -> np.ndarray:
    """Check an int or an array of ints, each in 1..m; return an int64 array (0-d for a scalar)."""
    arr = np.asarray(d)
    if arr.dtype.kind not in "iu" or arr.size == 0 or arr.min() < 1 or arr.max() > m:
        raise InvalidParameterError(
            f"{layer_label(name)}d_tilde={d!r} is invalid; every d_tilde must be an integer in 1..{m} (m={m})"
        )
    return arr.astype(np.int64)


def check_rho(rho: Any) -> float:
    """Check ρ, the share of low-rank error that training does not recover: 0 < ρ <= 1."""
    try:
        value = float(rho)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"rho={rho!r} is invalid; rho must be a number in (0, 1]") from None
    if not 0.0 < value <= 1.0 or math.isnan(value):
        raise InvalidParameterError(f"rho={rho!r} is invalid; rho must be in (0, 1]")
    return value


def check_seed(seed: Any) -> int:
    """Check a seed: a non-negative int."""
    if not _is_int(seed) or seed < 0:
        raise InvalidParameterError(f"seed={seed!r} is invalid; seed must be a non-negative integer")
    return int(seed)


def check_count(value: Any, name: str, *, minimum: int = 1) -> int:
    """Check an integer count (steps, batch size, threads, ...) that must be at least ``minimum``."""
    if not _is_int(value) or value < minimum:
        raise InvalidParameterError(f"{name}={value!r} is invalid; it must be an integer >= {minimum}")
    return int(value)


def as_float_array(weight: Any, *, name: str | None = None) -> np.ndarray:
    """Convert a numpy array, torch tensor or nested sequence to a float64 numpy array."""
    if hasattr(weight, "detach") and hasattr(weight, "cpu"):  # torch.Tensor without importing torch
        weight = weight.detach().cpu().double().numpy()
    try:
        arr = np.asarray(weight, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidWeightsError(
            f"{layer_label(name)}cannot convert {type(weight).__name__} to a float array: {exc}"
        ) from None
    return arr


def check_weight_rank(weight: np.ndarray, *, name: str | None = None, allowed: Iterable[int] = (2, 3, 4)) -> np.ndarray:
    """Check that a weight is a Linear (2-D), Conv1d (3-D) or Conv2d (4-D) tensor."""
    allowed = tuple(allowed)
    if weight.ndim not in allowed:
        raise InvalidWeightsError(
            f"{layer_label(name)}weight has rank {weight.ndim} (shape {tuple(weight.shape)}); "
            f"allowed ranks are {allowed} (Linear, Conv1d, Conv2d)"
        )
    if weight.size == 0:
        raise InvalidWeightsError(f"{layer_label(name)}weight of shape {tuple(weight.shape)} is empty")
    return weight


def check_finite(weight: np.ndarray, *, name: str | None = None) -> np.ndarray:
    """Check that a weight holds no NaN or Inf and is not all zeros."""
    finite = np.isfinite(weight)
    if not finite.all():
        bad = int(weight.size - finite.sum())
        raise InvalidWeightsError(
            f"{layer_label(name)}weight holds {bad} NaN/Inf value(s); only finite weights can be analysed"
        )
    if not np.any(weight):
        raise InvalidWeightsError(f"{layer_label(name)}weight is all zeros; its relative errors are undefined")
    return weight


def check_real(value: Any, name: str, *, minimum: float = 0.0) -> float:
    """Check a finite real number that must be at least ``minimum`` (a tolerance, a rate, ...)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number < minimum:
        raise InvalidParameterError(f"{name}={value!r} is invalid; it must be a finite number >= {minimum:g}")
    return number


def check_choice(value: Any, name: str, allowed: Iterable[Any]) -> Any:
    """Check that ``value`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise InvalidParameterError(f"{name}={value!r} is invalid; allowed values are {', '.join(map(repr, allowed))}")
    return value
