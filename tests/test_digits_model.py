"""Tests of the bundled digits CNN, its shipped weights and the seeded digits splits."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from lr2vq_analysis._validation import InvalidParameterError
from lr2vq_analysis.datasets import TEST_SPLIT_SEED, accuracy, digits_loaders, load_digits_splits
from lr2vq_analysis.models.digits import DigitsCNN, load_bundled_model
from lr2vq_analysis.plan import effective_k
from lr2vq_analysis.weights import bundled_model_path, load_weights

WEIGHTS = bundled_model_path("digits-cnn")
METADATA = json.loads(WEIGHTS.with_suffix(".json").read_text())


# ----------------------------------------------------------------------------------------- the model
def test_parameter_count_by_hand():
    # convs (no bias): 1·16·9 + 16·32·9 + 32·64·9 + 64·64·9; BN: 2·(16+32+64+64); fc: 64·10 + 10
    expected = (144 + 4608 + 18432 + 36864) + 2 * (16 + 32 + 64 + 64) + 650
    assert expected == 61050
    assert sum(p.numel() for p in DigitsCNN().parameters()) == expected
    assert METADATA["n_parameters"] == expected


def test_shipped_file_is_small():
    size = WEIGHTS.stat().st_size
    assert size < 400 * 1024
    # parameters + BN running statistics at fp32, four int64 batch counters, plus the JSON header
    fp32_bytes = 4 * (61050 + 2 * (16 + 32 + 64 + 64)) + 4 * 8
    assert fp32_bytes <= size < fp32_bytes + 4096
    assert METADATA["file_bytes"] == size
    assert hashlib.sha256(WEIGHTS.read_bytes()).hexdigest() == METADATA["sha256"]  # JSON describes this file


def test_compressed_convs_suit_m_9_and_18_with_k_256():
    weights = load_weights("digits-cnn")
    convs = {name: info for name, info in weights.info.items() if info.kind == "conv2d"}
    assert list(convs) == ["conv2.weight", "conv3.weight", "conv4.weight"]
    for info in convs.values():
        assert info.row_length % 9 == 0 and info.row_length % 18 == 0
    # n subvectors at m = 9 is C_out · C_in: 64·32 = 2048 and 64·64 = 4096, so PQF's cap (n/4) allows 256
    for name in ("conv3.weight", "conv4.weight"):
        shape = convs[name].shape
        assert shape[0] * shape[1] >= 1024
        assert effective_k(256, shape, 9) == 256


def test_forward_shape_and_eval_mode():
    model = load_bundled_model()
    assert not model.training
    out = model(torch.zeros(3, 1, 8, 8))
    assert out.shape == (3, 10)


def test_shipped_weights_reach_recorded_accuracy():
    """A real check of the shipped weights: test accuracy on the fixed test split."""
    model = load_bundled_model("digits-cnn")
    test_accuracy = accuracy(model, load_digits_splits(0)["test"])
    assert test_accuracy >= METADATA["test_accuracy"] - 0.001
    assert test_accuracy >= 0.985


def test_unknown_bundled_model():
    with pytest.raises(InvalidParameterError, match="digits-cnn"):
        load_bundled_model("mobilenet")


# ---------------------------------------------------------------------------------------- the splits
def _rows(dataset) -> list[bytes]:
    x, y = dataset.tensors
    return sorted(xi.numpy().tobytes() + bytes([int(yi)]) for xi, yi in zip(x, y, strict=True))


def test_split_sizes_types_and_scaling():
    splits = load_digits_splits(0)
    assert {name: len(ds) for name, ds in splits.items()} == {"train": 898, "val": 180, "test": 719}
    for dataset in splits.values():
        x, y = dataset.tensors
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8)
        assert y.dtype == torch.int64
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    digits = load_digits()
    everything = [
        x.astype(np.float32).tobytes() + bytes([y]) for x, y in zip(digits.data / 16.0, digits.target, strict=True)
    ]
    assert sorted(row for ds in splits.values() for row in _rows(ds)) == sorted(everything)  # a partition, scaled /16


def test_splits_partition_the_data_and_test_is_fixed():
    a, b = load_digits_splits(0), load_digits_splits(1)
    assert _rows(a["test"]) == _rows(b["test"])  # the same test split for every seed
    assert _rows(a["train"]) != _rows(b["train"])  # seed changes the train/val cut ...
    assert sorted(_rows(a["train"]) + _rows(a["val"])) == sorted(_rows(b["train"]) + _rows(b["val"]))  # ... only
    assert _rows(load_digits_splits(1)["val"]) == _rows(b["val"])  # and is reproducible
    assert TEST_SPLIT_SEED == 0


def test_splits_are_stratified():
    labels = load_digits().target
    splits = load_digits_splits(3)
    for name, fraction in (("test", 0.4), ("val", 0.1)):
        counts = np.bincount(splits[name].tensors[1].numpy(), minlength=10)
        expected = fraction * np.bincount(labels, minlength=10)
        assert np.all(np.abs(counts - expected) <= 1.0), (name, counts, expected)


def test_loaders_shuffle_reproducibly():
    first = next(iter(digits_loaders(batch_size=32, seed=5)["train"]))[1]
    again = next(iter(digits_loaders(batch_size=32, seed=5)["train"]))[1]
    other = next(iter(digits_loaders(batch_size=32, seed=6)["train"]))[1]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    test_a = next(iter(digits_loaders(batch_size=32, seed=5)["test"]))[1]
    test_b = next(iter(digits_loaders(batch_size=32, seed=6)["test"]))[1]
    assert torch.equal(test_a, test_b)  # the test loader never shuffles


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "no training data"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_split_arguments(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        load_digits_splits(**kwargs)


def test_bad_batch_size():
    with pytest.raises(InvalidParameterError, match="batch_size"):
        digits_loaders(batch_size=0)
