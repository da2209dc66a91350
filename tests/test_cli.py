"""The ``lr2vq`` command line: files written, exit codes, one-line errors, --help, the entry point."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.numpy import save_file

from lr2vq_analysis.cli import build_parser, main
from lr2vq_analysis.export import load_compressed
from lr2vq_analysis.models.digits import DigitsCNN
from lr2vq_analysis.plan import LayerPlan
from lr2vq_analysis.plots import figure_file_stem
from lr2vq_analysis.report import Report
from lr2vq_analysis.report_folder import read_plan
from lr2vq_analysis.skeleton import skeleton_from_state_dict
from lr2vq_analysis.weights import load_state_dict

LAYERS = ["features.3.weight", "features.6.weight", "classifier.weight"]


def make_state() -> dict[str, np.ndarray]:
    """A small CNN's state_dict whose natural key order (what a .safetensors file keeps) is the model order."""
    rng = np.random.default_rng(1)
    scale = np.linspace(1.0, 0.2, 9).reshape(3, 3)
    return {
        "classifier.weight": rng.normal(size=(10, 72)).astype(np.float32),
        "classifier.bias": np.zeros(10, np.float32),
        "features.0.weight": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),  # first conv: kept
        "features.1.weight": np.ones(8, np.float32),
        "features.1.bias": np.zeros(8, np.float32),
        "features.1.running_mean": rng.normal(size=8).astype(np.float32),
        "features.1.running_var": np.ones(8, np.float32),
        "features.1.num_batches_tracked": np.array(3, np.int64),
        "features.3.weight": (rng.normal(size=(16, 8, 3, 3)) * scale).astype(np.float32),
        "features.3.bias": rng.normal(size=16).astype(np.float32),
        "features.6.weight": (rng.normal(size=(32, 16, 3, 3)) * scale).astype(np.float32),
        "features.8.weight": rng.normal(size=(8, 20)).astype(np.float32),  # row length 20: m=9 does not divide it
    }


@pytest.fixture(scope="module")
def weight_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file(make_state(), str(path))
    return path


