"""Figures: the expected artists from real analyze() output, checked against brute-force references."""

import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer
from PIL import Image

from lr2vq_analysis._validation import InvalidParameterError
from lr2vq_analysis.exceptions import ReportFileError
from lr2vq_analysis.experimental.plots import (
    SWEEP_COLUMNS,
    load_sweep_results,
    plot_accuracy_vs_d_tilde,
    plot_size_frontier,
)
from lr2vq_analysis.plan import LayerPlan
from lr2vq_analysis.plots import (
    COLORS,
    figure_file_stem,
    flat_band,
    layer_group,
    plot_overview,
    plot_size_breakdown,
    plot_spectra,
    plot_style,
    plot_tradeoff,
    plot_tradeoff_grid,
    save_figure,
    save_report_figures,
)
from lr2vq_analysis.report import analyze
from lr2vq_analysis.size import size_report

M = 9
K = 16


def make_state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    scale = np.linspace(1.0, 0.15, 9).reshape(3, 3)  # decaying spectrum, like real 3×3 kernels
    return {
        "stem.weight": rng.normal(size=(8, 1, 3, 3)).astype(np.float32),
        "block1.weight": (rng.normal(size=(32, 8, 3, 3)) * scale).astype(np.float32),
        "block1.bias": rng.normal(size=32).astype(np.float32),
        "block2.weight": (rng.normal(size=(32, 16, 3, 3)) * scale).astype(np.float32),
        "head.weight": rng.normal(size=(10, 72)).astype(np.float32),
    }


@pytest.fixture(scope="module")
def report():
    return analyze(make_state(), k=K, m=M, progress=False, measure_full_curve=True)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def brute_force_lowrank(weight: np.ndarray, m: int) -> np.ndarray:
    """Relative error of the best rank-d approximation of the subvectors, d = 1..m, by SVD."""
    x = weight.reshape(weight.shape[0], -1).reshape(-1, m).astype(np.float64)
    singular = np.linalg.svd(x, compute_uv=False)
    energy = (x**2).sum()
    return np.array([(singular[d:] ** 2).sum() / energy for d in range(1, m + 1)])


def line_by_label(ax, label):
    lines = [line for line in ax.get_lines() if line.get_label().startswith(label)]
    assert lines, f"no line labelled {label!r}; labels: {[line.get_label() for line in ax.get_lines()]}"
    return lines[0]


def test_tradeoff_plot_draws_curves_probes_total_and_prediction(report):
    layer = report["block2.weight"]
    fig = plot_tradeoff(layer)
    ax = fig.axes[0]
    d = np.arange(1, M + 1)
    lowrank = line_by_label(ax, "low-rank error")
    np.testing.assert_array_equal(lowrank.get_xdata(), d)
    np.testing.assert_allclose(lowrank.get_ydata(), brute_force_lowrank(make_state()["block2.weight"], M), atol=1e-6)
    drawn = {}
    for line in ax.get_lines():  # probes on all subvectors and on subsamples, each with its own marker
        if line.get_label().startswith(("k-means probe on all", "probe on subsample")):
            drawn.update(zip(line.get_xdata(), line.get_ydata(), strict=True))
    assert drawn == pytest.approx(layer.probes)
    measured = line_by_label(ax, "clustering error (k-means")
    np.testing.assert_allclose(measured.get_ydata(), layer.measured_curve)
    total = line_by_label(ax, "total")
    star = line_by_label(ax, "predicted")
    assert star.get_xdata()[0] == int(np.argmin(total.get_ydata())) + 1 == layer.d_tilde
    title = ax.get_title(loc="left")
    assert "block2.weight" in title and f"k = {layer.k}" in title and f"m = {M}" in title
    assert "W" in ax.get_ylabel() and "fraction" in ax.get_ylabel()
    assert f"ρ = {layer.rho:.3g}" in title
    legend_texts = [text.get_text() for text in ax.get_legend().get_texts()]
    assert any(text.startswith("total = 0.") for text in legend_texts)
    assert ax.get_ylim()[0] == 0.0


def test_tradeoff_plot_accepts_a_tradeoff_model_an_axes_and_a_measured_curve(report):
    model = report["block1.weight"].model
    fig, ax = plt.subplots()
    measured = np.linspace(0.01, 0.3, M)
    returned = plot_tradeoff(model, ax=ax, measured=measured)
    assert returned is fig
    np.testing.assert_allclose(line_by_label(ax, "clustering error (k-means").get_ydata(), measured)


