"""Whole-model analysis: one trade-off model per layer, the global d̃, the plan, and a saved report.

:func:`analyze` loads a model's compressible layers, fits a :class:`~lr2vq_analysis.tradeoff.TradeoffModel`
to each (layers are independent, so ``n_jobs`` analyses them in parallel), and collects the results
in a :class:`Report` that converts to a pandas DataFrame, saves to JSON or npz, reloads exactly and
produces the compression plan.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from joblib import Parallel, delayed
from tqdm import tqdm  # plain tqdm: tqdm.auto warns (IProgress) in Jupyter without ipywidgets

from ._html import html_block, html_text
from ._io import write_atomic
from ._report_file import check_report_data, dumps_report, parse_report_json, read_report_text
from ._validation import (
    PROBE_OPTIONS,
    InvalidParameterError,
    InvalidWeightsError,
    check_k,
    check_m,
    check_n_jobs,
    check_options,
    check_rho,
    check_seed,
)
from .exceptions import LR2VQError, ReportFileError
from .plan import LayerPlan, effective_k
from .probes import clustering_error_curve
from .specs import as_specs
from .subvectors import n_subvectors
from .tradeoff import DEFAULT_RHO, TradeoffModel, calibrate_models, fit_tradeoff, global_d_tilde, with_output_curves
from .weights import TOO_FEW_SUBVECTORS, Coverage, LayerInfo, load_weights

__all__ = ["LayerReport", "ModelPrediction", "Report", "analyze", "predict_d_tilde"]

REPORT_FORMAT_VERSION = 1


@dataclass(frozen=True, repr=False)
class LayerReport:
    """The analysis of one layer (a result container: plain attribute names, no fitting).

    Attributes
    ----------
    name : str
        State-dict key of the weight, e.g. ``"layer1.0.conv1.weight"``.
    kind : str
        ``"conv2d"``, ``"conv1d"`` or ``"linear"``.
    shape : tuple of int
        Shape of the weight.
    model : TradeoffModel
        The fitted trade-off model (curves, probes, knee, fitted parameters, ρ).
    measured_curve : numpy.ndarray or None
        Measured k-means clustering error at every d̃ (only with ``measure_full_curve=True``).
    source_dtype : str, default "float32"
        The dtype the source stores the layer in (``"bfloat16"``, ``"float16"``, ...), see
        :attr:`~lr2vq_analysis.weights.LayerInfo.source_dtype`.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    model: TradeoffModel
    measured_curve: np.ndarray | None = None
    source_dtype: str = "float32"

    def __repr__(self) -> str:
        shape = "×".join(str(s) for s in self.shape)
        return (
            f"LayerReport({self.name!r}, {self.kind} {shape}, k={self.k}, m={self.m}, rho={self.rho:g}, "
            f"d_tilde={self.d_tilde}, knee={self.knee})"
        )

    @property
    def k(self) -> int:
        """Number of centroids used for this layer (after PQF's cap on small layers)."""
        return int(self.model.k)

    @property
    def m(self) -> int:
        """Subvector size."""
        return int(self.model.m)

    @property
    def rho(self) -> float:
        """Share of the low-rank error that training does not recover."""
        return float(self.model.rho)

    @property
    def n_weights(self) -> int:
        """Number of weights in the layer."""
        return int(np.prod(self.shape))

    @property
    def n_subvectors(self) -> int:
        """Number of subvectors of size m."""
        return n_subvectors(self.shape, self.m)

    @property
    def lowrank_curve(self) -> np.ndarray:
        """Exact relative low-rank error, d̃ = 1..m."""
        return self.model.lowrank_curve_.copy()

    @property
    def clustering_curve(self) -> np.ndarray:
        """Modelled relative clustering error, d̃ = 1..m."""
        return self.model.clustering_curve_.copy()

    @property
    def total_curve(self) -> np.ndarray:
        """Modelled total error ρ·lowrank + clustering, d̃ = 1..m."""
        return self.rho * self.model.lowrank_curve_ + self.model.clustering_curve_

    @property
    def d_tilde(self) -> int:
        """Predicted clustering dimensionality (argmin of the total)."""
        return int(self.model.d_tilde_)

    @property
    def knee(self) -> int:
        """Reverse water-filling knee: the number of components that get bits at this k."""
        return int(self.model.knee_)

    @property
    def probes(self) -> dict[int, float]:
        """Measured clustering errors used for calibration, {d̃: relative error}."""
        return dict(self.model.probes_)

    def plan(self, d_tilde: int | None = None) -> LayerPlan:
        """The :class:`LayerPlan` for this layer, at the predicted d̃ unless another is given."""
        return LayerPlan(k=self.k, m=self.m, d_tilde=self.d_tilde if d_tilde is None else d_tilde)

    def bits_per_weight(self, d_tilde: int | None = None) -> float:
        """Compressed bits per weight (codes, fp16 codebook and projection; bias excluded)."""
        return sum(self.plan(d_tilde).compressed_bits(self.shape).values()) / self.n_weights

    def with_rho(self, rho: float) -> LayerReport:
        """The same analysis with another ρ (no refit)."""
        return replace(self, model=self.model.with_rho(rho))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; floats are written with full precision, so loading is exact."""
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "model": self.model.to_dict(),
            "measured_curve": None if self.measured_curve is None else [float(v) for v in self.measured_curve],
            "source_dtype": self.source_dtype,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerReport:
        """Inverse of :meth:`to_dict` (check the data with :meth:`Report.from_dict`'s validation first)."""
        measured = data.get("measured_curve")
        model = dict(data["model"])
        model["params"] = {key: math.nan if value is None else value for key, value in model["params"].items()}
        return cls(
            name=str(data["name"]),
            kind=str(data["kind"]),
            shape=tuple(int(s) for s in data["shape"]),
            model=TradeoffModel.from_dict(model),
            measured_curve=None
            if measured is None
            else np.array([math.nan if v is None else v for v in measured], dtype=np.float64),
            source_dtype=str(data.get("source_dtype", "float32")),
        )


class ModelPrediction(dict[str, int]):
    """Predicted d̃ per layer ``{name: d̃}``, plus the one global d̃ for the model.

    Attributes
    ----------
    global_d_tilde : int
        Argmin over d̃ of the size-weighted total error of all layers (the paper uses one d̃).
    """

    def __init__(self, per_layer: Mapping[str, int], global_d_tilde: int) -> None:
        super().__init__(per_layer)
        self.global_d_tilde = int(global_d_tilde)

    def __repr__(self) -> str:
        items = list(self.items())
        shown = ", ".join(f"{name!r}: {d}" for name, d in items[:_REPR_ITEMS])
        more = f", ... ({len(items) - _REPR_ITEMS} more)" if len(items) > _REPR_ITEMS else ""
        return f"ModelPrediction({{{shown}{more}}}, global_d_tilde={self.global_d_tilde})"

    def __call__(self) -> ModelPrediction:
        """Deprecated: ``Report.prediction`` is a property now; ``report.prediction()`` still works."""
        warnings.warn(
            "Report.prediction is a property; use report.prediction instead of report.prediction()",
            DeprecationWarning,
            stacklevel=2,
        )
        return self


_REPR_ITEMS = 4
_HTML_ROWS = 60  # a notebook table shows this many layers, then the first and last ones


class Report(Mapping[str, LayerReport]):
    """Per-layer analysis of a whole model, from :func:`analyze`: a read-only mapping ``{name: LayerReport}``.

    Iterating gives the layer names in model order; ``report[name]`` and ``name in report`` accept a
    name with or without its trailing ``.weight`` (``report["conv2"]`` is ``report["conv2.weight"]``).
    Derived results are properties with plain names (``global_d_tilde``, ``total_curve``,
    ``prediction``); ``plan()``, ``with_rho()`` and the frames are methods.

    Parameters
    ----------
    layers : list of LayerReport
        In model order; names must be unique.
    k, m : int
        Requested number of centroids and subvector size (a layer may use a smaller, capped k).
    skipped : dict, optional
        ``{name: reason}`` for the layers that were not analysed.
    source : str, optional
        Description of where the weights came from.
    coverage : Coverage, optional
        Share of the model's parameters analysed and skipped per reason (from :func:`analyze`).
    package_version : str, optional
        Version of lr2vq-analysis that ran the analysis (default: this one); recorded in report.json.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> report = analyze({"fc.weight": rng.normal(size=(64, 72))}, k=16, m=9, progress=False)
    >>> list(report), "fc" in report, report["fc"] is report["fc.weight"]
    (['fc.weight'], True, True)
    """

    def __init__(
        self,
        layers: Sequence[LayerReport],
        k: int,
        m: int,
        skipped: Mapping[str, str] | None = None,
        source: str = "",
        coverage: Coverage | None = None,
        package_version: str | None = None,
    ) -> None:
        if not layers:
            raise InvalidWeightsError(f"a report needs at least one analysed layer (source {source!r})")
        self.layers = list(layers)
        self._index = {layer.name: layer for layer in self.layers}
        if len(self._index) != len(self.layers):
            duplicates = sorted({layer.name for layer in self.layers if sum(x.name == layer.name for x in layers) > 1})
            raise InvalidParameterError(f"layer names must be unique in a report; repeated: {duplicates}")
        self.k = int(k)
        self.m = int(m)
        self.skipped = dict(skipped or {})
        self.source = source
        self.coverage = coverage
        self.package_version = _package_version() if package_version is None else str(package_version)

    # -- mapping -------------------------------------------------------------------------------------

    def __repr__(self) -> str:
        return (
            f"Report(source={self.source!r}, layers={len(self.layers)}, k={self.k}, m={self.m}, rho={self.rho:g}, "
            f"global_d_tilde={self.global_d_tilde}, skipped={len(self.skipped)})"
        )

    def __len__(self) -> int:
        return len(self.layers)

    def __eq__(self, other: object) -> bool:
        """Reports are equal when their dicts are (the same analysis, ρ, names and settings)."""
        if not isinstance(other, Report):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __iter__(self) -> Iterator[str]:
        return iter([layer.name for layer in self.layers])

    def _resolve(self, name: object) -> str | None:
        if not isinstance(name, str):
            return None
        if name in self._index:
            return name
        if f"{name}.weight" in self._index:
            return f"{name}.weight"
        return None

    def __contains__(self, name: object) -> bool:
        return self._resolve(name) is not None

    def __getitem__(self, name: str) -> LayerReport:
        key = self._resolve(name)
        if key is None:
            names = [layer.name for layer in self.layers]
            shown = ", ".join(repr(n) for n in names[:12]) + (
                f", ... ({len(names) - 12} more)" if len(names) > 12 else ""
            )
            reason = f" (skipped: {self.skipped[name]})" if isinstance(name, str) and name in self.skipped else ""
            raise KeyError(f"no analysed layer named {name!r}{reason}; analysed layers: {shown}")
        return self._index[key]

    # -- results -------------------------------------------------------------------------------------

    @property
    def rho(self) -> float:
        """ρ used for every layer."""
        return self.layers[0].rho

    @property
    def total_curve(self) -> np.ndarray:
        """Size-weighted mean of the layers' modelled total error, d̃ = 1..max m.

        With per-layer m (specs), a layer's curve stays at its value at d̃ = m beyond its m.
        """
        weights = np.array([layer.n_weights for layer in self.layers], dtype=np.float64)
        width = max(layer.m for layer in self.layers)
        curves = np.stack(
            [np.pad(c, (0, width - c.size), mode="edge") for c in (lay.total_curve for lay in self.layers)]
        )
        return weights @ curves / weights.sum()

    def global_total_curve(self) -> np.ndarray:
        """Deprecated alias of :attr:`total_curve`."""
        warnings.warn("Report.global_total_curve() is deprecated; use Report.total_curve", DeprecationWarning, 2)
        return self.total_curve

    @property
    def global_d_tilde(self) -> int:
        """One d̃ for the whole model by the layers' rule (``predictor``), size-weighted over layers."""
        return self._global()[0]

    @property
    def global_d_tilde_range(self) -> tuple[int, int]:
        """Smallest and largest d̃ whose size-weighted predicted total is within the tolerance of the minimum."""
        return self._global()[1]

    @property
    def global_flat(self) -> bool:
        """True when d̃ = m (PQ) is within the tolerance for the whole model: d̃ barely matters."""
        return self._global()[2]

    def _global(self) -> tuple[int, tuple[int, int], bool]:
        return global_d_tilde([layer.model for layer in self.layers], [layer.n_weights for layer in self.layers])

    @property
    def prediction(self) -> ModelPrediction:
        """Predicted d̃ per layer plus the global d̃ (what :func:`predict_d_tilde` returns for a model)."""
        return ModelPrediction({layer.name: layer.d_tilde for layer in self.layers}, self.global_d_tilde)

    def plan(self, which: str = "layer") -> dict[str, LayerPlan]:
        """The compression plan ``{name: LayerPlan}``.

        Parameters
        ----------
        which : {"layer", "global"}
            Use each layer's own predicted d̃, or the model's global d̃ for every layer.
        """
        if which not in ("layer", "global"):
            raise InvalidParameterError(f"which={which!r} is invalid; allowed: 'layer', 'global'")
        d_global = self.global_d_tilde
        return {layer.name: layer.plan(min(d_global, layer.m) if which == "global" else None) for layer in self.layers}

    def with_rho(self, rho: float) -> Report:
        """The same analysis with another ρ: curves and probes are kept, d̃ moves."""
        rho = check_rho(rho)
        layers = [layer.with_rho(rho) for layer in self.layers]
        return Report(layers, self.k, self.m, self.skipped, self.source, self.coverage, self.package_version)

    def to_frame(self) -> pd.DataFrame:
        """One row per layer: shape, sizes, knee, predicted d̃, errors at d̃ and bits per weight.

        ``attrs["coverage"]`` holds :attr:`coverage` as a dict (when known).
        """
        rows = []
        for layer in self.layers:
            d = layer.d_tilde
            rows.append(
                {
                    "name": layer.name,
                    "kind": layer.kind,
                    "shape": "×".join(str(s) for s in layer.shape),
                    "n_weights": layer.n_weights,
                    "n_subvectors": layer.n_subvectors,
                    "k": layer.k,
                    "m": layer.m,
                    "rho": layer.rho,
                    "knee": layer.knee,
                    "d_tilde": d,
                    "predictor": layer.model.predictor,
                    "d_tilde_range": "{}–{}".format(*layer.model.d_tilde_range_),
                    "flat": layer.model.flat_,
                    "d_tilde_by_seed": ", ".join(f"{s}:{v}" for s, v in layer.model.d_tilde_by_seed_.items()),
                    "lowrank_error": float(layer.model.lowrank(d)),
                    "clustering_error": float(layer.model.clustering(d)),
                    "total_error": float(layer.model.total(d)),
                    "bits_per_weight": layer.bits_per_weight(),
                    "probes": ", ".join(f"{p}:{v:.4f}" for p, v in sorted(layer.probes.items())),
                }
            )
        frame = pd.DataFrame(rows)
        if self.coverage is not None:
            frame.attrs["coverage"] = self.coverage.to_dict()
        return frame

    def curves_frame(self) -> pd.DataFrame:
        """Long format, one row per (layer, d̃): low-rank, modelled and measured clustering, total."""
        rows = []
        for layer in self.layers:
            measured = layer.measured_curve
            for i, (low, clu, tot) in enumerate(
                zip(layer.lowrank_curve, layer.clustering_curve, layer.total_curve, strict=True)
            ):
                rows.append(
                    {
                        "name": layer.name,
                        "d_tilde": i + 1,
                        "lowrank_error": float(low),
                        "clustering_error": float(clu),
                        "measured_clustering_error": np.nan if measured is None else float(measured[i]),
                        "total_error": float(tot),
                    }
                )
        return pd.DataFrame(rows)

    def _repr_html_(self) -> str:
        """A summary and a table of the layers, for Jupyter."""
        header = ["layer", "kind", "shape", "k", "knee", "d̃", "near-best d̃", "flat", "total error at d̃", "bits/weight"]
        rows = [
            [
                layer.name,
                layer.kind,
                "×".join(str(s) for s in layer.shape),
                layer.k,
                layer.knee,
                layer.d_tilde,
                "{}–{}".format(*layer.model.d_tilde_range_),
                "yes" if layer.model.flat_ else "",
                f"{layer.model.total(layer.d_tilde):.4g}",
                f"{layer.bits_per_weight():.3g}",
            ]
            for layer in self.layers
        ]
        summary = (
            f"<b>Report</b> of {html_text(self.source or 'a model')}: {len(self.layers)} layers, k ≤ {self.k}, "
            f"m = {self.m}, ρ = {self.rho:.3g}, <b>global d̃ = {self.global_d_tilde}</b> "
            + "(rule {}, near-best {}–{}{})".format(
                html_text(self.layers[0].model.predictor),
                *self.global_d_tilde_range,
                "; flat: PQ (d̃ = m) is as good" if self.global_flat else "",
            )
            + (f", {len(self.skipped)} skipped" if self.skipped else "")
        )
        return html_block(summary, header, rows, max_rows=_HTML_ROWS)

    # -- files ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the whole report (missing values as NaN; :meth:`save` writes them as null)."""
        return {
            "format_version": REPORT_FORMAT_VERSION,
            "package_version": self.package_version,
            "source": self.source,
            "k": self.k,
            "m": self.m,
            "skipped": self.skipped,
            "coverage": None if self.coverage is None else self.coverage.to_dict(),
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: Any) -> Report:
        """Inverse of :meth:`to_dict`; checks every field first.

        Raises
        ------
        ReportFileError
            If a field is missing, has the wrong type, is not finite where it must be, or disagrees
            with another (the message names the layer and the field).
        """
        check_report_data(data)
        try:
            layers = [LayerReport.from_dict(layer) for layer in data["layers"]]
            coverage = None if data.get("coverage") is None else Coverage.from_dict(data["coverage"])
            return cls(
                layers,
                data["k"],
                data["m"],
                data.get("skipped", {}),
                data.get("source", ""),
                coverage,
                data.get("package_version") or "unknown",
            )
        except (
            LR2VQError,
            ValueError,
            TypeError,
            KeyError,
            IndexError,
            AttributeError,
            ArithmeticError,
            RecursionError,
        ) as exc:
            raise ReportFileError(f"the report data is invalid: {exc}") from None

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the report to ``.json`` or ``.npz`` atomically (temporary file, then rename).

        The JSON is standard (no ``NaN`` tokens: missing values are ``null``); both formats
        round-trip exactly through :meth:`load`.

        Raises
        ------
        InvalidParameterError
            For a suffix other than ``.json`` or ``.npz``.
        ReportFileError
            If the report holds a value a report file may not (a non-finite curve value).
        """
        path = Path(path)
        if path.suffix not in (".json", ".npz"):
            raise InvalidParameterError(f"cannot save a report as {path.name!r}; allowed suffixes: .json, .npz")
        try:
            text = dumps_report(self.to_dict())
        except ReportFileError as exc:
            raise ReportFileError(f"refusing to write {str(path)!r}: {exc}") from None
        if path.suffix == ".json":
            payload = text.encode()
        else:
            buffer = io.BytesIO()
            np.savez_compressed(buffer, report_json=np.frombuffer(text.encode(), dtype=np.uint8))
            payload = buffer.getvalue()
        write_atomic(path, payload)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Report:
        """Read a report written by :meth:`save`, checking every field (see ``docs/guarantees.md``).

        Raises
        ------
        ReportFileError
            If the file is missing, not a regular file, too large, not JSON, or not a valid report;
            the message names the file, the field and what is allowed.
        """
        path = Path(path)
        data = parse_report_json(read_report_text(path), f"report file {str(path)!r}")
        try:
            return cls.from_dict(data)
        except ReportFileError as exc:
            raise ReportFileError(f"report file {str(path)!r} is not a valid report: {exc}") from None


def _package_version() -> str:
    from . import __version__

    return str(__version__)


def _analyze_layer(
    info: LayerInfo,
    read: Callable[[], Any],
    k: int,
    m: int,
    rho: float,
    seed: int,
    measure_full_curve: bool,
    probe_options: Mapping[str, Any],
) -> LayerReport:
    weight = read()  # the layer is read here, in its source dtype, and dropped when the job ends
    model = fit_tradeoff(weight, k, m, rho=rho, seed=seed, name=info.name, **probe_options)
    measured = clustering_error_curve(weight, k, m, seed=seed, name=info.name) if measure_full_curve else None
    return LayerReport(info.name, info.kind, info.shape, model, measured, info.source_dtype)


def analyze(
    source: Any,
    k: int = 256,
    m: int = 9,
    *,
    specs: Any = None,
    rho: float = DEFAULT_RHO,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    min_size: int = 0,
    keep_first_conv: bool = False,
    cap_k: bool = True,
    seed: int = 0,
    n_jobs: int = 1,
    progress: bool = True,
    measure_full_curve: bool = False,
    model: Any = None,
    calibration: Any = None,
    **probe_options: Any,
) -> Report:
    """Analyse every compressible layer of a model and predict d̃ per layer and globally.

    Layers stream: each is read from the source in its stored dtype when its analysis starts and
    dropped when it ends, so memory holds ``n_jobs`` layers at a time, not the model (a ``.pt``
    file, a pickle, is the exception: it is read whole).

    Parameters
    ----------
    source : str, path, torch.nn.Module or mapping
        A weight file (``.pt``/``.pth``/``.safetensors``/``.npz``), a bundled model name
        (``"digits-cnn"``), a module or a state dict; see :func:`~lr2vq_analysis.weights.load_weights`.
    k : int, default 256
        Number of centroids.
    m : int, default 9
        Subvector size; layers whose row length it does not divide are skipped with the reason.
    specs : CompressionSpecs, preset name, dict or JSON path, optional
        k and m per layer kind and name glob (:mod:`~lr2vq_analysis.specs`), e.g. ``"pqf-small"``;
        replaces ``k`` and ``m``. Layers the specs skip are listed in ``skipped`` with the reason; a k
        lowered by PQF's cap shows as the layer's ``k``.
    rho : float, default DEFAULT_RHO
        Share of the low-rank error that end-to-end training does not recover, in (0, 1].
    include, exclude : str or list of str, optional
        Glob patterns on layer names.
    min_size : int, default 0
        Layers with fewer weights are skipped.
    keep_first_conv : bool, default False
        Analyse the input stem too (the field keeps the conv that reads the image uncompressed).
    cap_k : bool, default True
        Apply PQF's cap k_eff = min(k, largest power of two <= n_subvectors / 4) on small layers;
        layers with fewer than 8 subvectors are then skipped. With ``cap_k=False`` a k that is
        too large for a layer raises :class:`~lr2vq_analysis.InvalidParameterError`.
    seed : int, default 0
        Seed of every k-means probe.
    n_jobs : int, default 1
        Layers analysed in parallel (threads; -1 uses all cores).
    progress : bool, default True
        Show a progress bar over layers.
    measure_full_curve : bool, default False
        Also run k-means at every d̃ on all subvectors (slow; for validating the model).
    model : torch.nn.Module, optional
        The runnable model for ``calibration`` (default: ``source`` when it is a module).
    calibration : tensor, list of batches or DataLoader, optional
        Inputs of ``model``: adds the output-space curves to every layer
        (:func:`~lr2vq_analysis.tradeoff.calibrate_models`) and makes
        :data:`~lr2vq_analysis.tradeoff.DEFAULT_CALIBRATED_PREDICTOR` the default rule.
    **probe_options
        Passed to :func:`~lr2vq_analysis.tradeoff.fit_tradeoff` (``predictor=``, ``tolerance=``,
        ``stability_seeds=``, ``n_probes=``, ...).

    Returns
    -------
    Report

    Raises
    ------
    InvalidParameterError, InvalidWeightsError, WeightFileError

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> state = {"conv1.weight": rng.normal(size=(8, 1, 3, 3)), "conv2.weight": rng.normal(size=(32, 16, 3, 3))}
    >>> report = analyze(state, k=16, m=9, progress=False)
    >>> [layer.name for layer in report.layers], sorted(report.skipped)
    (['conv2.weight'], ['conv1.weight'])
    >>> 1 <= report.global_d_tilde <= 9
    True
    """
    layer_specs = None if specs is None else as_specs(specs)
    k = check_k(k) if layer_specs is None else layer_specs.k
    m = check_m(m) if layer_specs is None else (layer_specs.m or 0)
    rho = check_rho(rho)
    seed = check_seed(seed)
    n_jobs = check_n_jobs(n_jobs)
    probe_options = check_options(probe_options, PROBE_OPTIONS, what="probe option")
    predictor = probe_options.pop("predictor", None)
    if predictor is not None and not str(predictor).endswith("-output"):
        probe_options["predictor"] = predictor
    weights = load_weights(
        source,
        m=m if layer_specs is None else None,
        include=include,
        exclude=exclude,
        min_size=min_size,
        keep_first_conv=keep_first_conv,
    )
    skipped = dict(weights.skipped)
    coverage = weights.coverage
    jobs = []
    for name, info in weights.info.items():  # layers stream: each job reads its own, one at a time per job
        if layer_specs is not None:
            resolved = layer_specs.resolve(name, info.shape, groups=getattr(info, "groups", None))
            if resolved.skip_reason is not None or resolved.k is None or resolved.m is None:
                skipped[name] = str(resolved.skip_reason)
                coverage = coverage.skip(f"by the specs: {str(resolved.skip_reason).split(' (')[0]}", info.size)
                continue
            layer_k, layer_m = resolved.k, resolved.m
        else:
            layer_m = m
            layer_k = effective_k(k, info.shape, m) if cap_k else k
            if cap_k and n_subvectors(info.shape, m) < 8:
                skipped[name] = f"only {n_subvectors(info.shape, m)} subvectors of size m={m}; too few to cluster"
                coverage = coverage.skip(TOO_FEW_SUBVECTORS, info.size)
                continue
        read = partial(weights.tensor, name)
        jobs.append(delayed(_analyze_layer)(info, read, layer_k, layer_m, rho, seed, measure_full_curve, probe_options))
    if not jobs:
        raise InvalidWeightsError(f"no layer of {describe_source(source)} can be analysed at m={m}: {skipped}")
    results = Parallel(n_jobs=n_jobs, prefer="threads", return_as="generator", pre_dispatch="n_jobs")(jobs)
    layers = list(tqdm(results, total=len(jobs), desc="analyze", unit="layer", disable=not progress))
    if layer_specs is not None and not m:
        m = max((lay.m for lay in layers), key=[lay.m for lay in layers].count)  # the most common m
    if calibration is not None or (predictor is not None and str(predictor).endswith("-output")):
        layers = _with_predictor(layers, source if model is None else model, calibration, seed, predictor)
    return Report(layers, k=k, m=m, skipped=skipped, source=describe_source(source), coverage=coverage)


def _with_predictor(
    layers: list[LayerReport], module: Any, calibration: Any, seed: int, predictor: str | None
) -> list[LayerReport]:
    """Add output-space curves from ``calibration`` (when given) and set each layer's rule."""
    if calibration is None:
        return [replace(layer, model=layer.model.with_predictor(str(predictor))) for layer in layers]
    if not isinstance(module, torch.nn.Module):
        raise InvalidParameterError(
            f"calibration= needs a runnable model: pass model= (a torch.nn.Module), got {type(module).__name__}"
        )
    state = module.state_dict()
    fitted = {layer.name: (state[layer.name], layer.model) for layer in layers}
    models = calibrate_models(module, calibration, fitted, seed=seed, predictor=predictor)
    return [replace(layer, model=models[layer.name]) for layer in layers]


def describe_source(source: Any) -> str:
    """Short text naming where weights came from, for reports and messages."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return type(source).__name__


def predict_d_tilde(
    weights: Any,
    k: int = 256,
    m: int = 9,
    *,
    specs: Any = None,
    rho: float = DEFAULT_RHO,
    seed: int = 0,
    **options: Any,
) -> int | ModelPrediction:
    """Predict the best clustering dimensionality d̃ before any fine-tuning.

    Parameters
    ----------
    weights : array-like, torch.Tensor, str, path, torch.nn.Module or mapping
        One layer's weight (2-D, 3-D or 4-D array or tensor) → one d̃; anything else is treated as a
        whole model (see :func:`analyze`) → d̃ per layer plus one global d̃.
    k : int, default 256
        Number of centroids.
    m : int, default 9
        Subvector size.
    specs : CompressionSpecs, preset name, dict or JSON path, optional
        k and m by layer kind / name (replaces ``k`` and ``m``); a single layer is resolved by its shape.
    rho : float, default DEFAULT_RHO
        Share of the low-rank error that training does not recover, in (0, 1].
    seed : int, default 0
        Seed of the k-means probes.
    **options
        For a single layer, passed to :func:`~lr2vq_analysis.tradeoff.fit_tradeoff`, except
        ``calibration=``: the layer's input second moment H (groups × L × L, from
        :func:`~lr2vq_analysis.calibration.collect_second_moments`), which adds the output-space curves;
        for a model, to :func:`analyze` (``model=``, ``calibration=`` inputs, ``predictor=``;
        ``progress`` defaults to False here).

    Returns
    -------
    int or ModelPrediction

    Examples
    --------
    >>> import numpy as np
    >>> w = np.random.default_rng(0).normal(size=(64, 16, 3, 3))
    >>> d = predict_d_tilde(w, k=32, m=9)
    >>> 1 <= d <= 9
    True
    """
    if isinstance(weights, np.ndarray) or (hasattr(weights, "detach") and hasattr(weights, "shape")):
        if specs is not None:
            resolved = as_specs(specs).resolve(options.get("name") or "", tuple(weights.shape))
            if resolved.k is None or resolved.m is None:
                raise InvalidParameterError(f"the specs leave this layer uncompressed: {resolved.skip_reason}")
            k, m = resolved.k, resolved.m
        calibration = options.pop("calibration", None)
        if calibration is None:
            return int(fit_tradeoff(weights, k, m, rho=rho, seed=seed, **options).d_tilde_)
        predictor = options.pop("predictor", None)
        fitted = fit_tradeoff(weights, k, m, rho=rho, seed=seed, **options)
        return int(with_output_curves(fitted, weights, calibration, seed=seed, predictor=predictor).d_tilde_)
    options.setdefault("progress", False)
    return analyze(weights, k, m, specs=specs, rho=rho, seed=seed, **options).prediction
