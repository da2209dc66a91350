"""Save a quantized model as a compact file and load it back into a fresh instance of its architecture.

The file is a safetensors container (no pickle: loading it never runs code) holding

* per compressed layer: its codes bit-packed at ceil(log2 k) bits each (``<key>.codes``, uint8), its
  codebook (``<key>.codebook``) and, for d̃ < m, its projection (``<key>.projection``) at fp16;
* every other tensor of the model as it is (``<key>``), except that each batch norm is folded, by
  default, into two fp32 vectors ``<bn>.folded_scale`` and ``<bn>.folded_shift`` (the field's convention);
* metadata: the format name and version, a JSON manifest (layer shapes and plans, folded batch norms)
  and a SHA-256 checksum over the manifest and every tensor's bytes.

So the file's payload matches :func:`~lr2vq_analysis.size.size_report` (codes differ only when k is not a
power of two: ceil(log2 k) stored bits against log2 k counted); the safetensors header (a few hundred
bytes per tensor) comes on top.

**Exactness.** Codebooks and projections are stored at fp16. :meth:`CompressedModel.quantize` already
rounds them to fp16-representable values, and :meth:`CompressedModel.round_fp16_` does it again after
fine-tuning; then the loaded compressed layers equal the in-memory ones bit for bit. A folded batch norm
is restored as running mean 0, running variance 1 and an affine part that gives the same function; its
outputs agree to float32 rounding (~1e-7 relative), and in training mode it no longer has the original
statistics. ``fold_batchnorm=False`` stores the batch norms as they are, for bit-identical outputs and a
file two vectors per batch norm larger than the accounting.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from ._io import write_atomic
from ._validation import InvalidParameterError, WeightFileError
from .nn import CompressedModel, _LR2VQLayer, compress
from .plan import LayerPlan

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "code_bits",
    "pack_codes",
    "unpack_codes",
    "save_compressed",
    "load_compressed",
]

FORMAT_NAME = "lr2vq-compressed"
FORMAT_VERSION = 1
_LAYER_SUFFIXES = ("codes", "codebook", "projection")
_FOLDED_SUFFIXES = ("folded_scale", "folded_shift")


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


def pack_codes(codes: Any, bits: int) -> np.ndarray:
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


def unpack_codes(packed: Any, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``count`` int64 codes from the packed bytes.

    Examples
    --------
    >>> unpack_codes(pack_codes([5, 0, 7, 2], 3), 3, 4)
    array([5, 0, 7, 2])
    """
    packed = np.asarray(packed, dtype=np.uint8).ravel()
    expected = math.ceil(count * bits / 8)
    if packed.size != expected:
        raise WeightFileError(f"{packed.size} bytes of codes; {count} codes at {bits} bits need {expected}")
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


def save_compressed(cmodel: CompressedModel, path: str | os.PathLike[str], *, fold_batchnorm: bool = True) -> Path:
    """Write a quantized model to ``path`` (atomically): packed codes, fp16 codebooks, the other tensors.

    Parameters
    ----------
    cmodel : CompressedModel
        Every compressed layer must be in the ``"quantized"`` state.
    path : str or os.PathLike
        Destination (conventionally ``*.lr2vq``).
    fold_batchnorm : bool, default True
        Store each batch norm as two vectors (scale and shift), as the size accounting counts it.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    InvalidParameterError
        If ``cmodel`` is not a CompressedModel or a layer is not quantized.

    Warns
    -----
    UserWarning
        If a codebook or projection is not fp16-representable (fine-tuned since quantize): the file stores it
        rounded; call ``cmodel.round_fp16_()`` first to keep the in-memory model identical to the file.

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
    layers_manifest: dict[str, dict[str, Any]] = {}
    for key, layer in cmodel.compressed_layers().items():
        if layer.state != "quantized":
            raise InvalidParameterError(
                f"layer {key!r} is in state {layer.state!r}; call cmodel.quantize() before save_compressed"
            )
        plan = layer.plan
        bits = code_bits(plan.k)
        codes = layer.codes.detach().cpu().numpy()  # type: ignore[union-attr]
        tensors[f"{key}.codes"] = torch.from_numpy(pack_codes(codes, bits))
        for suffix, value in (("codebook", layer.codebook), ("projection", layer.P)):
            if value is None:
                continue
            half = value.detach().cpu().to(torch.float16)
            if not torch.equal(half.to(value.dtype), value.detach().cpu()):
                warnings.warn(
                    f"layer {key!r}: the {suffix} is not fp16-representable; the file stores it rounded. "
                    "Call cmodel.round_fp16_() before saving to keep the in-memory model identical to the file",
                    stacklevel=2,
                )
            tensors[f"{key}.{suffix}"] = half
        layers_manifest[key] = {**plan.to_dict(), "shape": list(layer.weight_shape), "code_bits": bits}
    folded: list[str] = []
    if fold_batchnorm:
        for name, bn in _batchnorms(cmodel.module):
            with torch.no_grad():
                inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)  # type: ignore[union-attr]
                scale = bn.weight.double() * inv_std
                shift = bn.bias.double() - bn.running_mean.double() * scale  # type: ignore[union-attr]
            tensors[_prefixed(name, "folded_scale")] = scale.float().cpu()
            tensors[_prefixed(name, "folded_shift")] = shift.float().cpu()
            folded.append(name)
    dense = _dense_entries(cmodel, folded)
    clash = set(dense) & set(tensors)
    if clash:
        raise InvalidParameterError(f"state_dict keys {sorted(clash)} clash with the file's own tensor names")
    tensors.update({key: value.detach().cpu().contiguous() for key, value in dense.items()})
    manifest = json.dumps(
        {"layers": layers_manifest, "folded_batchnorms": folded, "dense": list(dense)}, sort_keys=True
    )
    metadata = {
        "format": FORMAT_NAME,
        "version": str(FORMAT_VERSION),
        "manifest": manifest,
        "checksum": _checksum(manifest, tensors),
    }
    return write_atomic(path, save_safetensors(tensors, metadata=metadata))


def _read(path: str | os.PathLike[str]) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Read and verify a file: (metadata, tensors), or WeightFileError naming what is wrong."""
    path = Path(path)
    try:
        payload = path.read_bytes()
    except OSError as exc:
        raise WeightFileError(f"cannot read {str(path)!r}: {exc}") from None
    if len(payload) < 8:
        raise WeightFileError(f"{str(path)!r} is truncated or not an LR²VQ file ({len(payload)} bytes)")
    (header_length,) = struct.unpack("<Q", payload[:8])
    if 8 + header_length > len(payload):
        raise WeightFileError(f"{str(path)!r} is truncated: its header claims {header_length} bytes")
    try:
        header = json.loads(payload[8 : 8 + header_length])
        metadata = header["__metadata__"]
        data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightFileError(f"{str(path)!r} is corrupt or not an LR²VQ file: unreadable header ({exc})") from None
    if metadata.get("format") != FORMAT_NAME:
        raise WeightFileError(f"{str(path)!r} is not an LR²VQ file (format {metadata.get('format')!r})")
    if metadata.get("version") != str(FORMAT_VERSION):
        raise WeightFileError(
            f"{str(path)!r} has format version {metadata.get('version')!r}; this package reads version {FORMAT_VERSION}"
        )
    if len(payload) != 8 + header_length + data_end:
        raise WeightFileError(
            f"{str(path)!r} is truncated or padded: {len(payload)} bytes, "
            f"the header describes {8 + header_length + data_end}"
        )
    try:
        tensors = load_safetensors(payload)
    except Exception as exc:  # safetensors raises its own error types
        raise WeightFileError(f"{str(path)!r} is corrupt: {exc}") from None
    if _checksum(metadata.get("manifest", ""), tensors) != metadata.get("checksum"):
        raise WeightFileError(f"{str(path)!r} is corrupt: its checksum does not match its contents")
    return metadata, tensors


