"""Compressed layers (LR²VQ, PQ, scalar k-means, DKM) and :func:`compress`, which puts them into a model.

An LR²VQ layer stores its weight W, cut into n subvectors of size m (PQF's layout, see
:mod:`~lr2vq_analysis.subvectors`), as low-rank coordinates Z (n × d̃) and a projection P (d̃ × m):
W = Z·P reshaped to the weight's shape. It moves through three states:

``"lowrank"``
    Z and P are trainable parameters, initialised from the pretrained weight by the spectrum of its
    subvectors (Z = X·V_d̃, P = V_d̃ᵀ: the best rank-d̃ approximation). The network can absorb the
    truncation error by training before anything is quantized.
``"quantized"``
    :meth:`~_LR2VQLayer.quantize` clusters Z with the package's k-means engine: Z is replaced by integer
    codes (a buffer, fixed from then on) into a trainable codebook (k × d̃); P stays trainable.
    W = codebook[codes]·P.
``"dkm"``
    Differentiable k-means (Cho et al., ICLR 2022; coremltools' DKMPalettizer): Z stays trainable and
    every forward pass replaces each row of Z by a soft mixture of centroids,
    softmax(−‖z − c‖ / τ)·C, after a few differentiable soft k-means updates of the centroids C. The
    assignment therefore follows the weights as they move; :meth:`~_LR2VQLayer.quantize` makes it hard.

The special case d̃ = m is plain product quantization: no P, and Z is the subvector matrix itself, so the
same code runs the PQ baselines, and m = 1 gives scalar k-means. Only Linear, Conv1d and Conv2d with
``groups=1`` are compressible: a grouped or depthwise convolution's rows are short and its subvectors
would mix unrelated filters, so such layers are left uncompressed (naming one in a plan is an error).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validation import InvalidParameterError, InvalidWeightsError, check_k, check_m, check_seed
from .kmeans import QUANTIZE_KMEANS, assign, kmeans
from .plan import LayerPlan
from .spectrum import compute_spectrum
from .subvectors import n_subvectors, row_length, to_subvectors

__all__ = [
    "STATES",
    "METHODS",
    "DKM_DEFAULTS",
    "LR2VQLinear",
    "LR2VQConv1d",
    "LR2VQConv2d",
    "CompressedModel",
    "compress",
    "compressible_layers",
    "reconstruct_weight",
]

#: The states a compressed layer can be in.
STATES = ("lowrank", "quantized", "dkm")
#: The methods :func:`compress` accepts.
METHODS = ("lr2vq", "dkm")
#: coremltools' DKMPalettizer defaults: temperature τ (in units of weight distance), soft k-means
#: updates per forward pass, and the centroid change below which those updates stop.
DKM_DEFAULTS: dict[str, float] = {"tau": 1e-4, "max_iter": 3, "epsilon": 1e-4}

_TINY = 1e-12  # below this a soft cluster is empty; its centroid is kept instead of divided by ~0


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


def _round_fp16(tensor: Tensor) -> Tensor:
    """Round to the nearest fp16-representable value, keeping the dtype (what the file stores)."""
    return tensor.to(torch.float16).to(tensor.dtype)


def _check_groups(name: str, module: nn.Module) -> None:
    """Grouped and depthwise convolutions are not compressible: explain why and what happens to them."""
    groups = getattr(module, "groups", 1)
    if groups != 1:
        raise InvalidParameterError(
            f"{name!r} is a grouped/depthwise convolution (groups={groups}); only groups=1 can be compressed, "
            "because its short rows would put unrelated filters into one subvector. Leave it out of the plan: "
            "it stays uncompressed"
        )


def _check_layer(name: str, module: nn.Module, plan: LayerPlan) -> None:
    """Check that ``plan`` fits ``module``: groups = 1, m divides the row length, k < number of subvectors."""
    _check_groups(name, module)
    shape = tuple(module.weight.shape)  # type: ignore[arg-type]  # a Linear/Conv weight
    check_m(plan.m, row_length(shape), name=name)
    check_k(plan.k, n_subvectors(shape, plan.m), name=name)


class _LR2VQLayer(nn.Module):
    """State, initialisation and quantization shared by the three compressed layer types."""

    Z: nn.Parameter | None
    P: nn.Parameter | None
    codebook: nn.Parameter | None
    codes: Tensor | None
    dkm_centroids: Tensor | None
    bias: nn.Parameter | None

    def _setup(self, dense: nn.Linear | nn.Conv1d | nn.Conv2d, plan: LayerPlan, name: str | None) -> None:
        if not isinstance(plan, LayerPlan):
            raise InvalidParameterError(f"plan={plan!r} is invalid; expected a LayerPlan(k, m, d_tilde)")
        _check_layer(name or type(self).__name__, dense, plan)
        self.plan = plan
        self.layer_name = name
        self.weight_shape: tuple[int, ...] = tuple(dense.weight.shape)
        self.state = "lowrank"
        self.dkm_options = dict(DKM_DEFAULTS)
        self.register_parameter("Z", None)
        self.register_parameter("P", None)
        self.register_parameter("codebook", None)
        self.register_buffer("codes", None)
        self.register_buffer("dkm_centroids", None)
        dense_bias = getattr(dense, "bias", None)
        self.bias = None if dense_bias is None else nn.Parameter(dense_bias.detach().clone())
        self.init_from_weight(dense.weight)

    # ---------------------------------------------------------------------------------------------
    # construction and state changes

    @torch.no_grad()
    def init_from_weight(self, weight: Tensor) -> _LR2VQLayer:
        """Set Z and P from a dense weight by its spectrum (best rank-d̃ fit) and return to the low-rank state.

        Parameters
        ----------
        weight : torch.Tensor
            A weight of this layer's shape. For d̃ = m (PQ) Z is the subvector matrix itself and P is None.

        Returns
        -------
        self
        """
        if tuple(weight.shape) != self.weight_shape:
            raise InvalidWeightsError(
                f"layer {self.layer_name!r}: weight shape {tuple(weight.shape)} != layer shape {self.weight_shape}"
            )
        like = {"dtype": weight.dtype, "device": weight.device}
        subvectors = to_subvectors(weight, self.plan.m, name=self.layer_name)  # float64 numpy, checked finite
        if self.plan.is_pq:
            z, projection = subvectors, None
        else:
            spectrum = compute_spectrum(subvectors)
            d_tilde = int(self.plan.d_tilde)  # type: ignore[arg-type]  # an int after LayerPlan.__post_init__
            z, projection = spectrum.project(subvectors, d_tilde), spectrum.projection(d_tilde)
        self.Z = nn.Parameter(torch.as_tensor(z, **like))  # type: ignore[arg-type]
        self.P = None if projection is None else nn.Parameter(torch.as_tensor(projection, **like))  # type: ignore[arg-type]
        self.codebook = None
        self.codes = None
        self.dkm_centroids = None
        self.state = "lowrank"
        return self

    def _require_state(self, action: str, *allowed: str) -> None:
        if self.state not in allowed:
            raise InvalidParameterError(
                f"layer {self.layer_name!r}: cannot {action} in state {self.state!r}; allowed states are {allowed}"
            )

    def _cluster(self, seed: int, kmeans_options: Mapping[str, Any]) -> Tensor:
        z = self.Z.detach()  # type: ignore[union-attr]
        options = dict(kmeans_options)
        config = options.pop("config", QUANTIZE_KMEANS)  # capped iterations: see docs/kmeans.md
        return kmeans(
            z, self.plan.k, seed=check_seed(seed), name=self.layer_name, config=config, **options
        ).centroids.to(z.dtype)

    @torch.no_grad()
    def quantize(self, seed: int = 0, **kmeans_options: Any) -> _LR2VQLayer:
        """Replace Z by codes into a k × d̃ codebook; the layer moves to the ``"quantized"`` state.

        From ``"lowrank"`` the codebook is the k-means of Z (:func:`~lr2vq_analysis.kmeans.kmeans`);
        from ``"dkm"`` it is the current DKM centroids (the soft assignment becomes hard). The codebook and
        P are rounded to fp16-representable values (what :func:`~lr2vq_analysis.export.save_compressed`
        stores), then every subvector gets the code of its nearest rounded centroid.

        Parameters
        ----------
        seed : int, default 0
            Seed of the k-means initialisation.
        **kmeans_options
            Passed to :func:`~lr2vq_analysis.kmeans.kmeans` (``config``, default
            :data:`~lr2vq_analysis.kmeans.QUANTIZE_KMEANS`; or ``max_iter``, ``tol``, ``max_points_per_centroid``).

        Returns
        -------
        self

        Raises
        ------
        InvalidParameterError
            If the layer is already quantized.
        """
        self._require_state("quantize", "lowrank", "dkm")
        z = self.Z.detach()  # type: ignore[union-attr]
        if self.state == "lowrank":
            centroids = self._cluster(seed, kmeans_options)
        else:
            centroids = self.dkm_centroids.detach()  # type: ignore[union-attr]
        codebook = _round_fp16(centroids)
        codes, _ = assign(z, codebook)
        projection = None if self.P is None else _round_fp16(self.P.detach())
        self.set_quantized(codes, codebook, projection)
        return self

    @torch.no_grad()
    def set_quantized(self, codes: Tensor, codebook: Tensor, projection: Tensor | None = None) -> _LR2VQLayer:
        """Put the layer into the ``"quantized"`` state with the given codes, codebook and projection.

        Parameters
        ----------
        codes : torch.Tensor of shape (n,), integers in 0..k-1
        codebook : torch.Tensor of shape (k, d̃)
        projection : torch.Tensor of shape (d̃, m), or None for PQ (d̃ = m)
            All three are moved to the layer's device, and the last two to its dtype.

        Returns
        -------
        self

        Raises
        ------
        InvalidParameterError
            If a shape or a code does not fit the layer's plan.
        """
        n = n_subvectors(self.weight_shape, self.plan.m)
        k, m, d = self.plan.k, self.plan.m, self.plan.d_tilde
        label = f"layer {self.layer_name!r}: "
        if tuple(codes.shape) != (n,) or codes.dtype.is_floating_point:
            raise InvalidParameterError(f"{label}codes must be {n} integers, got {codes.dtype} of shape {codes.shape}")
        if n and (int(codes.min()) < 0 or int(codes.max()) >= k):
            raise InvalidParameterError(f"{label}codes must lie in 0..{k - 1} (k={k})")
        if tuple(codebook.shape) != (k, d):
            raise InvalidParameterError(f"{label}codebook must have shape ({k}, {d}), got {tuple(codebook.shape)}")
        expected_projection = None if d == m else (d, m)
        got_projection = None if projection is None else tuple(projection.shape)
        if got_projection != expected_projection:
            raise InvalidParameterError(f"{label}projection must be {expected_projection}, got {got_projection}")
        current = next(t for t in (self.Z, self.codebook) if t is not None)  # the layer's dtype and device
        self.Z = None
        self.dkm_centroids = None
        # Contiguous copies: k-means may hand back views, and optimizers and exporters want dense storage.
        self.codes = codes.to(device=current.device, dtype=torch.int64).contiguous()
        self.codebook = nn.Parameter(codebook.to(device=current.device, dtype=current.dtype).contiguous())
        self.P = (
            None
            if projection is None
            else nn.Parameter(projection.to(device=current.device, dtype=current.dtype).contiguous())
        )
        self.state = "quantized"
        return self

    @torch.no_grad()
    def start_dkm(
        self,
        *,
        seed: int = 0,
        tau: float = DKM_DEFAULTS["tau"],
        max_iter: int = int(DKM_DEFAULTS["max_iter"]),
        epsilon: float = DKM_DEFAULTS["epsilon"],
        **kmeans_options: Any,
    ) -> _LR2VQLayer:
        """Move from ``"lowrank"`` to ``"dkm"``: soft, differentiable assignment of Z to k centroids.

        The centroids start as the k-means of Z; each training forward pass then runs up to ``max_iter``
        soft k-means updates (differentiable, as in DKM) and keeps the result for the next step.
        Memory grows as n × k (the attention matrix), as in DKM.

        Parameters
        ----------
        seed : int, default 0
            Seed of the initial k-means.
        tau : float, default 1e-4
            Softmax temperature, in units of Euclidean distance between subvectors (coremltools' default).
        max_iter : int, default 3
            Soft k-means updates per forward pass.
        epsilon : float, default 1e-4
            The updates stop once no centroid coordinate moves by more than this.
        **kmeans_options
            Passed to :func:`~lr2vq_analysis.kmeans.kmeans` for the initial centroids.

        Returns
        -------
        self
        """
        self._require_state("start DKM", "lowrank")
        if not (tau > 0 and math.isfinite(tau)):
            raise InvalidParameterError(f"layer {self.layer_name!r}: tau={tau!r} is invalid; tau must be > 0")
        if int(max_iter) < 1 or epsilon < 0:
            raise InvalidParameterError(
                f"layer {self.layer_name!r}: max_iter={max_iter!r}, epsilon={epsilon!r} are invalid; "
                "need max_iter >= 1 and epsilon >= 0"
            )
        self.dkm_centroids = self._cluster(seed, kmeans_options)
        self.dkm_options = {"tau": float(tau), "max_iter": int(max_iter), "epsilon": float(epsilon)}
        self.state = "dkm"
        return self

    @torch.no_grad()
    def round_fp16_(self) -> _LR2VQLayer:
        """Round the codebook and P in place to fp16-representable values (as the file stores them).

        :meth:`quantize` already does this; call it again after fine-tuning the codebook, so that the
        in-memory model and the saved one give identical outputs.
        """
        for tensor in (self.codebook, self.P):
            if tensor is not None:
                tensor.copy_(_round_fp16(tensor))
        return self

    # ---------------------------------------------------------------------------------------------
    # the dense weight

    def _dkm_points(self) -> Tensor:
        """DKM's soft reconstruction of Z: attention-weighted centroids after a few soft k-means updates."""
        z = self.Z
        assert z is not None and self.dkm_centroids is not None
        centroids = self.dkm_centroids.clone()  # the buffer is updated in place below; the graph keeps this copy
        tau, epsilon = self.dkm_options["tau"], self.dkm_options["epsilon"]

        def attention(c: Tensor) -> Tensor:
            return torch.softmax(-torch.cdist(z, c) / tau, dim=1)

        for _ in range(int(self.dkm_options["max_iter"])):
            weights = attention(centroids)
            mass = weights.sum(dim=0)[:, None]
            updated = torch.where(mass > _TINY, weights.T @ z / mass.clamp_min(_TINY), centroids)
            converged = bool((updated - centroids).abs().max() <= epsilon)
            centroids = updated
            if converged:
                break
        if self.training:
            with torch.no_grad():
                self.dkm_centroids.copy_(centroids)
        return attention(centroids) @ centroids

    @property
    def weight(self) -> Tensor:
        """The dense weight this layer currently computes with (differentiable in its trainable tensors)."""
        if self.state == "lowrank":
            return reconstruct_weight(self.Z, self.P, self.weight_shape)  # type: ignore[arg-type]
        if self.state == "quantized":
            return reconstruct_weight(self.codebook, self.P, self.weight_shape, self.codes)  # type: ignore[arg-type]
        return reconstruct_weight(self._dkm_points(), self.P, self.weight_shape)

    def hard_codes(self) -> Tensor:
        """Code of every subvector: the stored codes (quantized), or the nearest DKM centroid now (DKM)."""
        if self.state == "quantized":
            return self.codes  # type: ignore[return-value]
        self._require_state("read codes", "quantized", "dkm")
        return assign(self.Z.detach(), self.dkm_centroids)[0]  # type: ignore[union-attr, arg-type]

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

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        plan: LayerPlan,
        name: str | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._setup(nn.Linear(in_features, out_features, bias, device=device, dtype=dtype), plan, name)

    @classmethod
    def from_dense(cls, layer: nn.Linear, plan: LayerPlan, *, name: str | None = None) -> LR2VQLinear:
        """Compressed copy of a pretrained ``nn.Linear`` in the low-rank state (Z and P from its spectrum)."""
        new = cls(
            layer.in_features,
            layer.out_features,
            layer.bias is not None,
            plan=plan,
            name=name,
            device=layer.weight.device,
            dtype=layer.weight.dtype,
        )
        return _copy_dense(new, layer)

    def _forward_dense(self, input: Tensor, weight: Tensor) -> Tensor:
        return F.linear(input, weight, self.bias)

    def _dense_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class _LR2VQConv(_LR2VQLayer):
    """Convolution plumbing shared by the 1-D and 2-D layers (mirrors torch's ``_ConvNd``)."""

    _dense_type: type[nn.Conv1d] | type[nn.Conv2d]
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: Any
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    _reversed_padding_repeated_twice: list[int]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        plan: LayerPlan,
        name: str | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        dense = self._dense_type(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,  # type: ignore[arg-type]  # torch checks the value
            device=device,
            dtype=dtype,
        )
        for attribute in (
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "groups",
            "padding_mode",
            "_reversed_padding_repeated_twice",
        ):
            setattr(self, attribute, getattr(dense, attribute))
        self._setup(dense, plan, name)

    @classmethod
    def from_dense(cls, layer: nn.Conv1d | nn.Conv2d, plan: LayerPlan, *, name: str | None = None) -> Any:
        """Compressed copy of a pretrained convolution in the low-rank state (Z and P from its spectrum)."""
        new = cls(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
            plan=plan,
            name=name,
            device=layer.weight.device,
            dtype=layer.weight.dtype,
        )
        return _copy_dense(new, layer)

    def _forward_dense(self, input: Tensor, weight: Tensor) -> Tensor:
        conv: Any = F.conv1d if self._dense_type is nn.Conv1d else F.conv2d
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
    >>> layer.state, tuple(layer.codes.shape), tuple(layer.codebook.shape)
    ('quantized', (32,), (8, 3))
    >>> layer(torch.randn(1, 4, 5, 5)).shape
    torch.Size([1, 8, 5, 5])
    """

    _dense_type = nn.Conv2d


def _copy_dense(new: Any, layer: nn.Linear | nn.Conv1d | nn.Conv2d) -> Any:
    new.init_from_weight(layer.weight.detach())
    if layer.bias is not None:
        with torch.no_grad():
            new.bias.copy_(layer.bias)
    new.train(layer.training)
    return new


_COMPRESSED_TYPES: tuple[tuple[type[nn.Module], Any], ...] = (
    (nn.Conv1d, LR2VQConv1d),
    (nn.Conv2d, LR2VQConv2d),
    (nn.Linear, LR2VQLinear),
)


def _compressed_type(module: nn.Module) -> Any:
    for dense_type, compressed_type in _COMPRESSED_TYPES:
        if isinstance(module, dense_type) and not isinstance(module, _LR2VQLayer):
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


def _check_plan(model: nn.Module, plan: Any) -> dict[str, LayerPlan]:
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
        return {key: self.module.get_submodule(key.rpartition(".")[0]) for key in self._plan}  # type: ignore[misc]

    def _layers(self) -> Iterator[_LR2VQLayer]:
        return iter(self.compressed_layers().values())

    @property
    def state(self) -> str:
        """The state shared by every compressed layer, or ``"mixed"``."""
        states = {layer.state for layer in self._layers()}
        return states.pop() if len(states) == 1 else "mixed"

    def quantize(self, seed: int = 0, **kmeans_options: Any) -> CompressedModel:
        """Quantize every compressed layer (see :meth:`LR2VQLinear.quantize`); return self.

        Every layer's k-means uses the same ``seed``; ``kmeans_options`` go to
        :func:`~lr2vq_analysis.kmeans.kmeans` (e.g. ``max_points_per_centroid`` to subsample).
        """
        check_seed(seed)
        for layer in self._layers():
            layer.quantize(seed, **kmeans_options)
        return self

    def start_dkm(self, *, seed: int = 0, **options: Any) -> CompressedModel:
        """Move every compressed layer from ``"lowrank"`` to ``"dkm"`` (see :meth:`LR2VQLinear.start_dkm`)."""
        check_seed(seed)
        for layer in self._layers():
            layer.start_dkm(seed=seed, **options)
        return self

    def round_fp16_(self) -> CompressedModel:
        """Round every codebook and projection to fp16-representable values, in place (what the file stores)."""
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


def compress(
    model: nn.Module,
    plan: Mapping[str, LayerPlan],
    *,
    seed: int = 0,
    method: str = "lr2vq",
    **dkm_options: Any,
) -> CompressedModel:
    """Copy a model and replace the planned layers by LR²VQ layers initialised from their weights.

    Parameters
    ----------
    model : torch.nn.Module
        The pretrained model; it is deep-copied and left untouched.
    plan : mapping of str to LayerPlan
        State_dict weight key (``"layer1.0.conv1.weight"``) → ``LayerPlan(k, m, d_tilde)``; d̃ = m is PQ.
        ``Report.plan()`` produces one. Plain dicts ``{"k", "m", "d_tilde"}`` are accepted too.
    seed : int, default 0
        Seed of the k-means that initialises DKM's centroids (the low-rank initialisation is deterministic).
    method : {"lr2vq", "dkm"}, default "lr2vq"
        ``"lr2vq"``: layers start in the ``"lowrank"`` state (train Z and P, then :meth:`CompressedModel.quantize`).
        ``"dkm"``: layers start in the ``"dkm"`` state, with centroids from k-means on Z (on the subvectors
        themselves when d̃ = m: vanilla DKM).
    **dkm_options
        ``tau``, ``max_iter``, ``epsilon`` for ``method="dkm"`` (defaults: :data:`DKM_DEFAULTS`), and
        k-means options for its initial centroids.

    Returns
    -------
    CompressedModel

    Raises
    ------
    InvalidParameterError
        If the plan names a layer the model lacks (the message lists the compressible ones), a grouped or
        depthwise convolution, an m that does not divide the layer's row length, a k not below its number
        of subvectors, or if ``method`` is unknown.
    InvalidWeightsError
        If the model has no compressible layer, or a planned weight holds NaN/Inf or only zeros.

    Examples
    --------
    >>> torch.manual_seed(0) and None
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> cmodel = compress(model, {"0.weight": LayerPlan(k=16, m=4, d_tilde=2)})
    >>> list(cmodel.compressed_layers()), cmodel.state
    (['0.weight'], 'lowrank')
    >>> cmodel.quantize(seed=0).state
    'quantized'
    >>> cmodel(torch.randn(5, 16)).shape
    torch.Size([5, 4])
    """
    check_seed(seed)
    if method not in METHODS:
        raise InvalidParameterError(f"method={method!r} is invalid; allowed methods are {METHODS}")
    if method != "dkm" and dkm_options:
        raise InvalidParameterError(f"options {sorted(dkm_options)} are only accepted with method='dkm'")
    checked = _check_plan(model, plan)
    module = copy.deepcopy(model)
    for key in checked:
        module_name = key.rpartition(".")[0]
        dense = module.get_submodule(module_name)
        compressed = _compressed_type(dense).from_dense(dense, checked[key], name=key)
        module = _replace_submodule(module, module_name, compressed)
    cmodel = CompressedModel(module, checked)
    cmodel.train(model.training)
    if method == "dkm":
        cmodel.start_dkm(seed=seed, **dkm_options)
    return cmodel
