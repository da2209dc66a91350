"""Compress a plain weight file: a module rebuilt from its state_dict, compression, save and a verified reload.

A weight file (``.pt``/``.safetensors``/``.npz``) comes without its model code. :func:`skeleton_from_state_dict`
rebuilds a module with the file's names and shapes (Linear / Conv1d / Conv2d for the planned layers, batch
norms, plain tensors for the rest) that can be compressed, saved and reloaded, but has no forward pass.
:func:`compress_weight_file` runs the whole job the ``lr2vq compress`` command runs: named models of the
:mod:`~lr2vq_analysis.registry` are rebuilt with their real architecture instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ._validation import InvalidParameterError, check_seed
from .exceptions import LR2VQError

if TYPE_CHECKING:
    from .nn import CompressedModel
    from .plan import LayerPlan
    from .size import SizeReport

__all__ = ["CompressedFile", "check_reload", "compress_weight_file", "skeleton_from_state_dict"]


@dataclass
class CompressedFile:
    """What :func:`compress_weight_file` wrote.

    Attributes
    ----------
    path : pathlib.Path
        The ``.lr2vq`` file.
    size : SizeReport
        Size of the compressed model.
    model : str or None
        The registry name when the source was a named model (reload into
        :func:`~lr2vq_analysis.registry.build_model`), else None (reload into
        :func:`skeleton_from_state_dict`).
    """

    path: Path
    size: SizeReport
    model: str | None = None


def skeleton_from_state_dict(state: Mapping[str, torch.Tensor], layer_keys: Sequence[str]) -> torch.nn.Module:
    """A module with the state_dict's names and shapes, for weights that come without their model code.

    Each key in ``layer_keys`` becomes the weight of an ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` (with
    its bias when the state_dict has one), each group with ``running_mean`` a batch norm, and every other
    tensor a parameter or buffer of a plain container. The module can be compressed, saved and reloaded;
    it has no forward pass.

    Parameters
    ----------
    state : mapping of str to torch.Tensor
        The whole state_dict (:func:`~lr2vq_analysis.weights.load_state_dict`); its values are loaded.
    layer_keys : sequence of str
        Weight keys to build as Linear / Conv1d / Conv2d layers (the keys of a plan).

    Returns
    -------
    torch.nn.Module

    Raises
    ------
    InvalidParameterError
        If a layer key's tensor is not 2-, 3- or 4-dimensional.

    Examples
    --------
    >>> import torch
    >>> state = {"fc.weight": torch.zeros(4, 8), "fc.bias": torch.zeros(4), "scale": torch.ones(3)}
    >>> skeleton_from_state_dict(state, ["fc.weight"]).fc
    Linear(in_features=8, out_features=4, bias=True)
    """
    import torch
    from torch import nn

    root = nn.Module()

    def container(path: str) -> nn.Module:
        module = root
        for part in [p for p in path.split(".") if p]:
            if part not in module._modules:
                module.add_module(part, nn.Module())
            child = module._modules[part]
            assert child is not None
            module = child
        return module

    def place(path: str, module: nn.Module) -> None:
        parent, _, leaf = path.rpartition(".")
        container(parent).add_module(leaf, module)

    layers = set(layer_keys)
    owners = {key.rpartition(".")[0] for key in layers}
    batchnorms = {key.rpartition(".")[0] for key in state if key.endswith(".running_mean")}
    for key in layers:
        weight = state[key]
        owner = key.rpartition(".")[0]
        has_bias = f"{owner}.bias" in state
        shape = tuple(weight.shape)
        module: nn.Module
        if len(shape) == 2:
            module = nn.utils.skip_init(nn.Linear, shape[1], shape[0], bias=has_bias)
        elif len(shape) == 3:
            module = nn.utils.skip_init(nn.Conv1d, shape[1], shape[0], shape[2], bias=has_bias)
        elif len(shape) == 4:
            module = nn.utils.skip_init(nn.Conv2d, shape[1], shape[0], shape[2:], bias=has_bias)
        else:
            raise InvalidParameterError(f"layer {key!r}: weight of shape {shape} is not a Linear/Conv1d/Conv2d weight")
        place(owner, module)
    for owner in batchnorms - owners:
        channels = int(state[f"{owner}.running_mean"].shape[0])
        place(owner, nn.BatchNorm1d(channels, affine=f"{owner}.weight" in state))
    for key, value in state.items():
        owner, _, leaf = key.rpartition(".")
        if owner in owners or owner in batchnorms:
            continue
        target = container(owner)
        if value.is_floating_point():
            target.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
        else:
            target.register_buffer(leaf, value.clone())
    with torch.no_grad():
        root.load_state_dict(dict(state), strict=True)
    return root


def check_reload(cmodel: CompressedModel, reloaded: CompressedModel) -> None:
    """Check that a reloaded model has exactly the compressed weights, and that they are finite and not all zero.

    Parameters
    ----------
    cmodel : CompressedModel
        The model that was saved.
    reloaded : CompressedModel
        What :func:`~lr2vq_analysis.export.load_compressed` read back.

    Raises
    ------
    NonFiniteError
        If a reloaded weight or tensor holds NaN/Inf (nothing to report as a success).
    InvalidWeightsError
        If a reloaded compressed weight is all zeros.
    LR2VQError
        If a reloaded weight differs from the compressed one.
    """
    from .export import check_reconstruction

    again = reloaded.compressed_layers()
    for name, layer in cmodel.compressed_layers().items():
        if name not in again or not torch.equal(layer.weight.detach(), again[name].weight.detach()):
            raise LR2VQError(f"layer {name!r}: the reloaded weight differs from the compressed one")
    check_reconstruction(reloaded)  # finite, no compressed layer all zeros, every other tensor finite


def compress_weight_file(
    source: str | os.PathLike[str],
    plan: Mapping[str, LayerPlan],
    out: str | os.PathLike[str],
    *,
    seed: int = 0,
    progress: bool = False,
) -> CompressedFile:
    """Compress the planned layers of a weight file or named model, without fine-tuning; save and verify.

    Parameters
    ----------
    source : str or path
        A weight file, or a name of :data:`lr2vq_analysis.registry.MODELS`.
    plan : mapping of str to LayerPlan
        The layers to compress (e.g. :func:`~lr2vq_analysis.report_folder.read_plan`).
    out : str or path
        The ``.lr2vq`` file to write.
    seed : int, default 0
        Seed of the k-means runs.
    progress : bool, default False
        Show a progress bar over the layers.

    Returns
    -------
    CompressedFile

    Raises
    ------
    InvalidParameterError
        If the plan names a layer the source does not hold.
    WeightFileError, NonFiniteError, LR2VQError
        If the source cannot be read, or the written file does not reload to the compressed weights.
    """
    from tqdm import tqdm  # plain tqdm: tqdm.auto warns (IProgress) in Jupyter without ipywidgets

    from .export import load_compressed, save_compressed
    from .nn import compress
    from .registry import MODELS, build_model, is_model_name, load_model
    from .size import size_report
    from .weights import load_state_dict

    seed = check_seed(seed)
    name = str(source) if is_model_name(source) else None
    state = load_state_dict(source)
    missing = [key for key in plan if key not in state]
    if missing:
        raise InvalidParameterError(f"the plan names {missing}, which {source} does not contain")
    model = load_model(name) if name is not None else skeleton_from_state_dict(state, list(plan))
    cmodel = compress(model, dict(plan), seed=seed)
    for layer in tqdm(cmodel.compressed_layers().values(), desc="quantize", unit="layer", disable=not progress):
        layer.quantize(seed=seed)  # what cmodel.quantize(seed) does, one progress step per layer
    path = save_compressed(cmodel, out)
    if name is None:
        fresh = skeleton_from_state_dict(state, list(plan))
    else:
        fresh = build_model(name) if MODELS[name].architecture else load_model(name)
    check_reload(cmodel, load_compressed(path, fresh))
    return CompressedFile(path, size_report(cmodel), name)
