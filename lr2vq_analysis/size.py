"""Model size in bits and MiB, by the convention the field publishes with (PQF, "And the bit goes down").

The rules, chosen so that the PQ configurations of PQF reproduce its published ResNet-18/50 sizes and
ratios from the layer shapes alone (1.54 / 1.03 / 5.09 / 3.19 MB; 29× / 43× / 19× / 31×), exactly as
PQF's own ``compute_model_nbits`` counts them:

* **Compressed layer**: codes at exactly log2(k) bits each (no byte padding), the codebook (k × d̃) at
  fp16 and, for LR²VQ (d̃ < m), the projection P (d̃ × m) at fp16 — :meth:`LayerPlan.compressed_bits`,
  the one place this lives. Its bias is an uncompressed tensor.
* **Uncompressed tensor** (first conv, biases, layers left out of the plan, embeddings, layer norms): fp32,
  whatever dtype it is stored in.
* **Batch norm**: folded into two vectors (scale and shift; the running statistics are folded in and
  ``num_batches_tracked`` is dropped), at fp32. PQF folds batch norm in the uncompressed baseline too, so
  the baseline is exactly the model's parameters at fp32.
* **Integer buffers** (``num_batches_tracked``, ``position_ids``) are bookkeeping, not weights: not counted.
* **Baseline**: the same tensors uncompressed, at fp32. Ratio = baseline bits / compressed bits.
* **Source dtype**: a bf16/fp16 checkpoint is half the size of its fp32 baseline, so its ratio against
  fp32 overstates the saving 2×. :class:`SizeReport` also states the size of the source as stored
  (``source_bits``, each tensor at its own dtype, or at ``source_dtype`` when given) and the ratio
  against it (``ratio_vs_source``); ``ratio`` stays the field's fp32 convention. Uncompressed tensors
  of the compressed model count at the source dtype when that is narrower than fp32 (a compressed
  bf16 model keeps its embeddings in bf16), else at fp32; for fp32 sources nothing changes.
* **MB** are MiB: bits / 8 / 2²⁰.

k is taken from the plan as given. PQF caps k at the largest power of two ≤ (number of subvectors)/4
for small layers (:func:`~lr2vq_analysis.plan.effective_k`); a plan built by ``Report.plan()`` carries
the capped value already. Of the four published checks only ResNet-50 "large" has capped layers
(m = 8 on the 64-channel 1×1 convs of ``layer1``), and they change its size by 0.002 MiB.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from ._validation import InvalidParameterError, check_k, check_m
from .nn import CompressedModel, _LR2VQLayer
from .plan import LayerPlan
from .subvectors import n_subvectors, row_length

__all__ = ["LayerSize", "SizeReport", "size_report", "bits_to_mib", "dtype_bits"]

_FP32 = 32
_DTYPE_BITS = {
    "bf16": 16,
    "bfloat16": 16,
    "fp16": 16,
    "f16": 16,
    "float16": 16,
    "half": 16,
    "fp32": 32,
    "f32": 32,
    "float32": 32,
    "float": 32,
    "fp64": 64,
    "f64": 64,
    "float64": 64,
    "double": 64,
    "f8_e4m3": 8,
    "f8_e5m2": 8,
    "float8_e4m3fn": 8,
    "float8_e5m2": 8,
}
_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def dtype_bits(dtype: Any) -> int:
    """Bits per value of a dtype: a torch or numpy dtype, a name (``"bf16"``, ``"float16"``, safetensors'
    ``"BF16"``) or an int number of bits.

    Examples
    --------
    >>> dtype_bits(torch.bfloat16), dtype_bits("F16"), dtype_bits("fp32"), dtype_bits(16)
    (16, 16, 32, 16)
    """
    if isinstance(dtype, bool):
        pass
    elif isinstance(dtype, int):
        if dtype in (8, 16, 32, 64):
            return dtype
    elif isinstance(dtype, torch.dtype):
        return int(dtype.itemsize) * 8
    elif isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key in _DTYPE_BITS:
            return _DTYPE_BITS[key]
    elif hasattr(dtype, "itemsize"):
        return int(dtype.itemsize) * 8
    raise InvalidParameterError(
        f"source_dtype={dtype!r} is invalid; use a torch/numpy dtype, 8/16/32/64 bits or one of {sorted(_DTYPE_BITS)}"
    )


def _value_bits(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return int(value.element_size()) * 8
    return int(value.dtype.itemsize) * 8


def bits_to_mib(bits: float) -> float:
    """Bits → MiB (bits / 8 / 2**20), the "MB" of the field's tables.

    Examples
    --------
    >>> bits_to_mib(8 * 2**20)
    1.0
    """
    return bits / 8 / 2**20


@dataclass(frozen=True)
class LayerSize:
    """Size of one part of the model: a compressed layer, an uncompressed tensor or a folded batch norm.

    Attributes
    ----------
    name : str
        Weight key of a compressed layer, tensor key, or batch-norm module name.
    kind : {"compressed", "uncompressed", "batchnorm"}
    shape : tuple of int
        Weight / tensor shape; (C,) for a batch norm.
    n_params : int
        Values in the uncompressed model (2·C for a batch norm).
    uncompressed_bits : float
        Baseline: n_params at fp32.
    codes_bits, codebook_bits, projection_bits : float
        Parts of a compressed layer (0 elsewhere).
    dense_bits : float
        Values stored as they are, at fp32 (uncompressed tensors, folded batch norms).
    k, m, d_tilde : int or None
        The plan of a compressed layer.
    source_dtype_bits : int
        Bits per value in the source checkpoint (16 for bf16/fp16, 32 for fp32).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    n_params: int
    uncompressed_bits: float
    codes_bits: float = 0.0
    codebook_bits: float = 0.0
    projection_bits: float = 0.0
    dense_bits: float = 0.0
    k: int | None = None
    m: int | None = None
    d_tilde: int | None = None
    source_dtype_bits: int = _FP32

    @property
    def compressed_bits(self) -> float:
        """Bits of this part in the compressed model."""
        return self.codes_bits + self.codebook_bits + self.projection_bits + self.dense_bits

    @property
    def source_bits(self) -> float:
        """Bits of this part in the source checkpoint, at its own dtype."""
        return float(self.n_params * self.source_dtype_bits)


