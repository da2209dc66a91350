"""Experimental: figures of the evidence sweeps and the aggregation of their results. No stability promise.

Sweep results (for :func:`plot_accuracy_vs_d_tilde` and :func:`plot_size_frontier`) are a pandas
DataFrame, or a CSV file, with one row per (method, configuration, seed) and the columns
:data:`SWEEP_COLUMNS` plus one metric column (``"accuracy"`` by default, or e.g. ``"cosine"``):

========== ======= ==========================================================================
column     type    meaning
========== ======= ==========================================================================
method     str     ``"lr2vq"``, ``"pq"``, ``"scalar"``, ``"dkm"``, ``"uncompressed"``, ...
k          int     number of centroids (ignored for ``"uncompressed"``)
m          int     subvector size (1 for scalar k-means)
d_tilde    int     clustering dimensionality (m for PQ; empty for methods without one)
seed       int     seed of the run; mean ± sd are taken over seeds
megabytes  float   size of the compressed model in MiB (the field's convention, see size.py)
<metric>   float   the quality measured on held-out data, e.g. accuracy or cosine similarity
========== ======= ==========================================================================

An optional column ``predicted_d_tilde`` (int, constant within one (method, k, m)) marks the
analysis's prediction when the ``predicted_d_tilde`` argument is not given.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .._validation import InvalidParameterError
from ..exceptions import ReportFileError
from ..plots import _CYCLE, _D_TILDE, COLORS, _figure_and_axes, _figure_legend, _styled

__all__ = [
    "SWEEP_COLUMNS",
    "METHOD_LABELS",
    "load_sweep_results",
    "plot_accuracy_vs_d_tilde",
    "plot_size_frontier",
]

#: Columns every sweep-results table must have (plus one metric column).
SWEEP_COLUMNS: tuple[str, ...] = ("method", "k", "m", "d_tilde", "seed", "megabytes")

#: How methods are named in legends; unknown methods are shown as written.
METHOD_LABELS: dict[str, str] = {
    "lr2vq": "LR²VQ",
    "pq": "PQ",
    "scalar": "scalar k-means",
    "dkm": "DKM",
    "lr2vq-dkm": "LR²VQ + DKM",
    "uncompressed": "uncompressed",
}
_METHOD_COLORS: dict[str, str] = {
    "lr2vq": COLORS["blue"],
    "pq": COLORS["vermillion"],
    "scalar": COLORS["green"],
    "dkm": COLORS["purple"],
    "lr2vq-dkm": COLORS["sky"],
    "uncompressed": COLORS["black"],
}
_METHOD_LINESTYLES: dict[str, Any] = {"pq": "--", "scalar": "-.", "dkm": (0, (5, 1, 1, 1)), "uncompressed": ":"}
_METHOD_MARKERS: dict[str, str] = {"lr2vq": "o", "pq": "s", "scalar": "^", "dkm": "D", "lr2vq-dkm": "v"}


# --------------------------------------------------------------------------------------------------
# Sweep results: accuracy vs d̃ and size–accuracy frontier
# --------------------------------------------------------------------------------------------------


def load_sweep_results(source: pd.DataFrame | str | os.PathLike[str], metric: str = "accuracy") -> pd.DataFrame:
    """Read and check sweep results (see the module docstring for the columns).

    Parameters
    ----------
    source : pandas.DataFrame, or path to a CSV file
    metric : str, default "accuracy"
        Name of the column that holds the measured quality.

    Returns
    -------
    pandas.DataFrame
        A copy with ``method`` as str and numeric columns as numbers.

    Raises
    ------
    InvalidParameterError
        If a required column is missing, or the table is empty.
    ReportFileError
        If the CSV file cannot be read.

    Examples
    --------
    >>> import pandas as pd
    >>> table = pd.DataFrame({"method": ["pq"], "k": [16], "m": [9], "d_tilde": [9], "seed": [0],
    ...                       "megabytes": [0.05], "accuracy": [0.98]})
    >>> load_sweep_results(table).shape
    (1, 7)
    """
    if isinstance(source, pd.DataFrame):
        frame = source.copy()
    else:
        try:
            frame = pd.read_csv(source)
        except (OSError, ValueError) as exc:
            raise ReportFileError(f"cannot read sweep results from {str(source)!r}: {exc}") from None
    required = [*SWEEP_COLUMNS, metric]
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise InvalidParameterError(
            f"sweep results lack the column(s) {missing}; required: {required} (metric={metric!r})"
        )
    if frame.empty:
        raise InvalidParameterError("sweep results are empty; need at least one row")
    frame["method"] = frame["method"].astype(str)
    for column in ("k", "m", "d_tilde", "seed", "megabytes", metric):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


@dataclass(frozen=True)
class _Point:
    """One configuration of one method, aggregated over seeds."""

    method: str
    k: float | None
    m: float | None
    d_tilde: float | None
    mean: float
    sd: float
    n: int
    megabytes: float

    @property
    def config(self) -> tuple[str, float | None, float | None]:
        return (self.method, self.k, self.m)

    def config_text(self) -> str:
        if self.k is None or self.m is None:
            return ""
        return f"k = {self.k:g}, m = {self.m:g}"


def _number(value: Any) -> float | None:
    """float, or None for a missing value (NaN never equals itself, so it cannot be a grouping key)."""
    number = float(value)
    return None if math.isnan(number) else number


def _summarise(frame: pd.DataFrame, metric: str, *, by_d_tilde: bool = True) -> list[_Point]:
    """Mean and sd (ddof=1; 0 for one seed) of the metric and mean size per configuration, in order of appearance."""
    groups: dict[tuple[str, float | None, float | None, float | None], list[tuple[float, float]]] = {}
    columns = frame[["method", "k", "m", "d_tilde", "megabytes", metric]]
    for method, k, m, d_tilde, megabytes, value in columns.itertuples(index=False, name=None):
        key = (str(method), _number(k), _number(m), _number(d_tilde) if by_d_tilde else None)
        groups.setdefault(key, []).append((float(value), float(megabytes)))
    points = []
    for (method, k, m, d_tilde), items in groups.items():
        values = np.array([value for value, _ in items if not math.isnan(value)])
        if values.size == 0:
            continue
        points.append(
            _Point(
                method=method,
                k=k,
                m=m,
                d_tilde=d_tilde,
                mean=float(values.mean()),
                sd=float(values.std(ddof=1)) if values.size > 1 else 0.0,
                n=int(values.size),
                megabytes=float(np.mean([size for _, size in items])),
            )
        )
    return points


def _method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _method_style(method: str, index: int) -> tuple[str, str]:
    color = _METHOD_COLORS.get(method, _CYCLE[index % len(_CYCLE)])
    marker = _METHOD_MARKERS.get(method, "o")
    return color, marker


def _predicted_lookup(frame: pd.DataFrame, predicted_d_tilde: int | None) -> Callable[[_Point], int | None]:
    """Predicted d̃ of a point's (k, m): the argument for all, else the ``predicted_d_tilde`` column."""
    if predicted_d_tilde is not None:
        return lambda point: int(predicted_d_tilde)
    if "predicted_d_tilde" not in frame.columns:
        return lambda point: None
    known: dict[tuple[float | None, float | None], int] = {}
    for k, m, value in frame[["k", "m", "predicted_d_tilde"]].itertuples(index=False, name=None):
        if _number(value) is not None:
            known.setdefault((_number(k), _number(m)), int(value))
    return lambda point: known.get((point.k, point.m))


