"""Cut a layer weight into subvectors of size m, and put them back (PQF's layout).

A weight of shape (C_out, C_in, kh, kw), (C_out, C_in, k) or (out, in) is reshaped to
(C_out, row_length) and each row is cut into consecutive runs of m. For a 3×3 conv and m = 9 one
subvector is one spatial kernel; a Linear is cut along its input features.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._validation import as_float_array, check_finite, check_m, check_weight_rank

__all__ = ["row_length", "n_subvectors", "to_subvectors", "from_subvectors"]


def row_length(shape: tuple[int, ...]) -> int:
    """Number of weights per output channel: C_in·kh·kw, C_in·k or in_features."""
    return int(math.prod(shape[1:]))


def n_subvectors(shape: tuple[int, ...], m: int) -> int:
    """Number of subvectors of size m in a weight of this shape."""
    return int(shape[0]) * row_length(shape) // m


def to_subvectors(weight: Any, m: int, *, name: str | None = None) -> np.ndarray:
    """Return the (n × m) float64 matrix of subvectors of a layer weight.

    Parameters
    ----------
    weight : array-like or torch.Tensor
        A Linear (2-D), Conv1d (3-D) or Conv2d (4-D) weight, output channels first.
    m : int
        Subvector size; must divide the row length.
    name : str, optional
        Layer name, used in error messages.

    Returns
    -------
    numpy.ndarray of shape (C_out · row_length / m, m)

    Raises
    ------
    InvalidWeightsError
        If the weight has the wrong rank or holds NaN/Inf.
    InvalidParameterError
        If m does not divide the row length.

    Examples
    --------
    >>> import numpy as np
    >>> w = np.arange(2 * 3 * 3 * 3, dtype=float).reshape(2, 3, 3, 3)
    >>> to_subvectors(w, 9).shape
    (6, 9)
    """
    arr = check_weight_rank(as_float_array(weight, name=name), name=name)
    check_finite(arr, name=name)
    check_m(m, row_length(arr.shape), name=name)
    return np.ascontiguousarray(arr.reshape(-1, m))


def from_subvectors(subvectors: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`to_subvectors`: reshape an (n × m) matrix back to the weight's shape."""
    arr = np.asarray(subvectors)
    if arr.size != math.prod(shape):
        raise ValueError(
            f"{arr.shape} subvectors hold {arr.size} values; shape {tuple(shape)} needs {math.prod(shape)}"
        )
    return arr.reshape(shape)
