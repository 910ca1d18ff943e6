"""Step 6 — prune and detach: hand back the primary alone, at exactly its single-task cost.

:func:`detach_primary` re-traces the trained primary (a copy) in eval mode and folds its
BatchNorms: auxiliary branches, fusion weights and gates are simply not in that graph.
:func:`prune` first measures what cutting the auxiliary -> primary links changes on a probe batch
and refuses, naming the links, where that is above tolerance (DESIGN I5). Both check the deployed
module against the fused network's primary output on that probe (DESIGN I2): a re-trace can differ
from the graph that was trained, where the primary changed after attach().
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten

from .analysis import eval_mode
from .errors import AuxwrapArgumentError, AuxwrapError, check_real
from .examples import as_input_tuple
from .fold import fold_batchnorm
from .fused import FusedNet, unwrap
from .plan import PRIMARY
from .trace import trace


class AuxwrapPruneError(AuxwrapError):
    """Cutting the auxiliary -> primary links would change the primary's output."""


class AuxwrapDeployError(AuxwrapError):
    """The deployed primary does not compute what the fused network's primary computes (the primary was
    changed after attach(), or a forward depends on state its traced graph does not hold)."""


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


def deploy_tolerance(dtype: torch.dtype) -> float:
    """The largest relative difference allowed between the deployed primary and the fused network's primary
    on the probe: 1e-5 in float32 and float64 (DESIGN I2), ``8 * eps`` of coarser types (float16 7.8e-3,
    bfloat16 6.3e-2), where BatchNorm folding alone changes the output by about ``1.3 * eps``."""
    return max(1e-5, 8 * torch.finfo(dtype).eps)


def detach_primary(net: FusedNet, probe: object = None) -> fx.GraphModule:
    """The primary alone as a new eval-mode ``GraphModule`` with its BatchNorms folded.

    Refuses while an auxiliary -> primary link can still contribute (use :func:`prune`). The module is
    checked against the fused network's eval-mode primary output on ``probe`` (default: the example
    inputs given to attach) and refused with :class:`AuxwrapDeployError` where it differs by more than
    :func:`deploy_tolerance`. The report of what was folded is ``deployed.fold_report``, the measured
    relative difference ``deployed.relative_error``.
    """
    net = _fused_net(net, "detach_primary")
    inputs = _probe_inputs(net, probe)
    live = _live_links(net)
    if live:
        raise AuxwrapPruneError(
            f"{len(live)} auxiliary -> primary link(s) are not cut (e.g. {live[0]}); detaching now would "
            "change the primary's output. Call auxwrap.prune(net) to measure and cut them.")
    with _naming_the_probe(net, inputs), eval_mode(net), torch.no_grad():
        expected = net(*inputs).primary
    return _checked_deploy(net, inputs, expected)


def fold_primary(net: FusedNet) -> fx.GraphModule:
    """A copy of the primary, captured in eval mode as attach() captured it, BatchNorms folded; links and outputs
    are not checked."""
    capture = net.captures.get(PRIMARY, "fx")  # a network pickled before captures existed was traced by fx
    options = net.trace_options if capture == "fx" else {}
    return fold_module(net.primary, capture=capture, example_inputs=net.example_inputs, **options)


def fold_module(model: nn.Module, *, capture: str = "auto", example_inputs: Any = None,
                **trace_options: Any) -> fx.GraphModule:
    """A copy of ``model`` captured in eval mode (:func:`auxwrap.trace`: ``capture``, ``example_inputs`` and the
    torch.fx options) with its BatchNorms folded (the report on ``fold_report``): how a model without
    auxiliaries, e.g. a single-task baseline, is deployed like a pruned primary."""
    deployed = trace(copy.deepcopy(model).eval(), training=False, capture=capture, example_inputs=example_inputs,
                     **trace_options).graph_module
    deployed.fold_report = fold_batchnorm(deployed)
    return deployed.eval()


def prune(net: FusedNet, tol: float = 1e-4, probe: object = None, force: bool = False) -> fx.GraphModule:
    """Cut the auxiliary -> primary links and return :func:`detach_primary`'s module.

    Measures the primary's output on ``probe`` (default: the example inputs given to attach)
    with the links and without them; refuses with :class:`AuxwrapPruneError` naming the links
    that contribute where the relative change is above ``tol`` (a finite number >= 0). ``force=True``
    cuts anyway and warns with the measured change. The deployed module is checked on the same probe
    (see :func:`detach_primary`) before anything is cut. In mode="grad" there is nothing to cut.
    """
    net = _fused_net(net, "prune")
    tol = _check_tol(tol)
    inputs = _probe_inputs(net, probe)
    if net.mode == "grad":
        return detach_primary(net, inputs)
    before, after, links = _cut_outputs(net, inputs)
    change = _relative_change(before, after)
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
    deployed = _checked_deploy(net, inputs, after)  # checked against the cut network before cutting it
    cut_links(net)
    return deployed


def _fused_net(net: object, caller: str) -> FusedNet:
    """``net`` as the FusedNet it is (or wraps, for DDP); an AuxwrapArgumentError naming ``caller`` else."""
    return unwrap(net, f"{caller}(net): net")


def _check_tol(tol: object) -> float:
    return check_real("tol", tol, 0.0, why="the largest relative change of the primary's output that cutting "
                      "the auxiliary -> primary links may cause",
                      fix="e.g. prune(net, tol=1e-3) (default 1e-4; 0 accepts only links that change nothing)")


def _probe_inputs(net: FusedNet, probe: object) -> tuple:
    return as_input_tuple(net.example_inputs if probe is None else probe, "the probe")


