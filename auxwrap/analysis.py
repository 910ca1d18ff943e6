"""Facts about a traced graph that fusion-point discovery stands on.

- what each node computes: a weight op (conv / linear), a norm, an activation;
- what each node outputs on example inputs: tensor shape and layout (NCHW or NHWC map, tokens, vector);
- which nodes lie on every path from the inputs to the output (the *main path*).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten

from .capture import EXPORT, attribute
from .errors import AuxwrapArgumentError
from .examples import device_and_dtype
from .trace import Traced, is_fx_leaf, kept_as_found

NCHW, NHWC, TOKENS, VECTOR, OTHER = "nchw", "nhwc", "tokens", "vector", "other"

_WEIGHT_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.linear, torch.conv1d, torch.conv2d, torch.conv3d}
_NORM_MODULES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_NORM_FUNCTIONS = {F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, torch.batch_norm,
                   torch.layer_norm, torch.group_norm}
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
                       nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
                       nn.Hardtanh, nn.Softplus)
_ACTIVATION_FUNCTIONS = {F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu,
                         F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, torch.relu,
                         torch.relu_, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh}
_ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _aten_packets(*names: str) -> frozenset:
    """The ``torch.ops.aten`` operator packets of these names that this torch version has."""
    return frozenset(getattr(torch.ops.aten, name) for name in names if hasattr(torch.ops.aten, name))


# torch.export captures (ATen level): node.target is an OpOverload, matched by its packet (all overloads)
_ATEN_CONVS = _aten_packets("conv1d", "conv2d", "conv3d", "convolution", "_convolution")
_ATEN_TRANSPOSED_CONVS = _aten_packets("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
_ATEN_WEIGHT_OPS = _ATEN_CONVS | _ATEN_TRANSPOSED_CONVS | _aten_packets("linear")
_ATEN_BATCH_NORMS = _aten_packets("batch_norm", "native_batch_norm", "_native_batch_norm_legit",
                                  "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional",
                                  "instance_norm")
_ATEN_LAYER_NORMS = _aten_packets("layer_norm", "native_layer_norm")
_ATEN_GROUP_NORMS = _aten_packets("group_norm", "native_group_norm")
_ATEN_NORMS = _ATEN_BATCH_NORMS | _ATEN_LAYER_NORMS | _ATEN_GROUP_NORMS
_ATEN_ACTIVATIONS = _aten_packets(*(name + suffix for suffix in ("", "_") for name in (
    "relu", "relu6", "leaky_relu", "prelu", "_prelu_kernel", "rrelu", "elu", "selu", "celu", "gelu", "silu",
    "mish", "hardswish", "hardsigmoid", "hardtanh", "sigmoid", "tanh", "softplus")))
#: ops that return their input's values: a dropout when it drops nothing, copies and aliases
_ATEN_DROPOUTS = _aten_packets("dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout")
_ATEN_COPIES = _aten_packets("clone", "alias", "contiguous", "detach", "lift_fresh_copy")


# --------------------------------------------------------------------------- what a node computes

def aten_packet(node: fx.Node) -> object | None:
    """The ATen operator packet a torch.export node calls (``torch.ops.aten.conv2d`` for
    ``aten.conv2d.default``), else None."""
    packet = getattr(node.target, "overloadpacket", None) if node.op == "call_function" else None
    return packet if isinstance(packet, torch._ops.OpOverloadPacket) else None


def is_weight_op(traced: Traced, node: fx.Node) -> bool:
    """A convolution or linear layer (module, functional or ATen op), or an opaque leaf module with weights."""
    if aten_packet(node) is not None:
        return aten_packet(node) in _ATEN_WEIGHT_OPS
    if node.op == "call_function":
        return node.target in _WEIGHT_FUNCTIONS
    module = traced.target_module(node)
    if module is None or isinstance(module, _NORM_MODULES):
        return False
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        return True
    return any(True for _ in module.parameters())


def is_norm_op(traced: Traced, node: fx.Node) -> bool:
    if aten_packet(node) is not None:
        return aten_packet(node) in _ATEN_NORMS
    if node.op == "call_function":
        return node.target in _NORM_FUNCTIONS
    return isinstance(traced.target_module(node), _NORM_MODULES)


def is_activation(traced: Traced, node: fx.Node) -> bool:
    if aten_packet(node) is not None:
        return aten_packet(node) in _ATEN_ACTIVATIONS
    if node.op == "call_function":
        return node.target in _ACTIVATION_FUNCTIONS
    if node.op == "call_method":
        return node.target in _ACTIVATION_METHODS
    return isinstance(traced.target_module(node), _ACTIVATION_MODULES)


def norm_includes_activation(traced: Traced, node: fx.Node) -> bool:
    """timm's ``BatchNormAct2d`` and kin: a norm module that applies its own activation (for a torch.export
    node: the norm node lies inside such a module, which torch.fx calls as one opaque module)."""
    module = traced.target_module(node) if node.op == "call_module" else traced.modules.get(
        opaque_module(traced, node) or "")
    act = getattr(module, "act", None)
    return isinstance(act, nn.Module) and not isinstance(act, nn.Identity)


def owner(traced: Traced, node: fx.Node) -> str:
    """The path of the module that owns ``node`` as torch.fx records it: :meth:`Traced.owner`, except that a
    torch.export node inside a module torch.fx keeps opaque (:func:`opaque_module`) belongs to that module."""
    return (opaque_module(traced, node) if node.op != "call_module" else None) or traced.owner(node)


def opaque_module(traced: Traced, node: fx.Node) -> str | None:
    """The path of the module that torch.fx calls as one opaque ``call_module`` node and that ``node`` belongs
    to: a torch.fx node's own ``call_module`` target; for a torch.export node, the outermost module running
    when it was recorded that torch.fx keeps opaque (torch.nn's own modules, timm's no-trace registry). None
    elsewhere. It lets the two captures name and count the same things (timm's ``BatchNormAct2d`` is one
    point ``bn1`` in both, not ``bn1`` and ``bn1.act``)."""
    if node.op == "call_module":
        return node.target
    call = opaque_call(traced, node)
    return None if call is None else call[1]


def opaque_call(traced: Traced, node: fx.Node) -> tuple[str, str] | None:
    """For a torch.export node inside a module torch.fx keeps opaque (:func:`opaque_module`): which call of that
    module it belongs to (``nn_module_stack``'s key, unique per call: a module called twice is two calls, as
    torch.fx's two ``call_module`` nodes) and the module's path. None for other nodes."""
    if traced.capture != EXPORT or node.op == "call_module":
        return None
    for key, (path, _cls) in (node.meta.get("nn_module_stack") or {}).items():
        module = traced.modules.get(path)
        if path and module is not None and is_fx_leaf(module, path):
            return key, path
    return None


def is_identity(traced: Traced, node: fx.Node) -> bool:
    """A node that returns its input's values: ``nn.Identity``, a dropout that drops nothing (probability 0,
    timm's ``drop=0.``; at ATen level also one captured in eval mode, ``train=False``), an ATen copy or alias."""
    packet = aten_packet(node)
    if packet is not None:
        if packet in _ATEN_DROPOUTS:
            p, train = (list(node.args[1:3]) + [node.kwargs.get("p"), node.kwargs.get("train")])[:2]
            return p == 0 or train is False
        return packet in _ATEN_COPIES
    module = traced.target_module(node)
    if isinstance(module, nn.Identity):
        return True
    return isinstance(module, nn.modules.dropout._DropoutNd) and module.p == 0


def mutates_input(traced: Traced, node: fx.Node) -> bool:
    """An in-place op: ``nn.ReLU(inplace=True)``, ``x.relu_()``, ``F.relu(x, inplace=True)``, and an ATen op whose
    schema writes its first argument (``aten.add_.Tensor``, ``aten.relu_.default``)."""
    if aten_packet(node) is not None:
        arguments = node.target._schema.arguments
        return bool(arguments) and arguments[0].alias_info is not None and arguments[0].alias_info.is_write
    if node.op == "call_module":
        return getattr(traced.target_module(node), "inplace", False) is True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.kwargs.get("inplace") is True or (name.endswith("_") and not name.startswith("_")) or (
            name.startswith("i") and node.target in _INPLACE_OPERATORS)
    return False


def channels_of(traced: Traced, node: fx.Node) -> int | None:
    """The number of output channels a weight or norm op defines, if it is known."""
    if aten_packet(node) is not None:
        return _aten_channels(traced, node)
    module = traced.target_module(node)
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    return None


def _aten_channels(traced: Traced, node: fx.Node) -> int | None:
    """:func:`channels_of` an ATen node, from the shape of its weight (its running mean where a batch norm has
    no weight) or a layer norm's ``normalized_shape``."""
    packet, args = aten_packet(node), node.args
    if packet in _ATEN_LAYER_NORMS:
        shape = args[1] if len(args) > 1 else node.kwargs.get("normalized_shape")
        return int(shape[-1]) if isinstance(shape, (list, tuple)) and shape else None
    if packet in _ATEN_GROUP_NORMS:
        shape = _shape_of(traced, args[2] if len(args) > 2 else None)
    elif packet in _ATEN_BATCH_NORMS:  # (input, weight, bias, running_mean, ...) in each of them
        shape = _shape_of(traced, args[1] if len(args) > 1 else None) or _shape_of(
            traced, args[3] if len(args) > 3 and packet is not torch.ops.aten.instance_norm else None)
    elif packet in _ATEN_WEIGHT_OPS:
        shape = _shape_of(traced, args[1] if len(args) > 1 else None)
        if shape and is_transposed_conv(node):  # weight (in, out / groups, ...)
            return shape[1] * conv_groups(node) if len(shape) > 1 else None
    else:
        return None
    return shape[0] if shape else None


def is_aten_conv(node: fx.Node) -> bool:
    """An ATen convolution, transposed or not (``aten.conv2d``, ``aten.conv_transpose2d``, ``aten.convolution``)."""
    return aten_packet(node) in _ATEN_CONVS | _ATEN_TRANSPOSED_CONVS


def is_transposed_conv(node: fx.Node) -> bool:
    """``aten.conv_transpose*d``, or ``aten.convolution`` with ``transposed=True`` (its 7th argument)."""
    if aten_packet(node) in _ATEN_TRANSPOSED_CONVS:
        return True
    transposed = node.args[6] if len(node.args) > 6 else node.kwargs.get("transposed")
    return aten_packet(node) in _ATEN_CONVS and transposed is True


def conv_groups(node: fx.Node) -> int:
    """The ``groups`` argument of an ATen convolution (1 where it is not given)."""
    schema = [a.name for a in node.target._schema.arguments]
    position = schema.index("groups") if "groups" in schema else None
    if position is not None and position < len(node.args):
        return int(node.args[position])
    return int(node.kwargs.get("groups", 1))


def _shape_of(traced: Traced, arg: object) -> tuple[int, ...] | None:
    """The shape of the tensor a node argument holds: from the capture's fake value, or the attribute a
    ``get_attr`` node reads."""
    if not isinstance(arg, fx.Node):
        return None
    value = arg.meta.get("val")
    if value is None and arg.op == "get_attr":
        with contextlib.suppress(AttributeError):
            value = attribute(traced.graph_module, arg.target)
    return tuple(int(d) for d in value.shape) if isinstance(value, torch.Tensor) else None


# --------------------------------------------------------------------------- what a node outputs

@dataclass(frozen=True)
class Value:
    """What one node produced on the example inputs."""

    shape: tuple[int, ...] | None  # None unless the output is a single tensor
    carries_tensor: bool           # a tensor, or a container holding one


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run in eval mode (no BatchNorm statistics updated, no dropout), then restore every flag."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in flags.items():
            module.training = training


class _ValueRecorder(fx.Interpreter):
    def __init__(self, graph_module: fx.GraphModule):
        super().__init__(graph_module)
        self.values: dict[fx.Node, Value] = {}

    def run_node(self, n: fx.Node):  # noqa: ANN201
        result = super().run_node(n)
        leaves, _ = tree_flatten(result)
        shape = tuple(result.shape) if isinstance(result, torch.Tensor) else None
        self.values[n] = Value(shape, any(isinstance(x, torch.Tensor) for x in leaves))
        return result


def propagate(traced: Traced, example_inputs: tuple) -> dict[fx.Node, Value]:
    """Run the graph once on ``example_inputs`` (eval mode, no grad) and record every node's output.

    The user's model is left as found (:func:`auxwrap.trace.kept_as_found`): a graph that updates a
    buffer in place (``self.calls.add_(1)``) changes nothing that outlives this run.
    """
    recorder = _ValueRecorder(traced.graph_module)
    try:
        with kept_as_found(traced.model), eval_mode(traced.graph_module), torch.no_grad():
            recorder.run(*example_inputs)
    except Exception as error:
        cause = f"{type(error).__name__}: {error}"
        mismatch = _dtype_mismatch(traced.model, example_inputs)
        if mismatch is not None:
            raise AuxwrapArgumentError(f"{traced.name}: {mismatch} It failed with {cause}") from error
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in example_inputs]
        raise AuxwrapArgumentError(
            f"{traced.name} failed on the example inputs {shapes}: {cause}; "
            "pass example_inputs that the model's forward() accepts.") from error
    return recorder.values


