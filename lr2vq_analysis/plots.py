"""Figures for reports and papers: trade-off curves, model overview, spectra and sizes.

Every plot function draws with one style (:func:`plot_style`: Okabe–Ito colour-blind-safe palette,
one font size scale, no top/right spines, light horizontal grid), returns the matplotlib
:class:`~matplotlib.figure.Figure` and accepts an optional ``ax`` to draw into an existing axes.
Figures are created through :mod:`matplotlib.pyplot`, so they show inline in Jupyter; in scripts
close them with ``matplotlib.pyplot.close(fig)`` (:func:`save_report_figures` does). Nothing here
needs a display: headless runs use the Agg backend.

:func:`save_figure` writes PNG at 300 dpi plus vector formats (SVG, PDF), each file atomically.

The sweep figures (size frontier, metric against d̃) are experimental: :mod:`lr2vq_analysis.experimental.plots`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from cycler import cycler
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from ._io import write_atomic
from ._validation import InvalidParameterError

if TYPE_CHECKING:  # imported for annotations only: plots never needs the heavy stages at import time
    from .report import LayerReport, Report
    from .tradeoff import TradeoffModel

__all__ = [
    "COLORS",
    "plot_style",
    "save_figure",
    "plot_tradeoff",
    "plot_tradeoff_grid",
    "plot_overview",
    "plot_spectra",
    "plot_size_breakdown",
    "save_report_figures",
    "figure_file_stem",
    "flat_band",
    "layer_group",
    "MAX_LAYER_PANELS",
]

#: Okabe & Ito (2008) colour-blind-safe palette, by role.
COLORS: dict[str, str] = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky": "#56B4E9",
    "green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "purple": "#CC79A7",
    "grey": "#7F7F7F",
}
_CYCLE = [COLORS[c] for c in ("blue", "vermillion", "green", "orange", "purple", "sky", "black", "yellow")]

_D_TILDE = r"$\tilde{d}$"
_ENERGY = r"fraction of $\Vert W\Vert^2$"

_STYLE: dict[Any, Any] = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "figure.titlesize": 11,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.grid.axis": "y",
    "grid.color": "#DDDDDD",
    "grid.linewidth": 0.6,
    "axes.axisbelow": True,
    "axes.prop_cycle": cycler(color=_CYCLE),
    "axes.titlelocation": "left",
    "lines.linewidth": 1.6,
    "lines.markersize": 5,
    "legend.frameon": False,
    "image.cmap": "cividis",
    "figure.dpi": 100,
    "savefig.dpi": 300,
    "savefig.bbox": "tight",
    "pdf.fonttype": 42,  # TrueType in PDFs: publishers reject Type 3 fonts
    "ps.fonttype": 42,
    "svg.fonttype": "path",
}


@contextlib.contextmanager
def plot_style() -> Iterator[None]:
    """The package's figure style, as a context manager around matplotlib's rcParams.

    Every plot function of this module draws inside it; use it for your own figures to match. Only
    the style's own settings are restored on exit (not, as ``matplotlib.rc_context`` does, every
    setting): Jupyter's inline backend switches on interactive mode when the first figure is drawn,
    and undoing that would stop later figures from showing.

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> with plot_style():
    ...     fig, ax = plt.subplots()
    >>> ax.spines["top"].get_visible()
    False
    >>> plt.close(fig)
    """
    saved = {key: matplotlib.rcParams[key] for key in _STYLE}
    matplotlib.rcParams.update(_STYLE)
    try:
        yield
    finally:
        matplotlib.rcParams.update(saved)


def _styled(func: Callable[..., Figure]) -> Callable[..., Figure]:
    """Run a plot function inside :func:`plot_style` (artists take their style when created)."""

    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        with plot_style():
            return func(*args, **kwargs)

    wrapper.__name__ = func.__name__
    wrapper.__qualname__ = func.__qualname__
    wrapper.__doc__ = func.__doc__
    wrapper.__module__ = func.__module__
    wrapper.__wrapped__ = func  # type: ignore[attr-defined]
    return wrapper


def _figure_and_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        if not isinstance(ax, Axes):
            raise InvalidParameterError(f"ax={ax!r} is invalid; pass a matplotlib Axes or None")
        figure = ax.get_figure()
        assert isinstance(figure, Figure)
        return figure, ax
    figure, new_ax = plt.subplots(figsize=figsize, layout="constrained")
    return figure, new_ax


def _figure_legend(figure: Figure, ax: Axes, owned: bool, ncols: int) -> None:
    """Legend below the figure when this module created it (never covers data), else inside the axes."""
    handles, labels = ax.get_legend_handles_labels()
    # Lines with error bars (the measured methods) first, reference lines and markers after.
    order = sorted(range(len(handles)), key=lambda i: not isinstance(handles[i], ErrorbarContainer))
    handles, labels = [handles[i] for i in order], [labels[i] for i in order]
    if owned:
        figure.legend(handles, labels, loc="outside lower center", ncols=min(ncols, len(labels)))
    else:
        ax.legend(handles, labels, loc="best")


def _ellipsize(text: str, limit: int) -> str:
    """Keep the end of a long layer name (its most specific part)."""
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


def _printable(text: str) -> str:
    """Text a font can draw: lone surrogates (undecodable file-system names) become ``\\udcxx`` escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _short_name(name: str) -> str:
    """Layer label for axes: the state-dict key without its trailing ``.weight``."""
    name = _printable(name)
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _format_rho(rho: float) -> str:
    return f"{rho:.3g}"


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------

_SAVE_FORMATS = ("png", "svg", "pdf")


