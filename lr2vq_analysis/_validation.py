"""Argument checks shared by every public function: one declarative rule per parameter name.

Every public entry point validates its arguments here, once, so that the numerical code behind it
never re-checks shapes or dtypes. Messages name the layer, the offending value and what is allowed.

The rules live in one table, :data:`RULES`, in the spirit of scikit-learn's ``_param_validation``: each
parameter name (``k``, ``seed``, ``n_jobs``, ``max_points_per_centroid``, ...) has exactly one
:class:`Interval` or :class:`Options` constraint, whichever function takes it, and :func:`check_param`
applies it. Bounds that depend on the data (d̃ ≤ m, k < number of subvectors) are passed per call.
The exceptions themselves live in :mod:`lr2vq_analysis.exceptions`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import numpy as np

from .exceptions import InvalidParameterError, InvalidWeightsError, LR2VQError, WeightFileError

__all__ = [
    "LR2VQError",
    "InvalidParameterError",
    "InvalidWeightsError",
    "WeightFileError",
    "Interval",
    "Options",
    "RULES",
    "MAX_SEED",
    "MAX_JOBS",
    "PROBE_OPTIONS",
    "check_param",
    "check_options",
    "check_m",
    "check_k",
    "check_d_tilde",
    "check_rho",
    "check_seed",
    "check_n_jobs",
    "check_count",
    "check_finite",
    "check_weight_rank",
    "as_float_array",
    "layer_label",
]

#: Largest seed accepted (inclusive): 2**32 − 1, the limit of numpy's legacy generator and scikit-learn's
#: ``random_state``; torch and numpy's ``default_rng`` accept it too, so one seed reaches every backend.
MAX_SEED = 2**32 - 1
#: Largest ``n_jobs`` accepted; more threads than this cannot help and would only exhaust the machine.
MAX_JOBS = 1024
#: Keyword options :func:`~lr2vq_analysis.report.analyze` passes on to the trade-off fit's k-means probes.
PROBE_OPTIONS = ("n_probes", "max_points_per_centroid", "device", "predictor", "tolerance", "stability_seeds")


@dataclass(frozen=True)
class Interval:
    """A range of integers (``kind="int"``) or finite real numbers (``kind="real"``).

    Parameters
    ----------
    kind : {"int", "real"}
        ``"int"`` accepts Python and numpy integers (not bool); ``"real"`` accepts any real number
        (not bool) and refuses NaN and ±inf.
    low, high : float, optional
        Bounds; None for unbounded.
    closed : {"both", "left", "right", "neither"}, default "both"
        Which bounds are included.
    """

    kind: Literal["int", "real"]
    low: float | None = None
    high: float | None = None
    closed: Literal["both", "left", "right", "neither"] = "both"

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is of the right type and inside the interval."""
        if isinstance(value, bool):
            return False
        if self.kind == "int":
            if not isinstance(value, (numbers.Integral, np.integer)):
                return False
        elif not isinstance(value, (numbers.Real, np.floating, np.integer)) or not math.isfinite(float(value)):
            return False
        if self.low is not None and (value < self.low or (value == self.low and self.closed in ("right", "neither"))):
            return False
        return not (
            self.high is not None and (value > self.high or (value == self.high and self.closed in ("left", "neither")))
        )

    def describe(self) -> str:
        """What is allowed, in words: ``"an integer >= 2"``, ``"a number in (0, 1]"``."""
        what = "an integer" if self.kind == "int" else "a number"
        low_in, high_in = self.closed in ("both", "left"), self.closed in ("both", "right")
        if self.low is not None and self.high is not None:
            if self.kind == "int" and low_in and high_in:
                return f"{what} in {_number(self.low)}..{_number(self.high)}"
            return (
                f"{what} in {'[' if low_in else '('}{_number(self.low)}, {_number(self.high)}{']' if high_in else ')'}"
            )
        if self.low is not None and self.kind == "int" and low_in and self.low in (0, 1):
            return "a positive integer" if self.low == 1 else "a non-negative integer"
        if self.low is not None:
            return f"{what} {'>=' if low_in else '>'} {_number(self.low)}"
        if self.high is not None:
            return f"{what} {'<=' if high_in else '<'} {_number(self.high)}"
        return what


