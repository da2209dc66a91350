"""The one table of named models: name → weights file, architecture, data set.

Every place that accepts a model name (:func:`~lr2vq_analysis.weights.load_weights`, the ``lr2vq``
command line, the demo, the benchmarks and the experimental sweeps) looks it up here, so a model added
to :data:`MODELS` can be analysed, compressed and fine-tuned by name everywhere at once.

An entry names its parts by import path (``"module:attribute"``) and imports them only when used: this
module needs nothing beyond the standard library, so the command line can list the names without
importing torch. Entries marked ``experimental`` need modules of :mod:`lr2vq_analysis.experimental`
(and, for all-MiniLM-L6-v2, the ``bench`` extra).

Examples
--------
>>> sorted(MODELS)
['all-minilm-l6-v2', 'digits-cnn', 'mnist1d-cnn']
>>> weights_path("digits-cnn").name
'digits_cnn.safetensors'
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .exceptions import InvalidParameterError, WeightFileError

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "ModelEntry",
    "build_model",
    "get_entry",
    "is_model_name",
    "load_dataset",
    "load_model",
    "model_names",
    "weights_path",
]

#: Folder of the weight files that ship with the package.
DATA_DIR = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class ModelEntry:
    """One named model.

    Attributes
    ----------
    name : str
        The name users type (``lr2vq analyze NAME``).
    description : str
        One line for listings.
    weights : str
        A file name in ``lr2vq_analysis/data`` (a bundled model), or ``"module:function"`` returning the
        path of a file installed by another package.
    architecture : str or None
        ``"module:attribute"`` of a callable that returns the untrained ``nn.Module`` (no arguments).
    dataset : str or None
        ``"module:function"`` of a callable ``(seed) -> {"train", "val", "test"}`` datasets.
    loader : str or None
        ``"module:function"`` returning the pretrained model when it is not ``architecture`` + ``weights``.
    m : int
        The subvector size the model was designed for (every compressed layer's row length divides it).
    experimental : bool
        Whether the entry needs :mod:`lr2vq_analysis.experimental` (no stability promise).
    """

    name: str
    description: str
    weights: str
    architecture: str | None = None
    dataset: str | None = None
    loader: str | None = None
    m: int = 9
    experimental: bool = False


_ENTRIES = (
    ModelEntry(
        "digits-cnn",
        "4-conv CNN for scikit-learn's 8×8 digits (61,050 parameters), pretrained",
        "digits_cnn.safetensors",
        architecture="lr2vq_analysis.models.digits:DigitsCNN",
        dataset="lr2vq_analysis.datasets:load_digits_splits",
        m=9,
    ),
    ModelEntry(
        "mnist1d-cnn",
        "4-conv 1-D CNN for MNIST-1D (31,978 parameters), pretrained; data needs the bench extra",
        "mnist1d_cnn.safetensors",
        architecture="lr2vq_analysis.experimental.models.mnist1d:Mnist1DCNN",
        dataset="lr2vq_analysis.experimental.datasets:load_mnist1d_splits",
        m=3,
        experimental=True,
    ),
    ModelEntry(
        "all-minilm-l6-v2",
        "sentence encoder all-MiniLM-L6-v2 (22.7 M parameters); needs the bench extra",
        "lr2vq_analysis.experimental.models.minilm:minilm_weights_path",
        loader="lr2vq_analysis.experimental.models.minilm:load_minilm",
        dataset="lr2vq_analysis.experimental.datasets:load_minilm_splits",
        m=8,
        experimental=True,
    ),
)

#: Every named model, by name (read-only).
MODELS: Mapping[str, ModelEntry] = MappingProxyType({entry.name: entry for entry in _ENTRIES})
#: The model ``lr2vq analyze`` and the demo use when none is named.
DEFAULT_MODEL = "digits-cnn"


def model_names(*, bundled_only: bool = False) -> tuple[str, ...]:
    """Names of the registered models, in registry order.

    Parameters
    ----------
    bundled_only : bool, default False
        Only the models whose weights ship inside this package.

    Examples
    --------
    >>> model_names(bundled_only=True)
    ('digits-cnn', 'mnist1d-cnn')
    """
    return tuple(name for name, entry in MODELS.items() if not bundled_only or ":" not in entry.weights)


def get_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``.

    Parameters
    ----------
    name : str
        A key of :data:`MODELS`.

    Raises
    ------
    InvalidParameterError
        If ``name`` is not registered (the message lists the names).
    """
    if not isinstance(name, str) or name not in MODELS:
        raise InvalidParameterError(f"unknown model {name!r}; named models are {list(MODELS)}")
    return MODELS[name]


def is_model_name(source: Any) -> bool:
    """Whether ``source`` is a registered name and not an existing path (a file of that name wins).

    Parameters
    ----------
    source : object
        What the user passed: a name, a path, a module, ...
    """
    return isinstance(source, str) and source in MODELS and not os.path.exists(source)


def _resolve(target: str) -> Callable[..., Any]:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def weights_path(name: str) -> Path:
    """Path of a named model's weight file (whether it exists is not checked for bundled files).

    Parameters
    ----------
    name : str
        A key of :data:`MODELS`.

    Raises
    ------
    InvalidParameterError
        If ``name`` is not registered.
    WeightFileError
        If the file comes from another package that is not installed.

    Examples
    --------
    >>> weights_path("mnist1d-cnn").name
    'mnist1d_cnn.safetensors'
    """
    entry = get_entry(name)
    if ":" not in entry.weights:
        return DATA_DIR / entry.weights
    try:
        return Path(_resolve(entry.weights)())
    except ImportError as exc:
        raise WeightFileError(f"model {name!r} is not installed: {exc}") from None


def build_model(name: str) -> nn.Module:
    """A fresh, untrained instance of a named model's architecture (e.g. to reload a compressed file).

    Parameters
    ----------
    name : str
        A key of :data:`MODELS`.

    Raises
    ------
    InvalidParameterError
        If ``name`` is not registered or has no architecture of its own (use :func:`load_model`).
    """
    entry = get_entry(name)
    if entry.architecture is None:
        raise InvalidParameterError(f"model {name!r} has no separate architecture; use load_model({name!r})")
    return _resolve(entry.architecture)()


def load_model(name: str) -> nn.Module:
    """The pretrained model ``name``, in eval mode, on the CPU.

    Parameters
    ----------
    name : str
        A key of :data:`MODELS`.

    Raises
    ------
    InvalidParameterError
        If ``name`` is not registered.
    WeightFileError
        If the weight file is missing or does not match the architecture.

    Examples
    --------
    >>> type(load_model("mnist1d-cnn")).__name__
    'Mnist1DCNN'
    """
    entry = get_entry(name)
    if entry.loader is not None:
        return _resolve(entry.loader)()
    model = build_model(name)
    path = weights_path(name)
    if not path.is_file():
        raise WeightFileError(
            f"the weight file of model {name!r} is missing: {path}; reinstall the package or run its "
            "training script in scripts/"
        )
    from safetensors.torch import load_file

    try:
        model.load_state_dict(load_file(str(path)))
    except (OSError, RuntimeError, ValueError) as exc:
        raise WeightFileError(f"model {name!r}: cannot load {path}: {exc}") from None
    return model.eval()


def load_dataset(name: str, seed: int = 0) -> dict[str, Any]:
    """The train / validation / test datasets of a named model (its data-set loader called with ``seed``).

    Parameters
    ----------
    name : str
        A key of :data:`MODELS`.
    seed : int, default 0
        Passed to the data-set loader.

    Raises
    ------
    InvalidParameterError
        If ``name`` is not registered or has no data set.
    ImportError
        If the data set needs a package that is not installed (the message names it).
    """
    entry = get_entry(name)
    if entry.dataset is None:
        raise InvalidParameterError(f"model {name!r} comes without a data set")
    return _resolve(entry.dataset)(seed)