def save_figure(
    fig: Figure,
    path_stem: str | os.PathLike[str],
    formats: Sequence[str] = ("png", "svg"),
    *,
    dpi: int = 300,
) -> list[Path]:
    """Write a figure as PNG (``dpi``, default 300) and vector formats, each file atomically.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
    path_stem : str or path
        Path without suffix; ``"out/tradeoff"`` writes ``out/tradeoff.png``, ``out/tradeoff.svg``, ...
        A suffix that names one of the formats is dropped, so ``"out/tradeoff.png"`` works too.
    formats : sequence of {"png", "svg", "pdf"}, default ("png", "svg")
    dpi : int, default 300
        Resolution of raster formats.

    Returns
    -------
    list of pathlib.Path
        The files written, in the order of ``formats``.

    Raises
    ------
    InvalidParameterError
        For an unknown format or an empty list of formats.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> import matplotlib.pyplot as plt
    >>> fig, ax = plt.subplots()
    >>> _ = ax.plot([1, 2, 3])
    >>> paths = save_figure(fig, pathlib.Path(tempfile.mkdtemp()) / "line", formats=("png", "svg"))
    >>> [p.suffix for p in paths]
    ['.png', '.svg']
    >>> plt.close(fig)
    """
    if isinstance(formats, str):
        formats = (formats,)
    formats = [str(f).lower().lstrip(".") for f in formats]
    if not formats or any(f not in _SAVE_FORMATS for f in formats):
        raise InvalidParameterError(f"formats={formats!r} is invalid; choose one or more of {_SAVE_FORMATS}")
    stem = Path(path_stem)
    if stem.suffix.lstrip(".").lower() in _SAVE_FORMATS:
        stem = stem.with_suffix("")
    written = []
    # A constrained layout already fits everything inside the figure; "tight" would draw it twice.
    laid_out = fig.get_layout_engine() is not None
    for fmt in formats:
        buffer = io.BytesIO()
        # A fixed creation date keeps SVG/PDF output byte-identical between runs.
        metadata: dict[str, Any] | None = {"Date": None} if fmt in ("svg", "pdf") else None
        # Fast PNG compression: a third of the encoding time for files about 15 % larger.
        extra: dict[str, Any] = {"pil_kwargs": {"compress_level": 3}} if fmt == "png" else {}
        with plot_style():
            fig.savefig(
                buffer,
                format=fmt,
                dpi=dpi,
                bbox_inches=None if laid_out else "tight",
                pad_inches=0.05,
                metadata=metadata,
                **extra,
            )
        written.append(write_atomic(stem.parent / f"{stem.name}.{fmt}", buffer.getvalue()))
    return written


# --------------------------------------------------------------------------------------------------
# Trade-off curves of one layer
# --------------------------------------------------------------------------------------------------


#: Above this many layers, report figures summarise the layers by kind instead of one panel (or one
#: file) per layer.
MAX_LAYER_PANELS: int = 12


def _tolerance(tolerance: float | None) -> float:
    """``tolerance``, or the reports' default :data:`~lr2vq_analysis.tradeoff.DEFAULT_TOLERANCE` for None."""
    from .tradeoff import DEFAULT_TOLERANCE  # not at import time: plots does not need the fitting stages

    return DEFAULT_TOLERANCE if tolerance is None else tolerance


def flat_band(total: Sequence[float] | np.ndarray, tolerance: float | None = None) -> tuple[int, int]:
    """The d̃ range whose total error is within ``tolerance`` of its minimum, as reports compute it.

    :func:`~lr2vq_analysis.tradeoff.near_best_range` without a rule's d̃: smallest and largest d̃
    (1-based) with ``total <= min · (1 + tolerance)``. The default tolerance is the reports'
    :data:`~lr2vq_analysis.tradeoff.DEFAULT_TOLERANCE` (5 %).

    Examples
    --------
    >>> flat_band([0.30, 0.104, 0.100, 0.1045, 0.2])
    (2, 4)
    >>> flat_band([0.30, 0.104, 0.100, 0.1045, 0.2], tolerance=0.02)
    (3, 3)
    """
    from .tradeoff import near_best_range

    return near_best_range(total, _tolerance(tolerance))


def __getattr__(name: str) -> Any:
    if name == "FLAT_TOLERANCE":  # the figures' own 2 % band, replaced by the reports' tolerance
        from .tradeoff import DEFAULT_TOLERANCE

        warnings.warn(
            "plots.FLAT_TOLERANCE is deprecated since 0.1.0 and will be removed in 0.2.0: the figures use the "
            "reports' tolerance, lr2vq_analysis.tradeoff.DEFAULT_TOLERANCE",
            DeprecationWarning,
            stacklevel=2,
        )
        return DEFAULT_TOLERANCE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_DIGITS = re.compile(r"^\d+$")


def layer_group(name: str) -> tuple[str, str]:
    """(block, kind) of a layer name: the prefix up to its first numeric part, and the rest.

    Transformer and ResNet names repeat one set of layer kinds per numbered block; this is how the
    figures group them. Names without a numeric part form one block ``""``.

    Examples
    --------
    >>> layer_group("encoder.layer.3.attention.self.query.weight")
    ('encoder.layer.3', 'attention.self.query')
    >>> layer_group("layer1.0.conv2.weight")
    ('layer1.0', 'conv2')
    >>> layer_group("conv3.weight")
    ('', 'conv3')
    """
    parts = _short_name(name).split(".")
    for index, part in enumerate(parts):
        if _DIGITS.match(part):
            return ".".join(parts[: index + 1]), ".".join(parts[index + 1 :]) or "(weight)"
    return "", ".".join(parts)