def _seed_note(points: Sequence[_Point]) -> str:
    counts = [point.n for point in points]
    low, high = min(counts), max(counts)
    seeds = f"{low}" if low == high else f"{low}–{high}"
    return f"mean ± sd over {seeds} seed{'s' if high > 1 else ''}"


def _metric_label(metric: str, ylabel: str | None) -> str:
    if ylabel is not None:
        return ylabel
    return {"accuracy": "accuracy", "cosine": "cosine similarity to uncompressed"}.get(metric, metric)


def _star(ax: Axes, x: float, y: float, label: str | None) -> None:
    """The marker of a predicted d̃, the same in every figure."""
    ax.plot(
        [x],
        [y],
        linestyle="none",
        marker="*",
        markersize=14,
        markerfacecolor=COLORS["yellow"],
        markeredgecolor=COLORS["black"],
        zorder=5,
        label=label,
    )


@_styled
def plot_accuracy_vs_d_tilde(
    results: pd.DataFrame | str | os.PathLike[str],
    *,
    metric: str = "accuracy",
    ax: Axes | None = None,
    predicted_d_tilde: int | None = None,
    ylabel: str | None = None,
    title: str | None = None,
) -> Figure:
    """Quality after fine-tuning against d̃, with the other methods as horizontal reference lines.

    Configurations (method, k, m) run at more than one d̃ (LR²VQ) are drawn as mean ± sd over seeds
    against d̃; every other configuration (PQ, scalar k-means, uncompressed) is a horizontal line at
    its mean with a ±sd band, labelled with its size. With several (k, m), colour marks the
    configuration and line style the method.

    Parameters
    ----------
    results : pandas.DataFrame or path to a CSV file
        Sweep results with the columns :data:`SWEEP_COLUMNS` and ``metric``.
    metric : str, default "accuracy"
    ax : matplotlib.axes.Axes, optional
    predicted_d_tilde : int, optional
        The analysis's prediction, drawn as a dashed vertical line and a star; defaults to the
        ``predicted_d_tilde`` column when present.
    ylabel, title : str, optional
        Override the axis label and the title.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    InvalidParameterError
        If a required column is missing, or no configuration varies d̃.
    """
    frame = load_sweep_results(results, metric)
    points = _summarise(frame, metric)
    d_values: dict[tuple[str, float | None, float | None], set[float]] = {}
    for point in points:
        if point.d_tilde is not None:
            d_values.setdefault(point.config, set()).add(point.d_tilde)
    line_configs = [config for config, values in d_values.items() if len(values) > 1]
    if not line_configs:
        raise InvalidParameterError(
            f"no configuration varies d_tilde in these results (methods: {sorted(frame['method'].unique())}); "
            "accuracy vs d̃ needs an LR²VQ sweep over d̃"
        )
    owned = ax is None
    figure, ax = _figure_and_axes(ax, (5.6, 4.2))
    many = len(line_configs) > 1
    config_colors: dict[tuple[float | None, float | None], str] = {}
    for _, k, m in line_configs:
        config_colors.setdefault((k, m), _CYCLE[len(config_colors) % len(_CYCLE)])
    predicted_of = _predicted_lookup(frame, predicted_d_tilde)
    marked: set[int] = set()
    for index, config in enumerate(line_configs):
        line = sorted((p for p in points if p.config == config), key=lambda p: float(p.d_tilde or 0))
        method = config[0]
        color, marker = _method_style(method, index)
        if many:
            color = config_colors[(config[1], config[2])]
        ax.errorbar(
            np.array([p.d_tilde for p in line], dtype=np.float64),
            np.array([p.mean for p in line], dtype=np.float64),
            yerr=np.array([p.sd for p in line], dtype=np.float64),
            color=color,
            marker=marker,
            capsize=2.5,
            label=f"{_method_label(method)} ({line[0].config_text()})",
        )
        best = predicted_of(line[0])
        if best is None or best in marked:
            continue
        marked.add(best)
        ax.axvline(best, color=color if many else COLORS["grey"], linestyle="--", linewidth=1.0, zorder=0)
        at_best = [p for p in line if p.d_tilde == best]
        if at_best:
            suffix = f" ({line[0].config_text()})" if many else ""
            _star(ax, best, at_best[0].mean, rf"predicted {_D_TILDE} = {best}{suffix}")
    references = _summarise(frame[[(p, k, m) not in line_configs for p, k, m in _config_keys(frame)]], metric)
    for index, point in enumerate(references):
        color, _ = _method_style(point.method, len(line_configs) + index)
        if many and (point.k, point.m) in config_colors and point.method != "uncompressed":
            color = config_colors[(point.k, point.m)]
        details = ", ".join(part for part in (point.config_text(), f"{point.megabytes:.3g} MiB") if part)
        ax.axhline(
            point.mean,
            color=color,
            linestyle=_METHOD_LINESTYLES.get(point.method, "-."),
            linewidth=1.3,
            label=f"{_method_label(point.method)} ({details})",
        )
        if point.sd > 0:
            ax.axhspan(point.mean - point.sd, point.mean + point.sd, color=color, alpha=0.12, linewidth=0)
    d_max = int(max(max(values) for config, values in d_values.items() if config in line_configs))
    ax.set_xticks(np.arange(1, d_max + 1))
    ax.set_xlabel(rf"clustering dimensionality {_D_TILDE}")
    label = _metric_label(metric, ylabel)
    ax.set_ylabel(f"{label} ({_seed_note(points)})")
    ax.set_title(title if title is not None else rf"{label[:1].upper() + label[1:]} vs {_D_TILDE}")
    _figure_legend(figure, ax, owned, ncols=2)
    return figure


