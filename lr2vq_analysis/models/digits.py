"""The bundled default model: a small CNN with 3×3 convolutions for scikit-learn's 8×8 digits.

Channel widths are chosen for compression experiments:

- ``conv1`` (1 → 16) stays uncompressed, as PQF keeps the first conv;
- every compressed conv has an even number of input channels, so its row length C_in·9 is divisible
  by both m = 9 (one spatial kernel) and m = 18 (two adjacent input channels);
- ``conv3`` (32 → 64) and ``conv4`` (64 → 64) have 2,048 and 4,096 subvectors at m = 9, so PQF's
  k cap (n / 4) allows k = 256 on them; ``conv2`` (16 → 32, 512 subvectors) caps k at 128;
- 61,050 parameters, about 245 KB as fp32 safetensors.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsCNN", "load_bundled_model"]


class DigitsCNN(nn.Module):
    """Four 3×3 conv + BatchNorm + ReLU blocks, global average pooling and a linear classifier.

    Input (N, 1, 8, 8) in [0, 1]; a 2×2 max-pool after ``conv2`` halves the 8×8 maps to 4×4.

    Parameters
    ----------
    num_classes : int, default 10
    widths : tuple of 4 ints, default (16, 32, 64, 64)
        Output channels of conv1..conv4.

    Examples
    --------
    >>> import torch
    >>> model = DigitsCNN()
    >>> model(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    >>> sum(p.numel() for p in model.parameters())
    61050
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int, int] = (16, 32, 64, 64)) -> None:
        super().__init__()
        c1, c2, c3, c4 = widths
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c3)
        self.conv4 = nn.Conv2d(c3, c4, 3, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(c4)
        self.fc = nn.Linear(c4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.relu(self.bn3(self.conv3(x)))
        x = torch.relu(self.bn4(self.conv4(x)))
        return self.fc(x.mean(dim=(2, 3)))


def load_bundled_model(name: str = "digits-cnn") -> nn.Module:
    """Return a named pretrained model, in eval mode, on the CPU.

    Parameters
    ----------
    name : str, default "digits-cnn"
        A name of :data:`lr2vq_analysis.registry.MODELS` (:func:`lr2vq_analysis.registry.load_model`).

    Returns
    -------
    torch.nn.Module

    Raises
    ------
    InvalidParameterError
        If ``name`` is not a bundled model.
    WeightFileError
        If the bundled weight file is missing or does not match the architecture.

    Examples
    --------
    >>> model = load_bundled_model()
    >>> type(model).__name__, model.training
    ('DigitsCNN', False)
    """
    from ..registry import load_model

    return load_model(name)
