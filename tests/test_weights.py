"""Tests of load_weights: every source type, the selection rules and every bad-input rule.

The expected layer lists below are written by hand from the toy model's definition.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lr2vq_analysis._validation import InvalidParameterError, InvalidWeightsError, WeightFileError
from lr2vq_analysis.exceptions import ReportFileError
from lr2vq_analysis.weights import (
    BUNDLED_MODELS,
    SUPPORTED_EXTENSIONS,
    Coverage,
    LayerInfo,
    WeightSet,
    bundled_model_path,
    load_state_dict,
    load_weights,
    read_npz,
)


class Toy(nn.Module):
    """Every case at once. Names sort naturally in model order, so files keep it too."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("position_ids", torch.arange(6).reshape(1, 6))  # int, rank 2
        self.conv1 = nn.Conv2d(3, 8, 3)  # first conv
        self.bn1 = nn.BatchNorm2d(8)  # rank 1 only: not reported
        self.conv2 = nn.Conv2d(8, 16, 3, bias=False)  # row length 72
        self.conv3 = nn.Conv2d(16, 16, 3, groups=4)  # grouped: weight (16, 4, 3, 3)
        self.conv4 = nn.Conv1d(16, 4, 2)  # row length 32
        self.embed = nn.Embedding(10, 6)
        self.fc = nn.Linear(12, 10)  # row length 12


def toy() -> Toy:
    torch.manual_seed(0)
    return Toy()


# kind and shape by hand. An nn.Module reveals groups; a state_dict does not, so conv3 loads from files.
MODULE_LAYERS = [
    ("conv2.weight", "conv2d", (16, 8, 3, 3)),
    ("conv4.weight", "conv1d", (4, 16, 2)),
    ("fc.weight", "linear", (10, 12)),
]
MODULE_SKIPPED = {
    "position_ids": "floating-point",
    "conv1.weight": "input stem",
    "conv3.weight": "grouped convolution (groups=4)",
    "embed.weight": "embedding",
}
STATE_DICT_LAYERS = [
    ("conv2.weight", "conv2d", (16, 8, 3, 3)),
    ("conv3.weight", "conv2d", (16, 4, 3, 3)),
    ("conv4.weight", "conv1d", (4, 16, 2)),
    ("fc.weight", "linear", (10, 12)),
]
STATE_DICT_SKIPPED = {
    "position_ids": "floating-point",
    "conv1.weight": "input stem",
    "embed.weight": "embedding",
}


def layer_list(ws: WeightSet) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(info.name, info.kind, info.shape) for info in ws.info.values()]


def assert_loaded(ws: WeightSet, layers: list, skipped: dict[str, str], reference: dict) -> None:
    assert list(ws) == [name for name, _, _ in layers]
    assert layer_list(ws) == layers
    assert set(ws.skipped) == set(skipped)
    for name, fragment in skipped.items():
        assert fragment in ws.skipped[name], (name, ws.skipped[name])
    for name, _, shape in layers:
        assert ws[name].dtype == np.float32
        assert ws[name].shape == shape
        np.testing.assert_array_equal(ws[name], np.asarray(reference[name], dtype=np.float32))


def reference_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    return {key: value.detach().numpy().copy() for key, value in model.state_dict().items()}


# ----------------------------------------------------------------------------------------- sources
def test_module_kinds_from_module_types():
    model = toy()
    ws = load_weights(model)
    assert_loaded(ws, MODULE_LAYERS, MODULE_SKIPPED, reference_arrays(model))
    assert ws.source == "Toy (nn.Module)"
    assert ws.info["conv2.weight"] == LayerInfo("conv2.weight", "conv2d", (16, 8, 3, 3))


def test_module_values_are_copies():
    model = toy()
    ws = load_weights(model)
    ws["conv2.weight"][...] = 0.0
    assert model.conv2.weight.abs().sum() > 0


def test_state_dict_kinds_from_rank():
    model = toy()
    ws = load_weights(model.state_dict())
    assert_loaded(ws, STATE_DICT_LAYERS, STATE_DICT_SKIPPED, reference_arrays(model))
    assert ws.source == "state_dict"


def test_state_dict_of_numpy_arrays_keeps_order():
    rng = np.random.default_rng(0)
    state = OrderedDict(
        [("z.weight", rng.normal(size=(4, 6))), ("a.weight", rng.normal(size=(3, 6))), ("a.bias", np.zeros(3))]
    )
    ws = load_weights(state)
    assert list(ws) == ["z.weight", "a.weight"]  # insertion order, not sorted
    np.testing.assert_array_equal(ws["z.weight"], state["z.weight"].astype(np.float32))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_torch_file(tmp_path, suffix):
    model = toy()
    path = tmp_path / f"model{suffix}"
    torch.save(model.state_dict(), path)
    ws = load_weights(path)
    assert_loaded(ws, STATE_DICT_LAYERS, STATE_DICT_SKIPPED, reference_arrays(model))
    assert ws.source == str(path)