def load_compressed(path: str | os.PathLike[str], skeleton: nn.Module) -> CompressedModel:
    """Rebuild a compressed model from a file written by :func:`save_compressed`.

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
    WeightFileError
        If the file is missing, truncated, corrupt (checksum), of another format or version.
    InvalidParameterError
        If the skeleton does not match the file (a layer or tensor missing, a shape differs).
    """
    metadata, tensors = _read(path)
    manifest = json.loads(metadata["manifest"])
    label = f"skeleton {type(skeleton).__name__} does not match {str(path)!r}"
    plan = {key: LayerPlan.from_dict(entry) for key, entry in manifest["layers"].items()}
    skeleton_state = skeleton.state_dict()
    for key, entry in manifest["layers"].items():
        if key in skeleton_state and tuple(skeleton_state[key].shape) != tuple(entry["shape"]):
            raise InvalidParameterError(
                f"{label}: layer {key!r} has shape {tuple(skeleton_state[key].shape)} in the skeleton, "
                f"{tuple(entry['shape'])} in the file"
            )
    skeleton = copy.deepcopy(skeleton)
    with torch.no_grad():  # the skeleton's weights are replaced; any finite nonzero values let compress() run
        for key in plan:
            if key in skeleton_state:
                skeleton.get_parameter(key).fill_(1.0)
    try:
        cmodel = compress(skeleton, plan)
    except InvalidParameterError as exc:
        raise InvalidParameterError(f"{label}: {exc}") from None
    for key, layer in cmodel.compressed_layers().items():
        entry = manifest["layers"][key]
        codes = unpack_codes(tensors[f"{key}.codes"].numpy(), int(entry["code_bits"]), _n_codes(layer))
        layer.set_quantized(torch.from_numpy(codes), tensors[f"{key}.codebook"], tensors.get(f"{key}.projection"))
    _load_dense(cmodel, manifest, tensors, label)
    return cmodel


def _n_codes(layer: _LR2VQLayer) -> int:
    return math.prod(layer.weight_shape) // layer.plan.m


def _load_dense(
    cmodel: CompressedModel, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], label: str
) -> None:
    """Copy the uncompressed tensors and unfold the folded batch norms into the model, checking they match."""
    folded = list(manifest["folded_batchnorms"])
    batchnorms = dict(_batchnorms(cmodel.module))
    missing_bn = [name for name in folded if name not in batchnorms]
    if missing_bn:
        raise InvalidParameterError(f"{label}: batch norms {missing_bn} are missing from the skeleton")
    expected = _dense_entries(cmodel, folded)
    stored = list(manifest["dense"])
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
            bn.running_mean.zero_()  # type: ignore[union-attr]
            bn.running_var.fill_(1.0)  # type: ignore[union-attr]
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.zero_()
