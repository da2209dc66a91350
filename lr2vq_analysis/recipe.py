"""The LR²VQ training recipe, written once: compress → low-rank stage → quantize → re-estimate batch norm →
codebook stage → fp16.

:func:`run_recipe` takes the pretrained model, a plan and the training data, and returns the compressed,
fine-tuned model. Its length is one :class:`Budget` (optimizer steps in all, and how many of them the
first stage gets); its other options are those of :func:`~lr2vq_analysis.finetune.finetune`
(:class:`~lr2vq_analysis.finetune.TrainingConfig`, :class:`~lr2vq_analysis.finetune.DistillationConfig`).
What a caller measures between the stages goes into ``callbacks``: a mapping from a stage name of
:data:`STAGES` to a function of the model, called right after that stage; what it returns is kept in
``RecipeResult.measurements``. The demo (:func:`~lr2vq_analysis.pipeline.compress_digits_demo`), the
sweeps, the notebooks and the docs all call this function.

=================  =======================================================================================
stage              what has just happened
=================  =======================================================================================
``"compressed"``   the planned layers were replaced by Z·P (spectrum initialisation; DKM: soft centroids)
``"lowrank"``      the first stage trained Z and P end to end (``budget.lowrank_steps``; DKM: soft k-means)
``"quantized"``    k-means on Z (codes fixed from here on), codebook and P rounded to fp16
``"recalibrated"`` the batch-norm statistics were re-estimated from the training data
``"codebook"``     the codebook stage trained codebooks, P, batch norm and the uncompressed layers, with
                   distillation from ``teacher`` when one is given (``budget.codebook_steps``)
``"rounded"``      codebooks and P rounded to fp16 again: the model now gives the saved file's outputs
=================  =======================================================================================

A stage with no steps is skipped (its callback still runs). Plain PQ is ``Budget(steps, lowrank_steps=0)``
with a plan of d̃ = m.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ._validation import InvalidParameterError, check_count, check_seed
from .finetune import (
    CheckpointConfig,
    DistillationConfig,
    FinetuneResult,
    TrainingConfig,
    finetune,
    recalibrate_batchnorm,
)
from .nn import CompressedModel, compress
from .plan import LayerPlan

__all__ = ["Budget", "RecipeResult", "STAGES", "run_recipe"]

#: The points of the recipe a callback can be attached to, in order.
STAGES = ("compressed", "lowrank", "quantized", "recalibrated", "codebook", "rounded")
_METHODS = ("lr2vq", "dkm")

Callback = Callable[[CompressedModel], Any]


@dataclass(frozen=True)
class Budget:
    """Training budget after the pretrained start: optimizer steps in all, and the first stage's share.

    Parameters
    ----------
    steps : int, default 600
        Optimizer steps of the whole recipe (0: no training at all).
    lowrank_steps : int, optional
        Of those, the steps of the first stage (LR²VQ's low-rank stage, DKM's soft stage); the rest
        train the codebooks. Default: half of ``steps`` (rounded down). 0 for plain PQ.

    Examples
    --------
    >>> Budget(600)
    Budget(steps=600, lowrank_steps=300)
    >>> Budget(40, lowrank_steps=0).codebook_steps
    40
    """

    steps: int = 600
    lowrank_steps: int | None = None

    def __post_init__(self) -> None:
        steps = check_count(self.steps, "steps", minimum=0)
        lowrank = (
            steps // 2 if self.lowrank_steps is None else check_count(self.lowrank_steps, "lowrank_steps", minimum=0)
        )
        if lowrank > steps:
            raise InvalidParameterError(f"lowrank_steps={lowrank} is invalid; it must be <= steps={steps}")
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "lowrank_steps", lowrank)

    @property
    def codebook_steps(self) -> int:
        """Steps of the codebook stage: ``steps - lowrank_steps``."""
        return self.steps - int(self.lowrank_steps or 0)


@dataclass
class RecipeResult:
    """What :func:`run_recipe` produced.

    Attributes
    ----------
    model : CompressedModel
        The compressed, fine-tuned model, quantized, its codebooks and P rounded to fp16 (train mode,
        on the device it was trained on).
    budget : Budget
        The budget that was spent.
    history : dict of str to FinetuneResult
        The ``"lowrank"`` (or ``"dkm"``) and ``"codebook"`` runs that had steps.
    measurements : dict of str to object
        What each stage's callback returned (stages whose callback returned None are left out).
    seconds : dict of str to float
        Wall time of each stage and ``"total"`` (callbacks included).
    """

    model: CompressedModel
    budget: Budget
    history: dict[str, FinetuneResult] = field(default_factory=dict)
    measurements: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def __repr__(self) -> str:
        runs = ", ".join(f"{stage}: {run.steps} steps" for stage, run in self.history.items()) or "no training"
        layers = len(self.model.compressed_layers())
        return f"RecipeResult({layers} compressed layers, {runs}, {self.seconds.get('total', 0.0):.1f} s)"


def run_recipe(
    model: nn.Module,
    plan: Mapping[str, LayerPlan],
    train_loader: Iterable[Any],
    *,
    budget: Budget | None = None,
    method: Literal["lr2vq", "dkm"] = "lr2vq",
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    teacher: nn.Module | None = None,
    distillation: DistillationConfig | str | None = None,
    training: TrainingConfig | None = None,
    eval_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
    callbacks: Mapping[str, Callback] | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    kmeans_options: Mapping[str, Any] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> RecipeResult:
    """Compress a pretrained model with LR²VQ and fine-tune it: the whole recipe, stage by stage.

    Parameters
    ----------
    model : nn.Module
        The pretrained model; it is copied (:func:`~lr2vq_analysis.nn.compress`) and left untouched.
    plan : mapping of str to LayerPlan
        Layer → (k, m, d̃), e.g. ``report.plan()``.
    train_loader : iterable of batches
        Training batches (the batch contract of :mod:`lr2vq_analysis.finetune`), also used to
        re-estimate batch norm.
    budget : Budget, optional
        Steps in all and of the first stage. Default ``Budget()`` (600 steps, 300 + 300).
    method : {"lr2vq", "dkm"}, default "lr2vq"
        ``"dkm"``: the first stage trains DKM's soft assignment instead of Z·P.
    loss_fn : callable (output, target) -> loss, optional
        Task loss of both stages (default cross-entropy).
    teacher : nn.Module, optional
        Distil from it in the codebook stage (usually ``model`` itself).
    distillation : DistillationConfig or {"kl", "mse"}, optional
        How (needs ``teacher``; default pure KL at temperature 1).
    training : TrainingConfig, optional
        Optimizer, learning rate, schedule, clipping, non-finite policy and threads of both stages; its
        ``steps``/``epochs`` must be unset (the budget sets them).
    eval_fn : callable (model) -> dict, optional
        Evaluated at the end of each training stage (``FinetuneResult.evals``).
    callbacks : mapping of stage name to callable (model) -> object, optional
        Called right after each stage of :data:`STAGES`; results go to ``RecipeResult.measurements``.
        A callback may change the model (e.g. re-estimate batch norm before the low-rank stage).
    checkpoint_dir : path, optional
        Checkpoint each training stage to ``<dir>/<stage>.ckpt`` (resumed when present: a killed
        recipe run again with the same arguments continues where it stopped).
    kmeans_options : mapping, optional
        Options of the k-means of the quantize step: ``{"config": KMeansConfig(...)}`` (see
        :meth:`~lr2vq_analysis.nn.CompressedModel.quantize`; its other keyword options are deprecated).
    seed : int, default 0
        Seeds k-means, DKM's initial centroids, and the data order and dropout of both stages.
    device : torch.device or str, optional
        Where to train (default: CUDA when available, else the CPU).
    progress : bool, default True
        Progress bars of the training stages.

    Returns
    -------
    RecipeResult

    Raises
    ------
    InvalidParameterError
        On a bad budget, method, callback name or option (and as :func:`~lr2vq_analysis.nn.compress`
        and :func:`~lr2vq_analysis.finetune.finetune`).

    Examples
    --------
    >>> from lr2vq_analysis.datasets import digits_loaders
    >>> from lr2vq_analysis.models.digits import load_bundled_model
    >>> pretrained = load_bundled_model("digits-cnn")
    >>> plan = {"conv4.weight": LayerPlan(k=16, m=9, d_tilde=4)}
    >>> result = run_recipe(pretrained, plan, digits_loaders(64)["train"], budget=Budget(4), progress=False)
    >>> {stage: run.steps for stage, run in result.history.items()}
    {'lowrank': 2, 'codebook': 2}
    >>> result.model.compressed_layers()["conv4.weight"].state
    'quantized'
    """
    started = time.perf_counter()
    budget = Budget() if budget is None else budget
    if not isinstance(budget, Budget):
        raise InvalidParameterError(f"budget={budget!r} is invalid; give a Budget(steps, lowrank_steps)")
    if method not in _METHODS:
        raise InvalidParameterError(f"method={method!r} is invalid; allowed methods are {list(_METHODS)}")
    training = TrainingConfig() if training is None else training
    if not isinstance(training, TrainingConfig):
        raise InvalidParameterError(f"training={training!r} is invalid; give a TrainingConfig")
    if training.steps is not None or training.epochs is not None:
        raise InvalidParameterError(
            "training.steps and training.epochs must be unset: the budget sets each stage's length"
        )
    callbacks = dict(callbacks or {})
    unknown = sorted(set(callbacks) - set(STAGES))
    if unknown:
        raise InvalidParameterError(f"callbacks for {unknown} are invalid; the stages are {list(STAGES)}")
    if distillation is not None and teacher is None:
        raise InvalidParameterError(f"distillation={distillation!r} needs a teacher model (teacher=...)")
    seed = check_seed(seed)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    result = RecipeResult(model=None, budget=budget)  # type: ignore[arg-type]
    clock = [time.perf_counter()]

    def done(stage: str, cmodel: CompressedModel) -> None:
        callback = callbacks.get(stage)
        if callback is not None:
            value = callback(cmodel)
            if value is not None:
                result.measurements[stage] = value
        now = time.perf_counter()
        result.seconds[stage] = now - clock[0]
        clock[0] = now

    def train(cmodel: CompressedModel, stage: str, steps: int, **options: Any) -> None:
        checkpoint = CheckpointConfig(folder / f"{stage}.ckpt") if folder is not None else None
        result.history[stage] = finetune(
            cmodel, train_loader, stage=stage, training=replace(training, steps=check_count(steps, "steps")),
            loss_fn=loss_fn, eval_fn=eval_fn, checkpoint=checkpoint, seed=seed, device=device, progress=progress,
            **options,
        )  # fmt: skip

    cmodel = compress(model, plan, seed=seed, method=method)
    result.model = cmodel
    done("compressed", cmodel)
    if budget.lowrank_steps:
        train(cmodel, "dkm" if method == "dkm" else "lowrank", int(budget.lowrank_steps))
    done("lowrank", cmodel)
    cmodel.quantize(seed=seed, **dict(kmeans_options or {}))
    done("quantized", cmodel)
    recalibrate_batchnorm(cmodel, train_loader, num_threads=training.num_threads)
    done("recalibrated", cmodel)
    if budget.codebook_steps:
        train(cmodel, "codebook", budget.codebook_steps, teacher=teacher, distillation=distillation)
    done("codebook", cmodel)
    cmodel.round_fp16_()
    done("rounded", cmodel)
    result.seconds["total"] = time.perf_counter() - started
    return result
