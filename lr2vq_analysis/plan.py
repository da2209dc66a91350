"""The compression plan: (k, m, d̃) per layer, shared by the analysis, compression and size stages."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ._validation import InvalidParameterError, check_d_tilde, check_k, check_m

__all__ = ["LayerPlan", "effective_k"]


@dataclass(frozen=True, init=False)
class LayerPlan:
    """How one layer is compressed.

    Parameters
    ----------
    k : int
        Number of centroids (codes cost log2(k) bits each).
    m : int
        Subvector size.
    d_tilde : int, optional
        Clustering dimensionality in 1..m; ``d_tilde == m`` is plain PQ (no projection P).
        Defaults to m.

    Examples
    --------
    >>> LayerPlan(k=256, m=9, d_tilde=4)
    LayerPlan(k=256, m=9, d_tilde=4)
    >>> LayerPlan(k=256, m=9).is_pq
    True
    """

    k: int
    m: int
    d_tilde: int  # always an int: omitted or None means m

    def __init__(self, k: int, m: int, d_tilde: int | None = None) -> None:
        object.__setattr__(self, "k", check_k(k))
        object.__setattr__(self, "m", check_m(m))
        object.__setattr__(self, "d_tilde", self.m if d_tilde is None else check_d_tilde(d_tilde, self.m))

    @property
    def is_pq(self) -> bool:
        """True when d̃ = m: product quantization without a projection."""
        return self.d_tilde == self.m

    def compressed_bits(self, shape: tuple[int, ...]) -> dict[str, float]:
        """Bits of one compressed layer of this shape, by the field's convention (bias not included).

        Codes cost exactly log2(k) bits each (no byte padding), the codebook (k × d̃) and, when
        d̃ < m, the projection P (d̃ × m) are stored at fp16.

        Examples
        --------
        >>> LayerPlan(k=256, m=9, d_tilde=4).compressed_bits((64, 64, 3, 3))
        {'codes': 32768.0, 'codebook': 16384.0, 'projection': 576.0}
        """
        n_weights = math.prod(shape)
        if n_weights % self.m:
            raise InvalidParameterError(f"m={self.m} does not divide the {n_weights} weights of shape {tuple(shape)}")
        d = self.d_tilde
        return {
            "codes": float(n_weights // self.m * math.log2(self.k)),
            "codebook": float(self.k * d * 16),
            "projection": float(d * self.m * 16) if d < self.m else 0.0,
        }

    def to_dict(self) -> dict[str, int]:
        """Plain dict, for JSON."""
        return {key: int(value) for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerPlan:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(k=int(data["k"]), m=int(data["m"]), d_tilde=int(data["d_tilde"]))
        except KeyError as exc:
            raise InvalidParameterError(f"plan entry {data!r} lacks the key {exc}; needs k, m and d_tilde") from None


def effective_k(k: int, shape: tuple[int, ...], m: int) -> int:
    """PQF's cap on k for small layers: min(k, largest power of two <= C_out·(row_length/m)/4).

    Examples
    --------
    >>> effective_k(256, (64, 64, 3, 3), 9)
    256
    >>> effective_k(256, (16, 8, 3, 3), 9)
    32
    """
    n = int(shape[0]) * (int(math.prod(shape[1:])) // m)
    cap = n // 4
    if cap < 2:
        return 2
    return min(int(k), 1 << (cap.bit_length() - 1))
