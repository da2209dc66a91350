"""The ``lr2vq`` command line: analyse a model, redraw a report, compress a model, run the demo.

Subcommands (``lr2vq SUBCOMMAND --help`` describes each):

``analyze [SOURCE]``
    Predict d̃ for every layer of a weight file or named model; write a report folder (``report.json``,
    ``report.csv``, ``curves.csv``, the figures and ``report.md``) as one unit.
``plot REPORT.json``
    Rewrite the report folder of a saved report (optionally with another ρ, into a new folder).
``compress SOURCE --plan REPORT.json``
    Compress a model with a saved plan and write the bit-packed file.
``demo``
    The whole pipeline on the bundled digits CNN: analyse, compress, fine-tune, save, reload, evaluate.

Exit status: 0 on success, 2 for a usage error (:class:`~lr2vq_analysis.exceptions.UsageError`: an unknown
option, a parameter out of range, a bad plan entry), 1 when the work fails (any other
:class:`~lr2vq_analysis.exceptions.LR2VQError` or OS error: a missing or corrupt file, weights that cannot
be analysed), 130 when interrupted (Ctrl-C). Errors are one line on stderr, without a traceback, ending
with what to do (set ``LR2VQ_DEBUG=1`` for the traceback of an unexpected error).

The handlers are thin: the work is done by library functions (:func:`~lr2vq_analysis.report.analyze`,
:mod:`~lr2vq_analysis.report_folder`, :mod:`~lr2vq_analysis.skeleton`, :mod:`~lr2vq_analysis.pipeline`).
Heavy libraries (torch, pandas, matplotlib) are imported by the handlers only, so ``--help``,
``--version`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .exceptions import (
    DataFileError,
    InvalidWeightsError,
    LR2VQError,
    NonFiniteError,
    ReportFileError,
    UsageError,
    WeightFileError,
)
from .registry import DEFAULT_MODEL, MODELS, is_model_name

if TYPE_CHECKING:
    from .report import Report
    from .size import SizeReport

__all__ = ["main", "build_parser", "cli_wording"]

PROG = "lr2vq"
DEFAULT_REPORT_DIR = "lr2vq-report"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: Figure formats (the same as :func:`lr2vq_analysis.plots.save_figure`'s; not imported, to keep --help fast).
FORMATS = ("png", "svg", "pdf")
#: Longest error line printed (the message is cut, never the advice at its end).
MAX_ERROR_LENGTH = 200

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
    formats = [part.strip().lower() for part in text.split(",") if part.strip()]
    bad = [fmt for fmt in formats if fmt not in FORMATS]
    if not formats or bad:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; use a comma-separated list of {list(FORMATS)}")
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
        help=f"weight file (.pt, .pth, .bin, .safetensors, .npz) or model name {list(MODELS)} "
        f"(default: {DEFAULT_MODEL})",
    )
    _add_analysis_options(analyze)
    _add_calibration_options(analyze)
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
        default=["png"],
        metavar="LIST",
        help="figure formats, comma-separated from png, svg, pdf (default: png)",
    )
    analyze.add_argument(
        "--no-layer-figures",
        action="store_true",
        help="skip the one-figure-per-layer plots (written by default up to 12 layers)",
    )
    analyze.set_defaults(handler=_cmd_analyze)

    plot = commands.add_parser(
        "plot",
        parents=[common],
        help="redraw the figures of a saved report",
        description="Rewrite the report folder of a report written by 'lr2vq analyze' (report.json or .npz): "
        "tables, figures and report.md, optionally with another ρ (written to a new folder).",
    )
    plot.add_argument("report", metavar="REPORT", help="report.json or report.npz written by 'lr2vq analyze'")
    plot.add_argument(
        "--out",
        metavar="DIR",
        help="report folder to write (default: the report's own folder; with --rho, a new sibling folder "
        "'<folder>-rho<R>', so that no report.md contradicts its figures)",
    )
    plot.add_argument("--rho", type=_rho, metavar="R", help="redraw with this ρ (d̃ moves; no refit)")
    plot.add_argument("--formats", type=_formats, default=["png"], metavar="LIST", help="figure formats (default: png)")
    plot.add_argument(
        "--no-layer-figures",
        action="store_true",
        help="skip the one-figure-per-layer plots (written by default up to 12 layers)",
    )
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
    compress.add_argument("source", metavar="SOURCE", help=f"weight file or model name {list(MODELS)}")
    planned = compress.add_mutually_exclusive_group(required=True)
    planned.add_argument(
        "--plan",
        metavar="REPORT",
        help="report.json from 'lr2vq analyze', plan.json from 'lr2vq plan', or a JSON file {layer: {k, m, d_tilde}}",
    )
    planned.add_argument("--specs", metavar="SPECS", help="specs preset or JSON file instead of a plan: PQ (d̃ = m)")
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
        help="fine-tuning steps in all, half of them low-rank; bundled model only (default: the demo's; 0: none)",
    )
    compress.add_argument("--seed", type=_non_negative_int, default=0, metavar="S", help="seed (default: 0)")
    compress.set_defaults(handler=_cmd_compress)

    plan = commands.add_parser(
        "plan",
        parents=[common],
        help="choose (k, m, d̃) per layer for a size target",
        description="Analyse every layer at candidate k and m and allocate them to minimise the predicted model "
        "error within --size MiB or --ratio ×; write plan.json (for 'lr2vq compress --plan'), report.md and "
        "a figure of predicted error vs size (docs/planning.md).",
    )
    plan.add_argument("source", metavar="SOURCE", help=f"weight file or model name {list(MODELS)}")
    target = plan.add_mutually_exclusive_group(required=True)
    target.add_argument("--size", type=float, metavar="MIB", help="target size in MiB")
    target.add_argument("--ratio", type=float, metavar="X", help="target ratio against the source as stored")
    plan.add_argument("--specs", default="pqf-small", metavar="SPECS", help="preset or JSON file (default: pqf-small)")
    plan.add_argument("--rho", type=_rho, metavar="R", help="share of the low-rank error training does not recover")
    plan.add_argument("--seed", type=_non_negative_int, default=0, metavar="S", help="seed of the k-means probes")
    plan.add_argument("--jobs", type=_jobs, default=1, metavar="N", help="layers analysed in parallel (-1: all cores)")
    plan.add_argument("--out", default="lr2vq-plan", metavar="DIR", help="output folder (default: lr2vq-plan)")
    _add_calibration_options(plan)
    plan.set_defaults(handler=_cmd_plan)

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
        help="fine-tuning steps in all, half of them low-rank (default: 600, 80 with --quick)",
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
        "--specs",
        metavar="SPECS",
        help="k and m per layer kind / name: a preset (pqf-small, pqf-large, ...) or a JSON file; replaces --k, --m",
    )
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
    parser.add_argument(
        "--keep-first-conv",
        action="store_true",
        help="analyse the input stem too (the conv reading the image, at most 4 channels; skipped by default)",
    )
    parser.add_argument("--seed", type=_non_negative_int, default=0, metavar="S", help="seed of the k-means probes")


def _add_calibration_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="the runnable model for --calibration: a torch.export archive (.pt2, from torch.export.save)",
    )
    parser.add_argument(
        "--calibration",
        metavar="PATH",
        help="inputs of --model: .pt (a tensor or a list of tensors = batches) or .npz (one array per batch); "
        "errors are then measured in the layer outputs (docs/cli.md)",
    )


#: What --model and --calibration accept.
_MODEL_SUFFIXES = (".pt2",)
_CALIBRATION_SUFFIXES = (".pt", ".npz")


def _calibration(args: argparse.Namespace) -> dict[str, Any]:
    """``{"model": module, "calibration": inputs}`` from --model/--calibration, or {} when neither is given."""
    model_path, data_path = getattr(args, "model", None), getattr(args, "calibration", None)
    if model_path is None and data_path is None:
        return {}
    if model_path is None or data_path is None:
        missing = "--model" if model_path is None else "--calibration"
        raise UsageError(f"--model and --calibration go together; {missing} is missing")
    if Path(model_path).suffix.lower() not in _MODEL_SUFFIXES:
        raise UsageError(
            f"--model {model_path!r} is not allowed; give a torch.export archive (.pt2, written by torch.export.save)"
        )
    if Path(data_path).suffix.lower() not in _CALIBRATION_SUFFIXES:
        raise UsageError(
            f"--calibration {data_path!r} is not allowed; give a .pt (tensor or list of tensors) or an .npz file"
        )
    for path in (model_path, data_path):
        if not os.path.isfile(path):
            raise DataFileError(f"{path!r} is no such file")
    import torch

    from .calibration import load_exported_model

    try:
        model = load_exported_model(model_path)
    except LR2VQError:
        raise
    except Exception as exc:
        raise DataFileError(f"cannot load the exported model {model_path!r}: {type(exc).__name__}: {exc}") from None
    inputs: Any
    if data_path.lower().endswith(".npz"):
        from .weights import read_npz

        arrays = [torch.from_numpy(array.copy()) for array in read_npz(data_path, error=DataFileError).values()]
        inputs = arrays[0] if len(arrays) == 1 else arrays
    else:
        try:
            inputs = torch.load(data_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DataFileError(f"cannot read {data_path!r}: {type(exc).__name__}: {exc}") from None
        batches = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        if not batches or not all(isinstance(batch, torch.Tensor) for batch in batches):
            raise DataFileError(
                f"{data_path!r} holds {type(inputs).__name__}; it must hold a tensor or a list of tensors"
            )
    if isinstance(inputs, list) and not inputs:
        raise DataFileError(f"{data_path!r} holds no arrays")
    return {"model": model, "calibration": inputs}


# --------------------------------------------------------------------------------------------------
# Wording: library messages in the command line's terms
# --------------------------------------------------------------------------------------------------

#: Python keyword → command-line flag, for messages the library words for Python callers.
_FLAGS = {
    "keep_first_conv=True": "--keep-first-conv",
    "cap_k=False": "(not available from the command line)",
    "measure_full_curve=True": "--measure",
}
_PARAMETER = re.compile(r"\b(k|m|rho|seed|n_jobs|min_size|d_tilde|steps)=(?=\S)")
_SUBJECT = re.compile(r"; (k|m|rho|seed|n_jobs|min_size|d_tilde|steps) must")
_FLAG_OF = {"n_jobs": "--jobs", "min_size": "--min-size", "d_tilde": "--d-tilde"}


def cli_wording(text: str) -> str:
    """A library message in command-line terms: ``keep_first_conv=True`` → ``--keep-first-conv``, ``k=1`` → ``--k 1``.

    Parameters
    ----------
    text : str
        A message worded for Python callers.

    Examples
    --------
    >>> cli_wording("k=1 is invalid; pass keep_first_conv=True to include it")
    '--k 1 is invalid; pass --keep-first-conv to include it'
    """
    for python, flag in _FLAGS.items():
        text = text.replace(python, flag)
    text = _PARAMETER.sub(lambda match: _FLAG_OF.get(match.group(1), f"--{match.group(1)}") + " ", text)
    return _SUBJECT.sub(lambda match: "; " + _FLAG_OF.get(match.group(1), f"--{match.group(1)}") + " must", text)


def _advice(exc: BaseException, command: str) -> str:
    """What to do about an error, for the end of its line."""
    if isinstance(exc, UsageError):
        return f"see '{PROG} {command} --help'"
    if isinstance(exc, ReportFileError):
        return "check the path; reports are written by 'lr2vq analyze'"
    if isinstance(exc, WeightFileError):
        return f"check the file, or use a model name ({', '.join(MODELS)})"
    if isinstance(exc, InvalidWeightsError):
        return "choose other layers (--include, --exclude) or another --m"
    if isinstance(exc, NonFiniteError):
        return "check the weights for NaN/Inf or extreme values"
    if isinstance(exc, (DataFileError, OSError)):
        return "check the path and its permissions"
    if isinstance(exc, LR2VQError):
        return "see docs/cli.md"
    return "rerun with LR2VQ_DEBUG=1 for the traceback and report it"


_LONG_PATH = re.compile(r"(?<=['\"])/[^'\"]{40,}(?=['\"])")
#: A message that already ends with what to do (the library's messages often do).
_ADVISED = re.compile(r"[;:]\s*(choose|give|pass|use|run|reinstall|check|install|create|see|fine-tune)\b[^;]*$")


def _error_line(exc: BaseException, command: str) -> str:
    """``lr2vq COMMAND: error: MESSAGE; ADVICE`` on one line of at most :data:`MAX_ERROR_LENGTH` characters."""
    prefix = f"{PROG} {command}: error: " if command else f"{PROG}: error: "
    message = cli_wording(" ".join(str(exc).split()) or type(exc).__name__)
    if not isinstance(exc, (LR2VQError, OSError)):
        message = f"unexpected {type(exc).__name__}: {message}"
    message = _LONG_PATH.sub(lambda match: f"…/{Path(match.group(0)).name}", message)  # the user knows the path
    own = _ADVISED.search(message)
    if own:  # keep the message's own advice, cut what comes before it if needed
        message, advice = message[: own.start()], message[own.start() + 1 :].strip()
    else:
        advice = _advice(exc, command)
    room = MAX_ERROR_LENGTH - len(prefix) - len(advice) - 2
    if len(message) > room:  # keep the start (what failed) and the end (the value, what is allowed)
        room = max(room, 40)
        head = room * 2 // 5
        message = message[:head].rstrip() + " … " + message[len(message) - (room - head - 3) :].lstrip()
    return f"{prefix}{message.rstrip('.;')}; {advice}"


# --------------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------------


def _say(args: argparse.Namespace, text: str = "") -> None:
    if not args.quiet:
        print(text, flush=True)


def _describe_size(report: SizeReport) -> str:
    return (
        f"{report.megabytes:.4g} MiB (ratio {report.ratio:.1f}×; uncompressed {report.uncompressed_megabytes:.4g} MiB)"
    )


def _check_source(source: str) -> None:
    """Fail fast, before torch is imported, on a source that is neither a file nor a model name."""
    if not is_model_name(source) and not os.path.exists(source):
        hint = "" if Path(source).suffix else f" nor a model name {list(MODELS)}"
        raise WeightFileError(f"{source!r} is no such file{hint}")


def _print_summary(args: argparse.Namespace, report: Report, sizes: Sequence[tuple[str, SizeReport]]) -> None:
    frame = report.to_frame()[["name", "kind", "shape", "k", "knee", "d_tilde", "total_error"]]
    _say(args, frame.to_string(index=False, float_format=lambda value: f"{value:.4f}"))
    capped = [f"{layer.name} → {layer.k}" for layer in report.layers if layer.k < report.k]
    low, high = report.global_d_tilde_range
    rule = report.layers[0].model.predictor if report.layers else "?"
    _say(
        args,
        f"\nglobal d̃ = {report.global_d_tilde} by the rule '{rule}'; with the near-best d̃ it spans {low}–{high}"
        f"{' (flat: PQ is as good)' if report.global_flat else ''}"
        f"  (k = {report.k}, m = {report.m}, ρ = {report.rho:.3g})",
    )
    if capped:
        _say(args, f"k capped at a quarter of the layer's subvectors on {len(capped)} layer(s): " + ", ".join(capped))
    for label, size in sizes:
        _say(args, f"  {label:<26} {_describe_size(size)}")
    if report.coverage is not None:
        _say(args, f"coverage: {report.coverage.summary()}")
    if report.skipped:
        _say(args, f"skipped {len(report.skipped)} layer(s); reasons in report.md")


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .report_folder import check_destination, write_report_folder

    _check_source(args.source)
    out = check_destination(args.out)  # before any work, not after minutes of analysis
    from .report import analyze
    from .weights import load_state_dict

    options: dict[str, Any] = {} if args.rho is None else {"rho": args.rho}
    options.update(_calibration(args))
    report = analyze(
        args.source,
        k=args.k,
        m=args.m,
        specs=args.specs,
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
    folder = write_report_folder(
        report,
        out,
        state=load_state_dict(args.source),
        formats=args.formats,
        per_layer=False if args.no_layer_figures else None,
        progress=not args.quiet,
        command=f"{PROG} {shlex.join(args.argv)}",
        wording=_FLAGS,
    )
    _print_summary(args, report, folder.sizes)
    if "calibration" in options:
        from .tradeoff import prediction_note

        _say(args, f"d̃ {prediction_note(report)}")
    _say(args, f"\nwrote {out}/: report.json, report.csv, curves.csv, report.md, {folder.n_figure_files} figure files")
    return EXIT_OK


def _cmd_plot(args: argparse.Namespace) -> int:
    if not Path(args.report).is_file():
        raise ReportFileError(f"report {args.report!r} does not exist")
    from .report import Report
    from .report_folder import check_destination, write_report_folder

    report = Report.load(args.report)
    folder_of_report = Path(args.report).resolve().parent
    if args.rho is not None:
        report = report.with_rho(args.rho)
    default = folder_of_report.with_name(f"{folder_of_report.name}-rho{args.rho:g}") if args.rho else folder_of_report
    out = check_destination(args.out or default)
    state = None
    if is_model_name(report.source) or Path(report.source).is_file():
        from .weights import load_state_dict

        state = load_state_dict(report.source)  # for the size table; optional
    folder = write_report_folder(
        report,
        out,
        state=state,
        formats=args.formats,
        per_layer=False if args.no_layer_figures else None,
        progress=not args.quiet,
        command=f"{PROG} {shlex.join(args.argv)}",
        wording=_FLAGS,
    )
    _say(args, f"global d̃ = {report.global_d_tilde} (ρ = {report.rho:.3g}); wrote the report folder {out}")
    _say(args, f"  report.json, report.csv, curves.csv, report.md, {folder.n_figure_files} figure files")
    return EXIT_OK


def _cmd_compress(args: argparse.Namespace) -> int:
    _check_source(args.source)
    from .report_folder import read_plan
    from .specs import as_specs

    plan = as_specs(args.specs).plan(args.source) if args.specs else read_plan(args.plan, args.which)
    out = Path(args.out) if args.out else Path(Path(args.source).stem.replace("-", "_") + ".lr2vq")
    if args.source == DEFAULT_MODEL and is_model_name(args.source):
        return _compress_bundled(args, plan, out)
    if args.steps:
        raise UsageError(
            f"--steps needs training data, which {args.source} does not come with here; "
            f"fine-tuning from the command line is available for {DEFAULT_MODEL} only"
        )
    from .skeleton import compress_weight_file

    _say(args, f"compressing {len(plan)} layer(s) of {args.source} (no fine-tuning: no training data here)")
    result = compress_weight_file(args.source, plan, out, seed=args.seed, progress=not args.quiet)
    fresh = f"registry.build_model({result.model!r})" if result.model else "a fresh instance of the architecture"
    _say(args, f"size: {_describe_size(result.size)}")
    _say(args, f"wrote {result.path} ({result.path.stat().st_size / 2**20:.4g} MiB on disk); it reloads exactly")
    _say(args, f"reload it with lr2vq_analysis.export.load_compressed(path, {fresh}); fine-tune before use")
    return EXIT_OK


def _cmd_plan(args: argparse.Namespace) -> int:
    _check_source(args.source)
    from .planner import plan_for_size, write_plan_folder

    options: dict[str, Any] = {} if args.rho is None else {"rho": args.rho}
    options.update(_calibration(args))
    _say(args, f"analysing {args.source} at the candidate k and m (specs {args.specs}) ...")
    plan = plan_for_size(
        args.source, args.size, ratio=args.ratio, specs=args.specs, seed=args.seed, n_jobs=args.jobs, **options
    )
    paths = write_plan_folder(plan, args.out, command=f"{PROG} {shlex.join(args.argv)}")
    _say(args, plan.summary())
    _say(args, f"wrote {paths['plan']}, {paths['report'].name} and {paths['figure'].name}")
    _say(args, f"compress with: {PROG} compress {args.source} --plan {paths['plan']}")
    return EXIT_OK


def _compress_bundled(args: argparse.Namespace, plan: dict, out: Path) -> int:
    from .pipeline import SUMMARY_FILE, compress_digits_demo

    _say(args, f"compressing {args.source} with {len(plan)} planned layer(s), fine-tuning on its data set")
    result = compress_digits_demo(
        plan=plan, steps=args.steps, seed=args.seed, out_dir=out.parent, model_path=out, progress=not args.quiet
    )
    _say(args, f"\naccuracy {result.accuracy_before:.2%} before, {result.accuracy_after:.2%} after (test split)")
    _say(args, f"size: {_describe_size(result.size)}")
    _say(args, f"wrote {out}; details in {out.parent / SUMMARY_FILE}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    import matplotlib.pyplot as plt

    from .pipeline import compress_digits_demo
    from .plots import plot_size_breakdown, save_figure, save_report_figures
    from .report_folder import FIGURE_DIR

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


def _use_headless_backend() -> None:
    """Draw with Agg unless pyplot is already in use (e.g. main() called from a notebook)."""
    if "matplotlib.pyplot" not in sys.modules and "MPLBACKEND" not in os.environ:
        os.environ["MPLBACKEND"] = "Agg"  # read when matplotlib is first imported (by a handler, if at all)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lr2vq`` with ``argv`` and return the exit status (the console script calls this).

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        0 on success, 2 for a usage error, 1 when the work failed, 130 when interrupted; errors are one
        line on stderr.

    Examples
    --------
    >>> main(["plot", "/nonexistent/report.json"])
    1
    """
    command = ""
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # argparse: --help / --version (0) or a usage error (2)
            return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
        args.argv, command = argv, args.command
        _use_headless_backend()
        return int(args.handler(args))
    except KeyboardInterrupt:
        print(f"{PROG}{' ' + command if command else ''}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if os.environ.get("LR2VQ_DEBUG") and not isinstance(exc, (LR2VQError, OSError)):
            raise
        print(_error_line(exc, command), file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
