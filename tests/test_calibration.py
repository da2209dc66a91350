"""Output-space errors against brute force: H by explicit patch loops, tr(ΔW H ΔWᵀ) formed directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lr2vq_analysis import InvalidParameterError
from lr2vq_analysis.calibration import (
    activation_aware_projection,
    block_metric,
    collect_second_moments,
    lowrank_output_curve,
    output_error,
)
from lr2vq_analysis.kmeans import kmeans
from lr2vq_analysis.report import Report, analyze
from lr2vq_analysis.spectrum import compute_spectrum
from lr2vq_analysis.tradeoff import (
    FLAT_MESSAGE,
    TradeoffModel,
    fit_tradeoff,
    global_d_tilde,
    with_output_curves,
)


def explicit_h_conv2d(x: np.ndarray, conv: nn.Conv2d) -> np.ndarray:
    """E[x xᵀ] per group by looping over every output position (zero padding)."""
    kh, kw = conv.kernel_size
    (ph, pw), (sh, sw), (dh, dw), g = conv.padding, conv.stride, conv.dilation, conv.groups
    n, c, hh, ww = x.shape
    padded = np.zeros((n, c, hh + 2 * ph, ww + 2 * pw))
    padded[:, :, ph : ph + hh, pw : pw + ww] = x
    out_h = (hh + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (ww + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    per = c // g
    sums = np.zeros((g, per * kh * kw, per * kh * kw))
    count = 0
    for i in range(n):
        for oy in range(out_h):
            for ox in range(out_w):
                patch = padded[
                    i, :, oy * sh : oy * sh + dh * (kh - 1) + 1 : dh, ox * sw : ox * sw + dw * (kw - 1) + 1 : dw
                ]
                for j in range(g):
                    v = patch[j * per : (j + 1) * per].reshape(-1)
                    sums[j] += np.outer(v, v)
                count += 1
    return sums / count


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 3, padding=1, stride=2),
        nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False),
        nn.Conv2d(4, 4, 3, padding=1, groups=4),  # depthwise
        nn.Conv2d(4, 8, 1),  # pointwise
    ],
)
def test_hooks_match_explicit_patch_loop_conv2d(conv: nn.Conv2d) -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 4, 7, 6)
    net = nn.Sequential(conv)
    (moment,) = collect_second_moments(net, [x[:2], x[2:]])  # two batches: streaming accumulation
    assert moment.name == "0.weight" and moment.groups == conv.groups
    np.testing.assert_allclose(moment.matrix, explicit_h_conv2d(x.double().numpy(), conv), rtol=1e-10, atol=1e-12)


def test_hooks_match_explicit_loop_conv1d_and_linear_and_group_passes() -> None:
    torch.manual_seed(1)
    conv = nn.Conv1d(3, 4, 3, padding=1, bias=False)
    lin = nn.Linear(4 * 5, 2)
    net = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), lin)
    x = torch.randn(9, 3, 5)
    # max_bytes forces one pass per layer; a DataLoader-like list of (inputs, targets) pairs.
    batches = [(x[:4], None), (x[4:], None)]
    moments = {h.name: h for h in collect_second_moments(net, batches, max_bytes=1)}
    padded = np.pad(x.double().numpy(), ((0, 0), (0, 0), (1, 1)))
    patches = np.stack([padded[i, :, p : p + 3].reshape(-1) for i in range(9) for p in range(5)])
    np.testing.assert_allclose(moments["0.weight"].matrix[0], patches.T @ patches / len(patches), rtol=1e-10)
    hidden = torch.relu(conv(x)).flatten(1).detach().double().numpy()
    np.testing.assert_allclose(moments["3.weight"].matrix[0], hidden.T @ hidden / 9, rtol=1e-9)
    assert moments["3.weight"].n_vectors == 9


def random_layer(rng: np.random.Generator, rows: int = 12, length: int = 18, groups: int = 1):
    w = rng.normal(size=(rows, length)) * np.linspace(2.0, 0.3, length)
    a = rng.normal(size=(groups, length, length))
    h = a @ a.transpose(0, 2, 1) / length + 0.1 * np.eye(length)
    return w, h


def brute_force_output_error(w: np.ndarray, approx: np.ndarray, h: np.ndarray) -> float:
    groups = h.shape[0]
    wg, ag = w.reshape(groups, -1, w.shape[1]), approx.reshape(groups, -1, w.shape[1])
    num = sum(np.trace((wg[g] - ag[g]) @ h[g] @ (wg[g] - ag[g]).T) for g in range(groups))
    return float(num / sum(np.trace(wg[g] @ h[g] @ wg[g].T) for g in range(groups)))


@pytest.mark.parametrize("groups", [1, 3])
def test_lowrank_output_curve_is_exact(groups: int) -> None:
    rng = np.random.default_rng(2)
    m = 6
    w, h = random_layer(rng, rows=12, length=18, groups=groups)
    spectrum = compute_spectrum(w.reshape(-1, m))
    curve = lowrank_output_curve(w, h, spectrum.eigenvectors)
    for d in range(1, m + 1):
        v = spectrum.eigenvectors[:, :d]
        approx = (w.reshape(-1, m) @ v @ v.T).reshape(w.shape)
        assert curve[d - 1] == pytest.approx(brute_force_output_error(w, approx, h), rel=1e-9, abs=1e-12)
        assert output_error(w, approx, h) == pytest.approx(brute_force_output_error(w, approx, h), rel=1e-12)
    assert curve[-1] == pytest.approx(0.0, abs=1e-12)


def test_identity_metric_gives_the_weight_space_curve() -> None:
    rng = np.random.default_rng(3)
    w = rng.normal(size=(10, 12))
    spectrum = compute_spectrum(w.reshape(-1, 4))
    np.testing.assert_allclose(lowrank_output_curve(w, np.eye(12), spectrum.eigenvectors), spectrum.lowrank_error())


def test_activation_aware_projection_is_optimal_for_a_block_metric() -> None:
    rng = np.random.default_rng(4)
    m, d = 4, 2
    w = rng.normal(size=(40, 3 * m)) * rng.uniform(0.2, 2.0, size=3 * m)
    b = rng.normal(size=(m, m))
    hbar = b @ b.T + 0.2 * np.eye(m)
    h = np.kron(np.eye(3), hbar)  # every position sees the same block, no cross terms
    np.testing.assert_allclose(block_metric(h, m), hbar)
    x = w.reshape(-1, m)

    def error_with_best_z(p: np.ndarray) -> float:
        # Z by H̄-weighted least squares, then tr(ΔW H ΔWᵀ) formed directly.
        z = x @ hbar @ p.T @ np.linalg.inv(p @ hbar @ p.T)
        return brute_force_output_error(w, (z @ p).reshape(w.shape), h[None])

    p = activation_aware_projection(w, h, m, d)
    np.testing.assert_allclose(p @ p.T, np.eye(d), atol=1e-10)
    best = error_with_best_z(p)
    # Closed form: the smallest m − d eigenvalues of H̄^{1/2} XᵀX H̄^{1/2}, over tr(W H Wᵀ).
    values, vectors = np.linalg.eigh(hbar)
    root = vectors @ np.diag(np.sqrt(values)) @ vectors.T
    tail = np.sort(np.linalg.eigvalsh(root @ x.T @ x @ root))[: m - d].sum()
    assert best == pytest.approx(tail / np.trace(w @ h @ w.T), rel=1e-8)
    pca = compute_spectrum(x).projection(d)
    assert best <= error_with_best_z(pca) + 1e-12
    for _ in range(50):
        q = np.linalg.qr(rng.normal(size=(m, d)))[0].T
        assert best <= error_with_best_z(q) + 1e-12


def test_modelled_output_clustering_tracks_brute_force_kmeans() -> None:
    rng = np.random.default_rng(5)
    m, cout, cin = 9, 48, 12
    basis = np.linalg.qr(rng.normal(size=(m, m)))[0]
    w = ((rng.laplace(size=(cout * cin, m)) * 0.7 ** np.arange(m)) @ basis.T).reshape(cout, cin, 3, 3)
    # Smooth inputs: correlated within a 3×3 patch, independent across channels.
    grid = np.array([(i, j) for i in range(3) for j in range(3)])
    within = np.exp(-((grid[:, None] - grid[None]) ** 2).sum(-1) / 2.0)
    h = np.kron(np.diag(rng.uniform(0.5, 2.0, size=cin)), within)[None] + 0.05 * np.eye(cin * m)
    model = with_output_curves(fit_tradeoff(w, 32, m, seed=0), w, h, seed=0)
    x = w.reshape(-1, m)
    spectrum = compute_spectrum(x)
    for d in range(2, m + 1):
        z = spectrum.project(x, d)
        result = kmeans(torch.tensor(z, dtype=torch.float32), 32, seed=0)
        residual = z - result.centroids.double().numpy()[result.labels.numpy()]
        approx = w.reshape(-1, m) - residual @ spectrum.projection(d)
        measured = brute_force_output_error(w.reshape(cout, -1), approx.reshape(cout, -1), h)
        assert model.clustering_output(d) == pytest.approx(measured, rel=0.15, abs=0.01)


def make_model(low, clu, rho=0.85, predictor="rho", knee=3, low_out=None, clu_out=None, tolerance=0.05):
    m = len(low)
    return TradeoffModel(
        16,
        m,
        rho,
        eigenvalues=np.full(m, 1.0 / m),
        lowrank_curve=low,
        clustering_curve=clu,
        knee=knee,
        probes={},
        params={},
        n_subvectors=100,
        predictor=predictor,
        lowrank_output_curve=low_out,
        clustering_output_curve=clu_out,
        tolerance=tolerance,
    )


def test_named_rules_against_hand_computation() -> None:
    low = np.array([0.6, 0.4, 0.25, 0.12, 0.05, 0.0])
    clu = np.array([0.02, 0.1, 0.2, 0.28, 0.33, 0.35])
    low_out = np.array([0.3, 0.1, 0.04, 0.02, 0.01, 0.0])
    clu_out = np.array([0.01, 0.05, 0.09, 0.12, 0.13, 0.14])
    model = make_model(low, clu, knee=5, low_out=low_out, clu_out=clu_out)
    # crossing: first d with clu >= low: 0.28 >= 0.12 at d = 4 (0.2 < 0.25 at d = 3)
    # crossing-output: 0.09 >= 0.04 at d = 3 (0.05 < 0.1 at d = 2)
    # rho: 0.85·low + clu = [0.53, 0.44, 0.4125, 0.382, 0.3725, 0.35] → d = 6
    # rho-output: [0.265, 0.135, 0.124, 0.137, 0.1385, 0.14] → d = 3
    expected = {"crossing": 4, "crossing-output": 3, "rho": 6, "rho-output": 3, "half": 3, "knee": 5, "pq": 6}
    assert {rule: model.predict(rule) for rule in expected} == expected
    assert model.with_predictor("rho-output").d_tilde_set_ == [3]  # 0.135 > 1.05·0.124 = 0.1302
    # max(low, clu) = [0.6, 0.4, 0.25, 0.28, 0.33, 0.35]: minimum at d = 3 (0.28 > 1.05·0.25); plus the rule's 4
    assert model.with_predictor("crossing").d_tilde_set_ == [3]
    assert model.with_predictor("crossing").d_tilde_range_ == (3, 4)


def test_range_and_flat_flag() -> None:
    low = np.array([0.2, 0.1, 0.05, 0.0])
    clu = np.array([0.05, 0.14, 0.19, 0.2])  # ρ = 1 totals: 0.25, 0.24, 0.24, 0.2
    model = make_model(low, clu, rho=1.0, tolerance=0.25)
    assert model.d_tilde == 4 and model.d_tilde_set_ == [1, 2, 3, 4] and model.flat_
    assert model.flat_message_ == FLAT_MESSAGE
    tight = make_model(low, clu, rho=1.0, tolerance=0.1)
    assert tight.d_tilde_set_ == [4] and tight.d_tilde_range_ == (4, 4)
    steep = make_model(np.array([0.5, 0.2, 0.1, 0.0]), np.array([0.01, 0.02, 0.3, 0.6]), rho=1.0)
    assert steep.d_tilde == 2 and not steep.flat_ and steep.flat_message_ == ""


def test_output_rule_without_calibration_is_refused() -> None:
    model = make_model(np.array([0.5, 0.0]), np.array([0.1, 0.2]))
    with pytest.raises(InvalidParameterError, match="calibration="):
        model.with_predictor("crossing-output")
    with pytest.raises(InvalidParameterError, match="allowed"):
        model.with_predictor("median")


def test_global_rule_uses_size_weighted_curves() -> None:
    a = make_model(np.array([0.6, 0.3, 0.1, 0.0]), np.array([0.05, 0.2, 0.3, 0.4]), predictor="crossing")
    b = make_model(np.array([0.2, 0.1, 0.05, 0.0]), np.array([0.1, 0.15, 0.2, 0.25]), predictor="crossing")
    # size-weighted (3:1): low = [0.5, 0.25, 0.0875, 0], clu = [0.0625, 0.1875, 0.275, 0.3625] → d = 3
    d, _, _ = global_d_tilde([a, b], [300, 100])
    assert d == 3 and a.d_tilde == 3 and b.d_tilde == 2
    assert global_d_tilde([a, b], [1, 1000])[0] == 2


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)  # the loader leaves grouped convs uncompressed
        self.fc = nn.Linear(16, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(torch.relu(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def test_analyze_with_calibration_end_to_end(tmp_path) -> None:
    torch.manual_seed(0)
    net = TinyNet()
    x = torch.randn(24, 1, 6, 6)
    report = analyze(net, k=8, m=4, progress=False, calibration=x, stability_seeds=1)
    assert [layer.name for layer in report.layers] == ["conv.weight", "fc.weight"]
    layer = report["conv.weight"]
    assert layer.model.predictor == "crossing-output" and layer.model.has_output
    # The exact low-rank curve from an H built by explicit patch loops.
    hidden = torch.relu(net.stem(x)).detach().double().numpy()
    h = explicit_h_conv2d(hidden, net.conv)
    w = net.conv.weight.detach().double().numpy()
    spectrum = compute_spectrum(w.reshape(-1, 4))
    for d in (1, 2, 3):
        v = spectrum.eigenvectors[:, :d]
        approx = (w.reshape(-1, 4) @ v @ v.T).reshape(16, -1)
        assert layer.model.lowrank_output(d) == pytest.approx(brute_force_output_error(w.reshape(16, -1), approx, h))
    frame = report.to_frame()
    assert {"predictor", "d_tilde_range", "flat", "d_tilde_by_seed"} <= set(frame.columns)
    assert len(layer.model.d_tilde_by_seed_) == 2
    path = report.save(tmp_path / "r.json")
    loaded = Report.load(path)
    assert loaded.global_d_tilde == report.global_d_tilde
    np.testing.assert_array_equal(
        loaded["fc.weight"].model.clustering_output_curve_, report["fc.weight"].model.clustering_output_curve_
    )
    with pytest.raises(InvalidParameterError, match="model="):
        analyze(net.state_dict(), k=8, m=4, progress=False, calibration=x)


# --------------------------------------------------------------------------------------------------
# torch.export archives and the command line (--model, --calibration)
# --------------------------------------------------------------------------------------------------


def _two_layer_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A weight file, its torch.export archive (dynamic batch) and calibration inputs as .pt and .npz."""
    folder = tmp_path_factory.mktemp("exported")
    net = _two_layer_net()
    torch.save(net.state_dict(), folder / "net.pt")
    batch = torch.export.Dim("batch")
    program = torch.export.export(net, (torch.randn(4, 16),), dynamic_shapes=({0: batch},))
    torch.export.save(program, folder / "net.pt2")
    torch.manual_seed(1)
    inputs = torch.randn(100, 16) * torch.linspace(2.0, 0.05, 16)  # uneven input energy: H is not ∝ I
    torch.save(inputs, folder / "inputs.pt")
    np.savez(folder / "inputs.npz", a=inputs[:60].numpy(), b=inputs[60:].numpy())
    return folder, net, inputs


