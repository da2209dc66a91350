"""Fine-tuning of compressed models: the low-rank stage, the codebook stage, distillation, DDP.

One compact loop, :func:`finetune`, trains every parameter that requires grad. Its defaults follow PQF
("And the bit goes down"): Adam at 1e-3 with a cosine schedule down to 1e-6 over the run. It checks
that the compressed layers are in the state the stage needs, stops on a non-finite loss or gradient,
checkpoints atomically with a checksum, resumes to the very same result (and refuses to resume a
different run), and runs under ``torchrun`` with DistributedDataParallel.

Its options are three frozen dataclasses, validated once at construction: :class:`TrainingConfig`
(length, optimizer, schedule, clipping, non-finite policy, threads), :class:`DistillationConfig` and
:class:`CheckpointConfig`. The common case needs none of them:
``finetune(model, loader, stage="lowrank", steps=300, lr=1e-3, checkpoint="run.ckpt")``.

Batch contract
--------------
A batch from ``train_loader`` is one of

* ``(inputs, target)`` — a tuple or list; the model is called as ``model(inputs)``;
* ``(inputs,)`` or a bare tensor — no target (distillation only);
* a ``Mapping`` of tensors (e.g. a tokenizer's output) — the model is called as ``model(**batch)``
  with every key except ``"labels"``, which, when present, is the target.

``inputs`` may itself be a Mapping (then ``model(**inputs)``). The tensor the losses see is the
model's output when it is a tensor, else its ``logits``, else its ``last_hidden_state`` (transformers
outputs), else the first element of a tuple. Wrap the model when you need anything else (pooling).

Data order
----------
``train_loader`` is iterated as given, once per epoch (its workers, ``prefetch_factor``,
``persistent_workers``, ``pin_memory``, collate function and sampler are the caller's). For a
:class:`~torch.utils.data.DataLoader`, the loop makes the order depend only on ``seed`` and the epoch,
so that a resumed run replays exactly the batches the interrupted one would have seen:

* a :class:`~torch.utils.data.RandomSampler` (``shuffle=True``) draws each epoch's permutation from a
  generator seeded with ``seed + epoch`` (the caller's generator is put back afterwards, untouched);
* a :class:`~torch.utils.data.DistributedSampler` gets ``set_epoch(epoch)`` (its own ``seed`` applies):
  under ``torchrun`` this is how each rank gets its shard; a loader without one is not sharded (every
  rank sees every batch, and a warning says so);
* the data-loading workers are seeded from ``seed + epoch``.

A resumed run skips the batches already consumed in the current epoch by drawing them (they are
loaded, not trained on).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler

from ._io import write_atomic
from ._threads import torch_threads
from ._validation import InvalidParameterError, LR2VQError, check_count, check_param, check_seed
from .exceptions import CheckpointError, NonFiniteError, ResumeMismatchError

__all__ = [
    "CheckpointConfig",
    "DistillationConfig",
    "FinetuneResult",
    "StageError",
    "TrainingConfig",
    "finetune",
    "recalibrate_batchnorm",
]

#: Compressed-layer state each stage needs (``None``: no requirement).
STAGE_STATES: dict[str, str | None] = {"lowrank": "lowrank", "codebook": "quantized", "dkm": "dkm", "dense": None}
_LAYER_STATES = frozenset({"lowrank", "quantized", "dkm"})
_CHECKPOINT_FORMAT = "lr2vq-finetune-checkpoint"
_CHECKPOINT_VERSION = 2
#: ``num_threads="auto"`` runs models with fewer parameters than this on one CPU thread (see TrainingConfig).
AUTO_THREADS_MAX_PARAMETERS = 2_000_000

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer, int], Any]
ThreadSetting = int | Literal["auto"] | None


class StageError(LR2VQError, RuntimeError):
    """The model's compressed layers are not in the state the fine-tuning stage needs."""


# --------------------------------------------------------------------------------------------------
# configuration objects


def _check_threads(value: Any, name: str = "num_threads") -> ThreadSetting:
    if value is None or value == "auto":
        return value
    if isinstance(value, str):
        raise InvalidParameterError(f"{name}={value!r} is invalid; use 'auto', None or an integer >= 1")
    return check_count(value, name)


