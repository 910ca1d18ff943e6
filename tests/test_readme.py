"""The README is a user's README: short, self-contained, its example runs, and each figure is in the result file of
the command it names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"


def _text() -> str:
    return README.read_text()


def _table_after(heading_text: str, text: str) -> list[list[str]]:
    """The cells of the first Markdown table after the line containing ``heading_text``."""
    rest = text[text.index(heading_text):]
    rows = [line for line in rest.splitlines() if line.startswith("|")]
    block = []
    for line in rest.splitlines()[rest.splitlines().index(rows[0]):]:
        if not line.startswith("|"):
            break
        block.append([cell.strip() for cell in line.strip("|").split("|")])
    return [row for row in block if not set("".join(row)) <= set("-: ")]


def _numbers(cells: list[str]) -> list[str]:
    return [n for cell in cells for n in re.findall(r"[+-]?\d[\d,]*\.\d+|\d{1,3}(?:,\d{3})+", cell)]


def test_the_readme_is_short_and_points_only_inside_the_repository() -> None:
    text = _text()
    assert len(text.splitlines()) < 150
    assert "../shared" not in text and "<!-- results:start -->" not in text and "**missed**" not in text
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README links to {target}, which is not in the repository"


def test_the_gain_table_is_what_the_demo_wrote() -> None:
    """Every number of the README's gain table appears in benchmarks/results/demo/results.md (the run it names)."""
    table = _table_after("| | Single | Aux-G-Layer | Aux-NAS |", _text())
    demo = (RESULTS / "demo" / "results.md").read_text()
    assert "python -m auxwrap demo --seeds 5" in _text() and "python -m auxwrap demo --seeds 5" in demo
    numbers = _numbers([cell for row in table for cell in row])
    assert len(numbers) >= 10
    for number in numbers:
        assert number in demo, f"README's {number} is not in benchmarks/results/demo/results.md"


def test_the_cost_table_is_what_the_flops_benchmark_wrote() -> None:
    table = _table_after("| pair | primary GFLOPs |", _text())
    flops = (RESULTS / "flops.md").read_text()
    for row in table[1:]:
        for number in _numbers(row[1:]):
            assert number in flops, f"README's {number} is not in benchmarks/results/flops.md"
        primary, fused = float(row[1]), float(row[2].split()[0])
        assert f"({fused / primary:.2f}×)" in row[2]


def test_the_example_runs_and_deploys_the_primary_at_its_own_cost() -> None:
    """The README's Python example, verbatim: it trains, prunes, and the deployed primary costs what it costs."""
    import auxwrap

    code = re.search(r"## Example\n\n```python\n(.*?)```", _text(), re.S).group(1)
    assert len(code.splitlines()) <= 16
    scope: dict = {}
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), scope)
    x = torch.randn(1, 3, 64, 64)
    primary = scope["primary"].eval()
    assert auxwrap.count_flops(scope["deploy"], x) == auxwrap.count_flops(primary, x)
    assert auxwrap.count_parameters(scope["deploy"]) <= auxwrap.count_parameters(primary)
    with torch.no_grad():
        torch.testing.assert_close(scope["deploy"](x), primary(x), rtol=1e-4, atol=1e-5)


def test_the_transformers_example_runs_captures_with_export_and_deploys_the_vit_at_its_own_cost(capsys) -> None:
    """The README's transformers example, verbatim: the ViT is exported, the ResNet traced, and the deployed ViT
    returns the ViT's own output structure, with its outputs and its FLOPs."""
    pytest.importorskip("transformers")
    import warnings

    import auxwrap

    code = re.search(r"### Hugging Face transformers models\n\n.*?```python\n(.*?)```", _text(), re.S).group(1)
    assert len(code.splitlines()) <= 16
    scope: dict = {}
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, "README.md", "exec"), scope)
    fallbacks = [w for w in caught if issubclass(w.category, auxwrap.AuxwrapCaptureWarning)]
    assert [str(w.message).split(":")[0] for w in fallbacks] == ["ViTForImageClassification"]  # said once
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["{'primary': 'export', 'aux0': 'fx'}", "ImageClassifierOutput"]  # what the comments say
    assert scope["net"].captures == {"primary": "export", "aux0": "fx"}
    x = torch.randn(3, 3, 32, 32)
    primary, deploy = scope["primary"].eval(), scope["deploy"]
    with torch.no_grad():
        torch.testing.assert_close(deploy(x).logits, primary(x).logits, rtol=1e-4, atol=1e-5)
    assert auxwrap.count_flops(deploy, x) == auxwrap.count_flops(primary, x)
    assert auxwrap.count_parameters(deploy) <= auxwrap.count_parameters(primary)


@pytest.mark.parametrize("command", ["python -m auxwrap demo", "python -m pytest"])
def test_the_two_fresh_machine_commands_are_there(command: str) -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    lines = [line for line in _text().splitlines() if line.startswith("pip install torch==") and command in line]
    assert lines, f"README gives no fresh-machine command ending in {command}"
    if command == "python -m pytest":
        assert lines[0] in ci
