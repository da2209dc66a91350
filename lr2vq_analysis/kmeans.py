"""The package's one k-means engine: seeded k-means++ and Lloyd iterations in torch, on CPU or CUDA.

Everything that clusters in this package (the clustering probes of the analysis, quantizing the
low-rank coordinates Z, product quantization, DKM's initial codebook) goes through :func:`kmeans`
and :func:`assign`.

Algorithm (scikit-learn's ``KMeans(n_init=1, init="k-means++", algorithm="lloyd")``):

- **Initialisation**: greedy k-means++. The first centre is a uniformly random point; each further
  centre is the best of ``2 + int(ln k)`` candidates drawn with probability proportional to D² (the
  squared distance to the nearest centre chosen so far), "best" meaning the one that lowers the
  potential ΣD² the most.
- **Lloyd iterations** until the labels stop changing, or the squared shift of the centres (summed
  over all centres) falls to ``tol`` times the mean per-feature variance of the data, or ``max_iter``.
  A cluster that empties is re-seeded with the point farthest from its own centre.
- The returned labels and inertia are those of the returned centroids (one last assignment after
  the last update, as scikit-learn does).

Implementation notes (measurements in ``docs/kmeans.md``):

- Distances go through a GEMM per chunk of points, so memory stays at ``chunk_size × k`` whatever n;
  the distance of each point to its chosen centroid is recomputed from differences for the reported
  inertia. For one-dimensional data the nearest centroid is found by binary search among the sorted
  centroids instead (O(n log k)).
- Data are centred first (the GEMM expansion loses precision far from the origin) and processed in
  float32 by default; centroid sums and inertia are accumulated in float64.
- On CPU the O(n·k) steps run in numpy where it is faster than torch (GEMM through numpy's BLAS,
  argmin, bincount), or in faiss's fused search where faiss is importable and measured faster
  (``KMeansConfig.backend``), and the call runs single-threaded, torch's threads included (see
  :func:`~lr2vq_analysis._threads.single_threaded`).
- The k-means++ start runs on a seeded subsample of at most ``max(64·k, 4096)`` points for d ≥ 2
  (``init_tail_share`` keeps the farthest points in it, with a weighted k-means++).
- Where faiss is importable and its search measured faster (float32 on CPU, d ≥ 2, k > 32 or d ≥ 8, and
  at least 2^17 coordinates) and ``tol == 0`` (stop only when the labels repeat), the start and the Lloyd
  loop are faiss's (``faiss.Clustering``: k-means++ on the same subsample, seeded from ``seed``; no
  further subsampling); labels and inertia over all points are still computed here. Same algorithm
  (faiss stops one iteration later, when the objective repeats; it splits a large cluster to fill an
  empty one), 1.2–2× less time. With ``tol > 0`` the engine's own loop runs, with faiss's search inside.
- All random draws come from a CPU ``torch.Generator`` seeded with ``seed``, so a seed fixes the result
  on any device (up to floating-point differences between devices).
- With ``max_points_per_centroid`` (faiss's knob), at most ``k · max_points_per_centroid`` randomly
  chosen points train the centroids; labels and inertia are still reported for every point.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from ._threads import single_threaded
from ._validation import (
    InvalidParameterError,
    InvalidWeightsError,
    check_k,
    check_param,
    check_seed,
    layer_label,
)
from .exceptions import NotFittedError

__all__ = ["KMeansConfig", "QUANTIZE_KMEANS", "KMeansResult", "kmeans", "assign", "KMeans"]

# Distances are computed for this many (point, centroid) pairs per GEMM: on CPU 2^18 float32 scores
# (1 MiB) stay in a core's L2 cache (measured fastest for k = 16..256, d <= 9); on CUDA 64 MiB.
_CPU_CHUNK_PAIRS = 1 << 18
_DEVICE_CHUNK_PAIRS = 1 << 24
# Up to this k the packed integer minimum beats numpy's argmin over rows of k scores (measured: 0.75 vs
# 2.3 ns per score at k = 32, even at k = 64).
_PACKED_MAX_K = 32
# faiss 1.15's nearest-centroid search (knn, IndexFlatL2) takes its fast BLAS path only from about this many
# coordinates (n·d) per call on (measured on this machine: 0.6-1.4 ns per distance above, 6-10 ns below, at
# d = 2..64, k = 64..1024); there, with k > _PACKED_MAX_K, it beat our GEMM + numpy argmin 1.1-2.2x, below
# it ours was 2-5x faster. One exception measured: d = 32, k = 256 (faiss 1.25x slower).
_FAISS_MIN_COORDS = 1 << 17
# At k <= _PACKED_MAX_K our packed kernel beats faiss's search, but from this d on faiss's whole Lloyd loop
# beats ours (k = 16, d = 8..16: 0.95-1.12x faiss's time handed over, 1.16-1.88x with the packed kernel).
_FAISS_LOOP_MIN_D = 8
# The k-means++ start subsamples only beyond this many points (small sets: little to save, more noise).
_MIN_INIT_POINTS = 4096
_faiss: Any = None


def _faiss_module() -> Any:
    """faiss, when importable (an optional accelerator of the CPU engine), else None."""
    global _faiss
    if _faiss is None:
        try:
            import faiss
        except ImportError:
            _faiss = False
        else:
            _faiss = faiss
    return _faiss or None


def _use_faiss(backend: str, n: int, d: int, k: int, x: torch.Tensor, *, whole_loop: bool = False) -> bool:
    """Whether faiss computes the nearest centroids of these n points, or with ``whole_loop`` runs all of Lloyd.

    ``backend`` "faiss": always; "auto": where faiss measured faster (see the constants above).
    """
    if backend == "faiss":
        return True
    return (
        backend == "auto"
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and d >= 2
        and (k > _PACKED_MAX_K or (whole_loop and d >= _FAISS_LOOP_MIN_D))
        and n * d >= _FAISS_MIN_COORDS
        and _faiss_module() is not None
    )


@dataclass
class KMeansResult:
    """Outcome of one :func:`kmeans` run.

    Attributes
    ----------
    centroids : torch.Tensor of shape (k, d)
        Final centroids, in the input's coordinates, on the input's device, in the compute dtype.
    labels : torch.Tensor of shape (n,), int64
        Index of the nearest centroid of every input point (all points, also when subsampled).
    inertia : float
        Sum of squared distances of all input points to their centroid (accumulated in float64).
    train_inertia : float
        The same sum over the points that trained the centroids; equal to ``inertia`` unless
        the data were subsampled.
    n_iter : int
        Number of Lloyd iterations run.
    objective : list of float
        Training objective at the assignment step of each iteration (the sum of squared distances
        of the training points to the centroids they were assigned to, before the update), like
        faiss's ``Kmeans.obj``. Non-increasing; ``train_inertia <= objective[-1]``.
    n_train : int
        Number of points that trained the centroids.
    """

    centroids: torch.Tensor
    labels: torch.Tensor
    inertia: float
    train_inertia: float
    n_iter: int
    objective: list[float] = field(default_factory=list)
    n_train: int = 0


@dataclass(frozen=True)
class KMeansConfig:
    """Options of the k-means engine, validated once at construction.

    Parameters
    ----------
    max_iter : int, default 300
        Maximum number of Lloyd iterations.
    tol : float, default 1e-4
        Stop when the summed squared shift of the centres is at most ``tol`` times the mean
        per-feature variance of the training points (scikit-learn's rule); ``0`` stops only when the
        labels repeat (or at ``max_iter``).
    max_points_per_centroid : int, optional
        If set and ``n > k * max_points_per_centroid``, train on ``k * max_points_per_centroid``
        points drawn at random without replacement (faiss's rule; faiss's default is 256). Labels and
        ``inertia`` still cover all n points; ``train_inertia`` covers the sample.
    init_points_per_centroid : int or None, default 64
        The k-means++ start runs on at most ``max(k * init_points_per_centroid, 4096)`` randomly drawn
        training points (for d ≥ 2; at d = 1 the start decides the result and always sees every
        point). None: every point. Chosen by a pre-registered experiment on real weights
        (``benchmarks/bench_kmeans_start.py``, ``docs/kmeans.md``): a start on too few points misses
        the heavy tails of real weights (16 per centroid: up to 18 % more distortion after Lloyd).
    init_tail_share : float, default 0.0
        Share of that start sample taken as the training points farthest from their mean (the
        layer's rare outliers, which a uniform sample misses), the rest drawn uniformly from the other
        points. Each point then counts for the points it stands for (1 for the farthest, ``(n − t) /
        (sample − t)`` for the others) in a weighted k-means++, so the start's draws stay unbiased.
        In ``[0, 1)``; 0: a uniform sample (and, where faiss runs the loop, faiss's k-means++). Not the
        default (a pre-registered experiment in ``docs/kmeans.md``: on real layers it cut the worst
        excess distortion over an all-points start from 6.5 % to 1.0 % but cost as much time as that
        start); 0.25 is the setting measured there, for layers with rare outlier rows.
    dtype : torch.dtype, default torch.float32
        Dtype of the distance computations (``torch.float64`` for full precision).
    chunk_size : int, optional
        Points per distance block; the default keeps a block at 2^18 (point, centroid) pairs on CPU
        (1 MiB of scores) and 2^24 on CUDA.
    backend : {"auto", "torch", "faiss"}, default "auto"
        Kernel on CPU. "auto", when faiss is importable, uses faiss where it measured faster (float32,
        d ≥ 2, at least 2^17 coordinates, and k > 32 — or d ≥ 8 for the whole loop): with ``tol == 0``
        faiss runs the k-means++ start (on the same subsample) and the whole Lloyd loop, otherwise its
        search is the nearest-centroid step of the engine's loop; elsewhere the built-in kernels run.
        "torch" always uses the built-in kernels; "faiss" always uses faiss (CPU, float32; needs faiss).
        The algorithm is Lloyd's on every backend; faiss's loop stops when the objective repeats (one
        iteration after the labels did) and splits a large cluster to fill an empty one.

    Raises
    ------
    InvalidParameterError
        If a value is out of range, naming the option and what is allowed.

    Examples
    --------
    >>> KMeansConfig(max_iter=25, tol=0.0).max_iter
    25
    >>> KMeansConfig(tol=-1)
    Traceback (most recent call last):
    ...
    lr2vq_analysis.exceptions.InvalidParameterError: tol=-1 is invalid; tol must be a number >= 0
    """

    max_iter: int = 300
    tol: float = 1e-4
    max_points_per_centroid: int | None = None
    init_points_per_centroid: int | None = 64
    init_tail_share: float = 0.0
    dtype: torch.dtype = torch.float32
    chunk_size: int | None = None
    backend: Literal["auto", "torch", "faiss"] = "auto"

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise the validated values in place
        for option in (
            "max_iter",
            "tol",
            "max_points_per_centroid",
            "init_points_per_centroid",
            "init_tail_share",
            "chunk_size",
        ):
            set_(self, option, check_param(option, getattr(self, option)))
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise InvalidParameterError(f"dtype={self.dtype!r} is invalid; dtype must be a floating torch dtype")
        check_param("backend", self.backend)
        if self.backend == "faiss" and _faiss_module() is None:
            raise InvalidParameterError("backend='faiss' needs faiss (pip install faiss-cpu); use backend='auto'")


#: Defaults for quantizing a layer (:meth:`~lr2vq_analysis.nn.CompressedModel.quantize`, DKM's start):
#: at most 25 Lloyd iterations (faiss's default), no shift tolerance. Chosen by measurement of the
#: fine-tuned result in ``docs/kmeans.md`` ("Iteration cap for quantizing").
QUANTIZE_KMEANS = KMeansConfig(max_iter=25, tol=0.0)


# --------------------------------------------------------------------------------------------------
# Validation (at the public door only)
# --------------------------------------------------------------------------------------------------


def _as_points(x: Any, *, name: str | None, what: str = "x") -> torch.Tensor:
    """Return x as a 2-D floating torch tensor with finite values, or raise InvalidWeightsError."""
    if isinstance(x, torch.Tensor):
        points = x.detach()
    else:
        try:
            points = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InvalidWeightsError(
                f"{layer_label(name)}cannot convert {what} of type {type(x).__name__} to a tensor: {exc}"
            ) from None
    if points.ndim != 2:
        raise InvalidWeightsError(
            f"{layer_label(name)}{what} has {points.ndim} dimension(s) (shape {tuple(points.shape)}); "
            "k-means needs a 2-D (n_points, n_features) array"
        )
    if points.shape[0] == 0 or points.shape[1] == 0:
        raise InvalidWeightsError(f"{layer_label(name)}{what} of shape {tuple(points.shape)} is empty")
    if points.is_complex() or points.dtype == torch.bool:
        raise InvalidWeightsError(f"{layer_label(name)}{what} has dtype {points.dtype}; a real-valued array is needed")
    # One thread on CPU here too: at the user's setting each of these full passes is a parallel region
    # that waits a scheduler slice on a busy machine (measured 70x slower at 2 threads, one core busy).
    with single_threaded(points.device):
        if not points.is_floating_point():
            points = points.to(torch.float64)
        n_bad = int((~torch.isfinite(points)).sum())
    if n_bad:
        raise InvalidWeightsError(
            f"{layer_label(name)}{what} holds {n_bad} NaN/Inf value(s); only finite points can be clustered"
        )
    return points


# --------------------------------------------------------------------------------------------------
# Numerical kernels (inputs already checked, centred and in the compute dtype)
# --------------------------------------------------------------------------------------------------


def _default_chunk_size(k: int, device: torch.device) -> int:
    return max(1, (_CPU_CHUNK_PAIRS if device.type == "cpu" else _DEVICE_CHUNK_PAIRS) // k)


class _PointSet:
    """The points being clustered, with every step of Lloyd's algorithm that touches all of them.

    The algorithm around it (convergence, relocation) works on (k × d) tensors; what costs O(n) or
    O(n·k) lives here, in two implementations: numpy on CPU (faster where it matters, see below) and
    torch elsewhere (CUDA, or dtypes numpy lacks).

    Nearest centroids come from one GEMM per chunk of points into buffers allocated once, then a
    minimum over the centroids:

    - torch: scores ``‖c‖² − 2·x·c = [x, 1]·[−2c, ‖c‖²]ᵀ`` (``‖x‖²`` does not move the argmin),
      ``torch.min`` over each row.
    - numpy, k > 32: the same scores; numpy's SIMD argmin over rows of 64+ values measured 3–6× faster
      than torch's ``min(dim)`` with indices.
    - numpy, float32, k ≤ 32: an argmin over rows of so few values is slow in both libraries. The chunk
      is computed transposed, k × points, as full distances ``[−2c, 1, ‖c‖²]·[x, ‖x‖², 1]ᵀ``, and viewed
      as int32 (same order as the floats, which are >= 0). The low ⌈log2 k⌉ mantissa bits are replaced by
      the centroid index, so one vectorised integer minimum over the k rows yields index and distance
      together, 2–4× faster. Distances within 2^-18 (k = 32) of each other, relative, count as ties and
      go to the lower index; float32 GEMM rounding is of a similar size.
    - d = 1: the cells are intervals between midpoints of the sorted centroids; a binary search, O(n log k).

    ``nearest`` returns the GEMM-expanded distances (rounding at the scale of ‖x‖², fine for the
    objective and for re-seeding); ``exact_sqdist`` recomputes ``‖x − c‖²`` from differences.
    """

    def __init__(
        self,
        x: torch.Tensor,
        k: int,
        chunk_size: int | None = None,
        *,
        use_numpy: bool | None = None,
        backend: str = "auto",
    ):
        n, d = x.shape
        self.x, self.n, self.k = x, n, k
        if use_numpy is None:
            use_numpy = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
        self.use_numpy = use_numpy
        self.x_np = x.numpy() if use_numpy else None
        self._x64: Any = None  # float64 copy for the centroid sums, made on first use
        if d == 1:
            self.mode = "line"
            return
        if use_numpy and _use_faiss(backend, n, d, k, x):
            self.mode = "faiss"
            self.faiss = _faiss_module()
            return
        chunk = min(chunk_size or _default_chunk_size(k, x.device), n)
        spans = [(start, min(start + chunk, n)) for start in range(0, n, chunk)]
        self.x_sqnorm = (x * x).sum(1)
        self.chunks: list[tuple[int, int, Any, torch.Tensor, Any]] = []
        if use_numpy and x.dtype == torch.float32 and k <= _PACKED_MAX_K:
            self.mode = "packed"
            self.index_mask = (1 << max(1, (k - 1).bit_length())) - 1
            x_aug_t = torch.cat([x, self.x_sqnorm.unsqueeze(1), x.new_ones((n, 1))], dim=1).t().contiguous()
            self.weights = x.new_empty((k, d + 2))
            self.weights[:, d] = 1.0
            scores_flat = x.new_empty(k * chunk)  # each chunk takes a contiguous (k × rows) view
            self.row_index = np.arange(k, dtype=np.int32)[:, None]
            for start, stop in spans:
                scores = scores_flat[: k * (stop - start)].view(k, stop - start)
                self.chunks.append((start, stop, x_aug_t[:, start:stop], scores, scores.numpy()))
        else:
            self.mode = "scores"
            x_aug = torch.cat([x, x.new_ones((n, 1))], dim=1)
            self.weights_t = x.new_empty((d + 1, k))
            scores_all = x.new_empty((chunk, k))
            self.chunk_rows = np.arange(chunk)
            for start, stop in spans:
                scores = scores_all[: stop - start]
                points = x_aug[start:stop]
                if use_numpy:
                    self.chunks.append((start, stop, points.numpy(), scores, scores.numpy()))
                else:
                    self.chunks.append((start, stop, points, scores, None))

    # -- nearest centroid --------------------------------------------------------------------------

    def nearest(self, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Labels of the nearest centroid, squared distance to it, and the sum of those (float64)."""
        if self.mode == "line":
            labels = self._nearest_on_line(centroids)
            sqdist = self.exact_sqdist(centroids, labels)
        elif self.mode == "packed":
            labels, sqdist = self._nearest_packed(centroids)
        elif self.mode == "faiss":
            distances, indices = self.faiss.knn(self.x_np, np.ascontiguousarray(centroids.numpy()), 1)
            labels, sqdist = torch.from_numpy(indices[:, 0]), torch.from_numpy(np.maximum(distances[:, 0], 0.0))
        else:
            labels, sqdist = self._nearest_by_scores(centroids)
        if self.use_numpy:
            return labels, sqdist, float(sqdist.numpy().sum(dtype=np.float64))
        return labels, sqdist, float(sqdist.sum(dtype=torch.float64))

    def _nearest_on_line(self, centroids: torch.Tensor) -> torch.Tensor:
        # Equal centroids share one cell, owned by the lowest index (first of its run in a stable sort),
        # as an argmin would have it.
        values, order = torch.sort(centroids[:, 0], stable=True)
        first_of_run = torch.ones_like(values, dtype=torch.bool)
        first_of_run[1:] = values[1:] != values[:-1]
        distinct, owners = values[first_of_run], order[first_of_run]
        midpoints = (distinct[1:] + distinct[:-1]) * 0.5
        if self.x_np is not None:
            return torch.from_numpy(np.take(owners.numpy(), np.searchsorted(midpoints.numpy(), self.x_np[:, 0])))
        return owners[torch.searchsorted(midpoints, self.x[:, 0].contiguous())]

    def _nearest_by_scores(self, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = centroids.shape[1]
        torch.mul(centroids.t(), -2.0, out=self.weights_t[:d])
        torch.sum(centroids * centroids, 1, out=self.weights_t[d])
        if self.use_numpy:
            labels_np = np.empty(self.n, dtype=np.int64)
            best_np = np.empty(self.n, dtype=self.x_sqnorm.numpy().dtype)
            weights_np = self.weights_t.numpy()
            for start, stop, points, _, scores_np in self.chunks:
                np.matmul(points, weights_np, out=scores_np)  # numpy's BLAS: 1.2-1.7x faster here than torch.mm
                chunk_labels = np.argmin(scores_np, axis=1, out=labels_np[start:stop])
                best_np[start:stop] = scores_np[self.chunk_rows[: stop - start], chunk_labels]
            best_np += self.x_sqnorm.numpy()
            np.maximum(best_np, 0.0, out=best_np)
            return torch.from_numpy(labels_np), torch.from_numpy(best_np)
        labels = torch.empty(self.n, dtype=torch.int64, device=self.x.device)
        best = torch.empty_like(self.x_sqnorm)
        for start, stop, points, scores, _ in self.chunks:
            torch.mm(points, self.weights_t, out=scores)
            torch.min(scores, dim=1, out=(best[start:stop], labels[start:stop]))
        return labels, best.add_(self.x_sqnorm).clamp_min_(0.0)

    def _nearest_packed(self, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = centroids.shape[1]
        torch.mul(centroids, -2.0, out=self.weights[:, :d])
        torch.sum(centroids * centroids, 1, out=self.weights[:, d + 1])
        keep = np.int32(~self.index_mask)
        packed = np.empty(self.n, dtype=np.int32)
        for start, stop, points_t, scores, scores_np in self.chunks:
            torch.mm(self.weights, points_t, out=scores)
            as_int = scores_np.view(np.int32)  # the integer order of floats >= 0 is their numeric order
            np.bitwise_and(as_int, keep, out=as_int)
            np.bitwise_or(as_int, self.row_index, out=as_int)
            np.minimum.reduce(as_int, axis=0, out=packed[start:stop])
        labels = np.bitwise_and(packed, self.index_mask).astype(np.int64)
        np.bitwise_and(packed, keep, out=packed)
        # Rounding can make a distance slightly negative; it then sorts first, which is as good a choice.
        return torch.from_numpy(labels), torch.from_numpy(np.maximum(packed.view(np.float32), 0.0))

    def exact_sqdist(self, centroids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``‖x − c_label‖²`` from the differences (no cancellation)."""
        if self.x_np is not None:
            diff = self.x_np - np.take(centroids.numpy(), labels.numpy(), axis=0)  # take: 10× faster than [labels]
            return torch.from_numpy(np.einsum("ij,ij->i", diff, diff))
        diff = self.x - centroids.index_select(0, labels)
        return diff.square_().sum(1)

    # -- update --------------------------------------------------------------------------------------

    @property
    def x64(self) -> Any:
        """The points in float64: numpy columns (d × n) on CPU, a torch (n × d) tensor elsewhere."""
        if self._x64 is None:
            if self.x_np is not None:
                self._x64 = np.ascontiguousarray(self.x_np.T, dtype=np.float64)
            else:
                self._x64 = self.x.to(torch.float64)
        return self._x64

    def cluster_sums(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Points per cluster (int64, k) and the float64 sum of each cluster's points (k × d)."""
        if self.x_np is not None:
            # One bincount per feature: measured faster than index_add_, np.add.at or a one-hot GEMM.
            labels_np = labels.numpy()
            sums = np.empty((self.x64.shape[0], self.k))
            for column, feature in zip(sums, self.x64, strict=True):
                column[:] = np.bincount(labels_np, weights=feature, minlength=self.k)
            return torch.from_numpy(np.bincount(labels_np, minlength=self.k)), torch.from_numpy(sums.T)
        counts = torch.bincount(labels, minlength=self.k)
        sums = self.x64.new_zeros((self.k, self.x.shape[1])).index_add_(0, labels, self.x64)
        return counts, sums

    def same_labels(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        if self.use_numpy:
            return bool(np.array_equal(a.numpy(), b.numpy()))
        return torch.equal(a, b)


def _assign_exact(
    x: torch.Tensor, centroids: torch.Tensor, chunk_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every point and the exactly recomputed squared distance to it."""
    points = _PointSet(x, centroids.shape[0], chunk_size)
    labels, _, _ = points.nearest(centroids)
    return labels, points.exact_sqdist(centroids, labels)


def _start_sample(
    x: torch.Tensor, size: int, tail_share: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The k-means++ start's sample of ``size`` rows of (centred) x, and the weight of each row.

    A uniform draw (no weights) when ``tail_share`` is 0. Otherwise the ``tail_share · size`` rows
    farthest from the mean, each standing for itself, and a uniform draw of the others, each standing
    for ``(n − t) / (size − t)`` of them: an unbiased sample of every sum the start computes.
    """
    n = x.shape[0]
    n_tail = int(tail_share * size)
    if n_tail == 0:
        return x[torch.randperm(n, generator=generator)[:size].to(x.device)], None
    # A reduction, not (x ** 2).sum(1): no n × d temporary (float32 norms order the points well enough).
    tail = torch.topk(torch.linalg.vector_norm(x, dim=1), n_tail).indices
    is_rest = torch.ones(n, dtype=torch.bool, device=x.device)
    is_rest[tail] = False
    rest = torch.nonzero(is_rest).squeeze(1)
    drawn = rest[torch.randperm(rest.numel(), generator=generator)[: size - n_tail].to(x.device)]
    weights = torch.ones(size, dtype=torch.float64, device=x.device)
    weights[n_tail:] = (n - n_tail) / (size - n_tail)
    return x[torch.cat([tail, drawn])], weights


def _kmeans_plusplus(
    x: torch.Tensor,
    k: int,
    generator: torch.Generator,
    *,
    weights: torch.Tensor | None = None,
    use_numpy: bool | None = None,
) -> torch.Tensor:
    """Greedy k-means++ (scikit-learn's): k centres chosen among the rows of x.

    With ``weights`` (float64, one per row) it is scikit-learn's weighted k-means++: the first centre
    is drawn ∝ weight, candidates ∝ weight · D², and the best candidate lowers Σ weight · D² most.

    ``‖x − y‖² = [x, ‖x‖², 1]·[−2y, 1, ‖y‖²]ᵀ``, so one GEMM gives the distances of all points to
    the candidates; the distance to the nearest chosen centre is updated incrementally (an elementwise
    minimum with the winning candidate's row). On CPU the loop runs in numpy (fewer, cheaper calls per
    step than torch: 1.3–3× faster measured); elsewhere in torch, with the same random draws.
    """
    n, d = x.shape
    n_trials = 2 + int(math.log(k))
    if use_numpy is None:
        use_numpy = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
    if use_numpy:
        sample_weight = None if weights is None else weights.numpy()
        return torch.from_numpy(_kmeans_plusplus_numpy(x.numpy(), k, n_trials, generator, sample_weight))
    x_sqnorm = (x * x).sum(1, keepdim=True)
    x_aug_t = torch.cat([x, x_sqnorm, torch.ones_like(x_sqnorm)], dim=1).t().contiguous()
    distances = x.new_empty((n_trials, n))
    zero = x.new_zeros(())
    centres = x.new_empty((k, d))

    def candidate_weights(candidates: torch.Tensor) -> torch.Tensor:
        y = x[candidates]
        return torch.cat([-2.0 * y, torch.ones_like(y[:, :1]), (y * y).sum(1, keepdim=True)], dim=1)

    chosen = _first_centre(n, weights, generator).to(x.device)
    closest = torch.mm(candidate_weights(chosen.view(1)), x_aug_t)[0].clamp_min_(0.0)
    for c in range(k):
        closest[chosen] = 0.0  # exact: a chosen point must carry no probability mass
        centres[c] = x[chosen]
        if c == k - 1:
            break
        mass = closest if weights is None else closest * weights
        cumulative = torch.cumsum(mass, 0, dtype=torch.float64)
        draws = torch.rand(n_trials, generator=generator, dtype=torch.float64).to(x.device)
        candidates = torch.searchsorted(cumulative, draws.mul_(cumulative[-1])).clamp_(max=n - 1)
        torch.mm(candidate_weights(candidates), x_aug_t, out=distances)
        distances.clamp_(min=zero, max=closest)  # squared distance to the nearest centre once chosen
        best = torch.argmin(distances.sum(1) if weights is None else distances.to(torch.float64) @ weights)
        closest = distances[best].clone()  # a 0-d index gives a view, and the buffer is reused
        chosen = candidates[best]
    return centres


def _first_centre(n: int, weights: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """Index of k-means++'s first centre: uniform, or drawn ∝ weight (a 0-d CPU tensor)."""
    if weights is None:
        return torch.randint(n, (1,), generator=generator)[0]
    cumulative = torch.cumsum(weights.cpu(), 0)
    draw = torch.rand(1, generator=generator, dtype=torch.float64) * cumulative[-1]
    return torch.searchsorted(cumulative, draw).clamp_(max=n - 1)[0]


def _kmeans_plusplus_numpy(
    x: np.ndarray, k: int, n_trials: int, generator: torch.Generator, sample_weight: np.ndarray | None = None
) -> np.ndarray:
    """:func:`_kmeans_plusplus` on CPU: the same draws and choices, in numpy."""
    n, d = x.shape
    x_sqnorm = np.einsum("ij,ij->i", x, x)
    x_aug_t = np.empty((d + 2, n), dtype=x.dtype)
    x_aug_t[:d], x_aug_t[d], x_aug_t[d + 1] = x.T, x_sqnorm, 1.0
    candidate_rows = np.empty((n_trials, d + 2), dtype=x.dtype)
    candidate_rows[:, d] = 1.0
    distances = np.empty((n_trials, n), dtype=x.dtype)
    cumulative_t = torch.empty(n, dtype=torch.float64)
    cumulative = cumulative_t.numpy()
    centres = np.empty((k, d), dtype=x.dtype)
    weights = None if sample_weight is None else torch.from_numpy(sample_weight)
    chosen = int(_first_centre(n, weights, generator))
    closest = np.maximum(x_sqnorm - 2.0 * (x @ x[chosen]) + x_sqnorm[chosen], 0.0).astype(x.dtype)
    for c in range(k):
        closest[chosen] = 0.0  # exact: a chosen point must carry no probability mass
        centres[c] = x[chosen]
        if c == k - 1:
            break
        # torch's float32 -> float64 cumsum: 4x faster than numpy's here (measured, n = 8192)
        mass = closest if sample_weight is None else closest * sample_weight
        torch.cumsum(torch.from_numpy(mass), 0, dtype=torch.float64, out=cumulative_t)
        draws = torch.rand(n_trials, generator=generator, dtype=torch.float64).numpy() * cumulative[-1]
        candidates = np.minimum(np.searchsorted(cumulative, draws), n - 1)
        np.multiply(x[candidates], -2.0, out=candidate_rows[:, :d])
        candidate_rows[:, d + 1] = x_sqnorm[candidates]
        np.matmul(candidate_rows, x_aug_t, out=distances)  # numpy's BLAS: faster than torch.mm here (measured)
        # Squared distance to the nearest centre once a candidate is chosen. Rounding can make a
        # distance slightly negative; only the winner's row is clamped (the sums are unaffected at
        # the rounding level), saving a pass over all n_trials rows.
        np.minimum(distances, closest, out=distances)
        best = int(np.argmin(distances.sum(1) if sample_weight is None else distances @ sample_weight))
        closest = np.maximum(distances[best], 0.0)
        chosen = int(candidates[best])
    return centres


def _update_centres(
    points: _PointSet, labels: torch.Tensor, sqdist: torch.Tensor, centres: torch.Tensor
) -> torch.Tensor:
    """Means of the clusters (float64 sums); empty clusters take the points farthest from their centre."""
    counts, sums = points.cluster_sums(labels)
    if bool(counts.all()):
        return (sums / counts.unsqueeze(1)).to(centres.dtype)
    # scikit-learn's relocation: the point farthest from its centre re-seeds the lowest-numbered empty
    # cluster, the next farthest the next one, and each leaves the cluster it was in.
    empty = torch.nonzero(counts == 0).squeeze(1)
    farthest = torch.topk(sqdist, min(empty.numel(), points.n)).indices
    empty = empty[: farthest.numel()]
    donors = labels[farthest]
    moved = points.x[farthest].to(torch.float64)
    sums.index_add_(0, donors, -moved)
    counts.index_add_(0, donors, torch.full_like(farthest, -1))
    sums[empty] = moved
    counts[empty] = 1
    means = (sums / counts.clamp_min(1).unsqueeze(1)).to(centres.dtype)
    # A cluster still empty (possible only with fewer distinct points than k) keeps its centre.
    return torch.where(counts.unsqueeze(1) > 0, means, centres)


def _faiss_clustering(x: np.ndarray, k: int, niter: int, seed: int) -> Any:
    """A ``faiss.Clustering`` that trains on exactly the given points (our sample, no further subsampling)."""
    faiss = _faiss_module()
    params = faiss.ClusteringParameters()
    params.niter = niter
    params.seed = seed
    params.max_points_per_centroid = x.shape[0] // k + 1  # k · this > n: faiss keeps every point
    params.min_points_per_centroid = 1  # no warning for few points per centroid
    params.check_input_data_for_NaNs = False  # checked at the public door
    return faiss.Clustering(x.shape[1], k, params)


def _faiss_kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """faiss's k-means++ start on the rows of x (CPU, float32), seeded from ``generator``."""
    faiss = _faiss_module()
    points = np.ascontiguousarray(x.numpy())
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    clustering = _faiss_clustering(points, k, 0, seed)
    clustering.init_method = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
    clustering.train(points, faiss.IndexFlatL2(points.shape[1]))
    return torch.from_numpy(faiss.vector_to_array(clustering.centroids).reshape(k, -1))


def _faiss_lloyd(x: torch.Tensor, centres: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, int, list[float]]:
    """faiss's Lloyd loop from the given centres: final centres, iterations run, objective per iteration.

    faiss stops at ``max_iter`` or when the objective repeats exactly (the labels repeated one
    iteration earlier: our ``tol = 0`` rule, one iteration later). Its objective is the same as ours
    (the assignment step's sum of squared distances, before the update). An empty cluster is re-seeded
    by splitting a large one (faiss's rule) rather than by scikit-learn's farthest-point relocation.
    """
    faiss = _faiss_module()
    points = np.ascontiguousarray(x.numpy())
    k, d = centres.shape
    clustering = _faiss_clustering(points, k, max_iter, 0)  # the seed is unused: every centre is given
    faiss.copy_array_to_vector(np.ascontiguousarray(centres.numpy(), dtype=np.float32).ravel(), clustering.centroids)
    clustering.train(points, faiss.IndexFlatL2(d))
    stats = clustering.iteration_stats
    objective = [float(stats.at(i).obj) for i in range(stats.size())]
    final = torch.from_numpy(faiss.vector_to_array(clustering.centroids).reshape(k, d))
    return final, len(objective), objective


def _lloyd(
    points: _PointSet, centres: torch.Tensor, max_iter: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, list[float]]:
    """Lloyd iterations with scikit-learn's stopping rules; labels/sqdist match the returned centres."""
    previous_labels: torch.Tensor | None = None
    objective: list[float] = []
    strict_convergence = False
    n_iter = 0
    while n_iter < max_iter:
        n_iter += 1
        labels, sqdist, total = points.nearest(centres)
        objective.append(total)
        new_centres = _update_centres(points, labels, sqdist, centres)
        shift = float((new_centres - centres).square_().sum())
        centres = new_centres
        if previous_labels is not None and points.same_labels(labels, previous_labels):
            # Same labels twice: the update reproduced the centres these labels were computed for.
            strict_convergence = True
            break
        if shift <= tol:
            break
        previous_labels = labels
    if not strict_convergence:
        labels, _, _ = points.nearest(centres)
    return centres, labels, points.exact_sqdist(centres, labels), n_iter, objective


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def kmeans(
    x: torch.Tensor | np.ndarray,
    k: int,
    *,
    seed: int = 0,
    config: KMeansConfig | None = None,
    max_iter: int | None = None,
    tol: float | None = None,
    max_points_per_centroid: int | None = None,
    init: torch.Tensor | np.ndarray | None = None,
    dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
    name: str | None = None,
) -> KMeansResult:
    """Cluster the rows of x into k groups: seeded k-means++ then Lloyd iterations, on x's device.

    Parameters
    ----------
    x : torch.Tensor or numpy.ndarray of shape (n, d)
        Points, one per row; any real dtype. Runs on ``x.device`` (CPU or CUDA).
    k : int
        Number of clusters, ``2 <= k < n``.
    seed : int, default 0
        Seeds the subsamples and the k-means++ draws (a CPU ``torch.Generator``).
    config : KMeansConfig, optional
        Engine options (default ``KMeansConfig()``: up to 300 iterations, scikit-learn's tolerance).
    max_iter, tol, max_points_per_centroid, dtype, chunk_size : optional
        Shortcuts that override the same field of ``config`` when given (see :class:`KMeansConfig`).
    init : torch.Tensor or numpy.ndarray of shape (k, d), optional
        Initial centroids; skips k-means++.
    name : str, optional
        Layer name, used in error messages.

    Returns
    -------
    KMeansResult
        Centroids in the compute dtype, labels and centroids on x's device. On CPU the call runs
        single-threaded (see :func:`~lr2vq_analysis._threads.single_threaded`).

    Raises
    ------
    InvalidWeightsError
        If x is not 2-D, is empty, or holds NaN/Inf.
    InvalidParameterError
        If k is not an integer with ``2 <= k < n``, or seed, init or an option is invalid.

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0]])
    >>> result = kmeans(x, 2, seed=0)
    >>> sorted(result.centroids.tolist())
    [[0.0, 0.5], [10.0, 0.5]]
    >>> result.inertia
    1.0
    >>> bool(result.labels[0] == result.labels[1]) and bool(result.labels[0] != result.labels[2])
    True
    """
    overrides: dict[str, Any] = {
        "max_iter": max_iter,
        "tol": tol,
        "max_points_per_centroid": max_points_per_centroid,
        "dtype": dtype,
        "chunk_size": chunk_size,
    }
    options = config if config is not None else KMeansConfig()
    if not isinstance(options, KMeansConfig):
        raise InvalidParameterError(f"config={config!r} is invalid; it must be a KMeansConfig")
    given = {key: value for key, value in overrides.items() if value is not None}
    if given:
        options = dataclasses.replace(options, **given)
    points = _as_points(x, name=name)
    n, d = points.shape
    k = check_k(k, n, name=name)
    seed = check_seed(seed)
    initial = None
    if init is not None:
        initial = _as_points(init, name=name, what="init")
        if tuple(initial.shape) != (k, d):
            raise InvalidParameterError(
                f"{layer_label(name)}init has shape {tuple(initial.shape)}; it must be (k, d) = ({k}, {d})"
            )
    if options.backend == "faiss" and (points.device.type != "cpu" or options.dtype != torch.float32):
        raise InvalidParameterError(f"{layer_label(name)}backend='faiss' runs on CPU in float32 only")
    with torch.no_grad(), single_threaded(points.device):
        return _kmeans(points, k, seed, options, initial)


def _kmeans(points: torch.Tensor, k: int, seed: int, options: KMeansConfig, init: torch.Tensor | None) -> KMeansResult:
    """:func:`kmeans` on checked arguments."""
    max_iter, tol, dtype, chunk_size = options.max_iter, options.tol, options.dtype, options.chunk_size
    max_points_per_centroid, init_points_per_centroid = (
        options.max_points_per_centroid,
        options.init_points_per_centroid,
    )
    n, d = points.shape
    device = points.device
    # Centre the data: the GEMM expansion of the distances is accurate only near the origin.
    mean = points.mean(0, dtype=torch.float64)
    data = (points.to(torch.float64) - mean).to(dtype)

    generator = torch.Generator(device="cpu").manual_seed(seed)
    train_rows: torch.Tensor | None = None
    train = data
    if max_points_per_centroid is not None and n > k * max_points_per_centroid:
        train_rows = torch.randperm(n, generator=generator)[: k * max_points_per_centroid].to(device)
        train = data[train_rows]

    # Where faiss's search is the faster kernel and the stopping rule is faiss's own (tol = 0: stop when the
    # labels repeat; faiss stops when the objective repeats, which happens one iteration later), the whole
    # loop goes to faiss: its Lloyd is the same algorithm with less per-iteration overhead (1.2-2x measured,
    # docs/kmeans.md). With tol > 0 the shift rule needs every iteration's centres, so our loop runs, with
    # faiss's search inside it where that is faster.
    hand_over = tol == 0 and d > 1 and _use_faiss(options.backend, train.shape[0], d, k, train, whole_loop=True)
    if init is None:
        seeds, seed_weights = train, None
        n_seeds = max(k * init_points_per_centroid, _MIN_INIT_POINTS) if init_points_per_centroid else n
        if d > 1 and train.shape[0] > n_seeds:
            # faiss-style: the start needs far fewer points than Lloyd (measured in docs/kmeans.md)
            seeds, seed_weights = _start_sample(train, n_seeds, options.init_tail_share, generator)
        if hand_over and seed_weights is None:
            # faiss's k-means++ on the same sample: 5-8x cheaper than the greedy start, same distortion
            # after Lloyd (measured in docs/kmeans.md). It ignores weights, hence not for a tail sample.
            centres = _faiss_kmeans_plusplus(seeds, k, generator)
        else:
            centres = _kmeans_plusplus(seeds, k, generator, weights=seed_weights)
    else:
        centres = (init.to(device=device, dtype=torch.float64) - mean).to(dtype)

    if hand_over:
        centres, n_iter, objective = _faiss_lloyd(train, centres, max_iter)
        labels, sqdist = _assign_exact(data, centres, chunk_size)
        inertia = float(sqdist.sum(dtype=torch.float64))
        train_inertia = inertia if train_rows is None else float(sqdist[train_rows].sum(dtype=torch.float64))
    else:
        tol_abs = tol * float(train.to(torch.float64).var(0, unbiased=False).mean())
        point_set = _PointSet(train, k, chunk_size, backend=options.backend)
        centres, labels, sqdist, n_iter, objective = _lloyd(point_set, centres, max_iter, tol_abs)
        train_inertia = float(sqdist.sum(dtype=torch.float64))
        inertia = train_inertia
        if train_rows is not None:
            labels, sqdist = _assign_exact(data, centres, chunk_size)
            inertia = float(sqdist.sum(dtype=torch.float64))
            train_inertia = float(sqdist[train_rows].sum(dtype=torch.float64))
    return KMeansResult(
        centroids=(centres.to(torch.float64) + mean).to(dtype),
        labels=labels.to(device),
        inertia=inertia,
        train_inertia=train_inertia,
        n_iter=n_iter,
        objective=objective,
        n_train=int(train.shape[0]),
    )


def assign(
    x: torch.Tensor, centroids: torch.Tensor, *, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every point, and the squared distance to it.

    The argmin goes through a GEMM per chunk of points (after shifting both sets by the centroids'
    mean, for accuracy); the returned distances are recomputed exactly as ``‖x − c‖²``. Nothing is
    differentiable here: use the labels to gather centroids when gradients are needed.

    Parameters
    ----------
    x : torch.Tensor of shape (n, d)
        Points.
    centroids : torch.Tensor of shape (k, d)
        Centroids, on x's device.
    chunk_size : int, optional
        Points per distance block; the default keeps a block at 2^18 (point, centroid) pairs on CPU
        and 2^24 on CUDA.

    Returns
    -------
    labels : torch.Tensor of shape (n,), int64
    sqdist : torch.Tensor of shape (n,)
        In the promoted floating dtype of x and centroids (at least float32).

    Raises
    ------
    InvalidParameterError
        If the shapes, devices or chunk_size do not fit.

    Examples
    --------
    >>> import torch
    >>> labels, sqdist = assign(torch.tensor([[0.0], [0.9], [3.0]]), torch.tensor([[0.0], [1.0]]))
    >>> labels.tolist(), [round(v, 4) for v in sqdist.tolist()]
    ([0, 1, 1], [0.0, 0.01, 4.0])
    """
    if not isinstance(x, torch.Tensor) or not isinstance(centroids, torch.Tensor):
        raise InvalidParameterError("assign expects torch tensors for x and centroids")
    if x.ndim != 2 or centroids.ndim != 2 or x.shape[1] != centroids.shape[1] or centroids.shape[0] == 0:
        raise InvalidParameterError(
            f"assign needs x of shape (n, d) and centroids of shape (k, d) with k >= 1; "
            f"got {tuple(x.shape)} and {tuple(centroids.shape)}"
        )
    if x.device != centroids.device:
        raise InvalidParameterError(f"x is on {x.device} but centroids are on {centroids.device}")
    chunk = check_param("chunk_size", chunk_size)
    dtype = torch.promote_types(torch.promote_types(x.dtype, centroids.dtype), torch.float32)
    with torch.no_grad(), single_threaded(x.device):
        centre = centroids.to(dtype).mean(0)
        return _assign_exact(x.detach().to(dtype) - centre, centroids.detach().to(dtype) - centre, chunk)


class KMeans:
    """scikit-learn-style estimator around :func:`kmeans`.

    Parameters
    ----------
    n_clusters : int
        Number of clusters k.
    max_iter, tol, max_points_per_centroid
        As in :class:`KMeansConfig` (defaults: scikit-learn's 300 and 1e-4, no subsampling).
    seed : int, default 0
        Seeds the start and any subsample.
    random_state : int, optional
        scikit-learn's name for ``seed`` (an int only: the engine draws from a CPU ``torch.Generator``,
        not from numpy). Give one or the other; giving both with different values is an error.
    device : str or torch.device, optional
        Where to run; default: the device of a tensor passed to :meth:`fit`, else CPU.
    config : KMeansConfig, optional
        Further engine options; ``max_iter``, ``tol`` and ``max_points_per_centroid`` override its fields.

    Attributes
    ----------
    cluster_centers_ : numpy.ndarray of shape (k, d), float64
    labels_ : numpy.ndarray of shape (n,), int64
    inertia_ : float
        Sum of squared distances of all fitted points to their centre.
    train_inertia_ : float
        The same over the training points (differs from ``inertia_`` only when subsampled).
    n_iter_ : int
    objective_ : list of float
        Objective at each iteration (see :class:`KMeansResult`).
    n_train_ : int
    n_features_in_ : int
    result_ : KMeansResult
        The engine's result (centroids on the device they were computed on).

    Examples
    --------
    >>> import numpy as np
    >>> X = np.array([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0]])
    >>> km = KMeans(2, random_state=0).fit(X)
    >>> km.cluster_centers_.dtype, km.inertia_
    (dtype('float64'), 1.0)
    >>> bool(km.predict(np.array([[9.0, 0.0]]))[0] == km.labels_[2])
    True
    """

    def __init__(
        self,
        n_clusters: int,
        *,
        max_iter: int = 300,
        tol: float = 1e-4,
        seed: int = 0,
        random_state: int | None = None,
        max_points_per_centroid: int | None = None,
        device: str | torch.device | None = None,
        config: KMeansConfig | None = None,
    ) -> None:
        self.n_clusters = n_clusters
        self.max_iter = max_iter
        self.tol = tol
        self.seed = seed
        self.random_state = random_state
        self.max_points_per_centroid = max_points_per_centroid
        self.device = device
        self.config = config

    def __repr__(self) -> str:
        return (
            f"KMeans(n_clusters={self.n_clusters}, max_iter={self.max_iter}, tol={self.tol}, seed={self.seed}, "
            f"random_state={self.random_state}, max_points_per_centroid={self.max_points_per_centroid}, "
            f"device={self.device})"
        )

    def _seed(self) -> int:
        if self.random_state is None:
            return check_seed(self.seed)
        if not isinstance(self.random_state, (int, np.integer)) or isinstance(self.random_state, bool):
            raise InvalidParameterError(
                f"random_state={self.random_state!r} is invalid; KMeans takes an int seed "
                "(its random numbers come from a torch.Generator, not from numpy)"
            )
        if self.seed not in (0, self.random_state):
            raise InvalidParameterError(
                f"seed={self.seed} and random_state={self.random_state} disagree; give only one of them"
            )
        return check_seed(self.random_state)

    def _to_tensor(self, X: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
        points = _as_points(X, name=None, what=what)
        return points if self.device is None else points.to(self.device)

    def fit(self, X: np.ndarray | torch.Tensor) -> KMeans:
        """Cluster X (n × d); returns self."""
        config = dataclasses.replace(
            self.config if self.config is not None else KMeansConfig(),
            max_iter=self.max_iter,
            tol=self.tol,
            max_points_per_centroid=self.max_points_per_centroid,
        )
        points = self._to_tensor(X, "X")
        result = kmeans(points, self.n_clusters, seed=self._seed(), config=config)
        self.result_ = result
        self.cluster_centers_ = result.centroids.detach().cpu().to(torch.float64).numpy()
        self.labels_ = result.labels.cpu().numpy()
        self.inertia_ = result.inertia
        self.train_inertia_ = result.train_inertia
        self.n_iter_ = result.n_iter
        self.objective_ = result.objective
        self.n_train_ = result.n_train
        self.n_features_in_ = int(points.shape[1])
        return self

    def fit_predict(self, X: np.ndarray | torch.Tensor) -> np.ndarray:
        """Fit, then return the labels of X."""
        return self.fit(X).labels_

    def predict(self, X: np.ndarray | torch.Tensor) -> np.ndarray:
        """Index of the nearest fitted centre for every row of X (int64 numpy array)."""
        if not hasattr(self, "result_"):
            raise NotFittedError("this KMeans is not fitted yet; call fit(X) first")
        points = self._to_tensor(X, "X")
        centroids = self.result_.centroids
        if points.ndim != 2 or points.shape[1] != centroids.shape[1]:
            raise InvalidWeightsError(
                f"X has {points.shape[1]} features but the fitted centres have {centroids.shape[1]}"
            )
        labels, _ = assign(points.to(centroids.device), centroids)
        return labels.cpu().numpy()
