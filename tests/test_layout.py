"""The package layout (issue 14): no import cycle among auxwrap's modules, and the core stays free of the demo."""

import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "auxwrap"
#: the command line may run the demo; nothing else in the core may import it
DEMO_USERS = ("auxwrap.cli", "auxwrap.__main__")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imported(node: ast.ImportFrom, here: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    """The auxwrap modules a ``from ... import ...`` statement in module ``here`` loads."""
    if node.level:
        base = here.split(".") if is_package else here.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    found = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in modules]
    parents = {".".join(here.split(".")[:i]) for i in range(1, here.count(".") + 2)}
    return found + ([target] if target in modules and target not in parents else [])


def import_graph() -> dict[str, set[str]]:
    """Each auxwrap module -> the auxwrap modules it imports anywhere (module level or inside a function).

    A module's own parent packages, which Python imports first, are not edges: every module would then
    depend on ``auxwrap/__init__.py``, which imports the public API."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.ImportFrom):  # (the package itself and its parents are implied)
                edges.update(_imported(node, name, path.name == "__init__.py", modules))
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None where the graph is acyclic (depth-first search)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(graph.get(module, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module)
        if cycle:
            return cycle
    return None


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_import_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert "auxwrap.errors" in graph["auxwrap.plan"]          # from .errors import ... (module level)
    assert "auxwrap.mto" in graph["auxwrap"]                   # from . import mto
    assert "auxwrap.errors" in graph["auxwrap.demo.data"]      # from ..errors import ...


def test_no_import_cycle_among_auxwrap_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_core_modules_do_not_import_the_demo():
    graph = import_graph()
    offenders = {module: sorted(t for t in targets if t == "auxwrap.demo" or t.startswith("auxwrap.demo."))
                 for module, targets in graph.items()
                 if not module.startswith("auxwrap.demo") and module not in DEMO_USERS}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_import_auxwrap_loads_neither_the_demo_nor_its_dependencies():
    code = ("import sys, auxwrap; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('sklearn', 'matplotlib') or m.startswith('auxwrap.demo')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=PACKAGE.parent)
    assert result.stdout.strip() == "[]", result.stdout


_ATTACH_AND_SAVE = """
import sys, torch
from torch import nn
import auxwrap

def net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())

fused = auxwrap.attach(net(), net(), mode="grad", example_inputs=(torch.randn(2, 3, 12, 12),))
fused.detach_primary()
torch.save(fused, sys.argv[1])
"""

_LOAD_AND_DETACH = """
import sys, torch
net = torch.load(sys.argv[1], weights_only=False)
deployed = net.detach_primary()
print(type(deployed).__name__, deployed.relative_error <= 1e-5)
"""


def test_a_fused_network_detaches_in_a_fresh_process_without_fused_importing_deploy(tmp_path):
    """fused.py never imports deploy.py: attach() hands the network deploy's detach_primary, which a pickled
    network keeps by reference, so that detaching works after ``import auxwrap`` (which imports nothing
    eagerly) and after ``torch.load`` in a process that has imported only what unpickling imports."""
    path = str(tmp_path / "fused.pt")
    for code in (_ATTACH_AND_SAVE, _LOAD_AND_DETACH):
        result = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                                cwd=PACKAGE.parent, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["TracedSequential", "True"]
