"""Tests of load_weights: every source type, the selection rules and every bad-input rule.

The expected layer lists below are written by hand from the toy model's definition.
"""

from __future__ import annotations

import errno
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lr2vq_analysis._validation import InvalidParameterError, InvalidWeightsError, WeightFileError
from lr2vq_analysis.weights import (
    BUNDLED_MODELS,
    SUPPORTED_EXTENSIONS,
    LayerInfo,
    WeightSet,
    bundled_model_path,
    load_state_dict,
    load_weights,
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
    "conv1.weight": "first convolution",
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
    "conv1.weight": "first convolution",
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
    assert "first convolution" in ws.skipped["1.weight"]


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