@pytest.mark.parametrize("entry", ["state_dict", "model_state_dict", "model"])
def test_torch_checkpoint_with_nested_state_dict(tmp_path, entry):
    model = toy()
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}, entry: model.state_dict()}, path)
    ws = load_weights(str(path))
    assert_loaded(ws, STATE_DICT_LAYERS, STATE_DICT_SKIPPED, reference_arrays(model))


def test_safetensors_file_in_natural_key_order(tmp_path):
    model = toy()
    path = tmp_path / "model.safetensors"
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(path))
    ws = load_weights(path)
    assert_loaded(ws, STATE_DICT_LAYERS, STATE_DICT_SKIPPED, reference_arrays(model))

    # safetensors stores no model order: numbers in keys are compared as numbers
    path2 = tmp_path / "blocks.safetensors"
    save_file({f"block.{i}.weight": torch.ones(4, 4) for i in (10, 2, 1)}, str(path2))
    assert list(load_weights(path2)) == ["block.1.weight", "block.2.weight", "block.10.weight"]


def test_npz_file(tmp_path):
    model = toy()
    path = tmp_path / "model.npz"
    np.savez(path, **reference_arrays(model))
    ws = load_weights(path)
    assert_loaded(ws, STATE_DICT_LAYERS, STATE_DICT_SKIPPED, reference_arrays(model))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_converted_to_float32(tmp_path, dtype):
    weight = torch.randn(8, 6, generator=torch.Generator().manual_seed(0)).to(dtype)
    path = tmp_path / "half.safetensors"
    save_file({"fc.weight": weight}, str(path))
    for source in (path, {"fc.weight": weight}):
        ws = load_weights(source)
        assert ws["fc.weight"].dtype == np.float32
        np.testing.assert_array_equal(ws["fc.weight"], weight.float().numpy())


def test_bundled_model_by_name():
    assert "digits-cnn" in BUNDLED_MODELS
    ws = load_weights("digits-cnn")
    # DigitsCNN: conv1 1→16, conv2 16→32, conv3 32→64, conv4 64→64, fc 64→10
    assert layer_list(ws) == [
        ("conv2.weight", "conv2d", (32, 16, 3, 3)),
        ("conv3.weight", "conv2d", (64, 32, 3, 3)),
        ("conv4.weight", "conv2d", (64, 64, 3, 3)),
        ("fc.weight", "linear", (10, 64)),
    ]
    assert set(ws.skipped) == {"conv1.weight"}
    assert ws.source == "digits-cnn"
    assert bundled_model_path("digits-cnn").is_file()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".npz", None])
def test_load_state_dict_returns_every_tensor_in_its_dtype(tmp_path, suffix):
    model = toy()
    reference = model.state_dict()
    source: object = model
    if suffix == ".pt":
        source = tmp_path / "m.pt"
        torch.save(reference, source)
    elif suffix == ".safetensors":
        source = tmp_path / "m.safetensors"
        save_file({k: v.contiguous() for k, v in reference.items()}, str(source))
    elif suffix == ".npz":
        source = tmp_path / "m.npz"
        np.savez(source, **reference_arrays(model))
    state = load_state_dict(source)
    assert set(state) == set(reference)
    for key, value in reference.items():
        assert state[key].dtype == value.dtype, key
        assert torch.equal(state[key], value), key
    state["conv2.weight"].zero_()
    assert model.conv2.weight.abs().sum() > 0  # no memory shared with the source


def test_read_only_numpy_arrays():
    weight = np.ones((4, 6))
    weight.setflags(write=False)
    assert load_weights({"fc.weight": weight})["fc.weight"].flags.writeable


# ----------------------------------------------------------------------------------- selection rules
def test_keep_first_conv():
    model = toy()
    ws = load_weights(model, keep_first_conv=True)
    assert list(ws) == ["conv1.weight", "conv2.weight", "conv4.weight", "fc.weight"]
    assert ws.info["conv1.weight"].kind == "conv2d"
    assert "conv1.weight" not in ws.skipped


def test_first_conv_is_first_3d_or_4d_weight_in_model_order():
    # a Linear before any conv does not count; the first Conv1d does
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 8, 3), nn.Conv1d(8, 8, 3))
    ws = load_weights(model)
    assert list(ws) == ["0.weight", "2.weight"]
    assert "input stem" in ws.skipped["1.weight"]


