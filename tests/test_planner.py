"""plan_for_size: allocation optimality against brute force, targets, errors, round trips into compress."""

import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

from lr2vq_analysis import analyze, compress
from lr2vq_analysis.exceptions import InvalidParameterError, UnreachableTargetError
from lr2vq_analysis.planner import Option, Plan, allocate, lower_convex_hull, plan_for_size, write_plan_folder
from lr2vq_analysis.report_folder import read_plan
from lr2vq_analysis.size import size_report

CANDIDATES = {"k": [4, 16]}


def _brute_force(layers):
    """Every combination: (total bits, total error)."""
    return [(sum(o.bits for o in combo), sum(o.error for o in combo)) for combo in itertools.product(*layers)]


def _hull_vertices(points):
    """Lower convex hull of the brute-force (bits, min error) frontier, computed independently."""
    best = {}
    for bits, error in points:
        best[bits] = min(error, best.get(bits, np.inf))
    frontier = []
    for bits in sorted(best):
        if not frontier or best[bits] < frontier[-1][1]:
            frontier.append((bits, best[bits]))
    hull = []
    for p in frontier:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


@pytest.mark.parametrize("seed", range(5))
def test_allocation_is_optimal_on_the_hull_and_never_over_budget(seed):
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(3):
        bits = np.sort(rng.integers(1, 60, size=4)).astype(float)
        error = np.sort(rng.uniform(0, 1, size=4))[::-1]
        layers.append([Option(float(b), float(e)) for b, e in zip(bits, error, strict=True)])
    points = _brute_force(layers)

    def optimum(budget):
        return min(e for b, e in points if b <= budget)

    for budget, _ in _hull_vertices(points):
        choice, _ = allocate(layers, budget)
        chosen = [layer[i] for layer, i in zip(layers, choice, strict=True)]
        assert sum(o.bits for o in chosen) <= budget
        assert sum(o.error for o in chosen) == pytest.approx(optimum(budget))
    vertices = _hull_vertices(points)
    for budget in rng.uniform(vertices[0][0], vertices[-1][0] + 5, size=20):
        choice, _ = allocate(layers, budget)
        chosen = [layer[i] for layer, i in zip(layers, choice, strict=True)]
        assert sum(o.bits for o in chosen) <= budget
        below = max(b for b, _ in vertices if b <= budget)
        assert sum(o.error for o in chosen) <= optimum(below) + 1e-12  # at least the Lagrangian solution


def test_lower_convex_hull_drops_dominated_and_concave_points():
    options = [Option(1, 10), Option(2, 9.5), Option(3, 4), Option(4, 8), Option(5, 3.5), Option(5, 3.0)]
    assert [(o.bits, o.error) for o in lower_convex_hull(options)] == [(1, 10), (3, 4), (5, 3.0)]


def test_allocation_refuses_an_impossible_budget():
    with pytest.raises(UnreachableTargetError):
        allocate([[Option(5, 1.0)], [Option(5, 1.0)]], 9)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))


@pytest.fixture(scope="module")
def mlp_plan():
    model = _mlp()
    return model, plan_for_size(model, ratio=8, specs={"m": 4}, candidates=CANDIDATES)


def test_plan_respects_the_target_counted_on_the_compressed_model(mlp_plan):
    model, plan = mlp_plan
    params = sum(p.numel() for p in model.parameters())
    cmodel = compress(model, plan=plan)  # the Plan itself is the mapping compress takes
    counted = size_report(cmodel)  # independent recount from the compressed model
    assert counted.compressed_bits <= 32 * params / 8
    assert counted.compressed_bits == plan.size_report().compressed_bits
    assert plan.size_report().uncompressed_bits == 32 * params
    assert set(plan) <= {"0.weight", "2.weight", "4.weight"}
    # the allocation is no worse than the best uniform plan that fits (it is among the candidates)
    best = plan.best_uniform()
    assert best is None or plan.predicted_error <= best.predicted_error + 1e-12


