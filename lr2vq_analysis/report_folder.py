"""Report folders: write a report's files as one unit, and read a plan back from a report or a JSON file.

A report folder holds ``report.json``, ``report.csv``, ``curves.csv``, ``report.md`` and ``figures/``
(written by ``lr2vq analyze`` and ``lr2vq plot``, or by :func:`write_report_folder` from Python).

How a folder is written (the guarantees of docs/guarantees.md):

- every file is written into a fresh hidden sibling folder (``.NAME.<pid>-*.tmp``, in the same parent, so on
  the same file system); only when all of them are complete is that folder swapped in with two renames
  (the old folder aside, the new one in its place), then the old one is deleted. A reader sees the old
  folder, briefly no folder, or the new one, never a mix of two runs, and no stale figure of another run
  survives (the figures folder is always new);
- the swap holds an exclusive lock on the parent folder (``fcntl.flock``, POSIX), so two runs writing
  the same folder at once each swap a whole folder in turn: the last one wins, whole;
- an interrupted write (Ctrl-C, an error) removes its temporary folder; the existing folder is untouched;
  a killed one (``kill -9``) leaves it behind, and the next write to the same folder removes it (only
  when its pid is no longer a running process: the rule of :func:`~lr2vq_analysis._io.write_atomic`);
- a destination that exists and holds anything but report files is refused (:class:`ReportFileError`),
  so ``--out ~`` cannot replace a home folder.

Layer figures are named ``tradeoff_<slug>_<hash>`` (:func:`~lr2vq_analysis.plots.figure_file_stem`): a
slug of safe characters, cut to a bounded length, plus a short hash of the full name, so distinct layer
names never share a file, whatever their length or characters.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._io import make_temp_dir, write_atomic
from .exceptions import InvalidParameterError, ReportFileError

if TYPE_CHECKING:
    import pandas as pd

    from .plan import LayerPlan
    from .report import Report
    from .size import SizeReport

__all__ = [
    "FIGURE_DIR",
    "REPORT_FILES",
    "ReportFolder",
    "expected_sizes",
    "read_plan",
    "write_markdown_report",
    "write_report_folder",
]

#: Sub-folder of the figures.
FIGURE_DIR = "figures"
#: Marker file that identifies a folder this module wrote (and may therefore replace).
_MARKER = ".lr2vq-report"
#: Every entry a report folder may hold; a folder holding anything else is never replaced.
REPORT_FILES: frozenset[str] = frozenset(
    {"report.json", "report.npz", "report.csv", "curves.csv", "report.md", FIGURE_DIR, _MARKER}
)


@dataclass
class ReportFolder:
    """What :func:`write_report_folder` wrote.

    Attributes
    ----------
    path : pathlib.Path
        The folder.
    files : dict of str to Path
        ``"report.json"``, ``"report.csv"``, ``"curves.csv"``, ``"report.md"`` → their final paths.
    figures : dict of str to list of Path
        Figure name (``"overview"``, ``"spectra"``, ``"tradeoff_grid"`` or a layer name) → its files.
    sizes : list of (str, SizeReport)
        The "Expected size" rows of report.md (empty without a state_dict).
    """

    path: Path
    files: dict[str, Path] = field(default_factory=dict)
    figures: dict[str, list[Path]] = field(default_factory=dict)
    sizes: list[tuple[str, SizeReport]] = field(default_factory=list)

    @property
    def n_figure_files(self) -> int:
        """Number of figure files written."""
        return sum(len(paths) for paths in self.figures.values())


def _encode(text: str) -> bytes:
    """UTF-8, with lone surrogates (undecodable file-system names) written as ``\\udcxx`` escapes."""
    return text.encode("utf-8", "backslashreplace")


def _is_replaceable(folder: Path) -> bool:
    """A folder this module may replace: empty, marked as a report folder, or holding report files only."""
    try:
        entries = {entry.name for entry in folder.iterdir()}
    except OSError:
        return False
    return not entries or _MARKER in entries or entries <= REPORT_FILES


def check_destination(out: str | os.PathLike[str]) -> Path:
    """Check, before any work, that ``out`` can become a report folder; return it as a Path.

    Raises
    ------
    ReportFileError
        If ``out`` is a file, or a folder that holds files other than a report's.
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ReportFileError(f"output folder {str(path)!r} is a file; choose a folder")
    if path.is_dir() and not _is_replaceable(path):
        raise ReportFileError(
            f"output folder {str(path)!r} holds files that are not a report, and would be replaced; "
            "choose a new or empty folder"
        )
    return path


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Exclusive lock on ``folder`` (the parent of the report folder) while the swap runs."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (the swap itself still never mixes files of two runs)
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _swap_in(staging: Path, out: Path) -> None:
    """Put the complete ``staging`` folder at ``out``: old folder aside, new one in place, old one deleted."""
    with _locked(out.parent):
        aside = None
        if out.exists():
            if not out.is_dir() or not _is_replaceable(out):
                raise ReportFileError(
                    f"output folder {str(out)!r} holds files that are not a report; choose a new or empty folder"
                )
            aside = make_temp_dir(out)
            os.replace(out, aside / "old")
        os.replace(staging, out)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def expected_sizes(report: Report, state: Mapping[str, Any]) -> list[tuple[str, SizeReport]]:
    """Expected size with each layer's d̃, with the global d̃, and as plain PQ (d̃ = m) at the same k, m.

    Parameters
    ----------
    report : Report
    state : mapping of str to tensor
        The model's whole state_dict (:func:`~lr2vq_analysis.weights.load_state_dict`).

    Returns
    -------
    list of (label, SizeReport)
    """
    from .plan import LayerPlan
    from .size import size_report

    pq = {name: LayerPlan(k=plan.k, m=plan.m) for name, plan in report.plan("layer").items()}
    return [
        ("LR²VQ, per-layer d̃", size_report(state, report.plan("layer"))),
        (f"LR²VQ, global d̃ = {report.global_d_tilde}", size_report(state, report.plan("global"))),
        ("PQ (d̃ = m)", size_report(state, pq)),
    ]


