"""fx graphs in a flat, picklable form: a list of nodes, with operators named rather than held.

An fx.Graph pickles as a linked list of nodes, one recursion level per node (RecursionError above ~330 nodes),
and torch.export graphs call ATen operators, which do not pickle. The fused network stores its graphs this way,
and so does a deployed primary captured by torch.export (:mod:`auxwrap.capture`), which torch.fx's own pickling
would re-trace into a graph that loses the model's output structure.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate


@dataclasses.dataclass(frozen=True)
class _NodeRef:
    """A node of the same graph, by name, in a stored node's arguments (not a tuple: map_aggregate
    would go inside one)."""

    name: str


@dataclasses.dataclass(frozen=True)
class _OperatorRef:
    """An ATen (or other ``torch.ops``) operator by name: operator objects do not pickle."""

    namespace: str
    name: str
    overload: str

    def resolve(self) -> torch._ops.OpOverload:
        return getattr(getattr(getattr(torch.ops, self.namespace), self.name), self.overload)


def _target_state(target: object) -> object:
    """A node's target as it pickles: operators (torch.export graphs call them) by name."""
    if isinstance(target, torch._ops.OpOverload):
        namespace, _, name = target._schema.name.partition("::")
        return _OperatorRef(namespace, name, target._overloadname)
    return target


def graph_state(graph: fx.Graph) -> dict[str, Any]:
    """``graph`` as a flat list of nodes (op, name, target, arguments with nodes named, type, meta):
    pickles without recursing along the node list; :func:`graph_from_state` rebuilds it. Of each node's meta,
    the entries of plain data (strings, numbers, their tuples and dicts: module paths) are kept; torch.export's
    fake tensors and source records are left out."""
    nodes = [(n.op, n.name, _target_state(n.target), fx.map_arg(n.args, lambda a: _NodeRef(a.name)),
              fx.map_arg(n.kwargs, lambda a: _NodeRef(a.name)), n.type,
              {key: value for key, value in n.meta.items() if _plain(value)}) for n in graph.nodes]
    return {"nodes": nodes, "codegen": graph._codegen}


def _plain(value: object) -> bool:
    if isinstance(value, (str, int, float, bool, type(None))):
        return True
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_plain(k) and _plain(v) for k, v in value.items())
    return False


def graph_from_state(state: dict[str, Any]) -> fx.Graph:
    """The graph :func:`graph_state` stored: the same nodes, names, arguments, types and meta."""
    graph = fx.Graph()
    graph._codegen = state["codegen"]
    env: dict[str, fx.Node] = {}

    def resolve(value: object) -> object:
        return env[value.name] if isinstance(value, _NodeRef) else value

    for op, name, target, args, kwargs, type_expr, meta in state["nodes"]:
        target = target.resolve() if isinstance(target, _OperatorRef) else target
        node = graph.create_node(op, target, map_aggregate(args, resolve), map_aggregate(kwargs, resolve),
                                 name=name, type_expr=type_expr)
        node.meta = meta
        env[name] = node
    return graph