def test_tradeoff_plot_rejects_bad_input(report):
    with pytest.raises(InvalidParameterError, match="LayerReport"):
        plot_tradeoff("block1.weight")
    with pytest.raises(InvalidParameterError, match="one value per d"):
        plot_tradeoff(report.layers[0], measured=[0.1, 0.2])
    with pytest.raises(InvalidParameterError, match="Axes"):
        plot_tradeoff(report.layers[0], ax="not an axes")


def test_every_line_uses_the_colour_blind_safe_palette(report):
    ax = plot_tradeoff(report.layers[0]).axes[0]
    palette = {value.lower() for value in COLORS.values()}
    for line in ax.get_lines():
        assert matplotlib.colors.to_hex(line.get_color()) in palette
    with plot_style():
        assert not plt.rcParams["axes.spines.top"] and not plt.rcParams["axes.spines.right"]


def test_plot_style_restores_only_its_own_settings():
    # Jupyter's inline backend turns interactive mode on when the first figure is drawn (inside a plot
    # function); restoring it on exit would stop every later figure from showing inline.
    interactive, font_size = matplotlib.is_interactive(), plt.rcParams["font.size"]
    with plot_style():
        matplotlib.interactive(not interactive)
        assert plt.rcParams["font.size"] == 9
    assert matplotlib.is_interactive() is (not interactive)
    assert plt.rcParams["font.size"] == font_size
    matplotlib.interactive(interactive)


def test_grid_has_one_panel_per_layer_and_one_legend(report):
    fig = plot_tradeoff_grid(report, ncols=2)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == len(report.layers)
    for ax, layer in zip(visible, report.layers, strict=True):
        assert layer.name.removesuffix(".weight") in ax.get_title(loc="left")
        assert f"= {layer.d_tilde}," in ax.get_title(loc="left")
    assert len(fig.legends) == 1


def test_overview_marks_each_layer_in_model_order_and_the_global_d_tilde(report):
    ax = plot_overview(report).axes[0]
    names = [tick.get_text() for tick in ax.get_yticklabels()]
    assert names == [layer.name.removesuffix(".weight") for layer in report.layers]
    predicted = line_by_label(ax, "predicted")
    assert list(predicted.get_xdata()) == [layer.d_tilde for layer in report.layers]
    knee = line_by_label(ax, "knee")
    assert list(knee.get_xdata()) == [layer.knee for layer in report.layers]
    global_line = line_by_label(ax, "global")
    assert global_line.get_xdata()[0] == report.global_d_tilde
    assert f"m = {M}" in ax.get_title(loc="left")


def test_spectra_heatmap_shows_normalised_eigenvalues(report):
    fig = plot_spectra(report)
    image = fig.axes[0].get_images()[0]
    data = np.asarray(image.get_array())
    state = make_state()
    for row, layer in enumerate(report.layers):
        w = state[layer.name].astype(np.float64)
        x = w.reshape(-1, M)
        reference = np.sort(np.linalg.eigvalsh(x.T @ x))[::-1] / (w**2).sum()
        np.testing.assert_allclose(data[row], np.clip(reference, image.norm.vmin, None), rtol=1e-6)
        np.testing.assert_allclose(data[row].sum(), 1.0, rtol=1e-6)  # no eigenvalue here is below the floor
    assert image.norm.vmin == pytest.approx(data.min()) and image.norm.vmax == pytest.approx(data.max())
    assert "W" in fig.axes[-1].get_ylabel() + fig.axes[-1].get_xlabel()  # the colour bar says what colours mean
    with pytest.raises(InvalidParameterError, match="floor"):
        plot_spectra(report, floor=2.0)