def test_plan_round_trips_through_json_read_plan_and_compress(mlp_plan, tmp_path):
    _, plan = mlp_plan
    paths = write_plan_folder(plan, tmp_path / "plan")
    assert {p.name for p in (tmp_path / "plan").iterdir()} >= {"plan.json", "report.md", "plan.png", "plan.svg"}
    again = Plan.load(paths["plan"])
    assert again.layer_plans() == plan.layer_plans()
    assert again.predicted_error == plan.predicted_error
    assert again.size_report().compressed_bits == plan.size_report().compressed_bits
    assert read_plan(paths["plan"]) == plan.layer_plans()  # what `lr2vq compress --plan plan.json` reads
    text = paths["report"].read_text()
    for key, entry in plan.items():
        assert f"| {key} |" in text and f"| {entry.k} | {entry.m} | {entry.d_tilde} |" in text
    assert "<table" in plan._repr_html_() and repr(plan).startswith("Plan(")
    assert json.loads(paths["plan"].read_text())["format"].startswith("lr2vq-plan")


def test_size_target_in_mib_and_unreachable_targets():
    model = _mlp()
    total_mib = 32 * sum(p.numel() for p in model.parameters()) / 8 / 2**20
    plan = plan_for_size(model, total_mib / 5, specs={"m": 4}, candidates=CANDIDATES)
    assert plan.size_report().megabytes <= total_mib / 5
    with pytest.raises(UnreachableTargetError, match=r"below the smallest candidate plan; reachable: .* MiB"):
        plan_for_size(model, total_mib / 1000, specs={"m": 4}, candidates=CANDIDATES)
    with pytest.raises(UnreachableTargetError, match="not below the uncompressed size; reachable"):
        plan_for_size(model, total_mib * 2, specs={"m": 4}, candidates=CANDIDATES)
    with pytest.raises(InvalidParameterError, match="exactly one target"):
        plan_for_size(model, 1.0, ratio=3, specs={"m": 4})
    with pytest.raises(InvalidParameterError, match="ratio=-2 is invalid"):
        plan_for_size(model, ratio=-2, specs={"m": 4})
    with pytest.raises(InvalidParameterError, match="unknown key"):
        plan_for_size(model, ratio=4, specs={"m": 4}, candidates={"kk": [4]})


def test_calibration_moves_bits_to_the_sensitive_layer(mlp_plan):
    model, plan = mlp_plan
    sensitive = "2.weight"
    weights = {"0.weight": 1e-3, "2.weight": 1e3, "4.weight": 1e-3}
    shifted = plan_for_size(model, ratio=8, specs={"m": 4}, candidates=CANDIDATES, calibration=weights)

    def layer_bits(p, key):
        return next(layer.compressed_bits for layer in p.size_report().layers if layer.name == key)

    assert layer_bits(shifted, sensitive) >= layer_bits(plan, sensitive)
    assert shifted.layer_errors.get(sensitive, 0.0) <= plan.layer_errors.get(sensitive, 0.0)
    with pytest.raises(InvalidParameterError, match=r"no sensitivity for layer '2\.weight'"):
        plan_for_size(model, ratio=8, specs={"m": 4}, candidates=CANDIDATES, calibration={"0.weight": 1.0})


def test_plan_from_saved_reports_reuses_their_analyses(tmp_path):
    model = _mlp()
    reports = [analyze(model, k=k, m=4, progress=False, keep_first_conv=True) for k in (4, 16)]
    plan = plan_for_size(reports, ratio=8)
    assert {(entry.k, entry.m) for entry in plan.values()} <= {(4, 4), (16, 4)}
    assert plan.size_report().ratio >= 8 - 1e-9


