"""Compression specs: k, m (and optionally d̃) chosen per layer by layer kind and by name glob.

One :class:`CompressionSpecs` object is accepted by :func:`~lr2vq_analysis.report.analyze`,
:func:`~lr2vq_analysis.report.predict_d_tilde`, :func:`~lr2vq_analysis.nn.compress`,
:func:`~lr2vq_analysis.planner.plan_for_size` and the command line (``--specs``). The style follows
coremltools' optimization configs (a global config, overridden per op type, overridden per op name)
and PQF's ``layer_specs`` (a subvector size and k per layer family):

1. the **global** ``k``, ``m``, ``d_tilde``;
2. overridden by the layer's **kind** (:data:`KINDS`): ``conv3x3``, ``conv1x1`` (pointwise),
   ``depthwise`` (depthwise and other grouped convolutions), ``conv_other`` (other kernel sizes),
   ``conv1d``, ``linear``;
3. overridden by **name globs** (``fnmatch``, matched on the weight key or the key without
   ``.weight``), the most specific last: a glob without wildcards is the most specific, otherwise the
   one with more literal characters; on a tie the one listed later wins.

Overrides merge field by field: a glob that sets only ``k`` keeps the ``m`` of the kind. A level can
also ``skip`` a layer (leave it uncompressed). The PQF cap on k for small layers
(:func:`~lr2vq_analysis.plan.effective_k`) applies per layer unless ``cap_k=False``; the resolved
setting says when k was capped.

Presets (:data:`PRESETS`): ``"pqf-small"`` and ``"pqf-large"`` are PQF's / "And the bit goes down"'s
published block sizes (3×3 → m 9 / 18, 1×1 → m 4 / 8, linear → m 4, k 256, depthwise convolutions left
uncompressed). PQF's fully connected classifier uses k = 2048 (ResNet-18) or 1024 (ResNet-50): that is a
property of one named layer of one model, not of a layer kind, so the generic presets keep k = 256 for
every linear layer and the model-specific presets ``"pqf-small-resnet18"``, ``"pqf-large-resnet18"``,
``"pqf-small-resnet50"``, ``"pqf-large-resnet50"`` add the glob ``fc`` with the published k (and the
published 1×1 m of ResNet-18 large, 4). Add such a rule to any preset with :meth:`CompressionSpecs.with_name`.
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ._io import read_json, write_json
from ._validation import _is_int, check_d_tilde, check_k, check_m
from .exceptions import InvalidParameterError
from .plan import LayerPlan, effective_k
from .subvectors import n_subvectors, row_length

__all__ = [
    "KINDS",
    "PRESETS",
    "CompressionSpecs",
    "LayerSpec",
    "ResolvedSpec",
    "as_specs",
    "layer_kind",
]

#: Layer kinds a spec can address, from the weight's shape (and ``groups`` when known).
KINDS: tuple[str, ...] = ("conv3x3", "conv1x1", "depthwise", "conv_other", "conv1d", "linear")
_KIND_TEXT = {
    "conv3x3": "3×3 convolution",
    "conv1x1": "1×1 (pointwise) convolution",
    "depthwise": "depthwise / grouped convolution",
    "conv_other": "convolution with another kernel size",
    "conv1d": "1-D convolution",
    "linear": "linear layer",
}
_FIELDS = ("k", "m", "d_tilde", "skip")
_MIN_SUBVECTORS = 8  # with PQF's cap (k <= n/4) fewer subvectors leave k < 2


def layer_kind(shape: tuple[int, ...], groups: int | None = None) -> str:
    """The kind of a Linear / Conv1d / Conv2d weight, one of :data:`KINDS`.

    Parameters
    ----------
    shape : tuple of int
        Weight shape, output channels first.
    groups : int, optional
        The convolution's ``groups``. Without it (a state_dict does not record it), a 4-D weight with
        one input channel per group and a spatial kernel larger than 1×1 counts as depthwise.

    Examples
    --------
    >>> layer_kind((64, 64, 3, 3)), layer_kind((64, 32, 1, 1)), layer_kind((32, 1, 3, 3))
    ('conv3x3', 'conv1x1', 'depthwise')
    >>> layer_kind((64, 64, 5, 5)), layer_kind((8, 4, 3)), layer_kind((10, 512))
    ('conv_other', 'conv1d', 'linear')
    """
    rank = len(shape)
    if rank == 2:
        return "linear"
    if rank == 3:
        return "conv1d"
    if rank != 4:
        raise InvalidParameterError(f"a weight of shape {tuple(shape)} has no layer kind; expected rank 2, 3 or 4")
    kh, kw = int(shape[2]), int(shape[3])
    if (groups is not None and groups > 1) or (groups is None and int(shape[1]) == 1 and kh * kw > 1):
        return "depthwise"
    if kh == kw == 1:
        return "conv1x1"
    if kh == kw == 3:
        return "conv3x3"
    return "conv_other"


@dataclass(frozen=True)
class LayerSpec:
    """The settings one level (global, kind, name glob) gives; ``None`` means "not set here".

    Parameters
    ----------
    k : int, optional
        Number of centroids, >= 2.
    m : int, optional
        Subvector size, >= 1.
    d_tilde : int, optional
        A fixed clustering dimensionality (otherwise it is predicted); at most m when both are set.
    skip : bool, optional
        True leaves the layer uncompressed.

    Examples
    --------
    >>> LayerSpec(m=4)
    LayerSpec(m=4)
    >>> LayerSpec(k=1)
    Traceback (most recent call last):
    ...
    lr2vq_analysis.exceptions.InvalidParameterError: k=1 is invalid; k must be an integer >= 2
    """

    k: int | None = None
    m: int | None = None
    d_tilde: int | None = None
    skip: bool | None = None

    def __post_init__(self) -> None:
        if self.k is not None:
            object.__setattr__(self, "k", check_k(self.k))
        if self.m is not None:
            object.__setattr__(self, "m", check_m(self.m))
        if self.d_tilde is not None:
            if not _is_int(self.d_tilde) or self.d_tilde < 1:
                raise InvalidParameterError(f"d_tilde={self.d_tilde!r} is invalid; d_tilde must be an integer >= 1")
            if self.m is not None:
                check_d_tilde(self.d_tilde, self.m)
            object.__setattr__(self, "d_tilde", int(self.d_tilde))
        if self.skip is not None and not isinstance(self.skip, bool):
            raise InvalidParameterError(f"skip={self.skip!r} is invalid; skip must be true or false")

    def __repr__(self) -> str:
        set_fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in _FIELDS if getattr(self, name) is not None)
        return f"LayerSpec({set_fields})"

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set, for JSON."""
        return {name: getattr(self, name) for name in _FIELDS if getattr(self, name) is not None}

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "spec") -> LayerSpec:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        if isinstance(data, LayerSpec):
            return data
        if not isinstance(data, Mapping):
            raise InvalidParameterError(
                f"{where}: {data!r} is invalid; expected a mapping with keys among {list(_FIELDS)}"
            )
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise InvalidParameterError(f"{where}: unknown key(s) {unknown}; allowed keys are {list(_FIELDS)}")
        try:
            return cls(**dict(data))
        except InvalidParameterError as exc:
            raise InvalidParameterError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class ResolvedSpec:
    """The settings of one layer after global → kind → name resolution.

    Attributes
    ----------
    name, kind : str
        The weight key and its kind (:data:`KINDS`).
    k, m : int or None
        Centroids (after the PQF cap) and subvector size; None when the layer is skipped.
    d_tilde : int or None
        A fixed d̃ from the specs, or None (predict it).
    requested_k : int or None
        k before the cap.
    skip_reason : str or None
        Why the layer stays uncompressed, or None.
    rules : tuple of str
        The levels that set something for this layer, e.g. ``("global", "kind conv3x3", "name 'fc'")``.
    """

    name: str
    kind: str
    k: int | None
    m: int | None
    d_tilde: int | None
    requested_k: int | None
    skip_reason: str | None = None
    rules: tuple[str, ...] = ()

    @property
    def capped(self) -> bool:
        """True when PQF's cap lowered k for this small layer."""
        return self.k is not None and self.requested_k is not None and self.k < self.requested_k

    @property
    def note(self) -> str:
        """One line for reports: the cap, or the reason for skipping, or ``""``."""
        if self.skip_reason:
            return self.skip_reason
        if self.capped:
            return f"k capped from {self.requested_k} to {self.k} (PQF: k <= n_subvectors/4)"
        return ""

    def plan(self, d_tilde: int | None = None) -> LayerPlan:
        """The LayerPlan at ``d_tilde`` (default: the fixed d̃ of the specs, else m)."""
        if self.k is None or self.m is None:
            raise InvalidParameterError(f"layer {self.name!r} is not compressed: {self.skip_reason}")
        return LayerPlan(k=self.k, m=self.m, d_tilde=d_tilde if d_tilde is not None else self.d_tilde)