@pytest.fixture(scope="module")
def analyzed(weight_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    code = main(["analyze", str(weight_file), "--k", "16", "--m", "9", "--out", str(out), "--jobs", "2", "--quiet"])
    assert code == 0
    return out


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_analyze_writes_report_tables_figures_and_markdown(analyzed):
    report = Report.load(analyzed / "report.json")
    assert sorted(layer.name for layer in report.layers) == sorted(LAYERS)
    assert set(report.skipped) == {"features.0.weight", "features.8.weight"}
    table = pd.read_csv(analyzed / "report.csv")
    assert list(table["name"]) == [layer.name for layer in report.layers]
    assert list(table["d_tilde"]) == [layer.d_tilde for layer in report.layers]
    curves = pd.read_csv(analyzed / "curves.csv")
    assert len(curves) == 9 * len(report.layers)
    for stem in ["overview", "spectra", "tradeoff_grid", *(figure_file_stem(layer.name) for layer in report.layers)]:
        for suffix in (".png", ".svg"):
            assert (analyzed / "figures" / f"{stem}{suffix}").is_file(), stem + suffix
    markdown = (analyzed / "report.md").read_text()
    assert f"**Global d̃ = {report.global_d_tilde}**" in markdown
    for layer in report.layers:
        assert f"| {layer.name} |" in markdown
    assert "| features.8.weight |" in markdown and "not divisible" in markdown  # skipped, with the reason
    for target in re.findall(r"\]\(([^)]+\.png)\)", markdown):  # every embedded or linked figure exists
        assert (analyzed / target).is_file(), target
    assert "ratio" in markdown and "PQ (d̃ = m)" in markdown


def test_report_md_sizes_match_hand_computed_bits(analyzed):
    report = Report.load(analyzed / "report.json")
    state = make_state()
    plan = report.plan("layer")
    bits = 0.0
    for key, value in state.items():
        if key in plan:  # codes at log2 k bits, fp16 codebook k × d̃ and projection d̃ × m (none for PQ)
            p = plan[key]
            bits += (
                value.size // p.m * np.log2(p.k)
                + p.k * p.d_tilde * 16
                + (p.d_tilde * p.m * 16 if p.d_tilde < p.m else 0)
            )
        elif key.startswith("features.1."):
            continue  # the batch norm, counted below as two folded vectors
        else:
            bits += value.size * 32
    bits += 2 * 8 * 32
    markdown = (analyzed / "report.md").read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| LR²VQ, per-layer d̃ |"))
    assert float(row.split("|")[2]) == pytest.approx(bits / 8 / 2**20, rel=1e-3)
    uncompressed = sum(v.size for k, v in state.items() if not k.startswith("features.1.")) + 16
    assert f"Uncompressed: {uncompressed * 32 / 8 / 2**20:.4g} MiB" in markdown


def test_analyze_bundled_default_model(tmp_path, capsys):
    code, out, err = run(
        capsys, "analyze", "--k", "16", "--out", str(tmp_path), "--no-layer-figures", "--formats", "png"
    )
    assert code == 0, err
    assert "global d̃ =" in out
    assert Report.load(tmp_path / "report.json").source == "digits-cnn"
    assert (tmp_path / "report.md").is_file() and (tmp_path / "figures" / "overview.png").is_file()


def test_plot_redraws_from_a_saved_report_with_another_rho(analyzed, tmp_path, capsys):
    out = tmp_path / "rho"
    code, stdout, err = run(
        capsys, "plot", str(analyzed / "report.json"), "--out", str(out), "--rho", "0.3", "--formats", "png"
    )
    assert code == 0, err
    figures = out / "figures"
    assert (figures / "overview.png").is_file() and not (figures / "overview.svg").exists()
    expected = Report.load(analyzed / "report.json").with_rho(0.3).global_d_tilde
    assert f"global d̃ = {expected} (ρ = 0.3)" in stdout
    # the new folder is one consistent report: its json, its markdown and its figures all say ρ = 0.3
    assert Report.load(out / "report.json").rho == pytest.approx(0.3)
    assert (
        "ρ = 0.3;" in (out / "report.md").read_text()
        and f"**Global d̃ = {expected}**" in (out / "report.md").read_text()
    )


def test_plot_with_rho_never_rewrites_the_original_report(analyzed, capsys):
    before = {path: path.read_bytes() for path in analyzed.rglob("*") if path.is_file()}
    code, _, err = run(capsys, "plot", str(analyzed / "report.json"), "--rho", "0.25", "--formats", "png", "-q")
    assert code == 0, err
    sibling = analyzed.with_name(f"{analyzed.name}-rho0.25")
    try:
        assert Report.load(sibling / "report.json").rho == pytest.approx(0.25)
        assert {path: path.read_bytes() for path in analyzed.rglob("*") if path.is_file()} == before
    finally:
        shutil.rmtree(sibling)


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (["analyze", "/nonexistent/model.safetensors"], 1, "no such file"),
        (["analyze", "{weights}", "--m", "7"], 1, "--m 7"),  # no layer has a row length divisible by 7
        (["analyze", "{weights}", "--k", "1"], 2, "--k 1"),
        (["analyze", "{weights}", "--seed", str(2**70)], 2, "--seed 1180591620717411303424 is invalid"),
        (["analyze", "{weights}", "--jobs", str(10**6)], 2, "--jobs 1000000 is invalid"),
        (["analyze", "{weights}", "--out", "{weights}"], 1, "is a file"),
        (["compress", "{weights}", "--plan", "{badplan}"], 2, "plan entry"),
        (["compress", "{weights}", "--plan", "{nullplan}"], 2, "plan entry"),
        (["compress", "{weights}", "--plan", "{listplan}"], 1, "a JSON object"),
        (["plot", "{weights}"], 1, "report"),
        (["analyze", "{weights}", "--m", "0"], 2, "positive integer"),
        (["analyze", "{weights}", "--rho", "1.5"], 2, "outside (0, 1]"),
        (["analyze", "{corrupt}"], 1, "corrupt"),
        (["analyze", "not-a-bundled-model"], 1, "model name"),
        (["plot", "/nonexistent/report.json"], 1, "does not exist"),
        (["compress", "{weights}", "--plan", "{weights}"], 1, "not valid JSON"),
        (["compress", "{weights}", "--plan", "{plan}", "--steps", "5"], 2, "training data"),
        (["frobnicate"], 2, "invalid choice"),
        (["analyze", "--jobs", "0"], 2, "--jobs"),
    ],
)
def test_bad_input_gives_one_line_error_and_exit_status(argv, status, message, weight_file, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"features.6.weight": {"k": 16, "m": 9, "d_tilde": 3}}))
    plans = {"badplan": {"features.6.weight": {"k": "abc", "m": 9}}, "nullplan": {"features.6.weight": None}}
    for name, content in [*plans.items(), ("listplan", [1, 2])]:
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    files = {name: tmp_path / f"{name}.json" for name in ("badplan", "nullplan", "listplan")}
    argv = [a.format(weights=weight_file, corrupt=corrupt, plan=plan, **files) for a in argv]
    if argv[0] == "analyze" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    code, _, err = run(capsys, *argv)
    assert code == status, err
    assert message in err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("lr2vq"), err
    assert len(err) <= 201 and ("; " in err or "(see '" in err), err  # ends with what to do