def test_size_breakdown_bars_match_hand_computed_bits():
    state = {
        "conv1.weight": np.zeros((8, 1, 3, 3), np.float32),
        "conv2.weight": np.zeros((32, 8, 3, 3), np.float32),
        "conv2.bias": np.zeros(32, np.float32),
        "fc.weight": np.zeros((10, 8), np.float32),
        "embed.weight": np.zeros((1000, 32), np.float32),  # a huge uncompressed tensor: its bar is cut
    }
    sizes = size_report(state, {"conv2.weight": LayerPlan(k=16, m=9, d_tilde=4)})
    fig = plot_size_breakdown(sizes, min_share=0)
    ax = fig.axes[0]
    assert [tick.get_text() for tick in ax.get_yticklabels()] == ["conv1", "conv2", "fc", "embed"]
    kib = 8 * 1024
    codes, codebook, projection = 32 * 8 * 4, 16 * 4 * 16, 4 * 9 * 16  # 256 codes × 4 bits; fp16
    limit = 1.6 * (codes + codebook + projection + 32 * 32) / kib  # the axis ends past the largest compressed layer
    expected = {  # (label, module) → KiB; conv2's bias is fp32 in "uncompressed"
        ("codes", 1): codes / kib,
        ("codebooks", 1): codebook / kib,
        ("projections P", 1): projection / kib,
        ("uncompressed (fp32)", 0): 72 * 32 / kib,
        ("uncompressed (fp32)", 1): 32 * 32 / kib,
        ("uncompressed (fp32)", 2): 80 * 32 / kib,
        ("uncompressed (fp32)", 3): limit,
    }
    for container in ax.containers:
        for row, patch in enumerate(container.patches):
            assert patch.get_width() == pytest.approx(expected.get((container.get_label(), row), 0.0))
    assert [text.get_text() for text in ax.texts] == ["125 KiB, bar cut "]  # 32,000 fp32 values
    total = codes + codebook + projection + (72 + 32 + 80 + 32000) * 32
    ratio = (72 + 2304 + 32 + 80 + 32000) * 32 / total
    assert f"ratio {ratio:.1f}×" in fig.get_suptitle()
    assert fig.axes[1].containers[-1].patches[0].get_y() + fig.axes[1].containers[-1].patches[0].get_height() == (
        pytest.approx(total / kib)
    )


def sweep_frame() -> pd.DataFrame:
    rows = []
    for d in range(1, 10):
        for seed, offset in enumerate((-0.01, 0.01)):
            rows.append(("lr2vq", 16, 9, d, seed, 0.01 + 0.001 * d, 0.90 + 0.01 * d + offset, 4))
    for seed, value in enumerate((0.93, 0.95)):
        rows.append(("pq", 16, 9, 9, seed, 0.02, value, np.nan))
        rows.append(("uncompressed", np.nan, np.nan, np.nan, seed, 0.23, 0.99, np.nan))
    columns = [*SWEEP_COLUMNS, "accuracy", "predicted_d_tilde"]
    return pd.DataFrame(rows, columns=columns)


def test_accuracy_vs_d_tilde_aggregates_seeds_and_draws_references(tmp_path):
    path = tmp_path / "sweep.csv"
    sweep_frame().to_csv(path, index=False)
    fig = plot_accuracy_vs_d_tilde(path)
    ax = fig.axes[0]
    [container] = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    line = container.lines[0]
    np.testing.assert_array_equal(line.get_xdata(), np.arange(1, 10))
    np.testing.assert_allclose(line.get_ydata(), 0.90 + 0.01 * np.arange(1, 10))
    segments = container.lines[2][0].get_segments()
    half_widths = [(seg[1][1] - seg[0][1]) / 2 for seg in segments]
    np.testing.assert_allclose(half_widths, np.std([-0.01, 0.01], ddof=1))  # sd over the two seeds
    pq = line_by_label(ax, "PQ")
    assert pq.get_ydata()[0] == pytest.approx(0.94)
    assert "0.02 MiB" in pq.get_label()
    assert line_by_label(ax, "uncompressed").get_ydata()[0] == pytest.approx(0.99)
    assert line_by_label(ax, "predicted").get_xdata()[0] == 4  # from the predicted_d_tilde column
    assert "2 seeds" in ax.get_ylabel()


def test_sweep_plots_reject_bad_tables():
    frame = sweep_frame()
    with pytest.raises(InvalidParameterError, match="megabytes"):
        plot_accuracy_vs_d_tilde(frame.drop(columns="megabytes"))
    with pytest.raises(InvalidParameterError, match="cosine"):
        plot_size_frontier(frame, metric="cosine")
    with pytest.raises(InvalidParameterError, match="varies d_tilde"):
        plot_accuracy_vs_d_tilde(frame[frame["method"] == "pq"])
    with pytest.raises(InvalidParameterError, match="empty"):
        load_sweep_results(frame.iloc[:0])
    with pytest.raises(ReportFileError):
        load_sweep_results("/nonexistent/sweep.csv")


