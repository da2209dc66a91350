"""The ``lr2vq`` command line: analyse a model, redraw figures, compress a model, run the demo.

Subcommands (``lr2vq SUBCOMMAND --help`` describes each):

``analyze [SOURCE]``
    Predict d̃ for every layer of a weight file or bundled model; write ``report.json``,
    ``report.csv``, ``curves.csv``, the figures and ``report.md`` into a folder.
``plot REPORT.json``
    Redraw the figures of a saved report (optionally with another ρ).
``compress SOURCE --plan REPORT.json``
    Compress a model with a saved plan and write the bit-packed file.
``demo``
    The whole pipeline on the bundled digits CNN: analyse, compress, fine-tune, save, reload, evaluate.

Exit status: 0 on success, 2 for a usage error (unknown option, a parameter out of range), 1 when the
work fails (missing or corrupt file, weights that cannot be analysed). Errors are one line on stderr,
without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ._io import write_atomic
from ._validation import InvalidParameterError, LR2VQError, check_k

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from .plan import LayerPlan
    from .report import Report
    from .size import SizeReport

__all__ = ["main", "build_parser", "read_plan", "skeleton_from_state_dict", "write_markdown_report"]

PROG = "lr2vq"
DEFAULT_MODEL = "digits-cnn"
DEFAULT_REPORT_DIR = "lr2vq-report"
FIGURE_DIR = "figures"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class _UsageError(Exception):
    """A command-line argument is wrong in a way argparse cannot see (exit status 2)."""


# --------------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def _jobs(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value == 0 or value < -1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; use a positive integer or -1 (all cores)")
    return value


def _rho(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is outside (0, 1]")
    return value


def _formats(text: str) -> list[str]:
    from .plots import _SAVE_FORMATS

    formats = [part.strip().lower() for part in text.split(",") if part.strip()]
    bad = [fmt for fmt in formats if fmt not in _SAVE_FORMATS]
    if not formats or bad:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; use a comma-separated list of {list(_SAVE_FORMATS)}")
    return formats


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (the full usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lr2vq`` (exposed for documentation and tests).

    Returns
    -------
    argparse.ArgumentParser
        Usage errors exit with status 2 and a one-line message.
    """
    from . import __version__

    common = _Parser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors; no progress bars")

    parser = _Parser(
        prog=PROG,
        description="LR²VQ model compression: predict the clustering dimensionality d̃ of a model's layers, "
        "compress the model, and report sizes and errors.",
        epilog="Run 'lr2vq SUBCOMMAND --help' for the options of each subcommand.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    commands.required = True

    analyze = commands.add_parser(
        "analyze",
        parents=[common],
        help="predict d̃ per layer and write a report folder",
        description="Fit the error trade-off of every compressible layer (Conv2d, Conv1d, Linear), predict d̃ "
        "per layer and one global d̃, and write report.json, report.csv, curves.csv, the figures and report.md.",
    )
    analyze.add_argument(
        "source",
        nargs="?",
        default=DEFAULT_MODEL,
        metavar="SOURCE",
        help=f"weight file (.pt, .pth, .bin, .safetensors, .npz) or bundled model name (default: {DEFAULT_MODEL})",
    )
    _add_analysis_options(analyze)
    analyze.add_argument(
        "--out", default=DEFAULT_REPORT_DIR, metavar="DIR", help=f"output folder (default: {DEFAULT_REPORT_DIR})"
    )
    analyze.add_argument(
        "--jobs", type=_jobs, default=1, metavar="N", help="layers analysed in parallel (-1: all cores)"
    )
    analyze.add_argument(
        "--measure",
        action="store_true",
        help="also run k-means at every d̃ on every layer to check the model (slow: minutes on large models)",
    )
    analyze.add_argument(
        "--formats",
        type=_formats,
        default=["png", "svg"],
        metavar="LIST",
        help="figure formats, comma-separated from png, svg, pdf (default: png,svg)",
    )
    analyze.add_argument("--no-layer-figures", action="store_true", help="skip the one-figure-per-layer plots")
    analyze.set_defaults(handler=_cmd_analyze)

    plot = commands.add_parser(
        "plot",
        parents=[common],
        help="redraw the figures of a saved report",
        description="Redraw the figures of a report written by 'lr2vq analyze' (report.json or .npz), "
        "optionally with another ρ.",
    )
    plot.add_argument("report", metavar="REPORT", help="report.json or report.npz written by 'lr2vq analyze'")
    plot.add_argument(
        "--out", metavar="DIR", help=f"output folder (default: the '{FIGURE_DIR}' folder beside the report)"
    )
    plot.add_argument("--rho", type=_rho, metavar="R", help="redraw with this ρ (d̃ moves; no refit)")
    plot.add_argument(
        "--formats", type=_formats, default=["png", "svg"], metavar="LIST", help="figure formats (default: png,svg)"
    )
    plot.add_argument("--no-layer-figures", action="store_true", help="skip the one-figure-per-layer plots")
    plot.set_defaults(handler=_cmd_plot)

    compress = commands.add_parser(
        "compress",
        parents=[common],
        help="compress a model with a saved plan and write the compressed file",
        description="Compress the planned layers (low-rank Z·P at the planned d̃, then k-means on Z), write "
        "the bit-packed file and check that it reloads. A plain weight file comes without training data, so "
        "its layers are compressed straight from the pretrained weights, with no fine-tuning: to recover "
        "accuracy, fine-tune in Python (lr2vq_analysis.finetune). The bundled digits model is fine-tuned "
        "on its data set (--steps).",
    )
    compress.add_argument("source", metavar="SOURCE", help="weight file or bundled model name (e.g. digits-cnn)")
    compress.add_argument(
        "--plan",
        required=True,
        metavar="REPORT",
        help="report.json from 'lr2vq analyze', or a JSON file {layer: {k, m, d_tilde}}",
    )
    compress.add_argument(
        "--which",
        choices=("layer", "global"),
        default="layer",
        help="use each layer's predicted d̃, or the global d̃ for all layers (default: layer)",
    )
    compress.add_argument("--out", metavar="FILE", help="compressed file (default: SOURCE's stem + .lr2vq)")
    compress.add_argument(
        "--steps",
        type=_non_negative_int,
        metavar="N",
        help="fine-tuning steps per stage, bundled model only (default: the demo's setting; 0: none)",
    )
    compress.add_argument("--seed", type=_non_negative_int, default=0, metavar="S", help="seed (default: 0)")
    compress.set_defaults(handler=_cmd_compress)

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="the whole pipeline on the bundled digits CNN",
        description="Analyse the bundled digits CNN, compress it at the predicted d̃, fine-tune (low-rank "
        "stage, quantize, re-estimate batch norm, codebook stage), save, reload and evaluate; print the "
        "accuracy before and after, the size report and where the files went. About a minute on 2 cores.",
    )
    demo.add_argument("--k", type=_positive_int, default=16, help="number of centroids (default: 16)")
    demo.add_argument("--m", type=_positive_int, default=9, help="subvector size (default: 9; 18 works too)")
    demo.add_argument(
        "--d-tilde", type=_positive_int, metavar="D", help="one d̃ for every layer (default: the predicted d̃ per layer)"
    )
    demo.add_argument(
        "--steps",
        type=_non_negative_int,
        metavar="N",
        help="fine-tuning steps per stage (default: the demo's setting, fewer with --quick)",
    )
    demo.add_argument("--quick", action="store_true", help="few fine-tuning steps: a smoke test in seconds")
    demo.add_argument("--seed", type=_non_negative_int, default=0, metavar="S", help="seed (default: 0)")
    demo.add_argument("--out", default="lr2vq-demo", metavar="DIR", help="output folder (default: lr2vq-demo)")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def _add_analysis_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--k", type=_positive_int, default=256, help="number of centroids (default: 256)")
    parser.add_argument("--m", type=_positive_int, default=9, help="subvector size (default: 9)")
    parser.add_argument(
        "--rho",
        type=_rho,
        metavar="R",
        help="share of the low-rank error that fine-tuning does not recover, in (0, 1] "
        "(default: lr2vq_analysis.tradeoff.DEFAULT_RHO)",
    )
    parser.add_argument(
        "--include", action="append", metavar="GLOB", help="analyse only layers matching GLOB (repeatable)"
    )
    parser.add_argument("--exclude", action="append", metavar="GLOB", help="skip layers matching GLOB (repeatable)")
    parser.add_argument(
        "--min-size", type=_non_negative_int, default=0, metavar="N", help="skip layers with < N weights"
    )
    parser.add_argument("--keep-first-conv", action="store_true", help="analyse the first conv too")
    parser.add_argument("--seed", type=_non_negative_int, default=0, metavar="S", help="seed of the k-means probes")


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------


