"""Regenerate docs/api.md from the package's ``__all__`` lists and numpy docstrings.

Usage: ``python docs/generate_api.py > docs/api.md``. tests/test_docs.py checks that api.md has a
section for every public name and describes every parameter; rerun this after changing an API.
"""

from __future__ import annotations

import importlib
import inspect
import re

MODULES = [
    ("lr2vq_analysis.weights", "Loading weights"),
    ("lr2vq_analysis.subvectors", "Subvectors"),
    ("lr2vq_analysis.spectrum", "Spectrum and low-rank error"),
    ("lr2vq_analysis.calibration", "Output-space errors (calibration data)"),
    ("lr2vq_analysis.kmeans", "k-means"),
    ("lr2vq_analysis.probes", "Clustering error probes"),
    ("lr2vq_analysis.tradeoff", "Trade-off model"),
    ("lr2vq_analysis.plan", "Plans"),
    ("lr2vq_analysis.specs", "Compression specs"),
    ("lr2vq_analysis.report", "Whole-model analysis"),
    ("lr2vq_analysis.planner", "Planning for a size target"),
    ("lr2vq_analysis.report_folder", "Report folders and plan files"),
    ("lr2vq_analysis.nn", "Compressed layers"),
    ("lr2vq_analysis.finetune", "Fine-tuning"),
    ("lr2vq_analysis.recipe", "The training recipe"),
    ("lr2vq_analysis.size", "Size accounting"),
    ("lr2vq_analysis.export", "Compressed files"),
    ("lr2vq_analysis.skeleton", "Weight files without model code"),
    ("lr2vq_analysis.io", "Atomic file writing"),
    ("lr2vq_analysis.datasets", "Data sets"),
    ("lr2vq_analysis.models", "Models"),
    ("lr2vq_analysis.registry", "Named models"),
    ("lr2vq_analysis.pipeline", "The whole pipeline"),
    ("lr2vq_analysis.plots", "Figures"),
    ("lr2vq_analysis.cli", "Command line"),
    ("lr2vq_analysis.experimental.sweeps", "Experimental: sweeps (no stability promise)"),
    ("lr2vq_analysis.experimental.datasets", "Experimental: sweep data sets"),
    ("lr2vq_analysis.experimental.models", "Experimental: sweep models"),
    ("lr2vq_analysis.experimental.plots", "Experimental: sweep figures"),
]

INTRO = """\
# API reference

Every public name of `lr2vq_analysis`, module by module, in pipeline order, with its parameters.
The docstrings (numpy style, with runnable examples) are the full reference: `help(name)` in
Python. Import from the stage's module, e.g. `from lr2vq_analysis.report import analyze`; the most
used names are also re-exported by the package itself.

Conventions shared by every function (see [architecture.md](architecture.md)): errors are
fractions of a layer's ‖W‖²; every random choice takes `seed`; bad input raises one of the
exceptions below, with a message naming the layer, the value and what is allowed; every file is
written atomically.

## Errors — `lr2vq_analysis._validation`

### `LR2VQError`

Base class of every error the package raises on purpose; catch it to handle them all.

### `InvalidParameterError`

A parameter (k, m, d̃, ρ, a plan entry, a seed, ...) is outside its allowed range. Also a `ValueError`.

### `InvalidWeightsError`

A weight cannot be analysed: wrong rank, NaN/Inf values, all zeros, or a model with no
compressible layer. Also a `ValueError`.

### `WeightFileError`

A weight, report or compressed file is missing, of an unsupported format, or corrupt. Also an `OSError`.
"""

OUTRO = """\
## Sweep results

`plot_accuracy_vs_d_tilde`, `plot_size_frontier` and `load_sweep_results` read a table (a pandas
DataFrame or a CSV file) with one row per (method, configuration, seed):

| column | type | meaning |
|---|---|---|
| `method` | str | `"lr2vq"`, `"pq"`, `"scalar"`, `"dkm"`, `"lr2vq-dkm"`, `"uncompressed"`, ... |
| `k` | int | number of centroids (empty for `"uncompressed"`) |
| `m` | int | subvector size (1 for scalar k-means) |
| `d_tilde` | int | clustering dimensionality (m for PQ; empty where it has no meaning) |
| `seed` | int | seed of the run; the plots show mean ± sd over seeds |
| `megabytes` | float | size of the compressed model in MiB (`size_report(...).megabytes`) |
| *metric* | float | the quality on held-out data, named by the `metric` argument: `accuracy` (default), `cosine`, ... |
| `predicted_d_tilde` | int, optional | the analysis's d̃ for that (k, m), marked with a star |

```python
import pandas as pd
from lr2vq_analysis.experimental.plots import SWEEP_COLUMNS, plot_accuracy_vs_d_tilde, plot_size_frontier

rows = [("lr2vq", 16, 9, d, seed, 0.008 + 0.0002 * d, 0.95 + 0.005 * min(d, 4) + 0.002 * seed)
        for d in range(1, 10) for seed in range(3)]
rows += [("pq", 16, 9, 9, seed, 0.0084, 0.965 + 0.002 * seed) for seed in range(3)]
results = pd.DataFrame(rows, columns=[*SWEEP_COLUMNS, "accuracy"])
fig = plot_accuracy_vs_d_tilde(results, predicted_d_tilde=4)
fig = plot_size_frontier(results, predicted_d_tilde=4)
```
"""

