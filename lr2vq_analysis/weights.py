"""Load the compressible layers of a model: Conv2d, Conv1d and Linear weights, in model order.

A source is an ``nn.Module``, a state_dict (a mapping of names to tensors or arrays), a weight file
(``.pt``/``.pth``/``.bin``, ``.safetensors``, ``.npz``), a sharded Hugging Face checkpoint (its
``*.safetensors.index.json`` or the folder holding it) or the name of a bundled model. Every tensor
of rank 2 to 4 that is not returned is listed in :attr:`WeightSet.skipped` with the reason, and
:attr:`WeightSet.coverage` counts the parameters analysed and skipped per reason, so nothing is
dropped silently.

How a layer's kind is decided:

- from an ``nn.Module``: from the module that owns the weight (``nn.Conv2d`` → ``"conv2d"``,
  ``nn.Conv1d`` → ``"conv1d"``, ``nn.Linear`` → ``"linear"``); grouped and depthwise convolutions,
  embeddings and other module types are skipped;
- from a state_dict or a file: from the rank (4-D conv2d, 3-D conv1d, 2-D linear) of every
  floating-point tensor whose name ends in ``weight``; 2-D tensors named like an embedding table
  (the name contains ``embed``, or is GPT-2's ``wte``/``wpe``) are skipped. A state_dict does not
  record ``groups``: pass the ``nn.Module`` to have grouped convolutions recognised.
- ``include`` globs select any other floating-point tensor of rank 2 to 4 by name, whatever its
  suffix (Paddle's ``*.w_0``, ONNX initializers, ``in_proj_weight``); its kind follows its rank.

Model order: a module's own order, a state_dict's or ``.pt``/``.npz`` file's stored order, a sharded
index's order when it is not plain alphabetical; else (``.safetensors`` files, which do not record
it) natural key order (``layer.2`` before ``layer.10``), and :attr:`Coverage.order_inferred` says so.

The input stem, the convolution that reads the image, is left uncompressed by default, as PQF does:
the first convolution with at most 4 input channels in model order; when the order is inferred, one
with 3 input channels (RGB) first, so that a depthwise filter read from a file (1 input channel) is
not taken for it; without such a conv, the first conv in a known model order (none when inferred).

Files are read without memory maps (a file truncated while it is read raises
:class:`~lr2vq_analysis.WeightFileError`, never SIGBUS), and safetensors and ``.npz`` layers are
read one at a time, in their stored dtype, only when asked for: a :class:`WeightSet` from a file
holds no weights in memory. ``.pt``/``.pth``/``.bin`` files are pickles and are read whole.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import math
import os
import re
import stat
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._validation import InvalidParameterError, InvalidWeightsError, WeightFileError, check_m
from .registry import model_names, weights_path
from .subvectors import row_length

__all__ = [
    "BUNDLED_MODELS",
    "NPZ_MAX_EXPANSION",
    "NPZ_SMALL_MEMBER_BYTES",
    "SUPPORTED_EXTENSIONS",
    "Coverage",
    "LayerInfo",
    "WeightSet",
    "bundled_model_path",
    "load_state_dict",
    "load_weights",
    "read_npz",
]

#: Names accepted by :func:`load_weights` and :func:`bundled_model_path` (the :mod:`~lr2vq_analysis.registry`).
BUNDLED_MODELS: tuple[str, ...] = model_names()

_TORCH_EXTENSIONS = (".pt", ".pth", ".bin")
#: File extensions :func:`load_weights` reads (``.bin`` is a PyTorch file, as Hugging Face names them).
#: A sharded safetensors checkpoint is read from its ``*.safetensors.index.json`` or its folder.
SUPPORTED_EXTENSIONS: tuple[str, ...] = (*_TORCH_EXTENSIONS, ".safetensors", ".npz")
_INDEX_SUFFIX = ".safetensors.index.json"
_SHARD_NAME = re.compile(r"-(\d+)-of-(\d+)\.safetensors$")
#: Checkpoint entries that may hold the state_dict, tried in this order.
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")

#: An ``.npz`` member may expand to at most this many times its compressed size ...
NPZ_MAX_EXPANSION: int = 200
#: ... unless it declares at most this many bytes (small arrays of zeros compress without bound).
NPZ_SMALL_MEMBER_BYTES: int = 64 * 2**20
_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors format's own limit

_KIND_BY_RANK = {4: "conv2d", 3: "conv1d", 2: "linear"}
_ROW_LENGTH_MEANING = {"conv2d": "C_in·kh·kw", "conv1d": "C_in·k", "linear": "in_features"}
_EMBEDDING_NAME = re.compile(r"embed|(^|\.)(wte|wpe)\.weight$", re.IGNORECASE)
_STEM_MAX_CHANNELS = 4
_TEXT_DTYPE = re.compile(r"^[<>|=]?[US]\d*$")

# Reason categories of Coverage (one per rule that can leave parameters out).
STEM = "input stem"
NOT_DIVISIBLE = "m does not divide the row length"
EXCLUDED = "excluded by pattern"
NOT_INCLUDED = "not matched by include"
TOO_SMALL = "below min_size"
EMBEDDING = "embedding table"
GROUPED = "grouped or depthwise convolution"
TRANSPOSED = "transposed convolution"
NOT_A_LAYER = "not a layer weight"
NOT_FLOAT = "not real floating point"
ALL_ZERO = "all zeros"
EMPTY = "empty tensor"
RANK = "rank above 4"
NPZ_REFUSED = "over the .npz decompression bound"
VECTORS = "biases and norms (rank 0-1)"
#: Category of layers that :func:`~lr2vq_analysis.report.analyze` skips for having too few subvectors.
TOO_FEW_SUBVECTORS = "too few subvectors"

_TORCH_DTYPE_NAMES = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
    torch.float64: "float64",
}
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
}


# ------------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class LayerInfo:
    """What :func:`load_weights` knows about one compressible layer.

    Attributes
    ----------
    name : str
        The state_dict key, e.g. ``"layer1.0.conv1.weight"``.
    kind : str
        ``"conv2d"``, ``"conv1d"`` or ``"linear"``.
    shape : tuple of int
        The weight's shape, output channels first.
    source_dtype : str, default "float32"
        The dtype the source stores the weight in (``"bfloat16"``, ``"float16"``, ``"float32"``,
        ``"float64"``, ...): what an uncompressed copy of the layer costs.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    source_dtype: str = "float32"

    @property
    def row_length(self) -> int:
        """Weights per output channel (C_in·kh·kw, C_in·k or in_features): what m must divide."""
        return row_length(self.shape)

    @property
    def size(self) -> int:
        """Number of weights in the layer."""
        return int(np.prod(self.shape))

    @property
    def source_bits(self) -> int:
        """Bits per weight in the source (16 for bf16/fp16, 32 for fp32, ...)."""
        return _dtype_bits(self.source_dtype)


