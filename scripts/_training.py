"""What the training scripts of the bundled models share: arguments, the one-cycle loop, metadata, file writing."""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save
from torch import nn
from torch.utils.data import DataLoader

from lr2vq_analysis._io import write_atomic
from lr2vq_analysis.datasets import accuracy


def fit_one_cycle(
    model: nn.Module,
    loaders: dict[str, DataLoader],
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    log_every: int,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Train with AdamW and a one-cycle schedule peaking at ``lr``; return the wall time in seconds."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * len(loaders["train"]))
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        losses = []
        for x, y in loaders["train"]:
            if transform is not None:
                x = transform(x)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        if (epoch + 1) % log_every == 0 or epoch + 1 == epochs:
            mean_loss = sum(losses) / len(losses)
            print(f"epoch {epoch + 1:3d}/{epochs}  loss {mean_loss:.4f}  val {accuracy(model, loaders['val']):.4f}")
    model.eval()
    return time.perf_counter() - start


def write_model_files(out: Path, model: nn.Module, name: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """Write the weights (safetensors) and their JSON metadata beside them, atomically; return the metadata."""
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    data = save(state, metadata={"model": name})
    write_atomic(out, data)
    metadata = {
        **metadata,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "file_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    write_atomic(out.with_suffix(".json"), (json.dumps(metadata, indent=2) + "\n").encode())
    return metadata


def training_parser(description: str, defaults: dict[str, Any], default_out: Path) -> argparse.ArgumentParser:
    """The arguments every training script takes: seed, epochs, peak lr, weight decay, batch size, output file."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seed", type=int, default=defaults["seed"])
    parser.add_argument("--epochs", type=int, default=defaults["epochs"])
    parser.add_argument("--lr", type=float, default=defaults["lr"], help="peak learning rate (one-cycle)")
    parser.add_argument("--weight-decay", type=float, default=defaults["weight_decay"])
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    parser.add_argument("--out", type=Path, default=default_out, help="safetensors output")
    return parser


def split_accuracies(
    model: nn.Module, loaders: dict[str, DataLoader], train_data: Any, seconds: float
) -> dict[str, Any]:
    """Accuracy on every split (``train_data``: the loader or dataset the training accuracy is measured on)."""
    return {
        "train_accuracy": accuracy(model, train_data),
        "val_accuracy": accuracy(model, loaders["val"]),
        "test_accuracy": accuracy(model, loaders["test"]),
        "split_sizes": {name: len(loader.dataset) for name, loader in loaders.items()},  # type: ignore[arg-type]
        "train_seconds": round(seconds, 2),
    }


def training_metadata(
    *,
    script: str,
    name: str,
    architecture: str,
    args: argparse.Namespace,
    default_out: Path,
    augment: str,
    results: dict[str, Any],
    data: str,
    extra_flags: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The JSON written beside the weights: the command that reproduces them, hyperparameters, results."""
    command = (
        f"python scripts/{script} --seed {args.seed} --epochs {args.epochs} --lr {args.lr} "
        f"--weight-decay {args.weight_decay} --batch-size {args.batch_size}"
    )
    command = " ".join([command, *extra_flags])
    if args.out != default_out:
        command += f" --out {shlex.quote(str(args.out))}"
    return {
        "model": name,
        "architecture": architecture,
        "command": command,
        "seed": args.seed,
        "hyperparameters": {
            "epochs": args.epochs,
            "optimizer": "AdamW",
            "peak_lr": args.lr,
            "schedule": "OneCycleLR (cosine)",
            "weight_decay": args.weight_decay,
            "batch_size": args.batch_size,
            "augment": augment,
        },
        **results,
        "data": data,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": 1,
            "note": "wall time measured on a shared 2-core machine",
        },
    }
