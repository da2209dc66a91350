"""LR²VQ model compression: low-rank representation + vector quantization of neural-network weights."""

from ._validation import InvalidParameterError, InvalidWeightsError, LR2VQError, WeightFileError
from .plan import LayerPlan, effective_k
from .spectrum import Spectrum, compute_spectrum, lowrank_error_curve
from .subvectors import from_subvectors, to_subvectors

__version__ = "0.1.0"
