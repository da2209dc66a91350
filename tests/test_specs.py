"""Compression specs: precedence, presets, validation, JSON, PQF's published sizes as an oracle."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from lr2vq_analysis import analyze, compress, predict_d_tilde
from lr2vq_analysis.exceptions import InvalidParameterError, ReportFileError
from lr2vq_analysis.models.resnet import resnet18, resnet50
from lr2vq_analysis.plan import LayerPlan
from lr2vq_analysis.size import size_report
from lr2vq_analysis.specs import PRESETS, CompressionSpecs, LayerSpec, as_specs, layer_kind


def test_kind_beats_global_and_glob_beats_kind():
    specs = CompressionSpecs(k=64, m=2, kinds={"conv3x3": {"m": 9}}, names={"layer1.*": {"k": 32}})
    plain = specs.resolve("head.weight", (64, 64, 3, 3))
    assert (plain.k, plain.m) == (64, 9)  # kind m, global k
    matched = specs.resolve("layer1.0.conv1.weight", (64, 64, 3, 3))
    assert (matched.k, matched.m) == (32, 9)  # glob k merged with kind m
    assert matched.rules == ("global", "kind conv3x3", "name 'layer1.*'")
    linear = specs.resolve("fc.weight", (10, 64))
    assert (linear.k, linear.m) == (64, 2)  # global k and m; 320 subvectors allow k up to 64


def test_most_specific_glob_wins_whatever_the_order():
    shape = (64, 64, 3, 3)
    for names in (
        {"layer1.*": {"k": 32}, "layer1.0.*": {"k": 64}, "layer1.0.conv1": {"k": 128}},
        {"layer1.0.conv1": {"k": 128}, "layer1.0.*": {"k": 64}, "layer1.*": {"k": 32}},
    ):
        specs = CompressionSpecs(m=9, names=names)
        assert specs.resolve("layer1.0.conv1.weight", shape).k == 128  # exact name beats any wildcard
        assert specs.resolve("layer1.0.conv2.weight", shape).k == 64  # more literal characters win
        assert specs.resolve("layer1.1.conv2.weight", shape).k == 32
        assert specs.resolve("layer2.0.conv2.weight", shape).k == 256
    # equal specificity: the one listed later wins
    tie = CompressionSpecs(m=9, names={"*.conv1": {"k": 32}, "layer1.*": {"k": 64}})
    assert tie.resolve("layer1.conv1.weight", shape).k == 64


def test_layer_kinds_by_shape_and_groups():
    assert layer_kind((64, 64, 3, 3)) == "conv3x3"
    assert layer_kind((64, 64, 1, 1)) == "conv1x1"
    assert layer_kind((64, 1, 3, 3)) == "depthwise"
    assert layer_kind((64, 4, 3, 3), groups=16) == "depthwise"
    assert layer_kind((64, 64, 5, 5)) == "conv_other"
    assert layer_kind((64, 64, 1, 3)) == "conv_other"
    assert layer_kind((64, 32, 5)) == "conv1d"
    assert layer_kind((10, 512)) == "linear"


@pytest.mark.parametrize(
    "name,m3,m1,fc_k",
    [
        ("pqf-small", 9, 4, 256),
        ("pqf-large", 18, 8, 256),
        ("pqf-small-resnet18", 9, 4, 2048),
        ("pqf-large-resnet18", 18, 4, 2048),
        ("pqf-small-resnet50", 9, 4, 1024),
        ("pqf-large-resnet50", 18, 8, 1024),
    ],
)
def test_preset_values(name, m3, m1, fc_k):
    specs = as_specs(name)
    assert specs.preset == name
    assert specs.resolve("layer2.0.conv2.weight", (128, 128, 3, 3)).m == m3
    assert specs.resolve("layer2.0.downsample.0.weight", (512, 256, 1, 1)).m == m1
    fc = specs.resolve("fc.weight", (1000, 2048))
    assert (fc.m, fc.k) == (4, fc_k)
    other_linear = specs.resolve("encoder.dense.weight", (384, 384))
    assert (other_linear.m, other_linear.k) == (4, 256)
    assert specs.resolve("blocks.0.dw.weight", (32, 1, 3, 3)).skip_reason.startswith("skipped by the specs")


@pytest.mark.parametrize(
    "preset,factory,megabytes,ratio",
    [
        ("pqf-small-resnet18", resnet18, 1.54, 29),
        ("pqf-large-resnet18", resnet18, 1.03, 43),
        ("pqf-small-resnet50", resnet50, 5.09, 19),
        ("pqf-large-resnet50", resnet50, 3.19, 31),
    ],
)
def test_presets_reproduce_pqf_published_sizes(preset, factory, megabytes, ratio):
    """An independent oracle: PQF's published MB and ratios from the layer shapes and the preset alone."""
    model = factory()
    plan = as_specs(preset).plan(model)
    assert "conv1.weight" not in plan  # the input convolution stays uncompressed
    report = size_report(model, plan)
    assert round(report.megabytes, 2) == megabytes
    assert round(report.ratio) == ratio


def test_k_cap_is_reported_per_layer():
    specs = CompressionSpecs(k=256, m=9)
    small = specs.resolve("conv.weight", (16, 8, 3, 3))  # 16·8 = 128 subvectors → cap 32
    assert (small.k, small.requested_k, small.capped) == (32, 256, True)
    assert "capped from 256 to 32" in small.note
    big = specs.resolve("conv.weight", (64, 64, 3, 3))
    assert not big.capped and big.note == ""


