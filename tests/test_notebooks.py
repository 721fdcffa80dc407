"""Every notebook runs top to bottom (with shrunk parameters) and is stored without outputs."""

import pathlib

import nbformat
import pytest
from common import ROOT
from nbclient import NotebookClient

NOTEBOOKS = sorted((ROOT / "experiments" / "notebooks").glob("*.ipynb"))

# Per-notebook overrides appended to the cell tagged "parameters".
SHRINK = {
    "01_quickstart.ipynb": "STEPS = 6\nPLOT_EVERY = 3\nSAMPLE_TOKENS = 8",
}


def test_there_are_notebooks():
    assert NOTEBOOKS, "experiments/notebooks/ has no notebooks"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_clean(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs; clear them"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: pathlib.Path):
    nb = nbformat.read(path, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    params[0].source += "\n" + SHRINK[path.name]
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