def test_size_frontier_joins_the_pareto_optimal_configurations():
    rows = [  # (size, accuracy): (1, .90) and (3, .95) are optimal; (2, .85) is beaten by a smaller one
        ("lr2vq", 16, 9, 2, 0, 1.0, 0.90),
        ("lr2vq", 16, 9, 4, 0, 2.0, 0.85),
        ("lr2vq", 16, 9, 6, 0, 3.0, 0.95),
        ("pq", 16, 9, 9, 0, 2.5, 0.80),
    ]
    frame = pd.DataFrame(rows, columns=[*SWEEP_COLUMNS, "cosine"])
    fig = plot_size_frontier(frame, metric="cosine", predicted_d_tilde=4, log_x=True)
    ax = fig.axes[0]
    front = line_by_label(ax, "LR²VQ")
    np.testing.assert_array_equal(front.get_xdata(), [1.0, 3.0])
    np.testing.assert_array_equal(front.get_ydata(), [0.90, 0.95])
    star = line_by_label(ax, "predicted")
    assert (star.get_xdata()[0], star.get_ydata()[0]) == (2.0, 0.85)
    assert ax.get_xscale() == "log"
    assert "MiB" in ax.get_xlabel() and "cosine" in ax.get_ylabel()


def test_save_figure_writes_png_at_300_dpi_and_vector_formats(tmp_path):
    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [0, 1])
    paths = save_figure(fig, tmp_path / "sub" / "line.png", formats=("png", "svg", "pdf"))
    assert [p.name for p in paths] == ["line.png", "line.svg", "line.pdf"]
    with Image.open(paths[0]) as image:
        assert image.info["dpi"] == pytest.approx((300, 300), abs=0.5)
        assert image.size[0] > 400  # 2 inches at 300 dpi, less the tight bounding box
    assert b"<svg" in paths[1].read_bytes()[:500]
    assert paths[2].read_bytes().startswith(b"%PDF")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["line.pdf", "line.png", "line.svg"]  # no temp files
    with pytest.raises(InvalidParameterError, match="formats"):
        save_figure(fig, tmp_path / "x", formats=("jpg",))


def test_save_report_figures_writes_every_figure(report, tmp_path):
    written = save_report_figures(report, tmp_path)  # PNG only by default: vector formats when asked
    assert set(written) == {"overview", "spectra", "tradeoff_grid", *(layer.name for layer in report.layers)}
    for layer in report.layers:
        assert (tmp_path / f"{figure_file_stem(layer.name)}.png").is_file()
    assert figure_file_stem("a/b c.weight").startswith("tradeoff_a_b_c.weight_")
    assert plt.get_fignums() == []  # every figure was closed


