"""The fused network that :func:`auxwrap.attach` returns.

It holds the user's own modules (``primary``, ``aux[k]``) and the fusion modules (``fusions``), so
parameter names are the originals under a branch prefix and an optimizer built on
``primary.parameters()`` keeps working. Its forward runs a generated fx program: one for train mode
and one for eval mode where the branches trace differently (timm's DropPath), else one for both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch.fx as fx
from torch import nn

from .build import FUSIONS, Site
from .fusion import Fusion
from .plan import PRIMARY, Connection
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
                 trace_options: dict[str, Any]):
        super().__init__()
        self.primary = primary
        self.aux = nn.ModuleList(aux)
        self.fusions = nn.ModuleDict(fusions)
        self.deploy_switch = _DeploySwitch(self)
        self.mode = mode
        self.taps = taps
        self.example_inputs = tuple(x.detach() if hasattr(x, "detach") else x for x in example_inputs)
        self.trace_options = trace_options
        self.deployed = False
        self._graphs = graphs
        self._links = connections
        self._sites = sites
        self._programs: dict[bool, fx.GraphModule] = {}
        self.training = primary.training  # the user's modules keep their own flags until train()/eval()

    # ------------------------------------------------------------------ running

    def forward(self, *args: Any, **kwargs: Any) -> AuxOutput:
        if self.deployed:
            return AuxOutput(self.primary(*args, **kwargs), ())
        primary, aux = self._program()(*args, **kwargs)
        return AuxOutput(primary, tuple(aux))

    def _program(self) -> fx.GraphModule:
        """The compiled program of the current mode, calling this network's own submodules."""
        key = self._mode_key()
        program = self._programs.get(key)
        if program is None:
            program = fx.GraphModule(self, self._graphs[key], class_name="FusedForward")
            for name in ("primary", "aux", FUSIONS):
                setattr(program, name, getattr(self, name))  # the live modules, not GraphModule's copies
            self._programs[key] = program
        return program

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
        state["_programs"] = {}  # compiled code is rebuilt on first use after a copy or unpickling
        return state

    # ------------------------------------------------------------------ parameters and connections

    def arch_parameters(self) -> list[nn.Parameter]:
        """The gates alpha of every connection (empty in mode="grad", where they are fixed at 1)."""
        return [f.gate for f in self.fusions.values() if f.gate is not None]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Everything else: both branches and the fusion weights."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def connections(self) -> list[Connection]:
        """Every connection with its current gate value (1.0 for Aux-G's fixed gates)."""
        gates = {}
        for site in self._sites:
            values = self.fusions[site.name].gates().tolist()
            for source, value in zip(site.sources, values, strict=True):
                gates[(site.source_branch, source.name, site.dest_branch, site.dest.name)] = value
        # an AuxModule's reads have no gate: they are always on (1.0), as Aux-G's links
        return [dataclasses.replace(c, gate=gates.get((c.source_branch, c.source, c.dest_branch, c.dest), 1.0))
                for c in self._links]

    def fusion_sites(self, dest_branch: str | None = None) -> Iterator[tuple[Site, Fusion]]:
        """Each fusion module with where it sits, optionally only those entering ``dest_branch``."""
        for site in self._sites:
            if dest_branch is None or site.dest_branch == dest_branch:
                yield site, self.fusions[site.name]

    # ------------------------------------------------------------------ deployment

    def detach_primary(self) -> fx.GraphModule:
        """The primary alone: a new eval-mode GraphModule, BatchNorms folded (see :mod:`auxwrap.deploy`)."""
        from .deploy import detach_primary

        return detach_primary(self)

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
        return (f"mode={self.mode!r}, auxiliaries={n_aux}, connections={len(self._links)} "
                f"({to_primary} into the primary){window}")


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
