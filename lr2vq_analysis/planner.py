"""Plan for a size: choose (k, m, d̃) per layer to minimise the predicted model error under a size target.

:func:`plan_for_size` answers "compress to 1.5 MiB" or "30×". Every layer gets a set of candidate
settings — k ∈ {16, 32, 64, 128, 256} (PQF's cap applied), m from the specs and its PQF neighbour
(9 ↔ 18 for 3×3 convolutions, 4 ↔ 8 for 1×1 and linear layers: the published small / large block
sizes), every d̃ in 1..m, and "leave it uncompressed" — each with its exact size in bits (the
:func:`~lr2vq_analysis.size.size_report` rules) and its predicted error from the trade-off model
(:mod:`~lr2vq_analysis.tradeoff`). One trade-off fit per layer and (k, m): the spectrum is computed once
per m, each fit runs the model's at most three k-means probes, and the error at every d̃ is read off the
fitted curve, never measured.

**Objective**: predicted model error = Σ_layers w_l · total_l(k, m, d̃), where total is the modelled
relative error ρ·lowrank + clustering and w_l is the layer's share of the analysed weights (the same
weighting as the report's global d̃), or a data-aware sensitivity passed as ``calibration``.

**Data-aware objective** (``model=`` and ``calibration=`` inputs): each layer's input second moment
H_l = E[x xᵀ] is collected once (:func:`~lr2vq_analysis.calibration.collect_second_moments`, one
layer's H in memory at a time) and every candidate (k, m) fit gets its output-space curves
(:func:`~lr2vq_analysis.tradeoff.with_output_curves`: the exact low-rank error under H and the
modelled clustering error, whose scale is set by re-running the fit's own ≤ 3 probes — no k-means at
any other candidate). The layer's term is then

    w_l · total_l = tr(W_l H_l W_lᵀ) / Σ_j tr(W_j H_j W_jᵀ) · (ρ·lowrank_out_l(d̃) + clustering_out_l(d̃)),

i.e. the objective is the predicted output error energy Σ_l tr(ΔW_l H_l ΔW_lᵀ) relative to the
model's total output energy Σ_l tr(W_l H_l W_lᵀ) — the output-space analogue of the weight-space
objective Σ‖ΔW_l‖² / Σ‖W_l‖². A layer whose inputs are small or that only excites directions the
compression keeps costs little and is compressed harder.

**Allocation**: a multiple-choice knapsack. We use the classic Lagrangian / marginal-gain allocation of
bit allocation across sources (Shoham & Gersho 1988; Everett 1963): each layer's candidates are reduced
to their lower convex hull in (bits, error); the steps along all hulls are taken in order of error
removed per bit (largest first), each step that still fits the budget is taken and a layer whose next
step does not fit is frozen; the slack left is then spent greedily on single-layer swaps to any
candidate (on the hull or not) that lower the error. Why this one: it needs one sort of at most a few
hundred steps per layer (milliseconds, where dynamic programming over bit budgets would need a
discretisation of sizes that span five orders of magnitude), and it is exactly optimal whenever the
budget falls on the global convex hull — no allocation of equal or smaller size has a lower predicted
error (Everett's theorem) — and otherwise never worse than the hull solution below the budget (the
swaps only lower the error). The returned :class:`Plan` also carries the uniform plans
(one k and one m rule for every layer, predicted d̃ per layer) so the gain of allocating is visible.
"""

from __future__ import annotations

import html
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from joblib import Parallel, delayed

from ._io import read_json, write_atomic, write_json
from ._threads import single_threaded
from ._validation import PROBE_OPTIONS, check_n_jobs, check_options, check_rho, check_seed
from .exceptions import InvalidParameterError, InvalidWeightsError, ReportFileError, UnreachableTargetError
from .plan import LayerPlan, effective_k
from .size import SizeReport, bits_to_mib, size_report
from .specs import CompressionSpecs, as_specs
from .subvectors import n_subvectors, row_length, to_subvectors
from .tradeoff import DEFAULT_MAX_POINTS_PER_CENTROID, DEFAULT_RHO, TradeoffModel, _default_n_probes, _fit

__all__ = [
    "DEFAULT_K_CANDIDATES",
    "PLAN_FORMAT",
    "Option",
    "Plan",
    "UniformPlan",
    "allocate",
    "lower_convex_hull",
    "plan_for_size",
    "write_plan_folder",
]

#: k candidates of :func:`plan_for_size` (PQF's cap still applies per layer).
DEFAULT_K_CANDIDATES: tuple[int, ...] = (16, 32, 64, 128, 256)
#: The ``format`` entry of plan.json; ``lr2vq compress --plan`` recognises it.
PLAN_FORMAT = "lr2vq-plan/1"
_FP32 = 32