def test_first_conv_with_nan_is_not_checked():
    model = toy()
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] = float("nan")
    assert "conv1.weight" in load_weights(model).skipped


def test_include_and_exclude_globs():
    model = toy()
    ws = load_weights(model, include="conv*")
    assert list(ws) == ["conv2.weight", "conv4.weight"]
    assert "include" in ws.skipped["fc.weight"]

    ws = load_weights(model, include=["fc", "conv2.*"])  # the name without ".weight" matches too
    assert list(ws) == ["conv2.weight", "fc.weight"]

    ws = load_weights(model, exclude=["fc", "conv4.weight"])
    assert list(ws) == ["conv2.weight"]
    assert ws.skipped["fc.weight"] == "excluded by exclude pattern 'fc'"
    assert ws.skipped["conv4.weight"] == "excluded by exclude pattern 'conv4.weight'"

    assert list(load_weights(model, include=[])) == list(load_weights(model))  # empty list: no filter


def test_min_size():
    # sizes by hand: conv2 16·8·9 = 1152, conv4 4·16·2 = 128, fc 10·12 = 120
    ws = load_weights(toy(), min_size=128)
    assert list(ws) == ["conv2.weight", "conv4.weight"]
    assert "120 weights, fewer than min_size=128" in ws.skipped["fc.weight"]


def test_m_not_dividing_row_length_is_reported():
    model = toy()
    ws = load_weights(model, m=8)  # row lengths 72, 32, 12
    assert list(ws) == ["conv2.weight", "conv4.weight"]
    assert ws.skipped["fc.weight"] == "row length 12 (in_features) is not divisible by m=8"

    ws = load_weights(model, m=9)
    assert list(ws) == ["conv2.weight"]
    assert ws.skipped["conv4.weight"] == "row length 32 (C_in·k) is not divisible by m=9"

    ws = load_weights(model, m=16, keep_first_conv=True)  # conv1 row 27, conv2 row 72
    assert ws.skipped["conv1.weight"] == "row length 27 (C_in·kh·kw) is not divisible by m=16"
    assert ws.skipped["conv2.weight"] == "row length 72 (C_in·kh·kw) is not divisible by m=16"
    assert list(ws) == ["conv4.weight"]


def test_every_rank_2_to_4_tensor_is_either_loaded_or_skipped():
    model = toy()
    for source in (model, model.state_dict()):
        for kwargs in ({}, {"m": 9}, {"min_size": 200}, {"include": "fc"}):
            ws = load_weights(source, **kwargs)
            expected = {k for k, v in model.state_dict().items() if 2 <= v.dim() <= 4}
            assert set(ws) | set(ws.skipped) == expected
            assert not set(ws) & set(ws.skipped)


def test_grouped_and_depthwise_conv_skipped():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 1))
    ws = load_weights(model)
    assert list(ws) == ["2.weight"]
    assert ws.skipped["1.weight"] == "grouped convolution (groups=8) is left uncompressed"


def test_state_dict_embedding_by_name_and_non_weight_names():
    state = {
        "embeddings.word_embeddings.weight": torch.ones(30, 8),
        "transformer.wte.weight": torch.ones(30, 8),
        "cls_token": torch.ones(1, 1, 8),
        "encoder.query.weight": torch.ones(8, 8),
    }
    ws = load_weights(state)
    assert list(ws) == ["encoder.query.weight"]
    assert "embedding" in ws.skipped["embeddings.word_embeddings.weight"]
    assert "embedding" in ws.skipped["transformer.wte.weight"]
    assert "does not end in 'weight'" in ws.skipped["cls_token"]


def test_unsupported_module_types_are_reported():
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.ConvTranspose2d(4, 4, 3), nn.Linear(8, 8))
    ws = load_weights(model)
    assert list(ws) == ["0.out_proj.weight", "2.weight"]  # out_proj is an nn.Linear subclass
    assert "MultiheadAttention" in ws.skipped["0.in_proj_weight"]
    assert "transposed convolution" in ws.skipped["1.weight"]


def test_all_zero_layer_is_skipped():
    model = toy()
    with torch.no_grad():
        model.fc.weight.zero_()
    ws = load_weights(model)
    assert "all weights are zero" in ws.skipped["fc.weight"]


