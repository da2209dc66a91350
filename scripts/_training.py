"""What the training scripts of the bundled models share: the one-cycle training loop and the file writing."""

from __future__ import annotations

import hashlib
import json
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
