"""Compressed layers and compress(), checked against independent references (numpy SVD, brute-force nearest
centroids, the dense torch layers) and for every bad-input rule."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lr2vq_analysis.exceptions import InvalidParameterError, InvalidWeightsError, StateError
from lr2vq_analysis.nn import (
    CompressedModel,
    DKMConfig,
    LR2VQConv1d,
    LR2VQConv2d,
    LR2VQLinear,
    compress,
    compressible_layers,
)
from lr2vq_analysis.plan import LayerPlan

DENSE_AND_COMPRESSED = [
    (lambda: nn.Linear(24, 10), LR2VQLinear, (5, 24), 4),
    (lambda: nn.Conv1d(6, 10, 3, stride=2, padding=2, dilation=2), LR2VQConv1d, (2, 6, 17), 6),
    (lambda: nn.Conv2d(4, 12, 3, stride=1, padding=1), LR2VQConv2d, (2, 4, 7, 7), 9),
    (lambda: nn.Conv2d(4, 12, 3, padding=1, padding_mode="reflect", bias=False), LR2VQConv2d, (2, 4, 6, 6), 9),
]


def _dense(factory, seed=0):
    torch.manual_seed(seed)
    return factory()


def _rank_truncated(weight: torch.Tensor, m: int, d: int) -> np.ndarray:
    """Best rank-d approximation of the (n × m) subvector matrix by numpy's SVD, in the weight's shape."""
    x = weight.detach().double().numpy().reshape(-1, m)  # PQF layout: rows of (C_out, row_length) cut into runs of m
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    return ((u[:, :d] * s[:d]) @ vt[:d]).reshape(weight.shape)


@pytest.mark.parametrize("factory,compressed_type,input_shape,m", DENSE_AND_COMPRESSED)
@pytest.mark.parametrize("d_tilde", [1, 2])
def test_lowrank_init_is_the_svd_truncation(factory, compressed_type, input_shape, m, d_tilde):
    dense = _dense(factory)
    layer = compressed_type.from_dense(dense, LayerPlan(k=4, m=m, d_tilde=d_tilde))
    assert layer.state == "lowrank" and layer.Z.shape == (dense.weight.numel() // m, d_tilde)
    np.testing.assert_allclose(
        layer.weight.detach().double().numpy(), _rank_truncated(dense.weight, m, d_tilde), atol=1e-6
    )
    # P has orthonormal rows, so Z = X·Pᵀ.
    p = layer.P.detach().double()
    np.testing.assert_allclose((p @ p.T).numpy(), np.eye(d_tilde), atol=1e-6)


@pytest.mark.parametrize("factory,compressed_type,input_shape,m", DENSE_AND_COMPRESSED)
def test_pq_lowrank_forward_equals_dense_layer(factory, compressed_type, input_shape, m):
    dense = _dense(factory)
    layer = compressed_type.from_dense(dense, LayerPlan(k=4, m=m))  # d̃ = m: PQ, no projection
    assert layer.P is None
    x = torch.randn(input_shape)
    assert torch.equal(layer(x), dense(x))


@pytest.mark.parametrize("factory,compressed_type,input_shape,m", DENSE_AND_COMPRESSED)
def test_lowrank_forward_uses_truncated_weight(factory, compressed_type, input_shape, m):
    dense = _dense(factory)
    layer = compressed_type.from_dense(dense, LayerPlan(k=4, m=m, d_tilde=2))
    reference = copy.deepcopy(dense)
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(_rank_truncated(dense.weight, m, 2)))
    x = torch.randn(input_shape)
    torch.testing.assert_close(layer(x), reference(x), atol=1e-5, rtol=1e-5)


def _quantized_layer(d_tilde=3, k=8, m=9, seed=0):
    dense = _dense(lambda: nn.Conv2d(8, 16, 3, padding=1), seed)
    layer = LR2VQConv2d.from_dense(dense, LayerPlan(k=k, m=m, d_tilde=d_tilde))
    z = layer.Z.detach().clone()
    layer.quantize(seed=0)
    return dense, layer, z


@pytest.mark.parametrize("d_tilde", [3, 9])
def test_quantized_weight_is_codebook_of_codes_times_p(d_tilde):
    _, layer, _ = _quantized_layer(d_tilde=d_tilde)
    assert layer.state == "quantized" and layer.Z is None
    codes = layer.codes.numpy()
    codebook = layer.codebook.detach().double().numpy()
    rows = codebook[codes] if layer.P is None else codebook[codes] @ layer.P.detach().double().numpy()
    np.testing.assert_allclose(layer.weight.detach().double().numpy(), rows.reshape(16, 8, 3, 3), atol=1e-6)
    assert "codes" in dict(layer.named_buffers()) and "codes" not in dict(layer.named_parameters())


@pytest.mark.parametrize("d_tilde", [2, 9])
def test_codes_are_the_nearest_centroids(d_tilde):
    _, layer, z = _quantized_layer(d_tilde=d_tilde)
    codebook = layer.codebook.detach().double().numpy()
    distances = ((z.double().numpy()[:, None, :] - codebook[None]) ** 2).sum(-1)  # brute force, n × k
    np.testing.assert_array_equal(layer.codes.numpy(), distances.argmin(1))
    # Codebook and projection are fp16-representable (what the file stores).
    for tensor in (layer.codebook, layer.P):
        if tensor is not None:
            assert torch.equal(tensor.detach().half().float(), tensor.detach())


def test_quantized_error_is_lowrank_plus_clustering_error():
    # P has orthonormal rows, so ‖W − Ŵ‖² = ‖X − Z·P‖² + ‖Z − C[codes]‖² (up to P's fp16 rounding).
    dense, layer, z = _quantized_layer(d_tilde=3)
    x = dense.weight.detach().double().numpy().reshape(-1, 9)
    lowrank = np.sum((x - _rank_truncated(dense.weight, 9, 3).reshape(-1, 9)) ** 2)
    clustering = np.sum((z.double().numpy() - layer.codebook.detach().double().numpy()[layer.codes.numpy()]) ** 2)
    total = np.sum((dense.weight.detach().double().numpy() - layer.weight.detach().double().numpy()) ** 2)
    assert total == pytest.approx(lowrank + clustering, rel=1e-3)


def test_scalar_kmeans_m1():
    dense = _dense(lambda: nn.Linear(16, 8))
    layer = LR2VQLinear.from_dense(dense, LayerPlan(k=4, m=1)).quantize(seed=0)
    assert layer.codebook.shape == (4, 1) and layer.codes.shape == (128,)
    assert len(torch.unique(layer.weight.detach())) <= 4


def test_gradients_reach_the_trainable_tensors():
    dense = _dense(lambda: nn.Conv2d(8, 16, 3))
    layer = LR2VQConv2d.from_dense(dense, LayerPlan(k=8, m=9, d_tilde=3))
    layer(torch.randn(2, 8, 5, 5)).square().sum().backward()
    assert layer.Z.grad is not None and layer.P.grad is not None and layer.bias.grad is not None
    layer.quantize(seed=0)
    layer(torch.randn(2, 8, 5, 5)).square().sum().backward()
    assert {name for name, _ in layer.named_parameters()} == {"codebook", "P", "bias"}
    assert layer.codebook.grad is not None and layer.P.grad is not None


def test_dkm_soft_assignment_follows_the_weights_and_hardens():
    dense = _dense(lambda: nn.Linear(32, 16))
    for d_tilde in (2, 4):  # LR²VQ's Z and vanilla DKM (PQ)
        cmodel = compress(
            nn.Sequential(dense),
            {"0.weight": LayerPlan(k=8, m=4, d_tilde=d_tilde)},
            method="dkm",
            dkm=DKMConfig(tau=1e-6),
        )
        layer = cmodel.compressed_layers()["0.weight"]
        assert layer.state == "dkm"
        # With a tiny temperature the soft mixture is the nearest centroid (brute force).
        z = layer.Z.detach().double().numpy()
        centroids = layer.dkm_centroids.double().numpy()
        layer.eval()  # no centroid update, so the reference centroids stay valid
        nearest = ((z[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
        projection = np.eye(4) if layer.P is None else layer.P.detach().double().numpy()
        expected = (centroids[nearest] @ projection).reshape(16, 32)
        np.testing.assert_allclose(layer.weight.detach().double().numpy(), expected, atol=1e-5)
        # Moving one subvector onto another centroid re-assigns it.
        target = (nearest[0] + 1) % 8
        with torch.no_grad():
            layer.Z[0] = layer.dkm_centroids[target]
        assert int(layer.hard_codes()[0]) == target
        # Gradients reach Z through the soft assignment; quantize() makes it hard.
        layer.train()
        layer(torch.randn(3, 32)).sum().backward()
        assert layer.Z.grad is not None and torch.isfinite(layer.Z.grad).all()
        cmodel.quantize()
        assert layer.state == "quantized" and int(layer.codes[0]) == target


def test_dkm_with_large_temperature_averages_everything():
    # Uniform attention: one soft update moves every centroid to the mean subvector, and every row becomes it.
    dense = _dense(lambda: nn.Linear(32, 16))
    cmodel = compress(
        nn.Sequential(dense), {"0.weight": LayerPlan(k=8, m=4)}, method="dkm", dkm=DKMConfig(tau=1e6, soft_iter=1)
    )
    layer = cmodel.compressed_layers()["0.weight"].eval()
    mean_subvector = dense.weight.detach().reshape(-1, 4).mean(0)
    rows = layer.weight.detach().reshape(-1, 4)
    torch.testing.assert_close(rows, mean_subvector.expand_as(rows), atol=1e-6, rtol=1e-5)


def _toy_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def test_compress_replaces_planned_layers_only_and_copies():
    model = _toy_model().eval()
    original = copy.deepcopy(model.state_dict())
    plan = {"8.weight": LayerPlan(k=8, m=4), "3.weight": LayerPlan(k=16, m=9, d_tilde=4)}
    cmodel = compress(model, plan)
    assert isinstance(cmodel, CompressedModel) and not cmodel.training
    assert list(cmodel.compressed_layers()) == ["3.weight", "8.weight"]  # model order
    assert cmodel.plan == plan and cmodel.state == "lowrank"
    assert isinstance(cmodel.module[3], LR2VQConv2d) and isinstance(cmodel.module[8], LR2VQLinear)
    assert isinstance(cmodel.module[0], nn.Conv2d)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(cmodel(x), cmodel.module(x))
    assert all(torch.equal(original[key], value) for key, value in model.state_dict().items())
    cmodel.quantize(seed=0)
    assert cmodel.state == "quantized"
    text = repr(cmodel.module[3])
    for token in ("k=16", "m=9", "d_tilde=4", "state=quantized", "bits="):
        assert token in text


def test_same_seed_same_codes():
    model = _toy_model()
    plan = {"3.weight": LayerPlan(k=16, m=9, d_tilde=4)}
    first, second = compress(model, plan).quantize(seed=3), compress(model, plan).quantize(seed=3)
    assert torch.equal(first.module[3].codes, second.module[3].codes)
    second.load_state_dict(first.state_dict())


def test_whole_model_can_be_a_single_layer():
    dense = _dense(lambda: nn.Linear(8, 4))
    cmodel = compress(dense, {"weight": LayerPlan(k=4, m=4)})
    x = torch.randn(2, 8)
    assert torch.equal(cmodel(x), dense(x)) and list(cmodel.compressed_layers()) == ["weight"]


def test_compressible_layers_skips_grouped_convs():
    assert list(compressible_layers(_toy_model())) == ["0.weight", "3.weight", "8.weight"]


@pytest.mark.parametrize(
    "plan,error,match",
    [
        (
            {"missing.weight": LayerPlan(k=4, m=4)},
            InvalidParameterError,
            r"'missing\.weight'.*'0\.weight', '3\.weight'",
        ),
        ({"8": LayerPlan(k=4, m=4)}, InvalidParameterError, r"did you mean '8\.weight'"),
        ({"5.weight": LayerPlan(k=4, m=9)}, InvalidParameterError, r"grouped/depthwise.*groups=4"),
        (
            {"8.weight": LayerPlan(k=4, m=3)},
            InvalidParameterError,
            r"'8\.weight'.*m=3 does not divide the row length 16",
        ),
        (
            {"8.weight": LayerPlan(k=40, m=4)},
            InvalidParameterError,
            r"'8\.weight'.*k=40 is too large for 40 subvectors",
        ),
        ({"8.weight": {"k": 4, "m": 4, "d_tilde": 5}}, InvalidParameterError, r"d_tilde=5.*1\.\.4"),
        ({"8.weight": (4, 4)}, InvalidParameterError, r"expected a LayerPlan"),
        ({}, InvalidParameterError, r"plan is empty.*'0\.weight'"),
        ([("8.weight", LayerPlan(k=4, m=4))], InvalidParameterError, r"mapping"),
    ],
)
def test_bad_plans(plan, error, match):
    with pytest.raises(error, match=match):
        compress(_toy_model(), plan)


def test_d_tilde_larger_than_m_is_rejected_by_the_plan():
    with pytest.raises(InvalidParameterError, match=r"d_tilde=10.*1\.\.9"):
        LayerPlan(k=16, m=9, d_tilde=10)


def test_model_without_compressible_layer():
    with pytest.raises(InvalidWeightsError, match="no compressible layer"):
        compress(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(4)), {"0.weight": LayerPlan(k=4, m=4)})


def test_non_finite_weight():
    model = _toy_model()
    with torch.no_grad():
        model[8].weight[0, 0] = float("nan")
    with pytest.raises(InvalidWeightsError, match=r"'8\.weight'.*NaN"):
        compress(model, {"8.weight": LayerPlan(k=4, m=4)})


def test_bad_method_and_options():
    plan = {"8.weight": LayerPlan(k=4, m=4)}
    with pytest.raises(InvalidParameterError, match=r"method='pq'.*\('lr2vq', 'dkm'\)"):
        compress(_toy_model(), plan, method="pq")
    with pytest.raises(InvalidParameterError, match=r"only accepted with method='dkm'"):
        compress(_toy_model(), plan, dkm=DKMConfig(tau=0.1))
    with pytest.raises(InvalidParameterError, match=r"expected a DKMConfig"):
        compress(_toy_model(), plan, method="dkm", dkm={"tau": 0.1})  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match=r"seed"):
        compress(_toy_model(), plan, seed=-1)


def test_state_transitions_are_checked():
    cmodel = compress(_toy_model(), {"8.weight": LayerPlan(k=4, m=4)}).quantize()
    with pytest.raises(StateError, match=r"'8\.weight'.*cannot quantize in state 'quantized'.*'dkm', 'lowrank'"):
        cmodel.quantize()
    with pytest.raises(StateError, match=r"cannot start dkm in state 'quantized'.*\('lowrank',\)"):
        cmodel.start_dkm()
    layer = cmodel.compressed_layers()["8.weight"]
    layer.init_from_weight(torch.randn(10, 16))  # back to the low-rank state from any state
    assert layer.state == "lowrank" and layer.codes is None and layer.codebook is None
    with pytest.raises(StateError, match=r"cannot read codes in state 'lowrank'"):
        layer.hard_codes()
    # A state error is neither a usage error (CLI exit 2) nor an InvalidParameterError.
    assert not issubclass(StateError, InvalidParameterError)


def test_grouped_conv_layer_constructor_is_rejected():
    with pytest.raises(InvalidParameterError, match="groups=2"):
        LR2VQConv2d(4, 4, 3, groups=2, plan=LayerPlan(k=4, m=9))


def test_set_quantized_checks_shapes():
    layer = LR2VQLinear(8, 4, plan=LayerPlan(k=4, m=4, d_tilde=2))
    with pytest.raises(InvalidParameterError, match=r"codes must lie in 0\.\.3"):
        layer.set_quantized(torch.tensor([0, 1, 2, 4, 0, 0, 0, 0]), torch.zeros(4, 2), torch.zeros(2, 4))
    with pytest.raises(InvalidParameterError, match=r"codebook must have shape \(4, 2\)"):
        layer.set_quantized(torch.zeros(8, dtype=torch.long), torch.zeros(4, 3), torch.zeros(2, 4))
    with pytest.raises(InvalidParameterError, match=r"projection must be \(2, 4\)"):
        layer.set_quantized(torch.zeros(8, dtype=torch.long), torch.zeros(4, 2), None)


def test_device_follows_the_model():
    dense = _dense(lambda: nn.Linear(8, 4)).to(torch.float64)
    layer = LR2VQLinear.from_dense(dense, LayerPlan(k=4, m=4, d_tilde=2))
    assert layer.Z.dtype == torch.float64 and layer.Z.device == dense.weight.device
    x = torch.randn(2, 8, dtype=torch.float64)
    assert layer.quantize()(x).dtype == torch.float64
    assert F.linear(x, layer.weight, layer.bias).shape == (2, 4)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"tau": 0}, r"tau=0 .*> 0"),
        ({"tau": float("nan")}, r"tau=nan"),
        ({"tau": True}, r"tau=True"),
        ({"soft_iter": 0}, r"soft_iter=0"),
        ({"soft_iter": 2.5}, r"soft_iter=2\.5"),
        ({"epsilon": -1e-3}, r"epsilon=-0\.001"),
        ({"kmeans": {"max_iter": 5}}, r"kmeans=.*KMeansConfig"),
    ],
)
def test_dkm_config_is_validated_at_construction(options, match):
    with pytest.raises(InvalidParameterError, match=match):
        DKMConfig(**options)


def test_dkm_iterations_and_initial_kmeans_are_set_separately(monkeypatch):
    import lr2vq_analysis.nn as nn_module
    from lr2vq_analysis.kmeans import QUANTIZE_KMEANS, KMeansConfig

    calls = []
    real_kmeans = nn_module.kmeans

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_kmeans(*args, **kwargs)

    monkeypatch.setattr(nn_module, "kmeans", spy)
    initial = KMeansConfig(max_iter=7, max_points_per_centroid=5)
    config = DKMConfig(soft_iter=1, kmeans=initial)
    cmodel = compress(_toy_model(), {"8.weight": LayerPlan(k=4, m=4)}, method="dkm", dkm=config, seed=3)
    assert [(c["config"], c["seed"]) for c in calls] == [(initial, 3)]
    assert cmodel.compressed_layers()["8.weight"].dkm_config.soft_iter == 1
    calls.clear()
    compress(_toy_model(), {"8.weight": LayerPlan(k=4, m=4)}, method="dkm")  # default: quantize's k-means
    assert calls[0]["config"] == QUANTIZE_KMEANS


def _lowrank_layer() -> LR2VQLinear:
    torch.manual_seed(0)
    return LR2VQLinear.from_dense(nn.Linear(64, 64), LayerPlan(k=16, m=4, d_tilde=4))  # 1,024 rows of Z


def _quantized_distortion(**quantize_options) -> float:
    """Mean squared distance of Z's rows to their code's centroid after quantize, by brute force."""
    layer = _lowrank_layer()
    z = layer.Z.detach().double().clone()
    layer.quantize(seed=0, **quantize_options)
    return float(((z - layer.codebook.detach().double()[layer.codes.long()]) ** 2).sum(dim=1).mean())


def test_quantize_takes_a_kmeans_config():
    import dataclasses
    import warnings

    from lr2vq_analysis.kmeans import QUANTIZE_KMEANS

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the documented way warns about nothing
        one = _quantized_distortion(config=dataclasses.replace(QUANTIZE_KMEANS, max_iter=1))
        many = _quantized_distortion(config=dataclasses.replace(QUANTIZE_KMEANS, max_iter=50))
        default = _quantized_distortion()
    # Lloyd iterations from the same seeded start never raise the distortion: the config reaches k-means.
    assert many < one and default < one
    with pytest.raises(InvalidParameterError, match=r"config=.*KMeansConfig"):
        _lowrank_layer().quantize(config={"max_iter": 5})  # type: ignore[arg-type]


def test_quantize_keyword_options_are_deprecated_but_still_work():
    import dataclasses

    from lr2vq_analysis.kmeans import QUANTIZE_KMEANS

    with pytest.warns(DeprecationWarning, match=r"quantize\(max_iter=\.\.\.\) is deprecated.*config=") as caught:
        old = _lowrank_layer().quantize(seed=0, max_iter=1)
    assert caught[0].filename == __file__  # the warning points at the caller
    new = _lowrank_layer().quantize(seed=0, config=dataclasses.replace(QUANTIZE_KMEANS, max_iter=1))
    torch.testing.assert_close(old.codebook, new.codebook, rtol=0, atol=0)
    torch.testing.assert_close(old.codes, new.codes, rtol=0, atol=0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    plan = {"0.weight": LayerPlan(k=4, m=4, d_tilde=2), "2.weight": LayerPlan(k=4, m=4, d_tilde=2)}
    with pytest.warns(DeprecationWarning) as caught:
        compress(model, plan).quantize(seed=0, max_points_per_centroid=8)
    assert len(caught) == 1 and caught[0].filename == __file__  # once per model, not once per layer
    with pytest.raises(InvalidParameterError, match=r"unknown option\(s\) \['n_init'\]"):
        compress(model, plan).quantize(n_init=3)
