"""Save a quantized model as a compact file and load it back into a fresh instance of its architecture.

The file is a safetensors container (no pickle: loading it never runs code) holding

* per compressed layer: its codes bit-packed at ceil(log2 k) bits each (``<key>.codes``, uint8), its
  codebook (``<key>.codebook``) and, for d̃ < m, its projection (``<key>.projection``) at fp16, each with
  a power-of-two scale 2**e (the integer e is in the manifest; see :func:`~lr2vq_analysis.nn.fp16_exponent`);
* every other tensor of the model as it is (``<key>``), except that each batch norm is folded, by
  default, into two fp32 vectors ``<bn>.folded_scale`` and ``<bn>.folded_shift`` (the field's convention);
* metadata: the format name and version, a JSON manifest (layer shapes and plans, scales, folded batch
  norms) and a SHA-256 checksum over the manifest and every tensor's bytes.

So the file's payload matches :func:`~lr2vq_analysis.size.size_report` (codes differ only when k is not a
power of two: ceil(log2 k) stored bits against log2 k counted); the safetensors header (a few hundred
bytes per tensor) comes on top. The same model always gives the same bytes.

**Exactness.** Codebooks and projections are stored at fp16 times their scale.
:meth:`CompressedModel.quantize` already rounds them to that grid, and :meth:`CompressedModel.round_fp16_`
does it again after fine-tuning; then the loaded compressed layers equal the in-memory ones bit for bit.
The scale makes the range unlimited: weights at 1e6 do not overflow, weights at 1e-9 do not vanish.
A folded batch norm is restored as running mean 0, running variance 1 and an affine part that gives the
same function; its outputs agree to float32 rounding (~1e-7 relative), and in training mode it no longer
has the original statistics. ``fold_batchnorm=False`` stores the batch norms as they are, for
bit-identical outputs and a file two vectors per batch norm larger than the accounting.

**Checks.** :func:`save_compressed` refuses, before writing anything, a model whose stored weights would
be non-finite or all zero (:func:`check_reconstruction`). :func:`load_compressed` verifies the checksum and
then every manifest field's type and range and every tensor's dtype, shape and finiteness against it, so
a crafted file with a recomputed checksum is refused with :class:`~lr2vq_analysis.exceptions.CompressedFileError`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import stat
import struct
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._io import write_atomic
from .exceptions import (
    CompressedFileError,
    InvalidParameterError,
    InvalidWeightsError,
    NonFiniteError,
    StateError,
)
from .nn import (
    MAX_FP16_EXPONENT,
    CompressedModel,
    LayerState,
    _build,
    _check_plan,
    _LR2VQLayer,
    fp16_exponent,
    from_fp16,
    reconstruct_weight,
    to_fp16,
)
from .plan import LayerPlan
from .subvectors import n_subvectors, row_length

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "code_bits",
    "pack_codes",
    "unpack_codes",
    "save_compressed",
    "load_compressed",
    "check_reconstruction",
]

FORMAT_NAME = "lr2vq-compressed"
#: Version 2 adds the fp16 scale exponents; version-1 files (no scales, e = 0) are still read.
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_FOLDED_SUFFIXES = ("folded_scale", "folded_shift")
_METADATA_KEYS = ("checksum", "format", "manifest", "version")
_MANIFEST_KEYS = ("dense", "folded_batchnorms", "layers")
_LAYER_KEYS = {
    1: ("code_bits", "d_tilde", "k", "m", "shape"),
    2: ("code_bits", "codebook_exponent", "d_tilde", "k", "m", "projection_exponent", "shape"),
}
#: safetensors' names of the dtypes a model may hold.
_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


def code_bits(k: int) -> int:
    """Bits stored per code: ceil(log2 k) (1 for k = 2, 2 for k = 3, 11 for k = 2048).

    Examples
    --------
    >>> [code_bits(k) for k in (2, 3, 4, 256, 2048)]
    [1, 2, 2, 8, 11]
    """
    if int(k) < 2:
        raise InvalidParameterError(f"k={k!r} is invalid; k must be an integer >= 2")
    return (int(k) - 1).bit_length()


def pack_codes(codes: np.ndarray | list[int] | torch.Tensor, bits: int) -> np.ndarray:
    """Pack non-negative integer codes below 2**bits into ceil(len·bits/8) bytes (little-endian bit order).

    Examples
    --------
    >>> pack_codes([1, 2, 0, 3], 2)  # 01 | 10 << 2 | 00 << 4 | 11 << 6
    array([201], dtype=uint8)
    """
    values = np.asarray(codes, dtype=np.int64).ravel()
    if values.size and (values.min() < 0 or values.max() >= 1 << bits):
        raise InvalidParameterError(f"codes must lie in 0..{(1 << bits) - 1} to be packed at {bits} bits")
    bit_matrix = (values[:, None] >> np.arange(bits, dtype=np.int64)) & 1
    return np.packbits(bit_matrix.astype(np.uint8).ravel(), bitorder="little")


def unpack_codes(packed: np.ndarray | torch.Tensor, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``count`` int64 codes from the packed bytes.

    Examples
    --------
    >>> unpack_codes(pack_codes([5, 0, 7, 2], 3), 3, 4)
    array([5, 0, 7, 2])
    """
    packed = np.asarray(packed, dtype=np.uint8).ravel()
    expected = math.ceil(count * bits / 8)
    if packed.size != expected:
        raise CompressedFileError(f"{packed.size} bytes of codes; {count} codes at {bits} bits need {expected}")
    bit_matrix = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
    return bit_matrix.astype(np.int64) @ (np.int64(1) << np.arange(bits, dtype=np.int64))