#: Descriptions of parameters whose docstrings do not list them (shared conventions).
EXTRA = {
    "row_length": "- `shape` : tuple of int — shape of a Linear (2-D), Conv1d (3-D) or Conv2d (4-D) weight.",
    "from_subvectors": "- `subvectors` : array of shape (n, m) — as returned by `to_subvectors`.\n"
    "- `shape` : tuple of int — the weight's shape.",
    "single_threaded": "- `device` : torch.device or str, optional — the device the probes run on; "
    "torch's CPU threads are limited to one only on the CPU.",
    "in_sample_factor": "- `points_per_centroid` : float or array — n / k, the training points per centroid.\n"
    "- `beta` : float or array — the fitted constant of the in-sample bias.",
    "effective_k": "- `k` : int — requested number of centroids.\n"
    "- `shape` : tuple of int — the weight's shape.\n- `m` : int — subvector size.",
    "ModelPrediction": "- `per_layer` : mapping of str to int — d̃ of each layer.\n"
    "- `global_d_tilde` : int — the one d̃ for the whole model.",
    "LR2VQConv1d": "- `in_channels`, `out_channels`, `kernel_size`, `stride`, `padding`, `dilation`, `bias`, "
    "`padding_mode`, `device`, `dtype` — as for `torch.nn.Conv1d` (groups = 1).\n"
    "- `plan` : LayerPlan — k, m and d̃ of the layer.\n- `name` : str, optional — layer name for messages.\n"
    "Usually built by `compress` or `LR2VQConv1d.from_dense(layer, plan)`.",
    "LR2VQConv2d": "- `in_channels`, `out_channels`, `kernel_size`, `stride`, `padding`, `dilation`, `bias`, "
    "`padding_mode`, `device`, `dtype` — as for `torch.nn.Conv2d` (groups = 1).\n"
    "- `plan` : LayerPlan — k, m and d̃ of the layer.\n- `name` : str, optional — layer name for messages.\n"
    "Usually built by `compress` or `LR2VQConv2d.from_dense(layer, plan)`.",
    "CompressedModel": "- `plan` : mapping of str to LayerPlan — the plan the layers were compressed with.",
    "compressible_layers": "- `model` : torch.nn.Module — any model.",
    "unpack_codes": "- `bits` : int — bits per code, `code_bits(k)`.",
    "resnet18": "- `num_classes` : int, default 1000 — outputs of the final Linear layer.",
    "resnet50": "- `num_classes` : int, default 1000 — outputs of the final Linear layer.",
}


def clean(text: str) -> str:
    """reST roles and double backticks to Markdown."""

    def role(match: re.Match[str]) -> str:
        target = match.group(2)
        return f"`{target.rpartition('.')[2] if match.group(1) else target}`"

    text = re.sub(r":(?:func|class|meth|data|mod|attr):`(~?)([\w.]+)`", role, text)
    return text.replace("``", "`")


def summary(doc: str | None) -> str:
    """First paragraph of a docstring, on one line."""
    if not doc:
        return ""
    return clean(inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " "))


def documented_parameters(doc: str | None) -> list[tuple[str, str]]:
    """(head, description) of every entry of the Parameters and Attributes sections."""
    if not doc:
        return []
    doc = inspect.cleandoc(doc)
    entries = []
    for section in re.finditer(r"^(?:Parameters|Attributes)\n-+\n(.*?)(?=^\w[\w ]*\n-+\n|\Z)", doc, re.M | re.S):
        for block in re.split(r"\n(?=\S)", section.group(1).strip()):
            first, *rest = block.split("\n")
            entries.append((clean(first), clean(" ".join(line.strip() for line in rest))))
    return entries


def stable(text: str) -> str:
    """``text`` without memory addresses (``<function f at 0x7f...>``), so api.md is the same on every run."""
    return re.sub(r" at 0x[0-9a-f]+>", ">", text)


def constant_repr(obj: object) -> str:
    """repr of a constant; sets sorted (their order changes with string hashing from run to run)."""
    if isinstance(obj, (set, frozenset)):
        return f"{type(obj).__name__}({{{', '.join(sorted(map(repr, obj)))}}})"
    return stable(repr(obj))


def signature(obj: object, name: str) -> str:
    """``name(a, b=1, *, c=None)``: parameters and defaults, without annotations."""
    try:
        sig = inspect.signature(obj)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return name
    empty = inspect.Parameter.empty
    parameters = [p.replace(annotation=empty) for p in sig.parameters.values()]
    return stable(f"{name}{sig.replace(parameters=parameters, return_annotation=empty)}")


def render() -> str:
    """The whole of api.md."""
    out = [INTRO]
    for module_name, title in MODULES:
        module = importlib.import_module(module_name)
        out += [f"## {title} — `{module_name}`", "", summary(module.__doc__), ""]
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if not callable(obj):
                out += [f"### `{name}`", "", f"Constant: `{constant_repr(obj)}`"[:300], ""]
                continue
            out += [f"### `{signature(obj, name)}`", "", summary(obj.__doc__), ""]
            for first, text in documented_parameters(obj.__doc__):
                name_part, _, type_part = first.partition(" :")
                out.append(f"- `{name_part}`{' :' + type_part if type_part else ''} — {text}")
            if name in EXTRA:
                out.append(EXTRA[name])
            out.append("")
    out.append(OUTRO)
    return "\n".join(out)


if __name__ == "__main__":
    print(render())
