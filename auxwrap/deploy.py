"""Step 6 — prune and detach: hand back the primary alone, at exactly its single-task cost.

:func:`detach_primary` re-traces the trained primary (a copy) in eval mode and folds its
BatchNorms: auxiliary branches, fusion weights and gates are simply not in that graph.
:func:`prune` first measures what cutting the auxiliary -> primary links changes on a probe batch
and refuses, naming the links, where that is above tolerance (DESIGN I5).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten

from .analysis import as_input_tuple, eval_mode
from .errors import AuxwrapError
from .fold import fold_batchnorm
from .fused import FusedNet
from .plan import PRIMARY
from .trace import trace


class AuxwrapPruneError(AuxwrapError):
    """Cutting the auxiliary -> primary links would change the primary's output."""


class AuxwrapPruneWarning(UserWarning):
    """``prune(force=True)`` cut links that changed the primary's output."""


@dataclass(frozen=True)
class LinkContribution:
    """What one auxiliary -> primary link adds at its destination, relative to the value there."""

    source_branch: str
    source: str
    dest: str
    gate: float
    relative: float  # ||W_j . (alpha_j * resize(S_j))|| / ||R~|| on the probe batch

    def __str__(self) -> str:
        return (f"{self.source_branch}.{self.source} -> primary.{self.dest} "
                f"(gate {self.gate:.3g}, adds {self.relative:.3g} of the value there)")


def detach_primary(net: FusedNet) -> fx.GraphModule:
    """The primary alone as a new eval-mode ``GraphModule`` with its BatchNorms folded.

    Refuses while an auxiliary -> primary link can still contribute (use :func:`prune`).
    The report of what was folded is ``deployed.fold_report``.
    """
    live = _live_links(net)
    if live:
        raise AuxwrapPruneError(
            f"{len(live)} auxiliary -> primary link(s) are not cut (e.g. {live[0]}); detaching now would "
            "change the primary's output. Call auxwrap.prune(net) to measure and cut them.")
    return fold_primary(net)


def fold_primary(net: FusedNet) -> fx.GraphModule:
    """A copy of the primary, traced in eval mode, BatchNorms folded; links are not checked."""
    return fold_module(net.primary, **net.trace_options)


def fold_module(model: nn.Module, **trace_options: Any) -> fx.GraphModule:
    """A copy of ``model`` traced in eval mode with its BatchNorms folded (the report on ``fold_report``):
    how a model without auxiliaries, e.g. a single-task baseline, is deployed like a pruned primary."""
    deployed = trace(copy.deepcopy(model).eval(), training=False, **trace_options).graph_module
    deployed.fold_report = fold_batchnorm(deployed)
    return deployed.eval()


def prune(net: FusedNet, tol: float = 1e-4, probe: object = None, force: bool = False) -> fx.GraphModule:
    """Cut the auxiliary -> primary links and return :func:`detach_primary`'s module.

    Measures the primary's output on ``probe`` (default: the example inputs given to attach)
    with the links and without them; refuses with :class:`AuxwrapPruneError` naming the links
    that contribute where the relative change is above ``tol``. ``force=True`` cuts anyway and
    warns with the measured change. In mode="grad" there is nothing to cut.
    """
    if net.mode == "grad":
        return detach_primary(net)
    inputs = as_input_tuple(net.example_inputs if probe is None else probe, "the probe")
    change, links = measure_cut(net, inputs)
    if change > tol:
        ranked = sorted(links, key=lambda c: -c.relative)
        culprits = [c for c in ranked if c.relative > tol] or ranked[:5]
        listed = "\n".join(f"  {c}" for c in culprits[:10])
        if not force:
            raise AuxwrapPruneError(
                f"cutting the auxiliary -> primary links changes the primary's output by {change:.3g} (relative), "
                f"above tol={tol:g}. The links that contribute, largest first:\n{listed}\n"
                "Train longer with the search's L1 schedule (auxwrap.Search), or pass force=True to cut anyway.")
        warnings.warn(f"prune(force=True): cutting changed the primary's output by {change:.3g} (relative, "
                      f"tol={tol:g}); largest contributions:\n{listed}", AuxwrapPruneWarning, stacklevel=2)
    cut_links(net)
    return detach_primary(net)