def _say(args: argparse.Namespace, text: str = "") -> None:
    if not args.quiet:
        print(text, flush=True)


def _use_headless_backend() -> None:
    """Draw with Agg unless pyplot is already in use (e.g. main() called from a notebook)."""
    if "matplotlib.pyplot" not in sys.modules:
        import matplotlib

        matplotlib.use("Agg")


def _describe_size(report: SizeReport) -> str:
    return (
        f"{report.megabytes:.4g} MiB (ratio {report.ratio:.1f}×; uncompressed {report.uncompressed_megabytes:.4g} MiB)"
    )


def _markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame as a GitHub-flavoured Markdown table (no extra dependency)."""
    header = "| " + " | ".join(str(column) for column in frame.columns) + " |"
    rule = "|" + "|".join("---:" if frame[column].dtype.kind in "iuf" else "---" for column in frame.columns) + "|"
    rows = ["| " + " | ".join(_cell(value) for value in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


# --------------------------------------------------------------------------------------------------
# analyze
# --------------------------------------------------------------------------------------------------


def _size_table(report: Report, state: Mapping[str, Any]) -> list[tuple[str, SizeReport]]:
    """Expected size with each layer's d̃, with the global d̃ and as plain PQ (d̃ = m) at the same k, m."""
    from .plan import LayerPlan
    from .size import size_report

    pq = {name: LayerPlan(k=plan.k, m=plan.m) for name, plan in report.plan("layer").items()}
    return [
        ("LR²VQ, per-layer d̃", size_report(state, report.plan("layer"))),
        (f"LR²VQ, global d̃ = {report.global_d_tilde}", size_report(state, report.plan("global"))),
        ("PQ (d̃ = m)", size_report(state, pq)),
    ]