@pytest.mark.parametrize("command", [[], ["analyze"], ["plot"], ["compress"], ["demo"]])
def test_help_of_every_subcommand(command, capsys):
    code, out, _ = run(capsys, *command, "--help")
    assert code == 0
    assert out.startswith(f"usage: lr2vq {' '.join(command)}".rstrip())
    if command:
        assert "--quiet" in out


def test_compress_a_weight_file_writes_a_reloadable_file(weight_file, tmp_path, capsys):
    plan = {"features.3.weight": LayerPlan(k=16, m=9, d_tilde=3), "features.6.weight": LayerPlan(k=16, m=9)}
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({name: entry.to_dict() for name, entry in plan.items()}))
    out = tmp_path / "tiny.lr2vq"
    code, stdout, err = run(capsys, "compress", str(weight_file), "--plan", str(plan_file), "--out", str(out))
    assert code == 0, err
    assert "no fine-tuning" in stdout
    state = load_state_dict(weight_file)
    cmodel = load_compressed(out, skeleton_from_state_dict(state, list(plan)))
    for name, layer in cmodel.compressed_layers().items():
        assert layer.plan == plan[name] and layer.state == "quantized"
        codes = layer.codes
        assert codes.numel() == state[name].numel() // 9 and int(codes.max()) < 16
        # a quantized weight is the codebook rows projected back: at most k distinct subvectors
        subvectors = layer.weight.detach().reshape(-1, 9)
        assert torch.unique(subvectors, dim=0).shape[0] <= 16
        error = ((subvectors - state[name].reshape(-1, 9)) ** 2).sum() / (state[name] ** 2).sum()
        assert error < 0.9  # a real approximation of the pretrained weight, not noise
    untouched = cmodel.module.get_submodule("classifier")
    torch.testing.assert_close(untouched.weight, state["classifier.weight"])


def test_read_plan_from_report_and_from_json(analyzed, tmp_path):
    report = Report.load(analyzed / "report.json")
    assert read_plan(analyzed / "report.json", "global") == report.plan("global")
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"features.6.weight": {"k": 16, "m": 9, "d_tilde": 2}}))
    assert read_plan(path) == {"features.6.weight": LayerPlan(16, 9, 2)}


