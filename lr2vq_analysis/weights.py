"""Load the compressible layers of a model: Conv2d, Conv1d and Linear weights, in model order.

A source is an ``nn.Module``, a state_dict (a mapping of names to tensors or arrays), a weight file
(``.pt``/``.pth``/``.bin``, ``.safetensors``, ``.npz``) or the name of a bundled model. Every tensor of
rank 2 to 4 that is not returned is listed in :attr:`WeightSet.skipped` with the reason, so nothing
is dropped silently.

How a layer's kind is decided:

- from an ``nn.Module``: from the module that owns the weight (``nn.Conv2d`` → ``"conv2d"``,
  ``nn.Conv1d`` → ``"conv1d"``, ``nn.Linear`` → ``"linear"``); grouped and depthwise convolutions,
  embeddings and other module types are skipped;
- from a state_dict or a file: from the rank (4-D conv2d, 3-D conv1d, 2-D linear) of every
  floating-point tensor whose name ends in ``weight``; 2-D tensors named like an embedding table
  (the name contains ``embed``, or is GPT-2's ``wte``/``wpe``) are skipped. A state_dict does not
  record ``groups``: pass the ``nn.Module`` to have grouped convolutions recognised.

Model order is the state_dict order; ``.safetensors`` files do not record it, so their layers come
in natural key order (``layer.2`` before ``layer.10``).
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._validation import InvalidParameterError, InvalidWeightsError, WeightFileError, check_finite, check_m
from .registry import model_names, weights_path
from .subvectors import row_length

__all__ = [
    "BUNDLED_MODELS",
    "SUPPORTED_EXTENSIONS",
    "LayerInfo",
    "WeightSet",
    "bundled_model_path",
    "load_state_dict",
    "load_weights",
]

#: Names accepted by :func:`load_weights` and :func:`bundled_model_path` (the :mod:`~lr2vq_analysis.registry`).
BUNDLED_MODELS: tuple[str, ...] = model_names()

_TORCH_EXTENSIONS = (".pt", ".pth", ".bin")
#: File extensions :func:`load_weights` reads (``.bin`` is a PyTorch file, as Hugging Face names them).
SUPPORTED_EXTENSIONS: tuple[str, ...] = (*_TORCH_EXTENSIONS, ".safetensors", ".npz")
#: Checkpoint entries that may hold the state_dict, tried in this order.
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")

_KIND_BY_RANK = {4: "conv2d", 3: "conv1d", 2: "linear"}
_ROW_LENGTH_MEANING = {"conv2d": "C_in·kh·kw", "conv1d": "C_in·k", "linear": "in_features"}
_EMBEDDING_NAME = re.compile(r"embed|(^|\.)(wte|wpe)\.weight$", re.IGNORECASE)
_FIRST_CONV_REASON = "first convolution is kept uncompressed, as in PQF (pass keep_first_conv=True to include it)"


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
    """

    name: str
    kind: str
    shape: tuple[int, ...]

    @property
    def row_length(self) -> int:
        """Weights per output channel (C_in·kh·kw, C_in·k or in_features): what m must divide."""
        return row_length(self.shape)

    @property
    def size(self) -> int:
        """Number of weights in the layer."""
        return int(np.prod(self.shape))


