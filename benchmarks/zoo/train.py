"""Stage 1 of the zoo study: train the zoo networks (``networks.ZOO``) reproducibly, one thread each.

::

    python benchmarks/zoo/train.py                       # every network -> benchmarks/zoo/weights/
    python benchmarks/zoo/train.py --networks Z01,Z07    # some of them
    python benchmarks/zoo/train.py --quick --out-dir /tmp/zoo   # Z01, one epoch (smoke test)

Adam with a cosine schedule, batch 64, seed 0; the weights of the epoch with the best validation accuracy
are kept. Writes ``<id>.safetensors`` (atomically) and ``<id>.json`` (command, accuracies, seconds).
Networks whose weights exist are skipped unless ``--force``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

from networks import WEIGHTS, ZOO, weights_path

from lr2vq_analysis.datasets import accuracy
from lr2vq_analysis.io import write_atomic


def train_network(network_id: str, out_dir: Path, epochs: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Train one network and write its weights and record; returns the record."""
    from safetensors.torch import save_file

    net = ZOO[network_id]
    torch.manual_seed(seed)
    model = net.build()
    splits = net.splits()
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(splits["train"], batch_size=64, shuffle=True, generator=generator)
    epochs = net.epochs if epochs is None else epochs
    optimizer = torch.optim.Adam(model.parameters(), lr=net.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))
    best, best_state, start = -1.0, None, time.time()
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            schedule.step()
        model.eval()
        val = accuracy(model, splits["val"])
        if val > best:
            best, best_state = val, copy.deepcopy(model.state_dict())
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    record = {
        "id": network_id,
        "description": net.description,
        "half": net.half,
        "parameters": sum(p.numel() for p in model.parameters()),
        "epochs": epochs,
        "seed": seed,
        "val_accuracy": best,
        "test_accuracy": accuracy(model, splits["test"]),
        "train_accuracy": accuracy(model, splits["train"]),
        "seconds": round(time.time() - start, 1),
        "command": "python benchmarks/zoo/train.py " + " ".join(sys.argv[1:]),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    target = weights_path(network_id, out_dir)
    with tempfile.NamedTemporaryFile(dir=out_dir, suffix=".tmp", delete=False) as handle:
        temporary = handle.name
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, temporary)
    os.replace(temporary, target)
    write_atomic(out_dir / f"{network_id}.json", (json.dumps(record, indent=1) + "\n").encode())
    return record


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", default=",".join(ZOO))
    parser.add_argument("--out-dir", type=Path, default=WEIGHTS)
    parser.add_argument("--quick", action="store_true", help="Z01 for one epoch (smoke test)")
    parser.add_argument("--force", action="store_true", help="retrain networks whose weights exist")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ids = ["Z01"] if args.quick else args.networks.split(",")
    unknown = [i for i in ids if i not in ZOO]
    if unknown:
        raise SystemExit(f"unknown networks {unknown}; the zoo is {sorted(ZOO)}")
    records = []
    for network_id in ids:
        if weights_path(network_id, args.out_dir).is_file() and not args.force and not args.quick:
            print(f"{network_id}: weights exist, skipped", flush=True)
            continue
        record = train_network(network_id, args.out_dir, epochs=1 if args.quick else None)
        records.append(record)
        print(
            f"{network_id} ({record['description']}): val {record['val_accuracy']:.4f}, test "
            f"{record['test_accuracy']:.4f}, {record['seconds']:.0f} s",
            flush=True,
        )
    return records


if __name__ == "__main__":
    main()
