"""Seeded splits of scikit-learn's 8×8 digits, the data of the bundled digits CNN.

The test split is the same for every ``seed``: it is drawn once with the constant
:data:`TEST_SPLIT_SEED`, so accuracies measured with different seeds are measured on the same 719
images and can be compared. ``seed`` only decides which of the remaining images go to training and
which to validation (use the validation split to choose learning rates, never the test split).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ._validation import InvalidParameterError, check_count, check_param, check_seed

__all__ = [
    "TEST_SPLIT_SEED",
    "DEFAULT_TEST_FRACTION",
    "DEFAULT_VAL_FRACTION",
    "load_digits_splits",
    "digits_loaders",
    "accuracy",
    "make_loaders",
    "mean_over_samples",
]

#: Seed of the train+val / test cut; constant so that every ``seed`` shares one test split.
TEST_SPLIT_SEED = 0
#: Share of the 1,797 images held out for testing (719 images).
DEFAULT_TEST_FRACTION = 0.4
#: Share of the 1,797 images used for validation (180 images); the rest (898) trains.
DEFAULT_VAL_FRACTION = 0.1
#: Digits pixels are integers in 0..16.
_PIXEL_MAX = 16.0


def _check_fraction(value: Any, name: str) -> float:
    return float(check_param(name, value))


def _to_dataset(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    x = torch.from_numpy((images / _PIXEL_MAX).astype(np.float32)).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(labels.astype(np.int64))
    return TensorDataset(x, y)


def load_digits_splits(
    seed: int = 0,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
) -> dict[str, TensorDataset]:
    """Return stratified train / validation / test splits of scikit-learn's digits.

    Parameters
    ----------
    seed : int, default 0
        Decides the train / validation cut. The test split does not depend on it (it is drawn with
        the constant :data:`TEST_SPLIT_SEED`).
    val_fraction : float, default 0.1
        Share of the whole data set used for validation.
    test_fraction : float, default 0.4
        Share of the whole data set held out for testing.

    Returns
    -------
    dict of str to torch.utils.data.TensorDataset
        Keys ``"train"``, ``"val"``, ``"test"``. Each holds ``x`` float32 of shape (N, 1, 8, 8) scaled
        to [0, 1] and ``y`` int64 labels in 0..9.

    Raises
    ------
    InvalidParameterError
        If a fraction is outside (0, 1), the two fractions leave no training data, or ``seed`` is
        not a non-negative integer.

    Examples
    --------
    >>> splits = load_digits_splits(seed=0)
    >>> {name: len(ds) for name, ds in splits.items()}
    {'train': 898, 'val': 180, 'test': 719}
    >>> x, y = splits["train"][0]
    >>> tuple(x.shape), x.dtype, y.dtype
    ((1, 8, 8), torch.float32, torch.int64)
    """
    seed = check_seed(seed)
    val_fraction = _check_fraction(val_fraction, "val_fraction")
    test_fraction = _check_fraction(test_fraction, "test_fraction")
    if val_fraction + test_fraction >= 1.0:
        raise InvalidParameterError(
            f"val_fraction={val_fraction} + test_fraction={test_fraction} leave no training data; their sum must be < 1"
        )
    digits = load_digits()
    images, labels = digits.data, digits.target
    rest_x, test_x, rest_y, test_y = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=TEST_SPLIT_SEED
    )
    n_val = round(val_fraction * len(labels))
    train_x, val_x, train_y, val_y = train_test_split(
        rest_x, rest_y, test_size=n_val, stratify=rest_y, random_state=seed
    )
    return {
        "train": _to_dataset(train_x, train_y),
        "val": _to_dataset(val_x, val_y),
        "test": _to_dataset(test_x, test_y),
    }


def digits_loaders(
    batch_size: int = 64,
    seed: int = 0,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
) -> dict[str, DataLoader]:
    """Return data loaders over :func:`load_digits_splits`; only the training loader shuffles.

    The training loader shuffles with a ``torch.Generator`` seeded by ``seed``, so two runs with the
    same seed see the batches in the same order. It drops the last incomplete batch (898 = 14·64 + 2:
    batch norm statistics of a 2-image batch are noise); each epoch drops different images.

    Parameters
    ----------
    batch_size : int, default 64
        Batch size of every loader.
    seed : int, default 0
        Seeds both the train / validation cut and the shuffling.
    val_fraction, test_fraction : float
        Passed to :func:`load_digits_splits`.

    Returns
    -------
    dict of str to torch.utils.data.DataLoader
        Keys ``"train"`` (shuffled, full batches only), ``"val"`` and ``"test"`` (all images, in a fixed order).

    Raises
    ------
    InvalidParameterError
        If ``batch_size`` is not a positive integer, or as :func:`load_digits_splits`.

    Examples
    --------
    >>> loaders = digits_loaders(batch_size=128, seed=0)
    >>> x, y = next(iter(loaders["train"]))
    >>> tuple(x.shape), tuple(y.shape)
    ((128, 1, 8, 8), (128,))
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InvalidParameterError(f"batch_size={batch_size!r} is invalid; it must be a positive integer")
    splits = load_digits_splits(seed, val_fraction=val_fraction, test_fraction=test_fraction)
    generator = torch.Generator().manual_seed(seed)
    return {
        "train": DataLoader(
            splits["train"], batch_size=int(batch_size), shuffle=True, drop_last=True, generator=generator
        ),
        "val": DataLoader(splits["val"], batch_size=int(batch_size), shuffle=False),
        "test": DataLoader(splits["test"], batch_size=int(batch_size), shuffle=False),
    }


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: Dataset | DataLoader, *, batch_size: int = 512) -> float:
    """Return the top-1 accuracy (a fraction in [0, 1]) of a classifier on a data set.

    The model is evaluated in eval mode on the device of its first parameter (CPU for a model
    without parameters); its training mode is restored afterwards.

    Parameters
    ----------
    model : torch.nn.Module
        Maps a batch ``x`` to logits of shape (batch, n_classes).
    data : Dataset or DataLoader
        Yields ``(x, y)`` pairs; a Dataset is batched with ``batch_size`` in its own order.
    batch_size : int, default 512
        Batch size used when ``data`` is a Dataset.

    Returns
    -------
    float

    Examples
    --------
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> always_zero = torch.nn.Linear(2, 3)
    >>> with torch.no_grad():
    ...     _ = always_zero.weight.zero_(); _ = always_zero.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    >>> accuracy(always_zero, TensorDataset(torch.zeros(4, 2), torch.tensor([0, 0, 1, 2])))
    0.5
    """
    return mean_over_samples(model, data, lambda logits, y: (logits.argmax(dim=1) == y).sum(), batch_size=batch_size)