def write_markdown_report(
    report: Report,
    out_dir: Path,
    *,
    sizes: Sequence[tuple[str, SizeReport]] = (),
    figures: Mapping[str, Sequence[Path]] | None = None,
    command: str | None = None,
) -> Path:
    """Write ``report.md``: settings, global d̃, expected sizes, the layer table, figures and skipped layers.

    Parameters
    ----------
    report : Report
    out_dir : pathlib.Path
        Folder of ``report.md``; figure links are written relative to it.
    sizes : sequence of (str, SizeReport), optional
        Rows of the "Expected size" table, e.g. per-layer d̃, global d̃ and PQ.
    figures : mapping of str to list of Path, optional
        What :func:`~lr2vq_analysis.plots.save_report_figures` returned; the PNGs are embedded.
    command : str, optional
        The command line that produced the report, quoted in the header.

    Returns
    -------
    pathlib.Path
        The file written (atomically).
    """
    from . import __version__
    from .tradeoff import prediction_note

    figures = dict(figures or {})
    lines = [f"# LR²VQ analysis of `{report.source}`", ""]
    lines.append(
        f"k = {report.k} (capped per layer at a quarter of its subvectors, as PQF does), m = {report.m}, "
        f"ρ = {report.rho:.3g}; {len(report.layers)} layers analysed, {len(report.skipped)} skipped. "
        f"Written by lr2vq_analysis {__version__}" + (f" (`{command}`)." if command else ".")
    )
    lines += [
        "",
        f"**Global d̃ = {report.global_d_tilde}** ({prediction_note(report)}).",
        "",
    ]
    lines.append(
        "Errors are fractions of each layer's ‖W‖²; total = ρ·low-rank + clustering, where ρ is the share of "
        "the low-rank error that fine-tuning does not recover; the ρ-model's d̃ is the minimum of the total."
    )
    if sizes:
        import pandas as pd

        lines += ["", "## Expected size", ""]
        rows = [
            {"plan": label, "compressed (MiB)": size.megabytes, "ratio": f"{size.ratio:.1f}×"} for label, size in sizes
        ]
        lines.append(_markdown_table(pd.DataFrame(rows)))
        lines += [
            "",
            f"Uncompressed: {sizes[0][1].uncompressed_megabytes:.4g} MiB (fp32). Codes at log2 k bits, codebooks "
            "and projections at fp16, everything else at fp32, batch norm folded into two vectors (PQF's convention).",
        ]
    lines += [
        "",
        "## Layers",
        "",
        "Errors at each layer's predicted d̃; knee: the number of components that reverse water-filling gives "
        "bits at this k; bits/weight: codes, codebook and projection.",
        "",
    ]
    frame = report.to_frame()[
        [
            "name",
            "kind",
            "shape",
            "k",
            "knee",
            "d_tilde",
            "lowrank_error",
            "clustering_error",
            "total_error",
            "bits_per_weight",
        ]
    ].rename(
        columns={
            "d_tilde": "d̃",
            "lowrank_error": "low-rank",
            "clustering_error": "clustering",
            "total_error": "total",
            "bits_per_weight": "bits/weight",
        }
    )
    lines.append(_markdown_table(frame))
    if figures:
        lines += ["", "## Figures", ""]
        captions = {
            "overview": "Predicted d̃ per layer with the reverse water-filling knee and the global d̃",
            "spectra": "Eigenvalue spectra of the subvectors, with the cut at the predicted d̃",
            "tradeoff_grid": "Error trade-off of every layer",
        }
        for key, caption in captions.items():
            png = _first_png(figures.get(key, ()))
            if png is not None:
                lines += [f"![{caption}]({_link(png, out_dir)})", ""]
        per_layer = [(layer.name, _first_png(figures.get(layer.name, ()))) for layer in report.layers]
        links = [f"[{name}]({_link(png, out_dir)})" for name, png in per_layer if png is not None]
        if links:
            lines += ["One figure per layer: " + ", ".join(links) + "."]
    if report.skipped:
        import pandas as pd

        lines += ["", "## Skipped layers", ""]
        skipped = pd.DataFrame({"layer": list(report.skipped), "reason": list(report.skipped.values())})
        lines.append(_markdown_table(skipped))
    path = out_dir / "report.md"
    write_atomic(path, ("\n".join(lines) + "\n").encode())
    return path


