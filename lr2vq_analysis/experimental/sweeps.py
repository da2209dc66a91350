"""Size–accuracy sweeps: every method at the same training budget, learning rates chosen on validation data.

One *run* is (task, method, k, m, d̃, seed, learning rate). It starts from the task's pretrained model and

===============  ==========================================================================================
method           what happens after the pretrained start (``steps`` optimizer steps in all, for every method)
===============  ==========================================================================================
``"lr2vq"``      compress to Z·P (spectrum init) → low-rank stage (``lowrank_steps``) → k-means on Z →
                 re-estimate batch norm → codebook stage (the remaining steps)
``"pq"``         PQF: k-means on the subvectors (d̃ = m) → re-estimate batch norm → codebook stage (all steps)
``"scalar"``     as ``"pq"`` with m = d̃ = 1 (scalar k-means)
``"dkm"``        vanilla DKM (d̃ = m): differentiable k-means stage (``lowrank_steps``) → hard codes →
                 re-estimate batch norm → codebook stage (the remaining steps)
``"uncompressed"`` the pretrained model itself (no training): the reference line
===============  ==========================================================================================

The compressed layers are the same for every method (the task's ``layers``: every conv but the first of
the CNNs, the 36 encoder linears of all-MiniLM-L6-v2), each with PQF's k cap
(:func:`~lr2vq_analysis.plan.effective_k`). Fine-tuning uses the task's loss (cross-entropy for the CNNs;
for MiniLM, 1 − cosine to the uncompressed model's sentence embeddings, i.e. distillation), Adam and a
cosine schedule (:func:`~lr2vq_analysis.finetune.finetune`). The train / validation cut is the one the
pretrained model was trained with, so validation data were never trained on; ``seed`` varies the batch
order, the k-means initialisation and torch's generator. The learning rate of each (method, k, m, d̃) is the
one of a grid with the best mean *validation* metric over seeds (:func:`select_learning_rates`); the test
metric is only reported.

Every run appends one row to a CSV (:func:`run_sweep`, resumable: rows already there are skipped). The
columns include :data:`~lr2vq_analysis.plots.SWEEP_COLUMNS` and the task's metric (``accuracy``, or
``cosine`` for MiniLM; on the test split), so the
selected rows feed :func:`~lr2vq_analysis.plots.plot_size_frontier` and
:func:`~lr2vq_analysis.plots.plot_accuracy_vs_d_tilde` directly.

ρ, the share of the low-rank error that training does not recover (the weight of the low-rank term in the
trade-off model), is measured from the LR²VQ runs by :func:`measure_rho`; see ``docs/evidence.md``.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .. import recipe
from .._io import write_atomic
from .._validation import InvalidParameterError, check_count, check_d_tilde, check_k, check_m, check_n_jobs, check_seed
from ..datasets import accuracy, load_digits_splits, make_loaders, mean_over_samples
from ..finetune import TrainingConfig, finetune, recalibrate_batchnorm
from ..nn import CompressedModel
from ..plan import LayerPlan, effective_k
from ..registry import load_model
from ..size import SizeReport, bits_to_mib, size_report
from .datasets import cosine_distance, cosine_similarity, load_minilm_splits, load_mnist1d_splits

__all__ = [
    "METHODS",
    "RUN_KEY",
    "Task",
    "TASKS",
    "MINILM_LAYERS",
    "RunConfig",
    "Budget",
    "BUDGETS",
    "make_plan",
    "layer_sizes",
    "run_one",
    "run_sweep",
    "select_learning_rates",
    "measure_rho",
    "rho_consistent_range",
    "plateau",
    "save_json",
]

#: A training loss: (output, target) -> scalar tensor.
LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: Methods a run can use.
METHODS = ("lr2vq", "pq", "scalar", "dkm", "uncompressed")
#: Columns that identify a run; :func:`run_sweep` skips a configuration whose key is already in the CSV.
RUN_KEY = ("task", "method", "k", "m", "d_tilde", "seed", "lr", "steps", "lowrank_steps", "batch_size")


# --------------------------------------------------------------------------------------------------
# tasks


@dataclass(frozen=True)
class Budget(recipe.Budget):
    """The recipe's :class:`~lr2vq_analysis.recipe.Budget` (steps in all, low-rank steps) and the batch size.

    Attributes
    ----------
    steps : int
        Optimizer steps in all.
    lowrank_steps : int
        Of those, the steps of LR²VQ's low-rank stage (and of DKM's soft stage); the rest train the codebooks.
    batch_size : int
    """

    steps: int = 600
    lowrank_steps: int | None = 300
    batch_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count(self.batch_size, "batch_size")


@dataclass(frozen=True)
class Task:
    """A pretrained classifier, its data and the layers every method compresses.

    Attributes
    ----------
    name : str
    load_model : callable () -> nn.Module
        Returns the pretrained model (a fresh copy, eval mode).
    load_splits : callable (seed) -> dict of Dataset
        Train / val / test splits; called with ``train_cut_seed``.
    train_cut_seed : int
        The cut the pretrained model was trained with (its validation images were never trained on).
    layers : tuple of str
        State_dict keys of the compressed weights.
    budget : Budget
        The full training budget of every run of the task.
    metric : str, default "accuracy"
        Name of the quality column of the result rows (``"accuracy"``, ``"cosine"``).
    evaluate : callable (model, DataLoader) -> float, default :func:`~lr2vq_analysis.datasets.accuracy`
        Measures ``metric`` on a split.
    loss_fn : callable (output, target) -> scalar tensor, optional
        Training loss (default: cross-entropy); also the loss of the ρ measurement.
    self_distilled : bool, default False
        The targets are the pretrained model's own outputs, so the pretrained model is a fixed point of
        training (zero loss, zero gradient) and is its own dense reference in the ρ measurement.
    loss_samples : int, optional
        The ρ losses on the training split use its first ``loss_samples`` samples (default: all of them).
    """

    name: str
    load_model: Callable[[], nn.Module]
    load_splits: Callable[[int], Mapping[str, Dataset]]
    train_cut_seed: int
    layers: tuple[str, ...]
    budget: Budget = Budget()
    metric: str = "accuracy"
    evaluate: Callable[[nn.Module, DataLoader], float] = accuracy
    loss_fn: LossFunction | None = None
    self_distilled: bool = False
    loss_samples: int | None = None

    @property
    def loss(self) -> LossFunction:
        """The training loss (``loss_fn``, or cross-entropy)."""
        return self.loss_fn if self.loss_fn is not None else F.cross_entropy


_digits_model = functools.partial(load_model, "digits-cnn")
_mnist1d_model = functools.partial(load_model, "mnist1d-cnn")
_minilm_model = functools.partial(load_model, "all-minilm-l6-v2")


#: all-MiniLM-L6-v2's 36 encoder linears (query, key, value, attention output, intermediate, output × 6 layers).
MINILM_LAYERS: tuple[str, ...] = tuple(
    f"bert.encoder.layer.{i}.{name}.weight"
    for i in range(6)
    for name in (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    )
)

#: The tasks of the evidence sweeps (the first conv and the classifier stay uncompressed; MiniLM's
#: embeddings and layer norms stay fp32). MiniLM: distillation into its own sentence embeddings on
#: standard-library docstrings, 120 steps at batch 16 (a transformer step costs ~0.5 s on one thread).
TASKS: dict[str, Task] = {
    "digits": Task("digits", _digits_model, load_digits_splits, 0, ("conv2.weight", "conv3.weight", "conv4.weight")),
    "mnist1d": Task(
        "mnist1d", _mnist1d_model, load_mnist1d_splits, 0, ("conv2.weight", "conv3.weight", "conv4.weight")
    ),
    "minilm": Task(
        "minilm",
        _minilm_model,
        load_minilm_splits,
        0,
        MINILM_LAYERS,
        budget=Budget(120, 60, 16),
        metric="cosine",
        evaluate=cosine_similarity,
        loss_fn=cosine_distance,
        self_distilled=True,
        loss_samples=500,
    ),
}


def _task(task: str | Task) -> Task:
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise InvalidParameterError(f"task={task!r} is invalid; known tasks are {sorted(TASKS)}")
    return TASKS[task]


# --------------------------------------------------------------------------------------------------
# one run


#: The full budget of the CNN tasks (600 steps, as in the digits measurements of docs/evidence.md) and a smoke-test one.
BUDGETS: dict[str, Budget] = {"full": Budget(600, 300, 64), "quick": Budget(20, 10, 64)}


@dataclass(frozen=True)
class RunConfig:
    """One point of a sweep. ``d_tilde`` must equal ``m`` for PQ, scalar and DKM (vanilla DKM)."""

    method: str
    k: int
    m: int
    d_tilde: int
    seed: int
    lr: float

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidParameterError(f"method={self.method!r} is invalid; allowed methods are {METHODS}")
        check_seed(self.seed)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise InvalidParameterError(f"lr={self.lr!r} is invalid; it must be a positive number")
        if self.method == "uncompressed":
            return
        check_k(self.k)
        check_m(self.m)
        check_d_tilde(self.d_tilde, self.m)
        if self.method == "scalar" and self.m != 1:
            raise InvalidParameterError(f"method='scalar' needs m=1, got m={self.m}")
        if self.method in ("pq", "scalar", "dkm") and self.d_tilde != self.m:
            raise InvalidParameterError(
                f"method={self.method!r} needs d_tilde=m={self.m} (no projection), got d_tilde={self.d_tilde}"
            )


def make_plan(model: nn.Module, layers: Iterable[str], k: int, m: int, d_tilde: int) -> dict[str, LayerPlan]:
    """One (k, m, d̃) for every listed layer, with k capped per layer by PQF's rule.

    Examples
    --------
    >>> from lr2vq_analysis.models.digits import DigitsCNN
    >>> plan = make_plan(DigitsCNN(), ["conv2.weight", "conv4.weight"], k=256, m=9, d_tilde=4)
    >>> [(name, p.k) for name, p in plan.items()]
    [('conv2.weight', 128), ('conv4.weight', 256)]
    """
    state = model.state_dict()
    return {name: LayerPlan(k=effective_k(k, tuple(state[name].shape), m), m=m, d_tilde=d_tilde) for name in layers}


def _relative_error(weights: Mapping[str, torch.Tensor], references: Mapping[str, torch.Tensor]) -> float:
    """Σ‖W − W_ref‖² / Σ‖W_ref‖² over the layers (size-weighted relative error)."""
    error = sum(float((weights[name].double() - ref.double()).pow(2).sum()) for name, ref in references.items())
    energy = sum(float(ref.double().pow(2).sum()) for ref in references.values())
    return error / energy


def _layer_weights(cmodel: CompressedModel) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {name: layer.weight.detach().clone() for name, layer in cmodel.compressed_layers().items()}


def _eval_loaders(task: Task, splits: Mapping[str, Dataset]) -> dict[str, DataLoader]:
    """Unshuffled loaders of every split; the training split cut to the task's ``loss_samples``."""
    subsets = dict(splits)
    if task.loss_samples is not None:
        subsets["train"] = Subset(splits["train"], range(min(task.loss_samples, len(cast(Sized, splits["train"])))))
    return {name: DataLoader(dataset, batch_size=512, shuffle=False) for name, dataset in subsets.items()}