def test_repr_and_summary():
    ws = load_weights(toy())
    assert (
        repr(ws)
        == "WeightSet(source='Toy (nn.Module)', 3 layers (1 conv2d, 1 conv1d, 1 linear), 1,400 weights, 4 skipped)"
    )
    text = ws.summary()
    assert "conv2.weight" in text and "grouped convolution" in text


# ------------------------------------------------------------------------------------------ bad input
def test_missing_file(tmp_path):
    path = tmp_path / "missing.pt"
    with pytest.raises(WeightFileError, match="no such file") as info:
        load_weights(path)
    assert isinstance(info.value, OSError)
    assert info.value.filename == str(path)
    assert info.value.errno == errno.ENOENT


def test_unsupported_extension(tmp_path):
    path = tmp_path / "model.h5"
    path.write_bytes(b"\x89HDF")
    with pytest.raises(WeightFileError, match=r"unsupported file extension '\.h5'") as info:
        load_weights(path)
    for extension in SUPPORTED_EXTENSIONS:
        assert extension in str(info.value)


def test_directory(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(WeightFileError, match=r"directory.*model\.safetensors"):
        load_weights(tmp_path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".npz"])
def test_corrupt_file(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(b"this is not a weight file at all" * 4)
    with pytest.raises(WeightFileError, match="corrupt") as info:
        load_weights(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".npz"])
def test_truncated_file(tmp_path, suffix):
    state = {"fc.weight": torch.randn(64, 64, generator=torch.Generator().manual_seed(0))}
    path = tmp_path / f"full{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    elif suffix == ".safetensors":
        save_file(state, str(path))
    else:
        np.savez(path, **{k: v.numpy() for k, v in state.items()})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFileError, match="corrupt") as info:
        load_weights(path)
    assert str(path) in str(info.value)


def test_pickled_module_is_refused(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(nn.Linear(4, 4), path)  # weights_only loading must refuse arbitrary pickles
    with pytest.raises(WeightFileError, match="weights_only"):
        load_weights(path)


def test_file_without_state_dict(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.ones(3, 3), path)
    with pytest.raises(WeightFileError, match="not a state_dict"):
        load_weights(path)
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 1, "note": "no tensors"}, path)
    with pytest.raises(WeightFileError, match="not a state_dict"):
        load_weights(path)


@pytest.mark.parametrize(
    "source",
    [nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), {}, {"bias": torch.ones(3)}, nn.Conv2d(3, 8, 3)],
    ids=["no-weights", "empty-dict", "only-bias", "only-first-conv"],
)
def test_empty_model(source):
    with pytest.raises(InvalidWeightsError, match="empty model"):
        load_weights(source)


def test_empty_after_filters_names_the_reasons():
    with pytest.raises(InvalidWeightsError, match=r"empty model.*fc\.weight: not matched by include"):
        load_weights(toy(), include="nothing*")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_names_the_layer(bad):
    model = toy()
    with torch.no_grad():
        model.conv4.weight[1, 2, 0] = bad
    with pytest.raises(InvalidWeightsError, match=r"layer 'conv4\.weight'.*NaN/Inf"):
        load_weights(model)
    with pytest.raises(InvalidWeightsError, match=r"layer 'conv4\.weight'"):
        load_weights(model.state_dict())


