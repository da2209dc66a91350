"""Worker of tests/test_ddp.py, launched by torchrun with 2 CPU processes: fine-tunes three small models
(a plain MLP, one with batch norm and dropout, and one with quantized LR²VQ layers in the codebook stage).

Each rank writes its final state_dict (and the loss history) to the folder given as argument. Importing
this module only defines the shared data and models (the single-process reference imports them).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

STEPS = 12
BATCH_PER_RANK = 8


def make_data() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=generator)
    return TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long())


def make_model(*, batchnorm: bool, compressed: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if compressed:  # quantized LR²VQ layers: codebook stage
        from lr2vq_analysis.nn import compress
        from lr2vq_analysis.plan import LayerPlan

        dense = make_model(batchnorm=True)
        return compress(dense, {"0.weight": LayerPlan(k=8, m=3, d_tilde=2)}).quantize(seed=0)
    if batchnorm:  # batch statistics differ per rank: only identical-across-ranks can be checked
        return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))


def main(out: Path) -> None:
    from lr2vq_analysis.finetune import CheckpointConfig, finetune

    rank = int(os.environ["RANK"])
    for name, batchnorm, stage in (
        ("plain", False, "dense"),
        ("batchnorm", True, "dense"),
        ("codebook", True, "codebook"),
    ):
        model = make_model(batchnorm=batchnorm, compressed=stage == "codebook")
        data = make_data()
        world = int(os.environ["WORLD_SIZE"])
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=3)
        loader = DataLoader(data, batch_size=BATCH_PER_RANK, sampler=sampler)
        checkpoint = CheckpointConfig(out / f"{name}.ckpt", every=4) if name == "batchnorm" else None
        result = finetune(
            model, loader, stage=stage, steps=STEPS, lr=1e-2, seed=3, progress=False, checkpoint=checkpoint
        )
        torch.save(model.state_dict(), out / f"{name}_rank{rank}.pt")
        (out / f"{name}_rank{rank}.json").write_text(json.dumps(result.losses))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
