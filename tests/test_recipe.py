"""The training recipe against the same stages written out by hand, its budget, callbacks and resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lr2vq_analysis._validation import InvalidParameterError
from lr2vq_analysis.finetune import DistillationConfig, TrainingConfig, finetune, recalibrate_batchnorm
from lr2vq_analysis.nn import compress
from lr2vq_analysis.plan import LayerPlan
from lr2vq_analysis.recipe import STAGES, Budget, run_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

PLAN = {"0.weight": LayerPlan(k=8, m=3, d_tilde=2), "4.weight": LayerPlan(k=4, m=4)}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=generator)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    for (key, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), key


def test_recipe_equals_the_stages_written_by_hand():
    pretrained, loader = _model(), _loader()
    training = TrainingConfig(lr=3e-3)
    distillation = DistillationConfig(weight=0.5, temperature=2.0)
    torch.manual_seed(5)  # the batch-norm pass draws the loader's shuffle from the global generator
    result = run_recipe(
        pretrained, PLAN, loader, budget=Budget(10, lowrank_steps=4), teacher=pretrained, distillation=distillation,
        training=training, seed=3, progress=False,
    )  # fmt: skip

    torch.manual_seed(5)
    reference = compress(pretrained, PLAN, seed=3)
    finetune(reference, loader, stage="lowrank", steps=4, lr=3e-3, seed=3, progress=False)
    reference.quantize(seed=3)
    recalibrate_batchnorm(reference, loader)
    finetune(reference, loader, stage="codebook", steps=6, lr=3e-3, teacher=pretrained, distillation=distillation,
             seed=3, progress=False)  # fmt: skip
    reference.round_fp16_()

    _assert_same(result.model, reference)
    assert {stage: run.steps for stage, run in result.history.items()} == {"lowrank": 4, "codebook": 6}
    assert all(layer.state == "quantized" for layer in result.model.compressed_layers().values())
    assert set(STAGES) | {"total"} == set(result.seconds)
    assert repr(result).startswith("RecipeResult(2 compressed layers, lowrank: 4 steps, codebook: 6 steps")


def test_callbacks_run_after_each_stage_in_order_and_keep_what_they_return():
    seen = []

    def record(stage):
        def callback(model):
            states = {layer.state for layer in model.compressed_layers().values()}
            seen.append((stage, states))
            return len(seen) if stage != "quantized" else None

        return callback

    result = run_recipe(_model(), PLAN, _loader(), budget=Budget(4), callbacks={s: record(s) for s in STAGES},
                        progress=False)  # fmt: skip
    assert [stage for stage, _ in seen] == list(STAGES)
    assert [states for _, states in seen] == [{"lowrank"}] * 2 + [{"quantized"}] * 4
    assert result.measurements == {"compressed": 1, "lowrank": 2, "recalibrated": 4, "codebook": 5, "rounded": 6}


def test_plain_pq_and_dkm_budgets():
    pq_plan = {name: LayerPlan(k=p.k, m=p.m) for name, p in PLAN.items()}
    pq = run_recipe(_model(), pq_plan, _loader(), budget=Budget(3, lowrank_steps=0), progress=False)
    assert list(pq.history) == ["codebook"] and pq.history["codebook"].steps == 3
    dkm = run_recipe(_model(), pq_plan, _loader(), budget=Budget(4, 2), method="dkm", progress=False)
    assert {stage: run.steps for stage, run in dkm.history.items()} == {"dkm": 2, "codebook": 2}
    nothing = run_recipe(_model(), PLAN, _loader(), budget=Budget(0), progress=False)
    assert nothing.history == {} and all(
        layer.state == "quantized" for layer in nothing.model.compressed_layers().values()
    )


def test_a_killed_recipe_resumes_from_its_checkpoints(tmp_path):
    torch.manual_seed(5)
    straight = run_recipe(_model(), PLAN, _loader(), budget=Budget(8), seed=1, progress=False)

    def die(model):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # killed after the low-rank stage was checkpointed
        run_recipe(_model(), PLAN, _loader(), budget=Budget(8), seed=1, checkpoint_dir=tmp_path,
                   callbacks={"quantized": die}, progress=False)  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lowrank.ckpt"]
    torch.manual_seed(5)
    with pytest.warns(UserWarning, match="finished run"):  # the low-rank stage is loaded, not retrained
        resumed = run_recipe(_model(), PLAN, _loader(), budget=Budget(8), seed=1, checkpoint_dir=tmp_path,
                             progress=False)  # fmt: skip
    assert resumed.history["lowrank"].resumed_from == 4
    _assert_same(resumed.model, straight.model)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: {"budget": Budget(4, 5)}, "lowrank_steps=5 is invalid"),
        (lambda: {"budget": Budget(-1)}, "steps=-1 is invalid"),
        (lambda: {"budget": 10}, "budget=10 is invalid"),
        (lambda: {"method": "pq"}, "method='pq' is invalid"),
        (lambda: {"training": TrainingConfig(steps=3)}, "budget sets each stage"),
        (lambda: {"callbacks": {"after": print}}, r"callbacks for \['after'\] are invalid"),
        (lambda: {"distillation": "kl"}, "needs a teacher"),
        (lambda: {"seed": -1}, "seed=-1 is invalid"),
    ],
)
def test_bad_arguments(make, message):
    with pytest.raises(InvalidParameterError, match=message):
        run_recipe(_model(), PLAN, _loader(), progress=False, **make())
