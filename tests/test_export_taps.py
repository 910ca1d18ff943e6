"""Fusion points on torch.export captures (issue 16): the points find_taps() finds on the ATen graph of
``trace(model, capture="export")`` are those it finds on the torch.fx graph of the same model — same names,
shapes, layouts, kinds and unit structure (node names differ between the graphs) — and transformers models,
which torch.fx cannot trace, get layer and stage points."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from timm.layers import BatchNormAct2d
from torch import nn

import auxwrap
from auxwrap import analysis

from . import zoo
from .strategies import BATCH, SIZE, architectures, build


def _unit_shape(unit: auxwrap.Unit | None) -> tuple[bool, bool] | None:
    return None if unit is None else (unit.norm is not None, unit.activation is not None)


def _points(traced: auxwrap.Traced, x: torch.Tensor, spec: str) -> list[tuple] | str:
    """What both captures must agree on: each point's name, shape, layout, kind, token grid and unit structure;
    where there are none, the reason (the error message up to its first colon)."""
    try:
        taps = auxwrap.find_taps(traced, (x,), spec)
    except auxwrap.AuxwrapTapError as error:
        return str(error).split(":")[0]
    return [(t.name, t.shape, t.layout, t.kind, t.prefix, t.grid, _unit_shape(t.unit)) for t in taps]


def _export(model: nn.Module, x: torch.Tensor) -> auxwrap.Traced:
    return auxwrap.trace(model, capture="export", example_inputs=(x,), training=False)


def _assert_same_points(model: nn.Module, x: torch.Tensor) -> dict[str, list[tuple] | str]:
    model.eval()
    traced = auxwrap.trace(model, capture="fx", training=False)
    exported = _export(model, x)
    found = {}
    for spec in ("layer", "stage"):
        expected = _points(traced, x, spec)
        assert _points(exported, x, spec) == expected, spec
        found[spec] = expected
    assert isinstance(found["layer"], list) and found["layer"]
    return found


def _swin() -> nn.Module:
    """timm's Swin at a size that keeps the capture short; its points are channels-last maps (B, H, W, C)."""
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=2,
                             depths=(2, 2), embed_dim=24, num_heads=(1, 2), drop_path_rate=0.0, num_classes=10)


def _deit() -> nn.Module:
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, depth=4, num_classes=10)


#: name -> (builder, input size, the layouts its layer points have)
REPRESENTATIVE = {
    "sequential_cnn": (zoo.sequential_cnn, 16, {"nchw"}),  # a VGG-like stack of conv -> [bn] -> relu units
    "tv_resnet18": (zoo.ARCHS["tv_resnet18"][0], 32, {"nchw"}),
    "timm_efficientnet_b0": (zoo.ARCHS["timm_efficientnet_b0"][0], 32, {"nchw"}),
    "timm_deit_tiny": (_deit, 32, {"tokens"}),
    "timm_swin_tiny": (_swin, 32, {"nhwc"}),
    "dict_net": (zoo.DictNet, 16, {"nchw"}),
}


@pytest.mark.parametrize("name", list(REPRESENTATIVE))
def test_export_points_are_the_fx_points(name):
    builder, size, layouts = REPRESENTATIVE[name]
    torch.manual_seed(0)
    found = _assert_same_points(builder(), torch.randn(2, 3, size, size))
    assert {point[2] for point in found["layer"]} == layouts


def _zoo_model(name: str) -> tuple[nn.Module, torch.Tensor]:
    return zoo.build(name) if name in zoo.ZOO else zoo.make(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(dict.fromkeys([*zoo.ZOO, *zoo.ARCHS])))
def test_export_points_are_the_fx_points_whole_zoo(name):
    _assert_same_points(*_zoo_model(name))


_FEW = settings(max_examples=6, deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_MANY = settings(_FEW, max_examples=80)


def _check_generated(spec) -> None:  # noqa: ANN001
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the ``recorder`` block's side effects, which trace() warns about
        _assert_same_points(build(spec), torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)))


@_FEW
@given(architectures)
def test_generated_stacks_export_points_are_the_fx_points(spec):
    _check_generated(spec)


@pytest.mark.slow
@_MANY
@given(architectures)
def test_generated_stacks_export_points_are_the_fx_points_slow(spec):
    _check_generated(spec)


# ------------------------------------------------------------------ modules torch.fx keeps opaque

