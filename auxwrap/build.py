"""Step 4 — build: one fx graph that interleaves the branches and calls the fusion nodes.

Each branch's nodes are copied in their own order, renamed with the branch's prefix. Reaching the
point a fusion enters (a block's output, or a unit's conv output before its norm), the builder
first copies the source branch up to the sources it reads, then calls the fusion module, and every
later user of that point reads the fused value. Each source is read as its connection says
(:mod:`auxwrap.plan`): ``"output"``, its layer output (the tap's own node, after its fusion, norm and
activation); ``"before"``, its entry node's value before its own fusion. The plan only reads layer
outputs of strictly shallower points, so the recursion only ever looks back and the graph is acyclic.
A value another branch reads is cloned where a later in-place op of its own branch would overwrite it.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch.fx as fx

from .analysis import mutates_input
from .errors import AuxwrapArgumentError
from .plan import BEFORE, OUTPUT, Connection, direction
from .taps import Tap
from .trace import MODULE_PATH, Traced

#: ``node.meta`` key naming the branch a node of the fused graph comes from ("fusion" for fusion calls).
BRANCH = "auxwrap_branch"
FUSIONS = "fusions"


def entry_node(tap: Tap) -> str:
    """The node a fusion adds to: a unit's conv/linear output (before its norm), else the point itself."""
    return tap.unit.weight if tap.unit is not None else tap.node


def read_node(tap: Tap, reads: str) -> str:
    """The node another branch reads of ``tap``: its own node (its layer output: a unit's activation, a
    block's output) for ``"output"``, its entry node for ``"before"`` (see :func:`entry_node`)."""
    if reads == OUTPUT:
        return tap.node
    if reads == BEFORE:
        return entry_node(tap)
    raise ValueError(f"auxwrap internal error: unknown way of reading a source {reads!r}")


@dataclass(frozen=True)
class Site:
    """One fusion module: where it enters, and the points of one other branch it reads."""

    name: str                  # its key in the fused network's ``fusions`` ModuleDict
    dest_branch: str
    dest: Tap
    source_branch: str
    sources: tuple[Tap, ...]
    reads: tuple[str, ...]     # how each source is read: "output" or "before" (``plan.Connection.reads``)

    def connections(self, gates: Sequence[float] | None = None) -> list[Connection]:
        """The connection of each source, in the order of the fusion's gate vector: the connections
        :func:`sites` grouped here, with ``gates`` as their gate values (None: left unset)."""
        values = [None] * len(self.sources) if gates is None else gates
        return [Connection(self.source_branch, source.name, self.dest_branch, self.dest.name,
                           direction(self.dest_branch), gate, reads)
                for source, reads, gate in zip(self.sources, self.reads, values, strict=True)]


def sites(connections: list[Connection], taps: dict[str, list[Tap]]) -> list[Site]:
    """Group connections into fusion modules: one per (destination point, source branch)."""
    by_name = {branch: {t.name: t for t in branch_taps} for branch, branch_taps in taps.items()}
    grouped: dict[tuple[str, str, str], list[tuple[Tap, str]]] = defaultdict(list)
    for c in connections:
        grouped[(c.dest_branch, c.dest, c.source_branch)].append((by_name[c.source_branch][c.source], c.reads))
    result = []
    names: set[str] = set()
    for (dest_branch, dest, source_branch), read in grouped.items():
        name = _unique(f"{dest_branch}_{dest}_from_{source_branch}".replace(".", "_"), names)
        sources, reads = zip(*read, strict=True)
        result.append(Site(name, dest_branch, by_name[dest_branch][dest], source_branch, sources, reads))
    return result


def _unique(name: str, taken: set[str]) -> str:
    """``name``, or ``name_2``, ``name_3``... where it is taken (and take it): points ``a.b`` (a module path)
    and ``a_b`` (a node name, e.g. the first call of a module called twice) would otherwise share one key."""
    candidate, k = name, 1
    while candidate in taken:
        k += 1
        candidate = f"{name}_{k}"
    taken.add(candidate)
    return candidate


