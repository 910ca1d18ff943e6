"""BatchNorm folding on an eval-mode fx graph: every BatchNorm that follows a conv or linear is
merged into that layer's weights and removed.

Handles ``nn.BatchNorm*d``, subclasses that stay one call (timm's ``BatchNormAct2d``: its
activation is kept) and functional ``batch_norm`` calls on stored statistics, after module or
functional convolutions and linear layers. On a ``torch.export`` capture (ATen graph: ``aten.batch_norm``
after ``aten.conv2d`` / ``aten.linear`` / ..., weights read by ``get_attr``) the layer's weight and bias are
replaced at their own attribute paths, so the BatchNorm's tensors leave the graph module altogether.
What cannot be folded is reported with the reason. The arithmetic is ``torch.nn.utils.fusion``'s;
the graph module must own its modules and tensors (fold a copy).
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from .analysis import aten_packet, conv_groups, is_aten_conv, is_transposed_conv
from .capture import attribute

_aten = torch.ops.aten
_CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
_LINEAR_FUNCTIONS = {F.linear}
_F_BATCH_NORM = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_ATEN_BATCH_NORM = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
#: functional batch norms (targets, or ATen overload packets) -> the names of their positional arguments
_BATCH_NORM_SIGNATURES = {
    F.batch_norm: _F_BATCH_NORM,
    torch.batch_norm: _ATEN_BATCH_NORM,  # torch.batch_norm is ATen's: weight and bias before the statistics
    _aten.batch_norm: _ATEN_BATCH_NORM,
    _aten._native_batch_norm_legit_no_training: ("input", "weight", "bias", "running_mean", "running_var",
                                                 "momentum", "eps"),  # eval only; a tuple, output [0]
}
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
    outputs: list[fx.Node] = field(default_factory=list)  # nodes that carry its output: itself, or getitem [0]
    attributes: tuple[str, ...] = ()  # get_attr targets it reads (ATen graphs: dropped once nothing reads them)


@dataclass
class _Layer:
    """A functional convolution or linear layer: its weight and bias arguments, and how to fuse into it."""

    weight: object
    bias: object
    conv: bool
    transposed: bool = False
    groups: int = 1


def fold_batchnorm(gm: fx.GraphModule) -> FoldReport:
    """Fold BatchNorms into the conv/linear layers before them, in place; returns the report.

    Each call site is decided on the graph as it was, before anything changes: a norm module called at
    several sites (timm's ``BatchNormAct2d`` kept as one ``call_module``, used twice) folds into the layer
    before each foldable site and stays, unchanged, where another site cannot fold. On an ATen graph
    (``torch.export``) a layer's weight is rewritten where it is stored, so a weight read by any other node
    folds only where every reader is the same layer feeding the same statistics alone.
    """
    report = FoldReport()
    norms = [(node, norm) for node in gm.graph.nodes if (norm := _as_batch_norm(gm, node)) is not None]
    decided = [(node, norm, _why_not_foldable(gm, node, norm)) for node, norm in norms]
    layers = {node: _layer_key(gm, norm.input) for node, norm, reason in decided if not reason}
    folded_layers: set[object] = set()  # a layer called at several sites, each into this norm, folds once
    for node, norm, reason in decided:
        if reason:
            report.skipped.append((node.name, reason))
            continue
        layer = layers[node]
        if layer not in folded_layers:
            _fold(gm, norm.input, norm)
            folded_layers.add(layer)
        report.folded.append((node.name, norm.input.name))
    _replace_norms(gm, [(node, norm) for node, norm, reason in decided if not reason])
    gm.graph.eliminate_dead_code()
    _drop_unread(gm, {path for _, norm, reason in decided if not reason for path in norm.attributes})
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
                          module.eps, tail, [node])
    names = _BATCH_NORM_SIGNATURES.get(aten_packet(node) or node.target) if node.op == "call_function" else None
    if names is None:
        return None
    values = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    if values.get("training", False) is not False:
        return None
    outputs = _tuple_outputs(node) if "training" not in names else [node]
    tensors = {k: _stored_tensor(gm, values.get(k)) for k in ("running_mean", "running_var", "weight", "bias")}
    if outputs is None or tensors["running_mean"] is None or tensors["running_var"] is None:
        return None
    attributes = tuple(arg.target for k in tensors if isinstance(arg := values.get(k), fx.Node)
                       and arg.op == "get_attr") if _is_aten(node) else ()
    return _BatchNorm(values["input"], tensors["running_mean"], tensors["running_var"], tensors["weight"],
                      tensors["bias"], float(values.get("eps", 1e-5)), [], outputs, attributes)


def _is_aten(node: fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)


def _tuple_outputs(node: fx.Node) -> list[fx.Node] | None:
    """The ``getitem(node, 0)`` users of a norm that returns (output, statistics...), or None where
    anything else reads it."""
    users = list(node.users)
    if all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0 for u in users):
        return users
    return None


def _stored_tensor(gm: fx.GraphModule, arg: object) -> torch.Tensor | None:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = attribute(gm, arg.target)
        return value if isinstance(value, torch.Tensor) else None
    return None


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
    elif _is_aten(producer):
        return _why_not_in_place(gm, producer, norm)
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
    return node.op == "call_function" and (node.target in _CONV_FUNCTIONS or is_aten_conv(node))


def _is_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, nn.Linear) and _keeps_torch_forward(module)
    return node.op == "call_function" and (node.target in _LINEAR_FUNCTIONS or aten_packet(node) is _aten.linear)


def _keeps_torch_forward(module: nn.Module) -> bool:
    """A torch.nn layer, or a subclass that does not override forward: its output is linear in its
    weight, so BatchNorm folds into it (timm's StdConv2dSame standardises its weight: it does not)."""
    base = next(c for c in type(module).__mro__ if c.__module__.startswith("torch.nn.modules"))
    return type(module).forward is base.forward


def _functional_arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _functional_layer(node: fx.Node) -> _Layer:
    """The weight, bias and kind of a functional conv or linear node (torch or ATen)."""
    weight, bias = _functional_arg(node, 1, "weight"), _functional_arg(node, 2, "bias")
    if is_aten_conv(node):
        return _Layer(weight, bias, True, is_transposed_conv(node), conv_groups(node))
    return _Layer(weight, bias, node.target in _CONV_FUNCTIONS)


# ---------------------------------------------------------------------- ATen graphs: folding where stored

def _why_not_in_place(gm: fx.GraphModule, producer: fx.Node, norm: _BatchNorm) -> str | None:
    """Why the weight of an ATen layer cannot be rewritten where it is stored: it is read elsewhere, is not
    that norm's layout, or has another number of outputs."""
    layer = _functional_layer(producer)
    weight = _stored_tensor(gm, layer.weight)
    channels = weight.shape[1] * layer.groups if layer.transposed else weight.shape[0]
    if channels != norm.mean.numel():
        return f"{producer.name} has {channels} outputs, the norm {norm.mean.numel()} channels"
    value = producer.meta.get("val")
    if not layer.conv and isinstance(value, torch.Tensor) and value.dim() != 2:
        return f"{producer.name} is a linear layer on {value.dim()}-d inputs: the norm's channels are not its outputs"
    readers = _readers(gm, weight)
    if any(not _same_layer_into_same_norm(gm, reader, producer, norm) for reader in readers):
        names = ", ".join(sorted(r.name for r in readers if r is not producer))
        return (f"its weight {layer.weight.target} is also read by {names}, not each time as the same layer into "
                "the same norm alone: rewriting it would change them")
    bias = _stored_tensor(gm, layer.bias)
    if layer.bias is not None and (bias is None or not set(_readers(gm, bias)) <= set(readers)):
        return f"its bias {getattr(layer.bias, 'target', layer.bias)} is computed or read by another node too"
    return None


def _readers(gm: fx.GraphModule, tensor: torch.Tensor) -> list[fx.Node]:
    """Every node that reads ``tensor`` through a ``get_attr`` node (by any path)."""
    return [user for node in gm.graph.nodes if node.op == "get_attr" and _stored_tensor(gm, node) is tensor
            for user in node.users]


def _same_layer_into_same_norm(gm: fx.GraphModule, reader: fx.Node, producer: fx.Node, norm: _BatchNorm) -> bool:
    """``reader`` computes what ``producer`` computes (same op, weight as weight, same bias) and its output goes
    to a BatchNorm on the same statistics alone: one rewrite of the weight folds both."""
    if reader is producer:
        return True
    if reader.target != producer.target or len(reader.users) != 1:
        return False
    mine, theirs = _functional_layer(producer), _functional_layer(reader)
    if _stored_tensor(gm, theirs.weight) is not _stored_tensor(gm, mine.weight) or (
            theirs.transposed, theirs.groups) != (mine.transposed, mine.groups):
        return False
    if _stored_tensor(gm, theirs.bias) is not _stored_tensor(gm, mine.bias):
        return False
    other = _as_batch_norm(gm, next(iter(reader.users)))
    return other is not None and other.input is reader and other.eps == norm.eps and all(
        getattr(other, k) is getattr(norm, k) for k in ("mean", "var", "weight", "bias"))


def _layer_key(gm: fx.GraphModule, producer: fx.Node) -> object:
    """What one fold rewrites: a layer module, an ATen layer's stored weight, or one functional call."""
    if producer.op == "call_module":
        return producer.target
    if _is_aten(producer):
        return id(_stored_tensor(gm, _functional_layer(producer).weight))
    return producer.name


# ---------------------------------------------------------------------- folding

def _fold(gm: fx.GraphModule, producer: fx.Node, norm: _BatchNorm) -> None:
    if producer.op == "call_module":
        layer = gm.get_submodule(producer.target)
        weight, bias = _fused(layer.weight, layer.bias, norm, conv=isinstance(layer, nn.modules.conv._ConvNd),
                              transpose=getattr(layer, "transposed", False), groups=getattr(layer, "groups", 1))
        layer.weight, layer.bias = weight, bias
        return
    if _is_aten(producer):
        _fold_in_place(gm, producer, norm)
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
    _set_bias_arg(producer, new_bias, weight=new_weight)


def _fold_in_place(gm: fx.GraphModule, producer: fx.Node, norm: _BatchNorm) -> None:
    """Rewrite an ATen layer's weight (and bias) where they are stored; a layer without a bias gets one beside
    its weight (``<owner>.bias``), read by every node that reads the weight (all decided to be this layer)."""
    layer = _functional_layer(producer)
    old_weight, old_bias = _stored_tensor(gm, layer.weight), _stored_tensor(gm, layer.bias)
    weight, bias = _fused(old_weight, old_bias, norm, conv=layer.conv, transpose=layer.transposed,
                          groups=layer.groups)
    readers = _readers(gm, old_weight)
    for node in [n for n in gm.graph.nodes if n.op == "get_attr" and _stored_tensor(gm, n) is old_weight]:
        _store(gm, node.target, weight)
    if old_bias is not None:
        for node in [n for n in gm.graph.nodes if n.op == "get_attr" and _stored_tensor(gm, n) is old_bias]:
            _store(gm, node.target, bias)
        return
    owner = layer.weight.target.rpartition(".")[0]
    path = f"{owner}.bias" if owner else "bias"
    if getattr(gm.get_submodule(owner), "bias", None) is not None:
        path = _free_name(gm, path)
    _store(gm, path, bias)
    with gm.graph.inserting_after(layer.weight):
        bias_node = gm.graph.get_attr(path)
    for reader in readers:
        _set_bias_arg(reader, bias_node)


def _store(gm: fx.GraphModule, target: str, value: nn.Parameter) -> None:
    """Put ``value`` at ``target``: a parameter, or a buffer where a buffer was."""
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if name in owner._buffers:
        owner._buffers[name] = value.detach()
    else:
        setattr(owner, name, value)


def _set_bias_arg(node: fx.Node, bias: fx.Node, weight: fx.Node | None = None) -> None:
    """Make ``node`` (a functional conv/linear) read ``bias`` (and ``weight``, where given)."""
    args = list(node.args)
    if weight is not None:
        args[1] = weight
    if len(args) > 2:
        args[2] = bias
        node.args = tuple(args)
    else:
        node.args = tuple(args)
        node.kwargs = {**node.kwargs, "bias": bias}


def _drop_unread(gm: fx.GraphModule, targets: set[str]) -> None:
    """Delete the tensors at ``targets`` that no ``get_attr`` node reads any more (a folded norm's statistics
    and affine parameters on a module the graph still uses), so that no orphan tensor stays behind."""
    read = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    for target in sorted(targets - read):
        owner_path, _, name = target.rpartition(".")
        try:
            owner = gm.get_submodule(owner_path) if owner_path else gm
        except AttributeError:
            continue
        if hasattr(owner, name):
            delattr(owner, name)


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
            for output in norm.outputs:  # the norm itself, or the getitem [0] of one that returns a tuple
                output.replace_all_uses_with(norm.input)
                if output is not node:
                    gm.graph.erase_node(output)
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