class WeightSet(Mapping[str, np.ndarray]):
    """The compressible layers of a model: an ordered, read-only mapping of name to float32 array.

    Iteration follows model order. Arrays keep the layer's original shape.

    Attributes
    ----------
    info : dict of str to LayerInfo
        Name, kind and shape of every layer, in the same order.
    skipped : dict of str to str
        Every rank-2..4 tensor that is not a layer here, with the reason.
    source : str
        What was loaded (a path, a bundled model name, ``"state_dict"`` or the module's class).
    """

    def __init__(
        self,
        layers: Mapping[str, np.ndarray],
        info: Mapping[str, LayerInfo],
        skipped: Mapping[str, str] | None = None,
        source: str = "",
    ) -> None:
        if list(layers) != list(info):
            raise ValueError("layers and info must hold the same names in the same order")
        self._layers = dict(layers)
        self.info: dict[str, LayerInfo] = dict(info)
        self.skipped: dict[str, str] = dict(skipped or {})
        self.source = source

    def __getitem__(self, name: str) -> np.ndarray:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    @property
    def n_weights(self) -> int:
        """Total number of weights in the layers (skipped tensors not counted)."""
        return sum(info.size for info in self.info.values())

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
          0.weight  first convolution is kept uncompressed, as in PQF (pass keep_first_conv=True to include it)
        """
        width = max((len(name) for name in [*self.info, *self.skipped]), default=0)
        lines = [f"layers ({len(self)}):"]
        lines += [f"  {name:<{width}}  {info.kind:<6}  {info.shape}" for name, info in self.info.items()]
        if self.skipped:
            lines.append(f"skipped ({len(self.skipped)}):")
            lines += [f"  {name:<{width}}  {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


@dataclass
class _Tensor:
    """One candidate tensor of a source, read lazily (a safetensors file is only read where needed)."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    is_float: bool
    load: Callable[[], torch.Tensor]  # the tensor in its stored dtype; may share memory with the source
    kind: str | None = None  # known from the owning module, else decided from the rank
    reason: str | None = None  # why the source says it is not compressible
    is_conv: bool = False  # counts for the first-conv rule

    def read(self) -> np.ndarray:
        """Return the tensor as a float32 numpy array that shares no memory with the source."""
        return self.load().detach().to(device="cpu", dtype=torch.float32, copy=True).numpy()


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

    Parameters
    ----------
    source : str, os.PathLike, torch.nn.Module or Mapping
        A weight file (``.pt``, ``.pth``, ``.bin``, ``.safetensors``, ``.npz``), a bundled model
        name (see :data:`BUNDLED_MODELS`), a module, or a state_dict mapping names to tensors or
        arrays. A PyTorch file (read with ``torch.load(weights_only=True)``) or a mapping may also
        be a checkpoint whose ``"state_dict"``, ``"model_state_dict"`` or ``"model"`` entry holds
        the state_dict.
    m : int, optional
        Subvector size. Layers whose row length it does not divide are skipped, with the reason.
    include, exclude : str or list of str, optional
        ``fnmatch`` globs (case-sensitive) on the name; a layer matches when the full key
        (``"layer1.0.conv1.weight"``) or the key without ``".weight"`` matches. With ``include``,
        only matching layers are kept (an empty list means no filter); ``exclude`` drops matches.
    min_size : int, default 0
        Layers with fewer weights are skipped.
    keep_first_conv : bool, default False
        By default the first convolution (the first 3-D or 4-D weight in model order) is skipped,
        as PQF and the field leave it uncompressed.

    Returns
    -------
    WeightSet
        Name → float32 array (bf16/fp16 converted), plus ``info`` and ``skipped``.

    Raises
    ------
    WeightFileError
        If a file is missing, has an unsupported extension, or is corrupt or truncated.
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
    'first convolution is kept uncompressed, as in PQF (pass keep_first_conv=True to include it)'
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
    with ExitStack() as stack:
        label, tensors = _open_source(source, stack)
        return _select(
            tensors,
            label=label,
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
    with the source.

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
    with ExitStack() as stack:
        _, tensors = _open_source(source, stack)
        return {tensor.key: tensor.load().detach().clone() for tensor in tensors}


# --------------------------------------------------------------------------------------------- selection
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


def _structural_reason(tensor: _Tensor) -> tuple[str | None, str | None]:
    """Return (kind, reason): the kind if the tensor is a layer weight at all, else why not."""
    if not tensor.is_float:
        return None, f"dtype {tensor.dtype} is not a floating-point type"
    if tensor.reason is not None:
        return None, tensor.reason
    if tensor.kind is not None:
        return tensor.kind, None
    if not tensor.key.endswith("weight"):
        return None, "name does not end in 'weight'; only layer weights are compressed"
    if len(tensor.shape) == 2 and _EMBEDDING_NAME.search(tensor.key):
        return None, "looks like an embedding table (by its name); embeddings are left uncompressed"
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
) -> str | None:
    for pattern in exclude:
        if _matches(key, pattern):
            return f"excluded by exclude pattern {pattern!r}"
    if include and not any(_matches(key, pattern) for pattern in include):
        return f"not matched by include patterns {list(include)}"
    size = int(np.prod(shape))
    if size < min_size:
        return f"{size} weights, fewer than min_size={min_size}"
    if m is not None and row_length(shape) % m:
        return f"row length {row_length(shape)} ({_ROW_LENGTH_MEANING[kind]}) is not divisible by m={m}"
    return None


