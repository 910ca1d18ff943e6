"""Step 4 — build: one fx graph that interleaves the branches and calls the fusion nodes.

Each branch's nodes are copied in their own order, renamed with the branch's prefix. Reaching the
point a fusion enters (a block's output, or a unit's conv output before its norm), the builder
first copies the source branch up to the sources it reads, then calls the fusion module, and every
later user of that point reads the fused value. Sources are read before their own fusion, so the
recursion only ever looks back and the graph is acyclic by construction.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from dataclasses import dataclass

import torch.fx as fx

from .analysis import mutates_input
from .errors import AuxwrapArgumentError
from .plan import Connection
from .taps import Tap
from .trace import MODULE_PATH, Traced

#: ``node.meta`` key naming the branch a node of the fused graph comes from ("fusion" for fusion calls).
BRANCH = "auxwrap_branch"
FUSIONS = "fusions"


def entry_node(tap: Tap) -> str:
    """The node a fusion adds to: a unit's conv/linear output (before its norm), else the point itself."""
    return tap.unit.weight if tap.unit is not None else tap.node


@dataclass(frozen=True)
class Site:
    """One fusion module: where it enters, and the points of one other branch it reads."""

    name: str                  # its key in the fused network's ``fusions`` ModuleDict
    dest_branch: str
    dest: Tap
    source_branch: str
    sources: tuple[Tap, ...]


def sites(connections: list[Connection], taps: dict[str, list[Tap]]) -> list[Site]:
    """Group connections into fusion modules: one per (destination point, source branch)."""
    by_name = {branch: {t.name: t for t in branch_taps} for branch, branch_taps in taps.items()}
    grouped: dict[tuple[str, str, str], list[Tap]] = defaultdict(list)
    for c in connections:
        grouped[(c.dest_branch, c.dest, c.source_branch)].append(by_name[c.source_branch][c.source])
    result = []
    for (dest_branch, dest, source_branch), sources in grouped.items():
        name = f"{dest_branch}_{dest}_from_{source_branch}".replace(".", "_")
        result.append(Site(name, dest_branch, by_name[dest_branch][dest], source_branch, tuple(sources)))
    return result


def fused_graph(branches: dict[str, Traced], prefixes: dict[str, str], fusion_sites: list[Site],
                readers: dict[str, list[str]] | None = None) -> fx.Graph:
    """The fused graph. ``branches`` (traced models) starts with the primary; ``prefixes`` gives every
    branch's module path in the fused network (``"primary"``, ``"aux.0"``...), in output order.
    ``readers`` are branches that are modules reading primary nodes directly (:class:`auxwrap.AuxModule`):
    branch -> the primary node names they are called with, after the network's first input.
    The graph returns ``(primary_out, (aux_outs...))``."""
    return _Builder(branches, prefixes, fusion_sites, readers or {}).build()


