from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs_and_prunes_losslessly(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=240, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
                            ).execute()
    text = "\n".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", [])
                     if o.get("output_type") == "stream")
    assert "cut error (primary output, alpha^P -> 0): 0" in text
    assert "deployed primary, test accuracy on the dominant object:" in text
    assert "| deployed primary |" in text
    assert "Paired over 2 seeds" in text and "- Aux-NAS vs Aux-G-Layer:" in text
    images = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the scenes and the gate plot
