"""Tests of the fine-tuning loop against hand-written references: a plain Adam + cosine loop, Hinton's
distillation formula, per-batch statistics for batch norm, and an uninterrupted run for resume."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lr2vq_analysis._validation import InvalidParameterError
from lr2vq_analysis.finetune import (
    StageError,
    _ShardedSampler,
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
    finetune(model, DataLoader(data, batch_size=16), steps=15, lr=3e-3, lr_min=1e-5, progress=False)

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
    result = finetune(_mlp(), DataLoader(_data(), batch_size=32), steps=10, lr=1e-3, lr_min=1e-6, progress=False)
    expected = [1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi * t / 10)) / 2 for t in range(10)]
    np.testing.assert_allclose(result.lrs, expected, rtol=1e-9)
    constant = finetune(_mlp(), DataLoader(_data(), batch_size=32), steps=5, scheduler="constant", progress=False)
    assert constant.lrs == [1e-3] * 5


def test_learns_a_separable_task_and_reports_history():
    data = _data(n=192)
    model = _mlp()
    loader = DataLoader(data, batch_size=32, shuffle=True)
    result = finetune(model, loader, epochs=25, lr=3e-2, progress=False)
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
        _mlp(), DataLoader(_data(), batch_size=32), epochs=2, optimizer=make_optimizer, scheduler=make_scheduler,
        progress=False,
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
        model, DataLoader(_data(), batch_size=96), steps=1, grad_clip=0.01, scheduler="constant",
        optimizer=lambda params: torch.optim.SGD(params, lr=1.0), progress=False,
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
        distill=kind, lr=1e-2, progress=False,
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
        model, DataLoader(data, batch_size=96), steps=1, teacher=teacher, distill_weight=0.3, temperature=2.0,
        progress=False,
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


def test_sampler_orders_are_seeded_and_shards_partition_each_epoch():
    one = _ShardedSampler(10, shuffle=True, seed=3, rank=0, world_size=1)
    again = _ShardedSampler(10, shuffle=True, seed=3, rank=0, world_size=1)
    assert list(one) == list(again) and sorted(one) == list(range(10))
    one.epoch = 1
    assert list(one) != list(again) and sorted(one) == list(range(10))
    shards = [list(_ShardedSampler(10, shuffle=True, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5 and sorted(shards[0] + shards[1]) == list(range(10))
    # Uneven sizes are padded like DistributedSampler: every rank gets ceil(n / world) samples.
    shards = [list(_ShardedSampler(7, shuffle=False, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert shards == [[0, 2, 4, 6], [1, 3, 5, 0]]


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
        finetune(_mlp(), loader, steps=2, seed=4, progress=False)
        orders.append(list(dataset.seen))
    assert orders[0] == orders[1] and sorted(orders[0][:96]) == list(range(96)) and orders[0][:96] != orders[0][96:]


class _Crash(Exception):
    pass


def _crash_after(calls: int):
    count = {"n": 0}

    def loss_fn(output, target):
        count["n"] += 1
        if count["n"] > calls:
            raise _Crash
        return nn.functional.cross_entropy(output, target)

    return loss_fn


@pytest.mark.parametrize("loader_kind", ["dataloader", "list"])
def test_resume_after_a_crash_gives_the_uninterrupted_result(tmp_path, loader_kind):
    data = _data()
    if loader_kind == "dataloader":
        loader = DataLoader(data, batch_size=16, shuffle=True)
    else:
        loader = [(data.tensors[0][i : i + 16], data.tensors[1][i : i + 16]) for i in range(0, 96, 16)]
    common = {"steps": 20, "seed": 7, "progress": False, "eval_every": 5, "checkpoint_every": 5}

    def eval_fn(model):
        return {"norm": float(sum(p.norm() for p in model.parameters()))}

    straight = _mlp(dropout=0.3, batchnorm=True)
    expected = finetune(straight, loader, eval_fn=eval_fn, **common)

    interrupted = _mlp(dropout=0.3, batchnorm=True)
    path = tmp_path / "run.ckpt"
    with pytest.raises(_Crash):  # dies during step 13; the last checkpoint holds step 10
        finetune(interrupted, loader, checkpoint_path=path, loss_fn=_crash_after(12), eval_fn=eval_fn, **common)
    assert torch.load(path, weights_only=True)["step"] == 10

    resumed_model = _mlp(dropout=0.3, batchnorm=True)  # a fresh process: weights come from the checkpoint
    resumed = finetune(resumed_model, loader, checkpoint_path=path, eval_fn=eval_fn, **common)
    assert resumed.resumed_from == 10 and resumed.steps == 20
    _assert_same_weights(resumed_model, straight)
    assert resumed.losses == expected.losses and resumed.lrs == expected.lrs and resumed.evals == expected.evals

    # The final checkpoint marks the run as complete: calling again changes nothing.
    again = finetune(resumed_model, loader, checkpoint_path=path, **{**common, "eval_every": None})
    assert again.resumed_from == 20 and again.losses == expected.losses
    _assert_same_weights(resumed_model, straight)


def test_checkpoint_is_weights_only_loadable_and_complete(tmp_path):
    path = tmp_path / "sub" / "run.ckpt"
    model = _mlp()
    finetune(model, DataLoader(_data(), batch_size=32, shuffle=True), steps=4, checkpoint_path=path, progress=False)
    state = torch.load(path, weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng", "step", "history", "config"} <= set(state)
    assert state["step"] == 4 and len(state["history"]["losses"]) == 4
    for key, value in model.state_dict().items():
        assert torch.equal(state["model"][key], value)
    assert [p.name for p in path.parent.iterdir()] == ["run.ckpt"]  # no temporary file left behind


def test_checkpoint_of_another_run_is_refused(tmp_path):
    path = tmp_path / "run.ckpt"
    loader = DataLoader(_data(), batch_size=32)
    finetune(_mlp(), loader, steps=4, checkpoint_path=path, progress=False)
    with pytest.raises(InvalidParameterError, match=r"different run.*resume=False"):
        finetune(_mlp(), loader, steps=6, checkpoint_path=path, progress=False)
    result = finetune(_mlp(), loader, steps=6, checkpoint_path=path, resume=False, progress=False)
    assert result.resumed_from == 0 and torch.load(path, weights_only=True)["step"] == 6
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception):  # noqa: B017  (torch's own unpickling error)
        finetune(_mlp(), loader, steps=6, checkpoint_path=path, progress=False)


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
    ("kwargs", "message"),
    [
        ({"steps": 5, "epochs": 1}, "not both"),
        ({"steps": 0}, "steps=0 is invalid"),
        ({"epochs": 1.5}, "epochs=1.5 is invalid"),
        ({"eval_every": -1}, "eval_every=-1 is invalid"),
        ({"checkpoint_every": 0}, "checkpoint_every=0 is invalid"),
        ({"distill": "kl"}, "needs a teacher"),
        ({"distill": "l1", "teacher": nn.Linear(6, 3)}, "distill='l1' is invalid"),
        ({"distill_weight": 1.5, "teacher": nn.Linear(6, 3)}, "distill_weight=1.5 is invalid"),
        ({"temperature": 0.0}, "temperature=0.0 is invalid"),
        ({"lr": -1.0}, "lr=-1.0"),
        ({"lr": 1e-3, "lr_min": 1e-2}, "lr_min <= lr"),
        ({"grad_clip": 0.0}, "grad_clip=0.0 is invalid"),
        ({"seed": -1}, "seed=-1 is invalid"),
        ({"scheduler": "linear"}, "scheduler='linear' is invalid"),
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
        finetune(_mlp(), iter([]), epochs=1, progress=False)
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
    finetune(model, DataLoader(data, batch_size=32, shuffle=True), epochs=10, lr=1e-2, progress=False)
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
    with pytest.raises(_Crash):
        finetune(crashed, loader, stage="codebook", steps=12, lr=1e-2, progress=False, checkpoint_path=path,
                 checkpoint_every=4, loss_fn=_crash_after(9))  # fmt: skip
    resumed = _compressed_mlp().quantize(seed=0)
    result = finetune(resumed, loader, stage="codebook", steps=12, lr=1e-2, progress=False, checkpoint_path=path,
                      checkpoint_every=4)  # fmt: skip
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