def _select(
    tensors: Iterable[_Tensor],
    *,
    label: str,
    m: int | None,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    min_size: int,
    keep_first_conv: bool,
) -> WeightSet:
    layers: dict[str, np.ndarray] = {}
    info: dict[str, LayerInfo] = {}
    skipped: dict[str, str] = {}
    first_conv_seen = False
    for tensor in tensors:
        if not 2 <= len(tensor.shape) <= 4:
            continue  # biases, norms, scalars: not layers, nothing to report
        kind, reason = _structural_reason(tensor)
        if tensor.is_conv and not first_conv_seen:
            first_conv_seen = True
            if reason is None and not keep_first_conv:
                reason = _FIRST_CONV_REASON
        if reason is None:
            assert kind is not None
            reason = _filter_reason(
                tensor.key, kind, tensor.shape, m=m, include=include, exclude=exclude, min_size=min_size
            )
        if reason is None:
            array = tensor.read()
            if not array.any():  # NaN counts as non-zero, so NaN layers reach check_finite below
                reason = "all weights are zero; relative errors are undefined"
            else:
                check_finite(array, name=tensor.key)
        if reason is not None:
            skipped[tensor.key] = reason
            continue
        assert kind is not None
        layers[tensor.key] = array
        info[tensor.key] = LayerInfo(tensor.key, kind, tuple(int(s) for s in tensor.shape))
    if not layers:
        shown = "; ".join(f"{key}: {reason}" for key, reason in list(skipped.items())[:8])
        more = f"; and {len(skipped) - 8} more" if len(skipped) > 8 else ""
        detail = f" ({len(skipped)} tensors skipped: {shown}{more})" if skipped else ""
        raise InvalidWeightsError(
            f"empty model: {label} has no compressible layer (Conv2d, Conv1d or Linear weight){detail}"
        )
    return WeightSet(layers, info, skipped, source=label)


# ------------------------------------------------------------------------------------------------ sources
def _open_source(source: Any, stack: ExitStack) -> tuple[str, list[_Tensor]]:
    if isinstance(source, nn.Module):
        return f"{type(source).__name__} (nn.Module)", _module_tensors(source)
    if isinstance(source, Mapping):
        return _mapping_source(source, "state_dict", error=InvalidWeightsError)
    if isinstance(source, (str, os.PathLike)):
        if isinstance(source, str) and source in BUNDLED_MODELS and not os.path.exists(source):
            path = bundled_model_path(source)
            if not path.is_file():
                raise WeightFileError(
                    f"the file of bundled model {source!r} is missing: {path}; "
                    "reinstall the package or run its training script in scripts/"
                )
            return source, _safetensors_tensors(path, stack)
        return _file_source(Path(source).expanduser(), stack)
    raise InvalidParameterError(
        f"source of type {type(source).__name__} is not supported; pass a file path "
        f"({', '.join(SUPPORTED_EXTENSIONS)}), a bundled model name {list(BUNDLED_MODELS)}, "
        "an nn.Module or a state_dict"
    )


def _file_source(path: Path, stack: ExitStack) -> tuple[str, list[_Tensor]]:
    label = str(path)
    if not path.exists():
        hint = "" if path.suffix else f" (nor a bundled model: those are {list(BUNDLED_MODELS)})"
        # (errno, message, filename) gives FileNotFoundError's attributes and "[Errno 2] ...: 'path'"
        raise WeightFileError(errno.ENOENT, f"no such file{hint}", str(path))
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in SUPPORTED_EXTENSIONS)
        raise WeightFileError(
            f"'{path}' is a directory; pass one weight file inside it"
            + (f" (candidates: {inside})" if inside else f" (none found with extensions {list(SUPPORTED_EXTENSIONS)})")
        )
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise WeightFileError(
            f"unsupported file extension {path.suffix!r} of '{path}'; supported extensions are "
            f"{list(SUPPORTED_EXTENSIONS)}"
        )
    if suffix == ".safetensors":
        return label, _safetensors_tensors(path, stack)
    if suffix == ".npz":
        return label, _npz_tensors(path)
    return _torch_file_tensors(path)


def _corrupt(path: Path, what: str, exc: BaseException) -> WeightFileError:
    detail = str(exc).strip()
    # torch's weights_only message is long; its cause sits after "WeightsUnpickler error:"
    marker = "WeightsUnpickler error:"
    if marker in detail:
        detail = detail.split(marker, 1)[1].split("Check the documentation", 1)[0].strip()
    detail = " ".join(detail.split())[:300]
    return WeightFileError(
        f"cannot read '{path}' as {what} (corrupt or truncated file?): {type(exc).__name__}: {detail}"
    )


def _natural_key(key: str) -> list[Any]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", key)]


def _safetensors_tensors(path: Path, stack: ExitStack) -> list[_Tensor]:
    from safetensors import safe_open

    what = "a safetensors file"
    try:
        handle = stack.enter_context(safe_open(str(path), framework="pt"))
        keys = sorted(handle.keys(), key=_natural_key)
        headers = {key: handle.get_slice(key) for key in keys}
    except Exception as exc:  # the Rust reader raises SafetensorError and others for any damage
        raise _corrupt(path, what, exc) from exc

    def reader(key: str) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            try:
                return handle.get_tensor(key)
            except Exception as exc:
                raise _corrupt(path, what, exc) from exc

        return load

    tensors = []
    for key in keys:
        dtype = str(headers[key].get_dtype())
        shape = tuple(int(s) for s in headers[key].get_shape())
        is_float = dtype.startswith(("F", "BF"))  # F16, F32, F64, BF16, F8_*
        tensors.append(
            _Tensor(key, shape, dtype, is_float, reader(key), is_conv=_looks_like_conv(key, shape, is_float))
        )
    return tensors


