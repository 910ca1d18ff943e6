"""Step 7 — count: FLOPs (2 x MACs), parameters and norm layers of one forward (and backward) pass.

Built on ``torch.utils.flop_counter.FlopCounterMode``, which counts convolutions and matrix products
only. On the CPU, fused attention runs as ``_scaled_dot_product_flash_attention_for_cpu``, which
torch does not count; auxwrap registers the standard attention formula for it (forward and
backward), so a ViT counts the same with fused attention on or off. Before torch fixed it
(pytorch/pytorch#183405), the backward of a grouped convolution counted the weight gradient
``groups`` times too high (a depthwise convolution's backward C + 1 times its forward, C channels);
:func:`count_flops` then uses the correct formula. Norms are never counted as FLOPs: the report
lists the number of norm layers beside them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import (
    FlopCounterMode,
    conv_flop_count,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from . import analysis
from .capture import AUTO
from .trace import AuxwrapCaptureWarning, Traced, kept_as_found, trace

_aten = torch.ops.aten


def _register_cpu_attention_formulas() -> None:
    forward = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    try:
        if forward is not None:
            @register_flop_formula(forward)
            def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
                return sdpa_flop_count(query_shape, key_shape, value_shape)
        if backward is not None:
            @register_flop_formula(backward)
            def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args,  # noqa: ANN001
                                   out_shape=None, **kwargs) -> int:
                return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)
    except RuntimeError:  # already registered (by torch itself in a later release, or a reload)
        pass


_register_cpu_attention_formulas()


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation,  # noqa: ANN001
                        transposed, _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """``aten.convolution_backward``: the input gradient and the weight gradient each cost one forward
    convolution (grouped or not: the weight's shape holds the input channels per group)."""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (bool(output_mask[0]) + bool(output_mask[1]))


def _formula_corrections() -> dict:
    """The formulas :func:`count_flops` puts in place of torch's: the convolution backward where torch's
    formula miscounts a grouped convolution (probed on a depthwise one), none where torch counts it right."""
    op = _aten.convolution_backward
    meta = [torch.empty(shape, device="meta") for shape in ((1, 2, 3), (1, 2, 3), (2, 1, 1))]
    args = (*meta, None, [1], [0], [1], False, [0], 2, [True, True, False])
    expected = flop_counter.shape_wrapper(_conv_backward_flop)(*args, out_val=(meta[1], meta[2], None))
    try:
        correct = flop_counter.flop_registry[op](*args, out_val=(meta[1], meta[2], None)) == expected
    except Exception:  # a formula with another signature: count with ours
        correct = False
    return {} if correct else {op: _conv_backward_flop}


_CORRECTIONS = _formula_corrections()


def count_flops(module: nn.Module, *inputs: object, backward: bool = False) -> int:
    """FLOPs (2 x multiply-accumulates) of one forward pass of ``module`` on ``inputs``.

    With ``backward=True``, of one forward and one backward pass (of the sum of every output),
    as a training step costs. Runs the module and leaves it as it was (:func:`auxwrap.trace.kept_as_found`:
    a train-mode pass moves BatchNorm statistics, which are put back); the backward pass computes
    gradients without storing them in ``.grad``.
    """
    counter = FlopCounterMode(display=False, custom_mapping=_CORRECTIONS)
    with kept_as_found(module):
        if not backward:
            with counter, torch.no_grad():
                module(*inputs)
            return counter.get_total_flops()
        params = [p for p in module.parameters() if p.requires_grad]
        with counter:
            outputs, _ = tree_flatten(module(*inputs))
            total = sum(o.float().sum() for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad)
            torch.autograd.grad(total, params, allow_unused=True)
        return counter.get_total_flops()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_norm_layers(module: nn.Module, *inputs: object) -> int:
    """Norm layers a forward pass runs: norm modules called and functional norms (ATen norms in a torch.export
    capture), counted in its graph (a :class:`auxwrap.FusedNet` is counted in the program of its current mode).

    Any other module is captured first, as :func:`auxwrap.trace` with ``capture="auto"`` does: torch.fx, or
    torch.export run on ``inputs`` where torch.fx cannot trace it (without ``inputs``, on the inputs inferred
    from timm's or transformers' config). Which capture counted is not reported: both count the same norms.
    """
    graph_module = getattr(module, "graph_module", None)
    if not isinstance(graph_module, torch.fx.GraphModule):
        graph_module = module if isinstance(module, torch.fx.GraphModule) else _captured(module, inputs)
    traced = Traced(model=graph_module, graph_module=graph_module, training=graph_module.training)
    return sum(analysis.is_norm_op(traced, node) for node in graph_module.graph.nodes)


def _captured(module: nn.Module, inputs: tuple) -> torch.fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AuxwrapCaptureWarning)  # the fallback to torch.export changes no count
        return trace(module, capture=AUTO, example_inputs=inputs or None).graph_module


@dataclass(frozen=True)
class CostRow:
    model: str
    flops: int
    params: int
    norm_layers: int | None

    @property
    def macs(self) -> int:
        return self.flops // 2


@dataclass(frozen=True)
class Report:
    """Costs of the original primary, the fused training network and the deployed primary."""

    rows: tuple[CostRow, ...]
    inputs: str

    def __str__(self) -> str:
        return self.to_markdown()

    def to_markdown(self) -> str:
        base = self.rows[0]
        lines = [f"costs on inputs {self.inputs}", "",
                 "| model | GFLOPs | GMACs | params (M) | norm layers | FLOPs / primary |",
                 "|---|---:|---:|---:|---:|---:|"]
        for row in self.rows:
            norms = "" if row.norm_layers is None else str(row.norm_layers)
            lines.append(f"| {row.model} | {row.flops / 1e9:.4g} | {row.macs / 1e9:.4g} | {row.params / 1e6:.4g} | "
                         f"{norms} | {row.flops / base.flops:.3f} |")
        return "\n".join(lines)


def report(net: nn.Module, *inputs: object) -> Report:
    """One table: original primary, fused training graph (forward; forward + backward), deployed primary.

    ``net`` is a :class:`auxwrap.FusedNet`; ``inputs`` default to its example inputs. The deployed
    primary is what ``prune(net)`` returns, computed without cutting anything in ``net``.
    """
    from .deploy import fold_primary

    inputs = inputs or net.example_inputs
    deployed = fold_primary(net)
    with analysis.eval_mode(net):  # eval: the counts are the same and no BatchNorm statistics move
        primary, norms = net.primary, count_norm_layers(net)
        rows = (
            CostRow("original primary", count_flops(primary, *inputs), count_parameters(primary),
                    count_norm_layers(primary, *inputs)),
            CostRow("fused training graph, forward", count_flops(net, *inputs), count_parameters(net), norms),
            CostRow("fused training graph, forward + backward", count_flops(net, *inputs, backward=True),
                    count_parameters(net), norms),
            CostRow("deployed primary", count_flops(deployed, *inputs), count_parameters(deployed),
                    count_norm_layers(deployed)),
        )
    shapes = ", ".join("x".join(map(str, x.shape)) for x in inputs if isinstance(x, torch.Tensor))
    return Report(rows, shapes)