@dataclass(frozen=True)
class TrainingConfig:
    """How long and how to train: optimizer, schedule, clipping, non-finite policy, threads.

    Parameters
    ----------
    steps, epochs : int, optional
        Length of the run, in optimizer steps or epochs (at most one; default one epoch).
    lr, lr_min : float, default 1e-3, 1e-6
        Initial learning rate of the default Adam, and the end of the cosine schedule.
    optimizer : callable (list of parameters) -> Optimizer, optional
        Optimizer factory. Default: ``Adam(params, lr=lr)``.
    scheduler : "cosine", "constant" or callable (optimizer, total_steps) -> scheduler
        Learning-rate schedule, stepped once per optimizer step.
    grad_clip : float, optional
        Clip the global gradient norm to this value.
    on_nonfinite : {"raise", "skip"}, default "raise"
        What a NaN/Inf loss or gradient does. ``"raise"``: stop with
        :class:`~lr2vq_analysis.exceptions.NonFiniteError` naming the step and the last good
        checkpoint; the model keeps the weights from before that step. ``"skip"``: that step makes no
        update (gradients dropped, optimizer state unchanged) but still counts as a step and advances
        the schedule; its loss is recorded as NaN and the step number in ``FinetuneResult.skipped``.
    num_threads : int, "auto" or None, default "auto"
        torch CPU threads during the run (restored afterwards; ignored on GPUs). ``"auto"``: one
        thread for models with fewer than :data:`AUTO_THREADS_MAX_PARAMETERS` parameters, whose small
        operations gain nothing from more threads; for larger ones, the current setting capped at the
        cores that no other process is using when the run starts (Linux; elsewhere the current
        setting). More threads than free cores lose 4–12× to OpenMP spin-waiting (docs/performance.md).
        The thread count can change floating-point rounding: give an int for runs that must be
        bit-identical across machines and loads. None: the current setting.

    Examples
    --------
    >>> TrainingConfig(steps=100, lr=1e-2)
    TrainingConfig(steps=100, lr=0.01)
    >>> TrainingConfig(steps=5, epochs=1)
    Traceback (most recent call last):
    ...
    lr2vq_analysis.exceptions.InvalidParameterError: give steps or epochs, not both (got steps=5, epochs=1)
    """

    steps: int | None = None
    epochs: int | None = None
    lr: float = 1e-3
    lr_min: float = 1e-6
    optimizer: OptimizerFactory | None = None
    scheduler: str | SchedulerFactory = "cosine"
    grad_clip: float | None = None
    on_nonfinite: Literal["raise", "skip"] = "raise"
    num_threads: ThreadSetting = "auto"

    def __post_init__(self) -> None:
        for name in ("steps", "epochs"):
            if getattr(self, name) is not None:
                check_count(getattr(self, name), name)
        if self.steps is not None and self.epochs is not None:
            raise InvalidParameterError(
                f"give steps or epochs, not both (got steps={self.steps}, epochs={self.epochs})"
            )
        lr = check_param("lr", self.lr)
        check_param("lr_min", self.lr_min, high=lr)
        check_param("grad_clip", self.grad_clip)
        if not callable(self.scheduler) and self.scheduler not in ("cosine", "constant"):
            raise InvalidParameterError(
                f"scheduler={self.scheduler!r} is invalid; use 'cosine', 'constant' "
                "or a callable (optimizer, total_steps) -> scheduler"
            )
        if self.optimizer is not None and not callable(self.optimizer):
            raise InvalidParameterError(
                f"optimizer={self.optimizer!r} is invalid; give a callable (params) -> Optimizer"
            )
        check_param("on_nonfinite", self.on_nonfinite)
        _check_threads(self.num_threads)

    def __repr__(self) -> str:  # only what differs from the defaults
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if getattr(self, f.name) != f.default]
        return f"TrainingConfig({', '.join(changed)})"


@dataclass(frozen=True)
class DistillationConfig:
    """Knowledge distillation from a teacher: ``weight · distillation + (1 − weight) · task loss``.

    Parameters
    ----------
    kind : {"kl", "mse"}, default "kl"
        KL on logits with ``temperature`` (Hinton et al., scaled by T²), or MSE on embeddings.
    weight : float in [0, 1], default 1.0
        1.0 is pure distillation (no target needed).
    temperature : float > 0, default 1.0
        Softmax temperature of the KL loss.

    Examples
    --------
    >>> DistillationConfig(weight=0.5, temperature=2.0)
    DistillationConfig(kind='kl', weight=0.5, temperature=2.0)
    """

    kind: Literal["kl", "mse"] = "kl"
    weight: float = 1.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        check_param("distill", self.kind)
        object.__setattr__(self, "weight", check_param("distill_weight", self.weight))
        object.__setattr__(self, "temperature", check_param("temperature", self.temperature))


@dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often a run is checkpointed, and whether an existing checkpoint is resumed.

    Parameters
    ----------
    path : path
        Checkpoint file (model, optimizer, scheduler, random state, data position, history, the run's
        configuration and fingerprints, a SHA-256 checksum), written atomically by rank 0 every
        ``every`` steps and after the last one. It must be writable: this is checked before step 1.
    every : int, optional
        Checkpoint period in steps (default: only after the last step).
    resume : bool, default True
        When ``path`` exists, continue from it. It must come from the same run (same configuration,
        model and data); otherwise :class:`~lr2vq_analysis.exceptions.ResumeMismatchError` names the
        differing fields. A checkpoint of a finished run is loaded (its final weights and history) with
        a warning and no step is run. ``False``: start over and overwrite it.

    Examples
    --------
    >>> CheckpointConfig("run.ckpt", every=100)
    CheckpointConfig(path=PosixPath('run.ckpt'), every=100, resume=True)
    """

    path: Path
    every: int | None = None
    resume: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, os.PathLike)):
            raise InvalidParameterError(f"checkpoint path={self.path!r} is invalid; give a file path")
        object.__setattr__(self, "path", Path(self.path))
        if self.every is not None:
            check_count(self.every, "checkpoint_every")
        if not isinstance(self.resume, bool):
            raise InvalidParameterError(f"resume={self.resume!r} is invalid; it must be True or False")


@dataclass
class FinetuneResult:
    """What a :func:`finetune` run did.

    Attributes
    ----------
    steps : int
        Optimizer steps done in total (including those before a resume).
    losses : list of float
        Training loss at every step (averaged over ranks under DDP; NaN for a skipped step).
    lrs : list of float
        Learning rate of the first parameter group used at every step.
    evals : dict of int to dict
        ``eval_fn`` results, keyed by the step after which they were taken.
    resumed_from : int
        Step the run resumed from (0 for a fresh run; ``steps`` when the checkpoint held a finished run).
    stage : str
        The stage that was trained.
    skipped : list of int
        Steps skipped for a non-finite loss or gradient (``on_nonfinite="skip"``).
    """

    steps: int
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    resumed_from: int = 0
    stage: str = "dense"
    skipped: list[int] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        """Loss of the last step (NaN when no step ran)."""
        return self.losses[-1] if self.losses else math.nan

    def _summary_items(self) -> list[tuple[str, str]]:
        items = [("stage", self.stage), ("steps", str(self.steps))]
        if self.losses:
            items.append(("loss", f"{self.losses[0]:.4g} → {self.final_loss:.4g}"))
        if self.resumed_from:
            items.append(("resumed_from", str(self.resumed_from)))
        if self.skipped:
            items.append(("skipped", str(len(self.skipped))))
        if self.evals:
            last = max(self.evals)
            items.append((f"eval@{last}", ", ".join(f"{k}={v:.4g}" for k, v in self.evals[last].items())))
        return items

    def __repr__(self) -> str:
        return "FinetuneResult(" + ", ".join(f"{key}={value}" for key, value in self._summary_items()) + ")"

    def _repr_html_(self) -> str:
        import html

        rows = "".join(
            f"<tr><th style='text-align:left'>{html.escape(key)}</th><td>{html.escape(value)}</td></tr>"
            for key, value in self._summary_items()
        )
        return f"<table><caption>FinetuneResult</caption>{rows}</table>"


# --------------------------------------------------------------------------------------------------
# batches and outputs


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {key: _to_device(item, device) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(item, device) for item in value)
    return value


def split_batch(batch: Any, device: torch.device | None = None) -> tuple[Any, torch.Tensor | None]:
    """Split a batch into (model inputs, target or None) following the module's batch contract.

    Examples
    --------
    >>> x, y = torch.zeros(2, 3), torch.tensor([0, 1])
    >>> inputs, target = split_batch((x, y))
    >>> inputs.shape, target.tolist()
    (torch.Size([2, 3]), [0, 1])
    >>> inputs, target = split_batch({"input_ids": x, "labels": y})
    >>> sorted(inputs), target.tolist()
    (['input_ids'], [0, 1])
    """
    if device is not None:
        batch = _to_device(batch, device)
    if isinstance(batch, Mapping):
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        return inputs, batch.get("labels")
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
        return batch[0], (batch[1] if len(batch) == 2 else None)
    raise InvalidParameterError(
        f"a batch of type {type(batch).__name__}"
        + (f" with {len(batch)} elements" if isinstance(batch, (tuple, list)) else "")
        + " is not supported; a batch must be (inputs, target), (inputs,), a tensor or a Mapping of tensors"
    )


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def main_output(output: Any) -> torch.Tensor:
    """The tensor the losses see: the output itself, its ``logits``, its ``last_hidden_state``, or element 0."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise InvalidParameterError(
        f"cannot find the output tensor in a model output of type {type(output).__name__}; "
        "return a tensor, or an object with .logits or .last_hidden_state, or a tuple whose first element is one"
    )


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    """Knowledge-distillation loss of the student's output against the teacher's.

    ``"kl"``: Hinton's T²·KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over all leading
    positions (samples, tokens) of logits whose last axis is the class axis. ``"mse"``: mean squared
    error (embeddings of an encoder).

    Examples
    --------
    >>> logits = torch.tensor([[2.0, 0.0, -1.0]])
    >>> float(distillation_loss(logits, logits, "kl", 2.0))
    0.0
    """
    if kind == "mse":
        return F.mse_loss(student, teacher)
    classes = student.shape[-1]
    log_p_student = F.log_softmax(student.reshape(-1, classes) / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.reshape(-1, classes) / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


@dataclass(frozen=True)
class _Objective:
    """The training loss: (1 − w)·task loss + w·distillation loss, with w = distill_weight (0 without teacher)."""

    task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    teacher: nn.Module | None
    distill: str
    distill_weight: float
    temperature: float

    def __call__(self, output: torch.Tensor, target: torch.Tensor | None, inputs: Any) -> torch.Tensor:
        loss = output.new_zeros(())
        if self.distill_weight < 1.0:
            if target is None:
                raise InvalidParameterError(
                    "the batch has no target but a task loss is used; give (inputs, target) batches "
                    "or a teacher with distill_weight=1.0"
                )
            loss = loss + (1.0 - self.distill_weight) * self.task_loss(output, target)
        if self.teacher is not None and self.distill_weight > 0.0:
            with torch.no_grad():
                teacher_output = main_output(_call(self.teacher, inputs))
            distillation = distillation_loss(output, teacher_output, self.distill, self.temperature)
            loss = loss + self.distill_weight * distillation
        return loss


# --------------------------------------------------------------------------------------------------
# data order: the caller's loader, seeded per epoch, resumable


class _BatchStream:
    """Endless stream of batches of the caller's loader that knows its (epoch, batch) position.

    Each epoch iterates the loader again. For a DataLoader the epoch's order is made a function of
    (seed, epoch) — see the module docstring — by swapping in seeded generators while an epoch is
    opened; :meth:`close` puts the caller's generators back.
    """

    def __init__(self, loader: Iterable[Any], *, seed: int) -> None:
        self.epoch, self.batch = 0, 0
        self._loader = loader
        self._seed = seed
        self._iterator: Iterator[Any] | None = None
        self._saved: list[tuple[Any, str, Any]] = []
        self.batches_per_epoch: int | None = None
        with contextlib.suppress(TypeError, NotImplementedError):
            self.batches_per_epoch = len(loader) if isinstance(loader, Sized) else None
        self.sampler = getattr(loader, "sampler", None) if isinstance(loader, DataLoader) else None

    @property
    def sharded(self) -> bool:
        """Whether the loader gives each rank its own shard (a DistributedSampler)."""
        return isinstance(self.sampler, DistributedSampler)

    def seek(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch
        self._iterator = None

    def _swap(self, owner: Any, name: str, value: Any) -> None:
        if not any(saved[0] is owner and saved[1] == name for saved in self._saved):
            self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def close(self) -> None:
        """Drop the epoch's iterator and give the caller's loader its own generators back."""
        self._iterator = None
        for owner, name, value in reversed(self._saved):
            setattr(owner, name, value)
        self._saved.clear()

    def _open_epoch(self) -> Iterator[Any]:
        loader = self._loader
        if isinstance(loader, DataLoader):
            seed = self._seed + self.epoch
            if isinstance(self.sampler, DistributedSampler):
                self.sampler.set_epoch(self.epoch)
            elif isinstance(self.sampler, RandomSampler):
                self._swap(self.sampler, "generator", torch.Generator().manual_seed(seed))
            if not isinstance(loader.dataset, IterableDataset) or loader.num_workers:
                self._swap(loader, "generator", torch.Generator().manual_seed(seed))  # the workers' base seed
        iterator = iter(loader)
        for _ in range(self.batch):  # replay the part of the epoch already consumed
            next(iterator)
        return iterator

    def __next__(self) -> Any:
        for _ in range(2):
            if self._iterator is None:
                self._iterator = self._open_epoch()
            try:
                item = next(self._iterator)
            except StopIteration:
                self.epoch, self.batch, self._iterator = self.epoch + 1, 0, None
                continue
            self.batch += 1
            return item
        raise InvalidParameterError("train_loader yielded no batch in a whole epoch; it must yield at least one")


# --------------------------------------------------------------------------------------------------
# stages, distribution, checkpoints


def compressed_layer_states(model: nn.Module) -> dict[str, str]:
    """Name → state (``"lowrank"``, ``"quantized"`` or ``"dkm"``) of every compressed layer of a model.

    Uses ``model.compressed_layers()`` when the model has it, otherwise every submodule whose
    ``state`` attribute is one of the three states.

    Examples
    --------
    >>> compressed_layer_states(torch.nn.Linear(2, 2))
    {}
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    getter = getattr(model, "compressed_layers", None)
    if callable(getter):
        layers: Mapping[str, Any] = getter()
        return {name: str(getattr(layer, "state", "unknown")) for name, layer in layers.items()}
    return {
        name: module.state
        for name, module in model.named_modules()
        if isinstance(getattr(module, "state", None), str) and module.state in _LAYER_STATES
    }


def check_stage(model: nn.Module, stage: str | None) -> str:
    """Check that the model's compressed layers are in the state ``stage`` needs; return the stage name.

    Raises
    ------
    InvalidParameterError
        If ``stage`` is not one of ``"lowrank"``, ``"codebook"``, ``"dkm"``, ``"dense"`` or None.
    StageError
        If the model has no compressed layer (for a compressed stage) or one is in another state.
    """
    stage = "dense" if stage is None else stage
    if stage not in STAGE_STATES:
        raise InvalidParameterError(f"stage={stage!r} is invalid; allowed stages are {[*STAGE_STATES, None]}")
    needed = STAGE_STATES[stage]
    if needed is None:
        return stage
    states = compressed_layer_states(model)
    if not states:
        raise StageError(
            f"stage={stage!r} needs a compressed model, but the model has no compressed layer; "
            "compress it first (lr2vq_analysis.nn.compress) or use stage='dense'"
        )
    wrong = {name: state for name, state in states.items() if state != needed}
    if wrong:
        listed = ", ".join(f"{name!r} is {state!r}" for name, state in list(wrong.items())[:5])
        more = f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""
        hint = {"codebook": "; call model.quantize() after the low-rank stage"}.get(stage, "")
        raise StageError(f"stage={stage!r} needs every compressed layer in state {needed!r}, but {listed}{more}{hint}")
    return stage


@dataclass
class _Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device: torch.device | str | None) -> tuple[_Distributed, torch.device]:
    """Join (or start, from torchrun's environment) the process group and pick this rank's device."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    info = _Distributed()
    if dist.is_available() and (dist.is_initialized() or (env_world > 1 and "RANK" in os.environ)):
        info.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"
        if not dist.is_initialized():
            backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
            # Kept for later calls (a pipeline fine-tunes twice): destroying and re-creating a group
            # races between ranks. It is destroyed when the process exits.
            atexit.register(_destroy_process_group)
        info.rank, info.world_size = dist.get_rank(), dist.get_world_size()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and info.active:
        torch.cuda.set_device(resolved)
    return info, resolved


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# checkpoints: configuration, fingerprints, checksum, atomic write, validated read


def _digest(obj: Any, digest: Any, *, sample: int | None = None) -> None:
    """Feed a nested structure (tensors, mappings, sequences, scalars) into a hashlib digest.

    With ``sample``, a tensor contributes its dtype, shape and at most ``sample`` evenly spaced values.
    """
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu().reshape(-1)
        digest.update(f"T{tensor.dtype}{tuple(obj.shape)}".encode())
        if sample is not None and tensor.numel() > sample:
            tensor = tensor[:: -(-tensor.numel() // sample)]
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        digest.update(f"M{len(obj)}".encode())
        for key in sorted(obj, key=repr):
            digest.update(repr(key).encode())
            _digest(obj[key], digest, sample=sample)
    elif isinstance(obj, (list, tuple)):
        digest.update(f"L{len(obj)}".encode())
        for item in obj:
            _digest(item, digest, sample=sample)
    else:
        digest.update(f"S{type(obj).__name__}:{obj!r}".encode())


def _hexdigest(obj: Any, *, sample: int | None = None) -> str:
    digest = hashlib.sha256()
    _digest(obj, digest, sample=sample)
    return digest.hexdigest()


def _checksum(state: Mapping[str, Any]) -> str:
    return _hexdigest({key: value for key, value in state.items() if key != "checksum"})


def _name_of(thing: Any) -> str:
    """A stable name of a callable or object for the run configuration (module.qualname)."""
    target = getattr(thing, "func", thing)  # functools.partial
    module = getattr(target, "__module__", None) or type(target).__module__
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}.{qualname}"


def _plain(value: Any) -> Any:
    """A JSON-like copy (str/int/float/bool/None, lists and str-keyed dicts) for the checkpoint's config."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return repr(value)


def _model_fingerprint(model: nn.Module) -> str:
    """Names, shapes, dtypes and 64 sampled values of every tensor of the state_dict (cheap at any size)."""
    return _hexdigest(model.state_dict(), sample=64)[:16]


def _data_fingerprint(loader: Iterable[Any]) -> str:
    """Type, length, batch size and three sampled items of the data (map-style datasets; never iterates)."""
    described: dict[str, Any] = {"type": type(loader).__qualname__}
    if isinstance(loader, DataLoader):
        dataset = loader.dataset
        described.update(dataset=type(dataset).__qualname__, batch_size=loader.batch_size, drop_last=loader.drop_last)
        described["sampler"] = type(loader.sampler).__qualname__
        if not isinstance(dataset, IterableDataset) and isinstance(dataset, Sized):
            n = len(dataset)
            described["length"] = n
            with contextlib.suppress(Exception), _seeded_generators():  # random augmentation draws the same
                described["items"] = [dataset[i] for i in sorted({0, n // 2, n - 1}) if n]
    elif isinstance(loader, Sized):
        with contextlib.suppress(TypeError):
            described["length"] = len(loader)
    return _hexdigest(described, sample=256)[:16]


@contextlib.contextmanager
def _seeded_generators() -> Iterator[None]:
    """torch's, numpy's and Python's global generators seeded with 0 inside, restored afterwards."""
    import random

    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()  # noqa: NPY002  (the global one)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            random.seed(0)
            np.random.seed(0)  # noqa: NPY002
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)  # noqa: NPY002


def _check_writable(path: Path) -> None:
    """Fail before the first step when the checkpoint cannot be written where asked."""
    if path.is_dir():
        raise CheckpointError(f"checkpoint path {str(path)!r} is a folder; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is read-only")
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint path {str(path)!r} cannot be written ({exc.strerror or exc}); "
            "give a checkpoint path in a writable folder"
        ) from None


def _write_checkpoint(state: dict[str, Any], path: Path) -> None:
    state = {**state, "checksum": _checksum(state)}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        write_atomic(path, buffer.getvalue())
    except OSError as exc:
        raise CheckpointError(f"cannot write the checkpoint {str(path)!r}: {exc}") from exc


#: Fields of a checkpoint and the type each must have.
_CHECKPOINT_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": str, "version": int, "config": dict, "step": int, "position": list, "model": dict,
    "optimizer": dict, "scheduler": dict, "rng": dict, "history": dict, "checksum": str,
}  # fmt: skip


def _read_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """Load and check a checkpoint file: readable, of this format and version, complete, checksum intact."""
    where = f"checkpoint {str(path)!r}"
    way_out = "; delete it, or pass resume=False (start over) or another checkpoint path"
    if not path.is_file():
        raise CheckpointError(f"{where} is not a regular file{way_out}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{where} is empty (0 bytes): a write was interrupted or the disk was full{way_out}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # zip, pickle and weights-only errors alike: a file torch cannot read safely
        reason = " ".join(str(exc).split())[:120]
        raise CheckpointError(
            f"{where} cannot be read (truncated, damaged or not a torch file: {reason}){way_out}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
        raise CheckpointError(f"{where} is not a fine-tuning checkpoint of lr2vq_analysis{way_out}")
    if state.get("version") != _CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{where} has format version {state.get('version')!r}; this version reads {_CHECKPOINT_VERSION}{way_out}"
        )
    for name, kind in _CHECKPOINT_FIELDS.items():
        if not isinstance(state.get(name), kind) or isinstance(state.get(name), bool):
            found = "missing" if name not in state else f"a {type(state[name]).__name__}"
            raise CheckpointError(f"{where} is incomplete: field {name!r} is {found}{way_out}")
    if _checksum(state) != state["checksum"]:
        raise CheckpointError(f"{where} is damaged or was modified: its checksum does not match its contents{way_out}")
    return state


def _check_position(state: Mapping[str, Any], total: int, where: str) -> None:
    """Range checks of a checkpoint whose checksum is intact (a crafted file can recompute it)."""
    step, position, history = state["step"], state["position"], state["history"]
    if not 0 <= step <= total:
        raise CheckpointError(f"{where} has step={step}, outside 0..{total}; the file is damaged or was crafted")
    if len(position) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in position):
        raise CheckpointError(f"{where} has position={position!r}; expected [epoch, batch] of non-negative integers")
    for key in ("losses", "lrs"):
        values = history.get(key)
        if not isinstance(values, list) or len(values) != step:
            raise CheckpointError(f"{where} has a history of {key} that does not hold {step} values")
    if not isinstance(history.get("evals"), dict) or not isinstance(history.get("skipped", []), list):
        raise CheckpointError(f"{where} has a damaged history (evals / skipped)")


def _compare_configs(saved: Mapping[str, Any], current: Mapping[str, Any], where: str) -> None:
    differing = sorted(key for key in saved.keys() | current.keys() if saved.get(key) != current.get(key))
    if not differing:
        return
    shown = "; ".join(f"{key}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now" for key in differing[:6])
    more = f" (and {len(differing) - 6} more)" if len(differing) > 6 else ""
    raise ResumeMismatchError(
        f"{where} belongs to a different run ({', '.join(differing)} differ: {shown}{more}); "
        "to keep it, resume with the settings it was written with; to train anew, pass another checkpoint path "
        "or resume=False (which overwrites it)"
    )


def _compare_shapes(saved: Mapping[str, torch.Tensor], model: nn.Module, where: str) -> None:
    current = model.state_dict()
    missing, unexpected = sorted(current.keys() - saved.keys()), sorted(saved.keys() - current.keys())
    reshaped = [
        f"{key} {tuple(saved[key].shape)} -> {tuple(current[key].shape)}"
        for key in current.keys() & saved.keys()
        if not isinstance(saved[key], torch.Tensor) or tuple(saved[key].shape) != tuple(current[key].shape)
    ]
    if missing or unexpected or reshaped:
        parts = [f"tensors missing from the checkpoint: {missing[:4]}"] if missing else []
        parts += [f"tensors the model lacks: {unexpected[:4]}"] if unexpected else []
        parts += [f"shapes differ: {', '.join(sorted(reshaped)[:4])}"] if reshaped else []
        raise ResumeMismatchError(
            f"{where} holds another model ({'; '.join(parts)}: a width, k, m or d̃ changed); "
            "pass another checkpoint path or resume=False (which overwrites it)"
        )


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _default_optimizer(lr: float) -> OptimizerFactory:
    return lambda params: torch.optim.Adam(params, lr=lr)


def _make_scheduler(
    scheduler: str | SchedulerFactory, optimizer: torch.optim.Optimizer, total: int, lr_min: float
) -> Any:
    if callable(scheduler):
        return scheduler(optimizer, total)
    if scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1), eta_min=lr_min)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _optimizer_settings(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Type and hyperparameters of every parameter group (not the parameters themselves)."""
    groups = [
        {key: _plain(value) for key, value in group.items() if key != "params"} | {"size": len(group["params"])}
        for group in optimizer.param_groups
    ]
    return {"optimizer": _name_of(optimizer), "optimizer_groups": groups}


# --------------------------------------------------------------------------------------------------
# threads


def _other_runnable_threads() -> float | None:
    """Threads of other processes runnable right now (Linux ``/proc/loadavg``; median of 5 reads), or None."""
    samples = []
    try:
        for read in range(5):
            if read:
                time.sleep(0.005)
            with open("/proc/loadavg", encoding="ascii") as handle:
                running = int(handle.read().split()[3].split("/")[0])
            samples.append(running - 1)  # the reading thread is one of them
    except (OSError, ValueError, IndexError):
        return None
    return float(statistics.median(samples))


def _resolve_threads(setting: ThreadSetting, model: nn.Module, device: torch.device) -> int | None:
    """The torch thread count a run uses on ``device`` (None: leave the current setting)."""
    if device.type != "cpu" or setting is None:
        return None
    if setting != "auto":
        return int(setting)
    if sum(tensor.numel() for tensor in model.parameters()) < AUTO_THREADS_MAX_PARAMETERS:
        return 1
    others = _other_runnable_threads()
    if others is None:
        return None
    free = max(1, int((os.cpu_count() or 1) - others))  # cores no other process is using now
    return free if free < torch.get_num_threads() else None


# --------------------------------------------------------------------------------------------------
# the loop


def finetune(
    model: nn.Module,
    train_loader: Iterable[Any],
    *,
    stage: str | None = "dense",
    steps: int | None = None,
    lr: float | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    teacher: nn.Module | None = None,
    training: TrainingConfig | None = None,
    distillation: DistillationConfig | str | None = None,
    checkpoint: CheckpointConfig | str | os.PathLike[str] | None = None,
    eval_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
    eval_every: int | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune a (compressed) model: every parameter with ``requires_grad`` is trained.

    The stages of LR²VQ: ``"lowrank"`` trains Z and P of the low-rank layers end to end;
    ``"codebook"`` trains the codebooks and P of quantized layers (codes stay fixed) together with
    batch norm and the uncompressed layers, as PQF does; ``"dkm"`` trains layers in DKM state;
    ``"dense"`` (or None) trains whatever requires grad and checks nothing.
    :func:`lr2vq_analysis.recipe.run_recipe` chains the stages.

    Parameters
    ----------
    model : nn.Module
        The model to train, in place. It is moved to ``device`` and left in train mode.
    train_loader : iterable of batches
        Batches following the module's batch contract, iterated as given (see the module docstring).
    stage : {"lowrank", "codebook", "dkm", "dense"} or None, default "dense"
        Which fine-tuning stage; the compressed layers must be in the matching state.
    steps, lr : optional
        Shorthands for ``training.steps`` and ``training.lr`` (they override ``training``).
    loss_fn : callable (output, target) -> scalar tensor, optional
        Task loss. Default: cross-entropy.
    teacher : nn.Module, optional
        The uncompressed model to distil from (moved to ``device``, used in eval mode, never trained).
    training : TrainingConfig, optional
        Length, optimizer, schedule, clipping, non-finite policy and threads. Default: one epoch of Adam
        at 1e-3 with a cosine schedule to 1e-6; stop on a NaN/Inf loss or gradient.
    distillation : DistillationConfig or {"kl", "mse"}, optional
        How to distil from ``teacher`` (needs one). Default with a teacher: pure KL at temperature 1.
    checkpoint : CheckpointConfig or path, optional
        Checkpoint file and period; a path alone checkpoints after the last step and resumes.
    eval_fn : callable (model) -> dict of str to float, optional
        Called every ``eval_every`` steps and after the last one, on the unwrapped model in eval mode
        under ``torch.no_grad()``; the model is put back in train mode afterwards.
    eval_every : int, optional
        Evaluation period in steps (default: only after the last step).
    device : torch.device or str, optional
        Default: this rank's GPU when CUDA is available, else the CPU.
    seed : int, default 0
        Seeds the data order and the torch random generator used during the run (for dropout); the
        caller's global random state is left untouched.
    progress : bool, default True
        Show a tqdm progress bar (rank 0 only).

    Returns
    -------
    FinetuneResult

    Raises
    ------
    InvalidParameterError
        On a bad argument.
    StageError
        If the compressed layers are not in the state ``stage`` needs.
    NonFiniteError
        On a NaN/Inf loss or gradient (``on_nonfinite="raise"``): names the step and the last good checkpoint.
    CheckpointError
        If the checkpoint cannot be written (checked before the first step), or the one to resume is
        empty, truncated, not a checkpoint, incomplete or fails its checksum.
    ResumeMismatchError
        If the checkpoint to resume comes from a run with another configuration, model or data.

    Notes
    -----
    Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set, ``WORLD_SIZE > 1``) the loop joins
    the process group (gloo on the CPU, nccl on GPUs; when none exists it starts one, which lives until
    the process exits), wraps the model in DistributedDataParallel, and copies rank 0's buffers
    (batch-norm statistics) to all ranks at the end so that every rank ends with the same weights.
    Give the loader a :class:`~torch.utils.data.DistributedSampler` so that each rank gets its shard.

    Examples
    --------
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(64, 4, generator=g)
    >>> y = (x[:, 0] > 0).long()
    >>> model = torch.nn.Linear(4, 2)
    >>> loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    >>> result = finetune(model, loader, steps=40, lr=0.05, progress=False)
    >>> result.steps, result.losses[-1] < result.losses[0]
    (40, True)
    """
    seed = check_seed(seed)
    stage = check_stage(model, stage)
    training = _training_config(training, steps, lr)
    distill = _distillation_config(distillation, teacher)
    checkpoint = _checkpoint_config(checkpoint)
    if eval_every is not None:
        check_count(eval_every, "eval_every")
    if loss_fn is not None and not callable(loss_fn):
        raise InvalidParameterError(f"loss_fn={loss_fn!r} is invalid; give a callable (output, target) -> loss")
    objective = _Objective(
        task_loss=loss_fn if loss_fn is not None else F.cross_entropy,
        teacher=teacher,
        distill=distill.kind,
        distill_weight=distill.weight if teacher is not None else 0.0,
        temperature=distill.temperature,
    )
    ddp, device = _setup_distributed(device)
    with torch_threads(_resolve_threads(training.num_threads, model, device)):
        return _run(
            model, train_loader, stage, training, objective, checkpoint, eval_fn, eval_every, ddp, device, seed,
            progress, loss_fn,
        )  # fmt: skip


def _training_config(training: TrainingConfig | None, steps: int | None, lr: float | None) -> TrainingConfig:
    if training is not None and not isinstance(training, TrainingConfig):
        raise InvalidParameterError(f"training={training!r} is invalid; give a TrainingConfig")
    training = training or TrainingConfig()
    overrides: dict[str, Any] = {}
    if steps is not None:
        overrides.update(steps=steps, epochs=None)
    if lr is not None:
        overrides["lr"] = lr
    return replace(training, **overrides) if overrides else training


def _distillation_config(
    distillation: DistillationConfig | str | None, teacher: nn.Module | None
) -> DistillationConfig:
    if isinstance(distillation, str):
        distillation = DistillationConfig(kind=distillation)  # type: ignore[arg-type]
    if distillation is not None and not isinstance(distillation, DistillationConfig):
        raise InvalidParameterError(
            f"distillation={distillation!r} is invalid; give 'kl', 'mse' or a DistillationConfig"
        )
    if distillation is not None and teacher is None:
        raise InvalidParameterError(f"distillation={distillation!r} needs a teacher model (teacher=...)")
    return distillation or DistillationConfig()


def _checkpoint_config(checkpoint: CheckpointConfig | str | os.PathLike[str] | None) -> CheckpointConfig | None:
    if checkpoint is None or isinstance(checkpoint, CheckpointConfig):
        return checkpoint
    return (
        CheckpointConfig(Path(checkpoint))
        if isinstance(checkpoint, (str, os.PathLike))
        else CheckpointConfig(checkpoint)
    )


def _run(
    model: nn.Module,
    train_loader: Iterable[Any],
    stage: str,
    training: TrainingConfig,
    objective: _Objective,
    checkpoint: CheckpointConfig | None,
    eval_fn: Callable[[nn.Module], Mapping[str, float]] | None,
    eval_every: int | None,
    ddp: _Distributed,
    device: torch.device,
    seed: int,
    progress: bool,
    loss_fn: Any,
) -> FinetuneResult:
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InvalidParameterError("the model has no parameter with requires_grad=True; nothing to fine-tune")
    if objective.teacher is not None:
        objective.teacher.to(device).eval()
    path = checkpoint.path if checkpoint is not None else None
    if path is not None and ddp.is_main:
        _check_writable(path)
    train_model: nn.Module = model
    if ddp.active:
        device_ids = [device.index] if device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    stream = _BatchStream(train_loader, seed=seed)
    if ddp.active and isinstance(train_loader, DataLoader) and not stream.sharded:
        warnings.warn(
            "train_loader has no DistributedSampler: every rank trains on the same batches; "
            "give it sampler=DistributedSampler(dataset) to shard the data across ranks",
            stacklevel=3,
        )
    total = training.steps
    if total is None:
        if stream.batches_per_epoch is None:
            raise InvalidParameterError("train_loader has no len(); give steps=... instead of epochs")
        total = (training.epochs or 1) * stream.batches_per_epoch

    opt = (training.optimizer or _default_optimizer(training.lr))(params)
    run_config: dict[str, Any] = {
        "stage": stage,
        "total_steps": total,
        "seed": seed,
        "world_size": ddp.world_size,
        "lr": training.lr,
        "lr_min": training.lr_min,
        "scheduler": training.scheduler if isinstance(training.scheduler, str) else _name_of(training.scheduler),
        "grad_clip": training.grad_clip,
        "on_nonfinite": training.on_nonfinite,
        "loss": _name_of(loss_fn) if loss_fn is not None else "cross_entropy",
        "distillation": None if objective.teacher is None else [objective.distill, objective.distill_weight,
                                                                 objective.temperature],
        **_optimizer_settings(opt),
    }  # fmt: skip
    if path is not None:  # fingerprints of what the run starts from (only a checkpoint needs them)
        run_config["model"] = _model_fingerprint(model)
        run_config["data"] = _data_fingerprint(train_loader)
        run_config["teacher"] = None if objective.teacher is None else _model_fingerprint(objective.teacher)
    sched = _make_scheduler(training.scheduler, opt, total, training.lr_min)
    result = FinetuneResult(steps=0, stage=stage)
    saved_step: list[int] = []  # the step of the last checkpoint written (or resumed from)

    def save_checkpoint(step: int) -> None:
        if path is None or not ddp.is_main:
            return
        bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:  # never replace a good checkpoint by a non-finite one
            raise NonFiniteError(f"step {step}: parameters {bad[:3]} hold NaN/Inf; {_last_good(path, saved_step)}")
        state = {
            "format": _CHECKPOINT_FORMAT,
            "version": _CHECKPOINT_VERSION,
            "config": run_config,
            "step": step,
            "position": [stream.epoch, stream.batch],
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": _rng_state(device),
            "history": {"losses": result.losses, "lrs": result.lrs, "evals": result.evals, "skipped": result.skipped},
        }
        _write_checkpoint(state, path)
        saved_step[:] = [step]

    def evaluate(step: int) -> None:
        if eval_fn is None:
            return
        model.eval()
        with torch.no_grad():
            result.evals[step] = {key: float(value) for key, value in eval_fn(model).items()}
        model.train()
        if bar is not None:
            bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in result.evals[step].items()))

    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    bar = None
    checkpoint_every = checkpoint.every if checkpoint is not None else None
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            start = 0
            if path is not None and checkpoint is not None and checkpoint.resume and path.exists():
                start = _resume(path, run_config, model, opt, sched, stream, result, device)
                saved_step[:] = [start]
                if start == total:
                    warnings.warn(
                        f"checkpoint {str(path)!r} holds a finished run ({total} of {total} steps): its final "
                        "weights and history were loaded and no step ran; to train again pass resume=False "
                        "or another checkpoint path",
                        stacklevel=3,
                    )
            result.resumed_from = start
            if progress and ddp.is_main and start < total:
                from tqdm import tqdm  # plain tqdm: tqdm.auto warns (IProgress) in Jupyter without ipywidgets

                bar = tqdm(total=total, initial=start, desc=f"finetune ({stage})", unit="step")
            model.train()
            for step in range(start + 1, total + 1):
                inputs, target = split_batch(next(stream), device)
                loss = objective(main_output(_call(train_model, inputs)), target, inputs)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                norm = nn.utils.clip_grad_norm_(params, training.grad_clip or math.inf)
                logged = loss.detach()
                if ddp.active:
                    dist.all_reduce(logged)
                    logged = logged / ddp.world_size
                loss_value, finite = float(logged), bool(torch.isfinite(norm))
                result.lrs.append(float(opt.param_groups[0]["lr"]))
                if math.isfinite(loss_value) and finite:
                    opt.step()
                elif training.on_nonfinite == "skip":
                    opt.zero_grad(set_to_none=True)
                    result.skipped.append(step)
                else:
                    what = f"the loss is {loss_value}" if not math.isfinite(loss_value) else "a gradient is NaN/Inf"
                    raise NonFiniteError(
                        f"fine-tuning stopped at step {step} of {total}: {what}; the model holds the weights from "
                        f"before that step; {_last_good(path, saved_step)}. Lower the learning rate, set "
                        "grad_clip, check the data, or pass TrainingConfig(on_nonfinite='skip')"
                    )
                sched.step()
                result.losses.append(loss_value)
                result.steps = step
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.4g}", lr=f"{result.lrs[-1]:.2e}")
                if (eval_every is not None and step % eval_every == 0) or step == total:
                    evaluate(step)
                if (checkpoint_every is not None and step % checkpoint_every == 0) or step == total:
                    save_checkpoint(step)
            result.steps = max(result.steps, start)
        if ddp.active:
            for buffer in model.buffers():  # batch-norm statistics drift apart across ranks; rank 0's win
                dist.broadcast(buffer, src=0)
    finally:
        stream.close()
        if bar is not None:
            bar.close()
    return result