def _describe(inputs: tuple) -> str:
    """Shape, dtype and device of each input, e.g. ``(2, 3, 32, 32) float32 on cpu``."""
    return ", ".join(f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')} on {x.device}"
                     if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs)


@contextlib.contextmanager
def _naming_the_probe(net: FusedNet, inputs: tuple) -> Iterator[None]:
    """A failure of the fused network on a probe unlike the example inputs (shape, dtype, device) becomes an
    AuxwrapArgumentError that names the probe; other failures pass through unchanged."""
    try:
        yield
    except AuxwrapError:
        raise
    except Exception as error:
        given, expected = _describe(inputs), _describe(net.example_inputs)
        if given == expected:
            raise
        raise AuxwrapArgumentError(
            f"the probe [{given}] is unlike the example inputs given to attach() [{expected}], and the fused "
            f"network fails on it ({type(error).__name__}: {_first_line(error)}); "
            "pass a probe the primary's forward() takes, shaped like the example inputs, or leave probe=None "
            "to use the example inputs.") from error


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [""])[0]


def _checked_deploy(net: FusedNet, inputs: tuple, expected: object) -> fx.GraphModule:
    """:func:`fold_primary`, refused where it does not reproduce ``expected`` (the fused network's
    eval-mode primary output on ``inputs``) within :func:`deploy_tolerance`."""
    deployed = fold_primary(net)
    why = ("Either the primary (or one of its submodules) was replaced or changed after attach(): the fused "
           "network still runs the graph traced then, the deployed module a trace of the primary now; re-run "
           "auxwrap.attach() on the changed model (and train it) to deploy it. Or a module's forward depends on "
           "state the traced graph does not hold (a Python attribute or flag read at trace time and changed "
           "since, randomness in eval mode): make it a buffer or an input, or register the module as a leaf "
           "with attach(..., leaf_modules=(...)). Or the model is so ill-conditioned that rounding alone moves "
           "its output by this much (compare its own float32 output with float64): check the deployment in "
           "float64 (net.double(), then prune). The folding is in deployed.fold_report.")
    try:
        with torch.no_grad():
            got = deployed(*inputs)
    except Exception as error:
        raise AuxwrapDeployError(
            f"the deployed primary fails on the probe [{_describe(inputs)}] that the fused network runs "
            f"({type(error).__name__}: {_first_line(error)}). {why}") from error
    if not _finite(expected):
        raise AuxwrapDeployError(
            f"the fused network's primary output on the probe [{_describe(inputs)}] has NaN or inf values, so "
            "the deployed primary cannot be checked against it; check the trained weights (a diverged run?) "
            "or pass a probe on which the primary's output is finite.")
    error, dtype = _relative_change(expected, got), _least_precise(expected)
    if not error <= deploy_tolerance(dtype):
        raise AuxwrapDeployError(
            f"the deployed primary differs from the fused network's primary output by {error:.3g} (relative) on "
            f"the probe [{_describe(inputs)}], above {deploy_tolerance(dtype):.2g} for {dtype}: it would not "
            f"compute what was trained. {why}")
    deployed.relative_error = error
    return deployed


def _tensors(value: object) -> list[torch.Tensor]:
    return [x for x in tree_flatten(value)[0] if isinstance(x, torch.Tensor)]


def _least_precise(value: object) -> torch.dtype:
    """The floating dtype of ``value``'s tensors with the largest epsilon (float32 where there is none)."""
    dtypes = [x.dtype for x in _tensors(value) if x.is_floating_point()] or [torch.float32]
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def _finite(value: object) -> bool:
    return all(bool(torch.isfinite(x).all()) for x in _tensors(value) if x.is_floating_point())


def cut_links(net: FusedNet) -> None:
    """Set every auxiliary -> primary gate to exactly zero."""
    for _, fusion in net.gated_sites(PRIMARY):
        fusion.cut()


def measure_cut(net: FusedNet, inputs: tuple) -> tuple[float, list[LinkContribution]]:
    """Relative change of the primary's output when the auxiliary -> primary links are cut, and what
    each link adds at its destination; eval mode, no gradients, the network left as it was."""
    before, after, contributions = _cut_outputs(net, inputs)
    return _relative_change(before, after), contributions


def _cut_outputs(net: FusedNet, inputs: tuple) -> tuple[object, object, list[LinkContribution]]:
    """The primary's output with the auxiliary -> primary links and without them, and what each link adds
    at its destination (:func:`measure_cut`)."""
    contributions: list[LinkContribution] = []
    hooks = [fusion.register_forward_hook(_recorder(site, fusion, contributions))
             for site, fusion in net.fusion_sites(dest_branch=PRIMARY)]
    gated = [fusion for _, fusion in net.gated_sites(PRIMARY)]
    saved = [f.live.clone() for f in gated]
    try:
        with _naming_the_probe(net, inputs), eval_mode(net), torch.no_grad():
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
    return before, after, contributions


def _recorder(site, fusion, out: list[LinkContribution]):  # noqa: ANN001, ANN202
    def hook(module, args, _output) -> None:  # noqa: ANN001
        dest, *sources = args
        scale = dest.norm().clamp_min(1e-12)
        links = site.connections(fusion.gates().tolist())
        for link, part in zip(links, fusion.source_contributions(dest, *sources), strict=True):
            out.append(LinkContribution(link.source_branch, link.source, link.dest, link.gate,
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
        for j, link in enumerate(site.connections(fusion.gates().tolist())):
            if link.gate != 0.0 and bool(fusion.source_weight(j).any()):
                live.append(f"{link.source_branch}.{link.source} -> primary.{link.dest} (gate {link.gate:.3g})")
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