def write_report_folder(
    report: Report,
    out: str | os.PathLike[str],
    *,
    state: Mapping[str, Any] | None = None,
    formats: Sequence[str] = ("png",),
    per_layer: bool | None = None,
    progress: bool = False,
    command: str | None = None,
    wording: Mapping[str, str] | None = None,
) -> ReportFolder:
    """Write a whole report folder as one unit (see the module docstring for the guarantees).

    Parameters
    ----------
    report : Report
    out : str or path
        The folder; created, or replaced if it holds a report (of any run) and nothing else.
    state : mapping of str to tensor, optional
        The model's state_dict, for the "Expected size" table of report.md (omitted without it).
    formats : sequence of {"png", "svg", "pdf"}, default ("png",)
        Figure formats; report.md embeds the PNGs, or links the first format when there is no PNG.
    per_layer : bool, optional
        Also draw one trade-off figure per layer; by default only up to
        :data:`~lr2vq_analysis.plots.MAX_LAYER_PANELS` layers (see :func:`~lr2vq_analysis.plots.save_report_figures`).
    progress : bool, default False
        Show a progress bar over the figures.
    command : str, optional
        The command line quoted in report.md's header.
    wording : mapping of str to str, optional
        Replacements applied to report.md's text (e.g. ``{"keep_first_conv=True": "--keep-first-conv"}``
        when the folder is written by the command line).

    Returns
    -------
    ReportFolder

    Raises
    ------
    ReportFileError
        If ``out`` is a file or a folder holding other files, or a file cannot be written.
    """
    from .plots import save_report_figures

    out = check_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = make_temp_dir(out)
    try:
        write_atomic(staging / _MARKER, b"written by lr2vq_analysis.report_folder\n")
        report.save(staging / "report.json")
        write_atomic(staging / "report.csv", _encode(report.to_frame().to_csv(index=False)))
        write_atomic(staging / "curves.csv", _encode(report.curves_frame().to_csv(index=False)))
        figures = save_report_figures(
            report, staging / FIGURE_DIR, list(formats), per_layer=per_layer, progress=progress
        )
        sizes = expected_sizes(report, state) if state is not None else []
        write_markdown_report(report, staging, sizes=sizes, figures=figures, command=command, wording=wording)
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    moved = {key: [out / path.relative_to(staging) for path in paths] for key, paths in figures.items()}
    files = {name: out / name for name in ("report.json", "report.csv", "curves.csv", "report.md")}
    return ReportFolder(out, files, moved, sizes)


