"""LR²VQ model compression: low-rank representation + vector quantization of neural-network weights.

The pipeline, one module per stage (data flows one way):

``weights`` → ``subvectors`` → ``spectrum`` → ``kmeans`` / ``probes`` → ``tradeoff`` → ``plan`` →
``report`` → ``nn`` (compressed layers) → ``finetune`` → ``size`` / ``export`` → ``plots`` / ``cli``.
"""

from . import exceptions
from .exceptions import InvalidParameterError, InvalidWeightsError, LR2VQError, WeightFileError
from .export import load_compressed, save_compressed
from .finetune import FinetuneResult, finetune, recalibrate_batchnorm
from .kmeans import KMeans, kmeans
from .nn import CompressedModel, LR2VQConv1d, LR2VQConv2d, LR2VQLinear, compress
from .plan import LayerPlan, effective_k
from .planner import Plan, plan_for_size
from .probes import clustering_error_curve
from .report import LayerReport, ModelPrediction, Report, analyze, predict_d_tilde
from .size import SizeReport, size_report
from .specs import CompressionSpecs
from .spectrum import Spectrum, compute_spectrum, lowrank_error_curve
from .subvectors import from_subvectors, to_subvectors
from .tradeoff import DEFAULT_RHO, TradeoffModel, fit_tradeoff
from .weights import WeightSet, load_weights

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_RHO",
    "CompressedModel",
    "CompressionSpecs",
    "FinetuneResult",
    "InvalidParameterError",
    "InvalidWeightsError",
    "KMeans",
    "LR2VQConv1d",
    "LR2VQConv2d",
    "LR2VQError",
    "LR2VQLinear",
    "LayerPlan",
    "LayerReport",
    "ModelPrediction",
    "Plan",
    "Report",
    "SizeReport",
    "Spectrum",
    "TradeoffModel",
    "WeightFileError",
    "WeightSet",
    "__version__",
    "analyze",
    "exceptions",
    "clustering_error_curve",
    "compress",
    "compute_spectrum",
    "effective_k",
    "finetune",
    "fit_tradeoff",
    "from_subvectors",
    "kmeans",
    "load_compressed",
    "load_weights",
    "plan_for_size",
    "lowrank_error_curve",
    "predict_d_tilde",
    "recalibrate_batchnorm",
    "save_compressed",
    "size_report",
    "to_subvectors",
]
