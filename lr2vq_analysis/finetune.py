"""Fine-tuning of compressed models: the low-rank stage, the codebook stage, distillation, DDP.

One compact loop, :func:`finetune`, trains every parameter that requires grad. Its defaults follow PQF
("And the bit goes down"): Adam at 1e-3 with a cosine schedule down to 1e-6 over the run. It checks
that the compressed layers are in the state the stage needs, checkpoints atomically and resumes to the
very same result, and runs under ``torchrun`` with DistributedDataParallel.

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
When ``train_loader`` is a :class:`~torch.utils.data.DataLoader` over a map-style dataset with a
plain ``batch_size`` and a standard sampler (``shuffle=True``/``False`` or a ``DistributedSampler``),
the loop rebuilds it around a sampler whose order depends only on ``seed`` and
the epoch (shuffled when the loader shuffles), sharded across ranks as
:class:`~torch.utils.data.DistributedSampler` does. That makes a resumed run replay exactly the
batches the interrupted one would have seen. Any other iterable of batches is used as it is (not
sharded across ranks; a resumed run skips the batches already consumed in the current epoch).
"""

from __future__ import annotations

import atexit
import io
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from ._io import write_atomic
from ._validation import InvalidParameterError, LR2VQError, check_count, check_seed

__all__ = ["FinetuneResult", "StageError", "finetune", "recalibrate_batchnorm"]

#: Compressed-layer state each stage needs (``None``: no requirement).
STAGE_STATES: dict[str, str | None] = {"lowrank": "lowrank", "codebook": "quantized", "dkm": "dkm", "dense": None}
_LAYER_STATES = frozenset({"lowrank", "quantized", "dkm"})
_DISTILL_KINDS = ("kl", "mse")
_CHECKPOINT_FORMAT = "lr2vq-finetune-checkpoint"
_CHECKPOINT_VERSION = 1

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer, int], Any]


class StageError(LR2VQError, RuntimeError):
    """The model's compressed layers are not in the state the fine-tuning stage needs."""


@dataclass
class FinetuneResult:
    """What a :func:`finetune` run did.

    Attributes
    ----------
    steps : int
        Optimizer steps done in total (including those before a resume).
    losses : list of float
        Training loss at every step (averaged over ranks under DDP).
    lrs : list of float
        Learning rate of the first parameter group used at every step.
    evals : dict of int to dict
        ``eval_fn`` results, keyed by the step after which they were taken.
    resumed_from : int
        Step the run resumed from (0 for a fresh run).
    stage : str
        The stage that was trained.
    """

    steps: int
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    resumed_from: int = 0
    stage: str = "dense"

    @property
    def final_loss(self) -> float:
        """Loss of the last step (NaN when no step ran)."""
        return self.losses[-1] if self.losses else math.nan


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
# data order: seeded, sharded, resumable


class _ShardedSampler(Sampler[int]):
    """Indices of one rank for one epoch: a permutation seeded by (seed, epoch), dealt round-robin to ranks."""

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int, world_size: int) -> None:
        self.n, self.shuffle, self.seed, self.rank, self.world_size = n, shuffle, seed, rank, world_size
        self.epoch = 0
        self.start = 0  # position inside this rank's shard at which iteration starts (resume)

    def _shard(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=generator).tolist()
        else:
            order = list(range(self.n))
        padded = math.ceil(self.n / self.world_size) * self.world_size
        order += order[: padded - self.n]  # every rank gets the same number of samples
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._shard()[self.start :])

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size) - self.start