def _dtype_mismatch(model: nn.Module, example_inputs: tuple) -> str | None:
    """Where floating-point example inputs and the model's parameters differ in dtype: that, and the fix."""
    if not any(p.is_floating_point() for p in model.parameters()):
        return None
    _, dtype = device_and_dtype(model)
    given = sorted({str(x.dtype) for x in example_inputs if isinstance(x, torch.Tensor) and x.is_floating_point()}
                   - {str(dtype)})
    if not given:
        return None
    return (f"the example inputs are {', '.join(given)} but its parameters are {dtype}; pass example_inputs of "
            f"that dtype (x.to({dtype})), or convert every model to one dtype with .to(dtype) before attach().")


def layout_of(traced: Traced, node: fx.Node, shape: tuple[int, ...] | None) -> str:
    """NCHW or NHWC spatial map, tokens (B, N, C), vector (B, C), or other."""
    if shape is None:
        return OTHER
    if len(shape) == 2:
        return VECTOR
    if len(shape) == 3:
        return TOKENS
    if len(shape) != 4:
        return OTHER
    channels = _nearest_channel_count(traced, node)
    if channels is not None and shape[3] == channels and shape[1] != channels:
        return NHWC  # e.g. Swin blocks in timm: (B, H, W, C)
    return NCHW