def test_cli_plan_writes_a_folder_that_compress_reads(tmp_path):
    from lr2vq_analysis.cli import main

    source = tmp_path / "mlp.pt"
    torch.save(_mlp().state_dict(), source)
    specs = tmp_path / "specs.json"
    specs.write_text(json.dumps({"m": 4}))
    out = tmp_path / "plan"
    assert main(["plan", str(source), "--ratio", "6", "--specs", str(specs), "--out", str(out), "-q"]) == 0
    plan = Plan.load(out / "plan.json")
    assert plan.size_report().ratio >= 6
    assert (
        main(["compress", str(source), "--plan", str(out / "plan.json"), "--out", str(tmp_path / "m.lr2vq"), "-q"]) == 0
    )
    assert main(["plan", str(source), "--ratio", "100000", "--specs", str(specs), "--out", str(out), "-q"]) == 2


def test_batch_norms_and_biases_are_counted_as_size_report_counts_them():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32), nn.Conv2d(32, 32, 1)
    )
    plan = plan_for_size(model, ratio=6, specs={"m": 9, "kinds": {"conv1x1": {"m": 4}}}, candidates=CANDIDATES)
    counted = size_report(compress(model, plan=plan))
    assert counted.compressed_bits == plan.size_report().compressed_bits
    assert counted.compressed_bits <= counted.uncompressed_bits / 6
    assert "0.weight" not in plan and "0.weight" in plan.notes  # the input convolution stays


def test_replanning_from_a_plan_reuses_its_analyses(mlp_plan, tmp_path):
    _, plan = mlp_plan
    same = plan_for_size(plan, ratio=8)
    assert same.layer_plans() == plan.layer_plans() and same.predicted_error == plan.predicted_error
    looser = plan_for_size(plan, ratio=4)
    assert looser.size_report().ratio >= 4 and looser.predicted_error <= plan.predicted_error
    with pytest.raises(InvalidParameterError, match="holds no analyses"):
        plan_for_size(Plan.load(plan.save(tmp_path / "plan.json")), ratio=4)


class _Scale(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return self.factor * x


def test_calibrated_plan_compresses_a_layer_with_near_zero_inputs_harder():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), _Scale(1e-4), nn.Linear(64, 64), nn.ReLU(), _Scale(1e4), nn.Linear(64, 16)
    )
    inputs = torch.randn(256, 32)
    quiet = "3.weight"  # its inputs are 1e-4 of the others': its output barely matters
    options = {"ratio": 12, "specs": {"m": 4}, "candidates": {"k": [4, 16, 64]}}
    plain = plan_for_size(model, **options)
    calibrated = plan_for_size(model, **options, calibration=inputs)
    assert plain.objective == "weight" and calibrated.objective == "output"

    def layer_bits(p, key):
        return next(layer.compressed_bits for layer in p.size_report().layers if layer.name == key)

    assert layer_bits(calibrated, quiet) < layer_bits(plain, quiet)
    # the target is still met, recounted on the compressed model
    params = sum(p.numel() for p in model.parameters())
    counted = size_report(compress(model, plan=calibrated))
    assert counted.compressed_bits == calibrated.size_report().compressed_bits <= 32 * params / 12
    # the objective: output error energy relative to Σ tr(W H Wᵀ) = Σ E‖W x‖² (computed here by brute force)
    energies = {}
    x = inputs
    with torch.no_grad():
        for index, layer in enumerate(model):
            if isinstance(layer, nn.Linear):
                energies[f"{index}.weight"] = float((x.double() @ layer.weight.double().T).pow(2).sum(1).mean())
            x = layer(x)
    total = sum(energies.values())
    expected = 0.0
    for key, entry in calibrated.items():
        model_fit = calibrated.analysis_.layers[[la.name for la in calibrated.analysis_.layers].index(key)].models[
            (entry.k, entry.m)
        ]
        out = model_fit.rho * model_fit.lowrank_output(entry.d_tilde) + model_fit.clustering_output(entry.d_tilde)
        assert calibrated.layer_errors[key] == pytest.approx(out)
        expected += energies[key] / total * out
    assert calibrated.predicted_error == pytest.approx(expected, rel=1e-6)
    with pytest.raises(InvalidParameterError, match="runnable model"):
        plan_for_size(model.state_dict(), **options, calibration=inputs)
    with pytest.raises(InvalidParameterError, match="model= is the runnable model"):
        plan_for_size(model, **options, model=model)