def _dtype_bits(name: str) -> int:
    try:
        return int(torch.empty(0, dtype=getattr(torch, name)).element_size() * 8)
    except (AttributeError, TypeError):
        return int(np.dtype(name).itemsize * 8)


@dataclass(frozen=True)
class Coverage:
    """Share of a model's parameters that were analysed, and of those skipped, per reason.

    Counts are numbers of floating-point values (integer buffers such as ``position_ids`` are not
    parameters and are not counted).

    Attributes
    ----------
    analysed : int
        Parameters in the analysed layers.
    skipped : tuple of (str, int)
        ``(reason, parameters)`` for every reason that left parameters out, largest first; biases
        and norms (rank 0-1 tensors) are one reason.
    order_inferred : bool
        True when the source does not record model order and the layers come in natural key order.

    Examples
    --------
    >>> coverage = Coverage(900, (("input stem", 60), ("biases and norms (rank 0-1)", 40)))
    >>> coverage.total, round(coverage.analysed_fraction, 3)
    (1000, 0.9)
    >>> coverage.summary()
    'analysed 90.0% of 1,000 parameters; skipped 10.0%: input stem 6.0%, biases and norms (rank 0-1) 4.0%'
    """

    analysed: int
    skipped: tuple[tuple[str, int], ...] = ()
    order_inferred: bool = False

    @property
    def skipped_total(self) -> int:
        """Parameters left out, over every reason."""
        return sum(count for _, count in self.skipped)

    @property
    def total(self) -> int:
        """Parameters of the model (analysed + skipped)."""
        return self.analysed + self.skipped_total

    @property
    def analysed_fraction(self) -> float:
        """``analysed / total`` (0 for an empty model)."""
        return self.analysed / self.total if self.total else 0.0

    @property
    def by_reason(self) -> dict[str, int]:
        """``{reason: parameters}`` of the skipped parameters."""
        return dict(self.skipped)

    def skip(self, reason: str, count: int) -> Coverage:
        """The coverage after ``count`` more analysed parameters are skipped for ``reason``."""
        by_reason = self.by_reason
        by_reason[reason] = by_reason.get(reason, 0) + int(count)
        return Coverage(self.analysed - int(count), _sorted_reasons(by_reason), self.order_inferred)

    def summary(self) -> str:
        """One line: the share analysed, the share skipped and its reasons, and whether order was inferred."""
        total = max(self.total, 1)
        text = f"analysed {self.analysed / total:.1%} of {self.total:,} parameters"
        if self.skipped:
            reasons = ", ".join(f"{reason} {count / total:.1%}" for reason, count in self.skipped)
            text += f"; skipped {self.skipped_total / total:.1%}: {reasons}"
        if self.order_inferred:
            text += "; layer order inferred from names (the file does not record it)"
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; :meth:`from_dict` restores it."""
        return {"analysed": self.analysed, "skipped": dict(self.skipped), "order_inferred": self.order_inferred}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Coverage:
        """Inverse of :meth:`to_dict`."""
        skipped = {str(reason): int(count) for reason, count in dict(data.get("skipped", {})).items()}
        return cls(int(data["analysed"]), _sorted_reasons(skipped), bool(data.get("order_inferred", False)))


def _sorted_reasons(by_reason: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(((r, c) for r, c in by_reason.items() if c > 0), key=lambda item: (-item[1], item[0])))


class WeightSet(Mapping[str, np.ndarray]):
    """The compressible layers of a model: an ordered, read-only mapping of name to float32 array.

    Iteration follows model order. Arrays keep the layer's original shape. A WeightSet read from a
    safetensors or ``.npz`` file holds no weights: each access reads the layer from the file again
    (:meth:`tensor` in its stored dtype, ``ws[name]`` as a fresh float32 array), so a whole model
    never sits in memory at once.

    Attributes
    ----------
    info : dict of str to LayerInfo
        Name, kind, shape and source dtype of every layer, in the same order.
    skipped : dict of str to str
        Every rank-2..4 tensor that is not a layer here, with the reason.
    source : str
        What was loaded (a path, a bundled model name, ``"state_dict"`` or the module's class).
    coverage : Coverage
        Parameters analysed and skipped per reason, and whether the order was inferred.
    """

    def __init__(
        self,
        layers: Mapping[str, np.ndarray | Callable[[], Any]],
        info: Mapping[str, LayerInfo],
        skipped: Mapping[str, str] | None = None,
        source: str = "",
        *,
        coverage: Coverage | None = None,
    ) -> None:
        if list(layers) != list(info):
            raise ValueError("layers and info must hold the same names in the same order")
        self._layers = dict(layers)
        self.info: dict[str, LayerInfo] = dict(info)
        self.skipped: dict[str, str] = dict(skipped or {})
        self.source = source
        self.coverage = coverage if coverage is not None else Coverage(self.n_weights)

    def __getitem__(self, name: str) -> np.ndarray:
        value = self._layers[name]
        if isinstance(value, np.ndarray):
            return value
        return _to_float32(value())

    def tensor(self, name: str) -> torch.Tensor | np.ndarray:
        """The layer in its source dtype, read now (it may share memory with an in-memory source: do not modify)."""
        value = self._layers[name]
        return value if isinstance(value, np.ndarray) else value()

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    @property
    def n_weights(self) -> int:
        """Total number of weights in the layers (skipped tensors not counted)."""
        return sum(info.size for info in self.info.values())

    @property
    def order_inferred(self) -> bool:
        """True when the source does not record model order (natural key order is used)."""
        return self.coverage.order_inferred

    def __repr__(self) -> str:
        kinds: dict[str, int] = {}
        for info in self.info.values():
            kinds[info.kind] = kinds.get(info.kind, 0) + 1
        kind_text = ", ".join(f"{count} {kind}" for kind, count in kinds.items())
        return (
            f"WeightSet(source={self.source!r}, {len(self)} layers ({kind_text}), "
            f"{self.n_weights:,} weights, {len(self.skipped)} skipped)"
        )

    def summary(self) -> str:
        """Return a table of the layers (kind, shape) and the skipped tensors (reason), one per line.

        Examples
        --------
        >>> import torch
        >>> ws = load_weights(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(4, 8, 3)))
        >>> print(ws.summary())
        layers (1):
          1.weight  conv2d  (8, 4, 3, 3)
        skipped (1):
          0.weight  input stem (reads 1 channel): kept uncompressed as in PQF; keep_first_conv=True includes it
        analysed 85.7% of 336 parameters; skipped 14.3%: input stem 10.7%, biases and norms (rank 0-1) 3.6%
        """
        width = max((len(name) for name in [*self.info, *self.skipped]), default=0)
        lines = [f"layers ({len(self)}):"]
        lines += [f"  {name:<{width}}  {info.kind:<6}  {info.shape}" for name, info in self.info.items()]
        if self.skipped:
            lines.append(f"skipped ({len(self.skipped)}):")
            lines += [f"  {name:<{width}}  {reason}" for name, reason in self.skipped.items()]
        lines.append(self.coverage.summary())
        return "\n".join(lines)


def _to_float32(value: Any) -> np.ndarray:
    """A float32 numpy copy of a tensor or array, sharing no memory with it."""
    if isinstance(value, np.ndarray):
        return np.array(value, dtype=np.float32, copy=True)
    return value.detach().to(device="cpu", dtype=torch.float32, copy=True).numpy()


@dataclass
class _Tensor:
    """One tensor of a source, described without reading it; ``load`` reads it in its stored dtype."""

    key: str
    shape: tuple[int, ...]
    dtype: str  # torch/numpy dtype name, e.g. "bfloat16", "float32", "int64", "complex64", "<U5"
    is_float: bool  # a real floating-point type
    load: Callable[[], Any]  # torch.Tensor or np.ndarray; may share memory with an in-memory source
    kind: str | None = None  # known from the owning module, else decided from the rank
    reason: tuple[str, str] | None = None  # (category, text): why the source says it is not compressible

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def counted(self) -> bool:
        """Counts as parameters in the coverage (floating or complex values, not integer buffers)."""
        return self.is_float or self.dtype.startswith("complex")


@dataclass
class _Source:
    label: str
    tensors: list[_Tensor]
    order_inferred: bool = False
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ public API
def bundled_model_path(name: str) -> Path:
    """Return the path of a named model's safetensors file (:func:`lr2vq_analysis.registry.weights_path`).

    Parameters
    ----------
    name : str
        One of :data:`BUNDLED_MODELS`.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    InvalidParameterError
        If ``name`` is not a bundled model.

    Examples
    --------
    >>> bundled_model_path("digits-cnn").name
    'digits_cnn.safetensors'
    """
    return weights_path(name)


def load_weights(
    source: Any,
    *,
    m: int | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    min_size: int = 0,
    keep_first_conv: bool = False,
) -> WeightSet:
    """Load the compressible layers (Conv2d, Conv1d, Linear weights) of a model, in model order.

    Each layer is read once, in its stored dtype, to check it (finite, not empty, not all zeros),
    and not kept when the source is a file: see :class:`WeightSet`.

    Parameters
    ----------
    source : str, os.PathLike, torch.nn.Module or Mapping
        A weight file (``.pt``, ``.pth``, ``.bin``, ``.safetensors``, ``.npz``), a sharded
        safetensors checkpoint (its ``*.safetensors.index.json``, or the folder holding it), a
        bundled model name (see :data:`BUNDLED_MODELS`), a module, or a state_dict mapping names to
        tensors or arrays. A PyTorch file (read with ``torch.load(weights_only=True)``) or a mapping
        may also be a checkpoint whose ``"state_dict"``, ``"model_state_dict"`` or ``"model"``
        entry holds the state_dict.
    m : int, optional
        Subvector size. Layers whose row length it does not divide are skipped, with the reason.
    include, exclude : str or list of str, optional
        ``fnmatch`` globs (case-sensitive) on the name; a tensor matches when the full key
        (``"layer1.0.conv1.weight"``) or the key without ``".weight"`` matches. With ``include``,
        only matching layers are kept (an empty list means no filter), and any floating-point
        tensor of rank 2 to 4 that matches is a layer whatever its name (``"*.w_0"``);
        ``exclude`` drops matches.
    min_size : int, default 0
        Layers with fewer weights are skipped.
    keep_first_conv : bool, default False
        By default the input stem (the convolution that reads the image, see the module
        docstring) is skipped, as PQF and the field leave it uncompressed; True analyses it too.

    Returns
    -------
    WeightSet
        Name → float32 array (bf16/fp16 converted on access), plus ``info``, ``skipped`` and
        ``coverage``.

    Raises
    ------
    WeightFileError
        If a file is missing, not a regular file, has an unsupported extension, is one shard of a
        sharded checkpoint, or is corrupt or truncated.
    InvalidWeightsError
        If no compressible layer is left ("empty model") or a layer holds NaN/Inf.
    InvalidParameterError
        If ``m``, ``min_size``, ``include`` or ``exclude`` is invalid, or ``source`` has an
        unsupported type.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 16, 3), torch.nn.Linear(16, 10))
    >>> ws = load_weights(model)
    >>> [(name, info.kind, info.shape) for name, info in ws.info.items()]
    [('1.weight', 'conv2d', (16, 8, 3, 3)), ('2.weight', 'linear', (10, 16))]
    >>> ws.skipped["0.weight"]
    'input stem (reads 3 channels): kept uncompressed as in PQF; keep_first_conv=True includes it'
    >>> load_weights(model, m=9, keep_first_conv=True)
    WeightSet(source='Sequential (nn.Module)', 2 layers (2 conv2d), 1,368 weights, 1 skipped)
    >>> load_weights(model, m=9, keep_first_conv=True).skipped
    {'2.weight': 'row length 16 (in_features) is not divisible by m=9'}
    """
    if m is not None:
        m = check_m(m)
    include_patterns = _as_patterns(include, "include")
    exclude_patterns = _as_patterns(exclude, "exclude")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise InvalidParameterError(f"min_size={min_size!r} is invalid; min_size must be a non-negative integer")
    return _select(
        _open_source(source),
        m=m,
        include=include_patterns,
        exclude=exclude_patterns,
        min_size=int(min_size),
        keep_first_conv=keep_first_conv,
    )


def load_state_dict(source: Any) -> dict[str, torch.Tensor]:
    """Return every tensor of a source (not only the compressible layers), in its own dtype.

    Reads the same sources as :func:`load_weights`, with the same errors, in the same order. Useful
    to count a whole model's size or to rebuild a model from a file. The tensors share no memory
    with the source. Arrays that torch cannot hold (strings) are left out.

    Parameters
    ----------
    source : str, os.PathLike, torch.nn.Module or Mapping
        As for :func:`load_weights`.

    Returns
    -------
    dict of str to torch.Tensor

    Raises
    ------
    WeightFileError
        If a file is missing, has an unsupported extension, or is corrupt or truncated.
    InvalidWeightsError
        If a mapping holds no tensor.

    Examples
    --------
    >>> state = load_state_dict("digits-cnn")
    >>> state["conv2.weight"].shape, state["bn1.num_batches_tracked"].dtype
    (torch.Size([32, 16, 3, 3]), torch.int64)
    """
    state = {}
    for tensor in _open_source(source).tensors:
        if _TEXT_DTYPE.match(tensor.dtype):
            continue
        value = tensor.load()
        if isinstance(value, np.ndarray):
            state[tensor.key] = torch.from_numpy(np.array(value, copy=True))
        else:
            state[tensor.key] = value.detach().clone()
    return state


def read_npz(
    path: str | os.PathLike[str],
    keys: Iterable[str] | None = None,
    *,
    error: type[Exception] = WeightFileError,
    max_bytes: int | None = None,
) -> dict[str, np.ndarray]:
    """Read named arrays of an ``.npz`` archive without trusting its sizes or running pickles.

    Before anything is decompressed, every member's declared size is checked against the archive:
    a member may expand to at most :data:`NPZ_MAX_EXPANSION` times its compressed size unless it
    declares at most :data:`NPZ_SMALL_MEMBER_BYTES` bytes, and the ``.npy`` header must agree with
    it. Only the arrays named in ``keys`` are decompressed, never more bytes than declared. Object
    (pickled) arrays are refused.

    Parameters
    ----------
    path : str or os.PathLike
        The archive; it must be a regular file (a FIFO or device is refused, not opened).
    keys : iterable of str, optional
        Names of the arrays to read (without ``.npy``); default all of them.
    error : type of Exception, default WeightFileError
        Raised for every problem (e.g. ``ReportFileError`` when reading a report).
    max_bytes : int, optional
        A hard bound on each requested array: one whose declared uncompressed size (``.npy`` header
        included) is larger is refused before any member of the archive is decompressed.

    Returns
    -------
    dict of str to numpy.ndarray
        Read-only arrays, in the archive's order.

    Raises
    ------
    error
        If the file is missing, not a regular file, a ``.npy`` file, not a zip archive, corrupt,
        truncated, lacks a requested key, or a member exceeds the bound.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "a.npz"
    >>> np.savez_compressed(path, big=np.zeros(10**6), small=np.arange(3))
    >>> read_npz(path, ["small"])
    {'small': array([0, 1, 2])}
    """
    requested = None if keys is None else list(keys)
    archive = _NpzArchive(Path(path), error, max_bytes=max_bytes, bounded=requested)
    wanted = list(archive.members) if requested is None else requested
    missing = [key for key in wanted if key not in archive.members]
    if missing:
        raise error(f"'{path}' has no {missing[0]!r} array; it holds {list(archive.members)[:20]}")
    return {key: archive.read(key) for key in wanted}


# ----------------------------------------------------------------------------------------------- selection
def _as_patterns(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        raise InvalidParameterError(
            f"{name}={value!r} is invalid; it must be a glob string or a list of them"
        ) from None
    if not all(isinstance(pattern, str) for pattern in patterns):
        raise InvalidParameterError(f"{name}={value!r} is invalid; it must be a glob string or a list of them")
    return patterns


def _matches(key: str, pattern: str) -> bool:
    module_name = key.removesuffix(".weight")
    return fnmatch.fnmatchcase(key, pattern) or fnmatch.fnmatchcase(module_name, pattern)


def _structural_reason(tensor: _Tensor, include: tuple[str, ...]) -> tuple[str | None, tuple[str, str] | None]:
    """Return (kind, reason): the kind if the tensor is a layer weight at all, else (category, why not)."""
    if tensor.reason is not None and tensor.reason[0] == NPZ_REFUSED:
        return None, tensor.reason
    if not tensor.is_float:
        if tensor.dtype.startswith("complex"):
            text = f"dtype {tensor.dtype} holds complex values; only real floating-point weights are analysed"
        elif _TEXT_DTYPE.match(tensor.dtype):
            text = f"dtype {tensor.dtype} holds strings; only real floating-point weights are analysed"
        else:
            text = f"dtype {tensor.dtype} is not a floating-point type"
        return None, (NOT_FLOAT, text)
    if tensor.reason is not None:
        if tensor.reason[0] == NOT_A_LAYER and any(_matches(tensor.key, p) for p in include):
            return _KIND_BY_RANK[len(tensor.shape)], None  # any floating tensor can be selected by a glob
        return None, tensor.reason
    if tensor.kind is not None:
        return tensor.kind, None
    return _KIND_BY_RANK[len(tensor.shape)], None


def _filter_reason(
    key: str,
    kind: str,
    shape: tuple[int, ...],
    *,
    m: int | None,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    min_size: int,
) -> tuple[str, str] | None:
    for pattern in exclude:
        if _matches(key, pattern):
            return EXCLUDED, f"excluded by exclude pattern {pattern!r}"
    if include and not any(_matches(key, pattern) for pattern in include):
        return NOT_INCLUDED, f"not matched by include patterns {list(include)}"
    size = math.prod(shape)
    if size < min_size:
        return TOO_SMALL, f"{size} weights, fewer than min_size={min_size}"
    if m is not None and row_length(shape) % m:
        return NOT_DIVISIBLE, f"row length {row_length(shape)} ({_ROW_LENGTH_MEANING[kind]}) is not divisible by m={m}"
    return None


def _find_stem(tensors: Sequence[_Tensor], kinds: Sequence[str | None], order_inferred: bool) -> str | None:
    """Key of the input stem, the convolution that reads the image (see the module docstring)."""
    convs = [t for t, kind in zip(tensors, kinds, strict=True) if kind in ("conv2d", "conv1d") and t.size > 0]
    candidates = [t for t in convs if t.shape[1] <= _STEM_MAX_CHANNELS]
    if order_inferred:
        # Names do not give the order: an RGB conv beats a depthwise (1 channel) or grouped filter.
        rgb = [t for t in candidates if t.shape[1] == 3]
        return (rgb or candidates)[0].key if candidates else None
    if candidates:
        return candidates[0].key
    return convs[0].key if convs else None  # e.g. an audio model's first Conv1d over 80 mel bins


def _check_layer(key: str, value: Any) -> tuple[str, str] | None:
    """Read check of one selected layer: empty, all zeros (skipped) or NaN/Inf (refused)."""
    size = value.size if isinstance(value, np.ndarray) else value.numel()
    if size == 0:
        return EMPTY, f"empty tensor (shape {tuple(value.shape)}) holds no weights"
    if isinstance(value, np.ndarray):
        n_finite, any_nonzero = int(np.isfinite(value).sum()), bool(np.any(value))
    else:
        n_finite, any_nonzero = int(torch.isfinite(value).sum()), bool(value.ne(0).any())
    if n_finite < size:
        raise InvalidWeightsError(
            f"layer {key!r}: weight holds {size - n_finite} NaN/Inf value(s); only finite weights can be analysed"
        )
    if not any_nonzero:
        return ALL_ZERO, "all weights are zero; relative errors are undefined"
    return None


def _select(
    source: _Source,
    *,
    m: int | None,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    min_size: int,
    keep_first_conv: bool,
) -> WeightSet:
    layers: dict[str, Callable[[], Any]] = {}
    info: dict[str, LayerInfo] = {}
    skipped: dict[str, str] = {}
    skipped_params: dict[str, int] = {}
    analysed = 0
    structure = [_structural_reason(t, include) if 2 <= len(t.shape) <= 4 else (None, None) for t in source.tensors]
    stem = (
        None if keep_first_conv else _find_stem(source.tensors, [kind for kind, _ in structure], source.order_inferred)
    )

    def skip(tensor: _Tensor, reason: tuple[str, str], *, listed: bool = True) -> None:
        if listed:
            skipped[tensor.key] = reason[1]
        if tensor.counted:
            skipped_params[reason[0]] = skipped_params.get(reason[0], 0) + tensor.size

    for tensor, (kind, reason) in zip(source.tensors, structure, strict=True):
        rank = len(tensor.shape)
        if rank < 2:
            skip(tensor, (VECTORS, ""), listed=False)  # biases, norms, scalars: counted, not listed
            continue
        if rank > 4:
            skip(tensor, (RANK, f"rank {rank} (shape {tensor.shape}); layers have rank 2 to 4"))
            continue
        if reason is None and tensor.key == stem:
            channels = tensor.shape[1]
            reason = (
                STEM,
                f"input stem (reads {channels} channel{'s' if channels != 1 else ''}): kept uncompressed as in PQF; "
                "keep_first_conv=True includes it",
            )
        if reason is None:
            assert kind is not None
            reason = _filter_reason(
                tensor.key, kind, tensor.shape, m=m, include=include, exclude=exclude, min_size=min_size
            )
        if reason is None:
            reason = _check_layer(tensor.key, tensor.load())  # one layer in memory at a time
        if reason is not None:
            skip(tensor, reason)
            continue
        assert kind is not None
        layers[tensor.key] = tensor.load
        info[tensor.key] = LayerInfo(tensor.key, kind, tuple(int(s) for s in tensor.shape), tensor.dtype)
        analysed += tensor.size
    if not layers:
        shown = "; ".join(f"{key}: {reason}" for key, reason in list(skipped.items())[:8])
        more = f"; and {len(skipped) - 8} more" if len(skipped) > 8 else ""
        detail = f" ({len(skipped)} tensors skipped: {shown}{more})" if skipped else ""
        raise InvalidWeightsError(
            f"empty model: {source.label} has no compressible layer (Conv2d, Conv1d or Linear weight){detail}"
        )
    coverage = Coverage(analysed, _sorted_reasons(skipped_params), source.order_inferred)
    return WeightSet(layers, info, skipped, source=source.label, coverage=coverage)


# --------------------------------------------------------------------------------------------------- sources
def _open_source(source: Any) -> _Source:
    if isinstance(source, nn.Module):
        return _Source(f"{type(source).__name__} (nn.Module)", _module_tensors(source))
    if isinstance(source, Mapping):
        return _mapping_source(source, "state_dict", error=InvalidWeightsError)
    if isinstance(source, (str, os.PathLike)):
        if isinstance(source, str) and source in BUNDLED_MODELS and not os.path.lexists(source):
            path = bundled_model_path(source)
            if not path.is_file():
                raise WeightFileError(
                    f"the file of bundled model {source!r} is missing: {path}; "
                    "reinstall the package or run its training script in scripts/"
                )
            opened = _file_source(path)  # whatever format the registry names
            opened.label = source
            return opened
        return _file_source(Path(source).expanduser())
    raise InvalidParameterError(
        f"source of type {type(source).__name__} is not supported; pass a file path "
        f"({', '.join(SUPPORTED_EXTENSIONS)}, or a sharded checkpoint's {_INDEX_SUFFIX} or folder), "
        f"a bundled model name {list(BUNDLED_MODELS)}, an nn.Module or a state_dict"
    )


def _stat(path: Path, error: type[Exception] = WeightFileError, *, hint: str = "") -> os.stat_result:
    """``os.stat`` with the documented error: no such file, dangling link, link loop, permission."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise error(errno.ENOENT, f"dangling symbolic link (to {os.readlink(path)!r})", str(path)) from None
        raise error(errno.ENOENT, f"no such file{hint}", str(path)) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error(errno.ELOOP, "symbolic link loop (too many levels of symbolic links)", str(path)) from None
        raise error(exc.errno, f"cannot access the file: {exc.strerror}", str(path)) from None