def _config_keys(frame: pd.DataFrame) -> list[tuple[str, float | None, float | None]]:
    """(method, k, m) of every row, with missing values as None."""
    return [
        (str(method), _number(k), _number(m))
        for method, k, m in frame[["method", "k", "m"]].itertuples(index=False, name=None)
    ]


def _pareto_front(points: Sequence[_Point]) -> list[_Point]:
    """Configurations that no smaller-or-equal one beats: the best mean at each size, scanning by size."""
    front: list[_Point] = []
    for point in sorted(points, key=lambda p: (p.megabytes, -p.mean)):
        if not front or point.mean > front[-1].mean:
            front.append(point)
    return front


@_styled
def plot_size_frontier(
    results: pd.DataFrame | str | os.PathLike[str],
    *,
    metric: str = "accuracy",
    ax: Axes | None = None,
    predicted_d_tilde: int | None = None,
    log_x: bool = False,
    ylabel: str | None = None,
    title: str | None = None,
) -> Figure:
    """Size–quality frontier: metric (mean ± sd over seeds) against model size in MiB, one line per method.

    Every configuration (k, m, d̃) of a method is a faded marker with error bars; the method's line
    joins its Pareto-optimal configurations (the best quality at each size or smaller). LR²VQ
    configurations run at the predicted d̃ carry a star. The uncompressed model, when present, is a
    dotted horizontal line.

    Parameters
    ----------
    results : pandas.DataFrame or path to a CSV file
        Sweep results with the columns :data:`SWEEP_COLUMNS` and ``metric``.
    metric : str, default "accuracy"
    ax : matplotlib.axes.Axes, optional
    predicted_d_tilde : int, optional
        Mark LR²VQ configurations with this d̃; defaults to the ``predicted_d_tilde`` column when present.
    log_x : bool, default False
        Logarithmic size axis.
    ylabel, title : str, optional

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    InvalidParameterError
        If a required column is missing or there is no compressed configuration.
    """
    frame = load_sweep_results(results, metric)
    points = [p for p in _summarise(frame, metric) if p.method != "uncompressed"]
    if not points:
        raise InvalidParameterError("sweep results hold no compressed configuration (only 'uncompressed')")
    owned = ax is None
    figure, ax = _figure_and_axes(ax, (5.6, 4.2))
    predicted_of = _predicted_lookup(frame, predicted_d_tilde)
    starred = False
    for index, method in enumerate(dict.fromkeys(p.method for p in points)):
        mine = [p for p in points if p.method == method]
        color, marker = _method_style(method, index)
        ax.errorbar(
            np.array([p.megabytes for p in mine], dtype=np.float64),
            np.array([p.mean for p in mine], dtype=np.float64),
            yerr=np.array([p.sd for p in mine], dtype=np.float64),
            linestyle="none",
            marker=marker,
            color=color,
            alpha=0.45,
            capsize=2,
            markersize=4,
        )
        front = _pareto_front(mine)
        ax.plot(
            [p.megabytes for p in front],
            [p.mean for p in front],
            color=color,
            marker=marker,
            label=_method_label(method),
        )
        if not method.startswith("lr2vq"):
            continue
        for point in mine:
            if point.d_tilde is not None and predicted_of(point) == point.d_tilde:
                _star(ax, point.megabytes, point.mean, None if starred else rf"predicted {_D_TILDE}")
                starred = True
    ax.plot(
        [],
        [],
        linestyle="none",
        marker="o",
        markersize=4,
        color=COLORS["grey"],
        alpha=0.45,
        label="every configuration",
    )
    baseline = _summarise(frame[frame["method"] == "uncompressed"], metric, by_d_tilde=False)
    if baseline:
        ax.axhline(
            baseline[0].mean,
            color=COLORS["black"],
            linestyle=_METHOD_LINESTYLES["uncompressed"],
            linewidth=1.2,
            label=f"uncompressed ({baseline[0].megabytes:.3g} MiB)",
        )
    if log_x:
        ax.set_xscale("log")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=7))
    ax.grid(True, axis="both")
    ax.set_xlabel("compressed model size (MiB)")
    label = _metric_label(metric, ylabel)
    ax.set_ylabel(f"{label} ({_seed_note(points)})")
    ax.set_title(title if title is not None else f"Size–{label} frontier")
    _figure_legend(figure, ax, owned, ncols=3)
    return figure
