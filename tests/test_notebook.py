"""The quick-start notebook: executed in the slow job; its saved outputs (what a reader sees on GitHub without
running it) checked in the default job, on the .ipynb JSON alone."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
#: what no output may hold: a warning, or a path of the machine that executed it
FORBIDDEN = ("Warning", "/root/", "/work/", "site-packages")
#: a numeric slice of the generated code, e.g. ``net.code.splitlines()[20:28]``: it shows other lines once the
#: code changes; select lines by what they hold instead
CODE_SLICE = re.compile(r"net\.code\b[^\n]*\[\s*-?\d*\s*:\s*-?\d*\s*\]")
#: a row of the tap table: branch, fusion point, kind, layout, shape
TAP_ROW = re.compile(r"^(primary|aux\d+)\s+\S+\s+(block|unit|stage|named)\s+\w+\s+\d+(x\d+)*$", re.MULTILINE)


def _text(value: str | list[str]) -> str:
    return value if isinstance(value, str) else "".join(value)


def _outputs_text(cell: dict) -> list[str]:
    """The text of each output of ``cell``: streams, errors and the text forms of rich outputs (not images)."""
    texts = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            texts.append(_text(output["text"]))
        elif output["output_type"] == "error":
            texts.append("\n".join([output["ename"], output["evalue"], *output["traceback"]]))
        else:
            texts += [_text(v) for k, v in output.get("data", {}).items() if k.startswith("text/")]
    return texts


def _cells(notebook: dict, kind: str) -> list[tuple[int, dict]]:
    return [(i, c) for i, c in enumerate(notebook["cells"]) if c["cell_type"] == kind]


def _all_output_text(notebook: dict) -> str:
    return "\n".join(t for _, c in _cells(notebook, "code") for t in _outputs_text(c))


def _check_outputs_clean(notebook: dict) -> None:
    """No warning or machine path in any output, and at most one stream output (progress or print) per cell."""
    for i, cell in _cells(notebook, "code"):
        for text in _outputs_text(cell):
            found = [marker for marker in FORBIDDEN if marker in text]
            assert not found, f"cell {i}: an output holds {found}: {text[:300]!r}"
        streams = [o for o in cell.get("outputs", []) if o["output_type"] == "stream"]
        assert len(streams) <= 1, f"cell {i}: {len(streams)} stream outputs (progress bars or separate prints)"


@pytest.fixture(scope="module")
def saved() -> dict:
    return json.loads(NOTEBOOK.read_text())


def test_saved_notebook_is_executed_in_order(saved):
    counts = [c.get("execution_count") for _, c in _cells(saved, "code")]
    assert counts == list(range(1, len(counts) + 1)), f"execution counts {counts}: execute it top to bottom, once"


def test_saved_outputs_hold_no_warning_path_or_extra_stream(saved):
    _check_outputs_clean(saved)


def test_fused_network_shown_as_summary_not_module_tree(saved):
    sources = "\n".join(_text(c["source"]) for _, c in _cells(saved, "code"))
    assert not re.search(r"print\(net\)", sources), "print(net) dumps both models' module trees"
    outputs = _all_output_text(saved)
    assert "(primary): " not in outputs and "Conv2d(" not in outputs, "a module tree is printed"
    assert re.search(r"\d+ primary->aux, \d+ aux->primary", outputs), "the connections by direction are not shown"


def test_taps_shown_by_name_kind_and_shape(saved):
    rows = [m.group(0).split() for m in TAP_ROW.finditer(_all_output_text(saved))]
    assert {row[0] for row in rows} == {"primary", "aux0"}, "no tap table (branch, name, kind, layout, shape)"
    assert all(not row[1].isdigit() for row in rows), "taps shown as bare indices"


def test_code_lines_selected_by_content(saved):
    for i, cell in _cells(saved, "code"):
        assert not CODE_SLICE.search(_text(cell["source"])), f"cell {i}: slices net.code by line numbers"
    assert "= self.fusions." in _all_output_text(saved), "the fusion calls of net.code are not shown"


def test_comparison_has_single_baseline_and_points_to_full_run(saved):
    outputs = "\n".join(t for _, c in _cells(saved, "code") if "side_by_side" in _text(c["source"])
                        for t in _outputs_text(c))
    assert re.search(r"^Single\s+\d", outputs, re.MULTILINE), "no Single row in the comparison"
    assert "- Aux-G-Layer vs Single:" in outputs and "- Aux-NAS vs Single:" in outputs, "no paired differences"
    prose = "\n".join(_text(c["source"]) for _, c in _cells(saved, "markdown"))
    assert "python -m auxwrap demo --seeds 5" in prose and "benchmarks/results/demo/" in prose, \
        "the few-seed comparison does not point to the full run"
    assert (ROOT / "benchmarks" / "results" / "demo" / "results.md").is_file()
    stated = re.search(r"\*\*(\d+) seeds\*\*", prose)
    run = re.search(r"Paired over (\d+) seeds", outputs)
    assert stated and run and stated.group(1) == run.group(1), "the prose and the run disagree on the seeds"


@pytest.mark.slow
def test_quickstart_notebook_runs_and_prunes_losslessly(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=240, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
                            ).execute()
    _check_outputs_clean(notebook)
    text = "\n".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", [])
                     if o.get("output_type") == "stream")
    assert "cut error (primary output, alpha^P -> 0): 0" in text
    assert "deployed primary, test accuracy on the dominant object:" in text
    assert "| deployed primary |" in text
    assert "Paired over 2 seeds" in text and "- Aux-NAS vs Aux-G-Layer:" in text
    assert re.search(r"^Single\s+\d", text, re.MULTILINE)
    images = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the scenes and the gate plot
