"""size_report against PQF's published ResNet sizes and hand-computed sizes of a toy model."""

import math

import numpy as np
import pytest
from conftest import make_toy_cnn
from torch import nn

from lr2vq_analysis._validation import InvalidParameterError
from lr2vq_analysis.models.resnet import resnet18, resnet50
from lr2vq_analysis.nn import compress
from lr2vq_analysis.plan import LayerPlan, effective_k
from lr2vq_analysis.size import size_report


def _pqf_plan(model: nn.Module, m_3x3: int, m_1x1: int, k_fc: int, k: int = 256) -> dict[str, LayerPlan]:
    """PQF's PQ configuration: first conv uncompressed, FC m = 4, PQF's k cap on small layers."""
    plan = {}
    for key, tensor in model.state_dict().items():
        if not key.endswith("weight") or tensor.ndim not in (2, 4) or key == "conv1.weight":
            continue
        shape = tuple(tensor.shape)
        if tensor.ndim == 2:
            m, layer_k = 4, k_fc
        else:
            m, layer_k = (m_3x3, k) if shape[-1] == 3 else (m_1x1, k)
        plan[key] = LayerPlan(k=effective_k(layer_k, shape, m), m=m)
    return plan


@pytest.mark.parametrize(
    "factory,m_3x3,m_1x1,k_fc,megabytes,ratio",
    [
        (resnet18, 9, 4, 2048, 1.54, 29),  # ResNet-18 small blocks
        (resnet18, 18, 4, 2048, 1.03, 43),  # ResNet-18 large blocks
        (resnet50, 9, 4, 1024, 5.09, 19),  # ResNet-50 small blocks
        (resnet50, 18, 8, 1024, 3.19, 31),  # ResNet-50 large blocks
    ],
)
def test_reproduces_pqf_published_sizes(factory, m_3x3, m_1x1, k_fc, megabytes, ratio):
    model = factory()
    report = size_report(model.state_dict(), _pqf_plan(model, m_3x3, m_1x1, k_fc))
    assert round(report.megabytes, 2) == megabytes
    assert round(report.ratio) == ratio
    # The baseline is every parameter at fp32 (torchvision: 11,689,512 and 25,557,032 parameters).
    assert report.uncompressed_bits == 32 * sum(p.numel() for p in model.parameters())


def _toy_model():
    return make_toy_cnn((8, 16), seed=0)  # the shared toy model (conftest)


TOY_PLAN = {"3.weight": LayerPlan(k=16, m=9, d_tilde=4), "8.weight": LayerPlan(k=8, m=4)}
# By hand: parameters 224 (conv0) + 16 (bn1) + 1168 (conv3) + 32 (bn4) + 170 (fc) = 1610, at 32 bits.
TOY_UNCOMPRESSED = 1610 * 32
# conv0 224·32 + bn1 2·8·32 + conv3 [128 codes·4 + 16·4·16 + 4·9·16] + its bias 16·32 + bn4 2·16·32
# + fc [40 codes·3 + 8·4·16] + its bias 10·32
TOY_COMPRESSED = 7168 + 512 + (512 + 1024 + 576) + 512 + 1024 + (120 + 512) + 320


def test_toy_model_by_hand():
    model = _toy_model()
    report = size_report(model, TOY_PLAN)
    assert report.uncompressed_bits == TOY_UNCOMPRESSED
    assert report.compressed_bits == TOY_COMPRESSED
    assert report.ratio == pytest.approx(TOY_UNCOMPRESSED / TOY_COMPRESSED)
    assert report.megabytes == TOY_COMPRESSED / 8 / 2**20
    frame = report.to_frame().set_index("name")
    assert list(frame.index) == ["0.weight", "0.bias", "1", "3.weight", "3.bias", "4", "8.weight", "8.bias"]
    assert frame.loc["3.weight", ["codes_bits", "codebook_bits", "projection_bits"]].tolist() == [512, 1024, 576]
    assert frame.loc["8.weight", "projection_bits"] == 0 and frame.loc["1", "kind"] == "batchnorm"
    assert frame.loc["1", "compressed_bits"] == 2 * 8 * 32
    assert frame["compressed_bits"].sum() == TOY_COMPRESSED


