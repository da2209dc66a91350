"""Size–accuracy frontier of LR²VQ, PQ, scalar k-means and DKM at the same training budget.

One command per task; resumable (runs already in the runs CSV are skipped)::

    python benchmarks/sweep_frontier.py --task digits            # full grid, 5 seeds, lr grid 1e-3, 3e-3
    python benchmarks/sweep_frontier.py --task mnist1d --jobs 2
    python benchmarks/sweep_frontier.py --task digits --quick    # smoke test: 4 configurations, 20 steps

Writes into ``--out-dir`` (default ``benchmarks/results``; ``--quick`` writes ``*_quick*`` files):

- ``sweep_<task>_runs.csv``: every run (all learning rates), with validation and test accuracy and the
  ρ measurements (see :mod:`lr2vq_analysis.experimental.sweeps`);
- ``sweep_<task>.csv``: the runs at the learning rate chosen on validation accuracy (every rate of the grid
  is tried on the first ``--tune-seeds`` seeds; the other seeds run only at the chosen rate), plus the analysis's
  ``predicted_d_tilde`` on LR²VQ rows: the input of ``lr2vq_analysis.plots.plot_size_frontier`` and
  ``plot_accuracy_vs_d_tilde``;
- ``sweep_<task>_summary.json``: per (k, m) the predicted d̃, the best fine-tuned d̃, the plateau (d̃ whose
  mean accuracy is within one standard error of the best), hit (|predicted − best| ≤ 1) and the ρ values
  that would have predicted a d̃ in the plateau; ρ measured per run (median and quartiles);
- ``sweep_<task>_frontier.png/.svg`` and ``sweep_<task>_d_tilde.png/.svg``.

Every run uses one torch thread; the machine these numbers come from was shared with other jobs, so
the ``seconds`` column is only indicative.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lr2vq_analysis.experimental.sweeps import (
    BUDGETS,
    TASKS,
    Budget,
    RunConfig,
    layer_sizes,
    make_plan,
    measure_rho,
    plateau,
    rho_consistent_range,
    run_sweep,
    save_json,
    select_learning_rates,
)
from lr2vq_analysis.io import write_atomic
from lr2vq_analysis.report import analyze
from lr2vq_analysis.size import size_report
from lr2vq_analysis.tradeoff import DEFAULT_RHO

RESULTS = Path(__file__).resolve().parent / "results"

#: (method, k, m, d̃) per task. LR²VQ at m = one or two kernels; PQ over (k, m) spanning the same sizes.
GRIDS: dict[str, list[tuple[str, int, int, int]]] = {
    "digits": [
        *[("lr2vq", k, 9, d) for k in (16, 32) for d in range(1, 10)],
        *[("lr2vq", 8, 9, d) for d in (1, 2, 3, 4, 5, 6, 9)],
        *[("pq", k, 9, 9) for k in (4, 8, 16, 32, 64)],
        *[("pq", k, 18, 18) for k in (16, 32, 64)],
        ("scalar", 2, 1, 1),
        *[("dkm", k, 9, 9) for k in (16, 32)],
    ],
    # MiniLM: every setting is >= 15x on the encoder linears' weights (k = 256, m = 4: 15.6x; m = 8: 28.8x;
    # k = 16, m = 4: 31.9x; scalar k = 4: 16.0x). Flat spectra: the analysis predicts d~ = m, so d~ < m is
    # sampled near m only. d~ = 4 ran on seed 0 only (cosine 0.61 against 0.65-0.67 at d~ = 6-8): a MiniLM
    # run costs ~4 min of a core, and the 2-core budget went to more seeds of the rest.
    "minilm": [
        *[("lr2vq", 256, 8, d) for d in (6, 7, 8)],
        ("lr2vq", 256, 4, 3),
        *[("pq", k, m, m) for k, m in ((256, 4), (256, 8), (16, 4))],
        ("scalar", 4, 1, 1),
        ("dkm", 16, 4, 4),
    ],
    "mnist1d": [
        *[("lr2vq", k, 6, d) for k in (8, 16, 32) for d in range(1, 7)],
        *[("pq", k, 6, 6) for k in (4, 8, 16, 32, 64)],
        *[("pq", k, 12, 12) for k in (16, 32, 64)],
        *[("pq", k, 3, 3) for k in (4, 8)],
        ("scalar", 2, 1, 1),
        *[("dkm", k, 6, 6) for k in (16, 32)],
    ],
}
QUICK_GRIDS: dict[str, list[tuple[str, int, int, int]]] = {
    "digits": [("lr2vq", 16, 9, 4), ("pq", 16, 9, 9), ("scalar", 2, 1, 1), ("dkm", 16, 9, 9)],
    "mnist1d": [("lr2vq", 16, 6, 3), ("pq", 16, 6, 6), ("scalar", 2, 1, 1), ("dkm", 16, 6, 6)],
    "minilm": [("lr2vq", 256, 8, 6), ("pq", 256, 8, 8)],
}
#: ρ values at which the summary records the analysis's prediction (benchmarks/calibrate_rho.py reads them).
RHO_GRID = [round(0.05 * i, 2) for i in range(1, 21)]
#: Tasks whose frontier is drawn against the size of the compressed layers alone (x-axis label).
LAYERS_SIZE_AXIS: dict[str, str] = {"minilm": "size of the 36 compressed encoder linears (MiB)"}
#: Learning-rate grids (Adam; PQF uses 1e-3). MiniLM's rate was chosen on validation cosine in a pilot
#: (LR²VQ k = 256, m = 8, seed 0; rows kept in the runs CSV): d~ = 4 gave 0.470 / 0.636 / 0.301 at
#: 1e-4 / 1e-3 / 3e-3 and d~ = 6 0.677 / 0.302 at 1e-3 / 3e-3, so 1e-3 alone saves two-core hours.
LEARNING_RATES: dict[str, list[float]] = {"digits": [1e-3, 3e-3], "mnist1d": [1e-3, 3e-3], "minilm": [1e-3]}
#: Smoke-test budgets: a few steps (a MiniLM step costs ~100 digits steps).
QUICK_BUDGETS: dict[str, Budget] = {"digits": BUDGETS["quick"], "mnist1d": BUDGETS["quick"], "minilm": Budget(4, 2, 8)}


def grid_configs(task: str, seeds: list[int], lrs: list[float], quick: bool) -> list[RunConfig]:
    """Every (method, k, m, d̃) of the task's grid at every seed and learning rate (seed-major order)."""
    grid = (QUICK_GRIDS if quick else GRIDS)[task]
    configs = [RunConfig("uncompressed", 0, 0, 0, seed, lrs[0]) for seed in seeds]
    configs += [RunConfig(method, k, m, d, seed, lr) for seed in seeds for (method, k, m, d) in grid for lr in lrs]
    return configs