def test_unknown_bundled_name():
    with pytest.raises(WeightFileError, match="digits-cnn"):
        load_weights("resnet18")
    with pytest.raises(InvalidParameterError, match=r"unknown model 'resnet18'.*digits-cnn"):
        bundled_model_path("resnet18")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"m": 0}, "m=0"),
        ({"m": 2.5}, "m=2.5"),
        ({"min_size": -1}, "min_size=-1"),
        ({"include": 3}, "include=3"),
        ({"exclude": ["ok", 1]}, "exclude="),
    ],
)
def test_invalid_parameters(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        load_weights(toy(), **kwargs)


def test_unsupported_source_type():
    with pytest.raises(InvalidParameterError, match="source of type int"):
        load_weights(42)


# ------------------------------------------------------------------------- names, order and the input stem
def test_include_selects_any_floating_tensor_whatever_its_name(tmp_path):
    rng = np.random.default_rng(0)
    # Paddle names its linear weights *.w_0; ONNX initializers carry no suffix at all.
    state = {
        "fc1.w_0": rng.normal(size=(8, 16)).astype(np.float32),
        "fc1.b_0": rng.normal(size=8).astype(np.float32),
        "onnx::MatMul_123": rng.normal(size=(4, 8)).astype(np.float32),
        "conv.w_0": rng.normal(size=(8, 8, 3, 3)).astype(np.float32),
        "step": np.arange(6).reshape(2, 3),  # an integer array is never a layer
    }
    path = tmp_path / "paddle.npz"
    np.savez(path, **state)
    for source in (state, path):
        with pytest.raises(InvalidWeightsError, match="empty model"):
            load_weights(source)  # the default selection stays "weights of layers"
        ws = load_weights(source, include=["*.w_0", "onnx::*", "step"])
        assert layer_list(ws) == [("fc1.w_0", "linear", (8, 16)), ("onnx::MatMul_123", "linear", (4, 8))]
        assert "input stem" in ws.skipped["conv.w_0"]  # the rank-4 tensor reads 8 channels, but order is known
        assert "floating-point" in ws.skipped["step"]
        np.testing.assert_array_equal(ws["onnx::MatMul_123"], state["onnx::MatMul_123"])
    # A module's non-layer matrix (MultiheadAttention's in_proj_weight) can be selected the same way.
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    ws = load_weights(model, include=["*in_proj_weight", "1"])
    assert layer_list(ws) == [("0.in_proj_weight", "linear", (24, 8)), ("1.weight", "linear", (8, 8))]


def _save_safetensors(path, state):
    save_file({key: torch.as_tensor(value).contiguous() for key, value in state.items()}, str(path))


def test_order_is_natural_and_marked_inferred_only_where_the_source_has_none(tmp_path):
    state = OrderedDict((f"layer.{i}.weight", torch.ones(4, 4) * (i + 1)) for i in (2, 10, 1))
    path = tmp_path / "m.safetensors"
    _save_safetensors(path, state)
    ws = load_weights(path)
    assert list(ws) == ["layer.1.weight", "layer.2.weight", "layer.10.weight"]
    assert ws.order_inferred and ws.coverage.order_inferred and "order inferred" in ws.coverage.summary()
    np.savez(tmp_path / "m.npz", **{k: v.numpy() for k, v in state.items()})
    torch.save(state, tmp_path / "m.pt")
    for source in (state, tmp_path / "m.npz", tmp_path / "m.pt", nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))):
        ws = load_weights(source)
        assert not ws.order_inferred and "order inferred" not in ws.coverage.summary()
    assert list(load_weights(state)) == ["layer.2.weight", "layer.10.weight", "layer.1.weight"]


def test_input_stem_is_the_conv_reading_the_image_not_the_first_key(tmp_path):
    rng = np.random.default_rng(0)
    # Keys sort "blocks" < "dw" < "stem": position would pick blocks.0 (32 -> 32 channels) as "first conv".
    state = {
        "blocks.0.weight": rng.normal(size=(32, 32, 3, 3)),
        "blocks.1.weight": rng.normal(size=(64, 32, 1, 1)),
        "dw.weight": rng.normal(size=(64, 1, 3, 3)),  # depthwise, read from a file: one input channel
        "stem.weight": rng.normal(size=(32, 3, 3, 3)),  # RGB
    }
    path = tmp_path / "detector.safetensors"
    _save_safetensors(path, {k: v.astype(np.float32) for k, v in state.items()})
    ws = load_weights(path)
    assert list(ws) == ["blocks.0.weight", "blocks.1.weight", "dw.weight"]
    assert set(ws.skipped) == {"stem.weight"} and "reads 3 channels" in ws.skipped["stem.weight"]
    assert "stem.weight" in load_weights(path, keep_first_conv=True)
    # A grayscale model: the stem reads one channel; no conv reads <= 4 channels -> none skipped (order unknown).
    _save_safetensors(path, {"a.weight": torch.ones(8, 1, 3, 3), "b.weight": torch.randn(8, 8, 3, 3)})
    assert set(load_weights(path).skipped) == {"a.weight"}
    _save_safetensors(path, {"a.weight": torch.randn(8, 16, 3, 3), "b.weight": torch.randn(8, 8, 3, 3)})
    assert not load_weights(path).skipped
    # A module knows its order: the first conv reading <= 4 channels, even after other convs' definitions.
    model = nn.Sequential(nn.Linear(8, 8), nn.Conv2d(3, 8, 3), nn.Conv2d(8, 3, 1), nn.Conv2d(3, 8, 3))
    assert set(load_weights(model).skipped) == {"1.weight"}
    # Without any conv reading <= 4 channels (an audio model over 80 mel bins), the first conv in model order.
    assert set(load_weights(nn.Sequential(nn.Conv1d(80, 16, 3), nn.Conv1d(16, 16, 3))).skipped) == {"0.weight"}


