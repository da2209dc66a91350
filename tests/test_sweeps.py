"""Tests of the evidence sweeps (lr2vq_analysis.experimental.sweeps), the MNIST-1D data and the MNIST-1D CNN."""

from __future__ import annotations

import hashlib
import json
import math
import random

import numpy as np
import pandas as pd
import pytest
import torch

from lr2vq_analysis._validation import InvalidParameterError
from lr2vq_analysis.datasets import load_digits_splits, make_loaders
from lr2vq_analysis.experimental import sweeps
from lr2vq_analysis.experimental.plots import SWEEP_COLUMNS, load_sweep_results
from lr2vq_analysis.experimental.sweeps import Budget, RunConfig, measure_rho, run_one, run_sweep, select_learning_rates
from lr2vq_analysis.models.digits import load_bundled_model
from lr2vq_analysis.plan import LayerPlan
from lr2vq_analysis.size import size_report

TINY = Budget(steps=6, lowrank_steps=3, batch_size=32)
DIGITS_LAYERS = ("conv2.weight", "conv3.weight", "conv4.weight")

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------- one run
def test_quick_run_on_digits_writes_a_valid_row(tmp_path):
    out = tmp_path / "runs.csv"
    table = run_sweep("digits", [RunConfig("lr2vq", 16, 9, 4, 0, 1e-3)], out, budget=Budget(20, 10, 64), progress=False)
    assert len(table) == 1
    frame = load_sweep_results(out)  # the plots' reader accepts the file
    assert set(SWEEP_COLUMNS) <= set(frame.columns)
    row = frame.iloc[0]
    assert (row["method"], row["k"], row["m"], row["d_tilde"], row["seed"]) == ("lr2vq", 16, 9, 4, 0)
    assert 0.5 < row["accuracy"] <= 1.0 and 0.0 <= row["val_accuracy"] <= 1.0
    assert row["split"] == "test"
    # size of the row == size_report of the plan, and == the field's convention computed by hand
    state = load_bundled_model().state_dict()
    plan = {name: LayerPlan(16, 9, 4) for name in DIGITS_LAYERS}
    assert row["megabytes"] == pytest.approx(size_report(state, plan).megabytes, rel=1e-12)
    compressed = 0.0
    for name in DIGITS_LAYERS:
        n_sub = state[name].numel() // 9
        compressed += n_sub * 4 + 16 * 4 * 16 + 4 * 9 * 16  # codes at log2(16) bits, fp16 codebook and P
    dense = (16 * 1 * 9 + 64 * 10 + 10) * 32  # conv1 and the classifier at fp32
    batchnorm = 2 * (16 + 32 + 64 + 64) * 32  # each batch norm folded into two fp32 vectors
    assert row["megabytes"] == pytest.approx((compressed + dense + batchnorm) / 8 / 2**20, rel=1e-12)
    uncompressed = sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var")))
    uncompressed -= sum(1 for k in state if k.endswith("num_batches_tracked"))
    assert row["ratio"] == pytest.approx(uncompressed * 32 / (compressed + dense + batchnorm), rel=1e-12)
    # the compressed layers alone: their codes, codebooks and projections against their fp32 weights
    assert row["layers_megabytes"] == pytest.approx(compressed / 8 / 2**20, rel=1e-12)
    layer_weights = sum(state[name].numel() for name in DIGITS_LAYERS)
    assert row["layers_ratio"] == pytest.approx(layer_weights * 32 / compressed, rel=1e-12)
    # the low-rank error of the row is the spectrum's: sum of the dropped eigenvalues over ‖W‖²
    dropped = total = 0.0
    for name in DIGITS_LAYERS:
        x = state[name].double().reshape(state[name].shape[0], -1).reshape(-1, 9)
        eigenvalues = torch.linalg.eigvalsh(x.T @ x)  # ascending
        dropped += float(eigenvalues[:5].sum())
        total += float((x**2).sum())
    assert row["lowrank_error"] == pytest.approx(dropped / total, rel=1e-6)
    # ρ's losses were measured: truncation hurts, training recovers part of it
    for prefix in ("", "val_"):
        assert row[f"{prefix}loss_truncated"] > row[f"{prefix}loss_pretrained"]
        assert row[f"{prefix}loss_lowrank"] < row[f"{prefix}loss_truncated"]
        assert math.isfinite(row[f"{prefix}loss_dense_reference"])


