"""BatchNorm folding on an eval-mode fx graph: every BatchNorm that follows a conv or linear is
merged into that layer's weights and removed.

Handles ``nn.BatchNorm*d``, subclasses that stay one call (timm's ``BatchNormAct2d``: its
activation is kept) and functional ``batch_norm`` calls on stored statistics, after module or
functional convolutions and linear layers. What cannot be folded is reported with the reason.
The arithmetic is ``torch.nn.utils.fusion``'s; the graph module must own its modules (fold a copy).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

_CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
_LINEAR_FUNCTIONS = {F.linear}
_BATCH_NORM_FUNCTIONS = {F.batch_norm, torch.batch_norm}


@dataclass
class FoldReport:
    """What :func:`fold_batchnorm` did: (norm node, layer node) folded, (norm node, reason) not."""

    folded: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} BatchNorm(s) into the conv/linear before them"]
        lines += [f"  not folded: {norm}: {reason}" for norm, reason in self.skipped]
        return "\n".join(lines)


@dataclass
class _BatchNorm:
    input: fx.Node
    mean: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    tail: list[nn.Module]  # modules applied after the normalisation (BatchNormAct2d: drop, act)


def fold_batchnorm(gm: fx.GraphModule) -> FoldReport:
    """Fold BatchNorms into the conv/linear layers before them, in place; returns the report.

    Each call site is decided on the graph as it was, before anything changes: a norm module called at
    several sites (timm's ``BatchNormAct2d`` kept as one ``call_module``, used twice) folds into the layer
    before each foldable site and stays, unchanged, where another site cannot fold.
    """
    report = FoldReport()
    norms = [(node, norm) for node in gm.graph.nodes if (norm := _as_batch_norm(gm, node)) is not None]
    decided = [(node, norm, _why_not_foldable(gm, node, norm)) for node, norm in norms]
    folded_layers: set[str] = set()  # a layer module called at several sites, each into this norm, folds once
    for node, norm, reason in decided:
        if reason:
            report.skipped.append((node.name, reason))
            continue
        layer = norm.input.target if norm.input.op == "call_module" else norm.input.name
        if layer not in folded_layers:
            _fold(gm, norm.input, norm)
            folded_layers.add(layer)
        report.folded.append((node.name, norm.input.name))
    _replace_norms(gm, [(node, norm) for node, norm, reason in decided if not reason])
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return report


# ---------------------------------------------------------------------- recognising the pieces

def _as_batch_norm(gm: fx.GraphModule, node: fx.Node) -> _BatchNorm | None:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            return None
        tail = [m for m in (getattr(module, "drop", None), getattr(module, "act", None)) if isinstance(m, nn.Module)]
        return _BatchNorm(node.args[0], module.running_mean, module.running_var, module.weight, module.bias,
                          module.eps, tail)
    if node.op == "call_function" and node.target in _BATCH_NORM_FUNCTIONS:
        names = ["input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"]
        values = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
        if values.get("training", False) is not False:
            return None
        tensors = {k: _stored_tensor(gm, values.get(k)) for k in ("running_mean", "running_var", "weight", "bias")}
        if tensors["running_mean"] is None or tensors["running_var"] is None:
            return None
        return _BatchNorm(values["input"], tensors["running_mean"], tensors["running_var"], tensors["weight"],
                          tensors["bias"], float(values.get("eps", 1e-5)), [])
    return None


def _stored_tensor(gm: fx.GraphModule, arg: object) -> torch.Tensor | None:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = _get_attr(gm, arg.target)
        return value if isinstance(value, torch.Tensor) else None
    return None


def _get_attr(gm: fx.GraphModule, target: str) -> object:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _why_not_foldable(gm: fx.GraphModule, node: fx.Node, norm: _BatchNorm) -> str | None:
    producer = norm.input
    if not isinstance(producer, fx.Node) or not (_is_conv(gm, producer) or _is_linear(gm, producer)):
        return "its input is not a conv or linear layer"
    if len(producer.users) > 1:
        return f"the output of {producer.name} has {len(producer.users)} users, not only this norm"
    if norm.mean is None or norm.var is None:
        return "it has no running statistics"
    if producer.op == "call_module":
        calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == producer.target]
        if not all(_feeds_only(call, node) for call in calls):
            return (f"module {producer.target} is called {len(calls)} times, not each time into "
                    f"{node.target if node.op == 'call_module' else 'this norm'} alone")
        layer = gm.get_submodule(producer.target)
        channels = layer.out_channels if isinstance(layer, nn.modules.conv._ConvNd) else layer.out_features
        if channels != norm.mean.numel():
            return f"{producer.target} has {channels} outputs, the norm {norm.mean.numel()} channels"
    elif _stored_tensor(gm, _functional_arg(producer, 1, "weight")) is None:
        return f"the weight of {producer.name} is computed, not a stored tensor"
    return None


def _feeds_only(call: fx.Node, norm: fx.Node) -> bool:
    """Whether the output of ``call`` goes to one call of the norm module that ``norm`` calls, and nowhere else
    (a unit called twice: one fold of the layer serves both sites)."""
    if call is norm.args[0]:
        return len(call.users) == 1
    users = list(call.users)
    return (len(users) == 1 and norm.op == "call_module" and users[0].op == "call_module"
            and users[0].target == norm.target and users[0].args[0] is call)


def _is_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, nn.modules.conv._ConvNd) and _keeps_torch_forward(module)
    return node.op == "call_function" and node.target in _CONV_FUNCTIONS


def _is_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, nn.Linear) and _keeps_torch_forward(module)
    return node.op == "call_function" and node.target in _LINEAR_FUNCTIONS


def _keeps_torch_forward(module: nn.Module) -> bool:
    """A torch.nn layer, or a subclass that does not override forward: its output is linear in its
    weight, so BatchNorm folds into it (timm's StdConv2dSame standardises its weight: it does not)."""
    base = next(c for c in type(module).__mro__ if c.__module__.startswith("torch.nn.modules"))
    return type(module).forward is base.forward


def _functional_arg(node: fx.Node, index: int, name: str) -> object:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


# ---------------------------------------------------------------------- folding

def _fold(gm: fx.GraphModule, producer: fx.Node, norm: _BatchNorm) -> None:
    if producer.op == "call_module":
        layer = gm.get_submodule(producer.target)
        weight, bias = _fused(layer.weight, layer.bias, norm, conv=isinstance(layer, nn.modules.conv._ConvNd),
                              transpose=getattr(layer, "transposed", False), groups=getattr(layer, "groups", 1))
        layer.weight, layer.bias = weight, bias
        return
    weight_node = _functional_arg(producer, 1, "weight")
    bias = _stored_tensor(gm, _functional_arg(producer, 2, "bias"))
    weight, bias = _fused(_stored_tensor(gm, weight_node), bias, norm, conv=producer.target in _CONV_FUNCTIONS)
    prefix = f"folded_{producer.name}"
    gm.register_parameter(f"{prefix}_weight", weight)
    gm.register_parameter(f"{prefix}_bias", bias)
    with gm.graph.inserting_before(producer):
        new_weight = gm.graph.get_attr(f"{prefix}_weight")
        new_bias = gm.graph.get_attr(f"{prefix}_bias")
    args = list(producer.args)
    args[1] = new_weight
    if len(args) > 2:
        args[2] = new_bias
        producer.args = tuple(args)
    else:
        producer.args = tuple(args)
        producer.kwargs = {**producer.kwargs, "bias": new_bias}


def _fused(weight: torch.Tensor, bias: torch.Tensor | None, norm: _BatchNorm, conv: bool,
           transpose: bool = False, groups: int = 1) -> tuple[nn.Parameter, nn.Parameter]:
    with torch.no_grad():
        if conv and transpose:
            return _fused_transposed(weight, bias, norm, groups)
        if conv:
            return fuse_conv_bn_weights(weight, bias, norm.mean, norm.var, norm.eps, norm.weight, norm.bias,
                                        transpose=transpose)
        norm_weight = norm.weight if norm.weight is not None else torch.ones_like(norm.mean)
        norm_bias = norm.bias if norm.bias is not None else torch.zeros_like(norm.mean)
        return fuse_linear_bn_weights(weight, bias, norm.mean, norm.var, norm.eps, norm_weight, norm_bias)


def _fused_transposed(weight: torch.Tensor, bias: torch.Tensor | None, norm: _BatchNorm,
                      groups: int) -> tuple[nn.Parameter, nn.Parameter]:
    """A transposed convolution's weight is (in, out / groups, *kernel): output channel ``g * out/groups + j``
    is column ``j`` of group ``g`` (torch's ``fuse_conv_bn_weights`` assumes one group)."""
    scale = torch.rsqrt(norm.var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.mean * scale + (norm.bias if norm.bias is not None else 0.0)
    if bias is not None:
        shift = shift + bias * scale
    in_channels, per_group, *kernel = weight.shape
    grouped = weight.reshape(groups, in_channels // groups, per_group, *kernel)
    scaled = grouped * scale.reshape(groups, 1, per_group, *[1] * len(kernel)).to(weight.dtype)
    return (nn.Parameter(scaled.reshape(weight.shape), weight.requires_grad),
            nn.Parameter(shift.to(weight.dtype), weight.requires_grad))


def _replace_norms(gm: fx.GraphModule, folded: list[tuple[fx.Node, _BatchNorm]]) -> None:
    """Users of each folded norm read the layer's output, through the norm's own activation where it has
    one (``drop`` and ``act`` of ``BatchNormAct2d``, as one ``nn.Sequential``). That tail takes the norm
    module's place where every call site of the module folded, else a new name beside it."""
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    tails: dict[str, str] = {}  # norm module path -> path of its tail module
    for node, norm in folded:
        if not norm.tail:
            node.replace_all_uses_with(norm.input)
            gm.graph.erase_node(node)
            continue
        if node.target not in tails:
            every_site = sum(n.target == node.target for n, _ in folded) == calls[node.target]
            tails[node.target] = node.target if every_site else _free_name(gm, f"{node.target}_act")
            gm.add_submodule(tails[node.target], nn.Sequential(*norm.tail))  # the norm's parameters go away
        node.target, node.args, node.kwargs = tails[node.target], (norm.input,), {}


def _free_name(gm: fx.GraphModule, path: str) -> str:
    """``path``, or ``path`` with a number appended, that no submodule or attribute of ``gm`` uses yet."""
    owner, _, name = path.rpartition(".")
    parent = gm.get_submodule(owner) if owner else gm
    candidate, k = name, 1
    while hasattr(parent, candidate):
        candidate, k = f"{name}{k}", k + 1
    return f"{owner}.{candidate}" if owner else candidate
