"""The documentation site: it builds with ``mkdocs build --strict``, its nav names only pages that exist (and
every page is in it), and every public name of ``auxwrap`` is documented on a reference page."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import auxwrap

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REFERENCE = DOCS / "reference"

pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")


def _nav_pages(node: object) -> list[str]:
    """Every Markdown page named in (a part of) mkdocs.yml's ``nav``, in order."""
    if isinstance(node, str):
        return [node] if node.endswith(".md") else []
    if isinstance(node, dict):
        return [page for value in node.values() for page in _nav_pages(value)]
    if isinstance(node, list):
        return [page for item in node for page in _nav_pages(item)]
    return []


def _nav() -> list[str]:
    import yaml

    # mkdocs.yml may hold !!python/name tags (for markdown extensions); the nav is plain YAML either way
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    return _nav_pages(config["nav"])


def _documented_names() -> set[str]:
    """Names the reference pages document: the last part of each ``::: path`` and each ``members:`` entry."""
    names: set[str] = set()
    for page in REFERENCE.glob("*.md"):
        in_members = False
        for line in page.read_text().splitlines():
            if match := re.match(r":::\s*([\w.]+)\s*$", line):
                names.add(match.group(1).rsplit(".", 1)[-1])
                in_members = False
            elif re.match(r"\s+members:\s*$", line):
                in_members = True
            elif in_members and (match := re.match(r"\s+-\s*(\w+)\s*$", line)):
                names.add(match.group(1))
            elif in_members and line.strip():
                in_members = False
    return names


def test_every_page_in_the_nav_exists_and_every_page_is_in_the_nav() -> None:
    nav = _nav()
    assert nav and nav[0] == "index.md"
    missing = [page for page in nav if not (DOCS / page).is_file()]
    assert not missing, f"mkdocs.yml's nav names pages that do not exist in docs/: {missing}"
    unlisted = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if str(p.relative_to(DOCS)) not in nav)
    assert not unlisted, f"pages in docs/ that mkdocs.yml's nav does not list: {unlisted}"
    assert len(set(nav)) == len(nav), "a page is listed twice in the nav"


def test_every_public_name_is_documented_on_a_reference_page() -> None:
    documented = _documented_names()
    missing = [name for name in auxwrap.__all__ if name != "__version__" and name not in documented]
    assert not missing, (f"public names without a '::: auxwrap.NAME' entry on a page of docs/reference/: {missing}; "
                         "add one where the name belongs (see docs/reference/index.md)")
    assert "__version__" in (REFERENCE / "index.md").read_text()


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """Every warning is an error: broken links and anchors, unknown objects, docstring problems, omitted pages."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "reference" / "attach" / "index.html").is_file()



@pytest.mark.slow
def test_the_home_page_example_runs_and_deploys_the_primary_at_its_own_cost() -> None:
    """The example on docs/index.md, verbatim: it trains, searches, prunes; the deployed primary costs what it costs."""
    import torch

    text = (DOCS / "index.md").read_text()
    code = re.search(r"## The whole thing in 15 lines\n\n```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    torch.manual_seed(0)
    exec(compile(code, "docs/index.md", "exec"), scope)
    x = torch.randn(1, 3, 64, 64)
    primary, deploy = scope["primary"].eval(), scope["deploy"]
    assert auxwrap.count_flops(deploy, x) == auxwrap.count_flops(primary, x)
    assert auxwrap.count_parameters(deploy) <= auxwrap.count_parameters(primary)
    assert scope["search"].is_cut


def test_the_capture_costs_in_the_guide_are_what_the_benchmark_wrote() -> None:
    """Every figure of the capture guide's cost table is in benchmarks/results/capture.md, which names its command."""
    guide = (DOCS / "guides" / "capture.md").read_text()
    results = (ROOT / "benchmarks" / "results" / "capture.md").read_text()
    assert "python benchmarks/capture.py --threads 1" in guide and "python benchmarks/capture.py --threads 1" in results
    table = guide[guide.index("| model (224"):].split("\n\n")[0]
    figures = re.findall(r"\d+\.\d+", table)
    assert len(figures) >= 20
    missing = [f for f in figures if f"{f} s" not in results]
    assert not missing, f"figures of docs/guides/capture.md not in benchmarks/results/capture.md: {missing}"
