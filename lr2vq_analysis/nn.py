"""Compressed layers (LR²VQ, PQ, scalar k-means, DKM) and :func:`compress`, which puts them into a model.

An LR²VQ layer stores its weight W, cut into n subvectors of size m (PQF's layout, see
:mod:`~lr2vq_analysis.subvectors`), as low-rank coordinates Z (n × d̃) and a projection P (d̃ × m):
W = Z·P reshaped to the weight's shape. Its :class:`LayerState` says which representation it computes with:

``LayerState.LOWRANK`` (``"lowrank"``)
    Z and P are trainable parameters, initialised from the pretrained weight by the spectrum of its
    subvectors (Z = X·V_d̃, P = V_d̃ᵀ: the best rank-d̃ approximation). The network can absorb the
    truncation error by training before anything is quantized.
``LayerState.QUANTIZED`` (``"quantized"``)
    :meth:`~_LR2VQLayer.quantize` clusters Z with the package's k-means engine: Z is replaced by integer
    codes (a buffer, fixed from then on) into a trainable codebook (k × d̃); P stays trainable.
    W = codebook[codes]·P.
``LayerState.DKM`` (``"dkm"``)
    Differentiable k-means (Cho et al., ICLR 2022; coremltools' DKMPalettizer): Z stays trainable and
    every forward pass replaces each row of Z by a soft mixture of centroids,
    softmax(−‖z − c‖ / τ)·C, after a few differentiable soft k-means updates of the centroids C. The
    assignment therefore follows the weights as they move; :meth:`~_LR2VQLayer.quantize` makes it hard.

The transitions are :data:`TRANSITIONS`: any state → ``lowrank`` (:meth:`~_LR2VQLayer.init_from_weight`),
``lowrank`` → ``dkm`` (:meth:`~_LR2VQLayer.start_dkm`), ``lowrank``/``dkm`` → ``quantized``
(:meth:`~_LR2VQLayer.quantize`), any state → ``quantized`` (:meth:`~_LR2VQLayer.set_quantized`, given codes).
Any other call raises :class:`~lr2vq_analysis.exceptions.StateError`.

**fp16 grid.** The file stores codebooks and projections at fp16 with one power-of-two scale 2**e per
tensor (an integer exponent e, chosen so the tensor's largest magnitude lies in (2**14, 2**15]·2**e):
fp16's 11-bit precision at any magnitude, with no overflow above 65504 and no flush to zero at 1e-9.
:meth:`~_LR2VQLayer.quantize` and :meth:`~_LR2VQLayer.round_fp16_` round to that grid in memory too.

The special case d̃ = m is plain product quantization: no P, and Z is the subvector matrix itself, so the
same code runs the PQ baselines, and m = 1 gives scalar k-means. Only Linear, Conv1d and Conv2d with
``groups=1`` are compressible: a grouped or depthwise convolution's rows are short and its subvectors
would mix unrelated filters, so such layers are left uncompressed (naming one in a plan is an error).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validation import check_k, check_m, check_param, check_seed, layer_label
from .exceptions import InvalidParameterError, InvalidWeightsError, NonFiniteError, StateError
from .kmeans import QUANTIZE_KMEANS, KMeansConfig, assign, kmeans
from .plan import LayerPlan
from .spectrum import compute_spectrum
from .subvectors import n_subvectors, row_length, to_subvectors

__all__ = [
    "LayerState",
    "STATES",
    "TRANSITIONS",
    "METHODS",
    "DKMConfig",
    "LR2VQLinear",
    "LR2VQConv1d",
    "LR2VQConv2d",
    "CompressedModel",
    "compress",
    "compressible_layers",
    "reconstruct_weight",
    "fp16_exponent",
    "round_to_fp16_grid",
]


class LayerState(str, Enum):
    """The representation a compressed layer computes its weight with (compares equal to its string value).

    Parameters
    ----------
    value : {"lowrank", "quantized", "dkm"}
        ``LayerState("dkm")`` is ``LayerState.DKM``.

    Examples
    --------
    >>> LayerState.QUANTIZED == "quantized", LayerState("dkm") is LayerState.DKM, LayerState.DKM
    (True, True, 'dkm')
    """

    LOWRANK = "lowrank"
    QUANTIZED = "quantized"
    DKM = "dkm"

    __signature__ = inspect.Signature([inspect.Parameter("value", inspect.Parameter.POSITIONAL_ONLY)])

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:  # prints as the string it equals, in dicts and doctests alike
        return repr(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


#: The states a compressed layer can be in, as strings.
STATES = tuple(state.value for state in LayerState)
#: Allowed state changes: method → (states it may be called in, state it leaves the layer in).
TRANSITIONS: dict[str, tuple[tuple[LayerState, ...], LayerState]] = {
    "init_from_weight": (tuple(LayerState), LayerState.LOWRANK),
    "start_dkm": ((LayerState.LOWRANK,), LayerState.DKM),
    "quantize": ((LayerState.LOWRANK, LayerState.DKM), LayerState.QUANTIZED),
    "set_quantized": (tuple(LayerState), LayerState.QUANTIZED),
}
#: The methods :func:`compress` accepts.
METHODS = ("lr2vq", "dkm")

_TINY = 1e-12  # below this a soft cluster is empty; its centroid is kept instead of divided by ~0
_FP16_TOP = 15  # the largest magnitude of a tensor maps into (2**14, 2**15], below fp16's maximum 65504
#: Largest |exponent| of a tensor's fp16 scale 2**e (float32 weights need at most ~165).
MAX_FP16_EXPONENT = 300

_Layer = TypeVar("_Layer", bound="_LR2VQLayer")
_DenseLayer = nn.Linear | nn.Conv1d | nn.Conv2d


@dataclass(frozen=True)
class DKMConfig:
    """Options of differentiable k-means (``compress(..., method="dkm", dkm=DKMConfig(...))``).

    Validated at construction. The k-means that gives DKM its initial centroids has its own options
    object, so that DKM's per-step iterations and the initial clustering are set separately.

    Parameters
    ----------
    tau : float, default 1e-4
        Softmax temperature, in units of Euclidean distance between subvectors (coremltools' default).
    soft_iter : int, default 3
        Soft (differentiable) k-means updates of the centroids per training forward pass.
    epsilon : float, default 1e-4
        The soft updates stop once no centroid coordinate moves by more than this.
    kmeans : KMeansConfig, optional
        Options of the initial k-means (default :data:`~lr2vq_analysis.kmeans.QUANTIZE_KMEANS`, the same
        as :meth:`~_LR2VQLayer.quantize` uses).

    Examples
    --------
    >>> from lr2vq_analysis.kmeans import KMeansConfig
    >>> DKMConfig(tau=1e-3, kmeans=KMeansConfig(max_iter=50)).kmeans.max_iter
    50
    """

    tau: float = 1e-4
    soft_iter: int = 3
    epsilon: float = 1e-4
    kmeans: KMeansConfig | None = None

    def __post_init__(self) -> None:
        for field in ("tau", "soft_iter", "epsilon"):
            object.__setattr__(self, field, check_param(field, getattr(self, field)))
        if self.kmeans is not None and not isinstance(self.kmeans, KMeansConfig):
            raise InvalidParameterError(
                f"kmeans={self.kmeans!r} is invalid; kmeans must be a KMeansConfig(max_iter=..., ...) or None"
            )


def reconstruct_weight(
    points: Tensor, projection: Tensor | None, shape: tuple[int, ...], codes: Tensor | None = None
) -> Tensor:
    """Dense weight from subvector coordinates, in PQF's layout (the torch side of ``from_subvectors``).

    Parameters
    ----------
    points : torch.Tensor of shape (n, d̃) or (k, d̃)
        Low-rank coordinates Z, or a codebook when ``codes`` is given.
    projection : torch.Tensor of shape (d̃, m), or None
        The projection P; None for PQ (d̃ = m), where the points are the subvectors themselves.
    shape : tuple of int
        The dense weight's shape, output channels first.
    codes : torch.Tensor of shape (n,), optional
        Row of ``points`` each subvector uses (quantized state).

    Returns
    -------
    torch.Tensor of the given shape, differentiable in ``points`` and ``projection``.

    Examples
    --------
    >>> codebook = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> reconstruct_weight(codebook, None, (2, 4), codes=torch.tensor([0, 1, 1, 0]))
    tensor([[1., 0., 0., 2.],
            [0., 2., 1., 0.]])
    """
    rows = points if projection is None else points @ projection
    if codes is not None:
        rows = rows[codes]  # project the k centroids first, then gather: k ≤ n, so this order is cheaper
    return rows.reshape(shape)


def fp16_exponent(tensor: Tensor, *, name: str | None = None) -> int:
    """Exponent e of the power-of-two scale 2**e with which ``tensor`` is stored at fp16.

    e puts the largest magnitude into (2**14, 2**15]·2**e, so every value fits fp16 (max 65504) with
    full precision down to 2**-29 of that largest magnitude. An all-zero tensor gets e = 0.

    Parameters
    ----------
    tensor : torch.Tensor
        A codebook or projection.
    name : str, optional
        Layer name, used in messages.

    Returns
    -------
    int

    Raises
    ------
    NonFiniteError
        If the tensor holds NaN/Inf, or its magnitude needs |e| > :data:`MAX_FP16_EXPONENT`.

    Examples
    --------
    >>> fp16_exponent(torch.tensor([1e5, -3.0])), fp16_exponent(torch.tensor([2.0**-30])), fp16_exponent(torch.ones(2))
    (2, -45, -15)
    """
    label = f"layer {name!r}: " if name else ""
    detached = tensor.detach()
    if not bool(torch.isfinite(detached).all()):
        raise NonFiniteError(
            f"{label}a codebook or projection holds NaN/Inf; it cannot be stored (retrain or re-quantize)"
        )
    peak = float(detached.abs().max()) if detached.numel() else 0.0
    if peak == 0.0:
        return 0
    mantissa, exponent = math.frexp(peak)  # peak = mantissa·2**exponent, mantissa in [0.5, 1)
    ceil_log2 = exponent - 1 if mantissa == 0.5 else exponent
    result = ceil_log2 - _FP16_TOP
    if abs(result) > MAX_FP16_EXPONENT:
        raise NonFiniteError(f"{label}magnitude {peak:g} is outside the range a stored fp16 scale covers")
    return result


def to_fp16(tensor: Tensor, exponent: int) -> Tensor:
    """``tensor / 2**exponent`` rounded to fp16: what the file stores (exact scaling, one rounding)."""
    return (tensor.detach().double() * 2.0**-exponent).to(torch.float16)


def from_fp16(half: Tensor, exponent: int, like: Tensor) -> Tensor:
    """Inverse of :func:`to_fp16`, in the dtype and on the device of ``like``."""
    return (half.double() * 2.0**exponent).to(dtype=like.dtype, device=like.device)


def round_to_fp16_grid(tensor: Tensor, *, name: str | None = None) -> Tensor:
    """Round to the nearest value the file can store (fp16 times the tensor's power-of-two scale).

    Keeps the dtype and device. Rounding twice changes nothing.

    Parameters
    ----------
    tensor : torch.Tensor
        The codebook or projection to round.
    name : str, optional
        Layer named in the error message.

    Returns
    -------
    torch.Tensor
        The rounded copy.

    Raises
    ------
    NonFiniteError
        If the tensor holds NaN/Inf (see :func:`fp16_exponent`).

    Examples
    --------
    >>> round_to_fp16_grid(torch.tensor([1e6, 1.0001e6, 1e-9]))
    tensor([1.0000e+06, 1.0000e+06, 0.0000e+00])
    >>> round_to_fp16_grid(torch.tensor([3e-9, 1e-9])) != 0
    tensor([True, True])
    """
    exponent = fp16_exponent(tensor, name=name)
    return from_fp16(to_fp16(tensor, exponent), exponent, tensor)


def _unit_exponent(tensor: Tensor) -> int:
    """e with max|tensor| in [0.5, 1)·2**e: dividing by 2**e brings a tensor to unit scale exactly.

    Clustering and assignment run at unit scale, so that they do not depend on the weights' magnitude
    (at 1e-20 or 1e20 float32 squared distances would underflow or overflow).
    """
    peak = float(tensor.detach().abs().max()) if tensor.numel() else 0.0
    exponent = math.frexp(peak)[1] if math.isfinite(peak) and peak > 0 else 0
    return max(-120, min(120, exponent))  # 2**±120 is a normal float32


def _ldexp(tensor: Tensor, exponent: int) -> Tensor:
    """``tensor · 2**exponent``, exact (barring underflow), in the tensor's dtype."""
    return tensor.detach() * torch.tensor(2.0**exponent, dtype=tensor.dtype) if exponent else tensor.detach()


def _check_groups(name: str, module: nn.Module) -> None:
    """Grouped and depthwise convolutions are not compressible: explain why and what happens to them."""
    groups = getattr(module, "groups", 1)
    if groups != 1:
        raise InvalidParameterError(
            f"{name!r} is a grouped/depthwise convolution (groups={groups}); only groups=1 can be compressed, "
            "because its short rows would put unrelated filters into one subvector. Leave it out of the plan: "
            "it stays uncompressed"
        )


def _dense_weight(module: nn.Module) -> Tensor:
    weight = module.weight
    assert isinstance(weight, Tensor)  # a Linear/Conv weight
    return weight


def _check_layer(name: str, module: nn.Module, plan: LayerPlan) -> None:
    """Check that ``plan`` fits ``module``: groups = 1, m divides the row length, k < number of subvectors."""
    _check_groups(name, module)
    shape = tuple(_dense_weight(module).shape)
    check_m(plan.m, row_length(shape), name=name)
    check_k(plan.k, n_subvectors(shape, plan.m), name=name)


class _LR2VQLayer(nn.Module):
    """State, initialisation and quantization shared by the three compressed layer types."""

    #: The dense layer type this one replaces, and the attributes it copies from it.
    _dense_type: ClassVar[type[nn.Linear] | type[nn.Conv1d] | type[nn.Conv2d]]
    _dense_attributes: ClassVar[tuple[str, ...]]

    Z: nn.Parameter | None
    P: nn.Parameter | None
    codebook: nn.Parameter | None
    codes: Tensor | None
    dkm_centroids: Tensor | None
    bias: nn.Parameter | None
    state: LayerState
    dkm_config: DKMConfig

    def _setup(self, dense: _DenseLayer, plan: LayerPlan, name: str | None) -> None:
        """Copy the dense layer's configuration and bias; no weight representation yet (the caller sets one)."""
        if not isinstance(plan, LayerPlan):
            raise InvalidParameterError(f"plan={plan!r} is invalid; expected a LayerPlan(k, m, d_tilde)")
        _check_layer(name or type(self).__name__, dense, plan)
        for attribute in self._dense_attributes:
            setattr(self, attribute, getattr(dense, attribute))
        self.plan = plan
        self.layer_name = name
        self.weight_shape: tuple[int, ...] = tuple(dense.weight.shape)
        self.state = LayerState.LOWRANK
        self.dkm_config = DKMConfig()
        self.register_parameter("Z", None)
        self.register_parameter("P", None)
        self.register_parameter("codebook", None)
        self.register_buffer("codes", None)
        self.register_buffer("dkm_centroids", None)
        self.bias = None if dense.bias is None else nn.Parameter(dense.bias.detach().clone())

    @classmethod
    def _shell(cls: type[_Layer], dense: _DenseLayer, plan: LayerPlan, name: str | None) -> _Layer:
        """A layer with ``dense``'s configuration and bias, before any weight representation is set.

        Skips the constructor, which would allocate and factorise a randomly initialised weight.
        """
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new._setup(dense, plan, name)
        new.train(dense.training)
        return new

    @classmethod
    def from_dense(cls: type[_Layer], layer: _DenseLayer, plan: LayerPlan, *, name: str | None = None) -> _Layer:
        """Compressed copy of a pretrained layer in the low-rank state (Z and P from its spectrum).

        Parameters
        ----------
        layer : torch.nn.Linear, Conv1d or Conv2d
            The pretrained layer, of this class's dense type (``groups=1``); it is not modified.
        plan : LayerPlan
            k, m and d̃ of this layer.
        name : str, optional
            Layer name, used in messages.
        """
        if not isinstance(layer, cls._dense_type):
            raise InvalidParameterError(
                f"{cls.__name__}.from_dense needs a {cls._dense_type.__name__}, got {type(layer).__name__}"
            )
        return cls._shell(layer, plan, name).init_from_weight(layer.weight.detach())

    # ---------------------------------------------------------------------------------------------
    # state changes

    def _transition(self, action: str) -> LayerState:
        """Check that ``action`` is allowed in the current state; return the state it leads to."""
        allowed, target = TRANSITIONS[action]
        self._require_state(action, allowed)
        return target

    def _require_state(self, action: str, allowed: tuple[LayerState, ...]) -> None:
        if self.state not in allowed:
            names = tuple(sorted(state.value for state in allowed))
            raise StateError(
                f"layer {self.layer_name!r}: cannot {action.replace('_', ' ')} in state '{self.state}'; "
                f"allowed states are {names}"
            )

    def _like(self) -> Tensor:
        """A tensor with the layer's dtype and device (whichever representation is current)."""
        for tensor in (self.Z, self.codebook, self.bias):
            if tensor is not None:
                return tensor
        raise StateError(f"layer {self.layer_name!r} holds no weight representation")

    @torch.no_grad()
    def init_from_weight(self: _Layer, weight: Tensor) -> _Layer:
        """Set Z and P from a dense weight by its spectrum (best rank-d̃ fit) and return to the low-rank state.

        Parameters
        ----------
        weight : torch.Tensor
            A weight of this layer's shape. For d̃ = m (PQ) Z is the subvector matrix itself and P is None.

        Returns
        -------
        self
        """
        target = self._transition("init_from_weight")
        if tuple(weight.shape) != self.weight_shape:
            raise InvalidWeightsError(
                f"layer {self.layer_name!r}: weight shape {tuple(weight.shape)} != layer shape {self.weight_shape}"
            )
        subvectors = to_subvectors(weight, self.plan.m, name=self.layer_name)  # float64 numpy, checked finite
        if self.plan.is_pq:
            z, projection = subvectors, None
        else:
            spectrum = compute_spectrum(subvectors)
            z, projection = spectrum.project(subvectors, self.plan.d_tilde), spectrum.projection(self.plan.d_tilde)
        self.Z = nn.Parameter(torch.as_tensor(z, dtype=weight.dtype, device=weight.device))
        self.P = None if projection is None else nn.Parameter(torch.as_tensor(projection).to(weight))
        self.codebook = None
        self.codes = None
        self.dkm_centroids = None
        self.state = target
        return self

    def _initial_centroids(self, z: Tensor, seed: int, config: KMeansConfig) -> Tensor:
        exponent = _unit_exponent(z)
        result = kmeans(_ldexp(z, -exponent), self.plan.k, seed=check_seed(seed), name=self.layer_name, config=config)
        return _ldexp(result.centroids.to(z.dtype), exponent)

    @torch.no_grad()
    def quantize(self: _Layer, seed: int = 0, *, config: KMeansConfig | None = None, **kmeans_options: Any) -> _Layer:
        """Replace Z by codes into a k × d̃ codebook; the layer moves to the ``"quantized"`` state.

        From ``"lowrank"`` the codebook is the k-means of Z (:func:`~lr2vq_analysis.kmeans.kmeans`);
        from ``"dkm"`` it is the current DKM centroids (the soft assignment becomes hard). The codebook and
        P are rounded to the fp16 grid the file stores (see the module docstring), then every subvector gets
        the code of its nearest rounded centroid.

        Parameters
        ----------
        seed : int, default 0
            Seed of the k-means initialisation.
        config : KMeansConfig, optional
            Options of the k-means (:func:`~lr2vq_analysis.kmeans.kmeans`); default
            :data:`~lr2vq_analysis.kmeans.QUANTIZE_KMEANS` (at most 25 Lloyd iterations). Change one
            option with ``dataclasses.replace(QUANTIZE_KMEANS, max_points_per_centroid=64)``.
        **kmeans_options
            Deprecated since 0.1.0, removed in 0.2.0: ``max_iter``, ``tol``, ``max_points_per_centroid``,
            ``dtype``, ``chunk_size`` override the same fields of ``config`` (with a ``DeprecationWarning``).

        Returns
        -------
        self

        Raises
        ------
        StateError
            If the layer is already quantized.
        InvalidParameterError
            If ``config`` is not a KMeansConfig or a keyword option is not one of the above.
        NonFiniteError
            If the centroids or P hold NaN/Inf (e.g. after a diverged training run).

        Examples
        --------
        >>> import dataclasses
        >>> from lr2vq_analysis.kmeans import QUANTIZE_KMEANS
        >>> layer = LR2VQLinear.from_dense(torch.nn.Linear(16, 8), LayerPlan(k=4, m=4, d_tilde=2))
        >>> layer.quantize(seed=0, config=dataclasses.replace(QUANTIZE_KMEANS, max_iter=5)).state
        'quantized'
        """
        # stacklevel 4: past _quantize_config, this method and torch.no_grad's wrapper, to the caller
        options = _quantize_config(config, kmeans_options, name=self.layer_name, stacklevel=4)
        self._transition("quantize")
        assert self.Z is not None
        z = self.Z.detach()
        if self.state is LayerState.DKM and self.dkm_centroids is not None:
            centroids = self.dkm_centroids.detach()
        else:
            centroids = self._initial_centroids(z, seed, options)
        codebook = round_to_fp16_grid(centroids, name=self.layer_name)
        exponent = _unit_exponent(z)  # assign at unit scale, where float32 squared distances cannot overflow
        codes, _ = assign(_ldexp(z, -exponent), _ldexp(codebook, -exponent))
        projection = None if self.P is None else round_to_fp16_grid(self.P.detach(), name=self.layer_name)
        return self.set_quantized(codes, codebook, projection)

    def _check_quantized(self, codes: Tensor, codebook: Tensor, projection: Tensor | None) -> None:
        n = n_subvectors(self.weight_shape, self.plan.m)
        k, m, d = self.plan.k, self.plan.m, self.plan.d_tilde
        label = f"layer {self.layer_name!r}: "
        if tuple(codes.shape) != (n,) or codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise InvalidParameterError(f"{label}codes must be {n} integers, got {codes.dtype} of shape {codes.shape}")
        if n and (int(codes.min()) < 0 or int(codes.max()) >= k):
            raise InvalidParameterError(f"{label}codes must lie in 0..{k - 1} (k={k})")
        if tuple(codebook.shape) != (k, d):
            raise InvalidParameterError(f"{label}codebook must have shape ({k}, {d}), got {tuple(codebook.shape)}")
        expected_projection = None if d == m else (d, m)
        got_projection = None if projection is None else tuple(projection.shape)
        if got_projection != expected_projection:
            raise InvalidParameterError(f"{label}projection must be {expected_projection}, got {got_projection}")

    @torch.no_grad()
    def set_quantized(
        self: _Layer, codes: Tensor, codebook: Tensor, projection: Tensor | None = None, *, like: Tensor | None = None
    ) -> _Layer:
        """Put the layer into the ``"quantized"`` state with the given codes, codebook and projection.

        Parameters
        ----------
        codes : torch.Tensor of shape (n,), integers in 0..k-1
        codebook : torch.Tensor of shape (k, d̃)
        projection : torch.Tensor of shape (d̃, m), or None for PQ (d̃ = m)
            All three are moved to the layer's device, and the last two to its dtype.
        like : torch.Tensor, optional
            Take dtype and device from this tensor instead of the layer's current representation.

        Returns
        -------
        self

        Raises
        ------
        InvalidParameterError
            If a shape or a code does not fit the layer's plan.
        """
        target = self._transition("set_quantized")
        self._check_quantized(codes, codebook, projection)
        current = self._like() if like is None else like
        self.Z = None
        self.dkm_centroids = None
        # Contiguous copies: k-means may hand back views, and optimizers and exporters want dense storage.
        self.codes = codes.to(device=current.device, dtype=torch.int64).contiguous()
        self.codebook = nn.Parameter(codebook.to(device=current.device, dtype=current.dtype).contiguous())
        self.P = None if projection is None else nn.Parameter(projection.to(current).contiguous())
        self.state = target
        return self

    @torch.no_grad()
    def start_dkm(self: _Layer, config: DKMConfig | None = None, *, seed: int = 0) -> _Layer:
        """Move from ``"lowrank"`` to ``"dkm"``: soft, differentiable assignment of Z to k centroids.

        The centroids start as the k-means of Z; each training forward pass then runs up to
        ``config.soft_iter`` soft k-means updates (differentiable, as in DKM) and keeps the result for the
        next step. Memory grows as n × k (the attention matrix), as in DKM.

        Parameters
        ----------
        config : DKMConfig, optional
            Temperature, soft iterations and the initial k-means' options (default: ``DKMConfig()``).
        seed : int, default 0
            Seed of the initial k-means.

        Returns
        -------
        self

        Raises
        ------
        StateError
            If the layer is not in the ``"lowrank"`` state.
        """
        target = self._transition("start_dkm")
        config = _check_dkm_config(config)
        assert self.Z is not None
        self.dkm_centroids = self._initial_centroids(self.Z.detach(), seed, config.kmeans or QUANTIZE_KMEANS)
        self.dkm_config = config
        self.state = target
        return self

    @torch.no_grad()
    def round_fp16_(self: _Layer) -> _Layer:
        """Round the codebook and P in place to the fp16 grid the file stores (see the module docstring).

        :meth:`quantize` already does this; call it again after fine-tuning the codebook, so that the
        in-memory model and the saved one give identical outputs.

        Raises
        ------
        NonFiniteError
            If the codebook or P holds NaN/Inf.
        """
        for tensor in (self.codebook, self.P):
            if tensor is not None:
                tensor.copy_(round_to_fp16_grid(tensor, name=self.layer_name))
        return self

    # ---------------------------------------------------------------------------------------------
    # the dense weight

    def _dkm_points(self) -> Tensor:
        """DKM's soft reconstruction of Z: attention-weighted centroids after a few soft k-means updates."""
        z, stored = self.Z, self.dkm_centroids
        assert z is not None and stored is not None
        centroids = stored.clone()  # the buffer is updated in place below; the graph keeps this copy
        config = self.dkm_config

        def attention(c: Tensor) -> Tensor:
            return torch.softmax(-torch.cdist(z, c) / config.tau, dim=1)

        for _ in range(config.soft_iter):
            weights = attention(centroids)
            mass = weights.sum(dim=0)[:, None]
            updated = torch.where(mass > _TINY, weights.T @ z / mass.clamp_min(_TINY), centroids)
            converged = bool((updated - centroids).abs().max() <= config.epsilon)
            centroids = updated
            if converged:
                break
        if self.training:
            with torch.no_grad():
                stored.copy_(centroids)
        return attention(centroids) @ centroids

    @property
    def weight(self) -> Tensor:
        """The dense weight this layer currently computes with (differentiable in its trainable tensors)."""
        if self.state is LayerState.QUANTIZED:
            assert self.codebook is not None and self.codes is not None
            return reconstruct_weight(self.codebook, self.P, self.weight_shape, self.codes)
        if self.state is LayerState.DKM:
            return reconstruct_weight(self._dkm_points(), self.P, self.weight_shape)
        assert self.Z is not None
        return reconstruct_weight(self.Z, self.P, self.weight_shape)

    def hard_codes(self) -> Tensor:
        """Code of every subvector: the stored codes (quantized), or the nearest DKM centroid now (DKM)."""
        self._require_state("read codes", (LayerState.QUANTIZED, LayerState.DKM))
        if self.state is LayerState.QUANTIZED:
            assert self.codes is not None
            return self.codes
        assert self.Z is not None and self.dkm_centroids is not None
        exponent = _unit_exponent(self.Z)
        return assign(_ldexp(self.Z.detach(), -exponent), _ldexp(self.dkm_centroids, -exponent))[0]

    def compressed_bits(self) -> dict[str, float]:
        """Bits of the compressed weight (codes, codebook, projection) by the package's accounting; bias excluded."""
        return self.plan.compressed_bits(self.weight_shape)

    def forward(self, input: Tensor) -> Tensor:
        return self._forward_dense(input, self.weight)

    def _forward_dense(self, input: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def _dense_repr(self) -> str:
        raise NotImplementedError

    def extra_repr(self) -> str:
        bits = sum(self.compressed_bits().values())
        per_weight = bits / math.prod(self.weight_shape)
        plan = self.plan
        return (
            f"{self._dense_repr()}, k={plan.k}, m={plan.m}, d_tilde={plan.d_tilde}, state={self.state}, "
            f"bits={bits:.0f} ({per_weight:.3f} bits/weight)"
        )


#: The keyword shortcuts quantize() used to pass on to kmeans(): fields of KMeansConfig.
_KMEANS_SHORTCUTS = ("max_iter", "tol", "max_points_per_centroid", "dtype", "chunk_size")


def _quantize_config(
    config: object, shortcuts: Mapping[str, Any], *, name: str | None = None, stacklevel: int = 3
) -> KMeansConfig:
    """quantize's k-means options: ``config`` (default QUANTIZE_KMEANS) with the deprecated shortcuts folded in.

    ``stacklevel`` 3 points the warning at the caller of the public method that calls this.
    """
    if config is None:
        config = QUANTIZE_KMEANS  # capped iterations: see docs/kmeans.md
    if not isinstance(config, KMeansConfig):
        raise InvalidParameterError(
            f"{layer_label(name)}config={config!r} is invalid; pass a KMeansConfig(max_iter=..., ...) or None"
        )
    if not shortcuts:
        return config
    unknown = sorted(set(shortcuts) - set(_KMEANS_SHORTCUTS))
    if unknown:
        raise InvalidParameterError(
            f"{layer_label(name)}quantize() got unknown option(s) {unknown}; pass config=KMeansConfig(...) "
            f"(the deprecated keyword options are {list(_KMEANS_SHORTCUTS)})"
        )
    example = ", ".join(f"{key}=..." for key in shortcuts)
    warnings.warn(
        f"quantize({example}) is deprecated since 0.1.0 and will be removed in 0.2.0; pass "
        f"config=dataclasses.replace(QUANTIZE_KMEANS, {example}) or config=KMeansConfig(...) instead",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    return dataclasses.replace(config, **{key: value for key, value in shortcuts.items() if value is not None})


def _check_dkm_config(config: object) -> DKMConfig:
    if config is None:
        return DKMConfig()
    if not isinstance(config, DKMConfig):
        raise InvalidParameterError(f"dkm={config!r} is invalid; expected a DKMConfig(tau=..., soft_iter=..., ...)")
    return config


class LR2VQLinear(_LR2VQLayer):
    """Drop-in replacement of :class:`torch.nn.Linear` whose weight is LR²VQ-compressed.

    Build it from a pretrained layer with :meth:`from_dense` (or let :func:`compress` do it); the
    constructor mirrors ``nn.Linear`` and starts from torch's default random initialisation.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool, default True
    plan : LayerPlan
        k, m and d̃ of this layer; m must divide ``in_features``.
    name : str, optional
        Layer name, used in messages.
    device, dtype : optional
        As for ``nn.Linear``.

    Examples
    --------
    >>> torch.manual_seed(0) and None
    >>> dense = torch.nn.Linear(8, 6)
    >>> layer = LR2VQLinear.from_dense(dense, LayerPlan(k=4, m=4, d_tilde=2))
    >>> layer
    LR2VQLinear(in_features=8, out_features=6, bias=True, k=4, m=4, d_tilde=2, state=lowrank, bits=...)
    >>> layer(torch.randn(3, 8)).shape
    torch.Size([3, 6])
    """

    _dense_type = nn.Linear
    _dense_attributes = ("in_features", "out_features")
    in_features: int
    out_features: int

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        plan: LayerPlan,
        name: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dense = nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
        self._setup(dense, plan, name)
        self.init_from_weight(dense.weight.detach())

    def _forward_dense(self, input: Tensor, weight: Tensor) -> Tensor:
        return F.linear(input, weight, self.bias)

    def _dense_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


_ConvArg = int | tuple[int, ...]


class _LR2VQConv(_LR2VQLayer):
    """Convolution plumbing shared by the 1-D and 2-D layers (mirrors torch's ``_ConvNd``)."""

    _dense_type: ClassVar[type[nn.Conv1d] | type[nn.Conv2d]]
    _conv: ClassVar[Callable[..., Tensor]]
    _dense_attributes = (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
        "_reversed_padding_repeated_twice",
    )
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: str | tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    _reversed_padding_repeated_twice: list[int]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _ConvArg,
        stride: _ConvArg = 1,
        padding: str | _ConvArg = 0,
        dilation: _ConvArg = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        plan: LayerPlan,
        name: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory: Callable[..., nn.Conv1d | nn.Conv2d] = self._dense_type  # torch types its arguments per dimension
        dense = factory(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self._setup(dense, plan, name)
        self.init_from_weight(dense.weight.detach())

    def _forward_dense(self, input: Tensor, weight: Tensor) -> Tensor:
        conv = type(self)._conv
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv(input, weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return conv(input, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _dense_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}"
        )
        return text if self.padding_mode == "zeros" else f"{text}, padding_mode={self.padding_mode}"


class LR2VQConv1d(_LR2VQConv):
    """Drop-in replacement of :class:`torch.nn.Conv1d` (``groups=1``) whose weight is LR²VQ-compressed.

    Same arguments as ``nn.Conv1d`` plus ``plan`` (and ``name``); build it from a pretrained layer with
    :meth:`from_dense`. Subvectors are runs of m along C_in·kernel_size of each filter.

    Examples
    --------
    >>> torch.manual_seed(0) and None
    >>> layer = LR2VQConv1d.from_dense(torch.nn.Conv1d(4, 8, 3, padding=1), LayerPlan(k=4, m=3))
    >>> layer(torch.randn(2, 4, 10)).shape
    torch.Size([2, 8, 10])
    """

    _dense_type = nn.Conv1d
    _conv = staticmethod(F.conv1d)


class LR2VQConv2d(_LR2VQConv):
    """Drop-in replacement of :class:`torch.nn.Conv2d` (``groups=1``) whose weight is LR²VQ-compressed.

    Same arguments as ``nn.Conv2d`` plus ``plan`` (and ``name``); build it from a pretrained layer with
    :meth:`from_dense`. For a 3×3 kernel, m = 9 makes one subvector per spatial kernel.

    Examples
    --------
    >>> torch.manual_seed(0) and None
    >>> dense = torch.nn.Conv2d(4, 8, 3, padding=1)
    >>> layer = LR2VQConv2d.from_dense(dense, LayerPlan(k=8, m=9, d_tilde=3))
    >>> layer.state, tuple(layer.Z.shape), tuple(layer.P.shape)
    ('lowrank', (32, 3), (3, 9))
    >>> layer = layer.quantize(seed=0)
    >>> layer
    LR2VQConv2d(4, 8, kernel_size=(3, 3), ..., k=8, m=9, d_tilde=3, state=quantized, bits=...)
    >>> tuple(layer.codes.shape), tuple(layer.codebook.shape)
    ((32,), (8, 3))
    >>> layer(torch.randn(1, 4, 5, 5)).shape
    torch.Size([1, 8, 5, 5])
    """

    _dense_type = nn.Conv2d
    _conv = staticmethod(F.conv2d)


_COMPRESSED_TYPES: tuple[tuple[type[nn.Module], type[_LR2VQLayer]], ...] = (
    (nn.Conv1d, LR2VQConv1d),
    (nn.Conv2d, LR2VQConv2d),
    (nn.Linear, LR2VQLinear),
)


def _compressed_type(module: nn.Module) -> type[_LR2VQLayer] | None:
    for dense_type, compressed_type in _COMPRESSED_TYPES:
        if isinstance(module, dense_type):
            return compressed_type
    return None


def _weight_key(module_name: str) -> str:
    return f"{module_name}.weight" if module_name else "weight"


def compressible_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Weight key → module of every layer :func:`compress` accepts (Linear, Conv1d, Conv2d with groups=1).

    Examples
    --------
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3, groups=8))
    >>> list(compressible_layers(model))
    ['0.weight']
    """
    return {
        _weight_key(name): module
        for name, module in model.named_modules()
        if _compressed_type(module) is not None and getattr(module, "groups", 1) == 1
    }


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _check_plan(model: nn.Module, plan: object) -> dict[str, LayerPlan]:
    """Validate a plan against a model; return it as {weight key: LayerPlan} in the model's layer order."""
    if not isinstance(plan, Mapping):
        raise InvalidParameterError(f"plan must be a mapping {{weight key: LayerPlan}}, got {type(plan).__name__}")
    available = compressible_layers(model)
    if not available:
        raise InvalidWeightsError(
            f"{type(model).__name__} has no compressible layer (Linear, Conv1d or Conv2d with groups=1)"
        )
    if not plan:
        raise InvalidParameterError(
            f"the plan is empty; name some of the compressible layers: {_listing(list(available))}"
        )
    grouped = {
        _weight_key(name): module
        for name, module in model.named_modules()
        if _compressed_type(module) is not None and getattr(module, "groups", 1) != 1
    }
    checked: dict[str, LayerPlan] = {}
    for key, entry in plan.items():
        if key in grouped:
            _check_groups(key, grouped[key])
        if key not in available:
            hint = f" (did you mean {key + '.weight'!r}?)" if f"{key}.weight" in available else ""
            raise InvalidParameterError(
                f"the plan names {key!r}, which is not a compressible layer of {type(model).__name__}{hint}; "
                f"plan keys are state_dict weight keys of Linear/Conv1d/Conv2d layers: {_listing(list(available))}"
            )
        if isinstance(entry, Mapping):
            entry = LayerPlan.from_dict(dict(entry))
        if not isinstance(entry, LayerPlan):
            raise InvalidParameterError(
                f"layer {key!r}: plan entry {entry!r} is invalid; expected a LayerPlan(k, m, d_tilde)"
            )
        _check_layer(key, available[key], entry)
        checked[key] = entry
    return {key: checked[key] for key in available if key in checked}


class CompressedModel(nn.Module):
    """A model whose planned layers are LR²VQ layers; calling it calls the wrapped model.

    Build it with :func:`compress`. ``module`` is a copy of the original model with the planned layers
    replaced, so its other attributes and its architecture are the original ones.

    Attributes
    ----------
    module : torch.nn.Module
        The wrapped model.
    """

    def __init__(self, module: nn.Module, plan: Mapping[str, LayerPlan]) -> None:
        super().__init__()
        self.module = module
        self._plan = dict(plan)

    @property
    def plan(self) -> dict[str, LayerPlan]:
        """The plan this model was compressed with: state_dict weight key → LayerPlan."""
        return dict(self._plan)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def compressed_layers(self) -> dict[str, _LR2VQLayer]:
        """Plan key → compressed layer, in model order."""
        layers = {}
        for key in self._plan:
            layer = self.module.get_submodule(key.rpartition(".")[0])
            if not isinstance(layer, _LR2VQLayer):
                raise StateError(f"layer {key!r} of the plan is a {type(layer).__name__}, no longer a compressed layer")
            layers[key] = layer
        return layers

    def _layers(self) -> Iterator[_LR2VQLayer]:
        return iter(self.compressed_layers().values())

    @property
    def state(self) -> str:
        """The :class:`LayerState` shared by every compressed layer, or ``"mixed"``."""
        states = {layer.state for layer in self._layers()}
        return states.pop() if len(states) == 1 else "mixed"

    def quantize(self, seed: int = 0, *, config: KMeansConfig | None = None, **kmeans_options: Any) -> CompressedModel:
        """Quantize every compressed layer (see :meth:`LR2VQLinear.quantize`); return self.

        Every layer's k-means uses the same ``seed`` and ``config`` (default
        :data:`~lr2vq_analysis.kmeans.QUANTIZE_KMEANS`; e.g.
        ``dataclasses.replace(QUANTIZE_KMEANS, max_points_per_centroid=64)`` to subsample). The keyword
        options ``max_iter``, ``tol``, ``max_points_per_centroid``, ``dtype`` and ``chunk_size`` are
        deprecated since 0.1.0 (removed in 0.2.0): they still override ``config``, with a ``DeprecationWarning``.
        """
        check_seed(seed)
        options = _quantize_config(config, kmeans_options)
        for layer in self._layers():
            layer.quantize(seed, config=options)
        return self

    def start_dkm(self, config: DKMConfig | None = None, *, seed: int = 0) -> CompressedModel:
        """Move every compressed layer from ``"lowrank"`` to ``"dkm"`` (see :meth:`LR2VQLinear.start_dkm`)."""
        check_seed(seed)
        config = _check_dkm_config(config)
        for layer in self._layers():
            layer.start_dkm(config, seed=seed)
        return self

    def round_fp16_(self) -> CompressedModel:
        """Round every codebook and projection to the fp16 grid the file stores, in place."""
        for layer in self._layers():
            layer.round_fp16_()
        return self

    def extra_repr(self) -> str:
        return f"{len(self._plan)} compressed layer(s), state={self.state}"


def _replace_submodule(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if not name:
        return new
    parent_name, _, child_name = name.rpartition(".")
    setattr(root.get_submodule(parent_name), child_name, new)
    return root


def _build(
    model: nn.Module, plan: Mapping[str, LayerPlan], make: Callable[[type[_LR2VQLayer], _DenseLayer, str], nn.Module]
) -> CompressedModel:
    """Replace each planned layer of ``model`` (modified in place) by ``make(type, dense layer, key)``."""
    module = model
    for key in plan:
        module_name = key.rpartition(".")[0]
        dense = module.get_submodule(module_name)
        compressed_type = _compressed_type(dense)
        assert compressed_type is not None and isinstance(dense, (nn.Linear, nn.Conv1d, nn.Conv2d))  # _check_plan
        module = _replace_submodule(module, module_name, make(compressed_type, dense, key))
    cmodel = CompressedModel(module, plan)
    cmodel.train(model.training)
    return cmodel


def compress(
    model: nn.Module,
    plan: Mapping[str, LayerPlan] | None = None,
    *,
    specs: Any = None,
    seed: int = 0,
    method: str = "lr2vq",
    dkm: DKMConfig | None = None,
) -> CompressedModel:
    """Copy a model and replace the planned layers by LR²VQ layers initialised from their weights.

    Parameters
    ----------
    model : torch.nn.Module
        The pretrained model; it is deep-copied and left untouched.
    plan : mapping of str to LayerPlan
        State_dict weight key (``"layer1.0.conv1.weight"``) → ``LayerPlan(k, m, d_tilde)``; d̃ = m is PQ.
        ``Report.plan()`` and :func:`~lr2vq_analysis.planner.plan_for_size` (a ``Plan``) produce one.
        Plain dicts ``{"k", "m", "d_tilde"}`` are accepted too.
    specs : CompressionSpecs, preset name, dict or JSON path, optional
        Instead of ``plan``: k and m per layer kind / name (:mod:`~lr2vq_analysis.specs`); every
        compressible layer the specs do not skip is compressed at the specs' d̃, else d̃ = m (PQ). For
        predicted d̃ use ``analyze(model, specs=specs).plan()``.
    seed : int, default 0
        Seed of the k-means that initialises DKM's centroids (the low-rank initialisation is deterministic).
    method : {"lr2vq", "dkm"}, default "lr2vq"
        ``"lr2vq"``: layers start in the ``"lowrank"`` state (train Z and P, then :meth:`CompressedModel.quantize`).
        ``"dkm"``: layers start in the ``"dkm"`` state, with centroids from k-means on Z (on the subvectors
        themselves when d̃ = m: vanilla DKM).
    dkm : DKMConfig, optional
        DKM's options for ``method="dkm"`` (temperature, soft iterations, the initial k-means' options);
        default ``DKMConfig()``.

    Returns
    -------
    CompressedModel

    Raises
    ------
    InvalidParameterError
        If the plan names a layer the model lacks (the message lists the compressible ones), a grouped or
        depthwise convolution, an m that does not divide the layer's row length, a k not below its number
        of subvectors, if ``method`` is unknown, or ``dkm`` is given without ``method="dkm"``.
    InvalidWeightsError
        If the model has no compressible layer, or a planned weight holds NaN/Inf or only zeros.

    Examples
    --------
    >>> torch.manual_seed(0) and None
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> cmodel = compress(model, {"0.weight": LayerPlan(k=16, m=4, d_tilde=2)})
    >>> list(cmodel.compressed_layers()), cmodel.state
    (['0.weight'], 'lowrank')
    >>> cmodel.quantize(seed=0).state == "quantized"
    True
    >>> cmodel(torch.randn(5, 16)).shape
    torch.Size([5, 4])
    >>> compress(model, {"0.weight": LayerPlan(k=16, m=4)}, method="dkm", dkm=DKMConfig(tau=1e-3)).state
    'dkm'
    """
    check_seed(seed)
    if (plan is None) == (specs is None):
        raise InvalidParameterError("give exactly one of plan= (a mapping or a Plan) and specs=")
    if specs is not None:
        from .specs import as_specs

        plan = as_specs(specs).plan(model)
    if method not in METHODS:
        raise InvalidParameterError(f"method={method!r} is invalid; allowed methods are {METHODS}")
    if method != "dkm" and dkm is not None:
        raise InvalidParameterError(f"dkm={dkm!r} is only accepted with method='dkm'")
    config = _check_dkm_config(dkm)
    checked = _check_plan(model, plan)
    cmodel = _build(
        copy.deepcopy(model), checked, lambda kind, dense, key: kind.from_dense(dense, checked[key], name=key)
    )
    if method == "dkm":
        cmodel.start_dkm(config, seed=seed)
    return cmodel