def _last_good(path: Path | None, saved_step: list[int]) -> str:
    if path is None:
        return "no checkpoint was kept (pass checkpoint=... to keep one)"
    if not saved_step:
        return f"no checkpoint was written yet ({str(path)!r} is unchanged)"
    return f"the last good checkpoint is {str(path)!r} (step {saved_step[0]})"


def _resume(
    path: Path,
    run_config: Mapping[str, Any],
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    stream: _BatchStream,
    result: FinetuneResult,
    device: torch.device,
) -> int:
    """Restore a run from its checkpoint after checking it; return the step it had reached."""
    where = f"checkpoint {str(path)!r}"
    state = _read_checkpoint(path, device)
    _compare_shapes(state["model"], model, where)
    _compare_configs(state["config"], run_config, where)
    _check_position(state, int(run_config["total_steps"]), where)
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], device)
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise ResumeMismatchError(
            f"{where} does not fit this run ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); "
            "pass another checkpoint path or resume=False (which overwrites it)"
        ) from None
    stream.seek(*state["position"])
    history = state["history"]
    result.losses, result.lrs = [float(v) for v in history["losses"]], [float(v) for v in history["lrs"]]
    result.evals = {int(step): dict(metrics) for step, metrics in history["evals"].items()}
    result.skipped = [int(step) for step in history.get("skipped", [])]
    result.steps = int(state["step"])
    return int(state["step"])