def test_skip_reasons():
    specs = CompressionSpecs(k=16, kinds={"conv3x3": {"m": 9}})
    assert "no m is set" in specs.resolve("fc.weight", (10, 64)).skip_reason
    assert "not divisible by m=9" in CompressionSpecs(m=9).resolve("fc.weight", (10, 64)).skip_reason
    assert "too few" in CompressionSpecs(m=9).resolve("c.weight", (2, 2, 3, 3)).skip_reason
    skip = CompressionSpecs(m=9, names={"head*": {"skip": True}}).resolve("head.weight", (64, 64, 3, 3))
    assert skip.k is None and "head*" in skip.skip_reason


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"kinds": {"conv3": {"m": 9}}}, "'conv3' is not a layer kind"),
        ({"kinds": {"linear": {"k": 1}}}, "kinds['linear']: k=1 is invalid"),
        ({"names": {"fc": {"mm": 4}}}, "names['fc']: unknown key(s) ['mm']"),
        ({"names": {"fc": {"m": 4, "d_tilde": 5}}}, "d_tilde=5 is invalid; d_tilde must be an integer in 1..4"),
        ({"names": {"": {"m": 4}}}, "names key '' is invalid"),
        ({"m": 0}, "m=0 is invalid"),
        ({"k": 2.5}, "k=2.5 is invalid"),
        ({"cap_k": "yes"}, "cap_k='yes' is invalid"),
    ],
)
def test_validation_errors_name_key_value_and_allowed(kwargs, needle):
    with pytest.raises(InvalidParameterError) as info:
        CompressionSpecs(**kwargs)
    assert needle in str(info.value)


def test_fixed_d_tilde_above_layer_m_is_an_error():
    specs = CompressionSpecs(m=4, d_tilde=3, kinds={"linear": {"m": 2}})
    with pytest.raises(InvalidParameterError, match=r"layer 'fc\.weight': d_tilde=3 is invalid"):
        specs.resolve("fc.weight", (10, 64))


def test_unknown_preset_and_bad_type():
    with pytest.raises(InvalidParameterError, match="pqf-tiny"):
        as_specs("pqf-tiny")
    with pytest.raises(InvalidParameterError, match="presets are"):
        CompressionSpecs.from_preset("nope")
    with pytest.raises(InvalidParameterError, match="type int"):
        as_specs(3)


def test_json_round_trip(tmp_path):
    specs = (
        CompressionSpecs.from_preset("pqf-large")
        .with_name("fc", k=1024)
        .with_kind("conv1d", m=4)
        .with_name("layer4.*", d_tilde=2)
    )
    path = specs.save(tmp_path / "specs.json")
    again = CompressionSpecs.load(path)
    assert again == specs
    assert as_specs(str(path)) == specs
    assert json.loads(path.read_text())["names"] == {"fc": {"k": 1024}, "layer4.*": {"d_tilde": 2}}
    assert LayerSpec.from_dict({"k": 32}) == LayerSpec(k=32)


def test_unreadable_specs_and_plan_files_are_report_file_errors(tmp_path):
    from lr2vq_analysis.planner import Plan

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ReportFileError, match=r"cannot read specs from .*broken\.json"):
        CompressionSpecs.load(broken)
    with pytest.raises(ReportFileError, match=r"cannot read the plan .*missing\.json"):
        Plan.load(tmp_path / "missing.json")


def test_old_global_k_m_still_work_and_match_uniform_specs():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(64, 16, 3, 3))
    old = predict_d_tilde(weight, 32, 9)
    new = predict_d_tilde(weight, specs=CompressionSpecs(k=32, m=9))
    assert old == new
    state = {"a.weight": rng.normal(size=(64, 32)), "b.weight": rng.normal(size=(32, 16, 3, 3))}
    by_args = analyze(state, k=16, m=4, progress=False, keep_first_conv=True)
    by_specs = analyze(state, specs={"k": 16, "m": 4}, progress=False, keep_first_conv=True)
    assert by_args.prediction == by_specs.prediction


def test_analyze_with_mixed_m_and_compress_with_specs():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3), nn.Conv2d(32, 32, 1), nn.Flatten(), nn.Linear(32 * 16, 10)
    )
    report = analyze(model, specs="pqf-small", k=999, progress=False)  # specs replace k and m
    assert {layer.name: (layer.m, layer.k) for layer in report.layers} == {
        "1.weight": (9, 128),  # 16·32 = 512 subvectors → cap 128
        "2.weight": (4, 64),  # 32·8 = 256 subvectors → cap 64
        "4.weight": (4, 256),
    }
    assert "0.weight" in report.skipped
    plan = report.plan("global")  # one global d̃, clipped to each layer's m
    assert all(entry.d_tilde <= entry.m for entry in plan.values())
    cmodel = compress(model, specs="pqf-small")
    assert cmodel.plan == {
        "1.weight": LayerPlan(k=128, m=9, d_tilde=9),
        "2.weight": LayerPlan(k=64, m=4, d_tilde=4),
        "4.weight": LayerPlan(k=256, m=4, d_tilde=4),
    }
    with pytest.raises(InvalidParameterError, match="exactly one"):
        compress(model)


def test_presets_are_all_listed():
    assert set(PRESETS) >= {"pqf-small", "pqf-large"}