def _link(path: Path, start: Path) -> str:
    """Markdown link target of ``path`` relative to the folder of the Markdown file."""
    return Path(os.path.relpath(path, start)).as_posix()


def _first_png(paths: Sequence[Path]) -> Path | None:
    return next((path for path in paths if path.suffix == ".png"), None)


def _print_summary(args: argparse.Namespace, report: Report, sizes: Sequence[tuple[str, SizeReport]]) -> None:
    frame = report.to_frame()[["name", "kind", "shape", "k", "knee", "d_tilde", "total_error"]]
    _say(args, frame.to_string(index=False, float_format=lambda value: f"{value:.4f}"))
    _say(args, f"\nglobal d̃ = {report.global_d_tilde}  (k ≤ {report.k}, m = {report.m}, ρ = {report.rho:.3g})")
    for label, size in sizes:
        _say(args, f"  {label:<26} {_describe_size(size)}")
    if report.skipped:
        _say(args, f"skipped {len(report.skipped)} layer(s); reasons in report.md")


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .plots import save_report_figures
    from .report import analyze
    from .weights import load_state_dict

    out = Path(args.out)
    check_k(args.k)  # fail before any work, not inside the progress bar
    options = {} if args.rho is None else {"rho": args.rho}
    report = analyze(
        args.source,
        k=args.k,
        m=args.m,
        include=args.include,
        exclude=args.exclude,
        min_size=args.min_size,
        keep_first_conv=args.keep_first_conv,
        seed=args.seed,
        n_jobs=args.jobs,
        progress=not args.quiet,
        measure_full_curve=args.measure,
        **options,
    )
    report.save(out / "report.json")
    write_atomic(out / "report.csv", report.to_frame().to_csv(index=False).encode())
    write_atomic(out / "curves.csv", report.curves_frame().to_csv(index=False).encode())
    sizes = _size_table(report, load_state_dict(args.source))
    figures = save_report_figures(
        report, out / FIGURE_DIR, args.formats, per_layer=not args.no_layer_figures, progress=not args.quiet
    )
    command = "lr2vq " + shlex.join(args.argv)
    markdown = write_markdown_report(report, out, sizes=sizes, figures=figures, command=command)
    _print_summary(args, report, sizes)
    _say(
        args,
        f"\nwrote {out / 'report.json'}, report.csv, curves.csv, {markdown.name} and {_count(figures)} figure files",
    )
    return EXIT_OK