def cut_links(net: FusedNet) -> None:
    """Set every auxiliary -> primary gate to exactly zero."""
    for _, fusion in net.fusion_sites(dest_branch=PRIMARY):
        if fusion.gate is not None:
            fusion.cut()


def measure_cut(net: FusedNet, inputs: tuple) -> tuple[float, list[LinkContribution]]:
    """Relative change of the primary's output when the auxiliary -> primary links are cut, and what
    each link adds at its destination; eval mode, no gradients, the network left as it was."""
    contributions: list[LinkContribution] = []
    hooks = [fusion.register_forward_hook(_recorder(site, fusion, contributions))
             for site, fusion in net.fusion_sites(dest_branch=PRIMARY)]
    gated = [f for _, f in net.fusion_sites(dest_branch=PRIMARY) if f.gate is not None]
    saved = [f.live.clone() for f in gated]
    try:
        with eval_mode(net), torch.no_grad():
            before = net(*inputs).primary
            for hook in hooks:
                hook.remove()
            cut_links(net)
            after = net(*inputs).primary
    finally:
        for hook in hooks:
            hook.remove()
        for fusion, live in zip(gated, saved, strict=True):
            fusion.live.copy_(live)
    return _relative_change(before, after), contributions


def _recorder(site, fusion, out: list[LinkContribution]):  # noqa: ANN001, ANN202
    def hook(module, args, _output) -> None:  # noqa: ANN001
        dest, *sources = args
        scale = dest.norm().clamp_min(1e-12)
        gates = fusion.gates().tolist()
        for tap, gate, part in zip(site.sources, gates, fusion.source_contributions(dest, *sources), strict=True):
            out.append(LinkContribution(site.source_branch, tap.name, site.dest.name, gate,
                                        float(part.norm() / scale)))
    return hook


def _relative_change(before: object, after: object) -> float:
    a, _ = tree_flatten(before)
    b, _ = tree_flatten(after)
    pairs = [(x.float(), y.float()) for x, y in zip(a, b, strict=True) if isinstance(x, torch.Tensor)]
    diff = sum(float((x - y).norm() ** 2) for x, y in pairs) ** 0.5
    size = sum(float(x.norm() ** 2) for x, _ in pairs) ** 0.5
    return diff / max(size, 1e-12)


def _live_links(net: FusedNet) -> list[str]:
    """Auxiliary -> primary links whose gate and weights are both non-zero."""
    live = []
    for site, fusion in net.fusion_sites(dest_branch=PRIMARY):
        gates = fusion.gates().tolist()
        for j, (tap, gate) in enumerate(zip(site.sources, gates, strict=True)):
            if gate != 0.0 and bool(fusion.source_weight(j).any()):
                live.append(f"{site.source_branch}.{tap.name} -> primary.{site.dest.name} (gate {gate:.3g})")
    return live


def export(deployed: torch.nn.Module, *inputs: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of a deployed primary with a dynamic batch dimension on every input.

    Give example inputs with a batch of at least 2 (a batch of 1 is specialised by torch.export).
    """
    batch = torch.export.Dim("batch")
    names = [n.name for n in deployed.graph.nodes if n.op == "placeholder"] if isinstance(
        deployed, fx.GraphModule) else None
    dynamic = {name: {0: batch} for name in names[:len(inputs)]} if names else tuple({0: batch} for _ in inputs)
    return torch.export.export(deployed, tuple(inputs), dynamic_shapes=dynamic)


def export_onnx(deployed: torch.nn.Module, path: str, *inputs: torch.Tensor) -> None:
    """ONNX export (torch's dynamo exporter; needs ``onnx`` and ``onnxscript``) with a dynamic batch."""
    program = export(deployed, *inputs)
    torch.onnx.export(program, (), path, dynamo=True)
