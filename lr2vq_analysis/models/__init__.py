"""Model architectures: the bundled pretrained CNNs (digits, MNIST-1D) and weight-free ResNet skeletons."""

from .digits import DigitsCNN, load_bundled_model
from .mnist1d import Mnist1DCNN, load_mnist1d_cnn
from .resnet import resnet18, resnet50

__all__ = ["DigitsCNN", "Mnist1DCNN", "load_bundled_model", "load_mnist1d_cnn", "resnet18", "resnet50"]
