"""Whole-model analysis: layer selection, global d̃, plan, save/load round trips, bad input."""

import math

import numpy as np
import pytest
import torch

from lr2vq_analysis._validation import InvalidParameterError, InvalidWeightsError
from lr2vq_analysis.exceptions import ReportFileError
from lr2vq_analysis.plan import LayerPlan
from lr2vq_analysis.report import ModelPrediction, Report, analyze, predict_d_tilde
from lr2vq_analysis.tradeoff import fit_tradeoff


def make_state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Decaying per-coordinate scale gives the 3×3 kernels a non-flat spectrum, like real convs.
    scale = np.linspace(1.0, 0.2, 9).reshape(3, 3)
    return {
        "stem.weight": rng.normal(size=(8, 1, 3, 3)),
        "block1.weight": rng.normal(size=(32, 8, 3, 3)) * scale,
        "block1.bias": rng.normal(size=32),
        "odd.weight": rng.normal(size=(16, 5, 2, 2)),  # row length 20: m=9 does not divide it
        "block2.weight": rng.normal(size=(48, 32, 3, 3)) * scale,
        "head.weight": rng.normal(size=(10, 36)),
    }


@pytest.fixture(scope="module")
def report() -> Report:
    return analyze(make_state(), k=16, m=9, progress=False)


def test_layers_in_model_order_and_skips_reported(report):
    assert [layer.name for layer in report.layers] == ["block1.weight", "block2.weight", "head.weight"]
    assert report.skipped["stem.weight"].startswith("input stem (reads 1 channel)")
    assert "20" in report.skipped["odd.weight"] and "9" in report.skipped["odd.weight"]
    assert "block1.bias" not in report.skipped  # 1-D tensors are not layers


def test_pqf_cap_on_small_layers(report):
    # head: 10 rows × 4 subvectors = 40 subvectors → cap 40/4 = 10 → 8.
    assert report["head.weight"].k == 8
    assert report["block2.weight"].k == 16


def test_global_d_tilde_is_argmin_of_size_weighted_total(report):
    d = np.arange(1, 10)
    sizes = {"block1.weight": 32 * 8 * 9, "block2.weight": 48 * 32 * 9, "head.weight": 360}
    weighted = sum(sizes[layer.name] * np.asarray(layer.model.total(d)) for layer in report.layers)
    assert report.global_d_tilde == int(np.argmin(weighted)) + 1
    np.testing.assert_allclose(report.total_curve, weighted / sum(sizes.values()))


def test_layer_d_tilde_is_argmin_of_its_total(report):
    for layer in report.layers:
        total = layer.rho * layer.lowrank_curve + layer.clustering_curve
        np.testing.assert_allclose(layer.total_curve, total)
        assert layer.model.predict("rho") == int(np.argmin(total)) + 1
        assert layer.d_tilde == 4  # the default rule without calibration data: ⌊m/2⌋


def test_plan_and_bits_per_weight_hand_computed(report):
    plan = report.plan()
    assert set(plan) == {"block1.weight", "block2.weight", "head.weight"}
    layer = report["block1.weight"]
    assert plan["block1.weight"] == LayerPlan(16, 9, layer.d_tilde)
    d = layer.d_tilde
    n_sub = 32 * 8
    bits = n_sub * math.log2(16) + 16 * d * 16 + (d * 9 * 16 if d < 9 else 0)
    assert layer.bits_per_weight() == pytest.approx(bits / (32 * 8 * 9))
    global_plan = report.plan("global")
    assert {p.d_tilde for p in global_plan.values()} == {report.global_d_tilde}
    with pytest.raises(InvalidParameterError, match="which"):
        report.plan("best")


def test_frame_has_one_row_per_layer(report):
    frame = report.to_frame()
    assert list(frame["name"]) == [layer.name for layer in report.layers]
    assert {"d_tilde", "knee", "k", "m", "bits_per_weight", "total_error"} <= set(frame.columns)
    curves = report.curves_frame()
    assert len(curves) == 3 * 9


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_save_load_round_trips_exactly(report, tmp_path, suffix):
    path = report.save(tmp_path / f"report{suffix}")
    loaded = Report.load(path)
    assert loaded.to_dict() == report.to_dict()
    for a, b in zip(loaded.layers, report.layers, strict=True):
        np.testing.assert_array_equal(a.clustering_curve, b.clustering_curve)
        np.testing.assert_array_equal(a.lowrank_curve, b.lowrank_curve)
        assert a.d_tilde == b.d_tilde
    assert loaded.global_d_tilde == report.global_d_tilde
    assert [p.name for p in tmp_path.iterdir()] == [f"report{suffix}"]  # no temporary file left behind


