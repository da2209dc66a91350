"""The docs do not rot: every ```python block runs, and api.md names every public name with its parameters."""

import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)

#: Modules whose ``__all__`` api.md documents.
PUBLIC_MODULES = [
    "lr2vq_analysis.weights",
    "lr2vq_analysis.subvectors",
    "lr2vq_analysis.spectrum",
    "lr2vq_analysis.calibration",
    "lr2vq_analysis.kmeans",
    "lr2vq_analysis.probes",
    "lr2vq_analysis.tradeoff",
    "lr2vq_analysis.plan",
    "lr2vq_analysis.specs",
    "lr2vq_analysis.report",
    "lr2vq_analysis.planner",
    "lr2vq_analysis.report_folder",
    "lr2vq_analysis.skeleton",
    "lr2vq_analysis.io",
    "lr2vq_analysis.nn",
    "lr2vq_analysis.finetune",
    "lr2vq_analysis.recipe",
    "lr2vq_analysis.size",
    "lr2vq_analysis.export",
    "lr2vq_analysis.datasets",
    "lr2vq_analysis.models",
    "lr2vq_analysis.registry",
    "lr2vq_analysis.pipeline",
    "lr2vq_analysis.plots",
    "lr2vq_analysis.cli",
]


def python_blocks(path: Path) -> list[str]:
    return PYTHON_BLOCK.findall(path.read_text())


@pytest.mark.parametrize("path", [p for p in DOCS if p.exists()], ids=lambda p: p.name)
def test_python_blocks_run(path, tmp_path, monkeypatch):
    """Blocks of one page run in order in one namespace, in a scratch folder (files they write land there)."""
    blocks = python_blocks(path)
    if not blocks:
        pytest.skip(f"{path.name} has no python block")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    for index, block in enumerate(blocks):
        try:
            exec(compile(block, f"{path.name}[block {index + 1}]", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"{path.name}, python block {index + 1} failed: {exc!r}\n{block}") from exc
    plt.close("all")


def api_sections() -> dict[str, str]:
    """``{name: body}`` for every ``### `name(...)` `` or ``### `name` `` heading of api.md, without the heading."""
    text = (ROOT / "docs" / "api.md").read_text()
    sections: dict[str, str] = {}
    for match in re.finditer(r"^### `([\w.]+)[^`]*`[^\n]*\n(.*?)(?=^##|\Z)", text, re.MULTILINE | re.DOTALL):
        sections[match.group(1).rpartition(".")[2]] = match.group(2)
    return sections


def public_names() -> list[tuple[str, str, object]]:
    names = []
    for module_name in PUBLIC_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue  # a stage that is not in this build yet
        for name in getattr(module, "__all__", []):
            names.append((module_name, name, getattr(module, name)))
    return names


def test_api_md_documents_every_public_name_and_parameter():
    sections = api_sections()
    missing, undocumented = [], []
    for module_name, name, obj in public_names():
        if name not in sections:
            missing.append(f"{module_name}.{name}")
            continue
        target = obj.__init__ if inspect.isclass(obj) and "__init__" in vars(obj) else obj
        if not callable(target):
            continue
        try:
            parameters = inspect.signature(target).parameters
        except (TypeError, ValueError):
            continue
        for parameter in parameters.values():
            if parameter.name in ("self", "cls") or parameter.kind is parameter.VAR_POSITIONAL:
                continue
            if not re.search(rf"\b{re.escape(parameter.name)}\b", sections[name]):
                undocumented.append(f"{module_name}.{name}: {parameter.name}")
    assert not missing, f"api.md lacks a '### `name`' section for: {missing}"
    assert not undocumented, f"api.md does not describe these parameters (below the heading): {undocumented}"


def test_api_md_is_what_the_generator_writes_from_the_docstrings():
    # api.md is generated (python docs/generate_api.py > docs/api.md): a docstring or default changed
    # without regenerating it leaves the reference stale.
    spec = importlib.util.spec_from_file_location("generate_api", ROOT / "docs" / "generate_api.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    expected = generator.render() + "\n"  # print() ends the file with a newline
    assert (ROOT / "docs" / "api.md").read_text() == expected, "regenerate: python docs/generate_api.py > docs/api.md"