def test_skeleton_has_the_state_dict_names_and_values():
    state = {key: torch.from_numpy(np.asarray(value)) for key, value in make_state().items()}
    skeleton = skeleton_from_state_dict(state, LAYERS)
    assert set(skeleton.state_dict()) == set(state)
    for key, value in skeleton.state_dict().items():
        torch.testing.assert_close(value, state[key])
    assert isinstance(skeleton.get_submodule("features.6"), torch.nn.Conv2d)
    assert skeleton.get_submodule("features.6").bias is None
    assert skeleton.get_submodule("features.3").bias is not None
    assert isinstance(skeleton.get_submodule("classifier"), torch.nn.Linear)
    assert isinstance(skeleton.get_submodule("features.1"), torch.nn.modules.batchnorm._BatchNorm)


def test_parser_defaults_match_the_documented_ones():
    args = build_parser().parse_args(["analyze"])
    assert (args.source, args.k, args.m, args.out, args.jobs, args.seed) == ("digits-cnn", 256, 9, "lr2vq-report", 1, 0)


def test_entry_point_runs_as_a_module(weight_file, tmp_path):
    out = tmp_path / "report"
    command = [
        "analyze",
        str(weight_file),
        "--k",
        "8",
        "--out",
        str(out),
        "-q",
        "--no-layer-figures",
        "--formats",
        "png",
    ]
    ok = subprocess.run(
        [sys.executable, "-m", "lr2vq_analysis", *command],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == ""  # --quiet
    assert (out / "report.md").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "lr2vq_analysis", "analyze", "--k", "many"], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("lr2vq analyze: error:")


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path, capsys):
    code, out, err = run(capsys, "demo", "--quick", "--steps", "1", "--out", str(tmp_path))
    assert code == 0, err
    assert re.search(r"accuracy before: \d+\.\d\d%   after: \d+\.\d\d%", out)
    for name in (
        "digits-cnn.lr2vq",
        "summary.json",
        "size.csv",
        "report.json",
        "figures/size.png",
        "figures/overview.png",
    ):
        assert (tmp_path / name).is_file(), name
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["accuracy"]["reloaded"] == summary["accuracy"]["finetuned"]


@pytest.mark.slow
def test_compress_the_bundled_model_with_fine_tuning(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"conv3.weight": {"k": 16, "m": 9, "d_tilde": 4}}))
    out = tmp_path / "small.lr2vq"
    code, stdout, err = run(
        capsys, "compress", "digits-cnn", "--plan", str(plan), "--steps", "1", "--out", str(out), "-q"
    )
    assert code == 0, err
    assert stdout == ""
    cmodel = load_compressed(out, DigitsCNN())
    assert list(cmodel.compressed_layers()) == ["conv3.weight"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["files"]["model"] == str(out)  # the summary follows the file to --out


def test_mnist1d_cnn_is_analysed_and_compressed_by_name(tmp_path, capsys):
    from lr2vq_analysis.registry import build_model, load_model

    out = tmp_path / "report"
    code, _, err = run(
        capsys, "analyze", "mnist1d-cnn", "--k", "16", "--m", "3", "--out", str(out), "-q", "--no-layer-figures"
    )
    assert code == 0, err
    report = Report.load(out / "report.json")
    assert [layer.name for layer in report.layers] == ["conv2.weight", "conv3.weight", "conv4.weight"]
    assert report.source == "mnist1d-cnn"
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"conv3.weight": {"k": 16, "m": 3, "d_tilde": 2}}))
    model_file = tmp_path / "mnist1d.lr2vq"
    code, _, err = run(capsys, "compress", "mnist1d-cnn", "--plan", str(plan), "--out", str(model_file), "-q")
    assert code == 0, err
    cmodel = load_compressed(model_file, build_model("mnist1d-cnn"))  # the real architecture, not a skeleton
    assert list(cmodel.compressed_layers()) == ["conv3.weight"]
    pretrained = load_model("mnist1d-cnn")
    torch.testing.assert_close(cmodel.module.conv2.weight, pretrained.conv2.weight)  # untouched layer
    assert torch.unique(cmodel.compressed_layers()["conv3.weight"].weight.detach().reshape(-1, 3), dim=0).shape[0] <= 16
