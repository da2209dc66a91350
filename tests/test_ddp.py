"""DistributedDataParallel fine-tuning with 2 CPU processes (gloo), launched through torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import ddp_worker
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

import lr2vq_analysis
from lr2vq_analysis.finetune import finetune

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    package_root = str(Path(lr2vq_analysis.__file__).resolve().parents[1])  # works without an installed package
    python_path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    # A session of its own, so that a hang kills the workers too, not just the launcher.
    launcher = subprocess.Popen(
        [*command, str(Path(__file__).with_name("ddp_worker.py")), str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = launcher.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        output, _ = launcher.communicate()
        pytest.fail("torchrun with 2 processes did not finish within 180 s:\n" + output[-3000:])
    assert launcher.returncode == 0, output[-6000:]
    return out


@pytest.mark.parametrize("name", ["plain", "batchnorm", "codebook"])
def test_ranks_end_with_identical_weights(ddp_run, name):
    rank0 = torch.load(ddp_run / f"{name}_rank0.pt", weights_only=True)
    rank1 = torch.load(ddp_run / f"{name}_rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for key in rank0:  # batch-norm running statistics included
        assert torch.equal(rank0[key], rank1[key]), key
    losses = [json.loads((ddp_run / f"{name}_rank{r}.json").read_text()) for r in (0, 1)]
    assert losses[0] == losses[1] and len(losses[0]) == ddp_worker.STEPS
    assert sum(losses[0][-3:]) < sum(losses[0][:3])


def test_two_ranks_equal_one_process_with_the_combined_batch(ddp_run):
    # With a DistributedSampler, rank r takes samples r, r+2, ... of each epoch's permutation, so the two rank
    # batches of a step together are the single process's batch of twice the size (the same permutation: a
    # one-replica DistributedSampler with the same seed); DDP averages the two gradients.
    model = ddp_worker.make_model(batchnorm=False)
    data = ddp_worker.make_data()
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=3)
    loader = DataLoader(data, batch_size=2 * ddp_worker.BATCH_PER_RANK, sampler=sampler)
    result = finetune(model, loader, steps=ddp_worker.STEPS, lr=1e-2, seed=3, progress=False)
    distributed = torch.load(ddp_run / "plain_rank0.pt", weights_only=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(distributed[key], value, rtol=1e-5, atol=1e-6)
    losses = json.loads((ddp_run / "plain_rank0.json").read_text())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(result.losses), rtol=1e-5, atol=1e-6)


def test_only_rank_zero_writes_the_checkpoint(ddp_run):
    state = torch.load(ddp_run / "batchnorm.ckpt", weights_only=True)
    assert state["step"] == ddp_worker.STEPS and state["config"]["world_size"] == 2
    rank0 = torch.load(ddp_run / "batchnorm_rank0.pt", weights_only=True)
    for key, value in rank0.items():
        assert torch.equal(state["model"][key], value), key
    assert sorted(p.name for p in ddp_run.glob("*.ckpt*")) == ["batchnorm.ckpt"]
