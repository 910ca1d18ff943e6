"""The fused network that :func:`auxwrap.attach` returns.

It holds the user's own modules (``primary``, ``aux[k]``) and the fusion modules (``fusions``), so
parameter names are the originals under a branch prefix and an optimizer built on
``primary.parameters()`` keeps working. Its forward runs a generated fx program: one for train mode
and one for eval mode where the branches trace differently (timm's DropPath), else one for both.
It pickles (``torch.save``, ``copy.deepcopy``) with its graphs as flat node lists, whatever their size,
and ``.to()`` moves its example inputs with its parameters. A branch captured by torch.export has flat outputs
in the program; the network puts them back into that model's own structure (``ImageClassifierOutput``...).

Detaching the primary is :mod:`auxwrap.deploy`'s work, which builds on this module: attach() hands each
network deploy's ``detach_primary`` (``detach``), so that this module never imports deploy. It is kept on the
network by reference: an unpickled network imports deploy again to detach.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import TreeSpec, tree_unflatten

from .build import FUSIONS, Site
from .errors import AuxwrapArgumentError
from .fusion import Fusion
from .graphstate import graph_from_state, graph_state
from .plan import PRIMARY, Connection, aux_branch
from .taps import Tap


class AuxOutput(NamedTuple):
    """What the fused network returns: the primary's output and one output per auxiliary,
    each with its model's own structure (tensor, tuple, dict)."""

    primary: Any
    aux: tuple


class FusedNet(nn.Module):
    """The primary and its auxiliaries as one training network with cross-task fusion nodes."""

    def __init__(self, primary: nn.Module, aux: list[nn.Module], fusions: dict[str, Fusion],
                 graphs: dict[bool, fx.Graph], mode: str, taps: dict[str, list[Tap]],
                 connections: list[Connection], sites: list[Site], example_inputs: tuple,
                 trace_options: dict[str, Any], detach: Callable[[FusedNet, Any], fx.GraphModule],
                 captures: dict[str, str] | None = None, output_specs: dict[str, TreeSpec] | None = None):
        super().__init__()
        self.primary = primary
        self.aux = nn.ModuleList(aux)
        self.fusions = nn.ModuleDict(fusions)
        self.deploy_switch = _DeploySwitch(self)
        self.mode = mode
        self.taps = taps
        self.example_inputs = tuple(x.detach() if hasattr(x, "detach") else x for x in example_inputs)
        self.trace_options = trace_options
        self.captures = captures or {}  # branch -> "fx" or "export": how attach() captured it
        self.deployed = False
        self._output_specs = output_specs or {}  # branch -> structure of its flat outputs (export captures)
        self._detach = detach  # auxwrap.deploy.detach_primary
        self._graphs = graphs
        self._links = connections
        self._sites = sites
        self._programs = self._build_programs()
        self.training = primary.training  # the user's modules keep their own flags until train()/eval()

    # ------------------------------------------------------------------ running

    def forward(self, *args: Any, **kwargs: Any) -> AuxOutput:
        if self.deployed:
            return AuxOutput(self.primary(*args, **kwargs), ())
        primary, aux = self._program()(*args, **kwargs)
        return AuxOutput(self._structured(PRIMARY, primary),
                         tuple(self._structured(aux_branch(k), out) for k, out in enumerate(aux)))

    def _structured(self, branch: str, output: Any) -> Any:
        """A branch's output in its model's own structure: an exported branch's program returns it flat."""
        spec = self._output_specs.get(branch)
        return output if spec is None else tree_unflatten(list(output), spec)

    def _program(self) -> fx.GraphModule:
        """The program of the current mode, calling this network's own submodules."""
        return self._programs[self._mode_key()]

    def _build_programs(self) -> dict[bool, fx.GraphModule]:
        """One program per graph, built here rather than on first use: ``torch.compile`` cannot build a
        GraphModule inside forward (a graph break, and a guard on the programs that changes once per mode)."""
        programs = {}
        for key, graph in self._graphs.items():
            program = fx.GraphModule(self, graph, class_name="FusedForward")
            for name in ("primary", "aux", FUSIONS):
                setattr(program, name, getattr(self, name))  # the live modules, not GraphModule's copies
            programs[key] = program
        return programs

    @property
    def graph_module(self) -> fx.GraphModule:
        """The fx program of the current mode (it calls this network's own submodules)."""
        return self._program()

    @property
    def code(self) -> str:
        """The generated Python code of the current mode: branches interleaved, fusion calls inline."""
        return self._program().code

    @property
    def graph(self) -> fx.Graph:
        return self._graphs[self._mode_key()]

    def _mode_key(self) -> bool:
        """Which graph runs now: the train graph in train mode where there is one, else the eval graph."""
        return self.training if self.training in self._graphs else False

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_programs"] = {}  # generated code is rebuilt by __setstate__ after a copy or unpickling
        # an fx.Graph pickles as a linked list of nodes, one recursion level per node (RecursionError
        # above ~330 nodes): store each graph as a flat list of its nodes instead
        state["_graphs"] = {key: graph_state(graph) for key, graph in self._graphs.items()}
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state, _graphs={key: graph_from_state(s) for key, s in state["_graphs"].items()})
        super().__setstate__(state)
        self._programs = self._build_programs()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> FusedNet:
        """``.to()``, ``.double()``, ``.half()``, ``.cuda()``... move the stored example inputs as they move
        the buffers (same device and dtype rule; their values are kept), so prune() and report() run on
        them without a dtype or device mismatch."""
        result = super()._apply(fn, recurse)
        self.example_inputs = tuple(_moved_like(fn, x) for x in self.example_inputs)
        return result

    # ------------------------------------------------------------------ parameters and connections

    def arch_parameters(self) -> list[nn.Parameter]:
        """The gates alpha of every connection (empty in mode="grad", where they are fixed at 1)."""
        return [fusion.gate for _, fusion in self.gated_sites()]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Everything else: both branches and the fusion weights."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def connections(self) -> list[Connection]:
        """Every connection with its current gate value (1.0 for Aux-G's fixed gates)."""
        gated = {dataclasses.replace(c, gate=None): c for site, fusion in self.fusion_sites()
                 for c in site.connections(fusion.gates().tolist())}
        # an AuxModule's reads have no fusion and no gate: they are always on (1.0), as Aux-G's links
        return [gated.get(c, dataclasses.replace(c, gate=1.0)) for c in self._links]

    def fusion_sites(self, dest_branch: str | None = None) -> Iterator[tuple[Site, Fusion]]:
        """Each fusion module with where it sits, optionally only those entering ``dest_branch``."""
        for site in self._sites:
            if dest_branch is None or site.dest_branch == dest_branch:
                yield site, self.fusions[site.name]

    def gated_sites(self, dest_branch: str | None = None) -> list[tuple[Site, Fusion]]:
        """The fusion modules with learnable gates (mode="nas"), in site order, optionally only those entering
        ``dest_branch``: ``gated_sites(PRIMARY)`` holds the auxiliary -> primary gates alpha^P, which the
        search's L1 term penalises and :func:`auxwrap.prune` cuts."""
        return [(site, fusion) for site, fusion in self.fusion_sites(dest_branch) if fusion.gate is not None]

    def gate_connections(self) -> list[Connection]:
        """The connection of every learnable gate, in the order of :meth:`arch_parameters`' gate vectors."""
        return [c for site, _ in self.gated_sites() for c in site.connections()]

    # ------------------------------------------------------------------ deployment

    def detach_primary(self, probe: Any = None) -> fx.GraphModule:
        """The primary alone: a new eval-mode GraphModule, BatchNorms folded, checked against this network's
        primary output on ``probe`` (default: the example inputs); see :func:`auxwrap.deploy.detach_primary`."""
        return self._detach(self, probe)

    def switch_to_deploy(self) -> None:
        """In place, as RepVGG / timm's ``reparameterize_model`` expect: from now on this module runs the
        detached primary alone and returns ``AuxOutput(primary, ())``; the auxiliaries are dropped."""
        if self.deployed:
            return
        deployed = self.detach_primary()
        # reassign (never add or remove) children: reparameterize_model iterates over them meanwhile
        self.primary, self.aux, self.fusions = deployed, nn.ModuleList(), nn.ModuleDict()
        self._graphs, self._programs, self._links, self._sites = {}, {}, [], []
        self.deployed = True

    reparameterize = switch_to_deploy

    def extra_repr(self) -> str:
        n_aux = len(self.aux)
        to_primary = sum(1 for c in self._links if c.dest_branch == PRIMARY)
        if self.deployed:
            return f"mode={self.mode!r}, deployed: the primary alone"
        window = f", window={self.window} ({self.window_form})" if hasattr(self, "window_form") else ""
        exported = [b for b, how in self.captures.items() if how == "export"]
        captured = f", captured by torch.export: {', '.join(exported)}" if exported else ""
        return (f"mode={self.mode!r}, auxiliaries={n_aux}, connections={len(self._links)} "
                f"({to_primary} into the primary){window}{captured}")