# ------------------------------------------------------------------------------------------------ coverage
def test_coverage_counts_every_parameter_by_reason():
    ws = load_weights(toy())
    # By hand from Toy: conv2 16·8·9 = 1152, conv4 4·16·2 = 128, fc 10·12 = 120 analysed; conv1 216 (stem);
    # conv3 16·4·9 = 576 (grouped); embed 60; biases and norms: conv1 8, bn1 4×8, conv3 16, conv4 4, fc 10 = 70.
    # position_ids and num_batches_tracked are integers: not parameters.
    assert ws.coverage.analysed == 1400 == ws.n_weights
    assert ws.coverage.by_reason == {
        "input stem": 216,
        "grouped or depthwise convolution": 576,
        "embedding table": 60,
        "biases and norms (rank 0-1)": 70,
    }
    assert ws.coverage.total == sum(p.numel() for p in toy().parameters()) + 16  # + bn1's running statistics
    assert ws.coverage.summary().startswith(f"analysed {1400 / 2322:.1%} of 2,322 parameters; skipped")
    m9 = load_weights(toy(), m=9).coverage  # conv4 (128) and fc (120) have row lengths 32 and 12
    assert m9.analysed == 1152 and m9.by_reason["m does not divide the row length"] == 248


def test_coverage_dataclass_round_trip_and_skip():
    coverage = Coverage(90, (("input stem", 10),), order_inferred=True)
    assert Coverage.from_dict(coverage.to_dict()) == coverage
    moved = coverage.skip("too few subvectors", 30)
    assert moved.analysed == 60 and moved.total == 100
    assert moved.skipped == (("too few subvectors", 30), ("input stem", 10))