@functools.lru_cache(maxsize=64)
def _dense_reference_loss(task: Task, seed: int, lr: float, steps: int, batch_size: int) -> dict[str, float]:
    """Losses of the *uncompressed* model fine-tuned like LR²VQ's low-rank stage (the ρ baseline)."""
    torch.manual_seed(seed)
    model = task.load_model()
    splits = task.load_splits(task.train_cut_seed)
    loaders = make_loaders(splits, batch_size, seed)
    if steps and not task.self_distilled:  # a self-distilled model is a fixed point: training leaves it as it is
        common: dict[str, Any] = {"lr": lr, "seed": seed, "device": "cpu", "progress": False}
        finetune(model, loaders["train"], loss_fn=task.loss, stage="dense", steps=steps, **common)
    return _losses(task, model, _eval_loaders(task, splits))


def _losses(task: Task, model: nn.Module, evaluation: Mapping[str, DataLoader]) -> dict[str, float]:
    """Mean task loss on the training split (``""``) and the validation split (``"val_"``)."""
    splits = (("", "train"), ("val_", "val"))

    def batch_total(output: torch.Tensor, target: torch.Tensor) -> float:
        return float(task.loss(output, target)) * len(target)  # the losses are means over the batch

    return {prefix: mean_over_samples(model, evaluation[split], batch_total) for prefix, split in splits}