def test_methods_run_with_the_same_budget_and_layers():
    rows = {
        method: run_one("digits", RunConfig(method, k, m, d, 0, 1e-3), TINY)
        for method, k, m, d in [("pq", 16, 9, 9), ("scalar", 2, 1, 1), ("dkm", 16, 9, 9)]
    }
    for method, row in rows.items():
        assert row["steps"] == TINY.steps, method
        assert row["layer_k"].count("/") == len(DIGITS_LAYERS) - 1
    assert rows["pq"]["lowrank_steps"] == 0 and rows["dkm"]["lowrank_steps"] == TINY.lowrank_steps
    # PQ and scalar: no low-rank stage, so no truncation error and no ρ measurement
    assert rows["pq"]["lowrank_error"] == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(rows["pq"]["loss_lowrank"])
    # scalar k-means with k = 2 at 1 bit per weight: codes alone are n_weights bits per layer
    state = load_bundled_model().state_dict()
    codes = sum(state[name].numel() for name in DIGITS_LAYERS)
    pq_codes = codes // 9 * 4
    assert rows["scalar"]["megabytes"] > rows["pq"]["megabytes"]
    assert (rows["scalar"]["megabytes"] - rows["pq"]["megabytes"]) * 8 * 2**20 == pytest.approx(
        (codes + 3 * 2 * 1 * 16) - (pq_codes + 3 * 16 * 9 * 16)
    )


def test_uncompressed_row_is_the_pretrained_model():
    row = run_one("digits", RunConfig("uncompressed", 0, 0, 0, 0, 1e-3), TINY)
    metadata = json.loads(_digits_json().read_text())  # written by scripts/train_digits_cnn.py
    assert row["accuracy"] == pytest.approx(metadata["test_accuracy"])
    assert row["ratio"] == 1.0 and math.isnan(row["k"])


def _digits_json():
    from lr2vq_analysis.weights import bundled_model_path

    return bundled_model_path("digits-cnn").with_suffix(".json")


# ----------------------------------------------------------------------------------------- sweeps
def test_run_sweep_resumes_without_rerunning(tmp_path, monkeypatch):
    out = tmp_path / "runs.csv"
    calls = []

    def fake_run_one(task, config, budget):
        calls.append(config)
        return {
            "task": "digits",
            "method": config.method,
            "k": config.k,
            "m": config.m,
            "d_tilde": config.d_tilde,
            "seed": config.seed,
            "lr": config.lr,
            "steps": budget.steps,
            "lowrank_steps": budget.lowrank_steps if config.method in ("lr2vq", "dkm") else 0,
            "batch_size": budget.batch_size,
            "megabytes": 0.01,
            "ratio": 20.0,
            "accuracy": 0.9,
            "val_accuracy": 0.9,
            "seconds": 0.0,
        }

    monkeypatch.setattr(sweeps, "run_one", fake_run_one)
    configs = [RunConfig("pq", 16, 9, 9, seed, 1e-3) for seed in range(2)] + [RunConfig("lr2vq", 16, 9, 3, 0, 3e-3)]
    configs.append(RunConfig("uncompressed", 0, 0, 0, 0, 1e-3))
    first = run_sweep("digits", configs, out, budget=TINY, progress=False)
    assert len(first) == 4 and len(calls) == 4
    second = run_sweep("digits", [*configs, RunConfig("pq", 16, 9, 9, 2, 1e-3)], out, budget=TINY, progress=False)
    assert len(calls) == 5 and calls[-1].seed == 2  # only the new configuration ran
    assert len(second) == 5 and len(pd.read_csv(out)) == 5
    run_sweep("digits", configs, out, budget=Budget(8, 3, 32), progress=False)  # another budget is another run
    assert len(calls) == 9


def test_select_learning_rates_uses_validation_not_test():
    runs = pd.DataFrame(
        {
            "task": "digits",
            "method": ["pq"] * 4 + ["lr2vq"] * 2,
            "k": 16,
            "m": 9,
            "d_tilde": [9, 9, 9, 9, 4, 4],
            "steps": 10,
            "lowrank_steps": [0, 0, 0, 0, 5, 5],
            "batch_size": 32,
            "seed": [0, 1, 0, 1, 0, 0],
            "lr": [1e-3, 1e-3, 3e-3, 3e-3, 1e-3, 3e-3],
            "val_accuracy": [0.90, 0.92, 0.95, 0.91, 0.8, 0.8],  # pq: 3e-3 has the better mean; lr2vq: a tie
            "accuracy": [0.99, 0.99, 0.10, 0.10, 0.5, 0.9],
        }
    )
    chosen = select_learning_rates(runs)
    assert sorted(chosen[chosen["method"] == "pq"]["lr"]) == [3e-3, 3e-3]
    assert chosen[chosen["method"] == "lr2vq"]["lr"].tolist() == [1e-3]  # ties go to the smaller rate
    assert len(chosen) == 3


