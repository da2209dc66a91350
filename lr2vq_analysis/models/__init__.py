"""Model architectures: the bundled pretrained digits CNN and weight-free ResNet skeletons."""

from .digits import DigitsCNN, load_bundled_model
from .resnet import resnet18, resnet50

__all__ = ["DigitsCNN", "load_bundled_model", "resnet18", "resnet50"]
