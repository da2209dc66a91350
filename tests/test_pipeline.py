"""The end-to-end demo on the bundled digits CNN (quick mode), checked against hand-computed sizes,
an independent reload of the written file and the test split."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lr2vq_analysis._validation import InvalidParameterError
from lr2vq_analysis.datasets import load_digits_splits
from lr2vq_analysis.export import load_compressed
from lr2vq_analysis.models.digits import DigitsCNN, load_bundled_model
from lr2vq_analysis.pipeline import compress_digits_demo
from lr2vq_analysis.plan import LayerPlan


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    threads = torch.get_num_threads()
    result = compress_digits_demo(quick=True, seed=0, out_dir=tmp_path_factory.mktemp("demo"), progress=False)
    assert torch.get_num_threads() == threads  # the demo's single thread is restored
    return result


def _test_accuracy(model: torch.nn.Module) -> float:
    x, y = load_digits_splits(0)["test"].tensors
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).sum().item() / len(y)


def test_compressed_model_stays_accurate(demo):
    assert _test_accuracy(load_bundled_model()) > 0.97
    reloaded = load_compressed(demo.files["model"], DigitsCNN())
    accuracy = _test_accuracy(reloaded)
    assert accuracy >= 0.90
    assert accuracy == pytest.approx(demo.accuracy_after, abs=1e-9)
    assert demo.accuracy_before == pytest.approx(_test_accuracy(load_bundled_model()), abs=1e-9)
    # Re-estimating batch norm after quantizing is what rescues the quantized model.
    assert demo.accuracy["recalibrated"] > demo.accuracy["quantized"]


def test_reloaded_file_reproduces_the_in_memory_model(demo):
    x = load_digits_splits(0)["test"].tensors[0]
    reloaded = load_compressed(demo.files["model"], DigitsCNN()).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), demo.model.eval()(x), rtol=1e-5, atol=1e-5)
    for name, layer in demo.model.compressed_layers().items():
        assert layer.state == "quantized"
        assert torch.equal(layer.codes, reloaded.compressed_layers()[name].codes)
        assert int(layer.codes.max()) < layer.plan.k


def test_plan_compresses_the_middle_convolutions(demo):
    # conv1 stays uncompressed (the field's convention); fc's row length 64 is not a multiple of m = 9.
    assert list(demo.plan) == ["conv2.weight", "conv3.weight", "conv4.weight"]
    assert all(entry.m == 9 and 1 <= entry.d_tilde <= 9 for entry in demo.plan.values())
    assert demo.plan["conv2.weight"].k == 16  # k = 16 is below PQF's cap (512 subvectors / 4)


def test_size_matches_a_hand_computed_count(demo):
    state = load_bundled_model().state_dict()
    uncompressed = sum(t.numel() for key, t in state.items() if t.is_floating_point()) - sum(
        t.numel() for key, t in state.items() if key.endswith(("running_mean", "running_var"))
    )
    compressed = 0.0
    for key, tensor in state.items():
        owner, _, leaf = key.rpartition(".")
        if key in demo.plan:
            plan = demo.plan[key]
            n = tensor.numel() // plan.m
            compressed += n * math.log2(plan.k) + plan.k * plan.d_tilde * 16
            compressed += plan.d_tilde * plan.m * 16 if plan.d_tilde < plan.m else 0
        elif leaf == "running_mean":
            compressed += 2 * tensor.numel() * 32  # batch norm folded into scale and shift
        elif tensor.is_floating_point() and f"{owner}.running_mean" not in state:
            compressed += tensor.numel() * 32
    assert demo.size.uncompressed_bits == uncompressed * 32
    assert demo.size.compressed_bits == pytest.approx(compressed)
    assert demo.size.ratio == pytest.approx(uncompressed * 32 / compressed) and demo.size.ratio > 10
    assert demo.files["model"].stat().st_size < 1.05 * compressed / 8 + 4096  # header on top


def test_files_and_history(demo):
    for key in ("model", "size", "summary", "report"):
        assert demo.files[key].is_file(), key
    summary = json.loads(demo.files["summary"].read_text())
    assert summary["accuracy"] == demo.accuracy
    assert summary["size"]["ratio"] == pytest.approx(demo.size.ratio)
    assert {stage: run.steps for stage, run in demo.history.items()} == {"lowrank": 40, "codebook": 40}
    assert all(0.0 <= run.evals[40]["val_accuracy"] <= 1.0 for run in demo.history.values())
    text = str(demo)
    assert "reloaded from file" in text and f"{demo.size.ratio:.1f}x" in text


def test_given_plan_skips_analysis_and_fine_tuning(tmp_path):
    plan = {"conv4.weight": LayerPlan(k=32, m=18, d_tilde=18)}  # plain PQ, one layer
    model_path = tmp_path / "elsewhere" / "pq.lr2vq"
    result = compress_digits_demo(plan=plan, steps=0, out_dir=tmp_path, model_path=model_path, progress=False)
    assert result.report is None and "report" not in result.files and result.history == {}
    # The model file goes where asked, and the summary says so.
    assert result.files["model"] == model_path and model_path.is_file() and not (tmp_path / "digits-cnn.lr2vq").exists()
    assert json.loads(result.files["summary"].read_text())["files"]["model"] == str(model_path)
    assert result.plan == plan
    assert result.accuracy["finetuned"] == result.accuracy["recalibrated"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": -1}, "steps=-1 is invalid"),
        ({"batch_size": 0}, "batch_size=0 is invalid"),
        ({"num_threads": 0}, "num_threads=0 is invalid"),
        ({"d_tilde": 10}, "d_tilde=10 is invalid"),
        ({"k": 1}, "k=1 is invalid"),
        ({"m": 0}, "m=0 is invalid"),
        ({"seed": -2}, "seed=-2 is invalid"),
        ({"d_tilde": 2, "plan": {"conv4.weight": LayerPlan(k=8, m=9)}}, "not both"),
    ],
)
def test_bad_arguments(kwargs, message, tmp_path):
    with pytest.raises(InvalidParameterError, match=message):
        compress_digits_demo(out_dir=tmp_path, progress=False, **kwargs)
    assert not any(tmp_path.iterdir())