class _BatchStream:
    """Endless stream of batches that knows its (epoch, batch) position and can start from any position."""

    def __init__(self, loader: Iterable[Any], *, seed: int, rank: int, world_size: int) -> None:
        self.epoch, self.batch = 0, 0
        self._iterator: Iterator[Any] | None = None
        self._sampler: _ShardedSampler | None = None
        self._loader = loader
        if (
            isinstance(loader, DataLoader)
            and not isinstance(loader.dataset, IterableDataset)
            and loader.batch_size is not None
            and type(loader.sampler) in (RandomSampler, SequentialSampler, DistributedSampler)
        ):
            dataset: Dataset[Any] = loader.dataset
            shuffle = isinstance(loader.sampler, RandomSampler) or bool(getattr(loader.sampler, "shuffle", False))
            self._sampler = _ShardedSampler(
                len(dataset),  # type: ignore[arg-type]
                shuffle=shuffle,
                seed=seed,
                rank=rank,
                world_size=world_size,
            )
            self._worker_generator = torch.Generator()
            self._loader = DataLoader(
                dataset,
                batch_size=loader.batch_size,
                sampler=self._sampler,
                num_workers=loader.num_workers,
                collate_fn=loader.collate_fn,
                pin_memory=loader.pin_memory,
                drop_last=loader.drop_last,
                timeout=loader.timeout,
                worker_init_fn=loader.worker_init_fn,
                generator=self._worker_generator,
            )
            self._seed = seed
        self.batches_per_epoch: int | None = len(self._loader) if isinstance(self._loader, Sized) else None

    def seek(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch
        self._iterator = None

    def _open_epoch(self) -> Iterator[Any]:
        if self._sampler is None:
            iterator = iter(self._loader)
            for _ in range(self.batch):  # replay the part of the epoch already consumed
                next(iterator)
            return iterator
        self._sampler.epoch = self.epoch
        self._sampler.start = self.batch * int(self._loader.batch_size)  # type: ignore[attr-defined]
        self._worker_generator.manual_seed(self._seed + self.epoch)  # seeds of the data-loading workers
        return iter(self._loader)

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


def _atomic_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, buffer.getvalue())


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
    if scheduler == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    raise InvalidParameterError(
        f"scheduler={scheduler!r} is invalid; use 'cosine', 'constant' "
        "or a callable (optimizer, total_steps) -> scheduler"
    )


# --------------------------------------------------------------------------------------------------
# the loop