def test_measure_rho_by_hand():
    runs = pd.DataFrame(
        {
            "method": ["lr2vq", "lr2vq", "pq"],
            "m": [9, 9, 9],
            "d_tilde": [2, 9, 9],
            "loss_pretrained": [0.2, np.nan, np.nan],
            "loss_truncated": [1.0, np.nan, np.nan],
            "loss_lowrank": [0.3, np.nan, np.nan],
            "loss_dense_reference": [0.1, np.nan, np.nan],
        }
    )
    rho = measure_rho(runs)
    assert len(rho) == 1  # only LR²VQ with d̃ < m has a truncation to recover from
    assert float(rho["rho"].iloc[0]) == pytest.approx((0.3 - 0.1) / (1.0 - 0.2))
    validation = runs.assign(
        val_loss_pretrained=[0.3, np.nan, np.nan],
        val_loss_truncated=[1.3, np.nan, np.nan],
        val_loss_lowrank=[0.9, np.nan, np.nan],
        val_loss_dense_reference=[0.4, np.nan, np.nan],
    )
    assert float(measure_rho(validation, split="val")["rho"].iloc[0]) == pytest.approx((0.9 - 0.4) / (1.3 - 0.3))
    with pytest.raises(InvalidParameterError, match="split"):
        measure_rho(runs, split="test")


def test_plateau_and_rho_consistent_range_by_hand():
    accuracies = {1: [0.80, 0.82], 2: [0.90, 0.94], 3: [0.91, 0.91], 4: [0.95, 0.97]}
    rows = [
        {"method": "lr2vq", "k": 16, "m": 9, "d_tilde": d, "seed": i, "accuracy": value}
        for d, values in accuracies.items()
        for i, value in enumerate(values)
    ]
    rows.append({"method": "pq", "k": 16, "m": 9, "d_tilde": 9, "seed": 0, "accuracy": 1.0})  # not LR²VQ: ignored
    rows.append({"method": "lr2vq", "k": 256, "m": 4, "d_tilde": 3, "seed": 0, "accuracy": 0.5})  # one d̃: no curve
    result = sweeps.plateau(pd.DataFrame(rows))
    assert list(result) == [(16, 9)]
    best_sd = np.std([0.95, 0.97], ddof=1)  # best d̃ = 4, mean 0.96, standard error sd / sqrt(2) = 0.01
    assert result[(16, 9)]["best"] == 4
    assert 0.96 - best_sd / math.sqrt(2) == pytest.approx(0.95)
    assert result[(16, 9)]["plateau"] == [4]  # d̃ = 2 (mean 0.92) and 3 (0.91) are below 0.95

    class FakeReport:  # global d̃ = 1 for ρ < 0.3, 3 up to 0.6, 9 above
        def with_rho(self, rho):
            return type("R", (), {"global_d_tilde": 1 if rho < 0.3 else 3 if rho <= 0.6 else 9})()

    assert sweeps.rho_consistent_range(FakeReport(), [3, 4], grid=[0.1, 0.3, 0.5, 0.6, 0.7]) == [0.3, 0.5, 0.6]


# ----------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"method": "opq", "k": 16, "m": 9, "d_tilde": 9}, "method"),
        ({"method": "scalar", "k": 2, "m": 9, "d_tilde": 9}, "m=1"),
        ({"method": "pq", "k": 16, "m": 9, "d_tilde": 4}, "d_tilde"),
        ({"method": "dkm", "k": 16, "m": 9, "d_tilde": 4}, "d_tilde"),
        ({"method": "lr2vq", "k": 16, "m": 9, "d_tilde": 10}, "d_tilde"),
        ({"method": "lr2vq", "k": 16, "m": 9, "d_tilde": 4, "lr": 0.0}, "lr"),
        ({"method": "lr2vq", "k": 16, "m": 9, "d_tilde": 4, "seed": -1}, "seed"),
    ],
)
def test_bad_run_configs(kwargs, words):
    arguments = {"seed": 0, "lr": 1e-3, **kwargs}
    with pytest.raises(InvalidParameterError, match=words):
        RunConfig(**arguments)


def test_bad_budget_and_task(tmp_path):
    with pytest.raises(InvalidParameterError, match="lowrank_steps"):
        Budget(steps=5, lowrank_steps=6)
    with pytest.raises(InvalidParameterError, match="batch_size"):
        Budget(steps=5, lowrank_steps=0, batch_size=0)
    with pytest.raises(InvalidParameterError, match="imagenet"):
        run_one("imagenet", RunConfig("pq", 16, 9, 9, 0, 1e-3), TINY)
    with pytest.raises(InvalidParameterError, match="n_jobs"):
        run_sweep("digits", [], tmp_path / "x.csv", n_jobs=0)


