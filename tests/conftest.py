"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: the test models are tiny, and several threads spin-wait on a shared machine (7x here).

    The sweeps and the training loop also run one thread per process; the caller's setting is restored.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_toy_cnn(widths: tuple[int, ...] = (8, 16), *, seed: int = 0, num_classes: int = 10) -> torch.nn.Module:
    """The shared toy model: 3×3 conv + batch norm + ReLU blocks (3 input channels), pooling and a classifier.

    ``widths`` are the output channels of the convolutions; ``seed`` fixes the initial weights.
    """
    from torch import nn

    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    channels = 3
    for width in widths:
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


@pytest.fixture
def toy_cnn() -> torch.nn.Module:
    """A fresh :func:`make_toy_cnn` with the default widths (8, 16) and seed 0."""
    return make_toy_cnn()
