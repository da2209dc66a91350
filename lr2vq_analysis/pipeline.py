"""The whole job in one call, on the bundled digits CNN: analyse, compress, fine-tune, save, reload, evaluate.

:func:`compress_digits_demo` runs LR²VQ's recipe end to end:

1. load the pretrained ``digits-cnn`` and the digits splits, measure its test accuracy;
2. predict d̃ per layer (:func:`~lr2vq_analysis.report.analyze`), unless a plan or d̃ is given;
3. :func:`~lr2vq_analysis.nn.compress` the planned layers (low-rank Z·P from the spectrum);
4. low-rank stage: train Z, P and everything else end to end (:func:`~lr2vq_analysis.finetune.finetune`);
5. quantize (k-means on Z; codes fixed from here), re-estimate the batch-norm statistics;
6. codebook stage: train codebooks, P, batch norm and the uncompressed layers, distilling from the
   original model together with the task loss;
7. save the bit-packed file, reload it into a fresh ``DigitsCNN``, check that the reloaded model gives
   the in-memory model's outputs, and measure its test accuracy.

Accuracies are measured on the test split (719 images, the same for every seed); the validation split
is evaluated at the end of each fine-tuning stage (``DemoResult.history``). Nothing is chosen on the
test split.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._io import write_atomic
from ._validation import InvalidParameterError, LR2VQError, check_count, check_d_tilde, check_k, check_m, check_seed
from .datasets import accuracy, digits_loaders
from .export import load_compressed, save_compressed
from .finetune import DistillationConfig, FinetuneResult, TrainingConfig
from .models.digits import DigitsCNN, load_bundled_model
from .nn import CompressedModel
from .plan import LayerPlan, effective_k
from .recipe import Budget, run_recipe
from .size import SizeReport, size_report
from .weights import load_weights

__all__ = ["DemoResult", "compress_digits_demo", "DEMO_DEFAULTS", "QUICK_DEFAULTS"]

#: Fine-tuning settings of the full demo: optimizer steps in all (half of them in the low-rank stage, as in
#: the measurements of docs/evidence.md), batch size, and the distillation of the codebook stage.
DEMO_DEFAULTS: dict[str, Any] = {"steps": 600, "batch_size": 64, "distill_weight": 0.5, "temperature": 2.0}
#: The same with few steps, for tests and CI.
QUICK_DEFAULTS: dict[str, Any] = {**DEMO_DEFAULTS, "steps": 80}
#: File names written into ``out_dir``.
MODEL_FILE, REPORT_FILE, SIZE_FILE, SUMMARY_FILE = "digits-cnn.lr2vq", "report.json", "size.csv", "summary.json"
#: Largest |reloaded − in-memory| logit difference accepted (batch norms are folded in the file).
RELOAD_TOLERANCE = 1e-4


@dataclass
class DemoResult:
    """What :func:`compress_digits_demo` did and measured.

    Attributes
    ----------
    accuracy : dict of str to float
        Test accuracy (fraction) after each stage: ``"pretrained"``, ``"compressed"`` (low-rank
        initialisation), ``"lowrank"`` (after the low-rank stage), ``"quantized"``, ``"recalibrated"``
        (batch norm re-estimated), ``"finetuned"`` (after the codebook stage) and ``"reloaded"``
        (the model read back from the file).
    plan : dict of str to LayerPlan
        The plan the model was compressed with.
    size : SizeReport
        Size accounting of the compressed model.
    files : dict of str to Path
        ``"model"`` (the compressed file), ``"summary"`` (JSON of this result), ``"size"`` (CSV of the
        size breakdown) and, when the analysis ran, ``"report"`` (the analysis, JSON).
    max_reload_difference : float
        Largest absolute difference between the reloaded and the in-memory model's logits on the test split.
    history : dict of str to FinetuneResult
        The ``"lowrank"`` and ``"codebook"`` fine-tuning runs (validation accuracy in ``evals``).
    seconds : dict of str to float
        Wall time of each phase and ``"total"``.
    model : CompressedModel
        The compressed, fine-tuned model in memory, on the CPU, in eval mode.
    reloaded : CompressedModel
        The model read back from ``files["model"]``, on the CPU, in eval mode.
    report : Report or None
        The analysis (None when a plan or d̃ was given).
    """

    accuracy: dict[str, float]
    plan: dict[str, LayerPlan]
    size: SizeReport
    files: dict[str, Path]
    max_reload_difference: float
    history: dict[str, FinetuneResult] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    model: CompressedModel | None = None
    reloaded: CompressedModel | None = None
    report: Any = None

    @property
    def accuracy_before(self) -> float:
        """Test accuracy of the pretrained model."""
        return self.accuracy["pretrained"]

    @property
    def accuracy_after(self) -> float:
        """Test accuracy of the compressed model reloaded from its file."""
        return self.accuracy["reloaded"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (no tensors)."""
        return {
            "accuracy": self.accuracy,
            "plan": {name: entry.to_dict() for name, entry in self.plan.items()},
            "size": {
                "uncompressed_bits": self.size.uncompressed_bits,
                "compressed_bits": self.size.compressed_bits,
                "ratio": self.size.ratio,
                "megabytes": self.size.megabytes,
                "uncompressed_megabytes": self.size.uncompressed_megabytes,
            },
            "files": {key: str(path) for key, path in self.files.items()},
            "file_bytes": {key: path.stat().st_size for key, path in self.files.items() if path.exists()},
            "max_reload_difference": self.max_reload_difference,
            "validation": {stage: run.evals for stage, run in self.history.items()},
            "steps": {stage: run.steps for stage, run in self.history.items()},
            "seconds": self.seconds,
        }

    def summary(self) -> str:
        """Human-readable summary: accuracy per stage, plan, size, files."""
        names = {
            "pretrained": "pretrained",
            "compressed": "compressed (low-rank init)",
            "lowrank": "after low-rank stage",
            "quantized": "quantized",
            "recalibrated": "batch norm re-estimated",
            "finetuned": "after codebook stage",
            "reloaded": "reloaded from file",
        }
        lines = ["test accuracy (719 images):"]
        lines += [f"  {names.get(key, key):<28} {value:7.2%}" for key, value in self.accuracy.items()]
        lines.append("plan:")
        lines += [f"  {name:<16} k={p.k:<4} m={p.m} d_tilde={p.d_tilde}" for name, p in self.plan.items()]
        model_file = self.files["model"]
        lines.append(
            f"size: {self.size.uncompressed_megabytes:.4f} MiB -> {self.size.megabytes:.4f} MiB "
            f"({self.size.ratio:.1f}x); file {model_file.stat().st_size:,} bytes"
        )
        lines.append(f"reloaded model: max |logit difference| = {self.max_reload_difference:.2e}")
        lines.append("files: " + ", ".join(f"{key}={path}" for key, path in self.files.items()))
        lines.append(f"time: {self.seconds.get('total', float('nan')):.1f} s")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def compress_digits_demo(
    *,
    k: int = 16,
    m: int = 9,
    d_tilde: int | None = None,
    plan: Mapping[str, LayerPlan] | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike[str] | None = None,
    model_path: str | os.PathLike[str] | None = None,
    quick: bool = False,
    device: torch.device | str | None = None,
    num_threads: int | None = 1,
    progress: bool = True,
) -> DemoResult:
    """Compress the bundled digits CNN end to end and measure what each stage does.

    See the module docstring for the stages; the training is :func:`~lr2vq_analysis.recipe.run_recipe`.
    With the defaults (k = 16, m = 9, d̃ predicted, 600 steps: 300 + 300) it takes a minute or two on 2 CPU
    cores; ``quick=True`` (80 steps) well under 30 s.

    Parameters
    ----------
    k : int, default 16
        Number of centroids (capped per layer by PQF's rule, as in the analysis).
    m : int, default 9
        Subvector size (9: one 3×3 kernel; 18 also divides every compressed layer's rows).
    d_tilde : int, optional
        One d̃ for every layer (d̃ = m is plain PQ). Default: each layer's predicted d̃.
    plan : mapping of str to LayerPlan, optional
        Use this plan instead of analysing (``k``, ``m`` and ``d_tilde`` are then ignored / must be unset).
    steps : int, optional
        Optimizer steps in all, half of them in the low-rank stage (:class:`~lr2vq_analysis.recipe.Budget`;
        0 skips fine-tuning). Default 600, or 80 with ``quick``.
    batch_size : int, optional
        Training batch size (default 64).
    seed : int, default 0
        Seeds the data split and order, the analysis, k-means and fine-tuning.
    out_dir : path, optional
        Folder for the files (created). Default: a new temporary folder.
    model_path : path, optional
        Where to write the compressed model (default: ``out_dir / "digits-cnn.lr2vq"``); ``summary.json``
        records it.
    quick : bool, default False
        Few steps, for tests and CI.
    device : torch.device or str, optional
        Where to fine-tune (default: CUDA when available, else the CPU).
    num_threads : int or None, default 1
        torch's CPU threads during the demo (restored afterwards); None keeps the current setting. The
        digits CNN is too small to gain from more threads, and on a busy machine extra threads
        spin-wait: on 2 shared cores, 2 threads made each step 3–30× slower than 1.
    progress : bool, default True
        Show progress bars and one line per stage.

    Returns
    -------
    DemoResult

    Raises
    ------
    InvalidParameterError
        On a bad k, m, d̃, plan, steps or seed.
    LR2VQError
        If the reloaded model does not reproduce the in-memory model's outputs.

    Examples
    --------
    >>> result = compress_digits_demo(d_tilde=4, steps=5, progress=False)
    >>> list(result.plan), result.plan["conv4.weight"]
    (['conv2.weight', 'conv3.weight', 'conv4.weight'], LayerPlan(k=16, m=9, d_tilde=4))
    >>> round(result.size.ratio, 1), result.accuracy_after > 0.5
    (28.7, True)
    >>> sorted(result.files)
    ['model', 'size', 'summary']
    """
    if num_threads is not None:
        num_threads = check_count(num_threads, "num_threads")
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _run_demo(k, m, d_tilde, plan, steps, batch_size, seed, out_dir, model_path, quick, device, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _run_demo(
    k: int,
    m: int,
    d_tilde: int | None,
    plan: Mapping[str, LayerPlan] | None,
    steps: int | None,
    batch_size: int | None,
    seed: int,
    out_dir: str | os.PathLike[str] | None,
    model_path: str | os.PathLike[str] | None,
    quick: bool,
    device: torch.device | str | None,
    progress: bool,
) -> DemoResult:
    started = time.perf_counter()
    seed = check_seed(seed)
    settings = dict(QUICK_DEFAULTS if quick else DEMO_DEFAULTS)
    if steps is not None:
        settings["steps"] = check_count(steps, "steps", minimum=0)
    if batch_size is not None:
        settings["batch_size"] = check_count(batch_size, "batch_size")
    if plan is not None and d_tilde is not None:
        raise InvalidParameterError("give a plan or d_tilde, not both (the plan carries each layer's d_tilde)")
    if plan is None:
        k, m = check_k(k), check_m(m)
        if d_tilde is not None:
            d_tilde = check_d_tilde(d_tilde, m)

    def say(text: str) -> None:
        if progress:
            print(text, flush=True)

    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="lr2vq-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = now - clock
        clock = now

    original = load_bundled_model("digits-cnn")
    loaders = digits_loaders(settings["batch_size"], seed)
    test, val = loaders["test"], loaders["val"]
    scores = {"pretrained": accuracy(original, test)}
    say(f"pretrained digits-cnn: test accuracy {scores['pretrained']:.2%}")
    files: dict[str, Path] = {}

    report = None
    if plan is None and d_tilde is not None:  # no prediction needed: the analysis's layers and k cap
        weights = load_weights(original, m=m)
        plan = {name: LayerPlan(k=effective_k(k, w.shape, m), m=m, d_tilde=d_tilde) for name, w in weights.items()}
    elif plan is None:
        from .report import analyze

        report = analyze(original, k=k, m=m, seed=seed, progress=progress)
        plan = report.plan("layer")
        files["report"] = report.save(out / REPORT_FILE)
        lap("analyze")
        say("predicted d_tilde: " + ", ".join(f"{layer.name}={layer.d_tilde}" for layer in report.layers))
    plan = dict(plan)

    def test_accuracy(name: str) -> Callable[[torch.nn.Module], None]:
        def measure(model: torch.nn.Module) -> None:
            scores[name] = accuracy(model, test)

        return measure

    def validation(model: torch.nn.Module) -> dict[str, float]:
        return {"val_accuracy": accuracy(model, val)}

    def report_stage(stage: str, text: Callable[[], str]) -> Callable[[torch.nn.Module], None]:
        def measure(model: torch.nn.Module) -> None:
            test_accuracy(stage)(model)
            lap(stage)
            say(text())

        return measure

    recipe = run_recipe(
        original,
        plan,
        loaders["train"],
        budget=Budget(settings["steps"]),
        teacher=original,
        distillation=DistillationConfig("kl", settings["distill_weight"], settings["temperature"]),
        training=TrainingConfig(num_threads=None),  # compress_digits_demo sets the threads
        eval_fn=validation,
        callbacks={
            "compressed": report_stage("compressed", lambda: f"compressed: test accuracy {scores['compressed']:.2%}"),
            "lowrank": report_stage(
                "lowrank", lambda: f"after the low-rank stage: test accuracy {scores['lowrank']:.2%}"
            ),
            "quantized": test_accuracy("quantized"),
            "recalibrated": report_stage(
                "recalibrated",
                lambda: (
                    f"quantized: test accuracy {scores['quantized']:.2%}, "
                    f"{scores['recalibrated']:.2%} after re-estimating batch norm"
                ),
            ),
            "rounded": report_stage(
                "finetuned", lambda: f"after the codebook stage: test accuracy {scores['finetuned']:.2%}"
            ),
        },
        seed=seed,
        device=device,
        progress=progress,
    )
    history = recipe.history
    cmodel = recipe.model.cpu().eval()

    files["model"] = save_compressed(cmodel, Path(model_path) if model_path is not None else out / MODEL_FILE)
    reloaded = load_compressed(files["model"], DigitsCNN()).eval()
    difference = _max_output_difference(cmodel, reloaded, test)
    if not difference <= RELOAD_TOLERANCE:
        raise LR2VQError(
            f"the model reloaded from {files['model']} differs from the in-memory one by {difference:.3g} "
            f"(tolerance {RELOAD_TOLERANCE})"
        )
    scores["reloaded"] = accuracy(reloaded, test)
    sizes = size_report(cmodel)
    files["size"] = write_atomic(out / SIZE_FILE, sizes.to_frame().to_csv(index=False).encode())
    lap("save and reload")
    seconds["total"] = time.perf_counter() - started

    result = DemoResult(
        accuracy=scores,
        plan=plan,
        size=sizes,
        files=files,
        max_reload_difference=difference,
        history=history,
        seconds=seconds,
        model=cmodel,
        reloaded=reloaded,
        report=report,
    )
    files["summary"] = out / SUMMARY_FILE
    write_atomic(files["summary"], json.dumps(result.to_dict(), indent=2).encode())
    say(result.summary())
    return result


@torch.no_grad()
def _max_output_difference(a: torch.nn.Module, b: torch.nn.Module, loader: Any) -> float:
    return max(float((a(x) - b(x)).abs().max()) for x, _ in loader)