def test_plots_import_and_draw_without_a_display(tmp_path):
    code = (
        "import matplotlib; from lr2vq_analysis.plots import save_figure; import matplotlib.pyplot as plt; "
        f"fig = plt.figure(); save_figure(fig, {str(tmp_path / 'f')!r}, ('png',)); print(matplotlib.get_backend())"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no DISPLAY, no MPLBACKEND
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().lower() == "agg"
    assert (tmp_path / "f.png").is_file()


# -- transformer scale -------------------------------------------------------------------------------


def transformer_state(blocks: int = 4) -> dict[str, np.ndarray]:
    """A fake encoder: 4 kinds of linear per block, in real model order (query, key, value, output)."""
    rng = np.random.default_rng(0)
    scale = np.linspace(1.0, 0.3, 8)
    return {
        f"encoder.layer.{b}.{kind}.weight": (rng.normal(size=(24, 64)).reshape(24, 8, 8) * scale).reshape(24, 64)
        for b in range(blocks)
        for kind in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
    }


@pytest.fixture(scope="module")
def big_report():
    return analyze(transformer_state(), k=8, m=8, progress=False)


def test_flat_band_matches_a_brute_force_scan():
    rng = np.random.default_rng(3)
    for _ in range(200):
        total = rng.uniform(0.1, 1.0, size=rng.integers(1, 12))
        tolerance = float(rng.choice([0.0, 0.02, 0.05, 0.2, 0.5]))
        inside = [d + 1 for d in range(total.size) if total[d] <= total.min() * (1 + tolerance) + 1e-12]
        assert flat_band(total, tolerance) == (min(inside), max(inside))
    with pytest.raises(InvalidParameterError, match="tolerance"):
        flat_band([1.0, 2.0], tolerance=-0.1)


def test_figure_band_uses_the_reports_tolerance():
    from lr2vq_analysis import plots
    from lr2vq_analysis.tradeoff import DEFAULT_TOLERANCE

    assert DEFAULT_TOLERANCE == 0.05
    total = [0.31, 0.183, 0.175, 0.1815, 0.23, 0.3]  # minimum 0.175 at d̃ = 3
    assert flat_band(total) == (2, 4)  # 5 %: ≤ 0.18375 holds at d̃ = 2, 3, 4
    assert flat_band(total, 0.02) == (3, 3)  # 2 % (the figures' old band): ≤ 0.1785 at d̃ = 3 only
    with pytest.warns(DeprecationWarning, match="DEFAULT_TOLERANCE"):
        assert plots.FLAT_TOLERANCE == DEFAULT_TOLERANCE


def shaded(ax):
    [band] = [patch for patch in ax.patches if patch.get_label().startswith("near-best")]
    return round(band.get_x() + 0.45, 6), round(band.get_x() + band.get_width() - 0.45, 6)


def test_tradeoff_plot_shades_the_reported_range_against_a_hand_computed_band(hand_model):
    ax = plot_tradeoff(hand_model("rho")).axes[0]
    assert shaded(ax) == (2, 4)  # within 5 % of the minimum 0.175: d̃ = 2, 3, 4
    assert "within 5% of the rule's minimum" in ax.patches[0].get_label()
    assert "rule `rho`" in ax.get_title(loc="left") and "near-best 2–4" in ax.get_title(loc="left")
    assert "barely matters" not in ax.get_title(loc="left")
    assert shaded(plot_tradeoff(hand_model("rho"), tolerance=0.02).axes[0]) == (3, 3)
    # ⌊m/2⌋ = 3 by rule; PQ's d̃ = 6 lies outside the 5 % set and widens the reported range to it.
    assert shaded(plot_tradeoff(hand_model("pq")).axes[0]) == (2, 6)
    flat = plot_tradeoff(hand_model("rho"), tolerance=0.75).axes[0]  # ≤ 0.30625: d̃ = 2..6, m included
    assert shaded(flat) == (2, 6) and "d̃ barely matters here" in flat.get_title(loc="left")


def test_tradeoff_plot_shows_the_same_range_as_the_report(report):
    for layer in report.layers:
        assert shaded(plot_tradeoff(layer).axes[0]) == layer.model.d_tilde_range_
        plt.close("all")


def test_tradeoff_plot_draws_output_space_curves_beside_the_weight_space_ones(hand_model):
    model = hand_model(output=True)  # calibrated: the default rule is the output-space crossing
    assert model.predictor == "crossing-output"
    fig = plot_tradeoff(model)
    weight_ax, output_ax = fig.axes
    np.testing.assert_allclose(line_by_label(output_ax, "low-rank").get_ydata(), [0.2, 0.08, 0.03, 0.01, 0.004, 0])
    np.testing.assert_allclose(line_by_label(output_ax, "clustering").get_ydata(), [0, 0.02, 0.05, 0.09, 0.12, 0.15])
    output_total = [0.1, 0.06, 0.065, 0.095, 0.122, 0.15]  # 0.5·low-rank + clustering, by hand
    np.testing.assert_allclose(line_by_label(output_ax, "total").get_ydata(), output_total)
    np.testing.assert_allclose(line_by_label(weight_ax, "low-rank").get_ydata(), [0.6, 0.3, 0.15, 0.06, 0.02, 0])
    # Crossing in the output: clustering 0.05 ≥ low-rank 0.03 first at d̃ = 3; its objective
    # max(low-rank, clustering) = [0.2, 0.08, 0.05, 0.09, 0.12, 0.15] is within 5 % of 0.05 at d̃ = 3 only.
    for ax in (weight_ax, output_ax):
        assert line_by_label(ax, "predicted").get_xdata()[0] == 3
        assert shaded(ax) == (3, 3)
    assert line_by_label(output_ax, "predicted").get_ydata()[0] == pytest.approx(0.065)
    assert "output" in output_ax.get_title(loc="left") and "Wx" in output_ax.get_ylabel()
    assert len(fig.legends) == 1
    assert len(plot_tradeoff(model, space="output").axes) == 1
    with pytest.raises(InvalidParameterError, match=r"hand\.weight.*output-space"):
        plot_tradeoff(hand_model(), space="output")
    with pytest.raises(InvalidParameterError, match="two panels"):
        plot_tradeoff(model, space="both", ax=weight_ax)
    with pytest.raises(InvalidParameterError, match="space="):
        plot_tradeoff(model, space="activations")


def test_layer_group_splits_block_and_kind():
    assert layer_group("encoder.layer.11.attention.self.query.weight") == ("encoder.layer.11", "attention.self.query")
    assert layer_group("features.3.weight") == ("features.3", "(weight)")
    assert layer_group("fc.weight") == ("", "fc")


def test_probes_on_subsamples_are_drawn_apart_and_say_their_sample_size():
    rng = np.random.default_rng(0)
    weight = rng.laplace(size=(256, 72))  # 2048 subvectors of 9, k = 16 → 128 per centroid > 16
    report = analyze({"fc.weight": weight}, k=16, m=9, progress=False)
    ax = plot_tradeoff(report["fc"]).axes[0]
    sub = line_by_label(ax, "probe on subsample")
    assert sub.get_label() == "probe on subsample (n = 256 of 2,048)"  # 16 per centroid × k = 16, of 256·72/9
    assert sub.get_marker() != "s"  # not the marker of a probe on all subvectors
    np.testing.assert_allclose(sorted(sub.get_xdata()), sorted(report["fc"].probes))
    assert not [line for line in ax.get_lines() if line.get_label().startswith("k-means probe on all")]
    estimates = line_by_label(ax, "its estimate")
    params = report["fc"].model.params_
    expected = {int(params[f"probe{i}_d_tilde"]): params[f"probe{i}_estimate"] for i in range(len(report["fc"].probes))}
    assert dict(zip(estimates.get_xdata(), estimates.get_ydata(), strict=True)) == pytest.approx(expected)


def test_grid_summarises_by_layer_kind_above_the_panel_limit(big_report):
    assert len(big_report) == 16 > 12
    fig = plot_tradeoff_grid(big_report)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    kinds = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"]
    assert [ax.get_title(loc="left").split("\n")[0] for ax in visible] == kinds  # model order, not alphabetical
    for ax, kind in zip(visible, kinds, strict=True):
        curves = [line for line in ax.get_lines() if line.get_label().startswith("encoder.layer.")]
        assert [line.get_label() for line in curves] == [f"encoder.layer.{b}" for b in range(4)]
        for b, line in enumerate(curves):
            np.testing.assert_allclose(line.get_ydata(), big_report[f"encoder.layer.{b}.{kind}"].total_curve)
        assert "k = 8, m = 8" in ax.get_title(loc="left")
    width, height = fig.get_size_inches() * fig.dpi
    assert width * height < 1.5e6  # a few panels, not 16
    paged = plot_tradeoff_grid(big_report, layers=list(big_report)[4:8])
    assert [ax.get_title(loc="left").split("\n")[0] for ax in paged.axes if ax.get_visible()] == [
        name.removesuffix(".weight") for name in list(big_report)[4:8]
    ]


def test_overview_groups_rows_by_block_in_model_order(big_report):
    ax = plot_overview(big_report).axes[0]
    labels = [tick.get_text() for tick in ax.get_yticklabels()]
    assert labels == [layer_group(name)[1] for name in big_report]
    blocks = [text.get_text() for text in ax.texts]
    assert blocks == [f"encoder.layer.{b}" for b in range(4)]
    bands = next(c for c in ax.collections if c.get_label().startswith("layer's"))
    expected = [layer.model.d_tilde_range_ for layer in big_report.values()]  # the report's ranges
    segments = bands.get_segments()
    assert [(round(seg[0][0] + 0.3), round(seg[1][0] - 0.3)) for seg in segments] == expected


def test_every_figure_uses_the_package_style_and_palette(report, big_report):
    palette = {value.lower() for value in COLORS.values()}
    for fig in (plot_tradeoff(report.layers[0]), plot_overview(big_report), plot_tradeoff_grid(report)):
        for ax in fig.axes:
            assert not ax.spines["top"].get_visible()
            for line in ax.get_lines():
                assert matplotlib.colors.to_hex(line.get_color()) in palette


def test_report_figures_skip_per_layer_files_above_the_limit(big_report, report, tmp_path):
    written = save_report_figures(big_report, tmp_path / "big")
    assert set(written) == {"overview", "spectra", "tradeoff_grid"}
    assert all(path.suffix == ".png" for paths in written.values() for path in paths)
    forced = save_report_figures(big_report, tmp_path / "forced", per_layer=True, formats=("png",))
    assert len(forced) == 3 + 16
    small = save_report_figures(report, tmp_path / "small")
    assert len(small) == 3 + len(report)
    with Image.open(written["tradeoff_grid"][0]) as image:
        assert image.size[0] * image.size[1] < 12e6  # not a 37-panel poster