@dataclass(frozen=True)
class _LayerCurves:
    """What a trade-off plot needs, taken from a LayerReport or a TradeoffModel."""

    name: str
    k: int
    m: int
    rho: float
    lowrank: np.ndarray
    clustering: np.ndarray
    total: np.ndarray
    probes: dict[int, float]
    d_tilde: int
    measured: np.ndarray | None
    n_subvectors: int | None = None
    subsample: dict[int, int] | None = None  # probe d̃ → subvectors it was trained on, for subsampled probes
    estimates: dict[int, float] | None = None  # probe d̃ → its estimate of the error on all subvectors
    predictor: str = "rho"
    tolerance: float = 0.05
    band: tuple[int, int] = (1, 1)  # the reported d̃ range (near_best_range of the rule's objective)
    flat: bool = False
    lowrank_output: np.ndarray | None = None
    clustering_output: np.ndarray | None = None

    @property
    def total_output(self) -> np.ndarray | None:
        if self.lowrank_output is None or self.clustering_output is None:
            return None
        return self.rho * self.lowrank_output + self.clustering_output

    @classmethod
    def of(
        cls, layer: LayerReport | TradeoffModel, measured: Sequence[float] | None, tolerance: float | None = None
    ) -> _LayerCurves:
        model: Any = getattr(layer, "model", layer)  # LayerReport wraps a TradeoffModel
        if not all(hasattr(model, attr) for attr in ("lowrank", "clustering", "total", "k", "m", "rho")):
            raise InvalidParameterError(
                f"cannot plot a {type(layer).__name__}; pass a LayerReport (report.layers[i]) or a TradeoffModel"
            )
        m = int(model.m)
        d = np.arange(1, m + 1)
        if measured is None:
            measured = getattr(layer, "measured_curve", None)
        measured_arr = None if measured is None else np.asarray(measured, dtype=np.float64)
        name = getattr(layer, "name", None) or getattr(model, "name", None) or "layer"
        if measured_arr is not None and measured_arr.shape != (m,):
            raise InvalidParameterError(
                f"layer {name!r}: measured curve has shape {measured_arr.shape}; expected ({m},), one value per d̃"
            )
        k = int(model.k)
        probes = {int(p): float(v) for p, v in dict(getattr(model, "probes_", {})).items()}
        params = dict(getattr(model, "params_", {}))
        n_sub = getattr(model, "n_subvectors_", None)
        subsample: dict[int, int] = {}
        estimates: dict[int, float] = {}
        for i in range(len(probes)):
            probe_d = params.get(f"probe{i}_d_tilde")
            per_centroid = params.get(f"probe{i}_points_per_centroid")
            if probe_d is None or per_centroid is None or n_sub is None:
                continue
            sample = round(per_centroid * k)
            if sample < n_sub:  # trained on a subsample: its error on all subvectors lies above the curve
                subsample[int(probe_d)] = sample
                estimate = params.get(f"probe{i}_estimate")
                if estimate is not None and math.isfinite(estimate):
                    estimates[int(probe_d)] = float(estimate)
        total = np.asarray(model.total(d), dtype=np.float64)
        d_tilde = int(getattr(model, "d_tilde_", int(np.argmax(total <= total.min() + 1e-12)) + 1))
        objective = model.objective() if hasattr(model, "objective") else total
        tol = _tolerance(getattr(model, "tolerance", None) if tolerance is None else tolerance)
        from .tradeoff import is_flat, near_best_range

        low_out = getattr(model, "lowrank_output_curve_", None)
        clu_out = getattr(model, "clustering_output_curve_", None)
        return cls(
            name=_printable(str(name)),
            k=k,
            m=m,
            rho=float(model.rho),
            lowrank=np.asarray(model.lowrank(d), dtype=np.float64),
            clustering=np.asarray(model.clustering(d), dtype=np.float64),
            total=total,
            probes=probes,
            d_tilde=d_tilde,
            measured=measured_arr,
            n_subvectors=None if n_sub is None else int(n_sub),
            subsample=subsample,
            estimates=estimates,
            predictor=str(getattr(model, "predictor", "rho")),
            tolerance=tol,
            band=near_best_range(objective, tol, d_tilde),
            flat=is_flat(objective, tol),
            lowrank_output=None if low_out is None else np.asarray(low_out, dtype=np.float64),
            clustering_output=None if clu_out is None else np.asarray(clu_out, dtype=np.float64),
        )


def _range_text(band: tuple[int, int]) -> str:
    return f"{band[0]}–{band[1]}" if band[0] < band[1] else f"{band[0]}"


def _flat_label(tolerance: float, band: tuple[int, int] | None = None) -> str:
    """Legend text of the shaded d̃ range (the range reports print, see near_best_range)."""
    where = "" if band is None else f" {_range_text(band)}"
    return rf"near-best {_D_TILDE}{where} (rule's {_D_TILDE}, and within {tolerance:.0%} of the rule's minimum)"


def _shade_band(ax: Axes, band: tuple[int, int], label: str) -> None:
    """The flat band of d̃, shaded behind everything."""
    ax.axvspan(band[0] - 0.45, band[1] + 0.45, color=COLORS["sky"], alpha=0.22, linewidth=0, zorder=0, label=label)


def _open_markers(
    ax: Axes, xs: Sequence[int], values: dict[int, float], marker: str, size: float, color: str, label: str
) -> None:
    """Unfilled markers at (x, values[x]): the probes."""
    ax.plot(
        xs,
        [values[x] for x in xs],
        linestyle="none",
        marker=marker,
        markersize=size,
        markerfacecolor="none",
        markeredgecolor=color,
        markeredgewidth=1.3,
        label=label,
    )


_SPACES = ("weight", "output")
_OUTPUT_ENERGY = r"fraction of $E\Vert Wx\Vert^2$"


def _output_curves(curves: _LayerCurves) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(low-rank, clustering, total) in the layer's output space, or a clear error without them."""
    if curves.lowrank_output is None or curves.clustering_output is None or curves.total_output is None:
        raise InvalidParameterError(
            f"layer {curves.name!r} has no output-space curves; analyze with model= and calibration= "
            "(inputs of the model) to draw space='output' or 'both'"
        )
    return curves.lowrank_output, curves.clustering_output, curves.total_output


