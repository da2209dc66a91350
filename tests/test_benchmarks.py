"""The evidence scripts in benchmarks/: the quick sweep CI can afford, and the ρ calibration by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from lr2vq_analysis.registry import load_model
from lr2vq_analysis.size import size_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_figures
import bench_kmeans
import bench_kmeans_start
import bench_threads
import calibrate_rho
import sweep_frontier


@pytest.mark.usefixtures("one_thread")
def test_quick_digits_sweep_writes_every_result_file(tmp_path):
    sweep_frontier.main(["--task", "digits", "--quick", "--out-dir", str(tmp_path)])
    for suffix in ("_runs.csv", ".csv", "_summary.json", "_tables.md", "_frontier.png", "_frontier.svg"):
        assert (tmp_path / f"sweep_digits_quick{suffix}").is_file(), suffix
    selected = pd.read_csv(tmp_path / "sweep_digits_quick.csv")
    assert sorted(selected["method"]) == ["dkm", "lr2vq", "pq", "scalar", "uncompressed"]
    assert (selected["steps"] == 20).all()
    lr2vq = selected[selected["method"] == "lr2vq"]
    assert lr2vq["predicted_d_tilde"].between(1, 9).all()
    summary = json.loads((tmp_path / "sweep_digits_quick_summary.json").read_text())
    assert summary["metric"] == "accuracy" and len(summary["methods"]) == 5
    assert summary["configs"] == []  # one d̃ only: no accuracy-vs-d̃ curve to find a best d̃ on


def _summary(folder: Path, task: str, configs: list[dict]) -> None:
    (folder / f"sweep_{task}_summary.json").write_text(json.dumps({"task": task, "configs": configs}))


def test_calibrate_rho_counts_plateau_and_hits_by_hand(tmp_path):
    grid = ["0.50", "0.70", "0.90"]
    _summary(
        tmp_path,
        "digits",
        [
            {
                "k": 16,
                "m": 9,
                "best_d_tilde": 4,
                "plateau": [4, 5],
                "predicted_d_tilde_by_rho": dict(zip(grid, [2, 4, 9], strict=True)),
            },
            {
                "k": 32,
                "m": 9,
                "best_d_tilde": 6,
                "plateau": [6],
                "predicted_d_tilde_by_rho": dict(zip(grid, [2, 5, 6], strict=True)),
            },
        ],
    )
    _summary(
        tmp_path,
        "mnist1d",
        [
            {
                "k": 8,
                "m": 6,
                "best_d_tilde": 2,
                "plateau": [2],
                "predicted_d_tilde_by_rho": dict(zip(grid, [3, 3, 6], strict=True)),
            }
        ],
    )
    result = calibrate_rho.main(["--results", str(tmp_path)])
    scores = {row["rho"]: (row["in_plateau"], row["hits"]) for row in result["scores"]}
    # ρ = 0.5: 2, 2, 3 -> in plateau none; hits |2-4|=2 no, |2-6| no, |3-2|=1 yes
    # ρ = 0.7: 4, 5, 3 -> in plateau 4 only; hits 4 yes, |5-6| yes, 3 yes
    # ρ = 0.9: 9, 6, 6 -> in plateau 6 only; hits 9 no, 6 yes, |6-2| no
    assert scores == {0.5: (0, 1), 0.7: (1, 3), 0.9: (1, 1)}
    assert result["chosen_rho"] == 0.7
    assert result["plateau_consistent_rho"]["digits"]["per_setting"] == {"k=16,m=9": [0.7], "k=32,m=9": [0.9]}
    assert result["plateau_consistent_rho"]["digits"]["all_settings"] == []
    # baselines: d̃ = m gives 9, 9, 6 (no plateau, no hit); d̃ = m // 2 gives 4, 4, 3 (one plateau, hits 4 and 3)
    assert result["baselines"] == {
        "d~ = m (PQ)": {"in_plateau": 0, "hits": 0},
        "d~ = floor(m/2)": {"in_plateau": 1, "hits": 2},
    }
    assert (tmp_path / "rho_calibration.json").is_file() and (tmp_path / "rho_calibration.md").is_file()


def test_calibrate_rho_without_summaries_says_what_to_run(tmp_path):
    with pytest.raises(SystemExit, match="sweep_frontier"):
        calibrate_rho.main(["--results", str(tmp_path)])


def test_quick_figure_benchmark_times_analysis_and_figures(capsys):
    times = bench_figures.main(["--quick"])  # correctness only: no timing is asserted
    assert set(times) == {"analysis", "figures_png", "figures_png_svg"}
    out = capsys.readouterr().out
    assert "15 layers" in out and "figures_png: 3 files" in out and "figures_png_svg: 6 files" in out


def test_quick_analysis_scaling_measures_every_case_and_cleans_up(tmp_path, monkeypatch):
    import tempfile

    import bench_analyze_speed

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    output = tmp_path / "scaling.csv"
    assert bench_analyze_speed.main(["--scaling", "--quick", "--output", str(output)]) == 0
    rows = pd.read_csv(output).set_index("case")
    # one LLM-style layer side by side, then 4 and 24 layers of 128 × 256, each analysed in a subprocess
    assert list(rows.index) == ["layer 256x512 bf16", "4 layers", "24 layers"]
    assert rows.loc["4 layers", "parameters"] == 4 * 128 * 256 and rows.loc["4 layers", "layers"] == 4
    assert rows.loc["24 layers", "parameters"] == 24 * 128 * 256 and rows.loc["24 layers", "layers"] == 24
    assert (rows.loc[["4 layers", "24 layers"], "peak_rss_mib"] > 0).all()
    assert rows.loc["layer 256x512 bf16", "d_tilde"] == rows.loc["layer 256x512 bf16", "baseline_d_tilde"]
    assert not list(tmp_path.glob("lr2vq-scaling-*"))  # the synthetic checkpoints are deleted


def test_quick_kmeans_benchmark_runs_every_engine_to_comparable_distortion(tmp_path):
    table = bench_kmeans.main(["--quick", "--out", str(tmp_path / "kmeans.csv")])
    assert (tmp_path / "kmeans.csv").is_file()
    engines = {"ours", "sklearn"} | ({"faiss", "faiss+labels"} if bench_kmeans.faiss is not None else set())
    assert set(table["engine"]) == engines
    # Same data, k-means++ start and 25 iterations: distortions agree within seed-to-seed noise (d >= 4).
    for _, case in table[table["d"] >= 4].groupby("case"):
        by_engine = case.groupby("engine")["inertia"].mean()
        assert (by_engine / by_engine["sklearn"]).between(0.95, 1.05).all()


def test_quick_start_sample_benchmark_scores_every_candidate_against_the_all_points_start(tmp_path):
    summary = bench_kmeans_start.main(["--quick", "--out-dir", str(tmp_path)])
    assert (tmp_path / "kmeans_start_development_quick.csv").is_file()
    assert "Rule (pre-registered)" in (tmp_path / "kmeans_start_development_quick.md").read_text()
    assert set(summary["setting"]) == {"analysis", "quantize"}
    assert (summary["cases"] == 2).all()
    # 256 per centroid at k = 256 is more than the 8192 points: the start sees them all, as the reference does.
    same = summary[summary["candidate"].isin(["256", "all"])]
    assert (same["max excess %"] == 0).all()
    tail = bench_kmeans_start.main(["--quick", "--experiment", "tail", "--out-dir", str(tmp_path)])
    assert set(tail["candidate"]) == {"64", "64+tail", "all"}
    assert "On this half it gives" in (tmp_path / "kmeans_start_tail_development_quick.md").read_text()


def test_quick_threads_benchmark_measures_every_path_at_both_settings():
    rows = bench_threads.main(["--quick", "--threads", "2"])
    assert [row["path"] for row in rows] == list(bench_threads.paths(quick=True))
    assert all(row["user_s"] > 0 and row["one_s"] > 0 for row in rows)


def test_finetune_thread_table_runs_and_restores_the_setting():
    import bench_finetune_step
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # one user thread: every setting runs one thread, so this is quick (correctness only, no timing)
        table = bench_finetune_step.thread_cliff(1, steps=2, rounds=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
    assert set(table["setting"]) == set(bench_finetune_step.THREAD_SETTINGS)
    assert set(table["path"]) == {"finetune, 2 low-rank steps", "recalibrate_batchnorm"}
    assert (table["seconds"] > 0).all() and (
        table.loc[table["setting"] == "1 thread", "ratio_vs_1_thread"] == 1.0
    ).all()


@pytest.mark.usefixtures("one_thread")
def test_quick_planner_benchmark_checks_presets_and_plans_two_targets(tmp_path):
    import bench_planner

    assert bench_planner.main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "planner_quick.json").read_text())
    assert all(row["match"] for row in results["presets"])  # PQF's published ResNet-18 sizes
    plans = results["digits"]["plans"]
    assert [p["target_ratio"] for p in plans] == [8.0, 12.0]
    assert all(p["ratio_vs_source"] >= p["target_ratio"] for p in plans)
    assert (tmp_path / "plan_digits_8x" / "plan.json").is_file()
    allocated, uniform = results["finetune_mnist1d"]  # one target: the allocation and the best uniform plan
    assert allocated["plan"] == "allocated" and uniform["plan"].startswith("uniform")
    budget = size_report(load_model("mnist1d-cnn")).megabytes / 10.0
    assert allocated["MiB"] <= budget and uniform["MiB"] <= budget
    assert allocated["lr"] == uniform["lr"] and allocated["steps"] == uniform["steps"] == 2
    assert (tmp_path / "planner_finetune_mnist1d.csv").is_file()


def test_zoo_stages_quick_train_sweep_score(tmp_path):
    """The three zoo stages chain on their --quick paths: weights, runs CSV, scores with every rule."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "zoo"))
    import score as zoo_score
    import sweep as zoo_sweep
    import train as zoo_train

    (record,) = zoo_train.main(["--quick", "--out-dir", str(tmp_path)])
    assert record["id"] == "Z01" and (tmp_path / "Z01.safetensors").is_file()
    runs = tmp_path / "runs.csv"
    frame = zoo_sweep.main(["--quick", "--weights-dir", str(tmp_path), "--out", str(runs)])
    assert sorted(set(frame["seed"])) == [0, 100]  # a tuning seed and a scored seed
    assert sorted(frame.loc[frame["method"] == "lr2vq", "d_tilde"].unique()) == [1, 9]
    result = zoo_score.main(
        ["--runs", str(runs), "--half", "all", "--weights-dir", str(tmp_path), "--quick", "--pq-rules", "pq,half"]
    )
    predictions = result["predictions"][0]
    assert predictions["half"] == 4 and predictions["pq"] == 9
    assert {"rho", "crossing", "crossing-output", "rho-output", "knee"} <= set(predictions)
    assert result["pq_comparison"]["half"] == []  # ⌊9/2⌋ = 4 was not swept in the quick sweep
    (versus,) = result["pq_comparison"]["pq"]  # LR²VQ at d̃ = m against PQ at the same (k, m), scored seed only
    assert versus["d_tilde"] == 9 and versus["lr2vq"]["n"] == versus["pq_same"]["n"] == 1
    assert (versus["lr2vq"]["k"], versus["lr2vq"]["m"]) == (versus["pq_same"]["k"], versus["pq_same"]["m"]) == (16, 9)
    scored = frame[(frame["seed"] == 0) & (frame["method"] == "pq")]
    assert versus["pq_same"]["mean"] == pytest.approx(100 * float(scored["accuracy"].iloc[0]))