@dataclass(frozen=True)
class SizeReport:
    """Size of a model before and after compression.

    Attributes
    ----------
    layers : tuple of LayerSize
        One entry per compressed layer, uncompressed tensor and batch norm, in state_dict order.
    """

    layers: tuple[LayerSize, ...]

    @property
    def uncompressed_bits(self) -> float:
        """Baseline size: every counted value at fp32."""
        return float(sum(layer.uncompressed_bits for layer in self.layers))

    @property
    def compressed_bits(self) -> float:
        """Compressed size in bits."""
        return float(sum(layer.compressed_bits for layer in self.layers))

    @property
    def ratio(self) -> float:
        """Compression ratio: uncompressed bits / compressed bits."""
        return self.uncompressed_bits / self.compressed_bits if self.compressed_bits else math.nan

    @property
    def megabytes(self) -> float:
        """Compressed size in MiB."""
        return bits_to_mib(self.compressed_bits)

    @property
    def source_bits(self) -> float:
        """Size of the source checkpoint as stored (bf16/fp16/fp32 per tensor), in bits."""
        return float(sum(layer.source_bits for layer in self.layers))

    @property
    def source_megabytes(self) -> float:
        """Size of the source checkpoint as stored, in MiB."""
        return bits_to_mib(self.source_bits)

    @property
    def ratio_vs_source(self) -> float:
        """Compression ratio against the source as stored: source bits / compressed bits."""
        return self.source_bits / self.compressed_bits if self.compressed_bits else math.nan

    @property
    def source_dtype(self) -> str:
        """``"fp32"``, ``"16-bit"`` etc.: the source's bits per value, or ``"mixed"``."""
        widths = {layer.source_dtype_bits for layer in self.layers}
        if len(widths) != 1:
            return "mixed"
        width = widths.pop()
        return "fp32" if width == 32 else f"{width}-bit"

    @property
    def uncompressed_megabytes(self) -> float:
        """Baseline size in MiB."""
        return bits_to_mib(self.uncompressed_bits)

    def to_frame(self) -> pd.DataFrame:
        """One row per part, with compressed_bits and bits_per_weight columns added."""
        rows = []
        for layer in self.layers:
            row = asdict(layer)
            row["shape"] = tuple(layer.shape)
            row["compressed_bits"] = layer.compressed_bits
            row["bits_per_weight"] = layer.compressed_bits / layer.n_params if layer.n_params else math.nan
            rows.append(row)
        return pd.DataFrame(rows)

    def __str__(self) -> str:
        n_compressed = sum(layer.kind == "compressed" for layer in self.layers)
        if self.source_dtype == "fp32":
            return (
                f"SizeReport: {self.uncompressed_megabytes:.3f} MiB -> {self.megabytes:.3f} MiB "
                f"({self.ratio:.1f}x), {n_compressed} compressed layer(s)"
            )
        return (
            f"SizeReport: {self.source_megabytes:.3f} MiB as stored ({self.source_dtype}) -> {self.megabytes:.3f} MiB "
            f"({self.ratio_vs_source:.1f}x vs the {self.source_dtype} source; {self.ratio:.1f}x vs fp32 "
            f"{self.uncompressed_megabytes:.3f} MiB), {n_compressed} compressed layer(s)"
        )