def _nearest_channel_count(traced: Traced, node: fx.Node, budget: int = 64) -> int | None:
    """Channel count of the closest weight/norm op upstream of ``node`` (breadth first)."""
    frontier, seen = [node], {node}
    while frontier and budget > 0:
        nxt = []
        for current in frontier:
            budget -= 1
            channels = channels_of(traced, current)
            if channels is not None:
                return channels
            for arg in current.all_input_nodes:
                if arg not in seen:
                    seen.add(arg)
                    nxt.append(arg)
        frontier = nxt
    return None


# --------------------------------------------------------------------------- the main path

def main_path(graph: fx.Graph, values: dict[fx.Node, Value]) -> set[fx.Node]:
    """Tensor nodes that every input → output path of tensors goes through.

    Scanning the graph in order, a node is on every path exactly when, right after it, all the
    edges from already-seen relevant nodes to later ones start at that node. Shape reads
    (``x.shape[0]``) carry no tensor and are left out, so they never hide a cut.
    """
    order = [n for n in graph.nodes if values.get(n, Value(None, False)).carries_tensor or n.op == "output"]
    relevant = _between_inputs_and_output(order)
    position = {n: i for i, n in enumerate(order)}
    open_edges: dict[fx.Node, int] = {}  # source node -> number of relevant edges still to close
    cuts = set()
    for node in order:
        if node not in relevant:
            continue
        for arg in set(node.all_input_nodes):
            if arg in open_edges:
                open_edges[arg] -= 1
                if open_edges[arg] == 0:
                    del open_edges[arg]
        later_users = [u for u in node.users if u in relevant and position[u] > position[node]]
        if later_users:
            open_edges[node] = len(later_users)
        if list(open_edges) == [node] and node.op != "placeholder":
            cuts.add(node)
    return cuts


def _between_inputs_and_output(order: list[fx.Node]) -> set[fx.Node]:
    members = set(order)
    from_inputs = set()
    for node in order:
        if node.op == "placeholder" or any(a in from_inputs for a in node.all_input_nodes):
            from_inputs.add(node)
    to_output = set()
    for node in reversed(order):
        if node.op == "output" or any(u in to_output for u in node.users if u in members):
            to_output.add(node)
    return from_inputs & to_output