# ------------------------------------------------------------------------------------ sharded checkpoints
def _sharded(tmp_path, state, sort_index=True):
    keys = list(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for shard, names in shards.items():
        _save_safetensors(tmp_path / shard, {name: state[name] for name in names})
        weight_map.update(dict.fromkeys(names, shard))
    index = tmp_path / "model.safetensors.index.json"
    ordered = dict(sorted(weight_map.items())) if sort_index else {key: weight_map[key] for key in keys}
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": ordered}))
    return index


def test_sharded_checkpoint_by_index_or_folder_equals_the_whole_model(tmp_path):
    model = toy()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    index = _sharded(tmp_path, state)
    whole = load_weights(state)
    for source in (index, tmp_path, str(index)):
        ws = load_weights(source)
        assert list(ws) == list(whole)  # Toy's names sort naturally in model order
        assert ws.skipped.keys() == whole.skipped.keys()
        for name in whole:
            np.testing.assert_array_equal(ws[name], whole[name])
        assert ws.coverage.by_reason == whole.coverage.by_reason and ws.order_inferred
    assert load_state_dict(index).keys() == state.keys()


def test_sharded_index_in_model_order_is_used(tmp_path):
    state = {f"z{i}.weight": torch.randn(4, 8) for i in (3, 1, 2)}
    ws = load_weights(_sharded(tmp_path, state, sort_index=False))
    assert list(ws) == ["z3.weight", "z1.weight", "z2.weight"] and not ws.order_inferred


def test_one_shard_of_a_sharded_checkpoint_is_refused_naming_the_index(tmp_path):
    index = _sharded(tmp_path, {f"l{i}.weight": torch.randn(4, 8) for i in range(4)})
    with pytest.raises(WeightFileError, match=r"one of 2 shards.*model\.safetensors\.index\.json"):
        load_weights(tmp_path / "model-00001-of-00002.safetensors")
    index.unlink()  # no index: the shard is read, with a warning that it is one of several
    with pytest.warns(UserWarning, match="shard 1 of 2"):
        assert list(load_weights(tmp_path / "model-00001-of-00002.safetensors")) == ["l0.weight", "l2.weight"]


@pytest.mark.parametrize(
    ("weight_map", "match"),
    [
        ({"a.weight": "../outside.safetensors"}, "not a file name inside"),
        ({"l0.weight": "model-00001-of-00002.safetensors", "zz.weight": "model-00001-of-00002.safetensors"}, "zz"),
        ({"l0.weight": "model-00001-of-00002.safetensors"}, "does not list"),
        ({"a.weight": "weights.bin"}, "only sharded .safetensors"),
        ({}, "weight_map"),
    ],
)
def test_bad_sharded_index(tmp_path, weight_map, match):
    _sharded(tmp_path, {f"l{i}.weight": torch.randn(4, 8) for i in range(4)})
    bad = tmp_path / "bad.safetensors.index.json"
    bad.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(WeightFileError, match=match):
        load_weights(bad)


# ------------------------------------------------------------------------------ source dtype and streaming
@pytest.mark.parametrize(
    ("dtype", "name", "bits"),
    [(torch.bfloat16, "bfloat16", 16), (torch.float16, "float16", 16), (torch.float32, "float32", 32),
     (torch.float64, "float64", 64)],
)  # fmt: skip
def test_source_dtype_is_recorded_and_layers_stay_in_it(tmp_path, dtype, name, bits):
    weight = torch.randn(8, 6, generator=torch.Generator().manual_seed(0)).to(dtype)
    _save_safetensors(tmp_path / "m.safetensors", {"fc.weight": weight})
    np_source = {"fc.weight": weight.numpy()} if dtype != torch.bfloat16 else {"fc.weight": weight}
    for source in (tmp_path / "m.safetensors", {"fc.weight": weight}, np_source):
        ws = load_weights(source)
        assert ws.info["fc.weight"].source_dtype == name and ws.info["fc.weight"].source_bits == bits
        assert torch.as_tensor(ws.tensor("fc.weight")).dtype == dtype
        np.testing.assert_array_equal(ws["fc.weight"], weight.float().numpy())


def test_file_layers_are_read_one_at_a_time_and_not_kept(tmp_path, layer_reads):
    _save_safetensors(tmp_path / "m.safetensors", {f"l{i}.weight": torch.randn(16, 8) for i in range(5)})
    ws = load_weights(tmp_path / "m.safetensors")
    assert layer_reads.most_alive == 1 and layer_reads.n_alive == 0  # checked one by one, nothing kept
    first = ws["l0.weight"]
    assert ws["l0.weight"] is not first  # each access reads the file again


# ------------------------------------------------------------------------------------ odd files and bombs
def test_npz_members_beyond_the_expansion_bound_are_never_decompressed(tmp_path, monkeypatch):
    from lr2vq_analysis import weights as weights_module

    monkeypatch.setattr(weights_module, "NPZ_SMALL_MEMBER_BYTES", 2**20)
    rng = np.random.default_rng(0)
    path = tmp_path / "bomb.npz"
    # 8 MB of zeros compress ~1000-fold: beyond 200× and 1 MiB. A real bomb is the same with more zeros.
    np.savez_compressed(path, fc=rng.normal(size=(16, 8)), zeros=np.zeros((1024, 1024)), mask=np.zeros(2**20))
    decompressed: list[int] = []
    original = zipfile.ZipExtFile.read

    def counting_read(self, n=-1):
        data = original(self, n)
        decompressed.append(len(data))
        return data

    monkeypatch.setattr(zipfile.ZipExtFile, "read", counting_read)
    ws = load_weights(path, include=["fc", "zeros"])
    assert list(ws) == ["fc"] and "8,388,736 bytes" in ws.skipped["zeros"]  # 1024² float64 + its header
    assert "not decompressed" in ws.skipped["zeros"]
    assert ws.coverage.by_reason["over the .npz decompression bound"] == 2**20
    assert sum(decompressed) < 2**16  # headers and the small array only
    assert list(read_npz(path, ["fc"])) == ["fc"]
    with pytest.raises(ReportFileError, match=r"'mask' is refused.*not decompressed"):
        read_npz(path, ["mask"], error=ReportFileError)


def test_read_npz_max_bytes_bounds_only_the_requested_arrays_before_any_read(tmp_path, monkeypatch):
    path = tmp_path / "a.npz"
    np.savez_compressed(path, small=np.arange(3, dtype=np.int64), big=np.zeros(10_000, np.uint8))
    assert read_npz(path, ["small"], max_bytes=1000)["small"].tolist() == [0, 1, 2]  # big is not bounded

    def no_decompression(*args, **kwargs):
        raise AssertionError("a member was decompressed")

    monkeypatch.setattr(zipfile.ZipExtFile, "read", no_decompression)
    # 10,000 bytes + a 128-byte .npy header, counted by hand.
    with pytest.raises(ReportFileError, match="'big' declares 10128 bytes uncompressed; at most 1000"):
        read_npz(path, ["big"], error=ReportFileError, max_bytes=1000)


def test_npz_lying_about_its_size_is_corrupt(tmp_path):
    path = tmp_path / "liar.npz"
    np.savez(path, fc=np.ones((4, 4)))
    data = bytearray(path.read_bytes())
    # The central directory's uncompressed size of the only member: claim 8 GB.
    central = data.rfind(b"PK\x01\x02")
    data[central + 24 : central + 28] = (2**32 - 1).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(WeightFileError, match="corrupt"):
        load_weights(path)


def test_npy_renamed_npz_is_named(tmp_path):
    path = tmp_path / "weights.npz"
    with open(path, "wb") as handle:
        np.save(handle, np.ones((4, 4)))
    with pytest.raises(WeightFileError, match=r"single \.npy array"):
        load_weights(path)
    with pytest.raises(ReportFileError, match=r"single \.npy array"):
        read_npz(path, error=ReportFileError)


def test_complex_and_string_arrays_are_skipped_with_the_reason(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a.weight": rng.normal(size=(4, 4)) + 1j, "b.weight": np.array([["x", "yy"], ["z", "w"]]),
              "c.weight": rng.normal(size=(4, 8))}  # fmt: skip
    np.savez(tmp_path / "m.npz", **arrays)
    with pytest.raises(InvalidWeightsError, match=r"empty model.*complex values"):
        load_weights({"a.weight": torch.ones(4, 4, dtype=torch.complex64)})
    for source in (arrays, tmp_path / "m.npz"):
        ws = load_weights(source)
        assert list(ws) == ["c.weight"]
        assert "complex values" in ws.skipped["a.weight"] and "strings" in ws.skipped["b.weight"]


@pytest.mark.parametrize("shape", [(0, 18), (18, 0), (0, 4, 3, 3), (4, 0, 3)])
@pytest.mark.parametrize("kind", ["state_dict", ".safetensors", ".npz"])
def test_empty_tensor_is_reported_as_empty_not_zero(tmp_path, shape, kind):
    state = {"empty.weight": torch.zeros(shape), "fc.weight": torch.randn(4, 8)}
    source: object = state
    if kind == ".safetensors":
        source = tmp_path / "m.safetensors"
        _save_safetensors(source, state)
    elif kind == ".npz":
        source = tmp_path / "m.npz"
        np.savez(source, **{k: v.numpy() for k, v in state.items()})
    ws = load_weights(source, keep_first_conv=True)
    assert ws.skipped["empty.weight"] == f"empty tensor (shape {shape}) holds no weights"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("name", ["w.pt", "w.safetensors", "w.npz", "w.bin", "model.safetensors.index.json"])
def test_non_regular_file_is_refused_without_opening_it(tmp_path, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the loader opened a FIFO and blocked"))
    signal.alarm(20)
    try:
        with pytest.raises(WeightFileError, match=r"not a regular file \(it is a FIFO"):
            load_weights(fifo)
        with pytest.raises(ReportFileError, match="not a regular file"):
            read_npz(fifo, error=ReportFileError)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_symlink_loop_and_dangling_link_are_named(tmp_path):
    loop_a, loop_b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    with pytest.raises(WeightFileError, match="symbolic link loop") as info:
        load_weights(loop_a)
    assert info.value.errno == errno.ELOOP
    dangling = tmp_path / "gone.pt"
    dangling.symlink_to(tmp_path / "missing.pt")
    with pytest.raises(WeightFileError, match="dangling symbolic link"):
        load_weights(dangling)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".pt"])