def at_chosen_rates(
    tuned: pd.DataFrame, tune_seeds: list[int], seeds: list[int], metric: str, grid: list[tuple[str, int, int, int]]
) -> list[RunConfig]:
    """The remaining seeds of every configuration of ``grid``, at the rate chosen on the tuning seeds' validation.

    Configurations in the runs CSV but no longer in the grid keep the seeds they have (they are reported,
    not extended).
    """
    chosen = select_learning_rates(tuned, tune_seeds, metric)
    wanted = set(grid)
    configs = []
    for seed in seeds:
        for row in chosen[chosen["seed"] == tune_seeds[0]].to_dict("records"):
            if row["method"] == "uncompressed":
                configs.append(RunConfig("uncompressed", 0, 0, 0, seed, float(row["lr"])))
                continue
            key = (str(row["method"]), int(row["k"]), int(row["m"]), int(row["d_tilde"]))
            if key in wanted:
                configs.append(RunConfig(*key, seed=seed, lr=float(row["lr"])))
    return configs


def predictions(task: str, selected: pd.DataFrame, seed: int = 0) -> dict[tuple[int, int], Any]:
    """The analysis's global d̃ (at DEFAULT_RHO) and its Report per LR²VQ (k, m)."""
    out: dict[tuple[int, int], Any] = {}
    model = TASKS[task].load_model()
    lr2vq = selected[selected["method"] == "lr2vq"]
    for k, m in sorted({(int(k), int(m)) for k, m in zip(lr2vq["k"], lr2vq["m"], strict=True)}):
        report = analyze(model, k=k, m=m, include=list(TASKS[task].layers), seed=seed, progress=False)
        out[(k, m)] = report
    return out


def with_layer_sizes(task: str, runs: pd.DataFrame) -> pd.DataFrame:
    """Fill ``layers_megabytes`` / ``layers_ratio`` of rows written before those columns existed (from the plan)."""
    runs = runs.copy()
    for column in ("layers_megabytes", "layers_ratio"):
        if column not in runs:
            runs[column] = np.nan
    missing = runs["layers_megabytes"].isna()
    if not missing.any():
        return runs
    model = TASKS[task].load_model()
    layers = TASKS[task].layers
    for (method, k, m, d), rows in runs[missing].groupby(["method", "k", "m", "d_tilde"], dropna=False):
        if method == "uncompressed":
            sizes = size_report(model)
        else:
            sizes = size_report(model, make_plan(model, layers, int(k), int(m), int(d)))
        for column, value in layer_sizes(sizes, layers).items():
            runs.loc[rows.index, column] = value
    return runs


