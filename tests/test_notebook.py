"""The redundancy-curves notebook executes against a test-size analysis (so it cannot rot)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from typer.testing import CliRunner

from sts_profile.cli import app

pytestmark = pytest.mark.slow
NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "redundancy_curves.ipynb"


def test_notebook_executes_on_a_test_size_analysis(tmp_path, monkeypatch):
    res = CliRunner().invoke(app, ["recipe", "--size", "test", "--work", str(tmp_path / "work"),
                                   "--out", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    monkeypatch.setenv("STS_ANALYSIS_DIR", str(tmp_path / "work" / "analysis"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, [(e.ename, e.evalue) for e in errors]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # curves, heatmap, keep-ratio plot
    text = "".join(o.get("text", "") for o in outputs)
    assert "alignment method" in text and "instruction method" in text