# --------------------------------------------------------------------------------------------------
# report.md
# --------------------------------------------------------------------------------------------------


def _markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame as a GitHub-flavoured Markdown table (no extra dependency)."""
    header = "| " + " | ".join(_cell(column) for column in frame.columns) + " |"
    rule = "|" + "|".join("---:" if frame[column].dtype.kind in "iuf" else "---" for column in frame.columns) + "|"
    rows = ["| " + " | ".join(_cell(value) for value in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return " ".join(str(value).split()).replace("|", "\\|")


def _link_text(text: str) -> str:
    return _cell(text).replace("[", "\\[").replace("]", "\\]")


def _link(path: Path, start: Path) -> str:
    """Markdown link target of ``path`` relative to the folder of the Markdown file."""
    return Path(os.path.relpath(path, start)).as_posix()


def _shown_figure(paths: Sequence[Path]) -> Path | None:
    """The PNG of a figure, else its first file (e.g. a PDF when only PDF was asked for)."""
    return next((path for path in paths if path.suffix == ".png"), paths[0] if paths else None)


def _k_sentence(report: Report) -> str:
    capped = [layer for layer in report.layers if layer.k < report.k]
    if not capped:
        return f"k = {report.k} on every layer"
    listed = ", ".join(f"`{_cell(layer.name)}` → {layer.k}" for layer in capped[:12])
    more = f" and {len(capped) - 12} more (column k)" if len(capped) > 12 else ""
    return (
        f"k = {report.k}, capped at a quarter of a layer's subvectors (as PQF does) on {len(capped)} "
        f"layer(s): {listed}{more}"
    )


def write_markdown_report(
    report: Report,
    out_dir: Path,
    *,
    sizes: Sequence[tuple[str, SizeReport]] = (),
    figures: Mapping[str, Sequence[Path]] | None = None,
    command: str | None = None,
    wording: Mapping[str, str] | None = None,
) -> Path:
    """Write ``report.md``: settings, global d̃, expected sizes, the layer table, figures and skipped layers.

    Parameters
    ----------
    report : Report
    out_dir : pathlib.Path
        Folder of ``report.md``; figure links are written relative to it.
    sizes : sequence of (str, SizeReport), optional
        Rows of the "Expected size" table (:func:`expected_sizes`).
    figures : mapping of str to list of Path, optional
        What :func:`~lr2vq_analysis.plots.save_report_figures` returned; PNGs are embedded, other
        formats linked.
    command : str, optional
        The command line that produced the report, quoted in the header.
    wording : mapping of str to str, optional
        Text replacements (see :func:`write_report_folder`).

    Returns
    -------
    pathlib.Path
        The file written (atomically).
    """
    import pandas as pd

    from . import __version__
    from .tradeoff import prediction_note

    figures = dict(figures or {})
    lines = [f"# LR²VQ analysis of `{_cell(report.source)}`", ""]
    lines.append(
        f"{_k_sentence(report)}; m = {report.m}, ρ = {report.rho:.3g}; {len(report.layers)} layers analysed, "
        f"{len(report.skipped)} skipped. Written by lr2vq_analysis {__version__}"
        + (f" (`{_cell(command)}`)." if command else ".")
    )
    if report.coverage is not None:
        lines += ["", f"Coverage: {report.coverage.summary()}."]
    lines += [
        "",
        f"**Global d̃ = {report.global_d_tilde}** ({prediction_note(report)}).",
        "",
        "Errors are fractions of each layer's ‖W‖²; total = ρ·low-rank + clustering, where ρ is the share of "
        "the low-rank error that fine-tuning does not recover; the ρ-model's d̃ is the minimum of the total.",
    ]
    if sizes:
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
        "Errors at each layer's predicted d̃; k: the layer's k after the cap; knee: the number of components "
        "that reverse water-filling gives bits at this k; near-best d̃: the rule's d̃ and every d̃ whose predicted "
        f"total is within {report.layers[0].model.tolerance:.0%} of the rule's minimum; flat: d̃ = m is among them "
        "(d̃ barely matters, PQ is as good); bits/weight: codes, codebook and projection.",
        "",
    ]
    columns = ["name", "kind", "shape", "k", "knee", "d_tilde", "d_tilde_range", "flat", "lowrank_error"]
    columns += ["clustering_error", "total_error"]
    frame = report.to_frame()[[*columns, "bits_per_weight"]].rename(
        columns={
            "d_tilde": "d̃",
            "d_tilde_range": "near-best d̃",
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
            shown = _shown_figure(figures.get(key, ()))
            if shown is not None:
                target = _link(shown, out_dir)
                lines += [f"![{caption}]({target})" if shown.suffix == ".png" else f"{caption}: [{target}]({target})"]
                lines.append("")
        per_layer = [(layer.name, _shown_figure(figures.get(layer.name, ()))) for layer in report.layers]
        links = [f"[{_link_text(name)}]({_link(path, out_dir)})" for name, path in per_layer if path is not None]
        if links:
            lines += ["One figure per layer: " + ", ".join(links) + "."]
    if report.skipped:
        lines += ["", "## Skipped layers", ""]
        skipped = pd.DataFrame({"layer": list(report.skipped), "reason": list(report.skipped.values())})
        lines.append(_markdown_table(skipped))
    text = "\n".join(lines) + "\n"
    for old, new in (wording or {}).items():
        text = text.replace(old, new)
    path = out_dir / "report.md"
    write_atomic(path, _encode(text))
    return path


# --------------------------------------------------------------------------------------------------
# Plans
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
    ReportFileError
        If the file is missing, not JSON, or neither a report nor a plan.
    InvalidParameterError
        If a plan entry is invalid (the message names the layer and the field).

    Examples
    --------
    >>> import json, tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "plan.json"
    >>> _ = path.write_text(json.dumps({"fc.weight": {"k": 16, "m": 4, "d_tilde": 2}}))
    >>> read_plan(path)["fc.weight"].d_tilde
    2
    """
    from ._validation import check_param
    from .plan import LayerPlan
    from .report import Report

    which = check_param("which", which)
    path = Path(path)
    if path.suffix == ".npz":
        return Report.load(path).plan(which)
    if not path.is_file():
        raise ReportFileError(f"plan file {str(path)!r} does not exist; give a report.json or a plan JSON file")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ReportFileError(f"plan file {str(path)!r} is not valid JSON ({exc}); give a report.json") from None
    if isinstance(data, dict) and "layers" in data and "format_version" in data:
        return Report.load(path).plan(which)
    if isinstance(data, dict) and str(data.get("format", "")).startswith("lr2vq-plan"):
        from .planner import Plan

        return Plan.from_dict(data).layer_plans()  # plan.json from 'lr2vq plan'
    if not isinstance(data, dict) or not data:
        raise ReportFileError(
            f"plan file {str(path)!r} is neither a report from 'lr2vq analyze' nor a JSON object "
            '{"layer.weight": {"k": 256, "m": 9, "d_tilde": 4}, ...}'
        )
    plans = {}
    for name, entry in data.items():
        if not isinstance(entry, dict):
            raise InvalidParameterError(
                f"plan entry {name!r} is {type(entry).__name__}, not an object like {{'k': 256, 'm': 9, 'd_tilde': 4}}"
            )
        try:
            plans[str(name)] = LayerPlan.from_dict(entry)
        except InvalidParameterError as exc:
            raise InvalidParameterError(f"plan entry {name!r}: {exc}") from None
        except (TypeError, ValueError, KeyError) as exc:
            raise InvalidParameterError(
                f"plan entry {name!r} is invalid ({type(exc).__name__}: {exc}); "
                "each entry needs integers k, m and optionally d_tilde"
            ) from None
    return plans