def _count(figures: Mapping[str, Sequence[Path]]) -> int:
    return sum(len(paths) for paths in figures.values())


# --------------------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------------------


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plots import save_report_figures
    from .report import Report

    report = Report.load(args.report)
    if args.rho is not None:
        report = report.with_rho(args.rho)
    out = Path(args.out) if args.out else Path(args.report).parent / FIGURE_DIR
    figures = save_report_figures(
        report, out, args.formats, per_layer=not args.no_layer_figures, progress=not args.quiet
    )
    _say(
        args,
        f"global d̃ = {report.global_d_tilde} (ρ = {report.rho:.3g}); wrote {_count(figures)} figure files to {out}",
    )
    return EXIT_OK


# --------------------------------------------------------------------------------------------------
# compress
# --------------------------------------------------------------------------------------------------


def read_plan(path: str | os.PathLike[str], which: str = "layer") -> dict[str, LayerPlan]:
    """Read a compression plan from a saved report or from a JSON file.

    Parameters
    ----------
    path : str or path
        ``report.json`` / ``report.npz`` from ``lr2vq analyze`` (:meth:`Report.save`), or a JSON object
        ``{"layer.weight": {"k": 256, "m": 9, "d_tilde": 4}, ...}``.
    which : {"layer", "global"}, default "layer"
        For a report: each layer's predicted d̃, or the global d̃ for every layer.

    Returns
    -------
    dict of str to LayerPlan

    Raises
    ------
    WeightFileError
        If the file is missing, not JSON, or neither a report nor a plan.
    InvalidParameterError
        If a plan entry is invalid.
    """
    from ._validation import WeightFileError
    from .plan import LayerPlan
    from .report import Report

    path = Path(path)
    if path.suffix == ".npz":
        return Report.load(path).plan(which)
    if not path.is_file():
        raise WeightFileError(f"plan file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise WeightFileError(f"plan file {str(path)!r} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and "layers" in data and "format_version" in data:
        return Report.load(path).plan(which)
    if not isinstance(data, dict) or not data or not all(isinstance(entry, dict) for entry in data.values()):
        raise WeightFileError(
            f"plan file {str(path)!r} is neither a report from 'lr2vq analyze' nor a JSON object "
            '{"layer.weight": {"k": 256, "m": 9, "d_tilde": 4}, ...}'
        )
    return {str(name): LayerPlan.from_dict(entry) for name, entry in data.items()}


def skeleton_from_state_dict(state: Mapping[str, torch.Tensor], layer_keys: Sequence[str]) -> torch.nn.Module:
    """A module with the state_dict's names and shapes, for weights that come without their model code.

    Each key in ``layer_keys`` becomes the weight of an ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` (with
    its bias when the state_dict has one), each group with ``running_mean`` a batch norm, and every other
    tensor a parameter or buffer of a plain container. The module can be compressed, saved and reloaded;
    it has no forward pass.

    Parameters
    ----------
    state : mapping of str to torch.Tensor
        The whole state_dict (:func:`~lr2vq_analysis.weights.load_state_dict`); its values are loaded.
    layer_keys : sequence of str
        Weight keys to build as Linear / Conv1d / Conv2d layers (the keys of a plan).

    Returns
    -------
    torch.nn.Module

    Raises
    ------
    InvalidParameterError
        If a layer key's tensor is not 2-, 3- or 4-dimensional.

    Examples
    --------
    >>> import torch
    >>> state = {"fc.weight": torch.zeros(4, 8), "fc.bias": torch.zeros(4), "scale": torch.ones(3)}
    >>> skeleton_from_state_dict(state, ["fc.weight"]).fc
    Linear(in_features=8, out_features=4, bias=True)
    """
    import torch
    from torch import nn

    root = nn.Module()

    def container(path: str) -> nn.Module:
        module = root
        for part in [p for p in path.split(".") if p]:
            if part not in module._modules:
                module.add_module(part, nn.Module())
            child = module._modules[part]
            assert child is not None
            module = child
        return module

    def place(path: str, module: nn.Module) -> None:
        parent, _, leaf = path.rpartition(".")
        container(parent).add_module(leaf, module)

    layers = set(layer_keys)
    owners = {key.rpartition(".")[0] for key in layers}
    batchnorms = {key.rpartition(".")[0] for key in state if key.endswith(".running_mean")}
    for key in layers:
        weight = state[key]
        owner = key.rpartition(".")[0]
        has_bias = f"{owner}.bias" in state
        shape = tuple(weight.shape)
        module: nn.Module
        if len(shape) == 2:
            module = nn.utils.skip_init(nn.Linear, shape[1], shape[0], bias=has_bias)
        elif len(shape) == 3:
            module = nn.utils.skip_init(nn.Conv1d, shape[1], shape[0], shape[2], bias=has_bias)
        elif len(shape) == 4:
            module = nn.utils.skip_init(nn.Conv2d, shape[1], shape[0], shape[2:], bias=has_bias)
        else:
            raise InvalidParameterError(f"layer {key!r}: weight of shape {shape} is not a Linear/Conv1d/Conv2d weight")
        place(owner, module)
    for owner in batchnorms - owners:
        channels = int(state[f"{owner}.running_mean"].shape[0])
        place(owner, nn.BatchNorm1d(channels, affine=f"{owner}.weight" in state))
    for key, value in state.items():
        owner, _, leaf = key.rpartition(".")
        if owner in owners or owner in batchnorms:
            continue
        target = container(owner)
        if value.is_floating_point():
            target.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
        else:
            target.register_buffer(leaf, value.clone())
    with torch.no_grad():
        root.load_state_dict(dict(state), strict=True)
    return root


def _cmd_compress(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .export import load_compressed, save_compressed
    from .nn import compress
    from .size import size_report
    from .weights import BUNDLED_MODELS, load_state_dict

    plan = read_plan(args.plan, args.which)
    bundled = args.source in BUNDLED_MODELS and not os.path.exists(args.source)
    out = Path(args.out) if args.out else Path(Path(args.source).stem.replace("-", "_") + ".lr2vq")
    if bundled:
        return _compress_bundled(args, plan, out)
    if args.steps:
        raise _UsageError(
            f"--steps needs training data, which a plain weight file ({args.source}) does not come with; "
            f"fine-tuning from the command line is available for the bundled models {list(BUNDLED_MODELS)}"
        )
    state = load_state_dict(args.source)
    missing = [name for name in plan if name not in state]
    if missing:
        raise InvalidParameterError(f"the plan names {missing}, which {args.source} does not contain")
    skeleton = skeleton_from_state_dict(state, list(plan))
    _say(
        args, f"compressing {len(plan)} layer(s) of {args.source} (no fine-tuning: a weight file has no training data)"
    )
    cmodel = compress(skeleton, plan, seed=args.seed)
    layers = cmodel.compressed_layers()
    for layer in tqdm(layers.values(), desc="quantize", unit="layer", disable=args.quiet):
        layer.quantize(seed=args.seed)  # what cmodel.quantize(seed) does, one progress step per layer
    path = save_compressed(cmodel, out)
    reloaded = load_compressed(path, skeleton_from_state_dict(state, list(plan)))
    _check_reload(cmodel, reloaded)
    sizes = size_report(cmodel)
    _say(args, f"size: {_describe_size(sizes)}")
    _say(args, f"wrote {path} ({path.stat().st_size / 2**20:.4g} MiB on disk); it reloads to the same weights")
    _say(
        args,
        "reload it with lr2vq_analysis.export.load_compressed(path, model) where model is a fresh instance of "
        "the original architecture. Fine-tune before use: without it accuracy usually drops.",
    )
    return EXIT_OK


def _check_reload(cmodel: Any, reloaded: Any) -> None:
    import torch

    for name, layer in cmodel.compressed_layers().items():
        again = reloaded.compressed_layers()[name]
        if not torch.equal(layer.weight.detach(), again.weight.detach()):
            raise LR2VQError(f"layer {name!r}: the reloaded weight differs from the compressed one")


def _move_model_file(result: Any, out: Path) -> None:
    """Put the demo's model file at ``out`` and keep its summary.json pointing at it."""
    from .pipeline import SUMMARY_FILE

    model = Path(result.files["model"])
    if model.resolve() != out.resolve():
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(model), str(out))
        result.files["model"] = out
        write_atomic(model.parent / SUMMARY_FILE, json.dumps(result.to_dict(), indent=2).encode())


def _compress_bundled(args: argparse.Namespace, plan: Mapping[str, LayerPlan], out: Path) -> int:
    from .pipeline import compress_digits_demo

    if args.source != DEFAULT_MODEL:
        raise _UsageError(f"fine-tuning from the command line is available for {DEFAULT_MODEL!r} only")
    _say(args, f"compressing {args.source} with {len(plan)} planned layer(s), fine-tuning on its data set")
    result = compress_digits_demo(
        plan=plan, steps=args.steps, seed=args.seed, out_dir=out.parent, progress=not args.quiet
    )
    _move_model_file(result, out)
    _say(args, f"\naccuracy {result.accuracy_before:.2%} before, {result.accuracy_after:.2%} after (test split)")
    _say(args, f"size: {_describe_size(result.size)}")
    _say(args, f"wrote {out}; details in {out.parent / 'summary.json'}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    import matplotlib.pyplot as plt

    from .pipeline import compress_digits_demo
    from .plots import plot_size_breakdown, save_figure, save_report_figures

    out = Path(args.out)
    result = compress_digits_demo(
        k=args.k,
        m=args.m,
        d_tilde=args.d_tilde,
        steps=args.steps,
        seed=args.seed,
        out_dir=out,
        quick=args.quick,
        progress=not args.quiet,
    )
    figures = out / FIGURE_DIR
    written = []
    if result.report is not None:
        written += [
            path for paths in save_report_figures(result.report, figures, per_layer=False).values() for path in paths
        ]
    figure = plot_size_breakdown(result.size)
    try:
        written += save_figure(figure, figures / "size")
    finally:
        plt.close(figure)
    _say(args, "")
    _say(args, f"accuracy before: {result.accuracy_before:.2%}   after: {result.accuracy_after:.2%}   (test split)")
    _say(args, f"size: {_describe_size(result.size)}")
    _say(args, f"files in {out}: " + ", ".join(sorted(path.name for path in result.files.values())))
    _say(args, f"figures in {figures}: {len(written)} files")
    return EXIT_OK


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lr2vq`` with ``argv`` and return the exit status (the console script calls this).

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        0 on success, 2 for a usage error, 1 when the work failed; errors are one line on stderr.

    Examples
    --------
    >>> main(["plot", "/nonexistent/report.json"])
    1
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help / --version (0) or a usage error (2)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    args.argv = argv
    _use_headless_backend()
    prefix = f"{PROG} {args.command}: error:"
    try:
        return int(args.handler(args))
    except (_UsageError, InvalidParameterError) as exc:
        print(f"{prefix} {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except (LR2VQError, OSError) as exc:
        print(f"{prefix} {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{prefix} interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
