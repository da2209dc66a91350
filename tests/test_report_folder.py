"""Report folders are written as a unit, name figures without collisions, and the CLI around them is thin."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from lr2vq_analysis import report_folder
from lr2vq_analysis.cli import cli_wording, main
from lr2vq_analysis.exceptions import InvalidParameterError, ReportFileError
from lr2vq_analysis.plots import figure_file_stem
from lr2vq_analysis.report import Report, analyze
from lr2vq_analysis.report_folder import read_plan, write_report_folder

SURROGATE = "bad\udc80name.weight"


def _state(names, seed=0):
    rng = np.random.default_rng(seed)
    scale = np.linspace(1.0, 0.2, 9).reshape(3, 3)
    return {name: (rng.normal(size=(16, 8, 3, 3)) * scale).astype(np.float32) for name in names}


@pytest.fixture(scope="module")
def report() -> Report:
    names = ["a/b.weight", "a_b.weight", "a b.weight", "x" * 300 + ".weight", SURROGATE]
    return analyze(_state(names), k=8, m=9, keep_first_conv=True, progress=False)


def _folder_files(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


def test_distinct_layer_names_never_share_a_figure_file(report, tmp_path):
    names = [layer.name for layer in report.layers]
    stems = [figure_file_stem(name) for name in names]
    assert len(set(stems)) == len(names) == 5
    assert len({stem.lower() for stem in stems}) == 5  # also on case-insensitive file systems
    assert max(len(stem) for stem in stems) < 120  # a 300-character name gives a short file name
    folder = write_report_folder(report, tmp_path / "r", formats=["png"])
    pngs = [p for p in (tmp_path / "r" / "figures").iterdir() if re.fullmatch(r"tradeoff_.*_[0-9a-f]{8}\.png", p.name)]
    assert len(pngs) == 5  # one per layer, none overwritten
    markdown = (folder.path / "report.md").read_text()
    assert "\\udc80" in markdown  # the undecodable name, escaped rather than crashing the writer
    assert len(re.findall(r"\]\((figures/tradeoff_[^)]+_[0-9a-f]{8}\.png)\)", markdown)) == 5


def test_reused_out_keeps_no_stale_figure_of_another_run(report, tmp_path):
    out = tmp_path / "r"
    write_report_folder(report, out, formats=["png", "svg"])
    other = analyze(_state(["only.weight"], seed=3), k=8, m=9, keep_first_conv=True, progress=False)
    write_report_folder(other, out, formats=["png"])
    figures = {path.name for path in (out / "figures").iterdir()}
    assert figures == {
        "overview.png",
        "spectra.png",
        "tradeoff_grid.png",
        f"{figure_file_stem('only.weight')}.png",
    }
    assert [layer.name for layer in Report.load(out / "report.json").layers] == ["only.weight"]
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no temporary folder left


def test_pdf_only_fills_the_figure_section(report, tmp_path):
    folder = write_report_folder(report, tmp_path / "r", formats=["pdf"], per_layer=False)
    markdown = (folder.path / "report.md").read_text()
    assert "## Figures" in markdown
    targets = re.findall(r"\]\(([^)]+)\)", markdown)
    assert targets and all(target.endswith(".pdf") and (folder.path / target).is_file() for target in targets)


def test_interrupted_write_leaves_the_old_folder_whole(report, tmp_path, monkeypatch):
    out = tmp_path / "r"
    write_report_folder(report, out, formats=["png"], per_layer=False)
    before = {name: (out / name).read_bytes() for name in _folder_files(out)}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_folder, "write_markdown_report", interrupted)  # after json, csv and figures
    other = report.with_rho(0.2)
    with pytest.raises(KeyboardInterrupt):
        write_report_folder(other, out, formats=["png"], per_layer=False)
    assert {name: (out / name).read_bytes() for name in _folder_files(out)} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["r"]  # the temporary folder is gone


_KILLED_WRITER = """
import sys, time
from lr2vq_analysis import report_folder
from lr2vq_analysis.report import Report

