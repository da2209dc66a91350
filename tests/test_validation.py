"""One rule per parameter: the declarative table in _validation, and the public doors that use it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lr2vq_analysis import _validation
from lr2vq_analysis._validation import MAX_JOBS, MAX_SEED, RULES, Interval, Options, check_param
from lr2vq_analysis.exceptions import InvalidParameterError, UsageError
from lr2vq_analysis.kmeans import kmeans
from lr2vq_analysis.probes import run_probe
from lr2vq_analysis.report import analyze
from lr2vq_analysis.spectrum import compute_spectrum
from lr2vq_analysis.subvectors import to_subvectors
from lr2vq_analysis.tradeoff import fit_tradeoff


@pytest.fixture(scope="module")
def layer() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(32, 8, 3, 3))


@pytest.mark.parametrize(
    ("interval", "inside", "outside"),
    [
        (Interval("int", 2), [2, 3, np.int64(10**9)], [1, 0, -5, 2.0, True, "3", None]),
        (Interval("real", 0, 1, closed="right"), [1, 0.5, 1e-300, np.float32(0.25)], [0, 1.0001, float("nan"), "0.5"]),
        (Interval("real", 0, 1, closed="neither"), [0.5], [0.0, 1.0, float("inf")]),
        (Interval("int", 0, MAX_SEED), [0, MAX_SEED], [-1, MAX_SEED + 1, 2**70]),
    ],
)
def test_interval_membership_by_hand(interval, inside, outside):
    assert all(interval.accepts(value) for value in inside)
    assert not any(interval.accepts(value) for value in outside)


def test_options_compare_value_and_type():
    options = Options(("layer", "global"))
    assert options.accepts("layer") and not options.accepts("Layer") and not options.accepts(1)


def test_every_rule_is_stated_once_and_describes_itself():
    for name, (constraint, _) in RULES.items():
        assert isinstance(constraint, (Interval, Options)), name
        assert constraint.describe()
    with pytest.raises(TypeError):
        RULES["k"] = (Interval("int", 1), False)  # type: ignore[index]  # read-only


@pytest.mark.parametrize("bad", [1, 0, -3, 2.5, "16"])
def test_max_points_per_centroid_has_one_rule_everywhere(layer, bad):
    x = to_subvectors(layer, 9)
    spectrum = compute_spectrum(x)
    doors = [
        lambda: kmeans(x, 8, max_points_per_centroid=bad),
        lambda: run_probe(spectrum, x, k=8, d_tilde=2, max_points_per_centroid=bad),
        lambda: fit_tradeoff(layer, k=8, m=9, max_points_per_centroid=bad),
    ]
    messages = []
    for door in doors:
        with pytest.raises(InvalidParameterError) as info:
            door()
        messages.append(str(info.value).split("max_points_per_centroid=", 1)[1])
    assert len(set(messages)) == 1, messages  # the same rule, the same words


@pytest.mark.parametrize("seed", [2**70, -1, MAX_SEED + 1, 1.0, True])
def test_out_of_range_seed_is_a_usage_error_everywhere(layer, seed):
    x = to_subvectors(layer, 9)
    for door in (
        lambda: kmeans(x, 8, seed=seed),
        lambda: fit_tradeoff(layer, k=8, m=9, seed=seed),
        lambda: analyze({"a.weight": layer}, k=8, m=9, seed=seed, progress=False),
    ):
        with pytest.raises(UsageError, match="seed"):
            door()


def test_largest_seed_reaches_every_backend(layer):
    x = torch.as_tensor(to_subvectors(layer, 9))
    kmeans(x, 4, seed=MAX_SEED, max_iter=2)
    np.random.RandomState(MAX_SEED)  # scikit-learn's limit
    torch.Generator().manual_seed(MAX_SEED)


@pytest.mark.parametrize("n_jobs", [10**6, MAX_JOBS + 1, 0, -2, 1.5, None])
def test_n_jobs_out_of_range_is_refused_before_any_work(layer, n_jobs):
    with pytest.raises(InvalidParameterError, match=r"n_jobs=.* is invalid; n_jobs must be -1 \(all cores\)"):
        analyze({"a.weight": layer}, k=8, m=9, n_jobs=n_jobs, progress=False)


def test_unknown_probe_option_is_named(layer):
    with pytest.raises(InvalidParameterError, match=r"unknown probe option.*'n_probe'.*n_probes"):
        analyze({"a.weight": layer}, k=8, m=9, n_probe=2, progress=False)
    with pytest.raises(InvalidParameterError, match="n_probes=7"):
        analyze({"a.weight": layer}, k=8, m=9, n_probes=7, progress=False)


def test_data_dependent_bound_tightens_the_rule():
    assert check_param("d_tilde", 4, high=4) == 4
    with pytest.raises(InvalidParameterError, match=r"1\.\.4"):
        check_param("d_tilde", 5, high=4)
    with pytest.raises(InvalidParameterError, match=r"layer 'conv\.weight'"):
        check_param("k", 1, layer="conv.weight")


def test_long_values_are_shortened_in_messages():
    with pytest.raises(InvalidParameterError) as info:
        check_param("seed", 10**200)
    assert len(str(info.value)) < 200


def test_public_checkers_are_thin_wrappers_of_the_rules():
    assert _validation.check_seed(MAX_SEED) == MAX_SEED
    assert _validation.check_rho(1) == 1.0
    assert _validation.check_n_jobs(-1) == -1