def _shapes_of(
    model_or_state_dict: Any,
) -> tuple[dict[str, tuple[int, ...]], dict[str, int], dict[str, LayerPlan] | None]:
    """{key: shape} of the counted tensors as in the uncompressed model, their bits per value, a model's plan."""
    bits: dict[str, int] = {}
    if isinstance(model_or_state_dict, CompressedModel):
        shapes: dict[str, tuple[int, ...]] = {}
        modules = model_or_state_dict.module.named_modules()
        layers = {name: module for name, module in modules if isinstance(module, _LR2VQLayer)}
        state = model_or_state_dict.module.state_dict()
        for key, tensor in state.items():
            owner, _, leaf = key.rpartition(".")
            if owner in layers:
                layer = layers[owner]
                weight_key = f"{owner}.weight" if owner else "weight"
                shapes.setdefault(weight_key, layer.weight_shape)
                bits.setdefault(weight_key, _FP32)
                if leaf == "bias":
                    shapes[key] = tuple(tensor.shape)
                    bits[key] = _value_bits(tensor)
            elif tensor.is_floating_point() or leaf in _BN_STATS:
                shapes[key] = tuple(tensor.shape)
                bits[key] = _value_bits(tensor)
        return shapes, bits, model_or_state_dict.plan
    if isinstance(model_or_state_dict, nn.Module):
        model_or_state_dict = model_or_state_dict.state_dict()
    if not isinstance(model_or_state_dict, Mapping):
        raise InvalidParameterError(
            f"size_report needs an nn.Module, a CompressedModel or a state_dict mapping, "
            f"got {type(model_or_state_dict).__name__}"
        )
    shapes = {}
    for key, value in model_or_state_dict.items():
        if not hasattr(value, "shape") or not hasattr(value, "dtype"):
            raise InvalidParameterError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor/array")
        floating = value.is_floating_point() if isinstance(value, torch.Tensor) else value.dtype.kind == "f"
        if floating or key.rpartition(".")[2] in _BN_STATS:
            shapes[key] = tuple(int(s) for s in value.shape)
            bits[key] = _value_bits(value)
    return shapes, bits, None


