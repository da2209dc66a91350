"""Score the d̃ predictors: mean regret with paired standard errors, and plateau hits with bootstrap intervals.

Stage 3 of the zoo study (``PREREGISTRATION.md``); ``--existing`` scores the evidence sweeps already in
``benchmarks/results/`` (digits, MNIST-1D, MiniLM)::

    python benchmarks/zoo/score.py --existing              # writes benchmarks/results/predictors_existing.{json,md}
    python benchmarks/zoo/score.py --existing --quick      # digits only, 64 calibration samples, no output files
    python benchmarks/zoo/score.py --runs benchmarks/results/zoo_runs_a.csv benchmarks/results/zoo_runs_b.csv --half dev

Regret of a predictor on a setting (network, k, m) = best mean test metric over the swept d̃ − mean at
the predicted d̃, in points (accuracy or cosine × 100), means over the scored seeds; a predicted d̃
that was not swept has no regret and is counted apart. Predictions are the global d̃ of
:func:`lr2vq_analysis.report.analyze` on the pretrained network (size-weighted over the compressed
layers); the output-space rules use ``--calibration-samples`` training inputs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lr2vq_analysis.io import write_atomic
from lr2vq_analysis.report import Report, analyze
from lr2vq_analysis.tradeoff import PREDICTORS, global_d_tilde

RESULTS = Path(__file__).resolve().parents[1] / "results"
DATA_FREE = ("rho", "crossing", "half", "knee", "pq")
WEIGHT_BLIND = ("half", "pq")
METRICS = {"digits": "accuracy", "mnist1d": "accuracy", "minilm": "cosine"}


# --------------------------------------------------------------------------------------------------
# settings and regrets


def settings_from_runs(runs: pd.DataFrame, metric: str, network: str) -> list[dict[str, Any]]:
    """Per LR²VQ (k, m) with ≥ 2 swept d̃: per-seed test values at every d̃, in points."""
    out = []
    lr2vq = runs[runs["method"] == "lr2vq"]
    for (k, m), group in lr2vq.groupby(["k", "m"]):
        by_d = {int(d): 100.0 * rows[metric].to_numpy(dtype=float) for d, rows in group.groupby("d_tilde")}
        if len(by_d) >= 2:
            out.append({"network": network, "k": int(k), "m": int(m), "by_d": by_d})
    return out


def regret(setting: Mapping[str, Any], d: int) -> float:
    """Best mean − mean at d (points); NaN when d was not swept."""
    means = {dd: float(np.mean(v)) for dd, v in setting["by_d"].items()}
    return max(means.values()) - means[d] if d in means else math.nan


def plateau(by_d: Mapping[int, np.ndarray]) -> list[int]:
    """d̃ whose mean is within one standard error (of the best d̃'s mean) of the best."""
    means = {d: float(np.mean(v)) for d, v in by_d.items()}
    best = max(means, key=means.__getitem__)
    values = by_d[best]
    se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return [d for d, value in means.items() if value >= means[best] - se]


def bootstrap_hits(
    settings: Sequence[Mapping[str, Any]], predicted: Sequence[int], n_boot: int = 2000, seed: int = 0
) -> tuple[int, float, float]:
    """Plateau hits, and the 95 % interval of the hit count when the seeds of every (setting, d̃) are resampled."""
    rng = np.random.default_rng(seed)
    hits = sum(d in plateau(s["by_d"]) for s, d in zip(settings, predicted, strict=True))
    counts = np.empty(n_boot)
    for b in range(n_boot):
        total = 0
        for s, d in zip(settings, predicted, strict=True):
            resampled = {dd: v[rng.integers(0, len(v), len(v))] for dd, v in s["by_d"].items()}
            total += d in plateau(resampled)
        counts[b] = total
    return hits, float(np.percentile(counts, 2.5)), float(np.percentile(counts, 97.5))


def score(settings: Sequence[Mapping[str, Any]], predictions: Sequence[Mapping[str, int]]) -> dict[str, Any]:
    """Mean regret per predictor, paired differences with SE, plateau hits with bootstrap intervals."""
    rules = [rule for rule in PREDICTORS if all(rule in p for p in predictions)]
    regrets = {
        rule: np.array([regret(s, p[rule]) for s, p in zip(settings, predictions, strict=True)]) for rule in rules
    }
    out: dict[str, Any] = {"n_settings": len(settings), "predictors": {}, "paired": {}}
    for rule in rules:
        r = regrets[rule]
        swept = ~np.isnan(r)
        hits, low, high = bootstrap_hits(
            [s for s, ok in zip(settings, swept, strict=True) if ok],
            [p[rule] for p, ok in zip(predictions, swept, strict=True) if ok],
        )
        out["predictors"][rule] = {
            "mean_regret": float(np.mean(r[swept])) if swept.any() else math.nan,
            "n_scored": int(swept.sum()),
            "not_swept": int((~swept).sum()),
            "hits_in_plateau": hits,
            "hits_interval_95": [low, high],
            "regrets": [None if math.isnan(v) else float(v) for v in r],
        }
    for a in rules:
        for b in rules:
            if a >= b:
                continue
            both = ~np.isnan(regrets[a]) & ~np.isnan(regrets[b])
            diff = regrets[a][both] - regrets[b][both]
            se = float(np.std(diff, ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else math.nan
            out["paired"][f"{a} - {b}"] = {
                "mean": float(np.mean(diff)) if diff.size else math.nan,
                "se": se,
                "n": int(diff.size),
            }
    return out


# --------------------------------------------------------------------------------------------------
# predictions


def predictions_of(report: Report, calibrated: Report | None) -> dict[str, int]:
    """The global d̃ of every rule of PREDICTORS (output rules only with a calibrated report)."""
    sizes = [layer.n_weights for layer in report.layers]
    out = {}
    for rule in PREDICTORS:
        source = calibrated if rule.endswith("-output") else report
        if source is None:
            continue
        models = [layer.model.with_predictor(rule) for layer in source.layers]
        out[rule] = global_d_tilde(models, sizes)[0]
    return out


def calibration_inputs(task: str, n: int) -> Any:
    """``n`` training inputs of an evidence task (the training split the pretrained model was trained on)."""
    import torch

    if task == "minilm":
        from lr2vq_analysis.experimental.datasets import minilm_calibration_batches

        return minilm_calibration_batches(n)
    from lr2vq_analysis.experimental.sweeps import TASKS

    train = TASKS[task].load_splits(0)["train"]
    return torch.stack([train[i][0] for i in range(min(n, len(train)))])


def existing(tasks: Sequence[str], calibration_samples: int) -> tuple[list[dict[str, Any]], list[dict[str, int]]]:
    from lr2vq_analysis.experimental.sweeps import TASKS

    settings, predictions = [], []
    for task in tasks:
        path = RESULTS / f"sweep_{task}.csv"
        runs = pd.read_csv(path)
        model = TASKS[task].load_model()
        layers = list(TASKS[task].layers)
        calibration = calibration_inputs(task, calibration_samples) if calibration_samples else None
        for setting in settings_from_runs(runs, METRICS[task], task):
            k, m = setting["k"], setting["m"]
            report = analyze(model, k=k, m=m, include=layers, progress=False)
            calibrated = (
                analyze(model, k=k, m=m, include=layers, progress=False, calibration=calibration)
                if calibration is not None
                else None
            )
            settings.append(setting)
            predictions.append(predictions_of(report, calibrated))
            print(f"{task} k={k} m={m}: {predictions[-1]}", flush=True)
    return settings, predictions


def pq_comparison(
    runs: pd.DataFrame, settings: Sequence[Mapping[str, Any]], predictions: Sequence[Mapping[str, int]], rule: str
) -> list[dict[str, Any]]:
    """Per setting: LR²VQ at ``rule``'s d̃ against PQ at the same (k, m) and PQ at equal size (scored seeds)."""

    def summary(rows: pd.DataFrame) -> dict[str, Any]:
        values = 100.0 * rows["accuracy"].to_numpy(dtype=float)
        return {
            "k": int(rows["k"].iloc[0]),
            "m": int(rows["m"].iloc[0]),
            "KiB": 1024.0 * float(rows["layers_megabytes"].mean()),
            "mean": float(values.mean()),
            "sd": float(values.std(ddof=1)) if values.size > 1 else 0.0,
            "n": int(values.size),
        }

    out = []
    for setting, prediction in zip(settings, predictions, strict=True):
        net = runs[(runs["task"] == setting["network"]) & runs["seed"].between(0, 99)]
        same = (net["k"] == setting["k"]) & (net["m"] == setting["m"])
        lr2vq = net[(net["method"] == "lr2vq") & same & (net["d_tilde"] == prediction[rule])]
        pq_same = net[(net["method"] == "pq") & same]
        pq_equal = net[(net["method"] == "pq") & ~same]
        if lr2vq.empty or pq_same.empty:
            continue
        row = {"network": setting["network"], "rule": rule, "d_tilde": prediction[rule]}
        row["lr2vq"], row["pq_same"] = summary(lr2vq), summary(pq_same)
        row["pq_equal_size"] = summary(pq_equal) if not pq_equal.empty else None
        out.append(row)
    return out


def pq_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    lines = [
        f"LR²VQ at the d̃ of `{rows[0]['rule']}` against PQ (d̃ = m), test accuracy of the compressed layers' "
        "network, mean ± sd over the scored seeds (size = compressed layers only):",
        "",
        "| network | LR²VQ (k, m, d̃) | size | accuracy | PQ same (k, m) | size | accuracy | PQ equal size (k', m') "
        "| size | accuracy |",
        "|---|---|---:|---|---|---:|---|---|---:|---|",
    ]
    for r in rows:
        a, b, c = r["lr2vq"], r["pq_same"], r["pq_equal_size"]
        cells = [
            r["network"],
            f"({a['k']}, {a['m']}, {r['d_tilde']})",
            f"{a['KiB']:.2f} KiB",
            f"{a['mean']:.2f} ± {a['sd']:.2f}",
            f"({b['k']}, {b['m']})",
            f"{b['KiB']:.2f} KiB",
            f"{b['mean']:.2f} ± {b['sd']:.2f}",
        ]
        cells += (
            [f"({c['k']}, {c['m']})", f"{c['KiB']:.2f} KiB", f"{c['mean']:.2f} ± {c['sd']:.2f}"]
            if c
            else ["–", "–", "–"]
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_runs(paths: Sequence[Path]) -> pd.DataFrame:
    """The zoo runs of one or more CSVs (one per sweep process), duplicates of a run dropped."""
    frame = pd.concat([pd.read_csv(path) for path in paths], ignore_index=True)
    return frame.drop_duplicates(["task", "method", "k", "m", "d_tilde", "seed", "lr"], keep="last")


def zoo(
    runs_path: Sequence[Path],
    half: str,
    weights_dir: Path | None,
    calibration_samples: int,
    networks: Sequence[str] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, int]]]:
    """Settings and predictions of the zoo networks of ``half`` ("dev", "held-out" or "all") in the runs CSV."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from networks import WEIGHTS, ZOO, load_network

    runs = read_runs(runs_path)
    runs = runs[runs["seed"].between(0, 99)]  # scored seeds only; tuning seeds are >= 100
    settings, predictions = [], []
    for network_id in sorted(set(runs["task"])):
        net = ZOO[network_id]
        if (half != "all" and net.half != half) or (networks and network_id not in networks):
            continue
        model = load_network(network_id, weights_dir or WEIGHTS)
        train = net.splits()["train"]
        calibration = torch.stack([train[i][0] for i in range(min(calibration_samples, len(train)))])
        for setting in settings_from_runs(runs[runs["task"] == network_id], "accuracy", network_id):
            k, m = setting["k"], setting["m"]
            report = analyze(model, k=k, m=m, include=list(net.layers), progress=False)
            calibrated = analyze(model, k=k, m=m, include=list(net.layers), progress=False, calibration=calibration)
            settings.append(setting)
            predictions.append(predictions_of(report, calibrated))
            print(f"{network_id} k={k} m={m}: {predictions[-1]}", flush=True)
    return settings, predictions


def markdown(
    result: Mapping[str, Any],
    settings: Sequence[Mapping[str, Any]],
    predictions: Sequence[Mapping[str, int]],
    command: str,
) -> str:
    rules = list(result["predictors"])
    lines = [
        f"`{command}`",
        "",
        "| network | k | m | best d̃ | plateau | " + " | ".join(rules) + " |",
        "|---|---|---|---|---|" + "---|" * len(rules),
    ]
    for i, (s, p) in enumerate(zip(settings, predictions, strict=True)):
        means = {d: float(np.mean(v)) for d, v in s["by_d"].items()}
        best = max(means, key=means.__getitem__)
        cells = []
        for rule in rules:
            r = result["predictors"][rule]["regrets"][i]
            cells.append(f"{p[rule]} ({'not swept' if r is None else f'{r:.2f}'})")
        lines.append(
            f"| {s['network']} | {s['k']} | {s['m']} | {best} | {plateau(s['by_d'])} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "| predictor | mean regret (points) | settings scored | not swept | plateau hits (95 % bootstrap) |",
        "|---|---|---|---|---|",
    ]
    for rule, entry in result["predictors"].items():
        low, high = entry["hits_interval_95"]
        lines.append(
            f"| {rule} | {entry['mean_regret']:.2f} | {entry['n_scored']} | {entry['not_swept']} | "
            f"{entry['hits_in_plateau']} ({low:.0f}–{high:.0f}) |"
        )
    lines += ["", "| pair (a − b) | mean regret difference | paired SE | settings |", "|---|---|---|---|"]
    for pair, entry in result["paired"].items():
        lines.append(f"| {pair} | {entry['mean']:+.2f} | {entry['se']:.2f} | {entry['n']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--existing", action="store_true", help="score the evidence sweeps in benchmarks/results")
    parser.add_argument("--tasks", default="digits,mnist1d,minilm")
    parser.add_argument("--calibration-samples", type=int, default=256)
    parser.add_argument("--cnn-only", action="store_true", help="also score the CNN settings alone")
    parser.add_argument(
        "--quick", action="store_true", help="digits only (--existing), 64 calibration samples, no files"
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--runs", type=Path, nargs="+", default=None, help="zoo runs CSVs (from sweep.py) to score")
    parser.add_argument(
        "--pq-rules",
        default="half",
        help="comma-separated rules at whose d̃ LR²VQ is compared with PQ (the defaults, with and without data)",
    )
    parser.add_argument("--half", choices=("dev", "held-out", "all"), default="dev")
    parser.add_argument("--weights-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    samples = 64 if args.quick else args.calibration_samples
    if args.runs is not None:
        settings, predictions = zoo(args.runs, args.half, args.weights_dir, samples)
        stem = f"predictors_zoo_{args.half}"
    elif args.existing:
        settings, predictions = existing(["digits"] if args.quick else args.tasks.split(","), samples)
        stem = "predictors_existing"
    else:
        raise SystemExit("give --existing or --runs <zoo runs CSV>")
    if not settings:
        raise SystemExit("no setting with at least two swept d̃ to score")
    result = {"all": score(settings, predictions)}
    cnn = [i for i, s in enumerate(settings) if s["network"] != "minilm"]
    if len(cnn) != len(settings) and len(cnn) > 1:
        result["cnn"] = score([settings[i] for i in cnn], [predictions[i] for i in cnn])
    result["predictions"] = [
        {"network": s["network"], "k": s["k"], "m": s["m"], **p} for s, p in zip(settings, predictions, strict=True)
    ]
    command = "python benchmarks/zoo/score.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "## All settings\n\n" + markdown(result["all"], settings, predictions, command)
    if "cnn" in result:
        text += "\n## CNN settings only\n\n" + markdown(
            result["cnn"], [settings[i] for i in cnn], [predictions[i] for i in cnn], command
        )
    if args.runs is not None:
        runs = read_runs(args.runs)
        result["pq_comparison"] = {}
        text += "\n## LR²VQ against PQ\n"
        for rule in args.pq_rules.split(","):
            result["pq_comparison"][rule] = pq_comparison(runs, settings, predictions, rule)
            text += "\n" + pq_markdown(result["pq_comparison"][rule])
    print(text)
    if not args.quick:
        write_atomic(args.out_dir / f"{stem}.json", (json.dumps(result, indent=1, default=float) + "\n").encode())
        write_atomic(args.out_dir / f"{stem}.md", text.encode())
    return result


if __name__ == "__main__":
    main()