def _stats(rows: pd.DataFrame, metric: str) -> dict[str, float]:
    values = rows[metric]
    return {"mean": float(values.mean()), "sd": float(values.std()) if len(values) > 1 else 0.0, "n": len(values)}


def d_tilde_readings(selected: pd.DataFrame, metric: str, k: int, m: int, predicted: int, best: int) -> dict[str, Any]:
    """LR²VQ's test metric at three choices of d̃, and PQ's at the same (k, m), for one setting.

    - ``at_predicted``: d̃ chosen by the analysis before any training (what a user of the package gets);
    - ``at_val_best``: d̃ with the best mean *validation* metric (a choice made without the test split);
    - ``at_test_best``: d̃ with the best mean test metric (optimistic: the maximum of several noisy means).
    """
    lr2vq = selected[(selected["method"] == "lr2vq") & (selected["k"] == k) & (selected["m"] == m)]
    val_best = int(lr2vq.groupby("d_tilde")[f"val_{metric}"].mean().idxmax())
    pq = selected[(selected["method"] == "pq") & (selected["k"] == k) & (selected["m"] == m)]
    readings: dict[str, Any] = {"val_best_d_tilde": val_best}
    for name, d in (("at_predicted", predicted), ("at_val_best", val_best), ("at_test_best", best)):
        rows = lr2vq[lr2vq["d_tilde"] == d]
        readings[name] = {"d_tilde": d, **_stats(rows, metric)} if len(rows) else None
    readings["pq_same_k_m"] = _stats(pq, metric) if len(pq) else None
    return readings


def summarize(task: str, runs: pd.DataFrame, out_dir: Path, stem: str, tune_seeds: list[int]) -> dict[str, Any]:
    metric = TASKS[task].metric
    selected = select_learning_rates(with_layer_sizes(task, runs), tune_seeds, metric)
    reports = predictions(task, selected)
    selected["predicted_d_tilde"] = np.nan
    for (k, m), report in reports.items():
        rows = (selected["method"] == "lr2vq") & (selected["k"] == k) & (selected["m"] == m)
        selected.loc[rows, "predicted_d_tilde"] = report.global_d_tilde
    selected.to_csv(out_dir / f"{stem}.csv", index=False)

    summary: dict[str, Any] = {
        "task": task,
        "metric": metric,
        "default_rho": DEFAULT_RHO,
        "lr_chosen_on_validation_of_seeds": tune_seeds,
        "configs": [],
        "methods": [],
    }
    for (k, m), info in plateau(selected, metric).items():
        predicted = reports[(k, m)].global_d_tilde
        consistent = rho_consistent_range(reports[(k, m)], info["plateau"])
        stats = info["stats"]
        summary["configs"].append(
            {
                "k": k,
                "m": m,
                "predicted_d_tilde": predicted,
                "best_d_tilde": info["best"],
                "plateau": info["plateau"],
                "hit_within_1": abs(predicted - info["best"]) <= 1,
                "predicted_in_plateau": predicted in info["plateau"],
                "rho_consistent_with_plateau": consistent,
                "predicted_d_tilde_by_rho": {
                    f"{rho:.2f}": reports[(k, m)].with_rho(rho).global_d_tilde for rho in RHO_GRID
                },
                "metric_by_d_tilde": {
                    int(d): {"mean": float(r["mean"]), "sd": float(r["std"]), "n": int(r["count"])}
                    for d, r in stats.iterrows()
                },
                **d_tilde_readings(selected, metric, k, m, predicted, info["best"]),
            }
        )
    for (method, k, m, d), group in selected.groupby(["method", "k", "m", "d_tilde"], dropna=False):
        summary["methods"].append(
            {
                "method": method,
                "k": None if pd.isna(k) else int(k),
                "m": None if pd.isna(m) else int(m),
                "d_tilde": None if pd.isna(d) else int(d),
                "lr": float(group["lr"].iloc[0]),
                "kib": float(group["megabytes"].iloc[0] * 1024),
                "ratio": float(group["ratio"].iloc[0]),
                "layers_ratio": _first_known(group, "layers_ratio"),
                "layers_kib": _first_known(group, "layers_megabytes") * 1024,
                "mean": float(group[metric].mean()),
                "sd": float(group[metric].std()) if len(group) > 1 else 0.0,
                "val_mean": float(group[f"val_{metric}"].mean()),
                "n_seeds": len(group),
            }
        )
    for split in ("train", "val"):
        if f"{'' if split == 'train' else 'val_'}loss_lowrank" not in selected:
            continue  # runs from before validation losses were recorded
        rho = measure_rho(selected, split)
        rho = rho[np.isfinite(rho["rho"])]
        if len(rho):
            by_d = rho.groupby(["k", "m", "d_tilde"])["rho"].median()
            summary[f"rho_{split}"] = {
                "median": float(rho["rho"].median()),
                "q25": float(rho["rho"].quantile(0.25)),
                "q75": float(rho["rho"].quantile(0.75)),
                "n_runs": len(rho),
                "median_by_k_m_d_tilde": {
                    f"k={int(k)},m={int(m)},d={int(d)}": float(v) for (k, m, d), v in by_d.items()
                },
            }
    save_json(out_dir / f"{stem}_summary.json", summary)
    write_atomic(out_dir / f"{stem}_tables.md", markdown(summary).encode())
    try:
        import matplotlib.pyplot as plt

        from lr2vq_analysis.experimental.plots import plot_accuracy_vs_d_tilde, plot_size_frontier
        from lr2vq_analysis.plots import save_figure

        plots: list[tuple[str, Any]] = [("frontier", plot_size_frontier)]
        if selected.loc[selected["method"] == "lr2vq", "d_tilde"].nunique() > 1:
            plots.append(("d_tilde", plot_accuracy_vs_d_tilde))
        frame = selected
        if task in LAYERS_SIZE_AXIS:  # a big uncompressed remainder (embeddings) would hide the differences
            frame = selected.assign(megabytes=selected["layers_megabytes"])
        for kind, plot in plots:
            figure = plot(frame, metric=metric, title=f"{task}: test {metric} after fine-tuning")
            if kind == "frontier" and task in LAYERS_SIZE_AXIS:
                figure.axes[0].set_xlabel(LAYERS_SIZE_AXIS[task])
            save_figure(figure, out_dir / f"{stem}_{kind}")
            plt.close(figure)
    except Exception as exc:  # figures are a convenience; the CSV/JSON are the results
        print(f"figures not written: {type(exc).__name__}: {exc}", file=sys.stderr)
    return summary