class _Builder:
    def __init__(self, branches: dict[str, Traced], prefixes: dict[str, str], fusion_sites: list[Site],
                 readers: dict[str, list[str]]):
        self.branches = branches
        self.readers = readers
        self.prefixes = prefixes
        self.graph = fx.Graph()
        self.env: dict[str, dict[fx.Node, object]] = {b: {} for b in branches}    # fused values
        self.before: dict[str, dict[str, fx.Node]] = {b: {} for b in branches}    # values before fusion
        self.body = {b: [n for n in t.graph.nodes if n.op not in ("placeholder", "output")]
                     for b, t in branches.items()}
        self.next_index = dict.fromkeys(branches, 0)
        self.position = {b: {n.name: i for i, n in enumerate(nodes)} for b, nodes in self.body.items()}
        self.fusing: set[str] = set()  # branches whose fusion is being built (guards against cycles)
        self.sites_at: dict[tuple[str, str], list[Site]] = defaultdict(list)
        self.read: dict[str, set[str]] = defaultdict(set)  # entry nodes other branches read, per branch
        for site in fusion_sites:
            self.sites_at[(site.dest_branch, entry_node(site.dest))].append(site)
            self.read[site.source_branch].update(entry_node(s) for s in site.sources)
        primary = next(iter(branches))
        for names in readers.values():
            self.read[primary].update(names)

    def build(self) -> fx.Graph:
        self._placeholders()
        for branch in self.branches:
            self._advance(branch, len(self.body[branch]) - 1)
        outputs = {b: fx.map_arg(_output(t.graph).args[0], lambda n, b=b: self.env[b][n])
                   for b, t in self.branches.items()}
        outputs.update({b: self._call_reader(b, names) for b, names in self.readers.items()})
        primary, *aux = (outputs[b] for b in self.prefixes)
        self.graph.output((primary, tuple(aux)))
        self.graph.lint()
        return self.graph

    def _placeholders(self) -> None:
        primary, *aux_branches = self.branches
        created = []
        for node in self.branches[primary].graph.nodes:
            if node.op == "placeholder":
                new = self.graph.placeholder(node.name, type_expr=node.type,
                                             default_value=node.args[0] if node.args else inspect.Signature.empty)
                new.meta = {MODULE_PATH: "", BRANCH: primary}
                self.env[primary][node] = new
                created.append(new)
        for branch in aux_branches:
            inputs = [n for n in self.branches[branch].graph.nodes if n.op == "placeholder"]
            for i, node in enumerate(inputs):
                if i < len(created):
                    self.env[branch][node] = created[i]
                elif node.args:  # an optional input the primary does not take: its default
                    self.env[branch][node] = node.args[0]
                else:
                    raise AuxwrapArgumentError(
                        f"{branch} ({self.branches[branch].name}) needs input {node.name!r} that the primary "
                        f"({self.branches[primary].name}) does not take; every branch is called with the "
                        "primary's inputs.")

    def _advance(self, branch: str, last_index: int) -> None:
        """Copy ``branch``'s nodes up to ``last_index`` (inclusive), inserting fusions on the way."""
        while self.next_index[branch] <= last_index:
            node = self.body[branch][self.next_index[branch]]
            self.next_index[branch] += 1
            self.env[branch][node] = self._copy(branch, node)
            sites = self.sites_at.get((branch, node.name))
            if sites:
                self.before[branch][node.name] = self.env[branch][node]
                self.env[branch][node] = self._fuse(branch, node, sites)
            elif node.name in self.read[branch] and any(
                    mutates_input(self.branches[branch], user) for user in node.users):
                # a later in-place op (ReLU(inplace=True)) would overwrite what the other branch reads
                kept = self.graph.create_node("call_method", "clone", (self.env[branch][node],),
                                              name=f"{branch}_{node.name}_kept")
                kept.meta = {MODULE_PATH: "", BRANCH: branch}
                self.before[branch][node.name] = kept

    def _copy(self, branch: str, node: fx.Node) -> fx.Node:
        target = node.target
        if node.op in ("call_module", "get_attr"):
            target = f"{self.prefixes[branch]}.{target}"
        args = fx.map_arg(node.args, lambda n: self.env[branch][n])
        kwargs = fx.map_arg(node.kwargs, lambda n: self.env[branch][n])
        new = self.graph.create_node(node.op, target, args, kwargs, name=f"{branch}_{node.name}",
                                     type_expr=node.type)
        new.meta = {MODULE_PATH: node.meta.get(MODULE_PATH, ""), BRANCH: branch}
        return new

    def _fuse(self, branch: str, node: fx.Node, sites: list[Site]) -> fx.Node:
        value = self.env[branch][node]
        self.fusing.add(branch)
        for site in sites:
            sources = [self._source_value(site.source_branch, entry_node(s)) for s in site.sources]
            value = self.graph.create_node("call_module", f"{FUSIONS}.{site.name}", (value, *sources),
                                           name=f"fuse_{site.name}")
            value.meta = {BRANCH: "fusion", MODULE_PATH: f"{FUSIONS}.{site.name}"}
        self.fusing.discard(branch)
        return value

    def _call_reader(self, branch: str, names: list[str]) -> fx.Node:
        """Call a module branch on the network's first input and the primary's values at ``names``
        (as the primary computes them, fused or not: a reader never feeds back)."""
        primary = next(iter(self.branches))
        first_input = next(n for n in self.graph.nodes if n.op == "placeholder")
        values = []
        for name in names:
            node = self.body[primary][self.position[primary][name]]
            fused = (primary, name) in self.sites_at
            values.append(self.env[primary][node] if fused else self.before[primary].get(name, self.env[primary][node]))
        call = self.graph.create_node("call_module", self.prefixes[branch], (first_input, *values), name=branch)
        call.meta = {MODULE_PATH: "", BRANCH: branch}
        return call

    def _source_value(self, branch: str, name: str) -> fx.Node:
        """The source's value before its own fusion, copying its branch up to it first."""
        index = self.position[branch][name]
        if branch in self.fusing and index >= self.next_index[branch]:
            raise RuntimeError(f"auxwrap internal error: fusion sources form a cycle at {branch}.{name}")
        self._advance(branch, index)
        return self.before[branch].get(name) or self.env[branch][self.body[branch][index]]


def _output(graph: fx.Graph) -> fx.Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")