class _AttnBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(c, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(x, x, x, need_weights=False)[0]


class _MlpBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class _TorchNNBlocks(nn.Module):
    """torch.nn modules with inner layers (MultiheadAttention, TransformerEncoder): one opaque call in torch.fx,
    many ATen ops (two linears, two encoder layers) in torch.export."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.embed = nn.Linear(4, c)
        self.attn = nn.Sequential(_AttnBlock(c), _AttnBlock(c))
        self.mlp = nn.Sequential(_MlpBlock(c), _MlpBlock(c))
        layer = nn.TransformerEncoderLayer(c, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.mlp(self.attn(self.embed(x)))).mean(1))


def test_modules_fx_keeps_opaque_are_one_op_in_export_captures():
    torch.manual_seed(0)
    model, x = _TorchNNBlocks().eval(), torch.randn(2, 5, 4)
    found = _assert_same_points(model, x)
    names = [point[0] for point in found["layer"]]
    assert not any(name.startswith("enc.") for name in names), names


def test_a_norm_with_its_own_activation_is_one_point_named_by_its_module():
    """timm's BatchNormAct2d: torch.export records its batch norm and its activation (``1.act``); the point is the
    module's output, named ``1`` as in torch.fx, and its unit has a norm and no separate activation."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BatchNormAct2d(8), nn.Conv2d(8, 8, 3, padding=1),
                          BatchNormAct2d(8, act_layer=nn.SiLU))
    x = torch.randn(2, 3, 8, 8)
    found = _assert_same_points(model, x)
    assert [(point[0], point[-1]) for point in found["layer"]] == [("1", (True, False)), ("3", (True, False))]
    exported = _export(model, x)
    taps = auxwrap.find_taps(exported, (x,))
    nodes = {n.name: n for n in exported.graph.nodes}
    assert [nodes[t.node].target for t in taps] == [torch.ops.aten.relu_.default, torch.ops.aten.silu_.default]
    assert [t.module_path for t in taps] == ["1", "3"]


def test_find_taps_captures_a_module_as_asked():
    torch.manual_seed(0)
    model, x = zoo.sequential_cnn().eval(), torch.randn(2, 3, 16, 16)
    exported = auxwrap.find_taps(model, x, capture="export")
    traced = auxwrap.find_taps(model, x, capture="fx")
    assert [t.name for t in exported] == [t.name for t in traced] == ["2", "5", "7"]
    graph = _export(model, x).graph
    assert {n.name for n in graph.nodes} >= {t.node for t in exported}
    assert all(t.node.startswith("relu") for t in exported)  # ATen node names, not the fx graph's "2", "5"...


# ------------------------------------------------------------------ facts about ATen nodes

class _Ops(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.up = nn.ConvTranspose2d(6, 10, 2, stride=2, groups=2)
        self.bn = nn.BatchNorm2d(10)
        self.bn_plain = nn.BatchNorm2d(10, affine=False)
        self.gn = nn.GroupNorm(2, 10)
        self.ln = nn.LayerNorm(10)
        self.fc = nn.Linear(10, 7)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn_plain(self.bn(self.up(self.conv(x))))
        x = F.relu(self.gn(x), inplace=True)
        x = x.add_(1.0) + 1.0
        x = self.drop(F.dropout(x, 0.0, True))
        return torch.relu(self.fc(self.ln(x.permute(0, 2, 3, 1))))


def _nodes(traced: auxwrap.Traced) -> dict[str, torch.fx.Node]:
    return {n.name: n for n in traced.graph.nodes if n.op == "call_function"}


def test_channels_mutation_and_identity_of_aten_nodes():
    traced = _export(_Ops(), torch.randn(2, 3, 4, 4))
    nodes = _nodes(traced)
    aten = torch.ops.aten
    by_target = {n.target: n for n in reversed(nodes.values())}  # the first node of each op
    channels = {target: analysis.channels_of(traced, by_target[target]) for target in (
        aten.conv2d.default, aten.conv_transpose2d.input, aten.batch_norm.default, aten.group_norm.default,
        aten.layer_norm.default, aten.linear.default)}
    assert channels == {aten.conv2d.default: 6, aten.conv_transpose2d.input: 10, aten.batch_norm.default: 10,
                        aten.group_norm.default: 10, aten.layer_norm.default: 10, aten.linear.default: 7}
    plain = [n for n in nodes.values() if n.target == aten.batch_norm.default][1]  # no weight: its running mean
    assert analysis.channels_of(traced, plain) == 10
    assert {str(n.target) for n in nodes.values() if analysis.mutates_input(traced, n)} == {
        "aten.relu_.default", "aten.add_.Tensor"}
    assert not analysis.mutates_input(traced, by_target[aten.add.Tensor])
    dropouts = [n for n in nodes.values() if n.target == aten.dropout.default]
    assert [analysis.is_identity(traced, n) for n in dropouts] == [True, True]  # p=0; eval-mode capture
    assert all(analysis.is_weight_op(traced, by_target[t]) for t in (aten.conv2d.default, aten.linear.default))
    assert all(analysis.is_norm_op(traced, by_target[t]) for t in (aten.batch_norm.default, aten.layer_norm.default))
    assert analysis.is_activation(traced, by_target[aten.relu_.default])


def test_a_train_mode_dropout_that_drops_is_no_identity():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Dropout(0.0))
    traced = auxwrap.trace(model, capture="export", example_inputs=(torch.randn(2, 4),), training=True)
    dropouts = [n for n in traced.graph.nodes if n.target == torch.ops.aten.dropout.default]
    assert [analysis.is_identity(traced, n) for n in dropouts] == [False, True]


