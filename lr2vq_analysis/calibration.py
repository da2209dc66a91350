"""Output-space (data-aware) errors: each layer's input second moment H and the low-rank error under it.

A layer computes ``y = W·x`` (x: the layer's input feature vector, or an unfolded input patch of a
convolution, of length L = C_in/groups·kh·kw). A weight error ΔW changes the output by ``ΔW·x``, whose
mean energy over the calibration inputs is ``tr(ΔW·H·ΔWᵀ)`` with ``H = E[x·xᵀ]`` (L × L). The
*output-space* relative error of a weight approximation is therefore ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``;
the weight-space error is the special case H = I.

This module collects H with forward hooks (:func:`collect_second_moments`; float64, streamed over the
calibration batches, a bounded number of layers' H in memory at a time) and computes what is exact
about PQF's subvector layout under H (:func:`lowrank_output_curve`, :func:`output_error`,
:func:`block_metric`, :func:`activation_aware_projection`). The modelled output-space clustering error
lives in :mod:`~lr2vq_analysis.tradeoff`. Derivations: ``docs/theory.md``, "Output-space errors".
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._validation import InvalidParameterError, check_d_tilde, check_m, layer_label
from .subvectors import row_length

__all__ = [
    "DEFAULT_MAX_BYTES",
    "SecondMoment",
    "collect_second_moments",
    "output_error",
    "lowrank_output_curve",
    "block_metric",
    "activation_aware_projection",
    "load_exported_model",
]

DEFAULT_MAX_BYTES: int = 256 * 2**20
"""Memory for the H matrices of one calibration pass (float64); layers that do not fit get another pass."""

_COMPRESSIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class SecondMoment:
    """The input second moment of one layer, per group of a grouped convolution.

    Attributes
    ----------
    name : str
        State-dict key of the layer's weight (``"<module>.weight"``).
    matrix : numpy.ndarray of shape (groups, L, L)
        ``E[x xᵀ]`` of the unfolded inputs of each group (float64), L = the weight's row length.
    n_vectors : int
        Number of input vectors (samples × output positions) averaged.
    """

    name: str
    matrix: np.ndarray
    n_vectors: int

    @property
    def groups(self) -> int:
        """Number of groups (1 unless a grouped or depthwise convolution)."""
        return int(self.matrix.shape[0])


def _unfolded(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input vectors as rows, (n_vectors, in_channels·kh·kw), channel-major like the weight."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    return _unfolded_conv(cast("nn.Conv1d | nn.Conv2d", module), x)


def _unfolded_conv(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    conv1d = isinstance(module, nn.Conv1d)
    if conv1d:
        x = x.unsqueeze(2)
    kernel = (1, *module.kernel_size) if conv1d else tuple(module.kernel_size)
    stride = (1, *module.stride) if conv1d else tuple(module.stride)
    dilation = (1, *module.dilation) if conv1d else tuple(module.dilation)
    if isinstance(module.padding, str):
        if module.padding == "valid":
            pads = [0, 0, 0, 0]
        else:  # "same" (stride 1): PyTorch puts the extra element on the right/bottom
            pads = []
            for k, d in zip(reversed(kernel), reversed(dilation), strict=True):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
    else:
        padding = (0, *module.padding) if conv1d else tuple(module.padding)
        pads = [padding[1], padding[1], padding[0], padding[0]]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    if any(pads):
        x = F.pad(x, pads, mode=mode)
    patches = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (N, C_in·kh·kw, positions)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _batches(calibration: Any, batch_size: int) -> Iterable[Any]:
    if isinstance(calibration, torch.Tensor):
        return (calibration[i : i + batch_size] for i in range(0, int(calibration.shape[0]), batch_size))
    if isinstance(calibration, np.ndarray):
        return _batches(torch.as_tensor(calibration), batch_size)
    if isinstance(calibration, (Sequence, Iterable)) and not isinstance(calibration, (str, bytes, Mapping)):
        return calibration
    raise InvalidParameterError(
        f"calibration={type(calibration).__name__} is invalid; give a tensor of inputs, a list of batches or a "
        "DataLoader"
    )


def _forward(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(batch[0])  # (inputs, targets) as a DataLoader yields them
    else:
        model(batch)


def _layer_modules(model: nn.Module, names: Iterable[str] | None) -> dict[str, nn.Module]:
    modules: dict[str, nn.Module] = {
        f"{name}.weight": module for name, module in model.named_modules() if isinstance(module, _COMPRESSIBLE)
    }
    if names is None:
        return modules
    chosen: dict[str, nn.Module] = {}
    for name in names:
        if name not in modules:
            raise InvalidParameterError(
                f"{layer_label(name)}the calibration model has no Linear/Conv1d/Conv2d with this weight; "
                f"its layers are {sorted(modules)}"
            )
        chosen[name] = modules[name]
    return chosen


def _matrix_bytes(module: nn.Module) -> int:
    weight = cast(torch.Tensor, module.weight)
    groups = int(getattr(module, "groups", 1))
    length = row_length(tuple(weight.shape))
    return groups * length * length * 8


def _accumulator(name: str, module: nn.Module, sums: dict[str, torch.Tensor], counts: dict[str, int]) -> Any:
    """A forward hook adding Σ x xᵀ (float64, per group) of the layer's unfolded inputs to ``sums[name]``."""

    def accumulate(_: nn.Module, inputs: tuple[Any, ...], __: Any) -> None:
        rows = _unfolded(module, inputs[0].detach()).to(torch.float64)
        g = int(getattr(module, "groups", 1))
        blocks = rows.reshape(rows.shape[0], g, -1).transpose(0, 1)  # (groups, n, L)
        product = blocks.transpose(1, 2) @ blocks
        sums[name] = product if name not in sums else sums[name] + product
        counts[name] += int(rows.shape[0])

    return accumulate


