"""Stage 2 of the zoo study: the d̃ sweep of every (network, k, m), protocol of ``PREREGISTRATION.md``.

::

    python benchmarks/zoo/sweep.py --networks Z01            # -> benchmarks/results/zoo_runs.csv (resumable)
    # as run for the scored study (PREREGISTRATION.md, deviation 1): first setting, tuning seed 100
    python benchmarks/zoo/sweep.py --networks Z01,Z05 --settings 1 --tune-seeds 100 \
        --out benchmarks/results/zoo_runs_a.csv
    python benchmarks/zoo/sweep.py --quick --weights-dir /tmp/zoo --out /tmp/zoo_runs.csv   # smoke test

Per setting: LR²VQ at every d̃ of :func:`d_tilde_grid`, PQ at the same (k, m) and PQ at equal size (the
PQ (k', m') with k' ∈ {k/2, k, 2k}, m' ∈ {m, 2m}, other than (k, m), whose size is closest to LR²VQ's
at the middle d̃), all at the same budget: ``ZOO_BUDGET`` (300 steps, 150 of them low-rank, batch 32;
PREREGISTRATION.md, deviation 2) unless ``--budget full``. The learning rate is tried
on the tuning seeds (100, 101) only and chosen per (method, k, m) — never per d̃ — by the validation
accuracy averaged over every d̃; the scored seeds 0–4 then run at the chosen rate only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from networks import WEIGHTS, ZOO, as_task, load_network

from lr2vq_analysis.experimental.sweeps import BUDGETS, Budget, RunConfig, run_sweep
from lr2vq_analysis.plan import LayerPlan, effective_k

RESULTS = Path(__file__).resolve().parents[1] / "results"
TUNE_SEEDS = (100, 101)
SCORED_SEEDS = (0, 1, 2, 3, 4)
LEARNING_RATES = (1e-3, 3e-3)
#: The zoo's training budget (deviation 2 of PREREGISTRATION.md): a quarter of the evidence sweeps' "full"
#: budget in examples seen, so that 12 networks × 5 scored seeds fit one session on 2 cores.
ZOO_BUDGET = Budget(300, 150, 32)


def d_tilde_grid(m: int) -> list[int]:
    """1..m for m ≤ 10; else 1, 2, 3, 4, 6, 8, … (every second d̃ from 4), m."""
    if m <= 10:
        return list(range(1, m + 1))
    return sorted({1, 2, 3, *range(4, m, 2), m})


def model_bits(shapes: dict[str, tuple[int, ...]], k: int, m: int, d: int) -> float:
    """Compressed bits of the network's compressed layers at (k, m, d̃), k capped per layer as in the sweeps."""
    total = 0.0
    for shape in shapes.values():
        plan = LayerPlan(k=effective_k(k, shape, m), m=m, d_tilde=d)
        total += sum(plan.compressed_bits(shape).values())
    return total