def hang(*args, **kwargs):
    print("ready", flush=True)
    time.sleep(120)

report_folder.write_markdown_report = hang  # after json, csv and figures are in the temporary folder
report_folder.write_report_folder(Report.load(sys.argv[1]), sys.argv[2], formats=["png"], per_layer=False)
"""


def test_a_killed_writers_temporary_folder_is_removed_by_the_next_write(report, tmp_path):
    saved = report.save(tmp_path / "saved.json")
    out = tmp_path / "r"
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(saved), str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "ready"
    finally:
        process.kill()  # SIGKILL: no cleanup runs
        process.wait()
    stale = [path for path in tmp_path.iterdir() if path.name.startswith(f".r.{process.pid}-")]
    assert len(stale) == 1 and stale[0].is_dir() and (stale[0] / "report.json").is_file()
    assert not out.exists()
    # Look-alikes are never touched: a live process's folder (this one's), another destination's.
    live = tmp_path / f".r.{os.getpid()}-abcdefgh.tmp"
    other = tmp_path / f".other.{process.pid}-abcdefgh.tmp"
    for folder in (live, other):
        folder.mkdir()
    write_report_folder(report, out, formats=["png"], per_layer=False)
    assert not stale[0].exists() and live.is_dir() and other.is_dir()
    assert Report.load(out / "report.json") == report
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([live.name, other.name, "r", "saved.json"])


@pytest.mark.slow
def test_two_writers_at_once_never_mix_their_runs(report, tmp_path):
    out = tmp_path / "r"
    reports = [report.with_rho(rho) for rho in (0.2, 0.9)]
    errors = []

    def write(which):
        try:
            for _ in range(3):
                write_report_folder(reports[which], out, formats=["svg"], per_layer=False)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    saved = Report.load(out / "report.json")
    markdown = (out / "report.md").read_text()
    assert f"ρ = {saved.rho:.3g};" in markdown and f"**Global d̃ = {saved.global_d_tilde}**" in markdown
    assert sorted(path.name for path in tmp_path.iterdir()) == ["r"]


def test_a_folder_with_other_files_is_never_replaced(report, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ReportFileError, match="not a report"):
        write_report_folder(report, tmp_path, formats=["png"])
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"fc.weight": {"k": "abc", "m": 9}}, "plan entry 'fc.weight'"),
        ({"fc.weight": None}, "plan entry 'fc.weight' is NoneType"),
        ({"fc.weight": {"k": 16, "m": 9, "d_tilde": 12}}, "plan entry 'fc.weight'"),
        ({"fc.weight": {"k": 16}}, "plan entry"),
    ],
)
def test_bad_plan_entries_are_usage_errors_naming_the_layer(tmp_path, content, match):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(content))
    with pytest.raises(InvalidParameterError, match=re.escape(match)):
        read_plan(path)


@pytest.mark.parametrize("content", ["[1, 2]", "null", '"text"', "[" * 100_000])
def test_plan_files_that_are_not_plans_are_file_errors(tmp_path, content):
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(ReportFileError):
        read_plan(path)


def test_cli_wording_uses_flags():
    assert cli_wording("pass keep_first_conv=True to include it") == "pass --keep-first-conv to include it"
    assert cli_wording("n_jobs=0 is invalid; n_jobs must be -1") == "--jobs 0 is invalid; --jobs must be -1"


def test_ctrl_c_exits_130_with_one_line(monkeypatch, tmp_path, capsys):
    import lr2vq_analysis.report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lr2vq_analysis.report, "analyze", interrupted)
    assert main(["analyze", "--out", str(tmp_path / "r")]) == 130
    err = capsys.readouterr().err
    assert err == "lr2vq analyze: interrupted\n"
    assert not (tmp_path / "r").exists()


def test_ctrl_c_during_imports_exits_130(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def import_interrupted(name, *args, **kwargs):
        if name in ("report_folder", "lr2vq_analysis.report_folder"):
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "lr2vq_analysis.report_folder")
    monkeypatch.setattr(builtins, "__import__", import_interrupted)
    assert main(["analyze"]) == 130
    assert capsys.readouterr().err.count("\n") == 1


def test_unexpected_errors_are_one_line_too(monkeypatch, capsys):
    import lr2vq_analysis.report

    def broken(*args, **kwargs):
        raise TypeError("x" * 1000)

    monkeypatch.setattr(lr2vq_analysis.report, "analyze", broken)
    monkeypatch.delenv("LR2VQ_DEBUG", raising=False)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["analyze", "--out", "/tmp/lr2vq-test-never-written"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) <= 201 and err.strip().endswith("report it")


def test_cli_report_md_says_flags_and_caps_per_layer(tmp_path, capsys):
    state = {"features.0.weight": np.ones((8, 1, 3, 3), np.float32), **_state(["features.3.weight"])}
    from safetensors.numpy import save_file

    save_file(state, str(tmp_path / "m.safetensors"))
    out = tmp_path / "r"
    code = main(["analyze", str(tmp_path / "m.safetensors"), "--k", "64", "--out", str(out), "-q", "--formats", "png"])
    assert code == 0, capsys.readouterr().err
    markdown = (out / "report.md").read_text()
    assert "--keep-first-conv" in markdown and "keep_first_conv=True" not in markdown
    # 16·8·9 / 9 = 128 subvectors: PQF's cap gives k = 32 on this layer, said for the layer
    assert "`features.3.weight` → 32" in markdown


@pytest.mark.parametrize(
    "argv", [["--help"], ["--version"], ["analyze", "--k", "many"], ["plot", "/nonexistent/report.json"]]
)
def test_help_version_and_error_exits_do_not_import_torch(argv):
    code = (
        "import sys, contextlib, io\n"
        "from lr2vq_analysis.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        f"    status = main({argv!r})\n"
        "print(status, sorted(m for m in ('torch', 'matplotlib', 'pandas') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split(" ", 1)[1].strip() == "[]", out.stdout


def test_module_help_does_not_import_torch():
    code = (
        "import runpy, sys\n"
        "sys.argv = ['lr2vq', '--help']\n"
        "try:\n    runpy.run_module('lr2vq_analysis', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("NO-TORCH")


def test_report_md_and_html_show_each_layers_near_best_range_and_flat_flag(tmp_path, hand_model):
    from lr2vq_analysis.report import LayerReport

    for predictor, tolerance, d_tilde, near_best, flat in (
        ("rho", 0.05, 3, "2–4", False),  # within 5 % of 0.175: d̃ = 2, 3, 4
        ("pq", 0.05, 6, "2–6", False),  # the rule's d̃ = 6 widens the range; d̃ = 6 itself is not near-best
        ("rho", 0.75, 3, "2–6", True),  # ≤ 0.30625: d̃ = 2..6, m included: flat
    ):
        model = hand_model(predictor, tolerance=tolerance)  # total = [0.31, 0.183, 0.175, 0.1815, 0.23, 0.3]
        report = Report([LayerReport("hand.weight", "linear", (64, 48), model)], k=16, m=6, source="hand")
        markdown = report_folder.write_markdown_report(report, tmp_path).read_text()
        assert "| d̃ | near-best d̃ | flat |" in markdown
        row = next(line for line in markdown.splitlines() if line.startswith("| hand.weight"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[5:8] == [str(d_tilde), near_best, str(flat)]
        assert f"within {tolerance:.0%} of the rule's minimum" in markdown
        html = report._repr_html_()
        assert f"<td>{near_best}</td>" in html and ("flat: PQ" in html) == flat
        assert f"near-best {near_best}" in report.layers[0].model._repr_html_()