@torch.no_grad()
def mean_over_samples(
    model: torch.nn.Module,
    data: Dataset | DataLoader,
    batch_total: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | float],
    *,
    batch_size: int = 512,
) -> float:
    """Mean over every sample of ``(inputs, target)`` pairs of a per-batch total, in eval mode.

    The one evaluation loop of the package (:func:`accuracy`, :func:`cosine_similarity` and the sweeps'
    losses use it). The model runs in eval mode on the device of its first parameter (CPU for a model
    without parameters); its training mode is restored afterwards.

    Parameters
    ----------
    model : torch.nn.Module
        Called as ``model(**inputs)`` when the inputs are a mapping, else ``model(inputs)``.
    data : Dataset or DataLoader
        Yields ``(inputs, target)`` pairs; a Dataset is batched with ``batch_size`` in its own order.
    batch_total : callable (output, target) -> scalar
        The sum of the per-sample quantity over one batch (e.g. the number of correct predictions).
    batch_size : int, default 512
        Batch size used when ``data`` is a Dataset.

    Returns
    -------
    float
        The sum of ``batch_total`` over the batches divided by the number of samples (NaN without any).

    Examples
    --------
    >>> from torch.utils.data import TensorDataset
    >>> data = TensorDataset(torch.tensor([[1.0], [2.0], [3.0]]), torch.zeros(3))
    >>> mean_over_samples(torch.nn.Identity(), data, lambda output, target: output.sum())
    2.0
    """
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size, shuffle=False)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for inputs, target in loader:
            if isinstance(inputs, Mapping):
                output = model(**{key: value.to(device) for key, value in inputs.items()})
            else:
                output = model(inputs.to(device))
            total += float(batch_total(output.cpu(), target))
            count += len(target)
    finally:
        model.train(was_training)
    return total / count if count else float("nan")


def make_loaders(splits: Mapping[str, Dataset], batch_size: int = 64, seed: int = 0) -> dict[str, DataLoader]:
    """Wrap train / validation / test datasets in loaders; only ``"train"`` shuffles (seeded) and drops the last batch.

    Unlike :func:`digits_loaders`, the split is given, so the data cut and the batch order can be
    seeded independently (the sweeps keep the cut a pretrained model was trained on and vary the order).

    Parameters
    ----------
    splits : mapping of str to Dataset
        Must hold ``"train"``; every other entry gets an unshuffled loader.
    batch_size : int, default 64
    seed : int, default 0
        Seeds the shuffling of the training loader.

    Returns
    -------
    dict of str to torch.utils.data.DataLoader

    Raises
    ------
    InvalidParameterError
        If ``batch_size`` or ``seed`` is invalid or ``splits`` has no ``"train"`` entry.

    Examples
    --------
    >>> loaders = make_loaders(load_digits_splits(0), batch_size=100, seed=1)
    >>> len(loaders["train"]), len(loaders["test"])
    (8, 8)
    """
    batch_size = check_count(batch_size, "batch_size")
    seed = check_seed(seed)
    if "train" not in splits:
        raise InvalidParameterError(f"splits has no 'train' entry; its keys are {sorted(splits)}")
    generator = torch.Generator().manual_seed(seed)
    return {
        name: DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=name == "train",
            drop_last=name == "train",
            generator=generator if name == "train" else None,
        )
        for name, dataset in splits.items()
    }
