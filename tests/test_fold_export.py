"""BatchNorm folding (DESIGN I2) and FLOP counting on torch.export captures (ATen graphs, issue 16).

Each graph is ``trace(copy.deepcopy(model).eval(), capture="export", training=False)``: what ``fold_module``
deploys. Folding must remove every BatchNorm that follows a conv or linear, keep the output, leave fewer
parameters (the layer's weight is rewritten where it is stored, the norm's tensors go) and the same FLOPs.
"""

from __future__ import annotations

import copy
import dataclasses
import operator

import pytest
import torch
import torch.fx as fx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import auxwrap
from auxwrap.fold import fold_batchnorm

from .strategies import BATCH, SIZE, build, cnn_specs
from .zoo import make

_aten = torch.ops.aten
_BATCH_NORMS = (_aten.batch_norm, _aten._native_batch_norm_legit_no_training)
_LAYERS = (_aten.conv1d, _aten.conv2d, _aten.conv3d, _aten.conv_transpose1d, _aten.conv_transpose2d,
           _aten.conv_transpose3d, _aten.convolution, _aten.linear)
_PROPERTIES = settings(max_examples=8, deadline=None, derandomize=True, database=None, print_blob=False,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _captured(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    return auxwrap.trace(copy.deepcopy(model).eval(), capture="export", example_inputs=(x,),
                         training=False).graph_module


def _packet(node: fx.Node) -> object:
    return getattr(node.target, "overloadpacket", None) if node.op == "call_function" else None


def _batch_norms_after_layers(gm: fx.GraphModule) -> list[str]:
    """ATen BatchNorms whose input is an ATen conv or linear: what folding should have removed (defined here,
    apart from auxwrap.fold's rules)."""
    return [f"{n.args[0].name} -> {n.name}" for n in gm.graph.nodes
            if _packet(n) in _BATCH_NORMS and isinstance(n.args[0], fx.Node) and _packet(n.args[0]) in _LAYERS]


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters far from (0, 1): folding does real arithmetic."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.2)
    return model.eval()


def _tensor(output: object) -> torch.Tensor:
    """The main tensor of a model's output (a tensor, or a transformers output's logits)."""
    return output if isinstance(output, torch.Tensor) else output.logits


def _relative_error(got: object, expected: object) -> float:
    got, expected = _tensor(got), _tensor(expected)
    return float((got - expected).norm() / expected.norm().clamp_min(1e-12))


def _check_folds(model: nn.Module, x: torch.Tensor) -> tuple[fx.GraphModule, auxwrap.FoldReport]:
    """Fold the eval capture of ``model``: nothing foldable left, same output (1e-5), fewer parameters, same
    FLOPs as the eval model."""
    model = _randomise_norms(model)
    gm = _captured(model, x)
    assert _batch_norms_after_layers(gm), "the capture has no conv/linear -> BatchNorm to fold"
    report = fold_batchnorm(gm)
    left = _batch_norms_after_layers(gm)
    assert not left, f"BatchNorm left after a conv/linear: {left}\n{report}"
    with torch.no_grad():
        assert _relative_error(gm(x), model(x)) <= 1e-5
    assert auxwrap.count_parameters(gm) < auxwrap.count_parameters(model)
    assert auxwrap.count_flops(gm, x) == auxwrap.count_flops(model, x)
    return gm, report


@pytest.mark.parametrize("name", ["tv_resnet18", "tv_vgg11_bn", "timm_efficientnet_b0"])
def test_zoo_models_fold_on_an_export_capture(name):
    model, x = make(name)
    if name == "tv_vgg11_bn":  # its BatchNorms are all in `features`: a small head keeps the test fast
        model.classifier = nn.Linear(512 * 7 * 7, 10)
    gm, _ = _check_folds(model, x)
    stored = dict(gm.named_parameters()) | dict(gm.named_buffers())
    assert not any("running_" in path or "num_batches_tracked" in path for path in stored), sorted(stored)
    assert not any(path.startswith("folded_") for path in stored)  # rewritten at the layers' own paths


def test_segformer_decode_head_batchnorm_folds():
    transformers = pytest.importorskip("transformers")
    config = transformers.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                          hidden_sizes=[8, 16], patch_sizes=[7, 3], strides=[4, 2],
                                          num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16,
                                          num_labels=3)
    torch.manual_seed(0)
    model = transformers.SegformerForSemanticSegmentation(config)
    gm, _ = _check_folds(model, torch.randn(2, 3, 32, 32))
    assert "decode_head.linear_fuse.bias" in dict(gm.named_parameters())  # added beside its weight


class _ConvBN(nn.Module):
    def __init__(self, conv: nn.Module, norm: nn.Module):
        super().__init__()
        self.conv, self.norm = conv, norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(x)))


@pytest.mark.parametrize("layer, norm, shape", [
    (nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), (2, 3, 8, 8)),
    (nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6), (2, 3, 8)),
    (nn.Linear(5, 6), nn.BatchNorm1d(6), (4, 5)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6), (2, 4, 5, 5)),
], ids=["conv_no_bias", "conv1d", "linear", "grouped_transposed_conv"])
def test_a_layer_and_its_batchnorm_fold_in_place(layer, norm, shape):
    torch.manual_seed(0)
    gm, _ = _check_folds(_ConvBN(layer, norm), torch.randn(*shape))
    assert sorted(name for name, _ in gm.named_parameters()) == ["conv.bias", "conv.weight"]
    assert not list(gm.buffers())