def _first_known(group: pd.DataFrame, column: str) -> float:
    """The configuration's value of a column that rows from before it existed lack (NaN when none has it)."""
    known = group[column].dropna() if column in group else pd.Series(dtype=float)
    return float(known.iloc[0]) if len(known) else float("nan")


def markdown(summary: dict[str, Any]) -> str:
    """The summary as Markdown tables (what docs/evidence.md quotes)."""
    lines = [
        f"| method | k | m | d̃ | KiB | ratio | layers KiB | layers ratio | lr | test {summary['metric']} % (mean ± sd)"
        " | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(summary["methods"], key=lambda r: (r["kib"], r["method"])):
        k, m, d = (("" if row[c] is None else row[c]) for c in ("k", "m", "d_tilde"))
        lines.append(
            f"| {row['method']} | {k} | {m} | {d} | {row['kib']:.2f} | {row['ratio']:.1f} | {row['layers_kib']:.1f} | "
            f"{row['layers_ratio']:.1f} | {row['lr']:g} | "
            f"{100 * row['mean']:.2f} ± {100 * row['sd']:.2f} | {row['n_seeds']} |"
        )
    lines += [
        "",
        "| k | m | predicted d̃ (default ρ) | best d̃ | plateau (1 SE) | hit (±1) | in plateau | ρ giving a plateau d̃ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["configs"]:
        consistent = row["rho_consistent_with_plateau"]
        span = f"{min(consistent):.2f}–{max(consistent):.2f}" if consistent else "none"
        lines.append(
            f"| {row['k']} | {row['m']} | {row['predicted_d_tilde']} | {row['best_d_tilde']} | {row['plateau']} | "
            f"{'yes' if row['hit_within_1'] else 'no'} | {'yes' if row['predicted_in_plateau'] else 'no'} | {span} |"
        )
    lines += [
        "",
        "| k | m | LR²VQ at predicted d̃ | at validation-best d̃ | at test-best d̃ (optimistic) | PQ, same k and m |",
        "|---|---|---|---|---|---|",
    ]

    def cell(reading: dict[str, Any] | None, with_d: bool = True) -> str:
        if reading is None:
            return "not run"
        head = f"d̃ = {reading['d_tilde']}: " if with_d else ""
        return f"{head}{100 * reading['mean']:.2f} ± {100 * reading['sd']:.2f} ({reading['n']})"

    for row in summary["configs"]:
        readings = [cell(row[name]) for name in ("at_predicted", "at_val_best", "at_test_best")]
        lines.append(f"| {row['k']} | {row['m']} | {' | '.join(readings)} | {cell(row['pq_same_k_m'], False)} |")
    for split in ("train", "val"):
        if f"rho_{split}" not in summary:
            continue
        r = summary[f"rho_{split}"]
        lines += [
            "",
            f"ρ on the {split} split, per LR²VQ run (d̃ < m): median {r['median']:.3f}, quartiles "
            f"{r['q25']:.3f}–{r['q75']:.3f} ({r['n_runs']} runs); median by configuration:",
            "",
            "| configuration | median ρ |",
            "|---|---|",
            *(f"| {key} | {value:.3f} |" for key, value in r["median_by_k_m_d_tilde"].items()),
        ]
    return "\n".join(lines) + "\n"


def print_table(summary: dict[str, Any]) -> None:
    header = f"{'method':<13}{'k':>5}{'m':>4}{'d~':>4}{'KiB':>11}{'layers x':>9}{'lr':>8}"
    print(f"\n{header}  test {summary['metric']} (mean ± sd, n)")
    for row in sorted(summary["methods"], key=lambda r: r["kib"]):
        k, m, d = (("" if row[c] is None else row[c]) for c in ("k", "m", "d_tilde"))
        print(
            f"{row['method']:<13}{k:>5}{m:>4}{d:>4}{row['kib']:>11.2f}{row['layers_ratio']:>9.1f}{row['lr']:>8.0e}  "
            f"{100 * row['mean']:.2f} ± {100 * row['sd']:.2f} ({row['n_seeds']})"
        )
    for row in summary["configs"]:
        print(
            f"k={row['k']} m={row['m']}: predicted d~={row['predicted_d_tilde']}, best {row['best_d_tilde']}, "
            f"plateau {row['plateau']}, hit(±1)={row['hit_within_1']}, rho consistent: "
            f"{row['rho_consistent_with_plateau']}"
        )
    for split in ("train", "val"):
        if f"rho_{split}" in summary:
            r = summary[f"rho_{split}"]
            print(
                f"rho ({split} split) per run: median {r['median']:.3f} "
                f"(IQR {r['q25']:.3f}..{r['q75']:.3f}, {r['n_runs']} runs)"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--quick", action="store_true", help="smoke test: 4 configurations, 1 seed, 20 steps")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5, or 1 with --quick)")
    parser.add_argument("--lrs", type=str, default=None, help="comma-separated learning-rate grid")
    parser.add_argument(
        "--tune-seeds",
        type=int,
        default=1,
        help="seeds on which every learning rate is tried; the others run at the rate with the best validation "
        "accuracy on these (default 1)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one torch thread each)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--summary-only", action="store_true", help="only re-summarize the existing runs CSV")
    args = parser.parse_args(argv)

    n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 5)
    grid_rates = LEARNING_RATES[args.task]
    lrs = [float(v) for v in args.lrs.split(",")] if args.lrs else (grid_rates[:1] if args.quick else grid_rates)
    budget = QUICK_BUDGETS[args.task] if args.quick else TASKS[args.task].budget
    stem = f"sweep_{args.task}" + ("_quick" if args.quick else "")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    runs_path = args.out_dir / f"{stem}_runs.csv"
    tune_seeds = list(range(min(max(args.tune_seeds, 1), n_seeds)))
    common: dict[str, Any] = {"budget": budget, "n_jobs": args.jobs}

    def this_sweep(table: pd.DataFrame) -> pd.DataFrame:
        keep = (table["steps"] == budget.steps) & table["lr"].isin(lrs) & table["seed"].lt(n_seeds)
        return table[keep]

    if args.summary_only:
        runs = pd.read_csv(runs_path)
    else:
        tuned = run_sweep(args.task, grid_configs(args.task, tune_seeds, lrs, args.quick), runs_path, **common)
        tuned = this_sweep(tuned)
        rest = [seed for seed in range(n_seeds) if seed not in tune_seeds]
        grid = (QUICK_GRIDS if args.quick else GRIDS)[args.task]
        later = at_chosen_rates(tuned, tune_seeds, rest, TASKS[args.task].metric, grid)
        runs = run_sweep(args.task, later, runs_path, **common)
    runs = this_sweep(runs)
    if not len(runs):
        raise SystemExit(f"no runs in {runs_path}")
    summary = summarize(args.task, runs, args.out_dir, stem, tune_seeds)
    print_table(summary)


if __name__ == "__main__":
    main()