# ------------------------------------------------------------------ transformers models

def _vit():
    transformers = pytest.importorskip("transformers")
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
        intermediate_size=64, num_labels=5))


def _convnext():
    transformers = pytest.importorskip("transformers")
    return transformers.ConvNextForImageClassification(transformers.ConvNextConfig(
        num_stages=3, hidden_sizes=[8, 16, 32], depths=[2, 2, 2], num_labels=5))


def _hf_swin():
    transformers = pytest.importorskip("transformers")
    return transformers.SwinForImageClassification(transformers.SwinConfig(
        image_size=32, patch_size=2, embed_dim=8, depths=[2, 2], num_heads=[1, 2], window_size=4, num_labels=5))


def _segformer():
    transformers = pytest.importorskip("transformers")
    return transformers.SegformerForSemanticSegmentation(transformers.SegformerConfig(
        num_encoder_blocks=2, depths=[2, 2], sr_ratios=[2, 1], hidden_sizes=[8, 16], num_attention_heads=[1, 2],
        decoder_hidden_size=16, num_labels=4, patch_sizes=[7, 3], strides=[4, 2]))


def _hf_points(builder, spec: str) -> list[tuple[str, str, tuple[int, ...]]]:  # noqa: ANN001
    torch.manual_seed(0)
    model, x = builder().eval(), torch.randn(2, 3, 32, 32)
    return [(t.name, t.layout, t.shape[1:]) for t in auxwrap.find_taps(_export(model, x), (x,), spec)]


def test_transformers_vit_layer_points():
    assert _hf_points(_vit, "layer") == [("vit.layers.0", "tokens", (17, 32)), ("vit.layers.1", "tokens", (17, 32))]
    with pytest.raises(auxwrap.AuxwrapTapError, match="has no resolution stages"):
        _hf_points(_vit, "stage")


def test_transformers_convnext_layer_and_stage_points():
    stages = [("convnext.encoder.stages.0.layers.1", "nchw", (8, 8, 8)),
              ("convnext.encoder.stages.1.layers.1", "nchw", (16, 4, 4)),
              ("convnext.encoder.stages.2.layers.1", "nchw", (32, 2, 2))]
    layers = _hf_points(_convnext, "layer")
    assert [name for name, _, _ in layers] == [f"convnext.encoder.stages.{s}.layers.{i}" for s in range(3)
                                               for i in range(2)]
    assert [p for p in layers if p in stages] == stages
    assert _hf_points(_convnext, "stage") == stages


@pytest.mark.slow
def test_transformers_swin_layer_and_stage_points():
    blocks = [f"swin.encoder.layers.{s}.blocks.{i}" for s in range(2) for i in range(2)]
    assert _hf_points(_hf_swin, "layer") == [(name, "tokens", (256 if "layers.0" in name else 64, 8 * 2 ** (
        "layers.1" in name))) for name in blocks]
    assert [name for name, _, _ in _hf_points(_hf_swin, "stage")] == [blocks[1], blocks[3]]


@pytest.mark.slow
def test_transformers_segformer_layer_points():
    """The decode head reads every encoder stage, so only the first stage's blocks lie on every path from the
    input to the output: the second stage's blocks are no layer points (name them with taps=[...])."""
    assert _hf_points(_segformer, "layer") == [
        ("segformer.stages.0.blocks.0", "tokens", (64, 8)), ("segformer.stages.0.blocks.1", "tokens", (64, 8))]


def test_a_model_whose_points_are_all_vectors_has_no_stages():
    """The shapes rule for stages had nothing to compare and failed with a ValueError (torch.fx too)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(2, 3, 4, 4)
    for traced in (auxwrap.trace(model, capture="fx"), _export(model, x)):
        with pytest.raises(auxwrap.AuxwrapTapError, match="has no resolution stages"):
            auxwrap.find_taps(traced, (x,), "stage")
