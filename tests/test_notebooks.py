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
        draws = cell.cell_type == "code" and ("fig = plot" in cell.source or "plt.subplots" in cell.source)
        if draws and "if spec is None" not in cell.source:  # the MiniLM cell draws only when it is installed
            images = [output for output in cell.outputs if "image/png" in output.get("data", {})]
            assert images, f"this cell draws a figure but shows none inline:\n{cell.source}"
