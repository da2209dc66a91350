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


class LayerReads:
    """Records every tensor read from a safetensors file: how often per key, and the most alive at once."""

    def __init__(self) -> None:
        import weakref

        self._ref = weakref.ref
        self.alive: list = []
        self.reads: dict[str, int] = {}
        self.most_alive = 0

    def record(self, key: str, tensor: torch.Tensor) -> None:
        self.alive.append(self._ref(tensor))
        self.reads[key] = self.reads.get(key, 0) + 1
        self.most_alive = max(self.most_alive, self.n_alive)

    @property
    def n_alive(self) -> int:
        return sum(ref() is not None for ref in self.alive)


@pytest.fixture
def layer_reads(monkeypatch: pytest.MonkeyPatch) -> LayerReads:
    """Track the layers the loader reads from safetensors files (to check that analysis streams)."""
    from lr2vq_analysis import weights

    recorder = LayerReads()
    original = weights._SafetensorsFile.read

    def read(self: weights._SafetensorsFile, key: str) -> torch.Tensor:
        tensor = original(self, key)
        recorder.record(key, tensor)
        return tensor

    monkeypatch.setattr(weights._SafetensorsFile, "read", read)
    return recorder


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


@pytest.fixture
def hand_model():
    """Factory of a hand-made TradeoffModel whose totals are known by hand (m = 6, ρ = 0.5, k = 16).

    Weight space: total = 0.5·low-rank + clustering = [0.31, 0.183, 0.175, 0.1815, 0.23, 0.3]. With
    ``output=True`` also output-space curves: low-rank [0.2, 0.08, 0.03, 0.01, 0.004, 0], clustering
    [0, 0.02, 0.05, 0.09, 0.12, 0.15] (they cross at d̃ = 3).
    """
    from lr2vq_analysis.tradeoff import TradeoffModel

    def make(predictor: str | None = None, *, output: bool = False, tolerance: float = 0.05) -> TradeoffModel:
        curves = {}
        if output:
            curves = {
                "lowrank_output_curve": [0.2, 0.08, 0.03, 0.01, 0.004, 0.0],
                "clustering_output_curve": [0.0, 0.02, 0.05, 0.09, 0.12, 0.15],
            }
        return TradeoffModel(
            16,
            6,
            0.5,
            eigenvalues=[0.4, 0.3, 0.15, 0.09, 0.04, 0.02],
            lowrank_curve=[0.6, 0.3, 0.15, 0.06, 0.02, 0.0],
            clustering_curve=[0.01, 0.033, 0.1, 0.1515, 0.22, 0.3],
            knee=4,
            probes={},
            params={},
            n_subvectors=512,
            name="hand.weight",
            predictor=predictor,
            tolerance=tolerance,
            **curves,
        )

    return make