def collect_second_moments(
    model: nn.Module,
    calibration: Any,
    layers: Iterable[str] | None = None,
    *,
    batch_size: int = 64,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Iterator[SecondMoment]:
    """Input second moments ``H = E[x xᵀ]`` of a model's layers, yielded one layer at a time.

    Forward hooks unfold each layer's input (``torch.nn.functional.unfold`` for convolutions, with the
    layer's padding, stride and dilation) and accumulate ``Σ x xᵀ`` in float64 over the calibration
    batches. Layers are processed in groups whose H fit in ``max_bytes`` (one forward pass over the
    calibration data per group); each layer's H is yielded as soon as its group is done and not kept.

    Parameters
    ----------
    model : torch.nn.Module
        The pretrained model; it runs in eval mode under ``torch.no_grad`` (its mode is restored).
    calibration : torch.Tensor, numpy.ndarray, list of batches or DataLoader
        Inputs. A tensor is cut into batches of ``batch_size``; a batch may be a tensor, an
        ``(inputs, targets)`` pair (only the inputs are used) or a mapping of keyword arguments.
    layers : iterable of str, optional
        State-dict keys of the weights (``"conv2.weight"``); default every Linear, Conv1d and Conv2d.
    batch_size : int, default 64
        Batch size when ``calibration`` is one tensor.
    max_bytes : int, default DEFAULT_MAX_BYTES
        Memory for the H matrices of one pass; a layer larger than this gets a pass of its own.

    Yields
    ------
    SecondMoment
        In model order. A grouped convolution's H has one L × L block per group.

    Raises
    ------
    InvalidParameterError
        If a named layer is not a Linear/Conv1d/Conv2d of the model, or the calibration data is of
        an unsupported type or reaches none of the layers.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    >>> x = torch.eye(4)
    >>> [(h.name, h.matrix.shape, h.n_vectors) for h in collect_second_moments(net, x)]
    [('0.weight', (1, 4, 4), 4), ('2.weight', (1, 3, 3), 4)]
    """
    modules = _layer_modules(model, layers)
    groups: list[list[str]] = []
    used = 0
    for name, module in modules.items():
        size = _matrix_bytes(module)
        if groups and used + size <= max_bytes:
            groups[-1].append(name)
            used += size
        else:
            groups.append([name])
            used = size
    was_training = model.training
    _set_training(model, False)
    try:
        for group in groups:
            sums: dict[str, torch.Tensor] = {}
            counts = dict.fromkeys(group, 0)

            handles = [
                modules[name].register_forward_hook(_accumulator(name, modules[name], sums, counts)) for name in group
            ]
            try:
                with torch.no_grad():
                    for batch in _batches(calibration, batch_size):
                        _forward(model, batch)
            finally:
                for handle in handles:
                    handle.remove()
            for name in group:
                if counts[name] == 0:
                    raise InvalidParameterError(
                        f"{layer_label(name)}no calibration input reached this layer; check the calibration data"
                    )
                matrix = (sums.pop(name) / counts[name]).cpu().numpy()
                yield SecondMoment(name=name, matrix=matrix, n_vectors=counts[name])
    finally:
        _set_training(model, was_training)


def _set_training(model: nn.Module, mode: bool) -> None:
    """``model.train(mode)``; a ``torch.export`` module, whose mode was fixed at export, is left as it is."""
    try:
        model.train(mode)
    except NotImplementedError:
        pass


def _as_groups(weight: Any, metric: np.ndarray, name: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The weight as (groups, rows per group, L) float64 and H as (groups, L, L), shapes checked."""
    w = np.asarray(weight.detach().cpu() if isinstance(weight, torch.Tensor) else weight, dtype=np.float64)
    h = np.asarray(metric, dtype=np.float64)
    if h.ndim == 2:
        h = h[None]
    length = row_length(w.shape)
    if h.ndim != 3 or h.shape[1:] != (length, length) or w.shape[0] % h.shape[0] != 0:
        raise InvalidParameterError(
            f"{layer_label(name)}H has shape {h.shape}; for a weight of shape {w.shape} it must be (groups, {length}, "
            f"{length}) with groups dividing {w.shape[0]}"
        )
    return w.reshape(h.shape[0], -1, length), h


def output_error(weight: Any, approximation: Any, metric: Any, *, name: str | None = None) -> float:
    """Relative output-space error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` of a weight approximation.

    Parameters
    ----------
    weight, approximation : array-like or torch.Tensor of the same shape
        The layer weight and its approximation.
    metric : array of shape (groups, L, L) or (L, L)
        The input second moment (:attr:`SecondMoment.matrix`).
    name : str, optional
        Layer name, used in messages.

    Examples
    --------
    >>> import numpy as np
    >>> w = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> output_error(w, np.zeros_like(w), np.diag([3.0, 1.0]))
    1.0
    >>> output_error(w, np.diag([1.0, 0.0]), np.diag([3.0, 1.0]))
    0.25
    """
    w, h = _as_groups(weight, metric, name)
    a, _ = _as_groups(approximation, metric, name)
    return _quadratic(w - a, h) / _quadratic(w, h)


def _quadratic(w: np.ndarray, h: np.ndarray) -> float:
    """Σ_g tr(W_g H_g W_gᵀ) through matrix products (w: groups × rows × L, h: groups × L × L)."""
    return float(np.sum((w @ h) * w))


def block_metric(metric: Any, m: int, *, name: str | None = None) -> np.ndarray:
    """The m × m mean diagonal block H̄ of H: the metric one subvector sees, averaged over positions and groups.

    ``H̄ = (m / (groups·L)) · Σ_g Σ_b H_g[b, b]`` where ``H_g[b, b]`` is the m × m block of the b-th
    subvector position. Errors that are independent between subvectors (like k-means residuals) cost
    ``tr(H̄ · E[e eᵀ])`` per subvector in the output.

    Parameters
    ----------
    metric : array of shape (groups, L, L) or (L, L)
        Input second moment H.
    m : int
        Subvector size; must divide L.
    name : str, optional
        Layer name, used in messages.

    Examples
    --------
    >>> import numpy as np
    >>> block_metric(np.diag([1.0, 2.0, 3.0, 4.0]), 2)
    array([[2., 0.],
           [0., 3.]])
    """
    h = np.asarray(metric, dtype=np.float64)
    if h.ndim == 2:
        h = h[None]
    length = h.shape[-1]
    m = check_m(m, length, name=name)
    blocks = h.reshape(h.shape[0], length // m, m, length // m, m)
    return np.einsum("gbibj->ij", blocks) / (h.shape[0] * (length // m))


def lowrank_output_curve(weight: Any, metric: Any, eigenvectors: Any, *, name: str | None = None) -> np.ndarray:
    """Exact relative output-space error of LR²VQ's low-rank approximation, for d̃ = 1..m.

    The approximation is PQF's: every subvector x (length m) is replaced by ``V_d V_dᵀ x`` with the top
    d̃ columns of ``eigenvectors`` (the weight-space principal directions, as
    :class:`~lr2vq_analysis.nn.LR2VQConv2d` initialises Z and P). With ``C = W·(I ⊗ V)`` (each
    subvector's coordinates on the eigenvectors) and ``H̃ = (I ⊗ V)ᵀ H (I ⊗ V)``, the error at d̃ is
    ``Σ_{i,j > d̃} M_ij`` with ``M_ij = Σ_{b,b'} (CᵀC)[(b,i),(b',j)] · H̃[(b,i),(b',j)]`` — cross-position
    terms of H included, so this is exact; one O(rows·L² + L²·m) pass gives the whole curve.

    Parameters
    ----------
    weight : array-like or torch.Tensor
        Linear, Conv1d or Conv2d weight (rows = output channels).
    metric : array of shape (groups, L, L) or (L, L)
        Input second moment H.
    eigenvectors : array of shape (m, m)
        Columns in the order of decreasing weight-space eigenvalue (:attr:`Spectrum.eigenvectors`).
    name : str, optional
        Layer name, used in messages.

    Returns
    -------
    numpy.ndarray of shape (m,)
        ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` at d̃ = 1..m; the last entry is 0.
    """
    w, h = _as_groups(weight, metric, name)
    v = np.asarray(eigenvectors, dtype=np.float64)
    m = v.shape[0]
    length = h.shape[-1]
    check_m(m, length, name=name)
    positions = length // m
    total = np.zeros((m, m))
    for g in range(h.shape[0]):
        coords = (w[g].reshape(-1, positions, m) @ v).reshape(-1, length)  # C = W (I ⊗ V)
        gram = coords.T @ coords
        h_tilde = np.einsum("ai,paqc,cj->piqj", v, h[g].reshape(positions, m, positions, m), v, optimize=True)
        total += np.einsum("piqj,piqj->ij", gram.reshape(positions, m, positions, m), h_tilde)
    energy = float(np.sum(total))
    # tail[d] = Σ_{i,j >= d} M_ij (0-based): the error of keeping the first d directions.
    curve = np.array([float(np.sum(total[d:, d:])) for d in range(1, m + 1)]) / energy
    return np.clip(curve, 0.0, None)


def activation_aware_projection(
    weight: Any, metric: Any, m: int, d_tilde: int, *, name: str | None = None
) -> np.ndarray:
    """The shared projection P (d̃ × m) that minimises the output error under the block metric H̄.

    With H replaced by ``I ⊗ H̄`` (cross-position terms dropped, every position seeing the mean block
    :func:`block_metric`), the low-rank problem ``min_{P, Z} Σ_x (x − Pᵀz)ᵀ H̄ (x − Pᵀz)`` becomes plain
    PCA of the whitened subvectors ``H̄^{1/2} x``: the kept subspace is ``H̄^{-1/2}·U_d`` with U_d the
    top-d̃ eigenvectors of ``H̄^{1/2} XᵀX H̄^{1/2}`` (equivalently, the generalised eigenproblem
    ``XᵀX H̄ u = λ u``). Returned with orthonormal rows spanning that subspace; Z is then the
    H̄-weighted least-squares coordinates ``Z = X H̄ Pᵀ (P H̄ Pᵀ)⁻¹``. Exact for the block metric, an
    approximation of the full-H problem (see docs/theory.md).

    Parameters
    ----------
    weight : array-like or torch.Tensor
        The layer weight.
    metric : array of shape (groups, L, L) or (L, L)
        Input second moment H.
    m : int
        Subvector size.
    d_tilde : int
        Dimension of the kept subspace, 1..m.
    name : str, optional
        Layer name, used in messages.

    Returns
    -------
    numpy.ndarray of shape (d̃, m)
    """
    h = np.asarray(metric, dtype=np.float64)
    hbar = block_metric(h, m, name=name)
    d = check_d_tilde(d_tilde, m, name=name)
    x = np.asarray(weight.detach().cpu() if isinstance(weight, torch.Tensor) else weight, dtype=np.float64)
    x = x.reshape(-1, m)
    values, vectors = np.linalg.eigh(hbar)
    floor = max(float(values.max()), 1e-300) * 1e-12
    values = np.clip(values, floor, None)
    root = (vectors * np.sqrt(values)) @ vectors.T
    inverse_root = (vectors / np.sqrt(values)) @ vectors.T
    whitened = root @ (x.T @ x) @ root
    _, u = np.linalg.eigh(whitened)
    basis = inverse_root @ u[:, ::-1][:, :d]  # (m, d): spans the optimal subspace
    q, _ = np.linalg.qr(basis)
    return np.ascontiguousarray(q.T)


_EXPORTED_OPS = {"linear": nn.Linear, "conv1d": nn.Conv1d, "conv2d": nn.Conv2d}


def load_exported_model(path: str | Any) -> nn.Module:
    """A ``torch.export`` archive (``.pt2``) as a module whose layers forward hooks can see.

    ``torch.export.load(path).module()`` runs the exported graph with ``aten.linear`` / ``aten.conv1d`` /
    ``aten.conv2d`` calls, not ``nn.Linear`` / ``nn.Conv*`` modules, so
    :func:`collect_second_moments` would find no layer. Each such call whose weight is a parameter of
    the graph (``get_attr``) is replaced by the equivalent module (same stride, padding, dilation and
    groups), registered under the weight's prefix and sharing its parameters: ``"fc.weight"`` stays
    the state-dict key, so analysis and calibration agree on names.

    Parameters
    ----------
    path : str or path
        A ``.pt2`` file written by ``torch.export.save``.

    Returns
    -------
    torch.nn.Module
        A ``torch.fx.GraphModule`` (its train/eval behaviour is the one fixed at export).

    Raises
    ------
    InvalidParameterError
        If the graph holds no linear or convolution with a parameter weight.
    """
    gm = cast(Any, torch.export.load(path).module())
    graph = gm.graph
    found = 0
    for node in list(graph.nodes):
        op = getattr(node.target, "__name__", "")
        kind = next((key for key in _EXPORTED_OPS if op.startswith(f"{key}.")), None)
        if node.op != "call_function" or kind is None:
            continue
        args = list(node.args)
        if len(args) < 2 or getattr(args[1], "op", None) != "get_attr":
            continue
        weight_name = str(args[1].target)
        if not weight_name.endswith(".weight"):
            continue
        bias_node = args[2] if len(args) > 2 else node.kwargs.get("bias")
        if bias_node is not None and getattr(bias_node, "op", None) != "get_attr":
            continue
        weight = gm.get_parameter(weight_name)
        bias = gm.get_parameter(str(bias_node.target)) if bias_node is not None else None
        layer = _layer_like(kind, weight, bias, args[3:], node.kwargs)
        prefix = weight_name[: -len(".weight")]
        parent_name, _, child = prefix.rpartition(".")
        parent = gm.get_submodule(parent_name) if parent_name else gm
        old = getattr(parent, child, None)
        if isinstance(old, nn.Module):
            for key, value in old.named_children():
                layer.add_module(key, value)
        setattr(parent, child, layer)
        with graph.inserting_before(node):
            replacement = graph.call_module(prefix, (args[0],))
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
        found += 1
    if not found:
        raise InvalidParameterError(
            f"the exported model {str(path)!r} has no linear or convolution with a parameter weight to calibrate"
        )
    graph.eliminate_dead_code()
    gm.recompile()
    return cast(nn.Module, gm)


def _layer_like(kind: str, weight: Any, bias: Any, rest: Sequence[Any], kwargs: Mapping[str, Any]) -> nn.Module:
    """An nn.Linear/Conv1d/Conv2d computing the aten call with these (already built) parameters."""
    layer: nn.Module
    if kind == "linear":
        layer = nn.Linear(int(weight.shape[1]), int(weight.shape[0]), bias=bias is not None, device="meta")
    else:
        names = ("stride", "padding", "dilation", "groups")
        values = {key: kwargs[key] for key in names if key in kwargs}
        values.update(zip(names, rest, strict=False))
        groups = int(values.get("groups", 1))
        cls = nn.Conv1d if kind == "conv1d" else nn.Conv2d
        layer = cls(
            int(weight.shape[1]) * groups,
            int(weight.shape[0]),
            tuple(weight.shape[2:]),
            stride=values.get("stride", 1),
            padding=values.get("padding", 0),
            dilation=values.get("dilation", 1),
            groups=groups,
            bias=bias is not None,
            device="meta",
        )
    layer.weight = weight
    layer.bias = bias
    return layer
