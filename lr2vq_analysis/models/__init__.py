"""Model architectures: the bundled pretrained digits CNN and weight-free ResNet skeletons.

Every bundled model (its weights file, architecture and data set) is listed once in
:mod:`lr2vq_analysis.registry`; the MNIST-1D CNN and all-MiniLM-L6-v2 wrappers are experimental
(:mod:`lr2vq_analysis.experimental.models`).
"""

from .digits import DigitsCNN, load_bundled_model
from .resnet import resnet18, resnet50

__all__ = ["DigitsCNN", "load_bundled_model", "resnet18", "resnet50"]