def _regular_file(path: Path, error: type[Exception] = WeightFileError) -> os.stat_result:
    """Stat ``path`` and refuse anything but a regular file (a FIFO would block the reader forever)."""
    info = _stat(path, error)
    if not stat.S_ISREG(info.st_mode):
        raise error(f"'{path}' is not a regular file (it is {_file_type(info.st_mode)}); pass a weight file")
    return info


def _file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _file_source(path: Path) -> _Source:
    hint = "" if path.suffix else f" (nor a bundled model: those are {list(BUNDLED_MODELS)})"
    info = _stat(path, hint=hint)
    if stat.S_ISDIR(info.st_mode):
        return _directory_source(path)
    if not stat.S_ISREG(info.st_mode):
        raise WeightFileError(f"'{path}' is not a regular file (it is {_file_type(info.st_mode)}); pass a weight file")
    label = str(path)
    if path.name.endswith(".index.json"):
        return _sharded_source(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise WeightFileError(
            f"unsupported file extension {path.suffix!r} of '{path}'; supported extensions are "
            f"{list(SUPPORTED_EXTENSIONS)}, or a sharded checkpoint's {_INDEX_SUFFIX}"
        )
    if suffix == ".safetensors":
        _refuse_single_shard(path)
        return _Source(label, _safetensors_tensors([_SafetensorsFile(path)]), order_inferred=True)
    if suffix == ".npz":
        return _Source(label, _npz_tensors(path))
    return _torch_file_source(path)


def _directory_source(path: Path) -> _Source:
    try:
        names = sorted(p.name for p in path.iterdir())
    except OSError as exc:
        raise WeightFileError(f"cannot list the directory '{path}': {exc.strerror}") from None
    indexes = [name for name in names if name.endswith(_INDEX_SUFFIX)]
    if len(indexes) == 1:
        return _sharded_source(path / indexes[0])
    weights = [name for name in names if Path(name).suffix.lower() in SUPPORTED_EXTENSIONS]
    if not indexes and len(weights) == 1 and weights[0].endswith(".safetensors"):
        return _file_source(path / weights[0])
    candidates = indexes or weights
    raise WeightFileError(
        f"'{path}' is a directory; pass one weight file inside it"
        + (
            f" (candidates: {candidates})"
            if candidates
            else f" (none found with extensions {list(SUPPORTED_EXTENSIONS)})"
        )
    )


def _corrupt(path: Path, what: str, exc: BaseException | str) -> WeightFileError:
    detail = str(exc).strip()
    # torch's weights_only message is long; its cause sits after "WeightsUnpickler error:"
    marker = "WeightsUnpickler error:"
    if marker in detail:
        detail = detail.split(marker, 1)[1].split("Check the documentation", 1)[0].strip()
    detail = " ".join(detail.split())[:300]
    prefix = "" if isinstance(exc, str) else f"{type(exc).__name__}: "
    return WeightFileError(f"cannot read '{path}' as {what} (corrupt or truncated file?): {prefix}{detail}")


def _natural_key(key: str) -> list[Any]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", key)]


# ---------------------------------------------------------------------------------------------- safetensors
class _SafetensorsFile:
    """A safetensors file: header parsed and checked at once, tensors read with plain file reads (no mmap)."""

    WHAT = "a safetensors file"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = _regular_file(path).st_size
        try:
            with open(path, "rb") as handle:
                prefix = handle.read(8)
                if len(prefix) < 8:
                    raise ValueError(f"the file has {len(prefix)} bytes; a safetensors file starts with 8")
                header_length = int.from_bytes(prefix, "little")
                if header_length > _SAFETENSORS_MAX_HEADER or 8 + header_length > self.size:
                    raise ValueError(f"header length {header_length} does not fit the file of {self.size} bytes")
                header = json.loads(handle.read(header_length).decode("utf-8"))
            self.data_start = 8 + header_length
            self.metadata, self.entries = self._check_header(header, self.size - self.data_start)
        except (ValueError, TypeError, UnicodeDecodeError, OSError) as exc:
            raise _corrupt(path, self.WHAT, exc) from None

    @staticmethod
    def _check_header(
        header: Any, data_size: int
    ) -> tuple[dict[str, str], dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]]:
        if not isinstance(header, dict):
            raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("__metadata__ must map strings to strings")
        entries = {}
        for key, spec in header.items():
            if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
                raise ValueError(f"tensor {key!r}: entry {spec!r} lacks dtype, shape or data_offsets")
            dtype = _SAFETENSORS_DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
            if dtype is None:
                raise ValueError(f"tensor {key!r}: unsupported dtype {spec['dtype']!r}")
            shape, offsets = spec["shape"], spec["data_offsets"]
            if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
                raise ValueError(f"tensor {key!r}: invalid shape {shape!r}")
            if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
                raise ValueError(f"tensor {key!r}: invalid data_offsets {offsets!r}")
            begin, end = offsets
            nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            if not 0 <= begin <= end or end - begin != nbytes:
                raise ValueError(f"tensor {key!r}: data_offsets {offsets} do not hold {nbytes} bytes of shape {shape}")
            entries[key] = (dtype, tuple(shape), begin, end)
        position = 0
        for key, (_, _, begin, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
            if begin != position:
                raise ValueError(f"tensor {key!r} starts at byte {begin}, expected {position} (gap or overlap)")
            position = end
        if position != data_size:
            raise ValueError(f"the tensors hold {position} bytes but the file has {data_size} after the header")
        return metadata, entries

    def read(self, key: str) -> torch.Tensor:
        """Read one tensor; a file that shrank or changed since its header was read raises WeightFileError."""
        dtype, shape, begin, end = self.entries[key]
        buffer = bytearray(end - begin)
        try:
            with open(self.path, "rb") as handle:
                now = os.fstat(handle.fileno()).st_size
                if now != self.size:
                    raise WeightFileError(
                        f"'{self.path}' changed while it was read: {now} bytes now, {self.size} when its header was "
                        f"read (tensor {key!r}); the file is being written or was truncated"
                    )
                handle.seek(self.data_start + begin)
                view, got = memoryview(buffer), 0
                while got < len(buffer):
                    n = handle.readinto(view[got:])
                    if not n:
                        break
                    got += n
        except OSError as exc:
            if isinstance(exc, WeightFileError):
                raise
            raise _corrupt(self.path, self.WHAT, exc) from None
        if got < len(buffer):
            raise WeightFileError(
                f"'{self.path}' ended after {got} of the {len(buffer)} bytes of tensor {key!r}: "
                "the file was truncated while it was read"
            )
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def _safetensors_tensors(files: Sequence[_SafetensorsFile], order: Sequence[str] | None = None) -> list[_Tensor]:
    owner = {key: file for file in files for key in file.entries}
    keys = list(order) if order is not None else sorted(owner, key=_natural_key)
    tensors = []
    for key in keys:
        file = owner[key]
        dtype, shape, _, _ = file.entries[key]
        is_float = dtype.is_floating_point
        tensors.append(
            _name_rule_tensor(key, shape, _TORCH_DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch.")), is_float,
                              _bind(file.read, key))
        )  # fmt: skip
    return tensors


def _bind(read: Callable[[str], Any], key: str) -> Callable[[], Any]:
    return lambda: read(key)


def _constant(value: Any) -> Callable[[], Any]:
    return lambda: value


def _refuse_single_shard(path: Path) -> None:
    """Refuse one shard of a sharded checkpoint whose index sits beside it; warn when the index is missing."""
    folder = path.parent
    try:
        indexes = sorted(p for p in folder.iterdir() if p.name.endswith(_INDEX_SUFFIX))
    except OSError:
        indexes = []
    for index in indexes:
        if not index.is_file():
            continue
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            shards = set(weight_map.values()) if isinstance(weight_map, dict) else set()
        except (OSError, ValueError, AttributeError):
            continue
        if path.name in shards and len(shards) > 1:
            raise WeightFileError(
                f"'{path}' is one of {len(shards)} shards of a sharded checkpoint (index: '{index}'); analysing it "
                f"alone would leave out the other shards' layers: pass the index '{index}' or the folder '{folder}'"
            )
    match = _SHARD_NAME.search(path.name)
    if match and int(match.group(2)) > 1:
        warnings.warn(
            f"'{path}' looks like shard {int(match.group(1))} of {int(match.group(2))} of a sharded checkpoint, and no "
            f"*{_INDEX_SUFFIX} lists it: only this shard's layers are read",
            UserWarning,
            stacklevel=4,
        )


def _sharded_source(index: Path) -> _Source:
    """A sharded safetensors checkpoint: the index's weight_map names every tensor's shard."""
    _regular_file(index)
    what = "a sharded checkpoint index (model.safetensors.index.json)"
    try:
        data = json.loads(index.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise _corrupt(index, what, exc) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise _corrupt(index, what, "no 'weight_map' object mapping tensor names to shard files")
    shards: dict[str, _SafetensorsFile] = {}
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise _corrupt(index, what, f"tensor {key!r} maps to {shard!r}, not a file name inside the index's folder")
        if not shard.endswith(".safetensors"):
            raise WeightFileError(
                f"'{index}' maps tensor {key!r} to {shard!r}: only sharded .safetensors checkpoints are supported"
            )
        if shard not in shards:
            shards[shard] = _SafetensorsFile(index.parent / shard)  # headers only: tensors are read when needed
        if key not in shards[shard].entries:
            raise _corrupt(index, what, f"tensor {key!r} is not in its shard '{shard}'")
    listed = set(weight_map)
    for shard, file in shards.items():
        extra = sorted(set(file.entries) - listed)
        if extra:
            raise _corrupt(index, what, f"shard '{shard}' holds tensors the index does not list, e.g. {extra[0]!r}")
    keys = list(weight_map)
    # Hugging Face writes the index with sorted keys: that order carries no model order.
    inferred = keys == sorted(keys)
    order = sorted(keys, key=_natural_key) if inferred else keys
    return _Source(str(index), _safetensors_tensors(list(shards.values()), order), order_inferred=inferred)


# ------------------------------------------------------------------------------------------------------- npz
@dataclass(frozen=True)
class _NpyMember:
    member: str  # name inside the zip archive
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    header_bytes: int
    refusal: str | None = None  # why the member is not decompressed (over the size bound, pickled objects)


class _NpzArchive:
    """An ``.npz`` archive with every member's declared size and ``.npy`` header checked; arrays read on demand."""

    def __init__(
        self,
        path: Path,
        error: type[Exception],
        *,
        max_bytes: int | None = None,
        bounded: Sequence[str] | None = None,
    ) -> None:
        """``max_bytes`` bounds the declared size of the members named in ``bounded`` (default all)."""
        self.path, self.error = path, error
        size = _regular_file(path, error).st_size
        what = "an .npz archive"
        try:
            with open(path, "rb") as handle:
                magic = handle.read(6)
            if magic == b"\x93NUMPY":
                raise error(
                    f"'{path}' is a single .npy array (numpy.save), not an .npz archive of named arrays; "
                    "save with numpy.savez(path, name=array, ...)"
                )
            with zipfile.ZipFile(path) as archive:
                if max_bytes is not None:  # before any member is opened: even a header read inflates
                    self._check_bound(archive.infolist(), max_bytes, bounded)
                self.members: dict[str, _NpyMember] = {}
                for entry in archive.infolist():
                    if not entry.filename.endswith(".npy"):
                        continue
                    refusal = self._check_size(entry, size)
                    with archive.open(entry) as stream:  # the header is the first few bytes, whatever the size
                        shape, fortran, dtype = _read_npy_header(stream)
                        header_bytes = stream.tell()
                    if dtype.hasobject:
                        refusal = "it holds Python objects (pickles); only numeric arrays are read"
                    declared = header_bytes + math.prod(shape) * dtype.itemsize
                    if declared != entry.file_size:
                        raise ValueError(
                            f"member {entry.filename!r}: its header gives {declared} bytes, "
                            f"the archive {entry.file_size}"
                        )
                    self.members[entry.filename[:-4]] = _NpyMember(
                        entry.filename, tuple(shape), dtype, fortran, header_bytes, refusal
                    )
        except error:
            raise
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, NotImplementedError) as exc:
            raise self._corrupt(what, exc) from None

    def _corrupt(self, what: str, exc: BaseException) -> Exception:
        if self.error is WeightFileError:
            return _corrupt(self.path, what, exc)
        return self.error(f"cannot read '{self.path}' as {what} (corrupt or truncated file?): {exc}")

    def _check_bound(self, entries: list[zipfile.ZipInfo], max_bytes: int, bounded: Sequence[str] | None) -> None:
        for entry in entries:
            key = entry.filename[:-4]
            if entry.filename.endswith(".npy") and (bounded is None or key in bounded) and entry.file_size > max_bytes:
                raise self.error(
                    f"'{self.path}': array {key!r} declares {entry.file_size} bytes uncompressed; "
                    f"at most {max_bytes} are allowed; it is not decompressed"
                )

    @staticmethod
    def _check_size(entry: zipfile.ZipInfo, archive_size: int) -> str | None:
        """Why a member must not be decompressed (its declared size), or None."""
        if entry.compress_size > archive_size:
            raise ValueError(
                f"member {entry.filename!r} declares {entry.compress_size} compressed bytes in a file of {archive_size}"
            )
        limit = max(NPZ_SMALL_MEMBER_BYTES, NPZ_MAX_EXPANSION * entry.compress_size)
        if entry.file_size <= limit:
            return None
        return (
            f"it declares {entry.file_size:,} bytes from {entry.compress_size:,} compressed "
            f"({entry.file_size / max(entry.compress_size, 1):,.0f}×), beyond the bound of {NPZ_MAX_EXPANSION}× its "
            f"compressed size or {NPZ_SMALL_MEMBER_BYTES // 2**20} MiB; it is not decompressed"
        )

    def read(self, key: str) -> np.ndarray:
        """Decompress one array: exactly its declared bytes, checked against the archive's CRC."""
        entry = self.members[key]
        if entry.refusal is not None:
            raise self.error(f"'{self.path}': array {key!r} is refused: {entry.refusal}")
        nbytes = math.prod(entry.shape) * entry.dtype.itemsize
        try:
            with zipfile.ZipFile(self.path) as archive, archive.open(entry.member) as stream:
                stream.read(entry.header_bytes)
                data = stream.read(nbytes)
                stream.read(1)  # reaching the end checks the CRC
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
            raise self._corrupt("an .npz archive", exc) from None
        if len(data) != nbytes:
            raise self.error(f"'{self.path}': array {key!r} ended after {len(data)} of {nbytes} bytes (truncated)")
        array = np.frombuffer(data, dtype=entry.dtype)
        if entry.fortran_order:
            return array.reshape(entry.shape[::-1]).transpose()
        return array.reshape(entry.shape)


def _read_npy_header(stream: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(stream)
    raise ValueError(f".npy format version {version} is not supported (1.0 and 2.0 are)")


def _npz_tensors(path: Path) -> list[_Tensor]:
    archive = _NpzArchive(path, WeightFileError)
    tensors = []
    for key, entry in archive.members.items():
        is_float = entry.dtype.kind == "f"
        tensor = _name_rule_tensor(key, entry.shape, str(entry.dtype), is_float, _bind(archive.read, key))
        if entry.refusal is not None:
            tensor.reason = (NPZ_REFUSED, f"not read: {entry.refusal}")
        tensors.append(tensor)
    return tensors


# ---------------------------------------------------------------------------------------- torch and mappings
def _torch_file_source(path: Path) -> _Source:
    _regular_file(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _corrupt(path, "a PyTorch file with torch.load(weights_only=True); save model.state_dict()", exc) from exc
    if not isinstance(loaded, Mapping):
        raise WeightFileError(
            f"'{path}' holds a {type(loaded).__name__}, not a state_dict; save model.state_dict() instead"
        )
    return _mapping_source(loaded, str(path), error=WeightFileError)


def _is_array(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def _mapping_source(mapping: Mapping, label: str, *, error: type[Exception]) -> _Source:
    """Find the state_dict in a mapping: the mapping itself, or a checkpoint entry holding one."""
    for key in _CHECKPOINT_KEYS:
        inner = mapping.get(key)
        if isinstance(inner, nn.Module):
            return _Source(label, _module_tensors(inner))
        if isinstance(inner, Mapping) and any(_is_array(value) for value in inner.values()):
            return _Source(label, _mapping_tensors(inner))
    if mapping and not any(_is_array(value) for value in mapping.values()):
        keys = list(mapping)[:10]
        raise error(
            f"{label} is not a state_dict: no tensor among its entries {keys}; expected names mapped to tensors, "
            f"or a checkpoint with one of the entries {list(_CHECKPOINT_KEYS)} holding them"
        )
    return _Source(label, _mapping_tensors(mapping))


def _name_rule_tensor(key: str, shape: tuple[int, ...], dtype: str, is_float: bool, load: Callable[[], Any]) -> _Tensor:
    """A tensor of a file or state_dict: its kind comes from its name and rank."""
    reason = None
    if not key.endswith("weight"):
        reason = (NOT_A_LAYER, "name does not end in 'weight'; only layer weights are compressed (include= selects it)")
    elif len(shape) == 2 and _EMBEDDING_NAME.search(key):
        reason = (EMBEDDING, "looks like an embedding table (by its name); embeddings are left uncompressed")
    return _Tensor(key, tuple(int(s) for s in shape), dtype, is_float, load, None, reason)


def _mapping_tensors(mapping: Mapping) -> list[_Tensor]:
    tensors = []
    for key, value in mapping.items():
        if isinstance(value, torch.Tensor):
            dtype = _TORCH_DTYPE_NAMES.get(value.dtype, str(value.dtype).removeprefix("torch."))
            tensors.append(_name_rule_tensor(str(key), tuple(value.shape), dtype, value.is_floating_point(),
                                             _constant(value)))  # fmt: skip
        elif isinstance(value, np.ndarray) and value.dtype.kind in "biufcUS":
            tensors.append(_name_rule_tensor(str(key), value.shape, str(value.dtype), value.dtype.kind == "f",
                                             _constant(value)))  # fmt: skip
        # anything else is checkpoint bookkeeping (epoch, config dicts, ...)
    return tensors


def _module_tensors(model: nn.Module) -> list[_Tensor]:
    owners = dict(model.named_modules(remove_duplicate=False))
    tensors = []
    for key, value in model.state_dict().items():
        if nn.parameter.is_lazy(value):
            continue  # an uninitialised lazy parameter has no shape yet
        owner_name, _, attribute = key.rpartition(".")
        owner = owners.get(owner_name)
        kind, reason = None, None
        if isinstance(owner, (nn.Conv1d, nn.Conv2d)) and attribute == "weight":
            kind = "conv2d" if isinstance(owner, nn.Conv2d) else "conv1d"
            if owner.groups != 1:
                reason = (GROUPED, f"grouped convolution (groups={owner.groups}) is left uncompressed")
        elif isinstance(owner, nn.Linear) and attribute == "weight":
            kind = "linear"
        elif isinstance(owner, (nn.Embedding, nn.EmbeddingBag)):
            reason = (EMBEDDING, f"embedding table (nn.{type(owner).__name__}) is left uncompressed")
        elif isinstance(owner, (nn.ConvTranspose1d, nn.ConvTranspose2d)):
            reason = (TRANSPOSED, f"transposed convolution (nn.{type(owner).__name__}) is not supported")
        else:
            reason = (
                NOT_A_LAYER,
                f"not the weight of an nn.Linear, nn.Conv1d or nn.Conv2d (it is {attribute!r} of "
                f"{type(owner).__name__ if owner is not None else 'an unknown module'}; include= selects it)",
            )
        dtype = _TORCH_DTYPE_NAMES.get(value.dtype, str(value.dtype).removeprefix("torch."))
        tensors.append(
            _Tensor(key, tuple(value.shape), dtype, value.is_floating_point(), _constant(value), kind, reason)
        )
    return tensors