def _specificity(pattern: str) -> float:
    if not any(char in pattern for char in "*?["):
        return math.inf
    return float(sum(char not in "*?[]" for char in pattern))


def _matches(key: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(key, pattern) or fnmatch.fnmatchcase(key.removesuffix(".weight"), pattern)


def _freeze_kinds(kinds: Any) -> tuple[tuple[str, LayerSpec], ...]:
    if kinds is None:
        return ()
    items = kinds.items() if isinstance(kinds, Mapping) else kinds
    out = []
    for kind, spec in items:
        if kind not in KINDS:
            raise InvalidParameterError(f"kinds key {kind!r} is not a layer kind; allowed kinds are {list(KINDS)}")
        out.append((str(kind), LayerSpec.from_dict(spec, where=f"kinds[{kind!r}]")))
    return tuple(out)


def _freeze_names(names: Any) -> tuple[tuple[str, LayerSpec], ...]:
    if names is None:
        return ()
    items = names.items() if isinstance(names, Mapping) else names
    out = []
    for pattern, spec in items:
        if not isinstance(pattern, str) or not pattern:
            raise InvalidParameterError(f"names key {pattern!r} is invalid; it must be a non-empty glob string")
        out.append((pattern, LayerSpec.from_dict(spec, where=f"names[{pattern!r}]")))
    return tuple(out)


@dataclass(frozen=True)
class CompressionSpecs:
    """k, m and d̃ per layer: global values, overridden by layer kind, overridden by name glob.

    Parameters
    ----------
    k : int, default 256
        Global number of centroids.
    m : int, optional
        Global subvector size; layers whose kind and name set none are skipped when it is None.
    d_tilde : int, optional
        Global fixed d̃ (default: predicted per layer).
    kinds : mapping of kind to LayerSpec or dict, optional
        Per-kind overrides; keys from :data:`KINDS`.
    names : mapping of glob to LayerSpec or dict, optional
        Per-name overrides (the most specific matching glob wins, field by field).
    cap_k : bool, default True
        Apply PQF's cap k_eff = min(k, largest power of two <= n_subvectors / 4).
    preset : str, default ""
        Name of the preset this came from (informational).

    Examples
    --------
    >>> specs = CompressionSpecs(k=256, kinds={"conv3x3": {"m": 9}, "conv1x1": {"m": 4}}, names={"fc": {"k": 2048}})
    >>> specs.resolve("layer1.0.conv1.weight", (64, 64, 3, 3)).plan(4)
    LayerPlan(k=256, m=9, d_tilde=4)
    >>> specs.resolve("layer1.0.downsample.0.weight", (128, 64, 1, 1)).m
    4
    >>> specs.resolve("fc.weight", (1000, 512)).skip_reason
    "no m is set for linear layer 'fc.weight' (kind 'linear'): give a global m, kinds['linear'] or a name rule"
    >>> CompressionSpecs.from_preset("pqf-small").resolve("fc.weight", (1000, 512)).plan()
    LayerPlan(k=256, m=4, d_tilde=4)
    """

    k: int = 256
    m: int | None = None
    d_tilde: int | None = None
    kinds: Any = field(default=())
    names: Any = field(default=())
    cap_k: bool = True
    preset: str = ""

    def __post_init__(self) -> None:
        base = LayerSpec(k=self.k, m=self.m, d_tilde=self.d_tilde)
        object.__setattr__(self, "k", base.k)
        object.__setattr__(self, "m", base.m)
        object.__setattr__(self, "d_tilde", base.d_tilde)
        object.__setattr__(self, "kinds", _freeze_kinds(self.kinds))
        object.__setattr__(self, "names", _freeze_names(self.names))
        if not isinstance(self.cap_k, bool):
            raise InvalidParameterError(f"cap_k={self.cap_k!r} is invalid; cap_k must be true or false")

    # -- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str) -> CompressionSpecs:
        """One of :data:`PRESETS` by name.

        Raises
        ------
        InvalidParameterError
            If ``name`` is not a preset (the message lists them).
        """
        if name not in PRESETS:
            raise InvalidParameterError(f"specs preset {name!r} is unknown; presets are {list(PRESETS)}")
        return PRESETS[name]

    def with_kind(self, kind: str, **settings: Any) -> CompressionSpecs:
        """A copy with ``settings`` (k, m, d_tilde, skip) merged into the rule of ``kind``."""
        kinds = dict(self.kinds)
        merged = {**(kinds[kind].to_dict() if kind in kinds else {}), **settings}
        kinds[kind] = LayerSpec.from_dict(merged, where=f"kinds[{kind!r}]")
        return replace(self, kinds=kinds)

    def with_name(self, pattern: str, **settings: Any) -> CompressionSpecs:
        """A copy with ``settings`` merged into the rule of the name glob ``pattern`` (added last)."""
        names = dict(self.names)
        merged = {**(names.pop(pattern).to_dict() if pattern in names else {}), **settings}
        names[pattern] = LayerSpec.from_dict(merged, where=f"names[{pattern!r}]")
        return replace(self, names=names)

    # -- resolution -----------------------------------------------------------------------------------

    def resolve(
        self, name: str, shape: tuple[int, ...], *, kind: str | None = None, groups: int | None = None
    ) -> ResolvedSpec:
        """The settings of one layer (see the module docstring for the precedence).

        Parameters
        ----------
        name : str
            Weight key, e.g. ``"layer1.0.conv1.weight"``.
        shape : tuple of int
            Weight shape, output channels first.
        kind : str, optional
            Kind from :data:`KINDS`; default :func:`layer_kind` of the shape (and ``groups``).
        groups : int, optional
            The convolution's ``groups`` when known.

        Returns
        -------
        ResolvedSpec
            With ``skip_reason`` set (and k, m None) when the layer stays uncompressed: a skip rule, no
            m, m not dividing the row length, or fewer than 8 subvectors.

        Raises
        ------
        InvalidParameterError
            If a fixed d̃ exceeds the layer's m.
        """
        shape = tuple(int(s) for s in shape)
        kind = layer_kind(shape, groups) if kind is None or kind not in KINDS else kind
        settings: dict[str, Any] = {"k": self.k, "m": self.m, "d_tilde": self.d_tilde, "skip": None}
        rules = ["global"]
        levels = [(f"kind {kind}", spec) for key, spec in self.kinds if key == kind]
        matching = [(i, pattern, spec) for i, (pattern, spec) in enumerate(self.names) if _matches(name, pattern)]
        matching.sort(key=lambda item: (_specificity(item[1]), item[0]))  # least specific first
        levels += [(f"name {pattern!r}", spec) for _, pattern, spec in matching]
        for label, spec in levels:
            values = spec.to_dict()
            if values:
                settings.update(values)
                rules.append(label)

        def skipped(reason: str) -> ResolvedSpec:
            return ResolvedSpec(name, kind, None, None, None, None, skip_reason=reason, rules=tuple(rules))

        if settings["skip"]:
            return skipped(f"skipped by the specs ({rules[-1]})")
        m = settings["m"]
        if m is None:
            return skipped(
                f"no m is set for {_KIND_TEXT[kind]} {name!r} (kind {kind!r}): give a global m, "
                f"kinds[{kind!r}] or a name rule"
            )
        length = row_length(shape)
        if length % m:
            return skipped(f"row length {length} is not divisible by m={m} ({rules[-1]} sets m)")
        n = n_subvectors(shape, m)
        if self.cap_k and n < _MIN_SUBVECTORS:
            return skipped(f"only {n} subvectors of size m={m}; too few to cluster")
        requested = int(settings["k"])
        k = effective_k(requested, shape, m) if self.cap_k else check_k(requested, n, name=name)
        d_tilde = settings["d_tilde"]
        if d_tilde is not None:
            d_tilde = check_d_tilde(d_tilde, m, name=name)
        return ResolvedSpec(name, kind, k, m, d_tilde, requested, rules=tuple(rules))

    def resolve_all(self, source: Any, *, keep_first_conv: bool = False) -> dict[str, ResolvedSpec]:
        """Resolve every layer that :func:`~lr2vq_analysis.weights.load_weights` selects from ``source``.

        Layers the loader skips (the input convolution, embeddings, ...) are not included.
        """
        from .weights import load_weights

        weights = load_weights(source, keep_first_conv=keep_first_conv)
        return {
            name: self.resolve(name, info.shape, groups=getattr(info, "groups", None))
            for name, info in weights.info.items()
        }

    def plan(self, source: Any, *, keep_first_conv: bool = False) -> dict[str, LayerPlan]:
        """``{weight key: LayerPlan}`` for a model without analysis: d̃ from the specs, else m (plain PQ).

        Examples
        --------
        >>> from lr2vq_analysis.models.resnet import resnet18
        >>> from lr2vq_analysis.size import size_report
        >>> model = resnet18()
        >>> report = size_report(model, CompressionSpecs.from_preset("pqf-small-resnet18").plan(model))
        >>> round(report.megabytes, 2), round(report.ratio)  # PQF's published ResNet-18 "small blocks"
        (1.54, 29)
        """
        resolved = self.resolve_all(source, keep_first_conv=keep_first_conv)
        return {name: spec.plan() for name, spec in resolved.items() if spec.skip_reason is None}

    @property
    def is_uniform(self) -> bool:
        """True when only the global k and m are set (the old ``k, m`` arguments)."""
        return not self.kinds and not self.names and self.m is not None

    # -- serialisation --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; :meth:`from_dict` restores an equal object."""
        return {
            "k": self.k,
            "m": self.m,
            "d_tilde": self.d_tilde,
            "kinds": {kind: spec.to_dict() for kind, spec in self.kinds},
            "names": {pattern: spec.to_dict() for pattern, spec in self.names},
            "cap_k": self.cap_k,
            "preset": self.preset,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressionSpecs:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        if not isinstance(data, Mapping):
            raise InvalidParameterError(f"specs must be a JSON object, got {type(data).__name__}")
        allowed = ("k", "m", "d_tilde", "kinds", "names", "cap_k", "preset")
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise InvalidParameterError(f"specs: unknown key(s) {unknown}; allowed keys are {list(allowed)}")
        return cls(**dict(data))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the specs as JSON, atomically."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CompressionSpecs:
        """Read specs written by :meth:`save` (or by hand)."""
        return cls.from_dict(read_json(path, "specs from"))

    def __repr__(self) -> str:
        if self.preset:
            rules = f"kinds={len(self.kinds)}, names={len(self.names)}"
            return f"CompressionSpecs(preset={self.preset!r}, k={self.k}, {rules})"
        parts = [f"k={self.k}", f"m={self.m}"]
        if self.d_tilde is not None:
            parts.append(f"d_tilde={self.d_tilde}")
        if self.kinds:
            parts.append("kinds={" + ", ".join(f"{kind!r}: {spec!r}" for kind, spec in self.kinds) + "}")
        if self.names:
            parts.append("names={" + ", ".join(f"{pattern!r}: {spec!r}" for pattern, spec in self.names) + "}")
        return "CompressionSpecs(" + ", ".join(parts) + ")"


def _pqf(name: str, m3: int, m1: int, fc_k: int | None = None) -> CompressionSpecs:
    kinds = {"conv3x3": {"m": m3}, "conv1x1": {"m": m1}, "linear": {"m": 4}, "depthwise": {"skip": True}}
    names = {"fc": {"k": fc_k}} if fc_k else {}
    return CompressionSpecs(k=256, kinds=kinds, names=names, preset=name)


#: Named presets: PQF's published block sizes (design notes, "Conventions the field publishes with").
PRESETS: dict[str, CompressionSpecs] = {
    "pqf-small": _pqf("pqf-small", 9, 4),
    "pqf-large": _pqf("pqf-large", 18, 8),
    "pqf-small-resnet18": _pqf("pqf-small-resnet18", 9, 4, 2048),
    "pqf-large-resnet18": _pqf("pqf-large-resnet18", 18, 4, 2048),
    "pqf-small-resnet50": _pqf("pqf-small-resnet50", 9, 4, 1024),
    "pqf-large-resnet50": _pqf("pqf-large-resnet50", 18, 8, 1024),
}


def as_specs(specs: Any = None, k: int | None = None, m: int | None = None) -> CompressionSpecs:
    """Normalise what callers pass: a CompressionSpecs, a preset name, a JSON path, a dict, or None.

    Parameters
    ----------
    specs : CompressionSpecs, str, path, dict or None
        None gives the global ``k`` and ``m`` (the old arguments) as specs.
    k, m : int, optional
        The old global arguments, used when ``specs`` is None.

    Examples
    --------
    >>> as_specs(None, 256, 9)
    CompressionSpecs(k=256, m=9)
    >>> as_specs("pqf-large").resolve("c.weight", (64, 64, 3, 3)).m
    18
    """
    if specs is None:
        return CompressionSpecs(k=256 if k is None else k, m=m)
    if isinstance(specs, CompressionSpecs):
        return specs
    if isinstance(specs, Mapping):
        return CompressionSpecs.from_dict(specs)
    if isinstance(specs, (str, os.PathLike)):
        if isinstance(specs, str) and specs in PRESETS:
            return PRESETS[specs]
        if Path(specs).suffix == ".json" or Path(specs).is_file():
            return CompressionSpecs.load(specs)
        raise InvalidParameterError(f"specs {str(specs)!r} is neither a preset {list(PRESETS)} nor a JSON file")
    raise InvalidParameterError(
        f"specs of type {type(specs).__name__} is invalid; pass a CompressionSpecs, a preset name "
        f"{list(PRESETS)}, a JSON file or a dict"
    )