def size_report(
    model_or_state_dict: Any,
    plan: Mapping[str, LayerPlan] | None = None,
    *,
    source_dtype: Any = None,
) -> SizeReport:
    """Size of a model, uncompressed and compressed, by the field's convention (see the module docstring).

    Parameters
    ----------
    model_or_state_dict : CompressedModel, torch.nn.Module or mapping of str to tensor/array
        A compressed model (its own plan is used; its size is that after quantization, whatever its
        state), or an uncompressed model / state_dict together with ``plan``. Only shapes are read.
    plan : mapping of str to LayerPlan, optional
        State_dict weight key → ``LayerPlan(k, m, d_tilde)``; layers not in it count as uncompressed.
        Not allowed with a CompressedModel, which carries its plan.
    source_dtype : dtype, str, int or mapping, optional
        The dtype the source checkpoint stores its weights in (``torch.bfloat16``, ``"fp16"``, 16, ...),
        for all tensors or ``{key: dtype}``. Default: each tensor's own floating dtype (a compressed
        model's weights count as fp32).

    Returns
    -------
    SizeReport

    Raises
    ------
    InvalidParameterError
        If the plan names a key that is not in the state_dict (the message lists the candidates), m does
        not divide a planned layer's row length, or k is not below its number of subvectors.

    Examples
    --------
    >>> import numpy as np
    >>> state = {"conv.weight": np.zeros((64, 64, 3, 3), np.float32), "conv.bias": np.zeros(64, np.float32)}
    >>> report = size_report(state, {"conv.weight": LayerPlan(k=256, m=9, d_tilde=4)})
    >>> report.uncompressed_bits, report.compressed_bits  # 36928·32 ; 4096·8 + 256·4·16 + 4·9·16 + 64·32
    (1181696.0, 51776.0)
    >>> round(report.ratio, 2)
    22.82
    >>> half = size_report(state, {"conv.weight": LayerPlan(k=256, m=9, d_tilde=4)}, source_dtype="bf16")
    >>> half.source_bits, half.compressed_bits  # 36928·16 ; the bias now at 16 bits: 51776 − 64·16
    (590848.0, 50752.0)
    >>> round(half.ratio_vs_source, 2), round(half.ratio, 2)
    (11.64, 23.28)
    """
    if isinstance(model_or_state_dict, CompressedModel) and plan is not None:
        raise InvalidParameterError("a CompressedModel carries its plan; call size_report(cmodel) without plan")
    shapes, widths, own_plan = _shapes_of(model_or_state_dict)
    if source_dtype is not None:
        if isinstance(source_dtype, Mapping):
            widths.update({key: dtype_bits(value) for key, value in source_dtype.items() if key in widths})
        else:
            widths = dict.fromkeys(widths, dtype_bits(source_dtype))
    plan = dict(own_plan if own_plan is not None else (plan or {}))
    for key, entry in plan.items():
        if key not in shapes:
            candidates = [name for name, shape in shapes.items() if len(shape) in (2, 3, 4)]
            shown = ", ".join(repr(name) for name in candidates[:12]) + (" ..." if len(candidates) > 12 else "")
            raise InvalidParameterError(f"the plan names {key!r}, which is not in the state_dict; weights: {shown}")
        if not isinstance(entry, LayerPlan):
            raise InvalidParameterError(f"layer {key!r}: plan entry {entry!r} is invalid; expected a LayerPlan")
        check_m(entry.m, row_length(shapes[key]), name=key)
        check_k(entry.k, n_subvectors(shapes[key], entry.m), name=key)

    batchnorms = {key.rpartition(".")[0] for key in shapes if key.endswith("running_mean")}
    layers: list[LayerSize] = []
    for key, shape in shapes.items():
        owner, _, leaf = key.rpartition(".")
        n_params = math.prod(shape)
        if owner in batchnorms:
            if leaf == "running_mean":  # one entry per batch norm: scale and shift at fp32
                channels = int(shape[0])
                width = widths[key]
                bits = 2.0 * channels * _FP32
                dense = 2.0 * channels * min(width, _FP32)
                layers.append(
                    LayerSize(
                        owner, "batchnorm", (channels,), 2 * channels, bits, dense_bits=dense, source_dtype_bits=width
                    )
                )
            continue
        if leaf in _BN_STATS:
            continue
        if key in plan:
            entry = plan[key]
            parts = entry.compressed_bits(shape)
            layers.append(
                LayerSize(
                    key,
                    "compressed",
                    shape,
                    n_params,
                    float(n_params * _FP32),
                    codes_bits=parts["codes"],
                    codebook_bits=parts["codebook"],
                    projection_bits=parts["projection"],
                    k=entry.k,
                    m=entry.m,
                    d_tilde=entry.d_tilde,
                    source_dtype_bits=widths[key],
                )
            )
        else:
            bits = float(n_params * _FP32)
            dense = float(n_params * min(widths[key], _FP32))
            layers.append(
                LayerSize(key, "uncompressed", shape, n_params, bits, dense_bits=dense, source_dtype_bits=widths[key])
            )
    return SizeReport(tuple(layers))
