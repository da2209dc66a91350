"""Both notebooks execute from top to bottom in their quick mode (LR2VQ_NOTEBOOK_QUICK=1)."""

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
KERNEL = "lr2vq-test-python3"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A kernel spec that runs this interpreter, so the notebooks see the package under test."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    saved = {key: os.environ.get(key) for key in ("JUPYTER_PATH", "LR2VQ_NOTEBOOK_QUICK", "MPLBACKEND")}
    os.environ["JUPYTER_PATH"] = str(root)
    os.environ["LR2VQ_NOTEBOOK_QUICK"] = "1"
    os.environ.pop("MPLBACKEND", None)  # the kernel draws inline, as in Jupyter
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_both_notebooks_are_present():
    assert [path.name for path in NOTEBOOKS] == ["01_tradeoff_exploration.ipynb", "02_compress_end_to_end.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "clear the outputs before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_executes(path, kernel_env, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name=KERNEL, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            text = output.get("text", "") + str(output.get("data", {}).get("text/plain", ""))
            assert "IProgress" not in text and "TqdmWarning" not in text, f"progress-bar warning in:\n{cell.source}"
    for cell in notebook.cells:
        draws = cell.cell_type == "code" and ("fig = plot" in cell.source or "plt.subplots" in cell.source)
        if draws and "if spec is None" not in cell.source:  # the MiniLM cell draws only when it is installed
            images = [output for output in cell.outputs if "image/png" in output.get("data", {})]
            assert images, f"this cell draws a figure but shows none inline:\n{cell.source}"


def _widget_cell(notebook):
    return next(cell for cell in notebook.cells if "ipywidgets" in cell.source and cell.cell_type == "code")


def test_notebook_01_has_controls_for_k_m_and_rho(kernel_env, tmp_path):
    notebook = nbformat.read(NOTEBOOKS[0], as_version=4)
    cell = _widget_cell(notebook)
    for control in ('"k"', '"m"', '"rho"'):
        assert control in cell.source
    notebook.cells = [notebook.cells[1], cell]  # the imports and the controls
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name=KERNEL, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    views = [o for o in cell.outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(views) == 2  # the row of controls and the output they drive


def test_notebook_01_falls_back_to_static_figures_without_ipywidgets(kernel_env, tmp_path):
    hidden = tmp_path / "hide"
    (hidden / "ipywidgets").mkdir(parents=True)
    (hidden / "ipywidgets" / "__init__.py").write_text('raise ImportError("ipywidgets hidden for this test")')
    spec = Path(os.environ["JUPYTER_PATH"]) / "kernels" / KERNEL / "kernel.json"
    saved = spec.read_text()
    kernel = json.loads(saved)
    kernel["env"] = {"PYTHONPATH": os.pathsep.join([str(hidden), os.environ.get("PYTHONPATH", "")])}
    spec.write_text(json.dumps(kernel))
    try:
        notebook = nbformat.read(NOTEBOOKS[0], as_version=4)
        cell = _widget_cell(notebook)
        notebook.cells = [notebook.cells[1], cell]
        client = nbclient.NotebookClient(
            notebook, timeout=300, kernel_name=KERNEL, resources={"metadata": {"path": str(tmp_path)}}
        )
        client.execute()
    finally:
        spec.write_text(saved)
    text = "".join(output.get("text", "") for output in cell.outputs)
    assert "ipywidgets is not installed" in text
    assert text.count("global d̃ =") == 3
    assert len([o for o in cell.outputs if "image/png" in o.get("data", {})]) == 3