def test_exported_model_gives_the_same_second_moments_as_the_module(exported):
    from lr2vq_analysis.calibration import load_exported_model

    folder, net, inputs = exported
    module = load_exported_model(folder / "net.pt2")
    with torch.no_grad():
        assert torch.allclose(module(inputs), net(inputs))
    first = inputs.double().numpy()
    for moment in collect_second_moments(module, inputs, batch_size=32):
        if moment.name == "0.weight":  # H of the first layer, formed directly
            np.testing.assert_allclose(moment.matrix[0], first.T @ first / len(first), rtol=1e-10)
    assert [m.name for m in collect_second_moments(module, inputs)] == ["0.weight", "2.weight"]


def test_cli_analyze_and_plan_with_an_exported_model_use_the_calibrated_rule(exported, tmp_path, capsys):
    from lr2vq_analysis.cli import main
    from lr2vq_analysis.planner import Plan

    folder, net, inputs = exported
    calib = ["--model", str(folder / "net.pt2"), "--calibration", str(folder / "inputs.pt")]
    out = tmp_path / "report"
    argv = ["analyze", str(folder / "net.pt"), "--k", "8", "--m", "4", "--out", str(out), *calib]
    assert main(argv) == 0
    assert "crossing-output" in capsys.readouterr().out
    report = Report.load(out / "report.json")
    assert {layer.model.predictor for layer in report.layers} == {"crossing-output"}
    # the reported output-space low-rank curve of the first layer, against a direct computation
    w = net[0].weight.detach().double().numpy()
    x = w.reshape(-1, 4)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    h = inputs.double().numpy().T @ inputs.double().numpy() / len(inputs)
    expected = []
    for d in range(1, 5):
        delta = (x - x @ vt[:d].T @ vt[:d]).reshape(w.shape)
        expected.append(np.trace(delta @ h @ delta.T) / np.trace(w @ h @ w.T))
    np.testing.assert_allclose(report["0.weight"].model.lowrank_output_curve_, expected, rtol=1e-6, atol=1e-12)

    specs = tmp_path / "specs.json"
    specs.write_text('{"m": 4}')
    plan_dir = tmp_path / "plan"
    npz = [calib[0], calib[1], "--calibration", str(folder / "inputs.npz")]
    argv = ["plan", str(folder / "net.pt"), "--ratio", "4", "--specs", str(specs), "--out", str(plan_dir), "-q", *npz]
    assert main(argv) == 0
    plan = Plan.load(plan_dir / "plan.json")
    assert plan.objective == "output" and plan.size_report().ratio >= 4
    assert "calibrated" in (plan_dir / "report.md").read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "{folder}/net.pt2"], "--calibration is missing"),
        (["--calibration", "{folder}/inputs.pt"], "--model is missing"),
        (["--model", "{folder}/net.pt", "--calibration", "{folder}/inputs.pt"], "(.pt2"),
        (["--model", "{folder}/net.pt2", "--calibration", "{folder}/inputs.csv"], ".npz"),
    ],
)
def test_cli_calibration_usage_errors_exit_2(exported, extra, message, tmp_path, capsys):
    from lr2vq_analysis.cli import main

    folder, _, _ = exported
    extra = [item.format(folder=folder) for item in extra]
    for command in (
        ["analyze", str(folder / "net.pt"), "--out", str(tmp_path / "o")],
        ["plan", str(folder / "net.pt"), "--ratio", "4"],
    ):
        assert main([*command, *extra, "-q"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
