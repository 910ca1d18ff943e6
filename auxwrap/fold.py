"""BatchNorm folding on an eval-mode fx graph: every BatchNorm that follows a conv or linear is
merged into that layer's weights and removed.

Handles ``nn.BatchNorm*d``, subclasses that stay one call (timm's ``BatchNormAct2d``: its
activation is kept) and functional ``batch_norm`` calls on stored statistics, after module or
functional convolutions and linear layers. What cannot be folded is reported with the reason.
The arithmetic is ``torch.nn.utils.fusion``'s; the graph module must own its modules (fold a copy).
"""

from __future__ import annotations

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
    """Fold BatchNorms into the conv/linear layers before them, in place; returns the report."""
    report = FoldReport()
    for node in list(gm.graph.nodes):
        norm = _as_batch_norm(gm, node)
        if norm is None:
            continue
        reason = _why_not_foldable(gm, node, norm)
        if reason:
            report.skipped.append((node.name, reason))
            continue
        _fold(gm, norm.input, norm)
        _replace_norm(gm, node, norm)
        report.folded.append((node.name, norm.input.name))
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
        if len(calls) > 1:
            return f"module {producer.target} is called {len(calls)} times"
        layer = gm.get_submodule(producer.target)
        channels = layer.out_channels if isinstance(layer, nn.modules.conv._ConvNd) else layer.out_features
        if channels != norm.mean.numel():
            return f"{producer.target} has {channels} outputs, the norm {norm.mean.numel()} channels"
    elif _stored_tensor(gm, _functional_arg(producer, 1, "weight")) is None:
        return f"the weight of {producer.name} is computed, not a stored tensor"
    return None


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
                              transpose=getattr(layer, "transposed", False))
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
           transpose: bool = False) -> tuple[nn.Parameter, nn.Parameter]:
    with torch.no_grad():
        if conv:
            return fuse_conv_bn_weights(weight, bias, norm.mean, norm.var, norm.eps, norm.weight, norm.bias,
                                        transpose=transpose)
        norm_weight = norm.weight if norm.weight is not None else torch.ones_like(norm.mean)
        norm_bias = norm.bias if norm.bias is not None else torch.zeros_like(norm.mean)
        return fuse_linear_bn_weights(weight, bias, norm.mean, norm.var, norm.eps, norm_weight, norm_bias)


def _replace_norm(gm: fx.GraphModule, node: fx.Node, norm: _BatchNorm) -> None:
    """Users of the norm read the layer's output, through the norm's own activation where it has one."""
    replacement = norm.input
    if norm.tail:
        tail = nn.Sequential(*norm.tail)
        owner, _, name = node.target.rpartition(".")
        setattr(gm.get_submodule(owner) if owner else gm, name, tail)  # the BatchNorm's parameters go away
        replacement = node  # the node now calls the tail on the layer's output
        node.args = (norm.input,)
        return
    node.replace_all_uses_with(replacement)
    gm.graph.erase_node(node)