# --------------------------------------------------------------------------------------------------
# batch-norm statistics


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    batches: int | None = None,
    device: torch.device | str | None = None,
    num_threads: ThreadSetting = "auto",
) -> nn.Module:
    """Re-estimate the running statistics of every batch-norm layer from data.

    After quantization the activations' statistics move; the stored running mean and variance no
    longer match and accuracy collapses (to 13–59 % on the digits CNN). This resets them and
    recomputes them as the plain average of the batch statistics over ``batches`` batches (momentum
    None), with the rest of the model frozen in its current state. Weights are not changed.

    Parameters
    ----------
    model : nn.Module
        Model with ``BatchNorm*d`` layers (others are left alone); its train/eval mode is restored after.
    loader : iterable of batches
        Batches following the module's batch contract; targets are ignored.
    batches : int, optional
        Number of batches to use (default: one pass over ``loader``).
    device : torch.device or str, optional
        Where to run (default: the device of the model's first parameter or buffer).
    num_threads : int, "auto" or None, default "auto"
        torch CPU threads meanwhile, as in :class:`TrainingConfig` (restored afterwards).

    Returns
    -------
    nn.Module
        The same model.

    Examples
    --------
    >>> bn = torch.nn.BatchNorm1d(1)
    >>> data = [torch.tensor([[1.0], [3.0]]), torch.tensor([[5.0], [7.0]])]
    >>> _ = recalibrate_batchnorm(bn, data)
    >>> bn.running_mean.tolist()
    [4.0]
    """
    if batches is not None:
        check_count(batches, "batches")
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    if device is None:
        first = next(iter(model.parameters()), None)
        device = (first if first is not None else next(iter(model.buffers()))).device
    _check_threads(num_threads)
    with torch_threads(_resolve_threads(num_threads, model, torch.device(device))):
        _reestimate(model, norms, loader, batches, torch.device(device))
    return model


def _reestimate(
    model: nn.Module, norms: list[nn.modules.batchnorm._BatchNorm], loader: Iterable[Any], batches: int | None,
    device: torch.device,
) -> None:  # fmt: skip
    was_training = model.training
    momenta = [norm.momentum for norm in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average of the batch statistics
        norm.train()
    try:
        for index, batch in enumerate(loader):
            if batches is not None and index >= batches:
                break
            inputs, _ = split_batch(batch, device)
            _call(model, inputs)
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.train(was_training)