class _SharedConv(nn.Module):
    """One conv read twice, each time into its own BatchNorm: its weight cannot hold both folds."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x.flip(-1)))


def test_a_conv_shared_by_two_norms_is_skipped_with_a_reason():
    torch.manual_seed(0)
    model, x = _randomise_norms(_SharedConv()), torch.randn(2, 3, 8, 8)
    gm = _captured(model, x)
    report = fold_batchnorm(gm)
    assert report.folded == [] and len(report.skipped) == 2
    assert all("conv.weight is also read by" in reason for _, reason in report.skipped), str(report)
    with torch.no_grad():
        assert _relative_error(gm(x), model(x)) <= 1e-5
    assert len(_batch_norms_after_layers(gm)) == 2


class _UnitTwice(nn.Module):
    """One conv -> BatchNorm unit applied twice: one fold of the weight serves both calls (as on fx graphs)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(torch.relu(self.bn(self.conv(x)))))


def test_a_unit_applied_twice_folds_once():
    torch.manual_seed(0)
    gm, report = _check_folds(_UnitTwice(), torch.randn(2, 4, 8, 8))
    assert len(report.folded) == 2 and report.skipped == [], str(report)
    assert sorted(name for name, _ in gm.named_parameters()) == ["conv.bias", "conv.weight"]


def test_a_linear_on_token_batches_is_not_folded_into_a_batchnorm_over_tokens():
    """BatchNorm1d on (B, N, C) normalises dim 1 (tokens here), not the linear's outputs: folding is wrong."""
    torch.manual_seed(0)
    model, x = _randomise_norms(_ConvBN(nn.Linear(4, 4), nn.BatchNorm1d(4))), torch.randn(2, 4, 4)
    gm = _captured(model, x)
    report = fold_batchnorm(gm)
    assert report.folded == [] and "3-d inputs" in report.skipped[0][1], str(report)
    with torch.no_grad():
        assert _relative_error(gm(x), model(x)) <= 1e-5


def test_a_decomposed_program_folds_convolution_and_native_batch_norm():
    """After ``run_decompositions`` the ops are ``aten.convolution`` and ``_native_batch_norm_legit_no_training``
    (a tuple read through ``getitem``)."""
    torch.manual_seed(0)
    model = _randomise_norms(_ConvBN(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6)))
    x = torch.randn(2, 3, 8, 8)
    gm = torch.export.export(copy.deepcopy(model), (x,)).run_decompositions().module()
    assert any(_packet(n) is _aten._native_batch_norm_legit_no_training for n in gm.graph.nodes)
    report = fold_batchnorm(gm)
    assert len(report.folded) == 1, str(report)
    assert not any(_packet(n) in _BATCH_NORMS or n.target is operator.getitem for n in gm.graph.nodes)
    with torch.no_grad():
        assert _relative_error(gm(x), model(x)) <= 1e-5


def test_torch_batch_norm_reads_weight_and_bias_before_the_statistics():
    """``torch.batch_norm`` (fx graphs) takes ATen's argument order, not ``F.batch_norm``'s."""

    class TorchBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            for name in ("mean", "var", "gamma", "beta"):
                self.register_buffer(name, torch.rand(4) + 0.5)

        def forward(self, x):
            return torch.batch_norm(self.conv(x), self.gamma, self.beta, self.mean, self.var, False, 0.1, 1e-5, False)

    torch.manual_seed(0)
    model, x = TorchBN().eval(), torch.randn(2, 3, 8, 8)
    gm = auxwrap.trace(copy.deepcopy(model), capture="fx").graph_module
    report = fold_batchnorm(gm)
    assert len(report.folded) == 1, str(report)
    with torch.no_grad():
        assert _relative_error(gm(x), model(x)) <= 1e-5


def test_norm_layers_of_an_export_capture_are_counted():
    torch.manual_seed(0)
    model, x = _ConvBN(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)).eval(), torch.randn(2, 3, 8, 8)
    gm = _captured(model, x)
    assert auxwrap.count_norm_layers(gm) == 1 == auxwrap.count_norm_layers(model)
    fold_batchnorm(gm)
    assert auxwrap.count_norm_layers(gm) == 0


_BATCH_NORM_SPECS = st.tuples(cnn_specs(), st.sampled_from(("bn", "bnact", "bn_noaffine"))).map(
    lambda drawn: dataclasses.replace(drawn[0], norm=drawn[1]))


class _ShapeBranch(nn.Module):
    """Python control flow on a shape: torch.fx cannot trace it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.ln = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LayerNorm(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return self.ln(x) if x.shape[-1] == 6 else x


def test_norm_layers_of_a_model_torch_fx_cannot_trace_are_counted_on_its_inputs():
    model, x = _ShapeBranch().eval(), torch.randn(2, 3, 8, 8)
    with pytest.raises(auxwrap.AuxwrapTraceError):
        auxwrap.trace(model, capture="fx")
    assert auxwrap.count_norm_layers(model, x) == 2


@pytest.mark.filterwarnings("ignore:The tensor attribute")  # the `recorder` block stores its output on self
@_PROPERTIES
@given(spec=_BATCH_NORM_SPECS)
def test_generated_conv_batchnorm_stacks_fold_on_an_export_capture(spec):
    model = build(spec).eval()
    x = _spec_inputs(spec)
    gm = _captured(model, x)
    report = fold_batchnorm(gm)
    assert report.folded and not _batch_norms_after_layers(gm), str(report)
    with torch.no_grad():
        assert _relative_error(gm(x), model(x)) <= 1e-5, str(report)


def _spec_inputs(spec) -> torch.Tensor:  # noqa: ANN001
    return torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1000 + spec.seed))

