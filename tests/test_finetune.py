"""Tests of the fine-tuning loop against hand-written references: a plain Adam + cosine loop, Hinton's
distillation formula, per-batch statistics for batch norm, and an uninterrupted run for resume."""

from __future__ import annotations

import copy
import importlib
import math
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lr2vq_analysis._validation import InvalidParameterError
from lr2vq_analysis.exceptions import CheckpointError, NonFiniteError, ResumeMismatchError
from lr2vq_analysis.finetune import (
    CheckpointConfig,
    DistillationConfig,
    StageError,
    TrainingConfig,
    check_stage,
    distillation_loss,
    finetune,
    recalibrate_batchnorm,
    split_batch,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 96, features: int = 6, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return TensorDataset(x, y)


def _mlp(seed: int = 0, *, dropout: float = 0.0, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(6, 16)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3)]
    return nn.Sequential(*layers)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


# ---------------------------------------------------------------------------------------------------
# the loop against a hand-written reference


def test_matches_hand_written_adam_cosine_loop():
    data = _data()
    model, reference = _mlp(), _mlp()
    finetune(
        model, DataLoader(data, batch_size=16), training=TrainingConfig(steps=15, lr=3e-3, lr_min=1e-5), progress=False
    )

    # Reference: PQF's recipe written out by hand, batches in dataset order, cycling over epochs.
    optimizer = torch.optim.Adam(reference.parameters(), lr=3e-3)
    batches = [(data.tensors[0][i : i + 16], data.tensors[1][i : i + 16]) for i in range(0, 96, 16)]
    for step in range(15):
        for group in optimizer.param_groups:  # closed-form cosine from 3e-3 to 1e-5 over 15 steps
            group["lr"] = 1e-5 + (3e-3 - 1e-5) * (1 + math.cos(math.pi * step / 15)) / 2
        x, y = batches[step % len(batches)]
        optimizer.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        optimizer.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_learning_rate_follows_cosine_to_lr_min():
    result = finetune(_mlp(), DataLoader(_data(), batch_size=32), training=TrainingConfig(steps=10), progress=False)
    expected = [1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi * t / 10)) / 2 for t in range(10)]
    np.testing.assert_allclose(result.lrs, expected, rtol=1e-9)
    constant = finetune(
        _mlp(),
        DataLoader(_data(), batch_size=32),
        training=TrainingConfig(steps=5, scheduler="constant"),
        progress=False,
    )
    assert constant.lrs == [1e-3] * 5


def test_learns_a_separable_task_and_reports_history():
    data = _data(n=192)
    model = _mlp()
    loader = DataLoader(data, batch_size=32, shuffle=True)
    result = finetune(model, loader, training=TrainingConfig(epochs=25, lr=3e-2), progress=False)
    assert result.steps == 25 * 6 and len(result.losses) == 150
    assert np.mean(result.losses[-6:]) < 0.5 * np.mean(result.losses[:6])
    with torch.no_grad():
        train_accuracy = (model(data.tensors[0]).argmax(1) == data.tensors[1]).float().mean().item()
    assert train_accuracy > 0.95  # the majority class holds 49 %


def test_custom_optimizer_and_scheduler_factories_are_used():
    calls = {}

    def make_optimizer(params):
        calls["optimizer"] = len(params)
        return torch.optim.SGD(params, lr=0.1)

    def make_scheduler(optimizer, total):
        calls["total"] = total
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)

    result = finetune(
        _mlp(), DataLoader(_data(), batch_size=32),
        training=TrainingConfig(epochs=2, optimizer=make_optimizer, scheduler=make_scheduler), progress=False,
    )  # fmt: skip
    assert calls == {"optimizer": 4, "total": 6}
    assert result.lrs == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]


def test_only_parameters_requiring_grad_change():
    model = _mlp()
    model[0].requires_grad_(False)
    frozen = _state(model[0])
    finetune(model, DataLoader(_data(), batch_size=32), steps=3, progress=False)
    assert torch.equal(model[0].weight, frozen["weight"]) and torch.equal(model[0].bias, frozen["bias"])
    assert not torch.equal(model[-1].weight, _mlp()[-1].weight)


def test_grad_clip_bounds_the_first_update():
    # With SGD(lr=1) the first update equals the (clipped) gradient, so its norm is at most grad_clip.
    model = _mlp()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    finetune(
        model, DataLoader(_data(), batch_size=96), progress=False,
        training=TrainingConfig(steps=1, grad_clip=0.01, scheduler="constant",
                                optimizer=lambda params: torch.optim.SGD(params, lr=1.0)),
    )  # fmt: skip
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm().item() == pytest.approx(0.01, rel=1e-4)


# ---------------------------------------------------------------------------------------------------
# batches, outputs, distillation


def test_batch_contract():
    x, y = torch.zeros(2, 3), torch.tensor([1, 2])
    assert split_batch((x, y))[1] is y and split_batch([x, y])[0] is x
    assert split_batch((x,))[1] is None and split_batch(x) == (x, None)
    inputs, target = split_batch({"input_ids": x, "attention_mask": x, "labels": y})
    assert set(inputs) == {"input_ids", "attention_mask"} and target is y
    with pytest.raises(InvalidParameterError, match="batch must be"):
        split_batch((x, y, y))
    with pytest.raises(InvalidParameterError, match="batch must be"):
        split_batch("text")


