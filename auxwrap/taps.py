"""Step 2 — fusion points (taps): where in a traced model the cross-task fusion nodes go.

``"layer"`` gives one point per building block, found from structure rather than class names:

- a *block* is a module that holds a conv/linear, whose last node lies on the main path (every
  input → output path goes through it) and that has a sibling of its own class doing the same —
  the residual blocks of a ResNet, the attention blocks of a ViT, the MBConv blocks of an EfficientNet;
  where blocks nest (stages of blocks), the innermost level wins;
- a *unit* is conv/linear → norm → activation (either of the last two may be missing; identity modules
  between them, timm's ``nn.Identity`` for an absent norm, are looked through) on the main path, found
  in plain stacks (an ``nn.Sequential`` of leaf modules, as in VGG) and, where a model has no blocks at
  all, anywhere on its main path. A block made only of units stays one point.

``"stage"`` gives the last layer point of each resolution stage: timm's ``feature_info`` where the
model has it, else the places where the spatial size changes. A list of module paths or node names
picks points by hand; a module path resolves to the last node that module owns.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from . import analysis
from .analysis import NCHW, NHWC, TOKENS, VECTOR, Value
from .errors import AuxwrapArgumentError, AuxwrapTapError
from .examples import as_input_tuple, default_example_inputs
from .fusion import token_grid
from .trace import Traced, trace

BLOCK, UNIT, STAGE, NAMED = "block", "unit", "stage", "named"
_GENERIC_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class Unit:
    """A conv/linear → norm → activation unit, by fx node name (norm or activation may be None)."""

    weight: str
    norm: str | None
    activation: str | None


@dataclass(frozen=True)
class Tap:
    """One fusion point of a model."""

    name: str                 # module path (blocks, units) or node name, unique within the model
    node: str                 # the fx node whose output is fused
    module_path: str          # the module that owns that node
    shape: tuple[int, ...]    # its output shape on the example inputs (batch first)
    layout: str               # "nchw", "nhwc", "tokens", "vector" or "other"
    kind: str                 # "block", "unit", "stage" or "named"
    unit: Unit | None = None  # set where the point ends a conv → norm → activation unit
    prefix: int = 0           # tokens: the class/register tokens before the grid, as the tensor holds them
    grid: tuple[int, int] | None = None  # tokens: (h, w) of the token grid; None where the tokens form none

    @property
    def channels(self) -> int | None:
        if self.layout in (NCHW,):
            return self.shape[1]
        if self.layout in (NHWC, TOKENS, VECTOR):
            return self.shape[-1]
        return None

    @property
    def spatial(self) -> tuple[int, ...]:
        """(H, W) of a map, (N,) of tokens, () of a vector."""
        return {NCHW: self.shape[2:], NHWC: self.shape[1:3], TOKENS: self.shape[1:2]}.get(self.layout, ())

    def describe(self) -> str:
        return f"{self.name} ({self.layout} {'x'.join(map(str, self.shape[1:]))})"


def find_taps(traced: Traced | nn.Module, example_inputs: object = None,
              taps: str | Sequence[str] = "layer", *, capture: str = "auto") -> list[Tap]:
    """The ordered fusion points of ``traced``.

    Args:
        traced: the output of :func:`auxwrap.trace`, or a module (traced here with ``capture`` and
            ``example_inputs``; trace it yourself to pass leaf modules or concrete args).
        example_inputs: a tensor or tuple of forward() inputs used to learn shapes; inferred from
            timm's ``pretrained_cfg`` where the model has one.
        taps: ``"layer"``, ``"stage"``, or a list of module paths / fx node names.
        capture: how to capture a module (see :func:`auxwrap.trace`): ``"auto"``, ``"fx"`` or ``"export"``.
            Both captures give the same points, by the same names, on models torch.fx can trace.
    """
    if isinstance(traced, nn.Module):
        traced = trace(traced, capture=capture, example_inputs=example_inputs)
    elif not isinstance(traced, Traced):
        raise AuxwrapArgumentError(
            f"find_taps() takes a model or the result of auxwrap.trace(model), got {type(traced).__name__}.")
    finder = _TapFinder(traced, _example_inputs(traced, example_inputs))
    if isinstance(taps, str):
        if taps == "layer":
            return finder.layer_taps()
        if taps == "stage":
            return finder.stage_taps()
        raise AuxwrapArgumentError(
            f"taps={taps!r} is not a known choice for {traced.name}; use 'layer', 'stage' or a list "
            "of module paths / node names.")
    if not isinstance(taps, Sequence) or not taps or not all(isinstance(t, str) for t in taps):
        raise AuxwrapArgumentError(
            f"taps for {traced.name} must be 'layer', 'stage' or a non-empty list of names, got {taps!r}.")
    return finder.named_taps(list(taps))


def _example_inputs(traced: Traced, example_inputs: object) -> tuple:
    if example_inputs is None:
        example_inputs = default_example_inputs(traced.model)
    return as_input_tuple(example_inputs, traced.name)


class _TapFinder:
    def __init__(self, traced: Traced, example_inputs: tuple):
        self.traced = traced
        self.values = analysis.propagate(traced, example_inputs)
        images = [x for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() == 4]
        self.aspect = tuple(images[0].shape[-2:]) if images else None  # (H, W) of the input image
        self.cuts = analysis.main_path(traced.graph, self.values)
        self.position = {n: i for i, n in enumerate(traced.graph.nodes)}
        self.nodes = {n.name: n for n in traced.graph.nodes}
        self._owned = _owned_nodes(traced)
        # torch.export nodes inside a module torch.fx keeps opaque (one call_module node there) -> that call
        self._opaque = {n: call for n in traced.graph.nodes if (call := analysis.opaque_call(traced, n))}
        self._call_names = _fx_call_names(self._opaque)  # and the last node of each call -> its torch.fx name
        self._calls_named = {name: node for node, name in self._call_names.items()}

    # ---------------------------------------------------------------- layer points

    def layer_taps(self) -> list[Tap]:
        found = self._blocks_within("")
        if any(self._weight_count(t) > 1 for t in found):
            # stems, downsampling layers and transitions are not blocks beside real ones
            found = [t for t in found if t.kind == UNIT or self._weight_count(t) > 1]
        if not found:  # no repeated blocks: a plain network, take its units
            found = self._units(self._tensor_nodes(self.traced.graph.nodes))
        if not found:
            raise AuxwrapTapError(self._no_layer_points_message())
        return sorted(found, key=lambda t: self.position[self.nodes[t.node]])

    def _no_layer_points_message(self) -> str:
        repeated: dict[str, list[str]] = {}  # class -> outermost repeated blocks off the main path
        for path, module in self.traced.modules.items():
            if type(module) not in _GENERIC_CONTAINERS and self._is_block(path, on_main_path=False) and not any(
                    path.startswith(f"{p}.") for paths in repeated.values() for p in paths):
                repeated.setdefault(type(module).__name__, []).append(path)
        if repeated:
            listed = "; ".join(f"{', '.join(paths[:3])}{'...' if len(paths) > 3 else ''}: {cls}"
                               for cls, paths in repeated.items())
            why = (f"its repeated blocks ({listed}) do not end in one tensor that every path from the input to the "
                   "output goes through (they pass on several, e.g. one per token stream); pass taps=[...] naming "
                   "points of one stream (module paths or fx node names inside the blocks)")
        else:
            why = ("it has no repeated blocks and no conv/linear -> norm -> activation unit on its main path; pass "
                   f"taps=[...] with module paths, e.g. {self._some_paths()}")
        return f"no layer fusion points found in {self.traced.name}: {why}"

    def _blocks_within(self, path: str) -> list[Tap]:
        module = self.traced.modules[path]
        if self._is_plain_stack(path, module):
            units = self._units(self._owned.get(path, []))
            if units:
                return units
        inner = [tap for child in self._children(path) for tap in self._blocks_within(child)]
        if self._is_block(path) and all(self._weight_count(tap) <= 1 for tap in inner):
            return [self._tap(self._last_node(path), BLOCK, name=self._block_name(path))]
        return inner

    def _children(self, path: str) -> list[str]:
        """The paths of a module's children; a module registered twice (CoaT's ``serial_blocks1.0.cpe`` is
        ``cpe1``) only under its first path, the one ``named_modules()`` and the nodes it creates use."""
        return [p for p in _child_paths(path, self.traced.modules[path]) if p in self.traced.modules]

    def _weight_count(self, tap: Tap) -> int:
        if tap.kind == UNIT:
            return 1
        # a module torch.fx keeps opaque is one op, however many ATen ops torch.export records inside it
        return len({self._opaque.get(n, n) for n in self._owned[tap.name] if analysis.is_weight_op(self.traced, n)})

    def _block_name(self, path: str) -> str:
        """Name a block by the deepest module that owns exactly its nodes, skipping generic containers
        (a one-block stage ``s1`` is named ``s1.b1``; ``blocks.0`` holding one block, ``blocks.0.0``)."""
        name = path
        while True:
            same = [p for p in self._children(path) if self._owned.get(p) == self._owned[path]]
            if not same or self._is_leaf(same[0]):
                return name
            path = same[0]
            if type(self.traced.modules[path]) not in _GENERIC_CONTAINERS:
                name = path

    def _is_plain_stack(self, path: str, module: nn.Module) -> bool:
        """An nn.Sequential / nn.ModuleList of leaf modules, as VGG's ``features``."""
        children = self._children(path)
        return isinstance(module, (nn.Sequential, nn.ModuleList)) and bool(children) and all(
            self._is_leaf(child) for child in children)

    def _is_leaf(self, path: str) -> bool:
        """No submodules, or called as one opaque ``call_module`` (timm's BatchNormAct2d; in a torch.export
        capture, a module torch.fx would call so: :func:`auxwrap.analysis.opaque_module`)."""
        module = self.traced.modules[path]
        return not any(True for _ in module.children()) or all(
            analysis.opaque_module(self.traced, n) == path for n in self._owned.get(path, []))

    def _is_block(self, path: str, on_main_path: bool = True) -> bool:
        """Not a leaf, holds a conv/linear, ends on the main path (unless ``on_main_path=False``), has a sibling
        of its class that does too."""
        if not path or not self._is_block_like(path, on_main_path):
            return False
        parent, _, _ = path.rpartition(".")
        cls = type(self.traced.modules[path])
        siblings = [p for p in self._children(parent) if p != path]
        return any(type(self.traced.modules[p]) is cls and self._is_block_like(p, on_main_path) for p in siblings)

    def _is_block_like(self, path: str, on_main_path: bool = True) -> bool:
        nodes = self._owned.get(path, [])
        return (not self._is_leaf(path) and any(analysis.is_weight_op(self.traced, n) for n in nodes)
                and (not on_main_path or self._last_node(path) in self.cuts))

    def _units(self, nodes: list[fx.Node]) -> list[Tap]:
        units = []
        for node in nodes:
            if analysis.is_weight_op(self.traced, node):
                unit = self._unit_from(node)
                if unit is not None:
                    units.append(unit)
        return units

    def _unit_from(self, weight: fx.Node) -> Tap | None:
        """weight -> [norm] -> activation, each the sole user of the one before, ending on the main path."""
        norm = norm_end = activation = None
        weight = self._through_opaque(weight)  # e.g. timm's Conv2dSame: the pad, then the conv
        follower = self._next(weight)
        if follower is not None and analysis.is_norm_op(self.traced, follower):
            norm_end = self._through_opaque(follower)  # a norm module's own activation, recorded by torch.export
            norm, follower = follower, self._next(norm_end)
        activated = norm is not None and analysis.norm_includes_activation(self.traced, norm)
        if not activated and follower is not None and analysis.is_activation(self.traced, follower):
            activation, activated = follower, True
        end = activation or norm_end
        if not activated or end not in self.cuts:
            return None
        unit = Unit(weight.name, norm.name if norm else None, activation.name if activation else None)
        return self._tap(end, UNIT, unit=unit)

    def _next(self, node: fx.Node) -> fx.Node | None:
        """The sole user of ``node``, past identity modules (timm's ``nn.Identity`` for an absent norm)."""
        user = _sole_user(node)
        while user is not None and analysis.is_identity(self.traced, user):
            user = _sole_user(user)
        return user

    def _through_opaque(self, node: fx.Node) -> fx.Node:
        """The last of the nodes torch.export recorded inside the opaque module ``node`` lies in (timm's
        ``BatchNormAct2d``: its batch norm, then its activation), each the sole user of the one before;
        ``node`` itself elsewhere (a torch.fx ``call_module`` node is the whole call)."""
        call = self._opaque.get(node)
        user = _sole_user(node)
        while call is not None and user is not None and self._opaque.get(user) == call:
            node, user = user, _sole_user(user)
        return node

    # ---------------------------------------------------------------- stage points

    def stage_taps(self) -> list[Tap]:
        layers = self.layer_taps()
        ends = self._stage_ends_from_feature_info(layers) or self._stage_ends_from_shapes(layers)
        if len(ends) < 2:
            raise AuxwrapTapError(
                f"{self.traced.name} has no resolution stages: all of its {len(layers)} layer points "
                f"share one resolution ({layers[-1].describe()}); use taps='layer' or name the points, "
                f"e.g. taps={[t.name for t in layers[2::3]] or [t.name for t in layers]}")
        return [dataclasses.replace(t, kind=STAGE) for t in ends]

    def _stage_ends_from_feature_info(self, layers: list[Tap]) -> list[Tap]:
        info = getattr(self.traced.model, "feature_info", None)
        try:
            entries = [(entry["module"], entry["reduction"]) for entry in info]
        except (TypeError, KeyError):
            return []
        last_per_reduction: dict[int, str] = {}
        for module, reduction in entries:
            last_per_reduction[reduction] = module
        ends: list[Tap] = []
        for module in last_per_reduction.values():
            if module not in self.traced.modules or not self._owned.get(module):
                return []  # feature_info does not match this graph; fall back on shapes
            end = self._last_layer_at_or_before(layers, self._last_node(module))
            if end is not None and end not in ends:
                ends.append(end)
        return ends

    def _last_layer_at_or_before(self, layers: list[Tap], node: fx.Node) -> Tap | None:
        before = [t for t in layers if self.position[self.nodes[t.node]] <= self.position[node]]
        return before[-1] if before else None

    @staticmethod
    def _stage_ends_from_shapes(layers: list[Tap]) -> list[Tap]:
        maps = [t for t in layers if t.layout in (NCHW, NHWC, TOKENS)]
        if not maps:  # every point a vector: no resolution at all
            return []
        return [t for t, nxt in zip(maps, [*maps[1:], None], strict=True) if nxt is None or nxt.spatial != t.spatial]

    # ---------------------------------------------------------------- points named by hand

    def named_taps(self, names: list[str]) -> list[Tap]:
        taps = []
        for name in names:
            if name in self.nodes and name not in self.traced.modules:
                node = self.nodes[name]
            elif name in self._calls_named and name not in self.traced.modules:
                node = self._calls_named[name]
            elif name in self.traced.modules and self._owned.get(name):
                node = self._last_node(name)
            else:
                raise AuxwrapTapError(self._unknown_name_message(name))
            if self.values.get(node, Value(None, False)).shape is None:
                raise AuxwrapTapError(
                    f"fusion point {name!r} of {self.traced.name} does not output one tensor (node "
                    f"{node.name}); name a module or node whose output is a feature map, tokens or a vector.")
            taps.append(self._tap(node, NAMED, name=name))
        if len({t.node for t in taps}) != len(taps):
            raise AuxwrapTapError(f"taps {names} of {self.traced.name} name the same point twice.")
        return sorted(taps, key=lambda t: self.position[self.nodes[t.node]])

    def _unknown_name_message(self, name: str) -> str:
        valid = [p for p in self.traced.modules if p and self._owned.get(p)] + list(self.nodes)
        close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
        lines = [f"unknown fusion point {name!r} in {self.traced.name}."]
        if close:
            lines.append(f"Closest names: {', '.join(close)}")
        lines.append("Layer points: " + _describe_or_reason(self.layer_taps))
        lines.append("Stage points: " + _describe_or_reason(self.stage_taps))
        return "\n".join(lines)

    # ---------------------------------------------------------------- helpers

    def _tap(self, node: fx.Node, kind: str, name: str | None = None, unit: Unit | None = None) -> Tap:
        shape = self.values[node].shape
        owner = analysis.owner(self.traced, node)
        if name is None:
            name = owner if owner and self._last_node(owner) is node else self._call_names.get(node, node.name)
        layout = analysis.layout_of(self.traced, node, shape)
        prefix, grid = self._token_grid(shape[1]) if layout == TOKENS else (0, None)
        return Tap(name, node.name, owner, shape, layout, kind, unit, prefix, grid)

    def _token_grid(self, n_tokens: int) -> tuple[int, tuple[int, int] | None]:
        """Prefix and grid of a token point, from its token count and the input's aspect, the model's
        ``num_prefix_tokens`` tried first (see :func:`auxwrap.fusion.token_grid`)."""
        hint = getattr(self.traced.model, "num_prefix_tokens", None)
        hint = hint if isinstance(hint, int) and not isinstance(hint, bool) else None
        try:
            return token_grid(n_tokens, hint, self.aspect)
        except ValueError:
            return hint or 0, None

    def _last_node(self, path: str) -> fx.Node:
        return self._owned[path][-1]

    def _tensor_nodes(self, nodes) -> list[fx.Node]:  # noqa: ANN001
        return [n for n in nodes if self.values.get(n, Value(None, False)).shape is not None]

    def _some_paths(self) -> list[str]:
        return [p for p in self.traced.modules if p and self._owned.get(p)][:6]


