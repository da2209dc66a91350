"""Choose the trade-off model's default ρ from the evidence sweeps.

Reads ``sweep_<task>_summary.json`` (written by ``sweep_frontier.py``) for every task present. Each holds,
per LR²VQ setting (k, m), the best fine-tuned d̃, its plateau (d̃ within one standard error of the best)
and the analysis's predicted global d̃ at every ρ of a grid. For every ρ this script counts the settings
whose prediction is inside the plateau and those within ±1 of the best d̃, per task and in all; the
default is the ρ with the most predictions in the plateau, then the most hits, and among ties the median
of the tied values (the middle of the range that fits)::

    python benchmarks/calibrate_rho.py                 # prints the table, writes rho_calibration.json/.md

Also reported per task: the ρ values consistent with every setting's plateau (the measured ρ, as a
range), and the loss-based ρ of the runs (median and quartiles; see ``docs/evidence.md`` for why it is
not the one to calibrate on).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from lr2vq_analysis.experimental.sweeps import save_json
from lr2vq_analysis.io import write_atomic
from lr2vq_analysis.tradeoff import DEFAULT_RHO

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("digits", "mnist1d", "minilm")


def load_settings(results: Path) -> list[dict[str, Any]]:
    """One entry per (task, k, m) of every summary found."""
    settings = []
    for task in TASKS:
        path = results / f"sweep_{task}_summary.json"
        if not path.is_file():
            continue
        summary = json.loads(path.read_text())
        for config in summary["configs"]:
            if "predicted_d_tilde_by_rho" not in config:
                raise SystemExit(f"{path} predates predicted_d_tilde_by_rho; rerun sweep_frontier.py --summary-only")
            settings.append({"task": task, **config})
    return settings


def score(settings: list[dict[str, Any]], rho: float) -> dict[str, Any]:
    """Predictions in the plateau and within ±1 of the best d̃ at ``rho``, in all and per task."""
    key = f"{rho:.2f}"
    out: dict[str, Any] = {"rho": rho, "in_plateau": 0, "hits": 0, "by_task": {}}
    for setting in settings:
        predicted = setting["predicted_d_tilde_by_rho"][key]
        inside = predicted in setting["plateau"]
        hit = abs(predicted - setting["best_d_tilde"]) <= 1
        task = out["by_task"].setdefault(setting["task"], {"in_plateau": 0, "hits": 0, "settings": 0})
        task["settings"] += 1
        task["in_plateau"] += inside
        task["hits"] += hit
        out["in_plateau"] += inside
        out["hits"] += hit
    return out


#: Rules that pick d̃ without looking at the weights, scored like the analysis (is it any better than these?).
BASELINES = {"d~ = m (PQ)": lambda m: m, "d~ = floor(m/2)": lambda m: m // 2}


def score_baselines(settings: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Predictions in the plateau and hits (±1) of each rule of :data:`BASELINES`, over all settings."""
    out = {}
    for name, rule in BASELINES.items():
        predictions = [(rule(int(s["m"])), s) for s in settings]
        out[name] = {
            "in_plateau": sum(d in s["plateau"] for d, s in predictions),
            "hits": sum(abs(d - s["best_d_tilde"]) <= 1 for d, s in predictions),
        }
    return out


def consistent_ranges(settings: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task: the ρ values whose prediction is in the plateau, per setting and for all settings at once."""
    out: dict[str, dict[str, Any]] = {}
    for setting in settings:
        entry = out.setdefault(setting["task"], {"per_setting": {}, "all_settings": None})
        values = {float(rho) for rho, d in setting["predicted_d_tilde_by_rho"].items() if d in setting["plateau"]}
        entry["per_setting"][f"k={setting['k']},m={setting['m']}"] = sorted(values)
        entry["all_settings"] = values if entry["all_settings"] is None else entry["all_settings"] & values
    for entry in out.values():
        entry["all_settings"] = sorted(entry["all_settings"])
    return out


def loss_rho(results: Path) -> dict[str, Any]:
    out = {}
    for task in TASKS:
        path = results / f"sweep_{task}_summary.json"
        if path.is_file():
            summary = json.loads(path.read_text())
            out[task] = {split: summary.get(f"rho_{split}") for split in ("train", "val")}
    return out


def markdown(
    rows: list[dict[str, Any]], chosen: float, ranges: dict[str, Any], n: int, baselines: dict[str, Any]
) -> str:
    tasks = sorted({task for row in rows for task in row["by_task"]})
    header = " | ".join(f"{task}: in plateau / hits" for task in tasks)
    lines = [
        f"| ρ | {header} | all: in plateau / hits (of {n}) |",
        "|---|" + "---|" * (len(tasks) + 1),
    ]
    for row in rows:
        cells = " | ".join(f"{row['by_task'][t]['in_plateau']} / {row['by_task'][t]['hits']}" for t in tasks)
        mark = " **(chosen)**" if row["rho"] == chosen else ""
        lines.append(f"| {row['rho']:.2f}{mark} | {cells} | {row['in_plateau']} / {row['hits']} |")
    lines += ["", f"| rule without the weights | in plateau / hits (of {n}) |", "|---|---|"]
    lines += [f"| {name} | {entry['in_plateau']} / {entry['hits']} |" for name, entry in baselines.items()]
    lines += ["", "| task | setting | ρ with the prediction in the plateau |", "|---|---|---|"]
    for task, entry in ranges.items():
        for setting, values in entry["per_setting"].items():
            lines.append(f"| {task} | {setting} | {_span(values)} |")
        lines.append(f"| {task} | all settings at once | {_span(entry['all_settings'])} |")
    return "\n".join(lines) + "\n"


def _span(values: list[float]) -> str:
    """Grid values as runs of consecutive steps: [0.25, 0.3, 0.35, 0.8] -> '0.25–0.35, 0.80'."""
    if not values:
        return "none"
    runs: list[list[float]] = [[values[0]]]
    for value in values[1:]:
        if round(value - runs[-1][-1], 2) <= 0.05:
            runs[-1].append(value)
        else:
            runs.append([value])
    return ", ".join(f"{r[0]:.2f}" if len(r) == 1 else f"{r[0]:.2f}–{r[-1]:.2f}" for r in runs)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    settings = load_settings(args.results)
    if not settings:
        raise SystemExit(f"no sweep summaries in {args.results}; run benchmarks/sweep_frontier.py first")
    grid = sorted({float(rho) for s in settings for rho in s["predicted_d_tilde_by_rho"]})
    rows = [score(settings, rho) for rho in grid]
    best = max((row["in_plateau"], row["hits"]) for row in rows)
    tied = [row["rho"] for row in rows if (row["in_plateau"], row["hits"]) == best]
    chosen = min(tied, key=lambda rho: abs(rho - statistics.median(tied)))
    ranges = consistent_ranges(settings)
    baselines = score_baselines(settings)
    result = {
        "current_default_rho": DEFAULT_RHO,
        "chosen_rho": chosen,
        "tied_rhos": tied,
        "n_settings": len(settings),
        "scores": rows,
        "baselines": baselines,
        "plateau_consistent_rho": ranges,
        "loss_based_rho": loss_rho(args.results),
    }
    save_json(args.results / "rho_calibration.json", result)
    write_atomic(args.results / "rho_calibration.md", markdown(rows, chosen, ranges, len(settings), baselines).encode())
    print(markdown(rows, chosen, ranges, len(settings), baselines))
    print(f"chosen ρ = {chosen:.2f} (ties: {tied}); current DEFAULT_RHO = {DEFAULT_RHO}")
    return result


if __name__ == "__main__":
    main()