def _npz_tensors(path: Path) -> list[_Tensor]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except AttributeError as exc:  # np.load returned a bare array: a .npy file, not an archive
        raise WeightFileError(f"'{path}' is a single .npy array, not an .npz archive of named arrays") from exc
    except Exception as exc:  # zipfile, zlib and numpy's format errors
        raise _corrupt(path, "an .npz archive", exc) from exc
    return _mapping_tensors(arrays)


def _torch_file_tensors(path: Path) -> tuple[str, list[_Tensor]]:
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


def _mapping_source(mapping: Mapping, label: str, *, error: type[Exception]) -> tuple[str, list[_Tensor]]:
    """Find the state_dict in a mapping: the mapping itself, or a checkpoint entry holding one."""
    for key in _CHECKPOINT_KEYS:
        inner = mapping.get(key)
        if isinstance(inner, nn.Module):
            return label, _module_tensors(inner)
        if isinstance(inner, Mapping) and any(_is_array(value) for value in inner.values()):
            return label, _mapping_tensors(inner)
    if mapping and not any(_is_array(value) for value in mapping.values()):
        keys = list(mapping)[:10]
        raise error(
            f"{label} is not a state_dict: no tensor among its entries {keys}; expected names mapped to tensors, "
            f"or a checkpoint with one of the entries {list(_CHECKPOINT_KEYS)} holding them"
        )
    return label, _mapping_tensors(mapping)


def _looks_like_conv(key: str, shape: tuple[int, ...], is_float: bool) -> bool:
    return is_float and len(shape) in (3, 4) and key.endswith("weight")


def _loader(value: torch.Tensor | np.ndarray) -> Callable[[], torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return lambda: value
    return lambda: torch.from_numpy(np.array(value, copy=True))  # a copy: the array may be read-only


def _mapping_tensors(mapping: Mapping) -> list[_Tensor]:
    tensors = []
    for key, value in mapping.items():
        if not _is_array(value) or (isinstance(value, np.ndarray) and value.dtype.kind not in "biuf"):
            continue  # checkpoint bookkeeping (epoch, config strings, ...)
        if isinstance(value, torch.Tensor):
            shape, dtype, is_float = tuple(value.shape), str(value.dtype), value.is_floating_point()
        else:
            shape, dtype, is_float = value.shape, str(value.dtype), value.dtype.kind == "f"
        key = str(key)
        tensors.append(
            _Tensor(key, shape, dtype, is_float, _loader(value), is_conv=_looks_like_conv(key, shape, is_float))
        )
    return tensors


def _module_tensors(model: nn.Module) -> list[_Tensor]:
    owners = dict(model.named_modules(remove_duplicate=False))
    tensors = []
    for key, value in model.state_dict().items():
        if nn.parameter.is_lazy(value):
            continue  # an uninitialised lazy parameter has no shape yet
        owner_name, _, attribute = key.rpartition(".")
        owner = owners.get(owner_name)
        kind, reason, is_conv = None, None, False
        if isinstance(owner, (nn.Conv1d, nn.Conv2d)) and attribute == "weight":
            kind, is_conv = ("conv2d" if isinstance(owner, nn.Conv2d) else "conv1d"), True
            if owner.groups != 1:
                reason = f"grouped convolution (groups={owner.groups}) is left uncompressed"
        elif isinstance(owner, nn.Linear) and attribute == "weight":
            kind = "linear"
        elif isinstance(owner, (nn.Embedding, nn.EmbeddingBag)):
            reason = f"embedding table (nn.{type(owner).__name__}) is left uncompressed"
        elif isinstance(owner, (nn.ConvTranspose1d, nn.ConvTranspose2d)):
            reason = f"transposed convolution (nn.{type(owner).__name__}) is not supported"
        else:
            reason = (
                f"not the weight of an nn.Linear, nn.Conv1d or nn.Conv2d "
                f"(it is {attribute!r} of {type(owner).__name__ if owner is not None else 'an unknown module'})"
            )
        is_float = value.is_floating_point()
        tensors.append(
            _Tensor(key, tuple(value.shape), str(value.dtype), is_float, _loader(value), kind, reason, is_conv)
        )
    return tensors