# ----------------------------------------------------------------------------------------- data + model
def test_make_loaders_order_depends_on_seed_only():
    splits = load_digits_splits(0)

    def first_labels(seed):
        return next(iter(make_loaders(splits, 64, seed)["train"]))[1].tolist()

    assert first_labels(3) == first_labels(3)
    assert first_labels(3) != first_labels(4)
    loaders = make_loaders(splits, 64, 0)
    assert len(loaders["train"]) == len(splits["train"]) // 64  # the incomplete batch is dropped
    assert torch.equal(next(iter(loaders["test"]))[0], splits["test"].tensors[0][:64])  # test is not shuffled
    with pytest.raises(InvalidParameterError, match="train"):
        make_loaders({"test": splits["test"]})


def test_mnist1d_splits_match_the_generator_and_keep_global_random_state():
    mnist1d_data = pytest.importorskip("mnist1d.data")
    from lr2vq_analysis.experimental.datasets import load_mnist1d_splits

    # mnist1d reseeds the legacy global generators: check that the caller's streams survive
    random.seed(5)
    np.random.seed(5)  # noqa: NPY002
    expected_python, expected_numpy = random.random(), np.random.random()  # noqa: NPY002
    random.seed(5)
    np.random.seed(5)  # noqa: NPY002
    splits = load_mnist1d_splits(seed=1)
    assert (random.random(), np.random.random()) == (expected_python, expected_numpy)  # noqa: NPY002

    reference = mnist1d_data.make_dataset(mnist1d_data.get_dataset_args())
    assert {name: len(ds) for name, ds in splits.items()} == {"train": 3600, "val": 400, "test": 1000}
    np.testing.assert_array_equal(splits["test"].tensors[0][:, 0].numpy(), reference["x_test"].astype(np.float32))
    np.testing.assert_array_equal(splits["test"].tensors[1].numpy(), reference["y_test"])
    # train + val is exactly the generator's training part, without overlap
    both = torch.cat([splits["train"].tensors[0], splits["val"].tensors[0]])[:, 0].numpy()
    ours = {row.tobytes() for row in both}
    assert len(ours) == 4000 and ours == {row.tobytes() for row in reference["x"].astype(np.float32)}
    # the test split is the same for every seed; the validation cut is not
    other = load_mnist1d_splits(seed=2)
    assert torch.equal(other["test"].tensors[0], splits["test"].tensors[0])
    assert not torch.equal(other["val"].tensors[0], splits["val"].tensors[0])
    assert np.bincount(splits["val"].tensors[1].numpy()).min() >= 35  # stratified: ~40 per class
    with pytest.raises(InvalidParameterError, match="val_fraction"):
        load_mnist1d_splits(val_fraction=1.5)


def test_mnist1d_cnn_shapes_and_shipped_weights():
    from lr2vq_analysis.experimental.models.mnist1d import MNIST1D_CNN_PATH, Mnist1DCNN, load_mnist1d_cnn

    model = Mnist1DCNN()
    # convs (no bias): 1·32·5 + 32·64·3 + 2·(64·64·3); BN: 2·(32 + 3·64); fc: 64·10 + 10
    assert sum(p.numel() for p in model.parameters()) == 160 + 6144 + 2 * 12288 + 2 * (32 + 192) + 650
    for name in DIGITS_LAYERS:  # the compressed layers: rows divisible by every swept m
        weight = model.state_dict()[name]
        row = weight[0].numel()
        assert all(row % m == 0 for m in (1, 2, 3, 4, 6, 8, 12)), (name, row)
    if not MNIST1D_CNN_PATH.is_file():
        pytest.skip("MNIST-1D weights not built (python scripts/train_mnist1d_cnn.py)")
    metadata = json.loads(MNIST1D_CNN_PATH.with_suffix(".json").read_text())
    assert hashlib.sha256(MNIST1D_CNN_PATH.read_bytes()).hexdigest() == metadata["sha256"]
    pretrained = load_mnist1d_cnn()
    assert not pretrained.training
    pytest.importorskip("mnist1d.data")
    from lr2vq_analysis.datasets import accuracy
    from lr2vq_analysis.experimental.datasets import load_mnist1d_splits

    assert accuracy(pretrained, load_mnist1d_splits(metadata["seed"])["test"]) == pytest.approx(
        metadata["test_accuracy"]
    )


def test_load_mnist1d_cnn_missing_file(tmp_path):
    from lr2vq_analysis._validation import WeightFileError
    from lr2vq_analysis.experimental.models.mnist1d import load_mnist1d_cnn

    with pytest.raises(WeightFileError, match="train_mnist1d_cnn"):
        load_mnist1d_cnn(tmp_path / "none.safetensors")
