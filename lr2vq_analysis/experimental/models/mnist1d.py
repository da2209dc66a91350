"""A small 1-D CNN for MNIST-1D (Greydanus, "Scaling down deep learning", 2020), pretrained by the project.

MNIST-1D separates models more than scikit-learn's digits does, and it exercises the Conv1d path of the
compressed layers. Channel widths are chosen for compression experiments:

- ``conv1`` (1 → 32, kernel 5) stays uncompressed, as PQF keeps the first conv;
- ``conv2`` (32 → 64), ``conv3`` and ``conv4`` (64 → 64) have kernel 3, so their row lengths C_in·3 are
  96 and 192: both are divisible by m ∈ {1, 2, 3, 4, 6, 8, 12, 16, 24} (m = 3 is one kernel, m = 6 two
  adjacent input channels of one filter);
- at m = 3 they have 2,048, 4,096 and 4,096 subvectors; 31,978 parameters in all.

The weights ship as ``lr2vq_analysis/data/mnist1d_cnn.safetensors`` (written by
``scripts/train_mnist1d_cnn.py``, which records its command and accuracies in ``mnist1d_cnn.json``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..._validation import WeightFileError
from ...registry import weights_path

__all__ = ["MNIST1D_CNN_PATH", "Mnist1DCNN", "load_mnist1d_cnn"]

#: The shipped pretrained weights (the registry's ``mnist1d-cnn``).
MNIST1D_CNN_PATH: Path = weights_path("mnist1d-cnn")


class Mnist1DCNN(nn.Module):
    """Four Conv1d + BatchNorm + ReLU blocks, two max-pools, global average pooling and a linear classifier.

    Input (N, 1, 40): one MNIST-1D signal per row. A max-pool by 2 follows ``conv2`` and ``conv3``
    (40 → 20 → 10 positions); global average pooling makes the classifier translation invariant,
    which suits MNIST-1D's randomly shifted signals.

    Parameters
    ----------
    num_classes : int, default 10
    widths : tuple of 4 ints, default (32, 64, 64, 64)
        Output channels of conv1..conv4.

    Examples
    --------
    >>> import torch
    >>> model = Mnist1DCNN()
    >>> model(torch.zeros(2, 1, 40)).shape
    torch.Size([2, 10])
    >>> sum(p.numel() for p in model.parameters())
    31978
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int, int] = (32, 64, 64, 64)) -> None:
        super().__init__()
        c1, c2, c3, c4 = widths
        self.conv1 = nn.Conv1d(1, c1, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm1d(c1)
        self.conv2 = nn.Conv1d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(c2)
        self.conv3 = nn.Conv1d(c2, c3, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm1d(c3)
        self.conv4 = nn.Conv1d(c3, c4, 3, padding=1, bias=False)
        self.bn4 = nn.BatchNorm1d(c4)
        self.pool = nn.MaxPool1d(2)
        self.fc = nn.Linear(c4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = self.pool(torch.relu(self.bn3(self.conv3(x))))
        x = torch.relu(self.bn4(self.conv4(x)))
        return self.fc(x.mean(dim=2))


def load_mnist1d_cnn(path: str | Path | None = None) -> Mnist1DCNN:
    """Return the pretrained MNIST-1D CNN, in eval mode, on the CPU.

    Parameters
    ----------
    path : path, optional
        A safetensors file written by ``scripts/train_mnist1d_cnn.py``. Default: the shipped
        :data:`MNIST1D_CNN_PATH`.

    Returns
    -------
    Mnist1DCNN

    Raises
    ------
    WeightFileError
        If the file is missing or does not match the architecture.

    Examples
    --------
    >>> model = load_mnist1d_cnn()
    >>> type(model).__name__, model.training
    ('Mnist1DCNN', False)
    """
    from safetensors.torch import load_file

    path = Path(path) if path is not None else MNIST1D_CNN_PATH
    model = Mnist1DCNN()
    if not path.is_file():
        raise WeightFileError(
            f"MNIST-1D CNN weights not found at {path}; create them with `python scripts/train_mnist1d_cnn.py`"
        )
    try:
        model.load_state_dict(load_file(str(path)))
    except (OSError, RuntimeError, ValueError) as exc:
        raise WeightFileError(f"MNIST-1D CNN: cannot load {path}: {exc}") from None
    return model.eval()