def _draw_tradeoff(ax: Axes, curves: _LayerCurves, *, legend: bool, compact: bool, space: str = "weight") -> None:
    """One layer's curves in weight space (with probes and measured k-means) or in its output space."""
    from .tradeoff import FLAT_MESSAGE

    d = np.arange(1, curves.m + 1)
    size = 3.5 if compact else 5.0
    output = space == "output"
    if output:
        lowrank, clustering, total = _output_curves(curves)
    else:
        lowrank, clustering, total = curves.lowrank, curves.clustering, curves.total
    _shade_band(ax, curves.band, _flat_label(curves.tolerance, None if compact else curves.band))
    ax.plot(d, lowrank, color=COLORS["blue"], marker="o", markersize=size, label="low-rank error")
    ax.plot(d, clustering, color=COLORS["orange"], marker="o", markersize=size, label="clustering error (model)")
    if curves.measured is not None and not output:
        ax.plot(
            d,
            curves.measured,
            color=COLORS["vermillion"],
            linestyle=":",
            marker="x",
            markersize=size + 1,
            label="clustering error (k-means)",
        )
    subsample = curves.subsample or {}
    probes = {} if output else curves.probes  # probes measure k-means in weight space
    full = sorted(p for p in probes if p not in subsample)
    if full:
        _open_markers(ax, full, curves.probes, "s", size + 3, COLORS["vermillion"], "k-means probe on all subvectors")
    sub = sorted(p for p in probes if p in subsample)
    if sub:
        sizes = sorted(set(subsample[p] for p in sub))
        n_text = f"{sizes[0]:,}" if len(sizes) == 1 else f"{sizes[0]:,}–{sizes[-1]:,}"
        of = f" of {curves.n_subvectors:,}" if curves.n_subvectors else ""
        _open_markers(ax, sub, curves.probes, "D", size + 2, COLORS["purple"], f"probe on subsample (n = {n_text}{of})")
        estimated = [p for p in sub if p in (curves.estimates or {})]
        if estimated and curves.estimates is not None:
            for p in estimated:
                ax.plot([p, p], [curves.probes[p], curves.estimates[p]], color=COLORS["purple"], linewidth=0.8)
            ax.plot(
                estimated,
                [curves.estimates[p] for p in estimated],
                linestyle="none",
                marker="D",
                markersize=size - 0.5,
                color=COLORS["purple"],
                label="its estimate for all subvectors",
            )
    ax.plot(
        d,
        total,
        color=COLORS["black"],
        linewidth=2.2,
        label=rf"total = {_format_rho(curves.rho)}·low-rank + clustering",
    )
    best = curves.d_tilde
    ax.axvline(best, color=COLORS["grey"], linestyle="--", linewidth=1.0, zorder=0)
    ax.plot(
        [best],
        [total[best - 1]],
        linestyle="none",
        marker="*",
        markersize=size + 9,
        color=COLORS["black"],
        markerfacecolor=COLORS["yellow"],
        markeredgewidth=0.9,
        zorder=5,
        label=rf"predicted {_D_TILDE} = {best}",
    )
    ax.set_xticks(d)
    ax.set_xlim(0.5, curves.m + 0.5)
    top = float(np.nanmax(np.concatenate([lowrank, clustering, total])))
    if curves.measured is not None and not output:
        top = max(top, float(np.nanmax(curves.measured)))
    if probes:
        top = max(top, max(probes.values()))
    ax.set_ylim(0.0, top * 1.08 if top > 0 else 1.0)
    flat = " flat" if curves.flat else ""
    if compact:
        ax.set_title(
            f"{_ellipsize(_short_name(curves.name), 40)}\n"
            + rf"{_D_TILDE} = {best}, range {_range_text(curves.band)}{flat}, k = {curves.k}, m = {curves.m}",
            fontsize=7.5,
        )
    else:
        where = "in the layer's output" if output else "in the weights"
        ax.set_xlabel(rf"clustering dimensionality {_D_TILDE}")
        ax.set_ylabel(f"relative error ({_OUTPUT_ENERGY if output else _ENERGY})")
        # two short lines: side-by-side panels (weights | output) must not clip the title
        ax.set_title(
            f"{curves.name} {where}\n"
            + rf"k = {curves.k}, m = {curves.m}, ρ = {_format_rho(curves.rho)}; rule `{curves.predictor}`: "
            + rf"{_D_TILDE} = {best}, near-best {_range_text(curves.band)}"
            + (f";\n{FLAT_MESSAGE}" if curves.flat else "")
        )
    if legend:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


@_styled
def plot_tradeoff(
    layer: LayerReport | TradeoffModel,
    *,
    ax: Axes | None = None,
    measured: Sequence[float] | None = None,
    legend: bool = True,
    tolerance: float | None = None,
    space: str | None = None,
) -> Figure:
    """Error trade-off of one layer against d̃ = 1..m, with the predicted d̃ and its near-best range.

    Draws the exact low-rank error, the modelled clustering error with the k-means probes that
    calibrated it, the measured clustering error at every d̃ when available (crosses), the total
    ρ·low-rank + clustering, and the d̃ of the layer's rule (star, dashed line). The shaded band is the
    d̃ range the reports print (``d_tilde_range_``, :func:`~lr2vq_analysis.tradeoff.near_best_range`):
    the rule's d̃ and every d̃ whose predicted total (the rule's objective) is within ``tolerance`` of
    its minimum; the title names the rule and flags a flat curve ("d̃ barely matters here"). Probes
    trained on every subvector are open squares on the curve; probes trained on a subsample (large
    layers) are open diamonds labelled with the subsample size: their codebook saw fewer points, so
    their error on all subvectors lies *above* the curve by design, not by miscalibration; a filled
    diamond marks what each one predicts for k-means on all subvectors. Weight-space errors are
    fractions of the layer's ‖W‖²; output-space errors (``analyze(..., calibration=...)``) are
    fractions of the layer's output energy E‖Wx‖² over the calibration inputs.

    Parameters
    ----------
    layer : LayerReport or TradeoffModel
        One entry of ``report.layers``, or a model from :func:`~lr2vq_analysis.tradeoff.fit_tradeoff`.
    ax : matplotlib.axes.Axes, optional
        Draw into this axes instead of a new figure (one space only).
    measured : sequence of float, optional
        Measured relative clustering error at d̃ = 1..m, e.g. from
        :func:`~lr2vq_analysis.probes.clustering_error_curve`; defaults to the layer's
        ``measured_curve`` (``analyze(..., measure_full_curve=True)``). Weight space only.
    legend : bool, default True
        Draw the legend (outside the axes, on the right; below both panels for ``space="both"``).
    tolerance : float, optional
        Relative tolerance of the shaded range; default the layer's own (``analyze(tolerance=...)``,
        :data:`~lr2vq_analysis.tradeoff.DEFAULT_TOLERANCE` = 5 % unless set), as in the reports.
    space : {"weight", "output", "both"}, optional
        The errors in the weights, in the layer's output (needs calibrated output-space curves), or both
        side by side. Default: "both" for a calibrated layer drawn into a new figure, else "weight".

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    InvalidParameterError
        If ``layer`` is neither a LayerReport nor a TradeoffModel, ``measured`` has the wrong length,
        ``space`` is unknown, "output"/"both" is asked of a layer without output-space curves, or
        "both" is asked with ``ax``.
    """
    curves = _LayerCurves.of(layer, measured, tolerance)
    calibrated = curves.lowrank_output is not None
    if space is None:
        space = "both" if calibrated and ax is None else "weight"
    if space not in (*_SPACES, "both"):
        raise InvalidParameterError(f"space={space!r} is invalid; allowed: 'weight', 'output', 'both'")
    if space != "both":
        figure, ax = _figure_and_axes(ax, (7.0, 3.6))
        _draw_tradeoff(ax, curves, legend=legend, compact=False, space=space)
        return figure
    if ax is not None:
        raise InvalidParameterError("space='both' draws two panels; pass ax=None, or one space with ax")
    _output_curves(curves)  # raises, naming the layer, when it has none
    figure, axes = plt.subplots(1, 2, figsize=(11.0, 4.2), layout="constrained")
    for panel, panel_space in zip(axes, _SPACES, strict=True):
        _draw_tradeoff(panel, curves, legend=False, compact=False, space=panel_space)
    if legend:
        entries: dict[str, Any] = {}
        for panel in axes:
            for handle, label in zip(*panel.get_legend_handles_labels(), strict=True):
                entries.setdefault(label, handle)
        figure.legend(list(entries.values()), list(entries), loc="outside lower center", ncols=min(len(entries), 3))
    return figure