def test_save_and_load_errors(report, tmp_path):
    with pytest.raises(InvalidParameterError, match=r"\.json, \.npz"):
        report.save(tmp_path / "report.txt")
    assert not list(tmp_path.iterdir())
    with pytest.raises(ReportFileError, match="does not exist"):
        Report.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format_version": 1, "layers": [')
    with pytest.raises(ReportFileError, match="not valid JSON"):
        Report.load(bad)


def test_with_rho_moves_d_tilde_monotonically(report):
    d_low = [layer.d_tilde for layer in report.with_rho(0.2).layers]
    d_high = [layer.d_tilde for layer in report.with_rho(1.0).layers]
    assert all(lo <= hi for lo, hi in zip(d_low, d_high, strict=True))
    # Curves are kept, not refitted.
    np.testing.assert_array_equal(report.with_rho(0.2).layers[0].clustering_curve, report.layers[0].clustering_curve)


def test_parallel_analysis_equals_serial():
    serial = analyze(make_state(), k=16, m=9, progress=False, n_jobs=1)
    parallel = analyze(make_state(), k=16, m=9, progress=False, n_jobs=2)
    assert serial.to_dict() == parallel.to_dict()


def test_predict_d_tilde_for_a_layer_and_a_model():
    state = make_state()
    w = state["block2.weight"]
    d = predict_d_tilde(w, k=16, m=9, seed=3)
    assert isinstance(d, int)
    assert d == fit_tradeoff(w, 16, 9, seed=3).d_tilde_
    assert predict_d_tilde(torch.from_numpy(w), k=16, m=9, seed=3) == d
    prediction = predict_d_tilde(state, k=16, m=9)
    assert isinstance(prediction, ModelPrediction)
    assert list(prediction) == ["block1.weight", "block2.weight", "head.weight"]
    assert 1 <= prediction.global_d_tilde <= 9


def test_bad_input():
    state = make_state()
    with pytest.raises(InvalidParameterError, match="k must be an integer >= 2"):
        analyze(state, k=1, m=9, progress=False)
    with pytest.raises(InvalidParameterError, match="rho"):
        analyze(state, k=16, m=9, rho=1.5, progress=False)
    with pytest.raises(InvalidParameterError, match="n_jobs"):
        analyze(state, k=16, m=9, n_jobs=0, progress=False)
    with pytest.raises(InvalidParameterError, match=r"layer 'block1.weight'.*k=4096"):
        analyze(state, k=4096, m=9, cap_k=False, progress=False)
    with pytest.raises(InvalidWeightsError):
        analyze({"norm.weight": np.ones(4)}, k=16, m=9, progress=False)
    with pytest.raises(InvalidWeightsError, match="m=7"):
        analyze(state, k=16, m=7, progress=False)  # no layer has a row length divisible by 7


def test_coverage_by_hand_and_round_trip(report, tmp_path):
    # make_state by hand: block1 32·8·9 = 2304, block2 48·32·9 = 13824, head 10·36 = 360 analysed;
    # stem 8·9 = 72, odd 16·5·4 = 320 (row length 20), block1.bias 32.
    coverage = report.coverage
    assert coverage.analysed == 16488 == sum(layer.n_weights for layer in report.layers)
    assert coverage.by_reason == {
        "input stem": 72,
        "m does not divide the row length": 320,
        "biases and norms (rank 0-1)": 32,
    }
    assert coverage.total == sum(v.size for v in make_state().values())
    assert report.to_frame().attrs["coverage"] == coverage.to_dict()
    for suffix in (".json", ".npz"):
        assert Report.load(report.save(tmp_path / f"r{suffix}")).coverage == coverage
    assert report.with_rho(0.5).coverage == coverage


def test_layers_too_small_to_cluster_move_to_their_reason():
    state = {**make_state(), "tiny.weight": np.ones((4, 9))}  # 4 subvectors of size 9
    report = analyze(state, k=16, m=9, progress=False)
    assert "too few" in report.skipped["tiny.weight"]
    assert report.coverage.by_reason["too few subvectors"] == 36
    assert report.coverage.analysed == 16488


def test_analysis_streams_layers_from_a_file(tmp_path, layer_reads):
    from safetensors.torch import save_file

    state = {key: torch.as_tensor(value, dtype=torch.bfloat16) for key, value in make_state().items()}
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    streamed = analyze(path, k=16, m=9, progress=False)
    assert layer_reads.most_alive == 1  # never two layers in memory at once
    assert layer_reads.reads == {"block1.weight": 2, "block2.weight": 2, "head.weight": 2}  # checked, analysed
    assert {layer.source_dtype for layer in streamed.layers} == {"bfloat16"}
    in_memory = analyze({k: v.float() for k, v in state.items()}, k=16, m=9, progress=False)
    assert [layer.d_tilde for layer in streamed.layers] == [layer.d_tilde for layer in in_memory.layers]