def finetune(
    model: nn.Module,
    train_loader: Iterable[Any],
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    stage: str | None = "dense",
    steps: int | None = None,
    epochs: int | None = None,
    teacher: nn.Module | None = None,
    distill: str | None = None,
    distill_weight: float = 1.0,
    temperature: float = 1.0,
    lr: float = 1e-3,
    lr_min: float = 1e-6,
    optimizer: OptimizerFactory | None = None,
    scheduler: str | SchedulerFactory = "cosine",
    grad_clip: float | None = None,
    eval_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
    eval_every: int | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune a (compressed) model: every parameter with ``requires_grad`` is trained.

    The stages of LR²VQ: ``"lowrank"`` trains Z and P of the low-rank layers end to end;
    ``"codebook"`` trains the codebooks and P of quantized layers (codes stay fixed) together with
    batch norm and the uncompressed layers, as PQF does; ``"dkm"`` trains layers in DKM state;
    ``"dense"`` (or None) trains whatever requires grad and checks nothing.

    Parameters
    ----------
    model : nn.Module
        The model to train, in place. It is moved to ``device`` and left in train mode.
    train_loader : iterable of batches
        Batches following the module's batch contract (see the module docstring).
    loss_fn : callable (output, target) -> scalar tensor, optional
        Task loss. Default: cross-entropy.
    stage : {"lowrank", "codebook", "dkm", "dense"} or None, default "dense"
        Which fine-tuning stage; the compressed layers must be in the matching state.
    steps, epochs : int, optional
        Length of the run, in optimizer steps or epochs (at most one of them; default one epoch).
    teacher : nn.Module, optional
        The uncompressed model to distil from (moved to ``device``, used in eval mode, never trained).
    distill : {"kl", "mse"}, optional
        Distillation loss: KL on logits with ``temperature``, or MSE on embeddings. Default "kl" when
        a teacher is given.
    distill_weight : float in [0, 1], default 1.0
        The loss is ``distill_weight · distillation + (1 − distill_weight) · task loss``; 1.0 is pure
        distillation (no target needed). Ignored without a teacher.
    temperature : float, default 1.0
        Softmax temperature of the KL loss (the loss is scaled by T² as in Hinton et al.).
    lr, lr_min : float
        Initial learning rate of the default Adam, and the end of the cosine schedule.
    optimizer : callable (list of parameters) -> Optimizer, optional
        Optimizer factory. Default: ``Adam(params, lr=lr)``.
    scheduler : "cosine", "constant" or callable (optimizer, total_steps) -> scheduler
        Learning-rate schedule, stepped once per optimizer step. Default: cosine from ``lr`` to ``lr_min``.
    grad_clip : float, optional
        Clip the global gradient norm to this value.
    eval_fn : callable (model) -> dict of str to float, optional
        Called every ``eval_every`` steps and after the last one, on the unwrapped model in eval mode
        under ``torch.no_grad()``; the model is put back in train mode afterwards.
    eval_every : int, optional
        Evaluation period in steps (default: only after the last step).
    checkpoint_path : path, optional
        File for checkpoints (model, optimizer, scheduler, RNG state, step, history), written
        atomically every ``checkpoint_every`` steps and after the last one, by rank 0 only.
    checkpoint_every : int, optional
        Checkpoint period in steps (default: only after the last step).
    resume : bool, default True
        When ``checkpoint_path`` exists, continue from it; the final weights are those an
        uninterrupted run gives. The checkpoint must come from a run with the same stage, length,
        seed and number of ranks.
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
        On a bad argument, or a checkpoint from a different run.
    StageError
        If the compressed layers are not in the state ``stage`` needs.

    Notes
    -----
    Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set, ``WORLD_SIZE > 1``) the loop joins
    the process group (gloo on the CPU, nccl on GPUs; when none exists it starts one, which lives until
    the process exits), wraps the model in DistributedDataParallel, gives each rank its shard of each
    epoch (``batch_size`` of the loader is per rank), and copies rank 0's buffers (batch-norm
    statistics) to all ranks at the end so that every rank ends with the same weights.

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
    _check_arguments(steps, epochs, eval_every, checkpoint_every, teacher, distill, distill_weight, temperature)
    _check_rates(lr, lr_min, grad_clip)
    objective = _Objective(
        task_loss=loss_fn if loss_fn is not None else F.cross_entropy,
        teacher=teacher,
        distill=distill or "kl",
        distill_weight=float(distill_weight) if teacher is not None else 0.0,
        temperature=float(temperature),
    )

    ddp, device = _setup_distributed(device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InvalidParameterError("the model has no parameter with requires_grad=True; nothing to fine-tune")
    if teacher is not None:
        teacher.to(device).eval()
    train_model: nn.Module = model
    if ddp.active:
        device_ids = [device.index] if device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    stream = _BatchStream(train_loader, seed=seed, rank=ddp.rank, world_size=ddp.world_size)
    if steps is None:
        if stream.batches_per_epoch is None:
            raise InvalidParameterError("train_loader has no len(); give steps=... instead of epochs")
        steps = (epochs or 1) * stream.batches_per_epoch
    total = int(steps)

    opt = (optimizer or _default_optimizer(lr))(params)
    sched = _make_scheduler(scheduler, opt, total, lr_min)
    result = FinetuneResult(steps=0, stage=stage)
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    run_config = {"stage": stage, "total_steps": total, "seed": seed, "world_size": ddp.world_size}

    def save_checkpoint(step: int) -> None:
        if path is None or not ddp.is_main:
            return
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
            "history": {"losses": result.losses, "lrs": result.lrs, "evals": result.evals},
        }
        _atomic_save(state, path)

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
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            start = 0
            if path is not None and resume and path.exists():
                start = _load_checkpoint(path, run_config, model, opt, sched, stream, result, device)
            result.resumed_from = start
            if progress and ddp.is_main:
                from tqdm.auto import tqdm

                bar = tqdm(total=total, initial=start, desc=f"finetune ({stage})", unit="step")
            model.train()
            for step in range(start + 1, total + 1):
                inputs, target = split_batch(next(stream), device)
                loss = objective(main_output(_call(train_model, inputs)), target, inputs)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_(params, float(grad_clip))
                result.lrs.append(float(opt.param_groups[0]["lr"]))
                opt.step()
                sched.step()
                logged = loss.detach()
                if ddp.active:
                    dist.all_reduce(logged)
                    logged = logged / ddp.world_size
                result.losses.append(float(logged))
                result.steps = step
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{result.losses[-1]:.4g}", lr=f"{result.lrs[-1]:.2e}")
                if (eval_every is not None and step % eval_every == 0) or step == total:
                    evaluate(step)
                if (checkpoint_every is not None and step % checkpoint_every == 0) or step == total:
                    save_checkpoint(step)
            result.steps = max(result.steps, start)
        if ddp.active:
            for buffer in model.buffers():  # batch-norm statistics drift apart across ranks; rank 0's win
                dist.broadcast(buffer, src=0)
    finally:
        if bar is not None:
            bar.close()
    return result