def _moved_like(fn: Callable[[torch.Tensor], torch.Tensor], value: object) -> object:
    """``value`` on the device and in the dtype ``fn`` gives a tensor like it; ``fn`` runs on an empty
    tensor only, so functions that do not keep values (``to_empty``) leave the values as they were."""
    if not isinstance(value, torch.Tensor):
        return value
    moved = fn(torch.empty(0, dtype=value.dtype, device=value.device))
    return value.to(device=moved.device, dtype=moved.dtype)


def unwrap(net: nn.Module, argument: str = "net") -> FusedNet:
    """The :class:`FusedNet` inside ``net``: itself, or inside the DDP/DataParallel wrappers and
    ``torch.compile`` modules around it (a compiled network shares the FusedNet's parameters and buffers)."""
    inner = net
    while isinstance(inner, (*_PARALLEL, *_compiled_types())):
        inner = inner.module if isinstance(inner, _PARALLEL) else inner._orig_mod
    if not isinstance(inner, FusedNet):
        raise AuxwrapArgumentError(
            f"{argument} must be the FusedNet that auxwrap.attach() returns (or a DistributedDataParallel or "
            f"torch.compile module wrapping it), got {type(net).__name__}.")
    return inner


_PARALLEL = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def _compiled_types() -> tuple[type, ...]:
    """``torch.compile``'s module wrapper, where torch.compile has been used (its module is loaded then;
    importing it here would cost seconds at ``import auxwrap``)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return (eval_frame.OptimizedModule,) if eval_frame is not None else ()


class _DeploySwitch(nn.Module):
    """Lets ``timm.utils.reparameterize_model(net)`` reach the network itself: it calls
    ``reparameterize()`` on children only, and this child forwards the call to its owner."""

    def __init__(self, owner: FusedNet):
        super().__init__()
        object.__setattr__(self, "owner", owner)  # not a submodule: no cycle in modules()

    def reparameterize(self) -> None:
        self.owner.switch_to_deploy()

    def forward(self) -> None:  # never called
        raise RuntimeError("auxwrap: _DeploySwitch is not meant to be called")
