"""report.json / report.npz: strict validation on load, valid JSON on write, bounded npz reads.

A report file is read by :meth:`~lr2vq_analysis.report.Report.load` and written by
:meth:`~lr2vq_analysis.report.Report.save`. Everything here refuses with
:class:`~lr2vq_analysis.exceptions.ReportFileError`, naming the field (and the layer) that is wrong
and what is allowed:

* the top level must be a JSON object with a supported ``format_version``;
* every field has its type checked (a bool is not an int, a string is not a number); curves,
  eigenvalues, probes and ρ must be finite numbers (``NaN``/``Infinity`` are refused), curves have
  exactly m entries, and the layer's numbers agree with each other (m divides the weights,
  n_subvectors = weights / m, k < n_subvectors, unique layer names);
* files larger than :data:`MAX_REPORT_BYTES` (the JSON text, after decompression for ``.npz``) are
  refused before they are read or decompressed, and nesting deeper than the JSON parser allows is
  refused instead of raising ``RecursionError``.

Missing values are written as JSON ``null``, never as the non-standard ``NaN`` token: only a fitted
parameter (``params``) or an entry of a measured curve may be missing; a missing or non-finite value
anywhere else (curves, eigenvalues, probes, ρ) is refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .exceptions import ReportFileError
from .weights import read_npz

__all__ = ["MAX_REPORT_BYTES", "check_report_data", "dumps_report", "read_report_text"]

#: Largest report text accepted, in bytes (a 200-layer LLM report is about 1 MB).
MAX_REPORT_BYTES: int = 64 * 2**20

_MAX_FRACTION = 1.0 + 1e-6  # relative errors and eigenvalues are fractions of ‖W‖² (rounding allowed)

#: The ``format_version`` values this version reads.
SUPPORTED_FORMAT_VERSIONS: tuple[int, ...] = (1,)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _missing_as_null(value: Any) -> Any:
    """Non-finite floats → None, recursively (lists and dicts)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _missing_as_null(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_missing_as_null(item) for item in value]
    return value


def dumps_report(data: Mapping[str, Any]) -> str:
    """Standard JSON text of a report dict (checked first with :func:`check_report_data`).

    Optional values that are missing (NaN in ``params`` or a measured curve) are written as ``null``;
    a non-finite value anywhere else is refused, so the text never holds ``NaN`` or ``Infinity``.

    Raises
    ------
    ReportFileError
        If the report does not pass :func:`check_report_data`.
    """
    check_report_data(data)
    layers = []
    for layer in data["layers"]:
        layer = dict(layer)
        model = dict(layer["model"])
        model["params"] = _missing_as_null(dict(model["params"]))
        layer["model"] = model
        if layer.get("measured_curve") is not None:
            layer["measured_curve"] = _missing_as_null(list(layer["measured_curve"]))
        layers.append(layer)
    return json.dumps({**data, "layers": layers}, indent=1, allow_nan=False)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _npz_report_bytes(path: Path) -> bytes:
    """The ``report_json`` array of a ``.npz`` report, read with the package's one bounded npz reader."""
    try:
        array = read_npz(path, ["report_json"], error=ReportFileError, max_bytes=MAX_REPORT_BYTES)["report_json"]
    except ReportFileError as exc:
        raise ReportFileError(
            f"report file {str(path)!r} is not a valid .npz report (see Report.save): {exc}"
        ) from None
    if array.dtype != np.dtype(np.uint8) or array.ndim != 1:
        raise ReportFileError(
            f"report file {str(path)!r}: 'report_json' is a {array.dtype} array of shape {array.shape}; "
            "expected 1-D uint8 text"
        )
    return array.tobytes()


def read_report_text(path: Path) -> str:
    """The JSON text of a ``.json`` or ``.npz`` report, refusing non-regular and oversized files."""
    if not path.exists():
        raise ReportFileError(f"report file {str(path)!r} does not exist")
    if not path.is_file():
        raise ReportFileError(f"report file {str(path)!r} is not a regular file")
    if path.suffix == ".json":
        size = path.stat().st_size
        if size > MAX_REPORT_BYTES:
            raise ReportFileError(f"report file {str(path)!r} has {size} bytes; at most {MAX_REPORT_BYTES} are allowed")
        raw = path.read_bytes()
    elif path.suffix == ".npz":
        raw = _npz_report_bytes(path)
    else:
        raise ReportFileError(f"cannot read a report from {path.name!r}; allowed suffixes: .json, .npz")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ReportFileError(f"report file {str(path)!r} is not UTF-8 text: {exc}") from None