def fused_graph(branches: dict[str, Traced], prefixes: dict[str, str], fusion_sites: list[Site],
                readers: dict[str, list[str]] | None = None) -> fx.Graph:
    """The fused graph. ``branches`` (traced models) starts with the primary; ``prefixes`` gives every
    branch's module path in the fused network (``"primary"``, ``"aux.0"``...), in output order.
    ``readers`` are branches that are modules reading primary nodes directly (:class:`auxwrap.AuxModule`):
    branch -> the primary node names they are called with (as layer outputs), after the network's first input.
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
        self.before: dict[str, dict[str, fx.Node]] = {b: {} for b in branches}    # values before a fusion
        self.kept: dict[str, dict[str, fx.Node]] = {b: {} for b in branches}      # clones safe from in-place ops
        self.body = {b: [n for n in t.graph.nodes if n.op not in ("placeholder", "output")]
                     for b, t in branches.items()}
        self.next_index = dict.fromkeys(branches, 0)
        self.position = {b: {n.name: i for i, n in enumerate(nodes)} for b, nodes in self.body.items()}
        self.fusing: dict[str, int] = {}  # branch -> position of the node whose fusion is being built
        self.sites_at: dict[tuple[str, str], list[Site]] = defaultdict(list)
        # node names other branches read, per branch and per way of reading
        self.read: dict[str, dict[str, set[str]]] = {b: {OUTPUT: set(), BEFORE: set()} for b in branches}
        for site in fusion_sites:
            self.sites_at[(site.dest_branch, entry_node(site.dest))].append(site)
            for source, reads in zip(site.sources, site.reads, strict=True):
                self.read[site.source_branch][reads].add(read_node(source, reads))
        primary = next(iter(branches))
        for names in readers.values():
            self.read[primary][OUTPUT].update(names)

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
            if sites:  # later users read the fused value, a new tensor: the value before it stays intact
                self.before[branch][node.name] = self.env[branch][node]
                self.env[branch][node] = self._fuse(branch, node, sites)
            read = self.read[branch]
            if (node.name in read[OUTPUT] or (node.name in read[BEFORE] and not sites)) and \
                    self._overwritten_later(branch, node):
                # a later in-place op (ReLU(inplace=True), +=) would overwrite what another branch reads
                kept = self.graph.create_node("call_method", "clone", (self.env[branch][node],),
                                              name=f"{branch}_{node.name}_kept")
                kept.meta = {MODULE_PATH: "", BRANCH: branch}
                self.kept[branch][node.name] = kept

    def _overwritten_later(self, branch: str, node: fx.Node) -> bool:
        """Whether an in-place op after ``node`` writes into its tensor: directly, or into the tensor an
        in-place ``node`` itself wrote into (``relu_(bn)`` shares ``bn``'s tensor)."""
        traced, position = self.branches[branch], self.position[branch]
        aliases = [node]
        while mutates_input(traced, aliases[-1]) and aliases[-1].args and isinstance(aliases[-1].args[0], fx.Node):
            aliases.append(aliases[-1].args[0])
        return any(position[user.name] > position[node.name] and _writes_into(traced, user, alias)
                   for alias in aliases for user in alias.users if user.op != "output")

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
        self.fusing[branch] = self.position[branch][node.name]
        for site in sites:
            sources = [self._source_value(site.source_branch, s, reads)
                       for s, reads in zip(site.sources, site.reads, strict=True)]
            value = self.graph.create_node("call_module", f"{FUSIONS}.{site.name}", (value, *sources),
                                           name=f"fuse_{site.name}")
            value.meta = {BRANCH: "fusion", MODULE_PATH: f"{FUSIONS}.{site.name}"}
        del self.fusing[branch]
        return value

    def _call_reader(self, branch: str, names: list[str]) -> fx.Node:
        """Call a module branch on the network's first input and the primary's layer outputs at ``names``
        (as the primary computes them, fused or not: a reader never feeds back)."""
        primary = next(iter(self.branches))
        first_input = next(n for n in self.graph.nodes if n.op == "placeholder")
        values = [self._value(primary, name, OUTPUT) for name in names]
        call = self.graph.create_node("call_module", self.prefixes[branch], (first_input, *values), name=branch)
        call.meta = {MODULE_PATH: "", BRANCH: branch}
        return call

    def _source_value(self, branch: str, tap: Tap, reads: str) -> fx.Node:
        """What a fusion reads of source ``tap``, copying its branch up to it first."""
        name = read_node(tap, reads)
        index = self.position[branch][name]
        fusing = self.fusing.get(branch)
        if fusing is not None and (index > fusing or (index == fusing and reads == OUTPUT)):
            raise RuntimeError(f"auxwrap internal error: fusion sources form a cycle at {branch}.{name} ({reads})")
        self._advance(branch, index)
        return self._value(branch, name, reads)

    def _value(self, branch: str, name: str, reads: str) -> fx.Node:
        """Node ``name`` of ``branch`` (already copied) as read by another branch: before its fusion, or
        its fused value; a clone where a later in-place op overwrites it."""
        if reads == BEFORE and name in self.before[branch]:
            return self.before[branch][name]
        return self.kept[branch].get(name) or self.env[branch][self.body[branch][self.position[branch][name]]]


def _writes_into(traced: Traced, user: fx.Node, value: fx.Node) -> bool:
    """Whether in-place op ``user`` writes into ``value``: its first argument (``out += x`` writes into
    ``out``, not ``x``); where it takes no positional argument, any of its keyword arguments."""
    if not mutates_input(traced, user):
        return False
    return user.args[0] is value if user.args else value in user.kwargs.values()


def _output(graph: fx.Graph) -> fx.Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")