@dataclass(frozen=True)
class Options:
    """A finite set of allowed values (compared with ``==``)."""

    values: tuple[Any, ...]

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is one of the options."""
        return any(value == option and type(value) is type(option) for option in self.values)

    def describe(self) -> str:
        """What is allowed, in words."""
        return f"one of {list(self.values)}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


#: The one rule of every checked parameter name: (constraint, None allowed).
RULES: Mapping[str, tuple[Interval | Options, bool]] = MappingProxyType(
    {
        "k": (Interval("int", 2), False),
        "m": (Interval("int", 1), False),
        "d_tilde": (Interval("int", 1), False),
        "rho": (Interval("real", 0, 1, closed="right"), False),
        "seed": (Interval("int", 0, MAX_SEED), False),
        "n_jobs": (Interval("int", -1, MAX_JOBS), False),  # 0 refused separately: -1 means all cores
        # k-means on k · 1 points is one point per centroid (zero distortion, nothing learnt): at least 2
        "max_points_per_centroid": (Interval("int", 2), True),
        "n_probes": (Interval("int", 1, 3), True),
        "max_iter": (Interval("int", 1), False),
        "tol": (Interval("real", 0), False),
        "chunk_size": (Interval("int", 1), True),
        "init_points_per_centroid": (Interval("int", 1), True),
        "init_tail_share": (Interval("real", 0, 1, closed="left"), False),
        "backend": (Options(("auto", "torch", "faiss")), False),
        "min_size": (Interval("int", 0), False),
        "val_fraction": (Interval("real", 0, 1, closed="neither"), False),
        "test_fraction": (Interval("real", 0, 1, closed="neither"), False),
        "which": (Options(("layer", "global")), False),
        # differentiable k-means (nn.DKMConfig)
        "tau": (Interval("real", 0, closed="neither"), False),
        "soft_iter": (Interval("int", 1), False),
        "epsilon": (Interval("real", 0), False),
        # fine-tuning (finetune.TrainingConfig, DistillationConfig)
        "lr": (Interval("real", 0, closed="right"), False),
        "lr_min": (Interval("real", 0), False),
        "grad_clip": (Interval("real", 0, closed="right"), True),
        "on_nonfinite": (Options(("raise", "skip")), False),
        "distill": (Options(("kl", "mse")), False),
        "distill_weight": (Interval("real", 0, 1), False),
        "temperature": (Interval("real", 0, closed="right"), False),
    }
)


def check_param(
    name: str,
    value: Any,
    *,
    layer: str | None = None,
    high: float | None = None,
    label: str | None = None,
) -> Any:
    """Check ``value`` against the rule of ``name`` in :data:`RULES`; return it as int/float (or None).

    Parameters
    ----------
    name : str
        A key of :data:`RULES`.
    value : object
    layer : str, optional
        Layer named in the message.
    high : float, optional
        A data-dependent upper bound (inclusive) that tightens the rule, e.g. d̃ ≤ m.
    label : str, optional
        How the parameter is called in the message (default ``name``).

    Raises
    ------
    InvalidParameterError
        ``"layer 'x': seed=-1 is invalid; seed must be an integer in 0..4294967295"``.

    Examples
    --------
    >>> check_param("k", 16)
    16
    >>> check_param("max_points_per_centroid", None) is None
    True
    >>> check_param("seed", 2**70)
    Traceback (most recent call last):
    ...
    lr2vq_analysis.exceptions.InvalidParameterError: seed=1180591620717411303424 is invalid; seed must be ...
    """
    constraint, none_allowed = RULES[name]
    if value is None and none_allowed:
        return None
    if high is not None and isinstance(constraint, Interval):  # a data-dependent bound, inclusive
        low_closed = constraint.closed in ("both", "left")
        top = high if constraint.high is None else min(high, constraint.high)
        constraint = Interval(constraint.kind, constraint.low, top, "both" if low_closed else "right")
    ok = constraint.accepts(value) and not (name == "n_jobs" and value == 0)
    if not ok:
        label = label or name
        allowed = constraint.describe()
        if name == "n_jobs":
            allowed = f"-1 (all cores) or an integer in 1..{MAX_JOBS}"
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        allowed += " or None" if none_allowed else ""
        raise InvalidParameterError(f"{layer_label(layer)}{label}={shown} is invalid; {label} must be {allowed}")
    if isinstance(constraint, Interval):
        return int(value) if constraint.kind == "int" else float(value)
    return value


def check_options(options: Mapping[str, Any], allowed: Iterable[str], *, what: str = "option") -> dict[str, Any]:
    """Check keyword options: every key must be in ``allowed``; values with a rule are checked too.

    Raises
    ------
    InvalidParameterError
        ``"unknown probe option 'n_probe'; allowed: ['n_probes', ...]"``.

    Examples
    --------
    >>> check_options({"n_probes": 2}, PROBE_OPTIONS, what="probe option")
    {'n_probes': 2}
    """
    allowed = tuple(allowed)
    unknown = [key for key in options if key not in allowed]
    if unknown:
        raise InvalidParameterError(f"unknown {what}(s) {unknown}; allowed: {list(allowed)}")
    return {key: check_param(key, value) if key in RULES else value for key, value in options.items()}


def check_n_jobs(n_jobs: Any) -> int:
    """Check ``n_jobs``: -1 (all cores) or 1..:data:`MAX_JOBS`."""
    return int(check_param("n_jobs", n_jobs))


def layer_label(name: str | None) -> str:
    """Return the prefix used in messages: ``"layer 'x': "`` or ``""`` when unnamed."""
    return f"layer {name!r}: " if name else ""


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_m(m: Any, row_length: int | None = None, *, name: str | None = None) -> int:
    """Check the subvector size m (a positive int dividing the row length when one is given)."""
    m = int(check_param("m", m, layer=name))
    if row_length is not None and row_length % m != 0:
        divisors = [d for d in range(1, min(row_length, 64) + 1) if row_length % d == 0]
        raise InvalidParameterError(
            f"{layer_label(name)}m={m} does not divide the row length {row_length} "
            f"(C_in·kh·kw or in_features); allowed m include {divisors}"
        )
    return m


def check_k(k: Any, n_subvectors: int | None = None, *, name: str | None = None) -> int:
    """Check the number of centroids k: an int with 2 <= k < number of subvectors."""
    k = int(check_param("k", k, layer=name))
    if n_subvectors is not None and k >= n_subvectors:
        raise InvalidParameterError(
            f"{layer_label(name)}k={k} is too large for {n_subvectors} subvectors; "
            f"k must satisfy 2 <= k < {n_subvectors}"
        )
    return k


def check_d_tilde(d_tilde: Any, m: int, *, name: str | None = None) -> int:
    """Check a clustering dimensionality d̃ in 1..m."""
    return int(check_param("d_tilde", d_tilde, layer=name, high=m))


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
    return float(check_param("rho", rho))


def check_seed(seed: Any) -> int:
    """Check a seed: an int in 0..:data:`MAX_SEED` (2**32 − 1)."""
    return int(check_param("seed", seed))


def check_count(value: Any, name: str, *, minimum: int = 1) -> int:
    """Check an integer count (steps, batch size, threads, ...) that must be at least ``minimum``."""
    if not Interval("int", minimum).accepts(value):
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
