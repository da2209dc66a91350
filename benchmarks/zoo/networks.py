"""The zoo: small networks trained by the project on offline data, to tell d̃ predictors apart.

Definitions only (architectures, data, compressed layers, (k, m) settings, dev/held-out half), exactly as
pre-registered in ``PREREGISTRATION.md``. ``train.py`` trains them, ``sweep.py`` sweeps d̃, ``score.py``
scores the predictors. Weights go to ``benchmarks/zoo/weights/<id>.safetensors`` with a JSON record.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

WEIGHTS = Path(__file__).resolve().parent / "weights"


# --------------------------------------------------------------------------------------------------
# architectures


class PlainCNN2d(nn.Module):
    """``depth`` conv + BN + ReLU blocks (a max-pool after the second), global average pool, linear head."""

    def __init__(self, width: int, depth: int, kernel: int = 3, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [
                nn.Conv2d(1 if i == 0 else width, width, kernel, padding=kernel // 2, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            ]
            if i == 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=tuple(range(2, x.dim()))))


class PlainCNN1d(PlainCNN2d):
    """The 1-D version of :class:`PlainCNN2d` (MNIST-1D signals of length 40)."""

    def __init__(self, width: int, depth: int, kernel: int = 3, classes: int = 10) -> None:
        nn.Module.__init__(self)
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [
                nn.Conv1d(1 if i == 0 else width, width, kernel, padding=kernel // 2, bias=False),
                nn.BatchNorm1d(width),
                nn.ReLU(),
            ]
            if i in (1, 2):
                layers.append(nn.MaxPool1d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)


class ResBlock(nn.Module):
    def __init__(self, width: int, dims: int) -> None:
        super().__init__()
        conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
        self.conv1, self.bn1 = conv(width, width, 3, padding=1, bias=False), bn(width)
        self.conv2, self.bn2 = conv(width, width, 3, padding=1, bias=False), bn(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResNetSmall(nn.Module):
    """A stem conv, ``blocks`` residual blocks of two 3-wide convs, global average pool, linear head."""

    def __init__(self, width: int, blocks: int, dims: int, classes: int = 10) -> None:
        super().__init__()
        conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
        self.stem = nn.Sequential(conv(1, width, 3, padding=1, bias=False), bn(width), nn.ReLU())
        self.blocks = nn.Sequential(*[ResBlock(width, dims) for _ in range(blocks)])
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=tuple(range(2, x.dim()))))


class DepthwiseSeparable(nn.Module):
    """A stem conv, then ``blocks`` × (depthwise 3×3 + BN + ReLU, pointwise 1×1 + BN + ReLU), pool, head."""

    def __init__(self, width: int, blocks: int = 3, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        for _ in range(blocks):
            layers += [
                nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.Conv2d(width, width, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class MLP(nn.Module):
    """in → 256 → 256 → classes with ReLU (fc1, fc2, fc3)."""

    def __init__(self, inputs: int, hidden: int = 256, classes: int = 10) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(inputs, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class EncoderLayer(nn.Module):
    """Pre-norm self-attention with explicit nn.Linear q, k, v, o (compressible) and a 2× MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.query, self.key, self.value, self.out = (nn.Linear(width, width) for _ in range(4))
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        h = self.norm1(x)

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, w // self.heads).transpose(1, 2)

        attention = nn.functional.scaled_dot_product_attention(
            split(self.query(h)), split(self.key(h)), split(self.value(h))
        )
        x = x + self.out(attention.transpose(1, 2).reshape(b, t, w))
        return x + self.down(torch.relu(self.up(self.norm2(x))))