def test_activation_projection_benchmark_quick_and_its_pca_step_matches_an_svd():
    """--quick covers every (layer, method); the PCA low-rank step equals a brute-force SVD truncation."""
    import bench_activation_projection as bench
    import numpy as np

    from lr2vq_analysis.subvectors import to_subvectors

    rows = bench.main(["--quick"])
    assert len(rows) == 3 * len(bench.METHODS)  # 3 layers, one d̃
    for layer in {r["layer"] for r in rows}:
        by_method = {r["method"]: r for r in rows if r["layer"] == layer}
        # the H̄ metric changes the clustering only, not the low-rank step
        assert by_method["aware"]["lowrank_output_error"] == pytest.approx(
            by_method["aware+metric"]["lowrank_output_error"]
        )
        assert all(0 < r["lowrank_output_error"] < 1 and r["output_error"] > 0 for r in by_method.values())
    weight = load_model("digits-cnn").state_dict()["conv3.weight"].float()
    x = to_subvectors(weight, 9)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    expected = (x @ vt[:3].T @ vt[:3]).reshape(tuple(weight.shape))
    lowrank, _ = bench.quantize_layer(weight, np.eye(weight[0].numel()), 9, 3, 16, "pca", seed=0)
    np.testing.assert_allclose(lowrank, expected, atol=1e-8)