_RHO_LOSSES = ("loss_pretrained", "loss_truncated", "loss_lowrank", "loss_dense_reference")


def layer_sizes(sizes: SizeReport, layers: Iterable[str]) -> dict[str, float]:
    """Size (MiB) and compression ratio of the listed weights alone (biases and the rest left out).

    Parameters
    ----------
    sizes : SizeReport
        :func:`~lr2vq_analysis.size.size_report` of a model and plan.
    layers : iterable of str
        State_dict keys of the weights to count.

    Returns
    -------
    dict
        ``layers_megabytes`` (MiB) and ``layers_ratio`` (their fp32 size over their compressed size).
    """
    wanted = set(layers)
    chosen = [entry for entry in sizes.layers if entry.name in wanted]
    compressed = sum(entry.compressed_bits for entry in chosen)
    uncompressed = sum(entry.uncompressed_bits for entry in chosen)
    return {"layers_megabytes": bits_to_mib(compressed), "layers_ratio": uncompressed / compressed}


def _record(measured: dict[str, Any], name: str, losses: Mapping[str, float]) -> None:
    for prefix, value in losses.items():
        measured[f"{prefix}{name}"] = value


def run_one(task: str | Task, config: RunConfig, budget: Budget | None = None) -> dict[str, Any]:
    """Run one configuration and return its result row (see the module docstring for the recipe).

    Parameters
    ----------
    task : str or Task
        A name of :data:`TASKS` (``"digits"``, ``"mnist1d"``, ``"minilm"``) or a :class:`Task`.
    config : RunConfig
    budget : Budget, optional
        Default: the task's ``budget``.

    Returns
    -------
    dict
        The row: the :data:`RUN_KEY` columns, ``megabytes`` and ``ratio`` (:func:`~lr2vq_analysis.size.size_report`
        of the plan; the whole model), ``layers_megabytes`` and ``layers_ratio`` (the compressed weights
        alone), the task's metric (``accuracy`` or ``cosine``; below ``<metric>``) on the test split and
        ``val_<metric>`` after fine-tuning, ``<metric>_start`` (right after compression, before any
        training), ``<metric>_quantized`` (after k-means and batch-norm re-estimation, before the codebook
        stage), the ρ measurements ``loss_pretrained``, ``loss_truncated``, ``loss_lowrank``,
        ``loss_dense_reference`` (mean task loss on the training split in eval mode, and the same with a
        ``val_`` prefix on the validation split; LR²VQ with d̃ < m only, else NaN), the weight errors
        ``lowrank_error`` and ``clustering_error`` (relative to the weights they approximate), ``layer_k``
        and ``seconds``.

    Examples
    --------
    >>> row = run_one("digits", RunConfig("pq", k=16, m=9, d_tilde=9, seed=0, lr=1e-3), Budget(2, 0, 32))
    >>> row["method"], row["k"], row["steps"], 0.0 <= row["accuracy"] <= 1.0
    ('pq', 16, 2, True)
    """
    started = time.perf_counter()
    task = _task(task)
    budget = task.budget if budget is None else budget
    metric, evaluate = task.metric, task.evaluate
    torch.manual_seed(config.seed)
    model = task.load_model()
    splits = task.load_splits(task.train_cut_seed)
    loaders = make_loaders(splits, budget.batch_size, config.seed)
    evaluation = _eval_loaders(task, splits)
    nan = float("nan")
    row: dict[str, Any] = {
        "task": task.name,
        **asdict(config),
        "steps": budget.steps,
        "lowrank_steps": budget.lowrank_steps if config.method in ("lr2vq", "dkm") else 0,
        "batch_size": budget.batch_size,
    }
    measured: dict[str, Any] = dict.fromkeys(
        (f"{metric}_start", f"{metric}_quantized", "loss_pretrained", "loss_truncated", "loss_lowrank"), nan
    )
    measured.update(loss_dense_reference=nan, lowrank_error=nan, clustering_error=nan, layer_k="")
    for name in _RHO_LOSSES:
        measured[f"val_{name}"] = nan

    if config.method == "uncompressed":
        sizes = size_report(model)
        final: nn.Module = model
    else:
        plan = make_plan(model, task.layers, config.k, config.m, config.d_tilde)
        sizes = size_report(model, plan)
        measured["layer_k"] = "/".join(str(entry.k) for entry in plan.values())
        originals = {name: model.state_dict()[name].detach().clone() for name in plan}
        lowrank = config.method in ("lr2vq", "dkm")
        probe_rho = config.method == "lr2vq" and config.d_tilde < config.m
        weights: dict[str, dict[str, torch.Tensor]] = {}

        def compressed(cmodel: CompressedModel) -> None:
            if config.method != "dkm":
                measured["lowrank_error"] = _relative_error(_layer_weights(cmodel), originals)
            if probe_rho:
                _record(measured, "loss_pretrained", _losses(task, model, evaluation))
                recalibrate_batchnorm(cmodel, loaders["train"])  # "free" recovery, not training
                _record(measured, "loss_truncated", _losses(task, cmodel, evaluation))
            if lowrank:
                measured[f"{metric}_start"] = evaluate(cmodel, evaluation["test"])

        def after_lowrank(cmodel: CompressedModel) -> None:
            if probe_rho:
                _record(measured, "loss_lowrank", _losses(task, cmodel, evaluation))
                reference = _dense_reference_loss(
                    task, config.seed, float(config.lr), int(budget.lowrank_steps or 0), budget.batch_size
                )
                _record(measured, "loss_dense_reference", reference)
            weights["before_quantizing"] = _layer_weights(cmodel)

        def quantized(cmodel: CompressedModel) -> None:
            measured["clustering_error"] = _relative_error(_layer_weights(cmodel), weights["before_quantizing"])

        def recalibrated(cmodel: CompressedModel) -> None:
            measured[f"{metric}_quantized"] = evaluate(cmodel, evaluation["test"])
            if not lowrank:
                measured[f"{metric}_start"] = measured[f"{metric}_quantized"]

        cmodel = recipe.run_recipe(
            model,
            plan,
            loaders["train"],
            budget=recipe.Budget(budget.steps, budget.lowrank_steps if lowrank else 0),
            method="dkm" if config.method == "dkm" else "lr2vq",
            loss_fn=task.loss,
            training=TrainingConfig(lr=config.lr),
            callbacks={
                "compressed": compressed,
                "lowrank": after_lowrank,
                "quantized": quantized,
                "recalibrated": recalibrated,
            },
            seed=config.seed,
            device="cpu",
            progress=False,
        ).model
        final = cmodel
    row.update(
        megabytes=sizes.megabytes,
        ratio=sizes.ratio,
        **layer_sizes(sizes, task.layers),
        **{metric: evaluate(final, evaluation["test"]), f"val_{metric}": evaluate(final, evaluation["val"])},
        split="test",
        **measured,
        seconds=round(time.perf_counter() - started, 2),
    )
    if config.method == "uncompressed":
        row.update(k=nan, m=nan, d_tilde=nan)
    return row


