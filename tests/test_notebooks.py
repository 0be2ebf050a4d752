"""Every Colab notebook runs top to bottom (nbclient) at smoke size on the CPU."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

NOTEBOOKS = sorted((REPO / "colab").glob("*.ipynb"))


def test_there_are_three_notebooks():
  assert {p.stem for p in NOTEBOOKS} == {"quickstart", "multitask_vs_single", "entropy_and_order"}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch):
  monkeypatch.setenv("MTJAX_SMOKE", "1")
  monkeypatch.setenv("MTJAX_NOTEBOOK_DIR", str(tmp_path))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device in the kernel, as on a Colab CPU runtime
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
  errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
  assert any("smoke=True" in o.get("text", "") for c in notebook.cells
             for o in c.get("outputs", []))  # the setup cell saw the smoke flag
