"""LayerPlan validation and PQF's k cap, against hand-computed values."""

import pytest

from lr2vq_analysis._validation import InvalidParameterError, check_rho
from lr2vq_analysis.plan import LayerPlan, effective_k


def test_defaults_and_round_trip():
    plan = LayerPlan(k=256, m=9)
    assert plan.d_tilde == 9 and plan.is_pq
    lr = LayerPlan(k=256, m=9, d_tilde=4)
    assert not lr.is_pq
    assert LayerPlan.from_dict(lr.to_dict()) == lr


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"k": 1, "m": 9}, "k must be an integer >= 2"),
        ({"k": 256, "m": 0}, "positive integer"),
        ({"k": 256, "m": 9, "d_tilde": 10}, r"1\.\.9"),
        ({"k": 256, "m": 9, "d_tilde": 0}, r"1\.\.9"),
        ({"k": 2.5, "m": 9}, "k must be an integer"),
    ],
)
def test_invalid_plans(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        LayerPlan(**kwargs)


def test_from_dict_missing_key():
    with pytest.raises(InvalidParameterError, match="d_tilde"):
        LayerPlan.from_dict({"k": 4, "m": 2})


def test_effective_k_is_pqf_cap():
    # ResNet-18 layer1 conv: 64 filters × 64 kernels = 4096 subvectors at m=9 → cap 1024 → k stays 256.
    assert effective_k(256, (64, 64, 3, 3), 9) == 256
    # 16 × 8 = 128 subvectors → 128/4 = 32.
    assert effective_k(256, (16, 8, 3, 3), 9) == 32
    # 100 subvectors → 25 → largest power of two 16.
    assert effective_k(256, (10, 90), 9) == 16


@pytest.mark.parametrize("rho", [0, -0.1, 1.5, float("nan"), "x"])
def test_rho_range(rho):
    with pytest.raises(InvalidParameterError, match=r"\(0, 1\]"):
        check_rho(rho)