def _owned_nodes(traced: Traced) -> dict[str, list[fx.Node]]:
    """Module path -> the nodes it owns (its own and its descendants'), in graph order, no get_attr; owned as
    torch.fx records it (:func:`auxwrap.analysis.owner`), so that both captures list the same modules."""
    owned: dict[str, list[fx.Node]] = {}
    for node in traced.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        path = analysis.owner(traced, node)
        owned.setdefault("", []).append(node)
        parts = path.split(".") if path else []
        for depth in range(1, len(parts) + 1):
            owned.setdefault(".".join(parts[:depth]), []).append(node)
    return owned


def _fx_call_names(opaque: dict[fx.Node, tuple[str, str]]) -> dict[fx.Node, str]:
    """The last node of each call of a module torch.fx keeps opaque (``opaque``: node -> (call, module path), in
    graph order) -> the name torch.fx gives that call's ``call_module`` node (``blocks_1_act``, then
    ``blocks_1_act_1`` for its second call), so that a point named by its node in a torch.fx graph is named the
    same in a torch.export capture. torch.fx's own naming rules make the names; only module calls are counted
    (a function named as a module path would shift torch.fx's count)."""
    last = {call: node for node, call in opaque.items()}
    namespace = fx.graph._Namespace()
    return {node: namespace.create_name(fx.graph._snake_case(path), None) for (_, path), node in last.items()}


def _child_paths(path: str, module: nn.Module) -> list[str]:
    return [f"{path}.{name}" if path else name for name, _ in module.named_children()]


def _sole_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _describe_or_reason(find) -> str:  # noqa: ANN001
    try:
        return ", ".join(t.describe() for t in find())
    except AuxwrapTapError as error:
        return f"none ({str(error).split(':')[0]})"