class _KeywordModel(nn.Module):
    """A model called with keyword tensors that returns an output object with .logits (like transformers)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 3)

    def forward(self, features, scale):
        return type("Output", (), {"logits": self.linear(features) * scale})()


class _DictDataset(torch.utils.data.Dataset):
    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):
        x, y = self.data[index]
        return {"features": x, "scale": torch.tensor([2.0]), "labels": y}


def test_mapping_batches_call_the_model_with_keywords():
    torch.manual_seed(0)
    model = _KeywordModel()
    reference = copy.deepcopy(model.linear)
    result = finetune(model, DataLoader(_DictDataset(_data()), batch_size=96), steps=1, progress=False)
    # One Adam step moves every weight by ~lr in the direction of -sign(grad) (bias-corrected first step).
    x, y = _data().tensors
    nn.functional.cross_entropy(reference(x) * 2.0, y).backward()
    step = model.linear.weight.detach() - reference.weight.detach()
    np.testing.assert_allclose(step.numpy(), (-1e-3 * torch.sign(reference.weight.grad)).numpy(), atol=2e-6)
    assert result.steps == 1


def test_kl_distillation_matches_hinton_formula():
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(5, 7, generator=generator), torch.randn(5, 7, generator=generator)
    temperature = 3.0
    s, t = student.double().numpy() / temperature, teacher.double().numpy() / temperature
    p_t = np.exp(t - t.max(1, keepdims=True))
    p_t /= p_t.sum(1, keepdims=True)
    log_p_s = s - s.max(1, keepdims=True) - np.log(np.exp(s - s.max(1, keepdims=True)).sum(1, keepdims=True))
    expected = temperature**2 * np.mean(np.sum(p_t * (np.log(p_t) - log_p_s), axis=1))
    assert float(distillation_loss(student, teacher, "kl", temperature)) == pytest.approx(expected, rel=1e-5)
    # Token logits (batch, tokens, classes) are averaged over every position.
    tokens = distillation_loss(student.reshape(1, 5, 7), teacher.reshape(1, 5, 7), "kl", temperature)
    assert float(tokens) == pytest.approx(expected, rel=1e-5)
    assert float(distillation_loss(student, teacher, "mse", 1.0)) == pytest.approx(
        float(((student - teacher) ** 2).mean()), rel=1e-6
    )


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_distillation_pulls_the_student_to_the_teacher(kind):
    teacher, student = _mlp(seed=1), _mlp(seed=2)
    x = _data().tensors[0]
    with torch.no_grad():
        gap_before = (student(x) - teacher(x)).pow(2).mean().item()
    # Batches without targets: pure distillation needs none.
    result = finetune(
        student, DataLoader(TensorDataset(x), batch_size=32, shuffle=True), steps=150, teacher=teacher,
        distillation=kind, lr=1e-2, progress=False,
    )  # fmt: skip
    with torch.no_grad():
        gap_after = (student(x) - teacher(x)).pow(2).mean().item()
        agreement = (student(x).argmax(1) == teacher(x).argmax(1)).float().mean().item()
    assert result.losses[-1] < 0.2 * result.losses[0]
    assert agreement > 0.9
    if kind == "mse":
        assert gap_after < 0.05 * gap_before
    assert all(not p.requires_grad or p.grad is None for p in teacher.parameters())


def test_distillation_of_an_identical_teacher_costs_nothing():
    model = _mlp()
    result = finetune(model, DataLoader(_data(), batch_size=32), steps=1, teacher=copy.deepcopy(model), progress=False)
    assert result.losses[0] == pytest.approx(0.0, abs=1e-6)


def test_distill_weight_mixes_task_and_distillation_losses():
    data = _data()
    model, teacher = _mlp(seed=0), _mlp(seed=1)
    x, y = data.tensors
    with torch.no_grad():
        task = nn.functional.cross_entropy(model(x), y).item()
        kl = distillation_loss(model(x), teacher(x), "kl", 2.0).item()
    result = finetune(
        model, DataLoader(data, batch_size=96), steps=1, teacher=teacher,
        distillation=DistillationConfig(weight=0.3, temperature=2.0), progress=False,
    )  # fmt: skip
    assert result.losses[0] == pytest.approx(0.3 * kl + 0.7 * task, rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# evaluation, data order, checkpoints and resume


def test_eval_fn_runs_in_eval_mode_at_the_period_and_at_the_end():
    model = _mlp(dropout=0.5)
    seen = []

    def eval_fn(evaluated):
        seen.append((evaluated.training, torch.is_grad_enabled()))
        return {"calls": len(seen)}

    result = finetune(model, DataLoader(_data(), batch_size=16), steps=7, eval_fn=eval_fn, eval_every=3, progress=False)
    assert sorted(result.evals) == [3, 6, 7]
    assert [metrics["calls"] for metrics in result.evals.values()] == [1.0, 2.0, 3.0]
    assert seen == [(False, False)] * 3 and model.training


class _LoggingDataset(torch.utils.data.Dataset):
    def __init__(self, data: TensorDataset) -> None:
        self.data, self.seen = data, []

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):
        self.seen.append(int(index))
        return self.data[index]


def test_custom_sampler_is_respected_and_standard_ones_are_seeded():
    dataset = _LoggingDataset(_data())
    finetune(_mlp(), DataLoader(dataset, batch_size=8, sampler=[5, 3, 9, 1]), steps=3, progress=False)
    assert dataset.seen == [5, 3, 9, 1] * 3
    orders = []
    for loader_seed in (1, 2):  # the loader's own generator does not matter; finetune's seed does
        dataset.seen = []
        generator = torch.Generator().manual_seed(loader_seed)
        loader = DataLoader(dataset, batch_size=96, shuffle=True, generator=generator)
        state = generator.get_state()
        finetune(_mlp(), loader, steps=2, seed=4, progress=False)
        orders.append(list(dataset.seen))
        assert torch.equal(generator.get_state(), state) and loader.generator is generator  # the caller's, untouched
    assert orders[0] == orders[1] and sorted(orders[0][:96]) == list(range(96)) and orders[0][:96] != orders[0][96:]


class _CountingLoader(DataLoader):
    """A DataLoader subclass: rebuilding it from its attributes would lose the subclass and its options."""

    iterations = 0

    def __iter__(self):
        type(self).iterations += 1
        return super().__iter__()


def test_the_callers_loader_is_iterated_as_given():
    loader = _CountingLoader(_data(), batch_size=32, shuffle=True, num_workers=0, pin_memory=False)
    _CountingLoader.iterations = 0
    finetune(_mlp(), loader, steps=7, progress=False)  # 3 batches per epoch: epochs 0, 1, 2
    assert _CountingLoader.iterations == 3


def test_distributed_sampler_gets_every_epoch():
    class Recording(torch.utils.data.DistributedSampler):
        def set_epoch(self, epoch):
            epochs.append(epoch)
            super().set_epoch(epoch)

    epochs: list[int] = []
    sampler = Recording(_data(), num_replicas=1, rank=0, shuffle=True, seed=5)
    loader = DataLoader(_data(), batch_size=32, sampler=sampler)
    finetune(_mlp(), loader, steps=7, progress=False)
    assert epochs == [0, 1, 2]


class _Crash(Exception):
    pass


def _crash_at_call(model: nn.Module, calls: int):
    """A forward hook that kills the run at the given forward call (the run's configuration is unchanged)."""
    count = {"n": 0}

    def hook(module, args):
        count["n"] += 1
        if count["n"] >= calls:
            raise _Crash

    return model.register_forward_pre_hook(hook)


def _nan_loss_at(step: int):
    """Cross-entropy, except NaN at the given call (fault injection)."""
    count = {"n": 0}

    def loss_fn(output, target):
        count["n"] += 1
        loss = nn.functional.cross_entropy(output, target)
        return loss * float("nan") if count["n"] == step else loss

    return loss_fn


@pytest.mark.parametrize("loader_kind", ["dataloader", "list"])
def test_resume_after_a_crash_gives_the_uninterrupted_result(tmp_path, loader_kind):
    data = _data()
    if loader_kind == "dataloader":
        loader = DataLoader(data, batch_size=16, shuffle=True)
    else:
        loader = [(data.tensors[0][i : i + 16], data.tensors[1][i : i + 16]) for i in range(0, 96, 16)]
    common = {"steps": 20, "seed": 7, "progress": False, "eval_every": 5}
    path = tmp_path / "run.ckpt"
    checkpoint = CheckpointConfig(path, every=5)

    def eval_fn(model):
        return {"norm": float(sum(p.norm() for p in model.parameters()))}

    straight = _mlp(dropout=0.3, batchnorm=True)
    expected = finetune(straight, loader, eval_fn=eval_fn, **common)

    interrupted = _mlp(dropout=0.3, batchnorm=True)
    handle = _crash_at_call(interrupted, 13)
    with pytest.raises(_Crash):  # dies during step 13; the last checkpoint holds step 10
        finetune(interrupted, loader, checkpoint=checkpoint, eval_fn=eval_fn, **common)
    handle.remove()
    assert torch.load(path, weights_only=True)["step"] == 10

    resumed_model = _mlp(dropout=0.3, batchnorm=True)  # a fresh process: weights come from the checkpoint
    resumed = finetune(resumed_model, loader, checkpoint=checkpoint, eval_fn=eval_fn, **common)
    assert resumed.resumed_from == 10 and resumed.steps == 20
    _assert_same_weights(resumed_model, straight)
    assert resumed.losses == expected.losses and resumed.lrs == expected.lrs and resumed.evals == expected.evals

    # Re-running a finished run (a notebook cell run twice) says so, and loads the final weights.
    again_model = _mlp(dropout=0.3, batchnorm=True)
    with pytest.warns(UserWarning, match=r"finished run \(20 of 20 steps\).*resume=False"):
        again = finetune(again_model, loader, checkpoint=checkpoint, **common)
    assert again.resumed_from == 20 and again.losses == expected.losses
    _assert_same_weights(again_model, straight)


def test_checkpoint_is_weights_only_loadable_and_complete(tmp_path):
    path = tmp_path / "sub" / "run.ckpt"
    model = _mlp()
    finetune(model, DataLoader(_data(), batch_size=32, shuffle=True), steps=4, checkpoint=path, progress=False)
    state = torch.load(path, weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng", "step", "history", "config", "checksum"} <= set(state)
    assert state["step"] == 4 and len(state["history"]["losses"]) == 4
    assert {"lr", "seed", "total_steps", "optimizer", "loss", "model", "data"} <= set(state["config"])
    for key, value in model.state_dict().items():
        assert torch.equal(state["model"][key], value)
    assert [p.name for p in path.parent.iterdir()] == ["run.ckpt"]  # no temporary file left behind


def test_checkpoint_of_another_run_is_refused_and_resume_false_restarts(tmp_path):
    path = tmp_path / "run.ckpt"
    loader = DataLoader(_data(), batch_size=32)
    finetune(_mlp(), loader, steps=4, checkpoint=path, progress=False)
    with pytest.raises(ResumeMismatchError, match=r"total_steps.*4 in the checkpoint, 6 now.*resume=False"):
        finetune(_mlp(), loader, steps=6, checkpoint=path, progress=False)
    result = finetune(_mlp(), loader, steps=6, checkpoint=CheckpointConfig(path, resume=False), progress=False)
    assert result.resumed_from == 0 and torch.load(path, weights_only=True)["step"] == 6


def _interrupted_run(tmp_path, **kwargs):
    """A run of 6 steps killed during step 4, its checkpoint at step 2; returns (path, loader, common options)."""
    path = tmp_path / "run.ckpt"
    loader = DataLoader(_data(), batch_size=16, shuffle=True)
    common = {"steps": 6, "checkpoint": CheckpointConfig(path, every=2), "progress": False, **kwargs}
    model = _mlp()
    handle = _crash_at_call(model, 4)
    with pytest.raises(_Crash):
        finetune(model, loader, **common)
    handle.remove()
    return path, loader, common


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"lr": 1e-2}, "lr"),
        ({"seed": 1}, "seed"),
        ({"loss_fn": nn.functional.nll_loss}, "loss"),
        ({"training": TrainingConfig(lr_min=1e-4)}, "lr_min"),
        ({"training": TrainingConfig(grad_clip=1.0)}, "grad_clip"),
        ({"training": TrainingConfig(optimizer=lambda params: torch.optim.SGD(params, lr=1e-3))}, "optimizer"),
        ({"training": TrainingConfig(scheduler="constant")}, "scheduler"),
        ({"teacher": _mlp(seed=3)}, "teacher"),
        ({"stage": "dense", "loader": DataLoader(_data(seed=1), batch_size=16, shuffle=True)}, "data"),
        ({"model": _mlp(seed=1)}, "model"),
    ],
)
def test_resume_refuses_any_configuration_change_and_names_it(tmp_path, change, field):
    _, loader, common = _interrupted_run(tmp_path)
    change = dict(change)
    changed_loader = change.pop("loader", loader)
    model = change.pop("model", _mlp())
    before = _state(model)
    with pytest.raises(ResumeMismatchError, match=rf"\b{field}\b.*in the checkpoint.*another checkpoint path"):
        finetune(model, changed_loader, **{**common, **change})
    for key, value in model.state_dict().items():  # nothing was loaded into the model
        assert torch.equal(value, before[key]), key
    resumed = finetune(_mlp(), loader, **common)  # the unchanged run still resumes
    assert resumed.resumed_from == 2


