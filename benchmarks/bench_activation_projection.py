"""Activation-aware projection P against the weight-space PCA, measured in the layers' outputs.

LR²VQ's projection P (d̃ × m, one per layer) is the top-d̃ principal subspace of the layer's subvectors
(weight space). :func:`lr2vq_analysis.calibration.activation_aware_projection` instead keeps the subspace
that minimises the output error under the layer's input second moment H (block metric H̄, docs/theory.md
§10). This benchmark quantizes every selected layer both ways, **before any fine-tuning**, and reports the
output-space relative error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) of

- ``pca``: weight-space PCA P, k-means on Z (what ``compress`` does today);
- ``aware``: activation-aware P, Z its H̄-weighted least-squares coordinates, k-means on Z;
- ``aware+metric``: the same P, k-means in the H̄ metric (Z times the Cholesky factor of P H̄ Pᵀ, centroids mapped back),

each after the low-rank step alone and after clustering, size-weighted over layers (at d̃ = m the first two
are plain PQ). The fine-tuned effect is not measured here (see docs/results.md)::

    python benchmarks/bench_activation_projection.py                 # all-MiniLM-L6-v2, 36 linears, k 256, m 8
    python benchmarks/bench_activation_projection.py --quick         # the bundled digits CNN, seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import torch

from lr2vq_analysis.calibration import activation_aware_projection, block_metric, collect_second_moments, output_error
from lr2vq_analysis.kmeans import QUANTIZE_KMEANS, kmeans
from lr2vq_analysis.registry import load_model
from lr2vq_analysis.subvectors import from_subvectors, to_subvectors

METHODS = ("pca", "aware", "aware+metric")


def quantize_layer(
    weight: torch.Tensor, metric: np.ndarray, m: int, d: int, k: int, method: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(low-rank approximation, low-rank + k-means approximation) of ``weight``, both in its shape."""
    x = to_subvectors(weight, m)  # float64
    if method == "pca":
        _, vectors = np.linalg.eigh(x.T @ x)
        p = np.ascontiguousarray(vectors[:, ::-1][:, :d].T)  # (d, m), orthonormal rows
        z = x @ p.T
        scale = np.eye(d)
    else:
        p = activation_aware_projection(weight, metric, m, d)
        hbar = block_metric(metric, m)
        gram = p @ hbar @ p.T
        z = x @ hbar @ p.T @ np.linalg.inv(gram)  # H̄-weighted least-squares coordinates
        # ‖(a − b) L‖² = (a − b) P H̄ Pᵀ (a − b)ᵀ with gram = L Lᵀ: Euclidean k-means on Z·L is k-means in H̄
        scale = np.linalg.cholesky(gram) if method == "aware+metric" else np.eye(d)
    codes = kmeans(torch.from_numpy(z @ scale).float(), k, seed=seed, config=QUANTIZE_KMEANS)
    centroids = codes.centroids.double().numpy() @ np.linalg.inv(scale)
    z_hat = centroids[codes.labels.numpy()]
    shape = tuple(weight.shape)
    lowrank = from_subvectors(z @ p, shape)
    quantized = from_subvectors(z_hat @ p, shape)
    return lowrank, quantized


def calibration_batches(task: str, n: int) -> Any:
    if task == "minilm":
        from lr2vq_analysis.experimental.datasets import minilm_calibration_batches

        return minilm_calibration_batches(n)
    from lr2vq_analysis.registry import load_dataset

    train = load_dataset("digits-cnn")["train"]
    return torch.stack([train[i][0] for i in range(min(n, len(train)))])


def run(task: str, layers: list[str], m: int, k: int, d_values: list[int], samples: int, seed: int) -> list[dict]:
    model = load_model("all-minilm-l6-v2" if task == "minilm" else "digits-cnn").eval()
    state = model.state_dict()
    rows = []
    for moment in collect_second_moments(model, calibration_batches(task, samples), layers):
        weight = state[moment.name].detach().float()
        for d in d_values:
            for method in METHODS:
                start = time.perf_counter()
                lowrank, quantized = quantize_layer(weight, moment.matrix, m, d, k, method, seed)
                rows.append(
                    {
                        "layer": moment.name,
                        "n_weights": weight.numel(),
                        "d_tilde": d,
                        "method": method,
                        "lowrank_output_error": output_error(weight, lowrank, moment.matrix),
                        "output_error": output_error(weight, quantized, moment.matrix),
                        "weight_error": float(((weight.double().numpy() - quantized) ** 2).sum())
                        / float((weight.double() ** 2).sum()),
                        "seconds": time.perf_counter() - start,
                    }
                )
    return rows


def summary(rows: list[dict]) -> str:
    """Size-weighted means per (d̃, method), and how many layers each method is best on."""
    lines = [
        "| d̃ | method | low-rank output error | output error after k-means | weight error | layers best |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for d in sorted({r["d_tilde"] for r in rows}):
        at_d = [r for r in rows if r["d_tilde"] == d]
        best: dict[str, int] = {method: 0 for method in METHODS}
        for layer in {r["layer"] for r in at_d}:
            of_layer = [r for r in at_d if r["layer"] == layer]
            best[min(of_layer, key=lambda r: r["output_error"])["method"]] += 1
        for method in METHODS:
            chosen = [r for r in at_d if r["method"] == method]
            weights = np.array([r["n_weights"] for r in chosen], dtype=float)

            def mean(key: str, chosen: list[dict] = chosen, weights: np.ndarray = weights) -> float:
                return float(np.average([r[key] for r in chosen], weights=weights))

            lines.append(
                f"| {d} | {method} | {mean('lowrank_output_error'):.4f} | {mean('output_error'):.4f} | "
                f"{mean('weight_error'):.4f} | {best[method]} / {len(chosen)} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the digits CNN (conv2–conv4), k 16, 64 images")
    parser.add_argument("--samples", type=int, default=256, help="calibration inputs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        rows = run("digits", ["conv2.weight", "conv3.weight", "conv4.weight"], 9, 16, [3], 64, args.seed)
    else:
        from lr2vq_analysis.experimental.sweeps import MINILM_LAYERS

        rows = run("minilm", list(MINILM_LAYERS), 8, 256, [4, 7, 8], args.samples, args.seed)
    print(f"python benchmarks/bench_activation_projection.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(summary(rows))
    return rows


if __name__ == "__main__":
    main()