def _block_colors(blocks: Sequence[str]) -> dict[str, Any]:
    """One colour per block along a colour-blind-safe sequential map (cividis), in model order."""
    unique = list(dict.fromkeys(blocks))
    cmap = matplotlib.colormaps["cividis"]
    return {block: cmap(0.05 + 0.85 * i / max(1, len(unique) - 1)) for i, block in enumerate(unique)}


def _panel_grid(n: int, ncols: int, size: tuple[float, float, float]) -> tuple[Figure, list[Axes]]:
    """A figure of n panels, ``ncols`` per row (fewer when n is smaller); size = (width, height, legend room)."""
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    width, height, extra = size
    figure, axes = plt.subplots(
        nrows, ncols, figsize=(width * ncols, height * nrows + extra), layout="constrained", squeeze=False, sharex=True
    )
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return figure, list(axes.flat[:n])


def _label_panel(ax: Axes, index: int, n: int, ncols: int, ylabel: str) -> None:
    """Y label on the first column, x label and ticks on the lowest panel of each column."""
    ncols = min(ncols, n)
    if index % ncols == 0:
        ax.set_ylabel(ylabel)
    if index + ncols >= n:
        ax.set_xlabel(_D_TILDE)
        ax.tick_params(labelbottom=True)


@_styled
def plot_tradeoff_grid(
    report: Report,
    *,
    ncols: int = 4,
    max_layers: int | None = None,
    layers: Sequence[str] | None = None,
    max_panels: int = MAX_LAYER_PANELS,
    tolerance: float | None = None,
    space: str = "weight",
) -> Figure:
    """Small multiples of the layers' trade-offs: one panel per layer, or one per layer kind when there are many.

    Up to ``max_panels`` layers get a panel each (the plot of :func:`plot_tradeoff`, sharing one
    legend). Above it the figure is a summary: one panel per layer kind (``attention.self.query``,
    ``intermediate.dense``, ...: see :func:`layer_group`), each with the total-error curve of every
    layer of that kind, coloured by block in model order, its predicted d̃ starred and a bar under
    the curve spanning its near-best d̃ range (the range the reports print). For per-layer panels of
    a large model, pass a page of names, e.g. ``layers=list(report)[12:24]``.

    Parameters
    ----------
    report : Report
    ncols : int, default 4
        Panels per row.
    max_layers : int, optional
        Draw only the first ``max_layers`` layers (model order).
    layers : sequence of str, optional
        Draw these layers (names with or without ``.weight``), in this order.
    max_panels : int, default MAX_LAYER_PANELS
        Above this many layers, summarise by layer kind.
    tolerance : float, optional
        Relative tolerance of the near-best d̃ ranges; default the layers' own, as in the reports
        (:data:`~lr2vq_analysis.tradeoff.DEFAULT_TOLERANCE` unless ``analyze(tolerance=...)`` set another).
    space : {"weight", "output"}, default "weight"
        Per-layer panels in the weights or in the layers' outputs (calibrated reports); the summary
        by kind always shows the weight-space totals.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if space not in _SPACES:
        raise InvalidParameterError(f"space={space!r} is invalid; allowed: {_SPACES}")
    if not isinstance(ncols, int) or ncols < 1:
        raise InvalidParameterError(f"ncols={ncols!r} is invalid; use a positive integer")
    chosen = [report[name] for name in layers] if layers is not None else list(report.layers)
    chosen = chosen[: max_layers if max_layers else None]
    if not chosen:
        raise InvalidParameterError("no layer to draw; pass at least one layer name")
    if len(chosen) > max_panels:
        return _plot_kind_summary(report, chosen, ncols=ncols, tolerance=tolerance)
    figure, panels = _panel_grid(len(chosen), ncols, (2.6, 2.1, 0.9))
    for index, ax in enumerate(panels):
        _draw_tradeoff(ax, _LayerCurves.of(chosen[index], None, tolerance), legend=False, compact=True, space=space)
        _label_panel(ax, index, len(chosen), ncols, _OUTPUT_ENERGY if space == "output" else _ENERGY)
    entries: dict[str, Any] = {}
    for ax in panels:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            # Every panel has its own predicted d̃ and subsample; the legend names the marker, not one value.
            if label.startswith("predicted"):
                label = rf"predicted {_D_TILDE}"
            elif label.startswith("probe on subsample"):
                label = "probe on subsample (its error lies above the curve)"
            entries.setdefault(label, handle)
    figure.legend(list(entries.values()), list(entries), loc="outside lower center", ncols=min(len(entries), 3))
    figure.suptitle(
        f"Error trade-off per layer (k ≤ {report.k}, m = {report.m}, ρ = {_format_rho(report.rho)}; "
        f"errors as {_OUTPUT_ENERGY if space == 'output' else _ENERGY})",
        x=0.01,
        horizontalalignment="left",
    )
    return figure


def _plot_kind_summary(report: Report, layers: Sequence[LayerReport], *, ncols: int, tolerance: float | None) -> Figure:
    groups = [layer_group(layer.name) for layer in layers]
    colors = _block_colors([block for block, _ in groups])
    kinds = list(dict.fromkeys(kind for _, kind in groups))
    figure, panels = _panel_grid(len(kinds), ncols, (2.7, 2.2, 1.0))
    for index, ax in enumerate(panels):
        kind = kinds[index]
        members = [(layer, block) for layer, (block, k) in zip(layers, groups, strict=True) if k == kind]
        top = 0.0
        for layer, block in members:
            total = np.asarray(layer.total_curve, dtype=np.float64)
            d = np.arange(1, total.size + 1)
            color = colors[block]
            ax.plot(d, total, color=color, linewidth=1.3, label=block or "(no block)")
            best = layer.d_tilde
            ax.plot(
                [best],
                [total[best - 1]],
                linestyle="none",
                marker="*",
                markersize=9,
                markerfacecolor=color,
                markeredgecolor=COLORS["black"],
                markeredgewidth=0.6,
                zorder=5,
            )
            top = max(top, float(total.max()))
        for row, (layer, block) in enumerate(members):  # near-best ranges as bars under the curves
            low, high = _LayerCurves.of(layer, None, tolerance).band
            y = -0.04 * top * (row + 1)
            ax.plot([low - 0.3, high + 0.3], [y, y], color=colors[block], linewidth=2.0, solid_capstyle="butt")
        ax.set_ylim(-0.04 * top * (len(members) + 1), top * 1.08 if top > 0 else 1.0)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.set_yticks([tick for tick in ax.get_yticks() if 0 <= tick <= top * 1.08])  # bars below 0 carry no scale
        ks = sorted({layer.k for layer, _ in members})
        k_text = f"{ks[0]}" if len(ks) == 1 else f"{ks[0]}–{ks[-1]}"
        ax.set_title(
            f"{_ellipsize(kind, 30)}\n{len(members)} layer(s), k = {k_text}, m = {members[0][0].m}", fontsize=7.5
        )
        ax.set_xticks(np.arange(1, report.m + 1))
        ax.set_xlim(0.5, report.m + 0.5)
        _label_panel(ax, index, len(kinds), ncols, f"total error ({_ENERGY})")
    handles = [Line2D([], [], color=color, linewidth=1.6) for color in colors.values()]
    labels = [block or "(no block)" for block in colors]
    handles += [
        Line2D(
            [],
            [],
            linestyle="none",
            marker="*",
            markersize=9,
            markerfacecolor=COLORS["grey"],
            markeredgecolor=COLORS["black"],
        ),
        Line2D([], [], color=COLORS["grey"], linewidth=2.0),
    ]
    labels += [rf"predicted {_D_TILDE}", f"bar: {_flat_label(_tolerance(tolerance))}"]
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4))
    figure.suptitle(
        f"Total error by layer kind, {len(layers)} layers (k ≤ {report.k}, m = {report.m}, "
        f"ρ = {_format_rho(report.rho)})",
        x=0.01,
        horizontalalignment="left",
    )
    return figure


# --------------------------------------------------------------------------------------------------
# Whole model
# --------------------------------------------------------------------------------------------------


def _row_labels(ax: Axes, layers: Sequence[LayerReport]) -> bool:
    """Y tick labels in model order: the layer kind within its block, block names and separators at the side."""
    groups = [layer_group(layer.name) for layer in layers]
    grouped = len({block for block, _ in groups if block}) > 1
    labels = [
        kind if grouped and block else _short_name(layer.name)
        for layer, (block, kind) in zip(layers, groups, strict=True)
    ]
    ax.set_yticks(np.arange(len(layers)), [_ellipsize(label, 40) for label in labels])
    if not grouped:
        return False
    start = 0
    for row in range(1, len(layers) + 1):
        if row == len(layers) or groups[row][0] != groups[start][0]:
            if row < len(layers):
                ax.axhline(row - 0.5, color=COLORS["grey"], linewidth=0.6, zorder=0)
            ax.text(
                1.01,
                (start + row - 1) / 2,
                groups[start][0] or "(other)",
                transform=ax.get_yaxis_transform(),
                ha="left",
                va="center",
                fontsize=7.5,
                color=COLORS["black"],
            )
            start = row
    return True


@_styled
def plot_overview(report: Report, *, ax: Axes | None = None, tolerance: float | None = None) -> Figure:
    """Predicted d̃ of every layer in model order, with each layer's knee, near-best range and the global d̃.

    Rows follow the report's (model) order; names with numbered blocks (``encoder.layer.3.…``) are
    grouped, each block labelled at the right and separated by a line. The bar behind each d̃ is the
    layer's near-best range as the reports print it (``d_tilde_range``: the rule's d̃ and every d̃
    whose predicted total is within ``tolerance`` of the rule's minimum); the shaded column is the
    model's (``Report.global_d_tilde_range``, size-weighted over layers).

    Parameters
    ----------
    report : Report
    ax : matplotlib.axes.Axes, optional
    tolerance : float, optional
        Relative tolerance of the ranges; default the layers' own, as in the reports
        (:data:`~lr2vq_analysis.tradeoff.DEFAULT_TOLERANCE` unless ``analyze(tolerance=...)`` set another).

    Returns
    -------
    matplotlib.figure.Figure
    """
    layers = list(report.layers)
    n = len(layers)
    owned = ax is None
    figure, ax = _figure_and_axes(ax, (5.6, 1.4 + 0.22 * n))
    y = np.arange(n)
    d_tilde = np.array([layer.d_tilde for layer in layers])
    knee = np.array([layer.knee for layer in layers])
    from .tradeoff import global_d_tilde

    curves = [_LayerCurves.of(layer, None, tolerance) for layer in layers]
    _, model_band, model_flat = global_d_tilde(
        [layer.model for layer in layers], [layer.n_weights for layer in layers], tolerance=tolerance
    )
    flat = f"; flat: {_D_TILDE} barely matters" if model_flat else ""
    _shade_band(ax, model_band, f"model's {_flat_label(curves[0].tolerance, model_band)}{flat}")
    bands = np.array([c.band for c in curves], dtype=np.float64)
    ax.hlines(
        y,
        bands[:, 0] - 0.3,
        bands[:, 1] + 0.3,
        color=COLORS["blue"],
        alpha=0.35,
        linewidth=5,
        label=rf"layer's near-best {_D_TILDE}",
    )
    ax.plot(
        knee,
        y,
        linestyle="none",
        marker="o",
        markersize=7,
        markerfacecolor="none",
        markeredgecolor=COLORS["orange"],
        markeredgewidth=1.3,
        label="knee (reverse water-filling)",
    )
    ax.plot(
        d_tilde, y, linestyle="none", marker="o", markersize=5.5, color=COLORS["blue"], label=rf"predicted {_D_TILDE}"
    )
    ax.axvline(
        report.global_d_tilde,
        color=COLORS["black"],
        linestyle="--",
        linewidth=1.2,
        label=rf"global {_D_TILDE} = {report.global_d_tilde}",
    )
    _row_labels(ax, layers)
    ax.set_ylim(n - 0.5, -0.5)  # model order from top to bottom
    ax.set_xticks(np.arange(1, report.m + 1))
    ax.set_xlim(0.5, report.m + 0.5)
    ax.grid(False)
    ax.set_xlabel(rf"clustering dimensionality {_D_TILDE}")
    ax.set_title(rf"Predicted {_D_TILDE} per layer (k ≤ {report.k}, m = {report.m}, ρ = {_format_rho(report.rho)})")
    _figure_legend(figure, ax, owned, ncols=2)
    return figure


@_styled
def plot_spectra(report: Report, *, ax: Axes | None = None, floor: float | None = None) -> Figure:
    """Heatmap of the eigenvalue spectra of all layers (layers × component), as fractions of ‖W‖².

    Each row is one layer's eigenvalues of the m × m Gram matrix of its subvectors, divided by ‖W‖²
    (so a row sums to 1), on one log colour scale shared by all layers; a vertical bar after column
    d̃ marks where the predicted clustering dimensionality cuts the spectrum.

    Parameters
    ----------
    report : Report
    ax : matplotlib.axes.Axes, optional
    floor : float, optional
        Smallest value of the colour scale (smaller eigenvalues are drawn at the floor); by default
        the smallest eigenvalue, but not below 1e-6. The scale ends at the largest eigenvalue.

    Returns
    -------
    matplotlib.figure.Figure
    """
    layers = list(report.layers)
    n = len(layers)
    values = np.vstack([np.asarray(layer.model.eigenvalues_, dtype=np.float64) for layer in layers])
    top = float(values.max())
    if floor is None:
        positive = values[values > 0]
        floor = max(1e-6, float(positive.min()) if positive.size else 1e-6)
    if not 0 < floor < top:
        raise InvalidParameterError(
            f"floor={floor!r} is invalid; use a number in (0, {top:.3g}), the largest eigenvalue"
        )
    values = np.clip(values, floor, None)
    owned = ax is None
    figure, ax = _figure_and_axes(ax, (5.6, 1.5 + 0.22 * n))
    image = ax.imshow(
        values,
        aspect="auto",
        norm=LogNorm(vmin=floor, vmax=top),  # the data's own range: flat spectra still show their structure
        extent=(0.5, report.m + 0.5, n - 0.5, -0.5),
        interpolation="nearest",
    )
    rows = np.arange(n)
    cuts = np.array([layer.d_tilde for layer in layers]) + 0.5
    ax.vlines(cuts, rows - 0.45, rows + 0.45, color=COLORS["vermillion"], linewidth=2.4, capstyle="butt")
    ax.plot([], [], color=COLORS["vermillion"], linewidth=2.4, label=rf"cut at predicted {_D_TILDE}")
    grouped = _row_labels(ax, layers)
    ax.set_xticks(np.arange(1, report.m + 1))
    ax.set_xlim(0.5, report.m + 0.7)  # room for a cut at d̃ = m
    ax.set_xlabel("principal component (decreasing eigenvalue)")
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    # Block names sit at the right of grouped rows: the colour bar then goes below.
    if grouped:
        colorbar = figure.colorbar(image, ax=ax, location="bottom", fraction=0.04, pad=0.06, aspect=40)
    else:
        colorbar = figure.colorbar(image, ax=ax, fraction=0.05, pad=0.02, aspect=max(20, 3 * n))
    colorbar.set_label(f"eigenvalue ({_ENERGY})")
    # Few, plainly written ticks (0.15, not 1.5×10⁻¹); a range under a decade gets linear steps.
    locator = MaxNLocator(nbins=6) if top / floor < 10 else LogLocator(base=10, subs=(1.0, 2.0, 5.0))
    scale_axis = colorbar.ax.xaxis if grouped else colorbar.ax.yaxis
    scale_axis.set_major_locator(locator)
    scale_axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.3g}"))
    scale_axis.set_minor_formatter(NullFormatter())
    ax.set_title(f"Subvector spectra (m = {report.m})")
    _figure_legend(figure, ax, owned, ncols=1)
    return figure


# --------------------------------------------------------------------------------------------------
# Size of a compressed model
# --------------------------------------------------------------------------------------------------

_SIZE_PARTS: tuple[tuple[str, str, str], ...] = (
    ("codes", "codes", COLORS["blue"]),
    ("codebook", "codebooks", COLORS["orange"]),
    ("projection", "projections P", COLORS["green"]),
    ("uncompressed", "uncompressed (fp32)", COLORS["grey"]),
)


def _size_parts_frame(size_report: Any) -> pd.DataFrame:
    """Bits of each part per module (weight, bias and folded batch norm of one module together), model order."""
    frame = size_report.to_frame()
    required = ("name", "codes_bits", "codebook_bits", "projection_bits", "dense_bits")
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise InvalidParameterError(f"size breakdown needs the columns {list(required)}; missing {missing}")
    frame = frame.rename(
        columns={
            "codes_bits": "codes",
            "codebook_bits": "codebook",
            "projection_bits": "projection",
            "dense_bits": "uncompressed",
        }
    )
    # "conv2.weight" and "conv2.bias" are one module; a folded batch norm is already named by its module.
    kinds = frame["kind"] if "kind" in frame.columns else pd.Series("", index=frame.index)
    module = [
        name if kind == "batchnorm" or "." not in name else name.rpartition(".")[0]
        for name, kind in zip(frame["name"].astype(str), kinds, strict=True)
    ]
    frame["module"] = pd.Categorical(module, categories=list(dict.fromkeys(module)), ordered=True)
    return frame.groupby("module", observed=True, sort=True)[[part for part, _, _ in _SIZE_PARTS]].sum().astype(float)


def _bits_unit(total_bits: float) -> tuple[float, str]:
    """Divisor and unit name (KiB or MiB) that give readable numbers for this many bits."""
    if total_bits >= 8 * 2**20:
        return 8 * 2**20, "MiB"
    return 8 * 2**10, "KiB"


def _format_bits(bits: float) -> str:
    divisor, unit = _bits_unit(bits)
    return f"{bits / divisor:.3g} {unit}"


@_styled
def plot_size_breakdown(size_report: Any, *, ax: Axes | None = None, min_share: float = 0.01) -> Figure:
    """Stacked bars of what a compressed model's bits are spent on, per layer and in total.

    Parts: codes (log2 k bits each), codebooks (fp16), projections P (fp16) and everything left
    uncompressed (fp32: first conv, biases, folded batch norm, ...), one bar per module (a layer's
    weight and bias together). The title carries the total compressed size, the uncompressed size
    and the compression ratio.

    Parameters
    ----------
    size_report : SizeReport
        From :func:`~lr2vq_analysis.size.size_report`.
    ax : matplotlib.axes.Axes, optional
        Draw the per-layer bars into this axes (the total is then only in the title); without it
        the figure has a second, narrow panel with the total.
    min_share : float, default 0.01
        Merge uncompressed modules smaller than this share of the compressed total into one "other"
        bar (0 keeps all); compressed layers always keep their own bar.

    Returns
    -------
    matplotlib.figure.Figure
    """
    parts = _size_parts_frame(size_report)
    compressed_bits = float(size_report.compressed_bits)
    uncompressed_bits = float(size_report.uncompressed_bits)
    ratio = float(size_report.ratio)
    if min_share > 0:
        # Compressed layers always keep their own bar; small uncompressed modules (norms, biases) merge.
        compressed_parts = parts[["codes", "codebook", "projection"]].sum(axis=1)
        small = (parts.sum(axis=1) < min_share * compressed_bits) & (compressed_parts == 0)
        if small.sum() > 1:
            other = parts[small].sum().to_frame(f"other ({int(small.sum())} entries)").T
            parts = pd.concat([parts[~small], other])
    totals_per_module = parts.sum(axis=1).to_numpy()
    # A huge uncompressed tensor (an embedding table) would flatten every compressed layer to nothing:
    # the axis ends a little past the largest compressed layer and longer bars are cut, with their value.
    has_codes = (parts[["codes", "codebook", "projection"]].sum(axis=1) > 0).to_numpy()
    limit = float(totals_per_module.max())
    if has_codes.any():
        limit = min(limit, 1.6 * float(totals_per_module[has_codes].max()))
    divisor, unit = _bits_unit(limit)
    n = len(parts)
    if ax is None:
        figure, (ax, total_ax) = plt.subplots(
            1,
            2,
            figsize=(6.4, 1.5 + 0.26 * n),
            layout="constrained",
            gridspec_kw={"width_ratios": (4, 1)},
        )
    else:
        figure, ax = _figure_and_axes(ax, (6.4, 1.5 + 0.26 * n))
        total_ax = None
    y = np.arange(n)
    start = np.zeros(n)
    for part, label, color in _SIZE_PARTS:
        values = parts[part].to_numpy()
        end = start + values
        shown = np.minimum(end, limit) - np.minimum(start, limit)
        ax.barh(y, shown / divisor, left=np.minimum(start, limit) / divisor, color=color, height=0.7, label=label)
        start = end
    for row in np.flatnonzero(totals_per_module > limit * (1 + 1e-9)):
        ax.text(
            limit / divisor,
            float(row),
            f"{_format_bits(float(totals_per_module[row]))}, bar cut ",
            ha="right",
            va="center",
            color="white",
            fontsize=7,
        )
    ax.set_xlim(0, limit / divisor * 1.02)
    ax.set_yticks(y, [_short_name(str(name)) for name in parts.index])
    ax.set_ylim(n - 0.5, -0.6)
    ax.set_xlabel(f"size ({unit})")
    ax.grid(True, axis="x")
    ax.grid(False, axis="y")
    title = (
        f"Compressed size {_format_bits(compressed_bits)} "
        f"(uncompressed {_format_bits(uncompressed_bits)}, ratio {ratio:.1f}×)"
    )
    if total_ax is not None:
        total_divisor, total_unit = _bits_unit(compressed_bits)
        bottom = 0.0
        totals = parts.sum(axis=0)
        for part, _label, color in _SIZE_PARTS:
            value = float(totals[part]) / total_divisor
            total_ax.bar([0], [value], bottom=bottom, color=color, width=0.6)
            bottom += value
        total_ax.set_xticks([0], ["total"])
        total_ax.set_xlim(-0.6, 0.6)
        total_ax.set_ylabel(f"compressed size ({total_unit})")
        figure.suptitle(title, x=0.01, horizontalalignment="left")
    else:
        ax.set_title(title)
    _figure_legend(figure, ax, total_ax is not None, ncols=4)
    return figure


# --------------------------------------------------------------------------------------------------
# All figures of a report
# --------------------------------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
#: Longest slug kept in a figure's file name (the hash keeps longer names apart).
_MAX_SLUG = 80


def figure_file_stem(layer_name: str) -> str:
    """File-name stem of a layer's trade-off figure: ``tradeoff_<slug>_<hash>``, unique per layer name.

    The slug keeps the name's safe characters (others become ``_``), cut to 80; the hash (8 hex digits
    of SHA-256 of the full name) keeps names apart that share a slug (``a/b``, ``a_b``, ``a b``), names
    that differ only in case or beyond the cut, and names that cannot be encoded (lone surrogates).

    Parameters
    ----------
    layer_name : str
        State-dict key of the layer.

    Returns
    -------
    str

    Examples
    --------
    >>> figure_file_stem("layer1.0.conv1.weight")
    'tradeoff_layer1.0.conv1.weight_fc1ed365'
    >>> len({figure_file_stem(name) for name in ("a/b", "a_b", "a b")})
    3
    """
    digest = hashlib.sha256(layer_name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"tradeoff_{_UNSAFE.sub('_', layer_name)[:_MAX_SLUG]}_{digest}"


def save_report_figures(
    report: Report,
    out_dir: str | os.PathLike[str],
    formats: Sequence[str] = ("png",),
    *,
    per_layer: bool | None = None,
    progress: bool = False,
) -> dict[str, list[Path]]:
    """Draw and save a report's figures: overview, spectra, trade-off grid and (small models) one per layer.

    Parameters
    ----------
    report : Report
    out_dir : str or path
        Folder for the figures (created if needed).
    formats : sequence of {"png", "svg", "pdf"}, default ("png",)
        Vector formats cost several times the PNG's time: ask for them when you need them.
    per_layer : bool, optional
        Also write one trade-off figure per layer (``tradeoff_<layer>.*``). By default only when the
        report has at most :data:`MAX_LAYER_PANELS` layers (above it the grid summarises the layers
        by kind, and :func:`plot_tradeoff` draws any one layer on demand).
    progress : bool, default False
        Show a progress bar.

    Returns
    -------
    dict
        ``{figure name: [paths]}``: ``"overview"``, ``"spectra"``, ``"tradeoff_grid"`` and, per layer,
        the layer name.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    jobs: list[tuple[str, str, Callable[[], Figure]]] = [
        ("overview", "overview", lambda: plot_overview(report)),
        ("spectra", "spectra", lambda: plot_spectra(report)),
        ("tradeoff_grid", "tradeoff_grid", lambda: plot_tradeoff_grid(report)),
    ]
    if per_layer is None:
        per_layer = len(report.layers) <= MAX_LAYER_PANELS
    if per_layer:
        for layer in report.layers:
            jobs.append((layer.name, figure_file_stem(layer.name), functools.partial(plot_tradeoff, layer)))
    written: dict[str, list[Path]] = {}
    for key, stem, draw in tqdm(jobs, desc="figures", unit="fig", disable=not progress):
        figure = draw()
        try:
            written[key] = save_figure(figure, out / stem, formats)
        finally:
            plt.close(figure)
    return written