def test_resume_refuses_another_width_or_d_tilde(tmp_path):
    _, loader, common = _interrupted_run(tmp_path)
    wider = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.0), nn.Linear(32, 3))
    with pytest.raises(ResumeMismatchError, match=r"shapes differ:.*0\.weight \(16, 6\) -> \(32, 6\)"):
        finetune(wider, loader, **common)

    from lr2vq_analysis.nn import compress
    from lr2vq_analysis.plan import LayerPlan

    compressed = {d: compress(_mlp(), {"0.weight": LayerPlan(k=8, m=3, d_tilde=d)}) for d in (1, 2)}
    checkpoint = CheckpointConfig(tmp_path / "lowrank.ckpt")
    finetune(compressed[2], loader, stage="lowrank", steps=2, checkpoint=checkpoint, progress=False)
    with pytest.raises(ResumeMismatchError, match="shapes differ"):
        finetune(compressed[1], loader, stage="lowrank", steps=2, checkpoint=checkpoint, progress=False)


def _flip_byte_inside(path, tensor: torch.Tensor) -> None:
    blob = bytearray(path.read_bytes())
    where = bytes(blob).find(tensor.detach().contiguous().numpy().tobytes())
    assert where > 0
    blob[where + 5] ^= 0x10
    path.write_bytes(bytes(blob))