# --------------------------------------------------------------------------------------------------
# a sweep


def _key_of(row: Mapping[str, Any]) -> tuple[Any, ...]:
    def norm(value: Any) -> Any:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        if isinstance(value, (int, float, np.integer, np.floating)):
            return round(float(value), 12)
        return str(value)

    ignored = ("k", "m", "d_tilde") if row["method"] == "uncompressed" else ()
    return tuple(None if column in ignored else norm(row[column]) for column in RUN_KEY)


def _read_rows(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.is_file() and path.stat().st_size else pd.DataFrame()


def run_sweep(
    task: str | Task,
    configs: Iterable[RunConfig],
    out: str | Path,
    *,
    budget: Budget | None = None,
    n_jobs: int = 1,
    progress: bool = True,
) -> pd.DataFrame:
    """Run every configuration not yet in ``out`` and append its row to that CSV (rewritten atomically).

    Parameters
    ----------
    task : str or Task
    configs : iterable of RunConfig
    out : path
        The runs CSV; created when missing. Rows whose :data:`RUN_KEY` is already there are skipped, so an
        interrupted sweep resumes where it stopped.
    budget : Budget, optional
        Default: the task's ``budget``.
    n_jobs : int, default 1
        Worker processes (joblib); every worker uses one torch thread.
    progress : bool, default True
        Print one line per finished run.

    Returns
    -------
    pandas.DataFrame
        Every row of ``out`` after the sweep.
    """
    task_obj = _task(task)
    budget = task_obj.budget if budget is None else budget
    metric = task_obj.metric
    n_jobs = check_n_jobs(n_jobs)
    path = Path(out)
    rows: list[dict[str, Any]] = [
        {str(key): value for key, value in row.items()} for row in _read_rows(path).to_dict("records")
    ]
    done = {_key_of(row) for row in rows}
    pending = []
    for config in configs:
        probe = {"task": task_obj.name, **asdict(config), "steps": budget.steps, "batch_size": budget.batch_size}
        probe["lowrank_steps"] = budget.lowrank_steps if config.method in ("lr2vq", "dkm") else 0
        if _key_of(probe) not in done:
            pending.append(config)
            done.add(_key_of(probe))
    if progress:
        print(f"{task_obj.name}: {len(pending)} run(s) to do, {len(rows)} already in {path}", flush=True)
    for index, row in enumerate(_execute(task_obj.name, pending, budget, n_jobs), start=1):
        rows.append(row)
        write_atomic(path, pd.DataFrame(rows).to_csv(index=False).encode())
        if progress:
            print(
                f"[{index}/{len(pending)}] {row['method']} k={row['k']} m={row['m']} d~={row['d_tilde']} "
                f"seed={row['seed']} lr={row['lr']:g}: {row['megabytes'] * 1024:.1f} KiB, "
                f"test {metric} {row[metric]:.4f}, val {row[f'val_{metric}']:.4f} ({row['seconds']:.0f} s)",
                flush=True,
            )
    return pd.DataFrame(rows)


def _run_in_worker(task_name: str, config: RunConfig, budget: Budget) -> dict[str, Any]:
    torch.set_num_threads(1)
    return run_one(task_name, config, budget)


def _execute(task_name: str, configs: Sequence[RunConfig], budget: Budget, n_jobs: int) -> Iterator[dict[str, Any]]:
    if n_jobs == 1:
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for config in configs:
                yield run_one(task_name, config, budget)
        finally:
            torch.set_num_threads(previous)
        return
    from joblib import Parallel, delayed

    parallel = Parallel(n_jobs=n_jobs, return_as="generator_unordered")
    yield from parallel(delayed(_run_in_worker)(task_name, config, budget) for config in configs)


# --------------------------------------------------------------------------------------------------
# analysis of the results


def select_learning_rates(
    runs: pd.DataFrame, tune_seeds: Iterable[int] | None = None, metric: str = "accuracy"
) -> pd.DataFrame:
    """Keep, per (task, method, k, m, d̃, budget), the rows of the learning rate with the best mean validation metric.

    Ties go to the smaller learning rate. The test split plays no part in the choice.

    Parameters
    ----------
    runs : pandas.DataFrame
        Rows of :func:`run_one`.
    tune_seeds : iterable of int, optional
        Seeds whose validation accuracy decides (default: all). A sweep can try every rate on these seeds
        only and run the other seeds at the chosen rate; the choice then stays the same when seeds are added.
    metric : str, default "accuracy"
        The choice maximises the mean of the column ``val_<metric>``.

    Returns
    -------
    pandas.DataFrame
        The rows (every seed) of the chosen learning rate of each configuration.

    Examples
    --------
    >>> runs = pd.DataFrame({"task": "t", "method": "pq", "k": 16, "m": 9, "d_tilde": 9, "steps": 10,
    ...     "lowrank_steps": 0, "batch_size": 8, "seed": [0, 1, 0, 1], "lr": [1e-3, 1e-3, 3e-3, 3e-3],
    ...     "val_accuracy": [0.9, 0.8, 0.95, 0.9], "accuracy": [0.99, 0.99, 0.5, 0.5]})
    >>> select_learning_rates(runs)["lr"].unique().tolist()
    [0.003]
    """
    group = ["task", "method", "k", "m", "d_tilde", "steps", "lowrank_steps", "batch_size"]
    deciding = runs if tune_seeds is None else runs[runs["seed"].isin([int(seed) for seed in tune_seeds])]
    means = deciding.groupby([*group, "lr"], dropna=False)[f"val_{metric}"].mean().reset_index()
    means = means.sort_values([*group, f"val_{metric}", "lr"], ascending=[True] * len(group) + [False, True])
    best = means.drop_duplicates(group, keep="first")[[*group, "lr"]]
    return runs.merge(best, on=[*group, "lr"], how="inner")


def measure_rho(runs: pd.DataFrame, split: str = "train") -> pd.DataFrame:
    """ρ per LR²VQ run: the share of the truncation damage that the low-rank stage does not recover.

    ρ = (L_lowrank − L_dense) / (L_truncated − L_pretrained), with L the mean cross-entropy on the training
    (or validation) split in eval mode: L_pretrained of the pretrained model, L_truncated right after the rank-d̃
    truncation (batch-norm statistics re-estimated: that recovery is free, not training), L_lowrank after
    the low-rank stage and L_dense of the *uncompressed* model fine-tuned with the same steps, learning
    rate and seed (what training alone does to the loss). ρ = 0: training recovered everything; ρ = 1:
    nothing. For small perturbations the loss increase is proportional to the squared weight error
    (second-order expansion), so this loss ratio estimates the weight the trade-off model gives the
    low-rank error. On the training split a net that can fit its training data drives both L_lowrank
    and L_dense to ~0, so ρ(train) ≈ 0 says little; the validation split measures what generalises.

    Parameters
    ----------
    runs : pandas.DataFrame
        Rows of :func:`run_one`.
    split : {"train", "val"}, default "train"
        Which losses to use (``loss_*`` or ``val_loss_*``).

    Returns
    -------
    pandas.DataFrame
        The LR²VQ rows with d̃ < m and a column ``rho``.

    Examples
    --------
    >>> runs = pd.DataFrame({"method": ["lr2vq"], "m": [9], "d_tilde": [4], "loss_pretrained": [0.1],
    ...     "loss_truncated": [0.5], "loss_lowrank": [0.15], "loss_dense_reference": [0.05]})
    >>> float(measure_rho(runs)["rho"].iloc[0])
    0.25
    """
    if split not in ("train", "val"):
        raise InvalidParameterError(f"split={split!r} is invalid; use 'train' or 'val'")
    prefix = "" if split == "train" else "val_"
    rows = runs[(runs["method"] == "lr2vq") & (runs["d_tilde"] < runs["m"])].copy()
    damage = rows[f"{prefix}loss_truncated"] - rows[f"{prefix}loss_pretrained"]
    rows["rho"] = (rows[f"{prefix}loss_lowrank"] - rows[f"{prefix}loss_dense_reference"]) / damage
    return rows


def rho_consistent_range(report: Any, best_d_tildes: Iterable[int], grid: Sequence[float] | None = None) -> list[float]:
    """The ρ values for which the analysis's global d̃ falls among ``best_d_tildes`` (e.g. the measured plateau).

    Parameters
    ----------
    report : Report
        :func:`~lr2vq_analysis.report.analyze` of the pretrained model at the sweep's (k, m).
    best_d_tildes : iterable of int
        d̃ values counted as right (the best fine-tuned d̃, or the plateau within one standard error of it).
    grid : sequence of float, optional
        ρ values to try (default 0.05, 0.10, ..., 1.00).

    Returns
    -------
    list of float
        The grid values that predict a d̃ in ``best_d_tildes``.
    """
    grid = [round(0.05 * i, 2) for i in range(1, 21)] if grid is None else list(grid)
    wanted = {int(d) for d in best_d_tildes}
    return [rho for rho in grid if report.with_rho(rho).global_d_tilde in wanted]


def plateau(selected: pd.DataFrame, metric: str = "accuracy") -> dict[tuple[int, int], dict[str, Any]]:
    """Per (k, m) of the LR²VQ rows: best d̃ by mean ``metric`` and the d̃ within one standard error of it.

    A (k, m) run at a single d̃ has no curve to find a best d̃ on and is left out.
    """
    out: dict[tuple[int, int], dict[str, Any]] = {}
    lr2vq = selected[selected["method"] == "lr2vq"]
    for key, group in lr2vq.groupby(["k", "m"]):
        k, m = (int(value) for value in cast(tuple[Any, Any], key))
        stats = group.groupby("d_tilde")[metric].agg(["mean", "std", "count"])
        if len(stats) < 2:
            continue
        means = {int(d): float(value) for d, value in zip(stats.index.tolist(), stats["mean"].tolist(), strict=True)}
        best = max(means, key=means.__getitem__)
        spread = dict(zip(stats.index.tolist(), stats["std"].tolist(), strict=True))[best]
        count = dict(zip(stats.index.tolist(), stats["count"].tolist(), strict=True))[best]
        se = float(spread) / math.sqrt(float(count))
        if math.isnan(se):  # one seed: no spread to speak of
            se = 0.0
        inside = [d for d, value in means.items() if value >= means[best] - se]
        out[(k, m)] = {"best": best, "plateau": inside, "stats": stats}
    return out


def save_json(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Write JSON atomically (numbers and lists only)."""
    return write_atomic(path, (json.dumps(data, indent=2, default=float) + "\n").encode())