def parse_report_json(text: str, origin: str) -> Any:
    """``json.loads`` that turns bad JSON and deep nesting into ReportFileError.

    ``NaN``/``Infinity`` tokens (written by older versions) parse as floats; :func:`check_report_data`
    then refuses them wherever a value may not be missing.
    """
    try:
        return json.loads(text)
    except RecursionError:
        raise ReportFileError(f"{origin} is nested too deeply to be a report") from None
    except ValueError as exc:
        raise ReportFileError(f"{origin} is not valid JSON: {exc}") from None


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _int(value: Any, where: str, low: int | None = None, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ReportFileError(f"{where} is {value!r} ({_type_name(value)}); expected an integer")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"in {low}..{high}" if high is not None else f">= {low}"
        raise ReportFileError(f"{where} is {value}; expected an integer {bounds}")
    return value


def _number(value: Any, where: str, *, missing_ok: bool = False) -> None:
    if missing_ok and (value is None or (isinstance(value, float) and math.isnan(value))):
        return  # a missing value: null (or NaN in files written before version 0.2)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ReportFileError(f"{where} is {_short(value)} ({_type_name(value)}); expected a finite number")
    if not math.isfinite(value):
        raise ReportFileError(f"{where} is {value}; expected a finite number (NaN and infinities are refused)")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _str(value: Any, where: str, *, null_ok: bool = False) -> None:
    if value is None and null_ok:
        return
    if not isinstance(value, str):
        raise ReportFileError(f"{where} is {_short(value)} ({_type_name(value)}); expected a string")


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ReportFileError(f"{where} is a JSON {_json_kind(value)}; expected an object")
    return value


def _json_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


def _curve(value: Any, where: str, m: int, *, missing_ok: bool = False) -> None:
    if not isinstance(value, list) or len(value) != m:
        size = f"{len(value)} entries" if isinstance(value, list) else f"a JSON {_json_kind(value)}"
        raise ReportFileError(f"{where} is {size}; expected a list of m={m} finite numbers")
    for index, item in enumerate(value):
        _number(item, f"{where}[{index}]", missing_ok=missing_ok)


def _required(data: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise ReportFileError(f"{where} lacks the field {key!r}")
    return data[key]


def _check_model(model: Mapping[str, Any], where: str, n_weights: int) -> None:
    k = _int(_required(model, "k", where), f"{where}.k", 2)
    m = _int(_required(model, "m", where), f"{where}.m", 1)
    if n_weights % m:
        raise ReportFileError(f"{where}.m is {m}; it does not divide the layer's {n_weights} weights")
    rho = _required(model, "rho", where)
    _number(rho, f"{where}.rho")
    if not 0.0 < rho <= 1.0:
        raise ReportFileError(f"{where}.rho is {rho}; expected a number in (0, 1]")
    _str(model.get("name"), f"{where}.name", null_ok=True)
    for key in ("eigenvalues", "lowrank_curve", "clustering_curve"):
        _curve(_required(model, key, where), f"{where}.{key}", m)
        outside = [value for value in model[key] if not -1e-9 <= value <= _MAX_FRACTION]
        if outside:
            raise ReportFileError(
                f"{where}.{key} holds {outside[0]!r}; errors and eigenvalues are fractions of ‖W‖², in [0, 1]"
            )
    _int(_required(model, "knee", where), f"{where}.knee", 1, m)
    probes = _object(_required(model, "probes", where), f"{where}.probes")
    for key, value in probes.items():
        if not (key.isdigit() and 1 <= int(key) <= m):
            raise ReportFileError(f"{where}.probes has the key {_short(key)}; expected a d̃ in 1..{m}")
        _number(value, f"{where}.probes[{key}]")
        if value < 0:
            raise ReportFileError(f"{where}.probes[{key}] is {value}; a measured error is >= 0")
    params = _object(_required(model, "params", where), f"{where}.params")
    for key, value in params.items():
        _number(value, f"{where}.params[{key!r}]", missing_ok=True)
    n_sub = _int(_required(model, "n_subvectors", where), f"{where}.n_subvectors", 1)
    if n_sub * m != n_weights:
        raise ReportFileError(f"{where}.n_subvectors is {n_sub}; the layer's {n_weights} weights make {n_weights // m}")
    if k >= n_sub:
        raise ReportFileError(f"{where}.k is {k}; it must be below the layer's {n_sub} subvectors")


def check_report_data(data: Any) -> None:
    """Check a report dict (``Report.to_dict()`` or parsed report.json) field by field.

    Raises
    ------
    ReportFileError
        Naming the first field that is wrong, its value and what is allowed.
    """
    data = _object(data, "the report")
    version = _required(data, "format_version", "the report")
    if not isinstance(version, int) or isinstance(version, bool) or version not in SUPPORTED_FORMAT_VERSIONS:
        raise ReportFileError(
            f"report format version {_short(version)} is not supported (expected one of {SUPPORTED_FORMAT_VERSIONS})"
        )
    _int(_required(data, "k", "the report"), "k", 2)
    _int(_required(data, "m", "the report"), "m", 1)
    _str(data.get("source", ""), "source")
    _str(data.get("package_version"), "package_version", null_ok=True)
    skipped = _object(data.get("skipped", {}), "skipped")
    for name, reason in skipped.items():
        _str(reason, f"skipped[{_short(name)}]")
    layers = _required(data, "layers", "the report")
    if not isinstance(layers, list) or not layers:
        raise ReportFileError(f"layers is a JSON {_json_kind(layers)}; expected a non-empty list of layers")
    seen: set[str] = set()
    for index, layer in enumerate(layers):
        layer = _object(layer, f"layers[{index}]")
        name = _required(layer, "name", f"layers[{index}]")
        _str(name, f"layers[{index}].name")
        if name in seen:
            raise ReportFileError(f"layer {name!r} appears twice; layer names must be unique")
        seen.add(name)
        where = f"layer {_short(name)}"
        _str(_required(layer, "kind", where), f"{where}: kind")
        shape = _required(layer, "shape", where)
        if not isinstance(shape, list) or not 2 <= len(shape) <= 4:
            raise ReportFileError(f"{where}: shape is {_short(shape)}; expected a list of 2 to 4 positive integers")
        n_weights = math.prod(_int(size, f"{where}: shape[{i}]", 1) for i, size in enumerate(shape))
        model = _object(_required(layer, "model", where), f"{where}: model")
        _check_model(model, f"{where}: model", n_weights)
        measured = layer.get("measured_curve")
        if measured is not None:
            _curve(measured, f"{where}: measured_curve", model["m"], missing_ok=True)