def test_compressed_model_reports_the_same_size_in_every_state():
    model = _toy_model()
    cmodel = compress(model, TOY_PLAN)
    assert size_report(cmodel).compressed_bits == TOY_COMPRESSED
    cmodel.quantize(seed=0)
    report = size_report(cmodel)
    assert (report.uncompressed_bits, report.compressed_bits) == (TOY_UNCOMPRESSED, TOY_COMPRESSED)


def test_numpy_state_dict_and_non_power_of_two_k():
    state = {"w": np.zeros((4, 6), np.float32), "position_ids": np.arange(4)}  # integer buffers are not counted
    report = size_report(state, {"w": LayerPlan(k=3, m=2)})
    assert report.compressed_bits == pytest.approx(12 * math.log2(3) + 3 * 2 * 16)
    assert report.uncompressed_bits == 24 * 32


def test_no_plan_means_uncompressed():
    report = size_report(_toy_model())
    assert report.compressed_bits == report.uncompressed_bits and report.ratio == 1.0


@pytest.mark.parametrize(
    "plan,match",
    [
        ({"9.weight": LayerPlan(k=4, m=4)}, r"'9\.weight'.*not in the state_dict.*'0\.weight'"),
        ({"8.weight": LayerPlan(k=4, m=3)}, r"'8\.weight'.*m=3 does not divide the row length 16"),
        ({"8.weight": LayerPlan(k=64, m=4)}, r"'8\.weight'.*k=64 is too large for 40 subvectors"),
        ({"8.weight": (4, 4)}, r"expected a LayerPlan"),
    ],
)
def test_bad_plans(plan, match):
    with pytest.raises(InvalidParameterError, match=match):
        size_report(_toy_model(), plan)


def test_bad_inputs():
    with pytest.raises(InvalidParameterError, match="carries its plan"):
        size_report(compress(_toy_model(), TOY_PLAN), TOY_PLAN)
    with pytest.raises(InvalidParameterError, match="state_dict mapping"):
        size_report([1, 2, 3])
    with pytest.raises(InvalidParameterError, match="not a tensor"):
        size_report({"w": 3.0})


def test_bf16_source_ratio_is_stated_against_its_dtype_and_fp32():
    """Hand-computed: a bf16 Linear(64 → 64) with bias, PQ at k = 16, m = 4."""
    import torch

    state = {"fc.weight": torch.zeros(64, 64, dtype=torch.bfloat16), "fc.bias": torch.zeros(64, dtype=torch.bfloat16)}
    report = size_report(state, {"fc.weight": LayerPlan(k=16, m=4)})
    # source: 4160 values · 16 bits; compressed: codes 1024 · 4 + codebook 16·4·16 + bias 64 · 16 (kept in bf16)
    assert report.source_bits == 4160 * 16 == 66560
    assert report.compressed_bits == 1024 * 4 + 16 * 4 * 16 + 64 * 16 == 6144
    assert report.ratio_vs_source == pytest.approx(66560 / 6144)  # 10.83×, not the fp32 21.67×
    assert report.ratio == pytest.approx(4160 * 32 / 6144)
    assert report.source_dtype == "16-bit"
    assert "vs the 16-bit source" in str(report) and "vs fp32" in str(report)
    # the same shapes declared bf16 while stored as fp32 give the same numbers
    fp32 = {key: value.float() for key, value in state.items()}
    declared = size_report(fp32, {"fc.weight": LayerPlan(k=16, m=4)}, source_dtype="bf16")
    assert (declared.source_bits, declared.compressed_bits) == (66560, 6144)
    plain = size_report(fp32, {"fc.weight": LayerPlan(k=16, m=4)})
    assert plain.ratio_vs_source == plain.ratio and plain.compressed_bits == 6144 + 64 * 16
    with pytest.raises(InvalidParameterError, match="source_dtype='int3' is invalid"):
        size_report(fp32, source_dtype="int3")