def equal_size_pq(shapes: dict[str, tuple[int, ...]], k: int, m: int) -> tuple[int, int]:
    """The PQ (k', m') closest in size to LR²VQ (k, m) at the middle d̃ of the grid."""
    grid = d_tilde_grid(m)
    target = model_bits(shapes, k, m, grid[len(grid) // 2])
    rows = [s[1] * (s[2] * s[3] if len(s) == 4 else s[2] if len(s) == 3 else 1) for s in shapes.values()]
    candidates = [
        (kk, mm)
        for kk in (k // 2, k, 2 * k)
        for mm in (m, 2 * m)
        if kk >= 2 and (kk, mm) != (k, m) and all(r % mm == 0 for r in rows)
    ]
    return min(candidates, key=lambda c: abs(model_bits(shapes, c[0], c[1], c[1]) - target))


def configs_for(
    network_id: str,
    seeds: tuple[int, ...],
    lrs: tuple[float, ...],
    quick: bool,
    folder: Path,
    settings: int | None = None,
) -> list[RunConfig]:
    """The runs of one network: its first ``settings`` (k, m) settings (all when None; the first when quick)."""
    net = ZOO[network_id]
    state = load_network(network_id, folder).state_dict()
    shapes = {name: tuple(state[name].shape) for name in net.layers}
    out = []
    for k, m in net.settings[: 1 if quick else settings]:
        grid = [1, m] if quick else d_tilde_grid(m)
        methods = [("lr2vq", k, m, d) for d in grid] + [("pq", k, m, m)]
        if not quick:
            kk, mm = equal_size_pq(shapes, k, m)
            methods.append(("pq", kk, mm, mm))
        out += [RunConfig(method, kk, mm, d, seed, lr) for seed in seeds for lr in lrs for method, kk, mm, d in methods]
    return out


def chosen_rates(runs: pd.DataFrame) -> dict[tuple[str, int, int], float]:
    """Per (method, k, m): the rate with the best validation accuracy averaged over the tuning seeds and every d̃."""
    tuned = runs[runs["seed"].isin(TUNE_SEEDS)]
    means = tuned.groupby(["method", "k", "m", "lr"])["val_accuracy"].mean().reset_index()
    means = means.sort_values(["method", "k", "m", "val_accuracy", "lr"], ascending=[True, True, True, False, True])
    best = means.drop_duplicates(["method", "k", "m"], keep="first")
    return {(str(r.method), int(r.k), int(r.m)): float(r.lr) for r in best.itertuples()}


def sweep_network(
    network_id: str,
    out: Path,
    folder: Path,
    quick: bool,
    settings: int | None = None,
    tune_seeds: tuple[int, ...] = TUNE_SEEDS,
    budget: Budget = ZOO_BUDGET,
) -> pd.DataFrame:
    """Tune the rate per (method, k, m) on ``tune_seeds``, then run the scored seeds at the chosen rates."""
    task = as_task(network_id, folder)
    budget = BUDGETS["quick"] if quick else budget
    scored, lrs = ((0,), LEARNING_RATES[:1]) if quick else (SCORED_SEEDS, LEARNING_RATES)
    tune_seeds = tune_seeds[:1] if quick else tune_seeds
    runs = run_sweep(task, configs_for(network_id, tune_seeds, lrs, quick, folder, settings), out, budget=budget)
    rates = chosen_rates(runs[(runs["task"] == network_id) & runs["seed"].isin(tune_seeds)])
    later = [
        RunConfig(c.method, c.k, c.m, c.d_tilde, c.seed, rates[(c.method, c.k, c.m)])
        for c in configs_for(network_id, scored, lrs[:1], quick, folder, settings)
    ]
    return run_sweep(task, later, out, budget=budget)


def main(argv: list[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", default=",".join(ZOO))
    parser.add_argument("--weights-dir", type=Path, default=WEIGHTS)
    parser.add_argument("--out", type=Path, default=RESULTS / "zoo_runs.csv")
    parser.add_argument(
        "--settings", type=int, default=None, help="sweep only the first N (k, m) settings of each network"
    )
    parser.add_argument(
        "--tune-seeds", default=",".join(map(str, TUNE_SEEDS)), help="seeds the learning rate is chosen on"
    )
    parser.add_argument(
        "--budget", choices=("zoo", "full"), default="zoo", help="zoo: ZOO_BUDGET; full: BUDGETS['full']"
    )
    parser.add_argument("--quick", action="store_true", help="Z01, first setting, d̃ ∈ {1, m}, 20 steps, 1 seed")
    args = parser.parse_args(argv)
    ids = ["Z01"] if args.quick else args.networks.split(",")
    tune_seeds = tuple(int(s) for s in args.tune_seeds.split(","))
    if any(seed in SCORED_SEEDS for seed in tune_seeds):
        parser.error(f"--tune-seeds {args.tune_seeds} overlaps the scored seeds {SCORED_SEEDS}")
    frame = None
    for network_id in ids:
        budget = ZOO_BUDGET if args.budget == "zoo" else BUDGETS["full"]
        frame = sweep_network(network_id, args.out, args.weights_dir, args.quick, args.settings, tune_seeds, budget)
    return frame


if __name__ == "__main__":
    main()