class TinyTransformer(nn.Module):
    """Patches of ``patch`` samples of a 1-D signal → tokens of ``width``, ``layers`` encoder layers, mean pool."""

    def __init__(self, length: int = 40, patch: int = 4, width: int = 32, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(patch, width)
        self.position = nn.Parameter(torch.zeros(length // patch, width))
        self.layers = nn.Sequential(*[EncoderLayer(width, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.reshape(x.shape[0], -1, self.patch)) + self.position
        return self.head(self.norm(self.layers(tokens)).mean(dim=1))


# --------------------------------------------------------------------------------------------------
# data


def _shift(images: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    out = np.zeros_like(images)
    for i, (dy, dx) in enumerate(shifts):
        src = images[i, max(0, -dy) : 8 - max(0, dy), max(0, -dx) : 8 - max(0, dx)]
        out[i, max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    return out


@functools.lru_cache(maxsize=8)
def digits_splits(sigma: float, shift: int, seed: int) -> dict[str, TensorDataset]:
    """scikit-learn digits (the package's stratified 50/10/40 cut) with fixed random shifts and noise."""
    from lr2vq_analysis.datasets import load_digits_splits

    out = {}
    for index, (name, data) in enumerate(load_digits_splits(0).items()):
        x, y = data.tensors
        rng = np.random.default_rng([seed, index])
        images = x.numpy()[:, 0]
        images = _shift(images, rng.integers(-shift, shift + 1, size=(len(images), 2))) if shift else images
        images = images + sigma * rng.normal(size=images.shape)
        out[name] = TensorDataset(torch.tensor(images[:, None], dtype=torch.float32), y)
    return out


@functools.lru_cache(maxsize=8)
def mnist1d_splits(overrides: tuple[tuple[str, float], ...], samples: int = 10_000) -> dict[str, TensorDataset]:
    """MNIST-1D from ``make_dataset(get_dataset_args())`` with overrides (never ``get_dataset``): 80/20, val 10 %."""
    from mnist1d.data import get_dataset_args, make_dataset
    from sklearn.model_selection import train_test_split

    args = get_dataset_args()
    args.num_samples = samples
    for key, value in overrides:
        setattr(args, key, value)
    python_state, numpy_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    try:
        data = make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)  # noqa: NPY002
    x, y = np.asarray(data["x"], dtype=np.float32), np.asarray(data["y"], dtype=np.int64)
    train_x, val_x, train_y, val_y = train_test_split(x, y, test_size=len(y) // 10, stratify=y, random_state=0)

    def dataset(signals: np.ndarray, labels: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.tensor(signals).reshape(len(signals), 1, -1), torch.tensor(labels))

    return {
        "train": dataset(train_x, train_y),
        "val": dataset(val_x, val_y),
        "test": dataset(np.asarray(data["x_test"], dtype=np.float32), np.asarray(data["y_test"], dtype=np.int64)),
    }


# --------------------------------------------------------------------------------------------------
# the zoo


@dataclass(frozen=True)
class Network:
    """One zoo network: how to build it, its data, the compressed layers, its (k, m) settings and half."""

    id: str
    description: str
    build: Callable[[], nn.Module]
    splits: Callable[[], dict[str, TensorDataset]]
    layers: tuple[str, ...]
    settings: tuple[tuple[int, int], ...]
    half: str
    epochs: int = 40
    lr: float = 3e-3
    extra: dict[str, Any] = field(default_factory=dict)


def _conv_keys(
    model: nn.Module, skip_first: bool = True, kinds: tuple[type, ...] = (nn.Conv1d, nn.Conv2d)
) -> tuple[str, ...]:
    keys = [
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, kinds) and getattr(module, "groups", 1) == 1
    ]
    return tuple(keys[1:] if skip_first else keys)


def _transformer_keys(layers: int = 2) -> tuple[str, ...]:
    names = ("query", "key", "value", "out", "up", "down")
    return tuple(f"layers.{i}.{name}.weight" for i in range(layers) for name in names)


def _digits(sigma: float) -> Callable[[], dict[str, TensorDataset]]:
    return lambda: digits_splits(sigma, 1, 0)


def _mnist1d(**overrides: float) -> Callable[[], dict[str, TensorDataset]]:
    return lambda: mnist1d_splits(tuple(sorted(overrides.items())))


ZOO: dict[str, Network] = {
    n.id: n
    for n in (
        Network(
            "Z01",
            "plain CNN 3×3 w16 d4, digits σ0.25",
            lambda: PlainCNN2d(16, 4),
            _digits(0.25),
            _conv_keys(PlainCNN2d(16, 4)),
            ((16, 9), (32, 9)),
            "dev",
            epochs=60,
        ),
        Network(
            "Z02",
            "plain CNN 3×3 w32 d5, digits σ0.35",
            lambda: PlainCNN2d(32, 5),
            _digits(0.35),
            _conv_keys(PlainCNN2d(32, 5)),
            ((16, 9), (32, 9)),
            "held-out",
            epochs=60,
        ),
        Network(
            "Z03",
            "residual CNN 3×3 w24 2 blocks, digits σ0.30",
            lambda: ResNetSmall(24, 2, 2),
            _digits(0.30),
            _conv_keys(ResNetSmall(24, 2, 2)),
            ((16, 9), (32, 18)),
            "dev",
            epochs=60,
        ),
        Network(
            "Z04",
            "depthwise-separable w32, digits σ0.30",
            lambda: DepthwiseSeparable(32),
            _digits(0.30),
            _conv_keys(DepthwiseSeparable(32)),
            ((16, 4), (32, 8)),
            "held-out",
            epochs=60,
        ),
        Network(
            "Z05",
            "plain CNN 5×5 w16 d3, digits σ0.30",
            lambda: PlainCNN2d(16, 3, 5),
            _digits(0.30),
            _conv_keys(PlainCNN2d(16, 3, 5)),
            ((16, 5), (32, 10)),
            "dev",
            epochs=60,
        ),
        Network(
            "Z06",
            "MLP 64-256-256-10, digits σ0.30",
            lambda: MLP(64),
            _digits(0.30),
            ("fc2.weight", "fc3.weight"),
            ((16, 8), (64, 8)),
            "held-out",
            epochs=60,
        ),
        Network(
            "Z07",
            "1-D CNN k3 w32, MNIST-1D defaults",
            lambda: PlainCNN1d(32, 4),
            _mnist1d(),
            _conv_keys(PlainCNN1d(32, 4)),
            ((8, 6), (16, 6)),
            "dev",
        ),
        Network(
            "Z08",
            "1-D CNN k5 w32, MNIST-1D corr_noise 0.4",
            lambda: PlainCNN1d(32, 4, 5),
            _mnist1d(corr_noise_scale=0.4),
            _conv_keys(PlainCNN1d(32, 4, 5)),
            ((16, 5), (32, 10)),
            "held-out",
        ),
        Network(
            "Z09",
            "residual 1-D CNN k3 w48, MNIST-1D max_translation 24",
            lambda: ResNetSmall(48, 2, 1),
            _mnist1d(max_translation=24),
            _conv_keys(ResNetSmall(48, 2, 1)),
            ((16, 6), (32, 6)),
            "dev",
        ),
        Network(
            "Z10",
            "1-D CNN k3 w64, MNIST-1D iid_noise 0.1",
            lambda: PlainCNN1d(64, 4),
            _mnist1d(iid_noise_scale=0.1),
            _conv_keys(PlainCNN1d(64, 4)),
            ((16, 6), (32, 12)),
            "held-out",
        ),
        Network(
            "Z11",
            "MLP 40-256-256-10, MNIST-1D shear 0.5",
            lambda: MLP(40),
            _mnist1d(shear_scale=0.5),
            ("fc2.weight", "fc3.weight"),
            ((16, 8), (32, 8)),
            "dev",
        ),
        Network(
            "Z12",
            "tiny transformer (patch 4, w32, 2 layers, 4 heads), MNIST-1D defaults",
            TinyTransformer,
            _mnist1d(),
            _transformer_keys(),
            ((16, 8), (32, 4)),
            "held-out",
            lr=1e-3,
        ),
    )
}


def weights_path(network_id: str, folder: Path = WEIGHTS) -> Path:
    """Where ``train.py`` writes a network's weights."""
    return folder / f"{network_id}.safetensors"


def load_network(network_id: str, folder: Path = WEIGHTS) -> nn.Module:
    """A trained zoo network (eval mode) from ``weights_path``."""
    from safetensors.torch import load_file

    model = ZOO[network_id].build()
    model.load_state_dict(load_file(str(weights_path(network_id, folder))))
    return model.eval()


def as_task(network_id: str, folder: Path = WEIGHTS) -> Any:
    """The network as an experimental ``sweeps.Task``, registered in ``sweeps.TASKS`` for ``run_sweep``."""
    from lr2vq_analysis.experimental import sweeps

    net = ZOO[network_id]
    task = sweeps.Task(network_id, lambda: load_network(network_id, folder), lambda seed: net.splits(), 0, net.layers)
    sweeps.TASKS[network_id] = task
    return task
