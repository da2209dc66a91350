"""Time and error of ``quantize()`` with the capped k-means defaults against k-means run to convergence.

all-MiniLM-L6-v2's 36 encoder Linear layers (m = 8, k = 256) are compressed once per d̃ (8: PQ, 4: LR²VQ);
copies are then quantized with the package's defaults (:data:`~lr2vq_analysis.kmeans.QUANTIZE_KMEANS`,
at most 25 Lloyd iterations) and with ``KMeansConfig()`` (scikit-learn's rule: up to 300 iterations,
tol 1e-4), alternating, in one run, at torch's current thread setting. Reported: wall-clock and CPU
seconds (k-means runs single-threaded, so on a loaded machine CPU time is the steadier figure), and the
relative error of the encoder's output after quantization (before any fine-tuning).

Usage::

    python benchmarks/bench_quantize.py                # all 36 linears: minutes on 2 shared cores
    python benchmarks/bench_quantize.py --blocks 1     # encoder block 0 only (6 linears)
    python benchmarks/bench_quantize.py --quick        # the digits CNN only (seconds)
    python benchmarks/bench_quantize.py --digits-finetune --seeds 2   # fine-tuned accuracy, capped vs converged
    python benchmarks/bench_quantize.py --backends     # capped, k-means with faiss importable vs backend torch

``--digits-finetune`` runs the digits demo (:func:`~lr2vq_analysis.pipeline.compress_digits_demo`, quick
setting: 80 steps in all, 40 low-rank + 40 codebook) once with each k-means setting per seed and
reports the test accuracy after quantizing and after the codebook stage.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_compress import _output, digits_cnn, minilm_encoder, plans

from lr2vq_analysis import nn as lr2vq_nn
from lr2vq_analysis.kmeans import QUANTIZE_KMEANS, KMeansConfig
from lr2vq_analysis.nn import compress, compressible_layers

SETTINGS: dict[str, dict[str, Any]] = {"capped (default)": {}, "converged": {"config": KMeansConfig()}}
# --backends: the default (capped) k-means with backend "auto" (faiss where it measured faster, when
# importable) against the built-in kernels only (what runs without faiss).
BACKENDS: dict[str, dict[str, Any]] = {
    "capped, auto": {},
    "capped, torch": {"config": dataclasses.replace(QUANTIZE_KMEANS, backend="torch")},
}


def digits_finetune(seeds: int) -> list[dict[str, Any]]:
    """The digits demo with capped and with converged k-means: test accuracy after quantize and at the end."""
    from lr2vq_analysis.pipeline import compress_digits_demo

    rows = []
    for seed in range(seeds):
        for setting, config in (("capped (default)", QUANTIZE_KMEANS), ("converged", KMeansConfig())):
            lr2vq_nn.QUANTIZE_KMEANS = config  # the default quantize() passes to kmeans()
            try:
                with tempfile.TemporaryDirectory() as folder:
                    result = compress_digits_demo(quick=True, seed=seed, progress=False, out_dir=folder)
            finally:
                lr2vq_nn.QUANTIZE_KMEANS = QUANTIZE_KMEANS
            scores = result.to_dict()["accuracy"]
            rows.append({"seed": seed, "kmeans": setting, **scores})
            print(f"seed {seed} {setting:<17} " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the digits CNN only")
    parser.add_argument("--digits-finetune", action="store_true", help="fine-tuned digits accuracy instead of times")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=6, help="MiniLM encoder blocks to quantize (6: all 36 linears)")
    parser.add_argument("--backends", action="store_true", help="capped k-means: backend auto vs torch")
    args = parser.parse_args(argv)
    settings = BACKENDS if args.backends else SETTINGS
    if args.digits_finetune:
        return digits_finetune(args.seeds)
    if args.quick:
        model, _, inputs, _ = digits_cnn()
        keys = [key for key in compressible_layers(model) if key.startswith(("conv2", "conv3", "conv4"))]
        m, name = 9, "digits-cnn"
    else:
        model, _, inputs, _ = minilm_encoder()
        blocks = tuple(f"encoder.layer.{i}." for i in range(args.blocks))
        keys = [key for key in compressible_layers(model) if key.startswith(blocks)]
        m, name = 8, "all-MiniLM-L6-v2"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs, load {os.getloadavg()}"
    )
    reference = _output(model, inputs)
    rows = []
    for label, plan in plans(model, m, keys).items():
        compressed = compress(model, plan)
        order = list(settings) if len(rows) % 4 == 0 else list(settings)[::-1]
        for setting in order:
            cmodel = copy.deepcopy(compressed)
            start, cpu = time.perf_counter(), time.process_time()
            cmodel.quantize(seed=0, **settings[setting])
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            error = float((_output(cmodel, inputs) - reference).norm() / reference.norm())
            rows.append(
                {
                    "model": name,
                    "plan": label,
                    "layers": len(plan),
                    "kmeans": setting,
                    "seconds": seconds,
                    "cpu_seconds": cpu,
                    "output_rel_error": error,
                }
            )
            print(
                f"{name} {label:<12} {len(plan)} layers  {setting:<17} {seconds:7.2f} s (CPU {cpu:7.2f} s)  "
                f"output rel. error {error:.4f}",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