def _checksum(manifest: str, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(manifest.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _batchnorms(module: nn.Module) -> Iterator[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """Batch norms that can be folded: affine, with running statistics."""
    for name, child in module.named_modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and child.affine and child.track_running_stats:
            yield name, child


def _prefixed(name: str, leaf: str) -> str:
    return f"{name}.{leaf}" if name else leaf


def _dense_entries(cmodel: CompressedModel, folded: list[str]) -> dict[str, torch.Tensor]:
    """State_dict entries stored as they are: all but the compressed layers' internals and folded batch norms."""
    layer_names = {key.rpartition(".")[0] for key in cmodel.plan}
    skipped_prefixes = set(folded)
    entries = {}
    for key, tensor in cmodel.module.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layer_names and leaf != "bias":
            continue
        if owner in skipped_prefixes:
            continue
        entries[key] = tensor
    return entries


def _check_weight(key: str, weight: torch.Tensor, where: str) -> None:
    """A stored weight must be finite and not all zeros (what a reload would compute with)."""
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        raise NonFiniteError(
            f"layer {key!r}: {where} weight holds {int((~finite).sum())} NaN/Inf value(s); "
            "re-quantize from finite weights (a diverged fine-tuning run is the usual cause)"
        )
    if not bool(weight.any()):
        raise InvalidWeightsError(f"layer {key!r}: {where} weight is all zeros; nothing of the layer would remain")


def check_reconstruction(cmodel: CompressedModel) -> None:
    """Check that a compressed model computes with finite values and no compressed layer is all zeros.

    :func:`save_compressed` runs it on the weights it is about to store; run it on a reloaded model
    before reporting that the file is usable (:func:`~lr2vq_analysis.skeleton.check_reload` does).

    Parameters
    ----------
    cmodel : CompressedModel
        The model to check, in any state.

    Raises
    ------
    NonFiniteError
        If a compressed layer's weight or any other floating-point tensor of the model holds NaN/Inf.
    InvalidWeightsError
        If a compressed layer's weight is all zeros.

    Examples
    --------
    >>> from lr2vq_analysis.nn import compress
    >>> torch.manual_seed(0) and None
    >>> cmodel = compress(torch.nn.Linear(8, 4), {"weight": LayerPlan(k=4, m=4)}).quantize(seed=0)
    >>> check_reconstruction(cmodel)
    >>> with torch.no_grad():
    ...     _ = cmodel.module.codebook.fill_(float("inf"))
    >>> check_reconstruction(cmodel)
    Traceback (most recent call last):
    ...
    lr2vq_analysis.exceptions.NonFiniteError: layer 'weight': the compressed weight holds 32 NaN/Inf value(s); ...
    """
    if not isinstance(cmodel, CompressedModel):
        raise InvalidParameterError(f"check_reconstruction needs a CompressedModel, got {type(cmodel).__name__}")
    with torch.no_grad():
        for key, layer in cmodel.compressed_layers().items():
            _check_weight(key, layer.weight, "the compressed")
        for name, tensor in cmodel.module.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise NonFiniteError(f"tensor {name!r} of the model holds NaN/Inf; the model cannot be used")


def _stored_layer(key: str, layer: _LR2VQLayer) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """A quantized layer's tensors as the file stores them, and its manifest entry."""
    if layer.state is not LayerState.QUANTIZED or layer.codes is None or layer.codebook is None:
        raise StateError(f"layer {key!r} is in state '{layer.state}'; call cmodel.quantize() before save_compressed")
    plan = layer.plan
    bits = code_bits(plan.k)
    tensors = {f"{key}.codes": torch.from_numpy(pack_codes(layer.codes.detach().cpu().numpy(), bits))}
    entry: dict[str, object] = {**plan.to_dict(), "shape": list(layer.weight_shape), "code_bits": bits}
    restored: dict[str, torch.Tensor | None] = {"codebook": None, "projection": None}
    for suffix, value in (("codebook", layer.codebook), ("projection", layer.P)):
        entry[f"{suffix}_exponent"] = None
        if value is None:
            continue
        exponent = fp16_exponent(value, name=key)  # NaN/Inf refused here, before anything is written
        half = to_fp16(value.cpu(), exponent)
        back = from_fp16(half, exponent, value.detach().cpu())
        if not torch.equal(back, value.detach().cpu()):
            warnings.warn(
                f"layer {key!r}: the {suffix} is not on the fp16 grid the file stores; the file stores it rounded. "
                "Call cmodel.round_fp16_() before saving to keep the in-memory model identical to the file",
                stacklevel=3,
            )
        restored[suffix] = back
        tensors[f"{key}.{suffix}"] = half
        entry[f"{suffix}_exponent"] = exponent
    codebook = restored["codebook"]
    assert codebook is not None
    weight = reconstruct_weight(codebook, restored["projection"], layer.weight_shape, layer.codes.cpu())
    _check_weight(key, weight, "the stored")
    return tensors, entry


def _safetensors_chunks(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Iterator[bytes]:
    """A safetensors file as chunks, with a canonical header (sorted keys) so equal content gives equal bytes.

    safetensors' own writer orders the metadata as a hash map does, which varies from run to run.
    Tensors are laid out by decreasing item size, then name, so every tensor stays aligned.
    """
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in _DTYPE_NAMES:
            raise InvalidParameterError(f"tensor {name!r} has dtype {tensor.dtype}, which the file format cannot store")
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    yield struct.pack("<Q", len(encoded)) + encoded
    for name in order:
        tensor = tensors[name].detach().cpu().contiguous()
        if tensor.numel():
            yield tensor.reshape(-1).view(torch.uint8).numpy().tobytes()


def save_compressed(cmodel: CompressedModel, path: str | os.PathLike[str], *, fold_batchnorm: bool = True) -> Path:
    """Write a quantized model to ``path`` (atomically): packed codes, fp16 codebooks, the other tensors.

    Parameters
    ----------
    cmodel : CompressedModel
        Every compressed layer must be in the ``"quantized"`` state.
    path : str or os.PathLike
        Destination (conventionally ``*.lr2vq``); written as :func:`~lr2vq_analysis._io.write_atomic`
        writes (temporary file and rename, the destination's permissions kept, a symbolic link written through).
    fold_batchnorm : bool, default True
        Store each batch norm as two vectors (scale and shift), as the size accounting counts it.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    InvalidParameterError
        If ``cmodel`` is not a CompressedModel.
    StateError
        If a layer is not quantized.
    NonFiniteError
        If a codebook, projection, stored weight or other tensor holds NaN/Inf (nothing is written).
    InvalidWeightsError
        If a compressed layer's stored weight is all zeros (nothing is written).

    Warns
    -----
    UserWarning
        If a codebook or projection is not on the stored fp16 grid (fine-tuned since quantize): the file
        stores it rounded; call ``cmodel.round_fp16_()`` first to keep the in-memory model identical to the file.

    Examples
    --------
    >>> import tempfile, pathlib, torch
    >>> from lr2vq_analysis.nn import compress
    >>> torch.manual_seed(0) and None
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> cmodel = compress(model, {"0.weight": LayerPlan(k=16, m=4, d_tilde=2)}).quantize(seed=0)
    >>> path = save_compressed(cmodel, pathlib.Path(tempfile.mkdtemp()) / "model.lr2vq")
    >>> skeleton = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> loaded = load_compressed(path, skeleton)
    >>> x = torch.randn(3, 16)
    >>> bool(torch.equal(loaded(x), cmodel(x)))
    True
    """
    if not isinstance(cmodel, CompressedModel):
        raise InvalidParameterError(
            f"save_compressed needs a CompressedModel (from compress()), got {type(cmodel).__name__}"
        )
    tensors: dict[str, torch.Tensor] = {}
    layers_manifest: dict[str, dict[str, object]] = {}
    for key, layer in cmodel.compressed_layers().items():
        layer_tensors, layers_manifest[key] = _stored_layer(key, layer)
        tensors.update(layer_tensors)
    folded: list[str] = []
    if fold_batchnorm:
        for name, bn in _batchnorms(cmodel.module):
            with torch.no_grad():
                inv_std = torch.rsqrt(_buffer(bn.running_var).double() + bn.eps)
                scale = bn.weight.double() * inv_std
                shift = bn.bias.double() - _buffer(bn.running_mean).double() * scale
            tensors[_prefixed(name, "folded_scale")] = scale.float().cpu()
            tensors[_prefixed(name, "folded_shift")] = shift.float().cpu()
            folded.append(name)
    dense = _dense_entries(cmodel, folded)
    clash = set(dense) & set(tensors)
    if clash:
        raise InvalidParameterError(f"state_dict keys {sorted(clash)} clash with the file's own tensor names")
    tensors.update({key: value.detach().cpu().contiguous() for key, value in dense.items()})
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"tensor {name!r} holds NaN/Inf; the saved model would not be usable")
    manifest = json.dumps(
        {"layers": layers_manifest, "folded_batchnorms": folded, "dense": list(dense)}, sort_keys=True
    )
    metadata = {
        "format": FORMAT_NAME,
        "version": str(FORMAT_VERSION),
        "manifest": manifest,
        "checksum": _checksum(manifest, tensors),
    }
    return write_atomic(path, _safetensors_chunks(tensors, metadata))


def _buffer(tensor: torch.Tensor | None) -> torch.Tensor:
    assert tensor is not None  # the batch norms folded or restored track running statistics
    return tensor


# -------------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True)
class _LayerEntry:
    """One compressed layer's manifest entry, checked."""

    plan: LayerPlan
    shape: tuple[int, ...]
    bits: int
    codebook_exponent: int
    projection_exponent: int | None

    @property
    def n_codes(self) -> int:
        return math.prod(self.shape) // self.plan.m


@dataclass(frozen=True)
class _Manifest:
    layers: dict[str, _LayerEntry]
    folded: list[str]
    dense: list[str]


class _Refuse:
    """Builds the CompressedFileError of one file: ``refuse(what)`` names the file and says what to do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, what: str) -> CompressedFileError:
        return CompressedFileError(
            f"{str(self.path)!r} is corrupt or not an LR²VQ file: {what}; re-create it with save_compressed"
        )


def _is_int(value: object) -> bool:
    return type(value) is int  # JSON integers only: no bool, no "32", no 32.0


def _int_field(entry: Mapping[str, object], field: str, low: int, high: int, where: str, refuse: _Refuse) -> int:
    value = entry[field]
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise refuse(f"{where}: {field}={value!r} is not an integer in {low}..{high}")
    return value


def _keys(value: object, expected: tuple[str, ...], where: str, refuse: _Refuse) -> Mapping[str, object]:
    if not isinstance(value, dict):
        raise refuse(f"{where} is a {type(value).__name__}, not a JSON object")
    missing, unknown = sorted(set(expected) - set(value)), sorted(set(value) - set(expected))
    if missing or unknown:
        raise refuse(f"{where} lacks the fields {missing} / has unknown fields {unknown[:5]}")
    return value


def _names(value: object, where: str, refuse: _Refuse) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value) or len(set(value)) != len(value):
        raise refuse(f"{where} is not a list of distinct tensor names")
    return list(value)


def _layer_entry(key: str, raw: object, version: int, refuse: _Refuse) -> _LayerEntry:
    where = f"layer {key!r}"
    entry = _keys(raw, _LAYER_KEYS[version], where, refuse)
    shape = entry["shape"]
    if not isinstance(shape, list) or not 2 <= len(shape) <= 4 or not all(_is_int(n) and n >= 1 for n in shape):
        raise refuse(f"{where}: shape={shape!r} is not a list of 2 to 4 positive integers")
    shape = tuple(shape)
    m = _int_field(entry, "m", 1, row_length(shape), where, refuse)
    if row_length(shape) % m:
        raise refuse(f"{where}: m={m} does not divide the row length {row_length(shape)}")
    k = _int_field(entry, "k", 2, n_subvectors(shape, m) - 1, where, refuse)
    d = _int_field(entry, "d_tilde", 1, m, where, refuse)
    bits = _int_field(entry, "code_bits", code_bits(k), code_bits(k), where, refuse)
    exponents = [0, None if d == m else 0]
    if version >= 2:
        exponents[0] = _int_field(entry, "codebook_exponent", -MAX_FP16_EXPONENT, MAX_FP16_EXPONENT, where, refuse)
        if d == m:
            if entry["projection_exponent"] is not None:
                raise refuse(f"{where}: projection_exponent must be null when d_tilde = m")
        else:
            exponents[1] = _int_field(
                entry, "projection_exponent", -MAX_FP16_EXPONENT, MAX_FP16_EXPONENT, where, refuse
            )
    try:
        plan = LayerPlan(k=k, m=m, d_tilde=d)
    except InvalidParameterError as exc:
        raise refuse(f"{where}: {exc}") from None
    return _LayerEntry(plan, shape, bits, exponents[0] or 0, exponents[1])


def _tensor(
    tensors: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype, shape: tuple[int, ...], refuse: _Refuse
) -> torch.Tensor:
    tensor = tensors.get(name)
    if tensor is None:
        raise refuse(f"tensor {name!r} is missing")
    if tensor.dtype != dtype or tuple(tensor.shape) != shape:
        raise refuse(f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}; expected {dtype} {shape}")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise refuse(f"tensor {name!r} holds NaN/Inf")
    return tensor


def _parse_manifest(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor], refuse: _Refuse) -> _Manifest:
    """Check every manifest field's type and range, and every tensor against it."""
    version = int(metadata["version"])
    try:
        raw = json.loads(metadata["manifest"])
    except ValueError as exc:
        raise refuse(f"its manifest is not JSON ({exc})") from None
    manifest = _keys(raw, _MANIFEST_KEYS, "the manifest", refuse)
    layers_raw = manifest["layers"]
    if not isinstance(layers_raw, dict) or not layers_raw:
        raise refuse("the manifest's layers field is not a non-empty JSON object")
    layers = {key: _layer_entry(key, entry, version, refuse) for key, entry in layers_raw.items()}
    folded = _names(manifest["folded_batchnorms"], "the manifest's folded_batchnorms", refuse)
    dense = _names(manifest["dense"], "the manifest's dense", refuse)
    expected = set(dense)
    for key, entry in layers.items():
        plan = entry.plan
        _tensor(tensors, f"{key}.codes", torch.uint8, (math.ceil(entry.n_codes * entry.bits / 8),), refuse)
        _tensor(tensors, f"{key}.codebook", torch.float16, (plan.k, plan.d_tilde), refuse)
        expected |= {f"{key}.codes", f"{key}.codebook"}
        if not plan.is_pq:
            _tensor(tensors, f"{key}.projection", torch.float16, (plan.d_tilde, plan.m), refuse)
            expected.add(f"{key}.projection")
    for name in folded:
        scale = tensors.get(_prefixed(name, "folded_scale"))
        channels = (scale.numel(),) if scale is not None else (0,)
        for suffix in _FOLDED_SUFFIXES:
            _tensor(tensors, _prefixed(name, suffix), torch.float32, channels, refuse)
            expected.add(_prefixed(name, suffix))
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise refuse(f"tensors {missing[:5]} are missing, tensors {unexpected[:5]} are not in the manifest")
    if len(expected) != len(dense) + sum(3 - entry.plan.is_pq for entry in layers.values()) + 2 * len(folded):
        raise refuse("the manifest names one tensor twice")
    return _Manifest(layers, folded, dense)


def _read_payload(path: Path) -> bytearray:
    """The file's bytes, read once into one writable buffer (the tensors become views of it)."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
        with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise CompressedFileError(f"{str(path)!r} is not a regular file; give the path of a .lr2vq file")
            payload = bytearray(info.st_size)
            read = handle.readinto(payload)
    except CompressedFileError:
        raise
    except OSError as exc:
        raise CompressedFileError(f"cannot read {str(path)!r}: {exc}") from None
    if read != len(payload):
        raise CompressedFileError(f"{str(path)!r} changed size while it was read; read it again")
    return payload


def _tensor_views(
    payload: bytearray, header: Mapping[str, object], start: int, refuse: _Refuse
) -> dict[str, torch.Tensor]:
    """The tensors a safetensors header describes, as views of ``payload`` (no copy), checked like safetensors does."""
    entries = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise refuse(f"tensor {name!r} has a malformed header entry")
        dtype, shape, offsets = _DTYPES.get(entry["dtype"]), entry["shape"], entry["data_offsets"]
        if dtype is None:
            raise refuse(f"tensor {name!r} has the unsupported dtype {entry['dtype']!r}")
        if not isinstance(shape, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        ):
            raise refuse(f"tensor {name!r} has the shape {shape!r}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(n, int) for n in offsets):
            raise refuse(f"tensor {name!r} has the data offsets {offsets!r}")
        size = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != size:
            raise refuse(f"tensor {name!r} occupies {offsets[1] - offsets[0]} bytes; its dtype and shape need {size}")
        entries.append((offsets[0], offsets[1], name, dtype, tuple(shape)))
    entries.sort(key=lambda entry: (entry[0], entry[1]))
    position = 0
    for begin, end, name, _, _ in entries:
        if begin != position:
            raise refuse(f"tensor {name!r} overlaps another or leaves a gap (offset {begin}, expected {position})")
        position = end
    if start + position != len(payload):
        raise CompressedFileError(
            f"{str(refuse.path)!r} is truncated or padded: {len(payload)} bytes, "
            f"the header describes {start + position}"
        )
    tensors = {}
    for begin, end, name, dtype, shape in entries:
        offset, count = start + begin, math.prod(shape)
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        elif offset % dtype.itemsize:  # unaligned (a foreign writer): copy this one tensor
            tensors[name] = torch.frombuffer(bytearray(payload[offset : start + end]), dtype=dtype).reshape(shape)
        else:
            tensors[name] = torch.frombuffer(payload, dtype=dtype, count=count, offset=offset).reshape(shape)
    return tensors


def _read(path: str | os.PathLike[str]) -> tuple[_Manifest, dict[str, torch.Tensor]]:
    """Read and verify a file: its checked manifest and tensors, or CompressedFileError naming what is wrong.

    The file is read once into memory; the tensors are views of that buffer, so reading needs about the
    file's size.
    """
    path = Path(path)
    refuse = _Refuse(path)
    payload = _read_payload(path)
    if len(payload) < 8:
        raise CompressedFileError(f"{str(path)!r} is truncated or not an LR²VQ file ({len(payload)} bytes)")
    (header_length,) = struct.unpack("<Q", payload[:8])
    if 8 + header_length > len(payload):
        raise CompressedFileError(f"{str(path)!r} is truncated: its header claims {header_length} bytes")
    try:
        header = json.loads(payload[8 : 8 + header_length])
        metadata = header["__metadata__"]
    except (ValueError, KeyError, TypeError) as exc:
        raise refuse(f"unreadable header ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict) or not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise CompressedFileError(f"{str(path)!r} is not an LR²VQ file (format {found!r})")
    if metadata.get("version") not in [str(version) for version in _READABLE_VERSIONS]:
        raise CompressedFileError(
            f"{str(path)!r} has format version {metadata.get('version')!r}; this package reads versions "
            f"{list(_READABLE_VERSIONS)}"
        )
    _keys(metadata, _METADATA_KEYS, "the metadata", refuse)
    if not all(isinstance(value, str) for value in metadata.values()):
        raise refuse("a metadata field is not a string")
    tensors = _tensor_views(payload, header, 8 + header_length, refuse)
    if _checksum(metadata["manifest"], tensors) != metadata["checksum"]:
        raise CompressedFileError(f"{str(path)!r} is corrupt: its checksum does not match its contents")
    return _parse_manifest(metadata, tensors, refuse), tensors


def load_compressed(path: str | os.PathLike[str], skeleton: nn.Module) -> CompressedModel:
    """Rebuild a compressed model from a file written by :func:`save_compressed`.

    Memory: the file's bytes once (the tensors are views of them) plus one copy of the skeleton without
    the planned layers' dense weights (they are never allocated); nothing is factorised or clustered.

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    skeleton : torch.nn.Module
        A fresh instance of the original (uncompressed) architecture; it is copied, not modified, and its
        weights are irrelevant. The result keeps its training/eval mode, as ``load_state_dict`` does: call
        ``.eval()`` on the skeleton (or the result) for inference.

    Returns
    -------
    CompressedModel
        Its layers are in the ``"quantized"`` state; its outputs equal those of the saved model (see the
        module docstring for folded batch norms).

    Raises
    ------
    CompressedFileError
        If the file is missing, not a regular file, truncated, corrupt (checksum), of another format or
        version, or if a manifest field or tensor has the wrong type, range, dtype or shape, a NaN, or a
        code beyond k (a crafted file with a recomputed checksum).
    InvalidParameterError
        If the skeleton does not match the file (a layer or tensor missing, a shape differs).
    """
    manifest, tensors = _read(path)
    refuse = _Refuse(Path(path))
    label = f"skeleton {type(skeleton).__name__} does not match {str(path)!r}"
    plan = {key: entry.plan for key, entry in manifest.layers.items()}
    skeleton_state = skeleton.state_dict(keep_vars=True)
    for key, entry in manifest.layers.items():
        if key in skeleton_state and tuple(skeleton_state[key].shape) != entry.shape:
            raise InvalidParameterError(
                f"{label}: layer {key!r} has shape {tuple(skeleton_state[key].shape)} in the skeleton, "
                f"{entry.shape} in the file"
            )
    try:
        checked = _check_plan(skeleton, plan)
    except (InvalidParameterError, InvalidWeightsError) as exc:
        raise InvalidParameterError(f"{label}: {exc}") from None
    codes = {}
    for key, entry in manifest.layers.items():
        unpacked = torch.from_numpy(unpack_codes(tensors[f"{key}.codes"].numpy(), entry.bits, entry.n_codes))
        if entry.n_codes and int(unpacked.max()) >= entry.plan.k:
            raise refuse(f"layer {key!r} has codes up to {int(unpacked.max())}, beyond k - 1 = {entry.plan.k - 1}")
        codes[key] = unpacked
    # Copy the skeleton without the planned layers' dense weights: they would be replaced at once.
    memo: dict[int, object] = {
        id(skeleton_state[key]): nn.Parameter(torch.empty_like(skeleton_state[key], device="meta")) for key in checked
    }
    module = copy.deepcopy(skeleton, memo)

    def make(kind: type[_LR2VQLayer], dense: nn.Linear | nn.Conv1d | nn.Conv2d, key: str) -> _LR2VQLayer:
        entry, like = manifest.layers[key], skeleton_state[key]
        codebook = from_fp16(tensors.pop(f"{key}.codebook"), entry.codebook_exponent, like)
        projection = tensors.pop(f"{key}.projection", None)
        if projection is not None and entry.projection_exponent is not None:
            projection = from_fp16(projection, entry.projection_exponent, like)
        return kind._shell(dense, checked[key], key).set_quantized(codes.pop(key), codebook, projection, like=like)

    cmodel = _build(module, checked, make)
    _load_dense(cmodel, manifest, tensors, label)
    return cmodel


def _load_dense(cmodel: CompressedModel, manifest: _Manifest, tensors: dict[str, torch.Tensor], label: str) -> None:
    """Copy the uncompressed tensors and unfold the folded batch norms into the model, checking they match."""
    folded = manifest.folded
    batchnorms = dict(_batchnorms(cmodel.module))
    missing_bn = [name for name in folded if name not in batchnorms]
    if missing_bn:
        raise InvalidParameterError(f"{label}: batch norms {missing_bn} are missing from the skeleton")
    expected = _dense_entries(cmodel, folded)
    stored = manifest.dense
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise InvalidParameterError(
            f"{label}: tensors missing from the file {missing[:10]}, tensors the skeleton lacks {unexpected[:10]}"
        )
    with torch.no_grad():
        for key, target in expected.items():
            value = tensors[key]
            if tuple(value.shape) != tuple(target.shape):
                raise InvalidParameterError(
                    f"{label}: tensor {key!r} has shape {tuple(target.shape)} in the skeleton, "
                    f"{tuple(value.shape)} in the file"
                )
            target.copy_(value)
        for name in folded:
            bn = batchnorms[name]
            scale, shift = (tensors[_prefixed(name, suffix)] for suffix in _FOLDED_SUFFIXES)
            if tuple(scale.shape) != tuple(bn.weight.shape):
                raise InvalidParameterError(
                    f"{label}: batch norm {name!r} has {bn.weight.shape[0]} channels in the skeleton, "
                    f"{scale.shape[0]} in the file"
                )
            # Running statistics (0, 1): the affine part must undo the 1/sqrt(1 + eps) the layer still applies.
            bn.weight.copy_(scale.double() * math.sqrt(1.0 + bn.eps))
            bn.bias.copy_(shift)
            _buffer(bn.running_mean).zero_()
            _buffer(bn.running_var).fill_(1.0)
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.zero_()
