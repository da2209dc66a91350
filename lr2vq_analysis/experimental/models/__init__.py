"""Experimental model wrappers (no stability promise): the MNIST-1D CNN and all-MiniLM-L6-v2.

The MNIST-1D CNN's pretrained weights ship with the package (``lr2vq_analysis/data``) and are listed in
:mod:`lr2vq_analysis.registry`; all-MiniLM-L6-v2 needs the ``bench`` extra (``transformers`` is imported
lazily).
"""

from .minilm import SentenceEncoder, load_minilm
from .mnist1d import Mnist1DCNN, load_mnist1d_cnn

__all__ = ["Mnist1DCNN", "SentenceEncoder", "load_minilm", "load_mnist1d_cnn"]