def _check_arguments(
    steps: Any,
    epochs: Any,
    eval_every: Any,
    checkpoint_every: Any,
    teacher: nn.Module | None,
    distill: Any,
    distill_weight: Any,
    temperature: Any,
) -> None:
    counts = {"steps": steps, "epochs": epochs, "eval_every": eval_every, "checkpoint_every": checkpoint_every}
    for label, value in counts.items():
        if value is not None:
            check_count(value, label)
    if steps is not None and epochs is not None:
        raise InvalidParameterError(f"give steps or epochs, not both (got steps={steps}, epochs={epochs})")
    if distill is not None and distill not in _DISTILL_KINDS:
        raise InvalidParameterError(f"distill={distill!r} is invalid; allowed values are {[*_DISTILL_KINDS, None]}")
    if distill is not None and teacher is None:
        raise InvalidParameterError(f"distill={distill!r} needs a teacher model (teacher=...)")
    if not 0.0 <= float(distill_weight) <= 1.0:
        raise InvalidParameterError(f"distill_weight={distill_weight!r} is invalid; it must be in [0, 1]")
    if not float(temperature) > 0.0:
        raise InvalidParameterError(f"temperature={temperature!r} is invalid; it must be > 0")


def _check_rates(lr: Any, lr_min: Any, grad_clip: Any) -> None:
    if not float(lr) > 0.0 or not 0.0 <= float(lr_min) <= float(lr):
        raise InvalidParameterError(f"lr={lr!r}, lr_min={lr_min!r} are invalid; need lr > 0 and 0 <= lr_min <= lr")
    if grad_clip is not None and not float(grad_clip) > 0.0:
        raise InvalidParameterError(f"grad_clip={grad_clip!r} is invalid; it must be > 0 or None")


def _load_checkpoint(
    path: Path,
    run_config: Mapping[str, Any],
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    stream: _BatchStream,
    result: FinetuneResult,
    device: torch.device,
) -> int:
    """Restore a run from its checkpoint; return the step it had reached."""
    state = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
        raise InvalidParameterError(f"{path} is not a fine-tuning checkpoint of this package")
    if state["version"] != _CHECKPOINT_VERSION:
        raise InvalidParameterError(f"{path} has checkpoint version {state['version']}; expected {_CHECKPOINT_VERSION}")
    if dict(state["config"]) != dict(run_config):
        raise InvalidParameterError(
            f"checkpoint {path} belongs to a different run ({state['config']}) than this one ({dict(run_config)}); "
            "pass resume=False to start over, or another checkpoint_path"
        )
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"], device)
    stream.seek(*state["position"])
    history = state["history"]
    result.losses, result.lrs = list(history["losses"]), list(history["lrs"])
    result.evals = {int(step): dict(metrics) for step, metrics in history["evals"].items()}
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
            inputs, _ = split_batch(batch, torch.device(device))
            _call(model, inputs)
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.train(was_training)
    return model