# --------------------------------------------------------------------------------------------------
# The allocation (pure: options in, choice out)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One candidate setting of one layer: its compressed size and predicted (weighted) error.

    Parameters
    ----------
    bits : float
        Compressed size of the layer in bits (its dense size for "uncompressed").
    error : float
        Predicted error, weighted by the layer's share or sensitivity (the objective's term).
    plan : LayerPlan or None
        The setting; None leaves the layer uncompressed.
    relative_error : float
        The unweighted relative error ρ·lowrank + clustering (in the layer's output with calibration data).
    """

    bits: float
    error: float
    plan: LayerPlan | None = None
    relative_error: float = 0.0


def lower_convex_hull(options: Sequence[Option]) -> list[Option]:
    """The options on the lower convex hull of (bits, error), by increasing bits (error decreasing).

    Examples
    --------
    >>> hull = lower_convex_hull([Option(1, 10), Option(2, 9.5), Option(3, 4), Option(5, 3.5), Option(4, 8)])
    >>> [(o.bits, o.error) for o in hull]
    [(1, 10), (3, 4), (5, 3.5)]
    """
    ordered = sorted(options, key=lambda o: (o.bits, o.error))
    pareto: list[Option] = []
    for option in ordered:
        if not pareto or option.error < pareto[-1].error:
            if pareto and option.bits == pareto[-1].bits:
                pareto[-1] = option
            else:
                pareto.append(option)
    hull: list[Option] = []
    for option in pareto:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when it lies on or above the segment a → option
            cross = (b.bits - a.bits) * (option.error - a.error) - (b.error - a.error) * (option.bits - a.bits)
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(option)
    return hull


def allocate(layers: Sequence[Sequence[Option]], budget_bits: float) -> tuple[list[int], list[tuple[float, float]]]:
    """Marginal-gain allocation over per-layer convex hulls (see the module docstring).

    Parameters
    ----------
    layers : sequence of sequence of Option
        The candidates of each layer.
    budget_bits : float
        Largest total bits allowed (the fixed, uncompressed parts already subtracted).

    Returns
    -------
    choice : list of int
        Index into each layer's ``options`` of the chosen candidate.
    frontier : list of (bits, error)
        The Lagrangian frontier (all hull steps taken in order, ignoring the budget), for figures.

    Raises
    ------
    UnreachableTargetError
        If even the smallest candidate of every layer exceeds the budget.
    """
    hulls = [lower_convex_hull(options) for options in layers]
    position = [0] * len(hulls)
    smallest = sum(hull[0].bits for hull in hulls)
    if smallest > budget_bits:
        raise UnreachableTargetError(f"the smallest candidates need {smallest:.0f} bits, above the budget")
    steps = []
    for li, hull in enumerate(hulls):
        for i in range(1, len(hull)):
            d_bits = hull[i].bits - hull[i - 1].bits
            gain = (hull[i - 1].error - hull[i].error) / d_bits
            steps.append((-gain, li, i))
    steps.sort()
    used = smallest
    error = sum(hull[0].error for hull in hulls)
    frontier = [(used, error)]
    frozen = [False] * len(hulls)
    total_bits, total_error = used, error
    for _, li, i in steps:
        hull = hulls[li]
        d_bits = hull[i].bits - hull[i - 1].bits
        total_bits += d_bits
        total_error += hull[i].error - hull[i - 1].error
        frontier.append((total_bits, total_error))
        if frozen[li] or position[li] != i - 1:
            frozen[li] = True
            continue
        if used + d_bits <= budget_bits:
            used += d_bits
            position[li] = i
        else:
            frozen[li] = True
    choice = []
    for options, hull, pos in zip(layers, hulls, position, strict=True):
        choice.append(next(j for j, option in enumerate(options) if option is hull[pos]))
    # The hull steps leave slack when a layer's next step does not fit: spend it on the single-layer
    # swap (any candidate, on the hull or not) that lowers the error most, until none fits.
    while True:
        best = (0.0, -1, -1)
        for li, options in enumerate(layers):
            current = options[choice[li]]
            room = budget_bits - used + current.bits
            for j, option in enumerate(options):
                gain = current.error - option.error
                if option.bits <= room and gain > best[0]:
                    best = (gain, li, j)
        if best[1] < 0:
            break
        _, li, j = best
        used += layers[li][j].bits - layers[li][choice[li]].bits
        choice[li] = j
    return choice, frontier


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UniformPlan:
    """One k and one m rule for every layer (predicted d̃ per layer), as compared with the allocation.

    Parameters
    ----------
    label : str
        E.g. ``"uniform k=256, m=small"`` (m small: the specs' m; large: twice it, PQF's large blocks).
    plan : dict of str to LayerPlan
        The plan.
    bits : float
        Its total size in bits (size_report's rules).
    predicted_error : float
        Its predicted model error (the planner's objective).
    """

    label: str
    plan: dict[str, LayerPlan]
    bits: float
    predicted_error: float

    @property
    def megabytes(self) -> float:
        """Size in MiB by the size_report rules."""
        return bits_to_mib(self.bits)


class Plan(Mapping[str, LayerPlan]):
    """A size-targeted compression plan: a mapping ``{weight key: LayerPlan}`` plus how it was chosen.

    Pass it wherever a plan is taken: ``compress(model, plan)``, ``size_report(state, plan)``,
    ``lr2vq compress --plan plan.json``. Layers the allocation left uncompressed are not in the mapping.
    Built by :func:`plan_for_size`; the constructor arguments (layers, target_bits, target,
    layer_errors, predicted_error, uniform, frontier, notes, specs, source, as the attributes below)
    are its state, plus ``shapes`` ``{key: (shape, bits per value)}`` of every counted tensor (for
    :meth:`size_report`), ``timings`` ``{"analysis_s", "allocation_s"}`` and ``analysis`` (kept as
    ``analysis_``).

    Attributes
    ----------
    target_bits : float
        The size target in bits.
    target : str
        The target as asked (``"1.5 MiB"`` or ``"30× vs source"``).
    layer_errors : dict of str to float
        Predicted relative error (ρ·lowrank + clustering) of each chosen layer.
    predicted_error : float
        Σ weight × relative error over the analysed layers (the objective).
    uniform : list of UniformPlan
        The uniform plans compared with.
    frontier : list of (MiB, predicted error)
        The allocation's Lagrangian frontier.
    notes : dict of str to str
        Per-layer notes (k capped, left uncompressed, skipped and why).
    objective : str
        ``"weight"`` (errors relative to ‖W‖², layers weighted by size), ``"output"`` (calibration data:
        output-space errors weighted by tr(W H Wᵀ) share) or ``"sensitivity"`` (given sensitivities).
    specs : CompressionSpecs
    source : str
    shapes : dict of str to (shape, bits)
        Every counted tensor's shape and bits per value in the source (for :meth:`size_report`).
    timings : dict of str to float
        ``analysis_s`` and ``allocation_s``, seconds.
    analysis : object or None
        Kept as ``analysis_``: the per-layer trade-off fits, in memory only (not saved);
        ``plan_for_size(plan, other_target)`` re-plans from them without any k-means.
    """

    def __init__(
        self,
        layers: Mapping[str, LayerPlan],
        *,
        target_bits: float,
        target: str,
        layer_errors: Mapping[str, float],
        predicted_error: float,
        uniform: Sequence[UniformPlan],
        frontier: Sequence[tuple[float, float]],
        shapes: Mapping[str, tuple[tuple[int, ...], int]],
        notes: Mapping[str, str],
        specs: CompressionSpecs,
        source: str = "",
        timings: Mapping[str, float] | None = None,
        analysis: Any = None,
        objective: str = "weight",
    ) -> None:
        self._layers = dict(layers)
        self.objective = objective
        self.analysis_ = analysis
        self.target_bits = float(target_bits)
        self.target = target
        self.layer_errors = dict(layer_errors)
        self.predicted_error = float(predicted_error)
        self.uniform = list(uniform)
        self.frontier = [(float(a), float(b)) for a, b in frontier]
        self._shapes = {key: (tuple(int(s) for s in shape), int(bits)) for key, (shape, bits) in shapes.items()}
        self.notes = dict(notes)
        self.specs = specs
        self.source = source
        self.timings = dict(timings or {})

    # Mapping
    def __getitem__(self, key: str) -> LayerPlan:
        return self._layers[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def layer_plans(self) -> dict[str, LayerPlan]:
        """The plain ``{weight key: LayerPlan}`` that :func:`~lr2vq_analysis.nn.compress` takes."""
        return dict(self._layers)

    def size_report(self) -> SizeReport:
        """The size of the planned model by :func:`~lr2vq_analysis.size.size_report`'s rules."""
        return size_report(_placeholder_state(self._shapes), self._layers)

    @property
    def megabytes(self) -> float:
        """Planned size in MiB."""
        return self.size_report().megabytes

    def best_uniform(self) -> UniformPlan | None:
        """The uniform plan with the lowest predicted error within the target, or None."""
        fitting = [u for u in self.uniform if u.bits <= self.target_bits]
        return min(fitting, key=lambda u: u.predicted_error) if fitting else None

    def to_frame(self) -> Any:
        """One row per analysed layer: chosen k, m, d̃, bits per weight, predicted error, note."""
        import pandas as pd

        sizes = {layer.name: layer for layer in self.size_report().layers}
        rows = []
        for key in self._shapes:
            if key not in self._layers and key not in self.notes:
                continue
            entry = self._layers.get(key)
            size = sizes.get(key)
            rows.append(
                {
                    "name": key,
                    "shape": "×".join(str(s) for s in self._shapes[key][0]),
                    "k": entry.k if entry else None,
                    "m": entry.m if entry else None,
                    "d_tilde": entry.d_tilde if entry else None,
                    "bits_per_weight": size.compressed_bits / size.n_params if size else math.nan,
                    "predicted_error": self.layer_errors.get(key, 0.0),
                    "note": self.notes.get(key, ""),
                }
            )
        return pd.DataFrame(rows)

    # serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; ``layers`` maps each key to ``{k, m, d_tilde}`` as ``lr2vq compress --plan`` reads."""
        size = self.size_report()
        return {
            "format": PLAN_FORMAT,
            "source": self.source,
            "target": self.target,
            "target_bits": self.target_bits,
            "megabytes": size.megabytes,
            "ratio": size.ratio,
            "ratio_vs_source": size.ratio_vs_source,
            "predicted_error": self.predicted_error,
            "layers": {key: plan.to_dict() for key, plan in self._layers.items()},
            "layer_errors": self.layer_errors,
            "notes": self.notes,
            "uniform": [
                {
                    "label": u.label,
                    "bits": u.bits,
                    "predicted_error": u.predicted_error,
                    "plan": {key: p.to_dict() for key, p in u.plan.items()},
                }
                for u in self.uniform
            ],
            "frontier": self.frontier,
            "shapes": {key: {"shape": list(shape), "bits": bits} for key, (shape, bits) in self._shapes.items()},
            "specs": self.specs.to_dict(),
            "timings": self.timings,
            "objective": self.objective,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Inverse of :meth:`to_dict`."""
        if data.get("format") != PLAN_FORMAT:
            raise ReportFileError(f"not a plan of format {PLAN_FORMAT!r} (format={data.get('format')!r})")
        try:
            return cls(
                {key: LayerPlan.from_dict(entry) for key, entry in data["layers"].items()},
                target_bits=float(data["target_bits"]),
                target=str(data["target"]),
                layer_errors={key: float(v) for key, v in data["layer_errors"].items()},
                predicted_error=float(data["predicted_error"]),
                uniform=[
                    UniformPlan(
                        u["label"],
                        {key: LayerPlan.from_dict(p) for key, p in u["plan"].items()},
                        float(u["bits"]),
                        float(u["predicted_error"]),
                    )
                    for u in data["uniform"]
                ],
                frontier=[(float(point[0]), float(point[1])) for point in data["frontier"]],
                shapes={key: (tuple(v["shape"]), int(v["bits"])) for key, v in data["shapes"].items()},
                notes=dict(data.get("notes", {})),
                specs=CompressionSpecs.from_dict(data["specs"]),
                source=str(data.get("source", "")),
                timings=data.get("timings"),
                objective=str(data.get("objective", "weight")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ReportFileError(f"plan is damaged: {type(exc).__name__}: {exc}") from None

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write plan.json atomically; ``lr2vq compress --plan`` and :meth:`load` read it."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """Read a plan written by :meth:`save`."""
        return cls.from_dict(read_json(path, "the plan"))

    # display
    def summary(self) -> str:
        """Two lines: size against the target, predicted error against the best uniform plan."""
        size = self.size_report()
        best = self.best_uniform()
        uniform = (
            f"best uniform plan within the target: {best.label}, {best.megabytes:.3f} MiB, "
            f"predicted error {best.predicted_error:.4f}"
            if best
            else "no uniform plan fits the target"
        )
        return (
            f"{len(self)} compressed layer(s): {size.megabytes:.3f} MiB (target {self.target}), "
            f"{size.ratio_vs_source:.1f}x vs the {size.source_dtype} source ({size.ratio:.1f}x vs fp32), "
            f"predicted error {self.predicted_error:.4f}"
            f"{' (calibrated: output-space errors weighted by tr(W H Wᵀ))' if self.objective == 'output' else ''}"
            f"\n{uniform}"
        )

    def __repr__(self) -> str:
        size = self.size_report()
        return (
            f"Plan({len(self)} layers, {size.megabytes:.3f} MiB <= {bits_to_mib(self.target_bits):.3f} MiB, "
            f"ratio {size.ratio_vs_source:.1f}x, predicted_error={self.predicted_error:.4f})"
        )

    def _repr_html_(self) -> str:
        frame = self.to_frame()
        head = "<br>".join(html.escape(line) for line in self.summary().splitlines())
        return f"<div><p><b>Plan</b>: {head}</p>{frame.to_html(index=False, na_rep='')}</div>"


# --------------------------------------------------------------------------------------------------
# Analysis of the candidates
# --------------------------------------------------------------------------------------------------


@dataclass
class _Analysis:
    """What plan_for_size analysed, kept on the Plan so that another target costs no k-means."""

    layers: list[_Layer]
    state_shapes: dict[str, tuple[tuple[int, ...], int]]
    notes: dict[str, str]
    source: str
    specs: CompressionSpecs
    k_values: tuple[int, ...]


@dataclass
class _Layer:
    name: str
    kind: str
    shape: tuple[int, ...]
    weight: np.ndarray | None
    fixed_d: int | None
    m_values: list[int]
    models: dict[tuple[int, int], TradeoffModel]
    notes: list[str]
    output_energy: float | None = None  # tr(W H Wᵀ) with calibration data


def _fit_layer(
    layer: _Layer,
    k_values: Sequence[int],
    rho: float,
    seed: int,
    cap_k: bool,
    probe_options: Mapping[str, Any],
    keep_weight: bool = False,
) -> _Layer:
    assert layer.weight is not None
    max_ppc = probe_options.get("max_points_per_centroid", DEFAULT_MAX_POINTS_PER_CENTROID)
    with single_threaded(probe_options.get("device")):
        for m in layer.m_values:
            x = to_subvectors(layer.weight, m, name=layer.name)
            n = x.shape[0]
            from .spectrum import compute_spectrum

            spectrum = compute_spectrum(x)  # once per m
            ks = sorted({effective_k(k, layer.shape, m) if cap_k else k for k in k_values if k < n})
            for k in ks:
                if (k, m) in layer.models or k >= n:
                    continue
                n_probes = probe_options.get("n_probes") or _default_n_probes(n / k, max_ppc)
                layer.models[(k, m)] = _fit(
                    spectrum, x, k, rho, seed, layer.name, n_probes, max_ppc, probe_options.get("device")
                )
    if not keep_weight:
        layer.weight = None  # free memory
    return layer


def _calibrate_layers(
    layers: Sequence[_Layer], module: Any, calibration: Any, seed: int, probe_options: Mapping[str, Any]
) -> None:
    """Output-space curves on every candidate fit and tr(W H Wᵀ) per layer, one layer's H at a time."""
    from .calibration import _as_groups, _quadratic, collect_second_moments
    from .tradeoff import with_output_curves

    if not isinstance(module, torch.nn.Module):
        raise InvalidParameterError(
            f"calibration inputs need a runnable model: pass model= (a torch.nn.Module), got {type(module).__name__}"
        )
    max_ppc = probe_options.get("max_points_per_centroid", DEFAULT_MAX_POINTS_PER_CENTROID)
    by_name = {layer.name: layer for layer in layers}
    for moment in collect_second_moments(module, calibration, list(by_name)):
        layer = by_name[moment.name]
        assert layer.weight is not None
        with single_threaded(probe_options.get("device")):
            for key, model in layer.models.items():
                layer.models[key] = with_output_curves(
                    model, layer.weight, moment.matrix, seed=seed, max_points_per_centroid=max_ppc
                )
        w, h = _as_groups(layer.weight, moment.matrix, layer.name)
        layer.output_energy = _quadratic(w, h)
        layer.weight = None


def _m_candidates(m0: int, shape: tuple[int, ...], extra: Sequence[int] | None) -> list[int]:
    values = [m0, 2 * m0] if extra is None else [m0, *extra]
    length = row_length(shape)
    out = []
    for m in values:
        if m not in out and length % m == 0 and n_subvectors(shape, m) >= 8:
            out.append(m)
    return out


def _placeholder_state(shapes: Mapping[str, tuple[tuple[int, ...], int]]) -> dict[str, torch.Tensor]:
    """Zero-memory tensors of the given shapes and widths (size_report reads shapes and dtypes only)."""
    dtypes = {8: torch.float8_e4m3fn, 16: torch.float16, 32: torch.float32, 64: torch.float64}
    out = {}
    for key, (shape, bits) in shapes.items():
        dtype = torch.int64 if key.endswith("num_batches_tracked") else dtypes[bits]
        out[key] = torch.empty((), dtype=dtype).expand(shape)
    return out


def _state_shapes(state: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], int]]:
    shapes = {}
    for key, value in state.items():
        floating = value.is_floating_point() if isinstance(value, torch.Tensor) else value.dtype.kind == "f"
        if floating or key.rpartition(".")[2] in ("running_mean", "running_var", "num_batches_tracked"):
            bits = value.element_size() * 8 if isinstance(value, torch.Tensor) else value.dtype.itemsize * 8
            shapes[str(key)] = (tuple(int(s) for s in value.shape), int(bits))
    return shapes


def _parse_candidates(candidates: Any) -> tuple[tuple[int, ...], Any, Any]:
    if candidates is None:
        return DEFAULT_K_CANDIDATES, None, None
    if not isinstance(candidates, Mapping):
        raise InvalidParameterError(
            f"candidates={candidates!r} is invalid; pass a dict with keys among 'k', 'm', 'd_tilde'"
        )
    unknown = sorted(set(candidates) - {"k", "m", "d_tilde"})
    if unknown:
        raise InvalidParameterError(f"candidates: unknown key(s) {unknown}; allowed keys are ['k', 'm', 'd_tilde']")
    ks = tuple(candidates.get("k", DEFAULT_K_CANDIDATES))
    for k in ks:
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 2:
            raise InvalidParameterError(f"candidates['k'] holds {k!r}; every k must be an integer >= 2")
    m = candidates.get("m")
    if m is not None and not isinstance(m, Mapping):
        m = {"*": list(m)}
    d = candidates.get("d_tilde")
    if d is not None and d not in ("all", "predicted"):
        raise InvalidParameterError(f"candidates['d_tilde']={d!r} is invalid; allowed: 'all', 'predicted'")
    return tuple(int(k) for k in ks), m, d


def _sensitivities(layers: Sequence[_Layer], calibration: Any) -> dict[str, float]:
    energies = [layer.output_energy for layer in layers]
    if calibration is None and all(e is not None for e in energies):  # data-aware: tr(W H Wᵀ) shares
        total_energy = sum(e for e in energies if e is not None)
        if not total_energy > 0:
            raise InvalidParameterError("the calibration inputs give every analysed layer a zero output energy")
        return {layer.name: float(layer.output_energy or 0.0) / total_energy for layer in layers}
    if calibration is None:
        sizes = {layer.name: float(math.prod(layer.shape)) for layer in layers}
        total = sum(sizes.values())
        return {name: size / total for name, size in sizes.items()}
    out = {}
    for layer in layers:
        if isinstance(calibration, Mapping):
            if layer.name not in calibration:
                raise InvalidParameterError(
                    f"calibration has no sensitivity for layer {layer.name!r}; it needs one per analysed layer"
                )
            value = calibration[layer.name]
        elif callable(calibration):
            value = calibration(layer.name)
        else:
            raise InvalidParameterError(
                f"calibration of type {type(calibration).__name__} is invalid; pass {{layer: sensitivity}} or a "
                "callable(layer_name) -> sensitivity"
            )
        value = float(value)
        if not value >= 0 or not math.isfinite(value):
            raise InvalidParameterError(f"layer {layer.name!r}: sensitivity {value!r} is invalid; it must be >= 0")
        out[layer.name] = value
    return out


def _layers_from_reports(reports: Sequence[Any]) -> tuple[list[_Layer], str]:
    pooled: dict[str, _Layer] = {}
    for report in reports:
        for lr in report.layers:
            layer = pooled.setdefault(lr.name, _Layer(lr.name, lr.kind, tuple(lr.shape), None, None, [], {}, []))
            layer.models[(lr.k, lr.m)] = lr.model
            if lr.m not in layer.m_values:
                layer.m_values.append(lr.m)
    return list(pooled.values()), str(reports[0].source)


def _relative_error(layer: _Layer, model: TradeoffModel, d: int) -> float:
    """ρ·lowrank + clustering at d̃: in the layer's output with calibration data, else relative to ‖W‖²."""
    if layer.output_energy is not None and model.has_output:
        return float(model.rho * model.lowrank_output(d) + model.clustering_output(d))
    return float(model.total(d))


def _options(layer: _Layer, weight: float, fixed_d_mode: str | None, dense_bits: float) -> list[Option]:
    options = [Option(dense_bits, 0.0, None, 0.0)]
    for (k, m), model in sorted(layer.models.items()):
        if layer.fixed_d is not None:
            dims = [min(layer.fixed_d, m)]
        elif fixed_d_mode == "predicted":
            dims = [model.d_tilde]
        else:
            dims = list(range(1, m + 1))
        for d in dims:
            plan = LayerPlan(k=k, m=m, d_tilde=d)
            bits = sum(plan.compressed_bits(layer.shape).values())
            relative = _relative_error(layer, model, d)
            options.append(Option(bits, weight * relative, plan, relative))
    return options


def plan_for_size(
    source_or_report: Any,
    size_mib: float | None = None,
    *,
    ratio: float | None = None,
    candidates: Mapping[str, Any] | None = None,
    calibration: Any = None,
    model: Any = None,
    specs: Any = "pqf-small",
    rho: float = DEFAULT_RHO,
    seed: int = 0,
    n_jobs: int = 1,
    keep_first_conv: bool = False,
    **probe_options: Any,
) -> Plan:
    """Choose (k, m, d̃) per layer to minimise the predicted model error within a size target.

    Parameters
    ----------
    source_or_report : str, path, torch.nn.Module, mapping, Report, sequence of Report, or Plan
        The model (see :func:`~lr2vq_analysis.weights.load_weights`): its layers are analysed at every
        candidate (k, m). A Plan returned by this function re-plans from its analyses (no k-means; ``specs``,
        ``candidates['k']`` and ``rho`` are then those of the first call).
        Or saved analyses: each :class:`~lr2vq_analysis.report.Report` contributes its
        (k, m) per layer as a candidate, and no k-means runs (the report's source is read for the sizes
        of the other tensors when it is a readable file).
    size_mib : float, optional
        Target size in MiB (size_report's rules). Exactly one of ``size_mib`` and ``ratio``.
    ratio : float, optional
        Target ratio against the source as stored (for an fp32 source, the field's ratio).
    candidates : dict, optional
        ``{"k": [...], "m": [...] or {glob: [...]}, "d_tilde": "all" | "predicted"}``. Defaults: k in
        :data:`DEFAULT_K_CANDIDATES`; m = the specs' m of the layer and twice it (PQF's small and
        large blocks) where it divides the row length; every d̃ (its error read off the trade-off curve).
    calibration : tensor, list of batches, DataLoader, mapping or callable, optional
        Calibration inputs of ``model`` (a tensor, a list of batches or a DataLoader, as
        :func:`~lr2vq_analysis.calibration.collect_second_moments` takes): the objective becomes the
        data-aware one of the module docstring (output-space errors weighted by each layer's share of
        tr(W H Wᵀ)). Or given sensitivities per layer (``{name: s}`` or ``f(name) -> s``): the predicted
        model error is then Σ s_l · relative error_l. Default: each layer's share of the analysed weights.
    model : torch.nn.Module, optional
        The runnable model that ``calibration`` inputs are fed to (its Linear/Conv1d/Conv2d weights under
        the source's state-dict keys; :func:`~lr2vq_analysis.calibration.load_exported_model` turns a
        ``torch.export`` archive into one). Default: ``source_or_report`` when it is a module.
    specs : CompressionSpecs, preset name, dict or JSON path, default "pqf-small"
        Which layers are compressed (skip rules, the first-conv rule), their base m, and fixed d̃.
    rho : float, default DEFAULT_RHO
        Share of the low-rank error that training does not recover.
    seed : int, default 0
        Seed of the k-means probes.
    n_jobs : int, default 1
        Layers analysed in parallel (threads).
    keep_first_conv : bool, default False
        Compress the first convolution too.
    **probe_options
        ``n_probes``, ``max_points_per_centroid``, ``device`` for the trade-off fits.

    Returns
    -------
    Plan

    Raises
    ------
    UnreachableTargetError
        If the target is below the smallest candidate plan or at/above the uncompressed size; the message
        names the reachable range.
    InvalidParameterError
        If both or neither target is given, or an argument is invalid.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> state = {"a.weight": rng.normal(size=(64, 64)).astype(np.float32),
    ...          "b.weight": rng.normal(size=(64, 128)).astype(np.float32)}
    >>> plan = plan_for_size(state, ratio=8, specs={"m": 4}, candidates={"k": [16, 64]})
    >>> plan.size_report().ratio >= 8
    True
    """
    from .report import Report
    from .weights import load_state_dict, load_weights

    if (size_mib is None) == (ratio is None):
        raise InvalidParameterError("give exactly one target: size_mib (MiB) or ratio (×)")
    for label, value in (("size_mib", size_mib), ("ratio", ratio)):
        if value is not None and (not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value)):
            raise InvalidParameterError(f"{label}={value!r} is invalid; it must be a positive number")
    rho = check_rho(rho)
    seed = check_seed(seed)
    n_jobs = check_n_jobs(n_jobs)
    probe_options = check_options(probe_options, PROBE_OPTIONS, what="probe option")
    specs = as_specs(specs)
    k_values, m_rules, d_mode = _parse_candidates(candidates)
    inputs = calibration is not None and not isinstance(calibration, Mapping) and not callable(calibration)
    if model is not None and not inputs:
        raise InvalidParameterError(
            "model= is the runnable model for calibration inputs: pass calibration= (a tensor of inputs, a list of "
            "batches or a DataLoader) with it"
        )
    if inputs and model is None:
        model = source_or_report if isinstance(source_or_report, torch.nn.Module) else None
        if model is None:
            raise InvalidParameterError(
                "calibration inputs need a runnable model: pass model= (a torch.nn.Module, e.g. "
                "calibration.load_exported_model('model.pt2'))"
            )
    timings: dict[str, float] = {}
    start = time.perf_counter()
    reports: list[Any] = []
    if isinstance(source_or_report, Plan):
        if source_or_report.analysis_ is None:
            raise InvalidParameterError("a loaded Plan holds no analyses to re-plan from; pass the model or reports")
        analysis = source_or_report.analysis_
        layers, state_shapes, source, specs = analysis.layers, analysis.state_shapes, analysis.source, analysis.specs
        k_values, notes = analysis.k_values, dict(analysis.notes)
    elif isinstance(source_or_report, Report):
        reports = [source_or_report]
    elif isinstance(source_or_report, Sequence) and source_or_report and isinstance(source_or_report[0], Report):
        reports = list(source_or_report)
    if isinstance(source_or_report, Plan):
        pass
    elif reports:
        if inputs:
            raise InvalidParameterError(
                "calibration inputs need the weights: pass the model or weight file, not a Report (its fits hold no H)"
            )
        notes = {}
        layers, source = _layers_from_reports(reports)
        try:
            state_shapes = _state_shapes(load_state_dict(source))
        except Exception:  # the report's source is gone or was not a file: count the analysed layers only
            state_shapes = {layer.name: (layer.shape, _FP32) for layer in layers}
            notes["*"] = "the report's source could not be read: only the analysed layers are counted"
    else:
        weights = load_weights(source_or_report, keep_first_conv=keep_first_conv)
        source = weights.source
        state_shapes = _state_shapes(load_state_dict(source_or_report))
        notes = dict(weights.skipped)
        layers = []
        for name, array in weights.items():
            info = weights.info[name]
            resolved = specs.resolve(name, info.shape, groups=getattr(info, "groups", None))
            if resolved.skip_reason is not None or resolved.m is None:
                notes[name] = str(resolved.skip_reason)
                continue
            extra = None
            if m_rules is not None:
                from .specs import _matches, _specificity

                hits = sorted((p for p in m_rules if _matches(name, p)), key=_specificity)
                extra = list(m_rules[hits[-1]]) if hits else None
            m_values = _m_candidates(resolved.m, info.shape, extra)
            layers.append(_Layer(name, resolved.kind, info.shape, array, resolved.d_tilde, m_values, {}, []))
        if not layers:
            raise InvalidWeightsError(f"no layer of {source} can be compressed with these specs: {notes}")
        jobs = [delayed(_fit_layer)(layer, k_values, rho, seed, specs.cap_k, probe_options, inputs) for layer in layers]
        layers = list(Parallel(n_jobs=n_jobs, prefer="threads")(jobs))
        if inputs:
            _calibrate_layers(layers, model, calibration, seed, probe_options)
    timings["analysis_s"] = time.perf_counter() - start
    analysis = _Analysis(layers, state_shapes, dict(notes), str(source), specs, tuple(k_values))
    start = time.perf_counter()

    if inputs and isinstance(source_or_report, Plan):
        raise InvalidParameterError(
            "re-planning from a Plan reuses its analyses; calibrate in the first plan_for_size call"
        )
    weights_by_layer = _sensitivities(layers, None if inputs else calibration)
    if calibration is not None and not inputs:
        objective = "sensitivity"
    elif all(layer.output_energy is not None for layer in layers):
        objective = "output"
    else:
        objective = "weight"
    base = size_report(_placeholder_state(state_shapes))  # nothing compressed: the size_report rules
    dense = {layer.name: layer.compressed_bits for layer in base.layers}
    fixed_bits = base.compressed_bits - sum(dense.get(layer.name, 0.0) for layer in layers)
    options = []
    for layer in layers:
        layer_dense = dense.get(layer.name, float(math.prod(layer.shape) * _FP32))
        options.append(_options(layer, weights_by_layer[layer.name], d_mode, layer_dense))
    source_bits = base.source_bits
    smallest = fixed_bits + sum(min(o.bits for o in opts) for opts in options)
    largest = fixed_bits + sum(opts[0].bits for opts in options)  # every analysed layer uncompressed
    if size_mib is not None:
        target_bits = float(size_mib) * 8 * 2**20
        target = f"{size_mib:g} MiB"
    else:
        target_bits = source_bits / float(ratio)  # type: ignore[arg-type]
        target = f"{ratio:g}x vs source"
    reachable = (
        f"reachable: {bits_to_mib(smallest):.4g}–{bits_to_mib(largest):.4g} MiB "
        f"({source_bits / largest:.3g}–{source_bits / smallest:.4g}× vs the source)"
    )
    if target_bits < smallest:
        raise UnreachableTargetError(
            f"target {target} ({bits_to_mib(target_bits):.4g} MiB) is below the smallest candidate plan; {reachable}"
        )
    if target_bits >= largest:
        raise UnreachableTargetError(
            f"target {target} ({bits_to_mib(target_bits):.4g} MiB) is not below the uncompressed size; {reachable}"
        )
    choice, frontier = allocate(options, target_bits - fixed_bits)
    chosen: dict[str, LayerPlan] = {}
    layer_errors: dict[str, float] = {}
    predicted = 0.0
    for layer, opts, index in zip(layers, options, choice, strict=True):
        option = opts[index]
        predicted += option.error
        if option.plan is None:
            notes[layer.name] = "left uncompressed by the allocation"
            continue
        chosen[layer.name] = option.plan
        layer_errors[layer.name] = option.relative_error
        requested = max(
            (k for k in k_values if effective_k(k, layer.shape, option.plan.m) == option.plan.k), default=option.plan.k
        )
        if requested > option.plan.k:
            notes[layer.name] = f"k capped from {requested} to {option.plan.k} (PQF: k <= n_subvectors/4)"
    order = [key for key in state_shapes if key in chosen]
    chosen = {key: chosen[key] for key in order}
    uniform = _uniform_plans(layers, options, k_values, fixed_bits, specs, weights_by_layer)
    timings["allocation_s"] = time.perf_counter() - start
    return Plan(
        chosen,
        target_bits=target_bits,
        target=target,
        layer_errors=layer_errors,
        predicted_error=predicted,
        uniform=uniform,
        frontier=[(bits_to_mib(fixed_bits + bits), error) for bits, error in frontier],
        shapes=state_shapes,
        notes=notes,
        specs=specs,
        source=str(source),
        timings=timings,
        analysis=analysis,
        objective=objective,
    )


def _uniform_plans(
    layers: Sequence[_Layer],
    options: Sequence[Sequence[Option]],
    k_values: Sequence[int],
    fixed_bits: float,
    specs: CompressionSpecs,
    weights: Mapping[str, float],
) -> list[UniformPlan]:
    """One plan per (k, m rule): every layer at that k (capped) and its i-th m, at its predicted d̃."""
    out = []
    n_rules = max(len(layer.m_values) for layer in layers)
    for rule in range(n_rules):
        for k in k_values:
            plan: dict[str, LayerPlan] = {}
            bits, error = fixed_bits, 0.0
            for layer, opts in zip(layers, options, strict=True):
                m = layer.m_values[min(rule, len(layer.m_values) - 1)] if layer.m_values else 0
                model = layer.models.get((effective_k(k, layer.shape, m) if specs.cap_k else k, m)) if m else None
                if model is None:
                    bits += opts[0].bits
                    continue
                d = layer.fixed_d or model.d_tilde
                entry = LayerPlan(k=model.k, m=m, d_tilde=min(d, m))
                plan[layer.name] = entry
                bits += sum(entry.compressed_bits(layer.shape).values())
                error += weights[layer.name] * _relative_error(layer, model, entry.d_tilde)
            label = f"uniform k={k}, m={'small' if rule == 0 else 'large'}"
            out.append(UniformPlan(label, plan, bits, error))
    return out


# --------------------------------------------------------------------------------------------------
# Output folder
# --------------------------------------------------------------------------------------------------


def plot_plan(plan: Plan, ax: Any = None) -> Any:
    """Predicted error vs size: the allocation's frontier, the uniform plans, the target and the plan."""
    import matplotlib.pyplot as plt

    if ax is None:
        figure, ax = plt.subplots(figsize=(6.4, 4.2))
    else:
        figure = ax.figure
    xs, ys = zip(*plan.frontier, strict=True)
    ax.plot(xs, ys, "-", color="C0", label="allocated (Lagrangian frontier)")
    for rule, marker in (("small", "o"), ("large", "s")):
        points = [(u.megabytes, u.predicted_error, u.label) for u in plan.uniform if u.label.endswith(rule)]
        if points:
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker,
                color="C1" if rule == "small" else "C2",
                label=f"uniform plans, m {rule} (k = 16…256)",
            )
    ax.axvline(bits_to_mib(plan.target_bits), color="0.5", ls="--", label=f"target {plan.target}")
    ax.plot([plan.megabytes], [plan.predicted_error], "*", color="C3", ms=14, label="chosen plan")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model size (MiB, size_report rules)")
    ax.set_ylabel("predicted model error (weighted relative)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return figure


_OBJECTIVE_TEXT = {
    "weight": "Σ layer share of the weights × (ρ·low-rank + clustering), relative to ‖W‖²",
    "output": "calibrated: Σ layer share of tr(W H Wᵀ) × (ρ·low-rank + clustering) in the layer's output",
    "sensitivity": "Σ given sensitivity × (ρ·low-rank + clustering)",
}


def write_plan_folder(plan: Plan, out: str | os.PathLike[str], *, command: str = "") -> dict[str, Path]:
    """Write plan.json, report.md (chosen (k, m, d̃) per layer) and plan.png / plan.svg into ``out``.

    Parameters
    ----------
    plan : Plan
        From :func:`plan_for_size`.
    out : str or path
        Folder (created).
    command : str, optional
        The command line that made the plan, quoted at the top of report.md.

    Returns
    -------
    dict of str to Path
        ``{"plan": ..., "report": ..., "figure": ...}``.
    """
    from .plots import save_figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"plan": plan.save(out / "plan.json")}
    figure = plot_plan(plan)
    saved = save_figure(figure, out / "plan", formats=["png", "svg"])
    paths["figure"] = Path(saved[0]) if saved else out / "plan.png"
    size = plan.size_report()
    frame = plan.to_frame()
    lines = [
        f"# Size-targeted plan for {plan.source}",
        "",
        *(f"`{command}`" for _ in [0] if command),
        "",
        f"- target: {plan.target} ({bits_to_mib(plan.target_bits):.4f} MiB)",
        f"- planned size: {size.megabytes:.4f} MiB; {size.ratio_vs_source:.2f}× vs the {size.source_dtype} source "
        f"({size.source_megabytes:.3f} MiB), {size.ratio:.2f}× vs fp32 ({size.uncompressed_megabytes:.3f} MiB)",
        f"- predicted model error: {plan.predicted_error:.5f} ({_OBJECTIVE_TEXT.get(plan.objective, plan.objective)})",
        f"- specs: {plan.specs!r}",
        f"- time: analysis {plan.timings.get('analysis_s', math.nan):.1f} s, "
        f"allocation {plan.timings.get('allocation_s', math.nan):.2f} s",
        "",
        "## Uniform plans compared",
        "",
        "| plan | MiB | predicted error | within target |",
        "|---|---:|---:|---|",
    ]
    for u in plan.uniform:
        lines.append(
            f"| {u.label} | {u.megabytes:.4f} | {u.predicted_error:.5f} | "
            f"{'yes' if u.bits <= plan.target_bits else 'no'} |"
        )
    lines += ["", "## Layers", "", "| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    for row in frame.itertuples(index=False):
        cells = ["" if (isinstance(v, float) and math.isnan(v)) or v is None else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"![predicted error vs size]({paths['figure'].name})", ""]
    paths["report"] = write_atomic(out / "report.md", "\n".join(lines).encode())
    import matplotlib.pyplot as plt

    plt.close(figure)
    return paths