def test_non_utf8_path(tmp_path, suffix):
    folder = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9-\xff"))
    folder.mkdir()
    path = folder / f"w{suffix}"
    state = {"fc.weight": torch.randn(4, 8)}
    if suffix == ".safetensors":
        from safetensors.torch import save

        path.write_bytes(save(state))
    elif suffix == ".npz":
        np.savez(path, **{k: v.numpy() for k, v in state.items()})
    else:
        torch.save(state, path)
    np.testing.assert_array_equal(load_weights(path)["fc.weight"], state["fc.weight"].numpy())


def test_file_truncated_while_read_raises_instead_of_sigbus(tmp_path):
    path = tmp_path / "big.safetensors"
    _save_safetensors(path, {f"l{i}.weight": torch.randn(64, 64) for i in range(4)})
    ws = load_weights(path)
    os.truncate(path, path.stat().st_size // 2)  # in place, as a concurrent writer would
    with pytest.raises(WeightFileError, match="changed while it was read"):
        ws["l3.weight"]
    # The same in a child process that reads through the whole path: it must exit normally, not die of SIGBUS.
    _save_safetensors(path, {f"l{i}.weight": torch.randn(64, 64) for i in range(4)})
    script = (
        "import os, sys\n"
        "from lr2vq_analysis.exceptions import WeightFileError\n"
        "from lr2vq_analysis.weights import load_weights\n"
        "ws = load_weights(sys.argv[1])\n"
        "os.truncate(sys.argv[1], 200)\n"
        "try:\n    [ws[name] for name in ws]\nexcept WeightFileError:\n    sys.exit(3)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, timeout=120)
    assert result.returncode == 3, result.stderr.decode()[-500:]