def test_damaged_checkpoints_are_refused_with_checkpoint_error(tmp_path):
    path, loader, common = _interrupted_run(tmp_path)
    good = path.read_bytes()
    state = torch.load(path, weights_only=True)

    def refused(match):
        with pytest.raises(CheckpointError, match=match):
            finetune(_mlp(), loader, **common)

    path.write_bytes(b"")
    refused("empty")
    for cut in (10, len(good) // 2, len(good) - 30):
        path.write_bytes(good[:cut])
        refused("cannot be read")
    path.write_bytes(b"step,loss\n1,0.5\n")
    refused("cannot be read")
    torch.save({"weights": torch.zeros(3)}, path)  # a torch file, but not a checkpoint
    refused("not a fine-tuning checkpoint")
    for name in ("model", "optimizer", "step", "history", "checksum"):
        torch.save({key: value for key, value in state.items() if key != name}, path)
        refused(f"field '{name}' is missing")
    # A byte flipped inside a weight tensor: torch still reads the file, the checksum does not match.
    path.write_bytes(good)
    _flip_byte_inside(path, state["model"]["0.weight"])
    assert torch.load(path, weights_only=True)["step"] == 2  # still readable by torch
    refused("checksum does not match")
    # A file rewritten with a consistent checksum but an impossible step is refused too.
    from lr2vq_analysis.finetune import _checksum

    for step in (10**9, -5):
        crafted = {**state, "step": step}
        crafted["checksum"] = _checksum(crafted)
        torch.save(crafted, path)
        refused(f"step={step}, outside 0..6")
    path.write_bytes(good)
    assert finetune(_mlp(), loader, **common).resumed_from == 2


def test_an_unwritable_checkpoint_path_fails_before_the_first_step(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    model = _mlp()
    before = _state(model)
    for bad in (blocker / "run.ckpt", tmp_path):  # a folder under a file; a folder itself
        with pytest.raises(CheckpointError, match=r"cannot be written|is a folder"):
            finetune(model, DataLoader(_data(), batch_size=32), steps=3, checkpoint=bad, progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    path = tmp_path / "run.ckpt"
    loader = DataLoader(_data(), batch_size=16, shuffle=True)
    model = _mlp()
    snapshots = {}

    def eval_fn(evaluated):
        snapshots[len(snapshots)] = _state(evaluated)
        return {}

    with pytest.raises(NonFiniteError, match=rf"step 7 of 12: the loss is nan.*{path.name}' \(step 6\)"):
        finetune(model, loader, steps=12, loss_fn=_nan_loss_at(7), checkpoint=CheckpointConfig(path, every=3),
                 eval_fn=eval_fn, eval_every=6, progress=False)  # fmt: skip
    state = torch.load(path, weights_only=True)
    assert state["step"] == 6 and all(torch.isfinite(v).all() for v in state["model"].values())
    for key, value in model.state_dict().items():  # the model holds the step-6 weights, finite
        assert torch.equal(value, snapshots[0][key]), key
    # Without a checkpoint the message says so.
    with pytest.raises(NonFiniteError, match=r"step 2 of 4.*no checkpoint was kept"):
        finetune(_mlp(), loader, steps=4, loss_fn=_nan_loss_at(2), progress=False)


def test_nan_gradient_is_caught_even_with_grad_clip():
    class NanGrad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _mlp()

        def forward(self, x):
            out = self.inner(x)
            return out + 0.0 * torch.sqrt(-torch.ones(()) + 0.0 * out.sum())  # finite loss? no: sqrt(-1) is NaN

    loader = DataLoader(_data(), batch_size=32)
    with pytest.raises(NonFiniteError, match="step 1 of 3"):
        finetune(NanGrad(), loader, training=TrainingConfig(steps=3, grad_clip=1.0), progress=False)


def test_a_non_finite_model_never_replaces_a_good_checkpoint(tmp_path):
    class Poisoning(torch.optim.SGD):
        def step(self, closure=None):
            super().step(closure)
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 3:  # the update of step 3 writes an Inf, the loss of step 3 was finite
                self.param_groups[0]["params"][0].data[0, 0] = float("inf")

    path = tmp_path / "run.ckpt"
    training = TrainingConfig(steps=6, optimizer=lambda params: Poisoning(params, lr=1e-2))
    with pytest.raises(NonFiniteError, match=r"step 3: parameters \['0.weight'\].*\(step 2\)"):
        finetune(_mlp(), DataLoader(_data(), batch_size=16), training=training,
                 checkpoint=CheckpointConfig(path, every=1), progress=False)  # fmt: skip
    assert torch.load(path, weights_only=True)["step"] == 2


def test_skip_policy_drops_non_finite_steps_and_records_them():
    loader = DataLoader(_data(), batch_size=16)
    skipping = TrainingConfig(steps=6, on_nonfinite="skip", scheduler="constant")
    result = finetune(_mlp(), loader, loss_fn=_nan_loss_at(3), training=skipping, progress=False)
    assert result.skipped == [3] and math.isnan(result.losses[2]) and result.steps == 6
    # Reference: the same run where step 3 makes no update (same batches, the optimizer state untouched).
    model = _mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = _data().tensors
    for step in range(6):
        if step == 2:
            continue
        batch = slice(16 * step, 16 * step + 16)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    trained = _mlp()
    finetune(trained, loader, loss_fn=_nan_loss_at(3), training=skipping, progress=False)
    for a, b in zip(trained.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_an_interrupted_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import lr2vq_analysis._io as io_module

    path = tmp_path / "run.ckpt"
    loader = DataLoader(_data(), batch_size=16, shuffle=True)
    common = {"steps": 6, "checkpoint": CheckpointConfig(path, every=2), "progress": False, "seed": 2}
    expected_model = _mlp()
    expected = finetune(expected_model, loader, steps=6, seed=2, progress=False)
    real_replace, calls = os.replace, {"n": 0}

    def dying_replace(src, dst):  # the process dies inside the second checkpoint write, before the rename
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(io_module.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        finetune(_mlp(), loader, **common)
    monkeypatch.setattr(io_module.os, "replace", real_replace)
    assert torch.load(path, weights_only=True)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt"]
    resumed_model = _mlp()
    resumed = finetune(resumed_model, loader, **common)
    assert resumed.resumed_from == 2 and resumed.losses == expected.losses
    _assert_same_weights(resumed_model, expected_model)


def test_result_repr_is_short_and_has_html():
    result = finetune(_mlp(), DataLoader(_data(), batch_size=8), steps=12, progress=False)
    text = repr(result)
    assert text.startswith("FinetuneResult(stage=dense, steps=12, loss=") and len(text) < 120
    assert "<table>" in result._repr_html_() and "dense" in result._repr_html_()


def test_auto_threads_run_a_small_model_on_one_thread_and_restore_the_setting():
    seen = []
    model = _mlp()
    model.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        finetune(model, DataLoader(_data(), batch_size=32), steps=2, progress=False)
        assert seen == [1, 1] and torch.get_num_threads() == 2
        seen.clear()
        finetune(model, DataLoader(_data(), batch_size=32), training=TrainingConfig(steps=2, num_threads=None),
                 progress=False)  # fmt: skip
        assert seen == [2, 2]
        model_bn = _mlp(batchnorm=True)
        model_bn.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
        seen.clear()
        recalibrate_batchnorm(model_bn, DataLoader(_data(), batch_size=32))
        assert seen == [1, 1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_callers_random_state_is_untouched():
    model, loader = _mlp(dropout=0.5), DataLoader(_data(), batch_size=32, shuffle=True)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    finetune(model, loader, steps=3, progress=False)
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------------------------------
# stages


class _FakeCompressedLayer(nn.Linear):
    def __init__(self, state: str) -> None:
        super().__init__(6, 6)
        self.state = state


def _with_states(*states: str) -> nn.Module:
    return nn.Sequential(*[_FakeCompressedLayer(state) for state in states], nn.Linear(6, 3))


def test_stage_must_match_the_compressed_layers_state():
    assert check_stage(_with_states("lowrank", "lowrank"), "lowrank") == "lowrank"
    assert check_stage(_with_states("quantized"), "codebook") == "codebook"
    assert check_stage(_with_states("dkm"), "dkm") == "dkm"
    assert check_stage(_with_states("lowrank"), None) == "dense"
    with pytest.raises(StageError, match=r"stage='codebook'.*'0' is 'lowrank'.*quantize\(\)"):
        check_stage(_with_states("lowrank", "quantized"), "codebook")
    with pytest.raises(StageError, match="'1' is 'quantized'"):
        check_stage(_with_states("lowrank", "quantized"), "lowrank")
    with pytest.raises(StageError, match="no compressed layer"):
        check_stage(_mlp(), "lowrank")
    with pytest.raises(InvalidParameterError, match="stage='fast' is invalid"):
        check_stage(_mlp(), "fast")
    with pytest.raises(StageError):
        finetune(_with_states("lowrank"), DataLoader(_data(), batch_size=32), stage="codebook", progress=False)


def test_compressed_layers_method_is_preferred():
    model = _with_states("lowrank")
    model.compressed_layers = lambda: {"conv": type("Layer", (), {"state": "quantized"})()}  # type: ignore[method-assign]
    with pytest.raises(StageError, match="'conv' is 'quantized'"):
        check_stage(model, "lowrank")


# ---------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TrainingConfig(steps=5, epochs=1), "not both"),
        (lambda: TrainingConfig(steps=0), "steps=0 is invalid"),
        (lambda: TrainingConfig(epochs=1.5), "epochs=1.5 is invalid"),
        (lambda: TrainingConfig(lr=-1.0), "lr=-1.0"),
        (lambda: TrainingConfig(lr=float("nan")), "lr=nan"),
        (lambda: TrainingConfig(lr=1e-3, lr_min=1e-2), "lr_min=0.01 is invalid"),
        (lambda: TrainingConfig(grad_clip=0.0), "grad_clip=0.0 is invalid"),
        (lambda: TrainingConfig(scheduler="linear"), "scheduler='linear' is invalid"),
        (lambda: TrainingConfig(optimizer="adam"), "optimizer='adam' is invalid"),
        (lambda: TrainingConfig(on_nonfinite="ignore"), "on_nonfinite='ignore' is invalid"),
        (lambda: TrainingConfig(num_threads=0), "num_threads=0 is invalid"),
        (lambda: TrainingConfig(num_threads="many"), "num_threads='many' is invalid"),
        (lambda: DistillationConfig(kind="l1"), "distill='l1' is invalid"),
        (lambda: DistillationConfig(weight=1.5), "distill_weight=1.5 is invalid"),
        (lambda: DistillationConfig(temperature=0.0), "temperature=0.0 is invalid"),
        (lambda: CheckpointConfig("x.ckpt", every=0), "checkpoint_every=0 is invalid"),
        (lambda: CheckpointConfig(3), "checkpoint path=3 is invalid"),
        (lambda: CheckpointConfig("x.ckpt", resume="yes"), "resume='yes' is invalid"),
    ],
)
def test_config_objects_validate_at_construction(make, message):
    with pytest.raises(InvalidParameterError, match=message):
        make()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps=0 is invalid"),
        ({"lr": 0.0}, "lr=0.0 is invalid"),
        ({"eval_every": -1}, "eval_every=-1 is invalid"),
        ({"distillation": "kl"}, "needs a teacher"),
        ({"distillation": "l1", "teacher": nn.Linear(6, 3)}, "distill='l1' is invalid"),
        ({"training": {"steps": 3}}, "give a TrainingConfig"),
        ({"seed": -1}, "seed=-1 is invalid"),
        ({"stage": "fast"}, "stage='fast' is invalid"),
        ({"loss_fn": "mse"}, "loss_fn='mse' is invalid"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(InvalidParameterError, match=message):
        finetune(_mlp(), DataLoader(_data(), batch_size=32), progress=False, **kwargs)


def test_missing_target_or_trainable_parameters_raise():
    x = _data().tensors[0]
    with pytest.raises(InvalidParameterError, match="no target"):
        finetune(_mlp(), DataLoader(TensorDataset(x), batch_size=32), steps=1, progress=False)
    frozen = _mlp().requires_grad_(False)
    with pytest.raises(InvalidParameterError, match="no parameter with requires_grad"):
        finetune(frozen, DataLoader(_data(), batch_size=32), steps=1, progress=False)
    with pytest.raises(InvalidParameterError, match="no len"):
        finetune(_mlp(), iter([]), training=TrainingConfig(epochs=1), progress=False)
    with pytest.raises(InvalidParameterError, match="no batch in a whole epoch"):
        finetune(_mlp(), [], steps=1, progress=False)


# ---------------------------------------------------------------------------------------------------
# batch-norm recalibration


def test_recalibrate_batchnorm_averages_the_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    model.eval()
    model[1].running_mean.fill_(5.0)  # stale statistics, as after quantization
    model[1].running_var.fill_(9.0)
    images = torch.randn(48, 1, 8, 8) * 2 + 1
    loader = DataLoader(TensorDataset(images, torch.zeros(48, dtype=torch.long)), batch_size=16)
    weights = _state(model)

    recalibrate_batchnorm(model, loader, batches=2)

    with torch.no_grad():  # reference: per-channel statistics of the conv output over the first 2 batches
        features = [model[0](images[i : i + 16]).transpose(0, 1).reshape(4, -1) for i in (0, 16)]
    np.testing.assert_allclose(model[1].running_mean, np.mean([f.mean(1) for f in features], 0), rtol=1e-5)
    np.testing.assert_allclose(model[1].running_var, np.mean([f.var(1) for f in features], 0), rtol=1e-5)
    assert not model.training and model[1].momentum == 0.1
    for key in ("0.weight", "1.weight", "1.bias", "4.weight"):
        assert torch.equal(model.state_dict()[key], weights[key])
    assert recalibrate_batchnorm(_mlp(), loader) is not None  # no batch norm: nothing to do


def test_recalibration_repairs_accuracy_after_a_weight_change():
    data = _data(n=192)
    model = _mlp(batchnorm=True)
    finetune(model, DataLoader(data, batch_size=32, shuffle=True), training=TrainingConfig(epochs=10, lr=1e-2),
             progress=False)  # fmt: skip
    model.eval()
    x, y = data.tensors
    with torch.no_grad():
        original = (model(x).argmax(1) == y).float().mean().item()
        # A per-channel affine change of the batch-norm input, which fresh statistics undo exactly.
        model[0].weight.mul_(torch.linspace(0.2, 4.0, 16)[:, None])
        model[0].bias.add_(torch.linspace(-2.0, 2.0, 16))
        stale = (model(x).argmax(1) == y).float().mean().item()
        recalibrate_batchnorm(model, DataLoader(data, batch_size=64))
        repaired = (model(x).argmax(1) == y).float().mean().item()
    assert stale < original - 0.1
    assert repaired >= original - 0.02


# ---------------------------------------------------------------------------------------------------
# on a real compressed model (lr2vq_analysis.nn)


def _compressed_mlp():
    from lr2vq_analysis.nn import compress
    from lr2vq_analysis.plan import LayerPlan

    return compress(_mlp(batchnorm=True), {"0.weight": LayerPlan(k=8, m=3, d_tilde=2), "4.weight": LayerPlan(k=4, m=4)})


def test_lowrank_stage_trains_z_and_p_end_to_end():
    cmodel = _compressed_mlp()
    layer = cmodel.compressed_layers()["0.weight"]
    z, p = layer.Z.detach().clone(), layer.P.detach().clone()
    result = finetune(cmodel, DataLoader(_data(), batch_size=32, shuffle=True), stage="lowrank", steps=30, lr=1e-2,
                      progress=False)  # fmt: skip
    assert not torch.equal(layer.Z, z) and not torch.equal(layer.P, p)
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5])
    with pytest.raises(StageError, match=r"'0.weight' is 'lowrank'.*quantize\(\)"):
        finetune(cmodel, DataLoader(_data(), batch_size=32), stage="codebook", steps=1, progress=False)


def test_codebook_stage_keeps_codes_and_resumes_exactly(tmp_path):
    loader = DataLoader(_data(), batch_size=16, shuffle=True)
    straight = _compressed_mlp().quantize(seed=0)
    codes = {name: layer.codes.clone() for name, layer in straight.compressed_layers().items()}
    codebook = straight.compressed_layers()["0.weight"].codebook.detach().clone()
    finetune(straight, loader, stage="codebook", steps=12, lr=1e-2, progress=False)
    for name, layer in straight.compressed_layers().items():
        assert torch.equal(layer.codes, codes[name]), name
    assert not torch.equal(straight.compressed_layers()["0.weight"].codebook, codebook)

    path = tmp_path / "codebook.ckpt"
    crashed = _compressed_mlp().quantize(seed=0)
    handle = _crash_at_call(crashed, 10)
    with pytest.raises(_Crash):
        finetune(crashed, loader, stage="codebook", steps=12, lr=1e-2, progress=False,
                 checkpoint=CheckpointConfig(path, every=4))  # fmt: skip
    handle.remove()
    resumed = _compressed_mlp().quantize(seed=0)
    result = finetune(resumed, loader, stage="codebook", steps=12, lr=1e-2, progress=False,
                      checkpoint=CheckpointConfig(path, every=4))  # fmt: skip
    assert result.resumed_from == 8
    _assert_same_weights(resumed, straight)


def test_dkm_stage_trains_soft_assignments():
    from lr2vq_analysis.nn import DKMConfig, compress
    from lr2vq_analysis.plan import LayerPlan

    cmodel = compress(_mlp(), {"0.weight": LayerPlan(k=8, m=3)}, method="dkm", dkm=DKMConfig(tau=0.05))
    z = cmodel.compressed_layers()["0.weight"].Z.detach().clone()
    with pytest.raises(StageError, match=r"'0\.weight' is 'dkm'"):
        finetune(cmodel, DataLoader(_data(), batch_size=32), stage="lowrank", steps=1, progress=False)
    finetune(cmodel, DataLoader(_data(), batch_size=32), stage="dkm", steps=5, progress=False)
    assert not torch.equal(cmodel.compressed_layers()["0.weight"].Z, z)
    assert cmodel.quantize().state == "quantized"


class _AugmentedDataset(torch.utils.data.Dataset):
    """Random augmentation from the global generators (as torchvision transforms do)."""

    def __init__(self) -> None:
        self.data = _data()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):
        x, y = self.data[index]
        return x + 0.01 * torch.randn(x.shape) + 0.01 * float(np.random.rand()), y  # noqa: NPY002


def test_resume_accepts_a_dataset_with_random_augmentation(tmp_path):
    loader = DataLoader(_AugmentedDataset(), batch_size=16, shuffle=True)
    path = tmp_path / "run.ckpt"
    model = _mlp()
    handle = _crash_at_call(model, 4)
    with pytest.raises(_Crash):
        finetune(model, loader, steps=6, checkpoint=CheckpointConfig(path, every=2), progress=False)
    handle.remove()
    torch.manual_seed(11)  # another global random state than the interrupted run's
    np.random.seed(11)  # noqa: NPY002
    resumed = finetune(_mlp(), loader, steps=6, checkpoint=CheckpointConfig(path, every=2), progress=False)
    assert resumed.resumed_from == 2 and resumed.steps == 6


def test_auto_threads_of_a_large_model_are_capped_at_the_free_cores(monkeypatch):
    finetune_module = importlib.import_module("lr2vq_analysis.finetune")  # the module, not the function
    monkeypatch.setattr(finetune_module, "AUTO_THREADS_MAX_PARAMETERS", 10)  # _mlp() counts as large
    monkeypatch.setattr(finetune_module.os, "cpu_count", lambda: 4)
    previous = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        cpu = torch.device("cpu")
        for others, expected in [(0.0, None), (1.0, 3), (3.0, 1), (9.0, 1), (None, None)]:
            monkeypatch.setattr(finetune_module, "_other_runnable_threads", lambda value=others: value)
            assert finetune_module._resolve_threads("auto", _mlp(), cpu) == expected, others
        assert finetune_module._resolve_threads(3, _mlp(), cpu) == 3
        assert finetune_module._resolve_threads("auto", _mlp(), torch.device("meta")) is None
    finally:
        torch.set_num_threads(previous)
    reading = finetune_module._other_runnable_threads()  # the real reader: a count, or None off Linux
    assert reading is None or reading >= 0
