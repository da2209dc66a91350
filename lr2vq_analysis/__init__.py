"""LR²VQ model compression: low-rank representation + vector quantization of neural-network weights.

The pipeline, one module per stage (data flows one way):

``weights`` → ``subvectors`` → ``spectrum`` → ``kmeans`` / ``probes`` → ``tradeoff`` → ``plan`` →
``report`` → ``nn`` (compressed layers) → ``finetune`` → ``size`` / ``export`` → ``plots`` / ``cli``.
"""

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from . import exceptions
from .exceptions import InvalidParameterError, InvalidWeightsError, LR2VQError, WeightFileError

if TYPE_CHECKING:  # the same names, for type checkers and IDEs
    from .export import load_compressed, save_compressed
    from .finetune import FinetuneResult, finetune, recalibrate_batchnorm
    from .kmeans import KMeans, KMeansConfig, kmeans
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

#: Public name → the module that defines it; imported on first use (PEP 562), so that
#: ``import lr2vq_analysis`` and the command line's ``--help`` do not import torch.
_EXPORTS: dict[str, str] = {
    "CompressedModel": "nn",
    "CompressionSpecs": "specs",
    "DEFAULT_RHO": "tradeoff",
    "FinetuneResult": "finetune",
    "KMeans": "kmeans",
    "KMeansConfig": "kmeans",
    "LR2VQConv1d": "nn",
    "LR2VQConv2d": "nn",
    "LR2VQLinear": "nn",
    "LayerPlan": "plan",
    "LayerReport": "report",
    "ModelPrediction": "report",
    "Plan": "planner",
    "Report": "report",
    "SizeReport": "size",
    "Spectrum": "spectrum",
    "TradeoffModel": "tradeoff",
    "WeightSet": "weights",
    "analyze": "report",
    "clustering_error_curve": "probes",
    "compress": "nn",
    "compute_spectrum": "spectrum",
    "effective_k": "plan",
    "finetune": "finetune",
    "fit_tradeoff": "tradeoff",
    "from_subvectors": "subvectors",
    "kmeans": "kmeans",
    "load_compressed": "export",
    "load_weights": "weights",
    "lowrank_error_curve": "spectrum",
    "plan_for_size": "planner",
    "predict_d_tilde": "report",
    "recalibrate_batchnorm": "finetune",
    "save_compressed": "export",
    "size_report": "size",
    "to_subvectors": "subvectors",
}

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_RHO",
    "CompressedModel",
    "CompressionSpecs",
    "FinetuneResult",
    "InvalidParameterError",
    "InvalidWeightsError",
    "KMeans",
    "KMeansConfig",
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


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps ``lr2vq_analysis.kmeans`` / ``.finetune`` the functions when their submodules are imported.

    Importing a submodule sets it as an attribute of the package; where a public function has the name of
    its module, the function is kept, as the eager ``from .kmeans import kmeans`` did.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{_EXPORTS.get(name)}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
