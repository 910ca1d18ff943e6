import pytest
import timm
import torch
import torchvision
from torch import nn

import auxwrap
from auxwrap import analysis
from auxwrap.taps import BLOCK, NAMED, STAGE, UNIT, Tap

from .zoo import ZOO, ResidualNet, build, sequential_cnn


def _taps(name, spec="layer"):
    model, x = build(name)
    return auxwrap.find_taps(auxwrap.trace(model), (x,), spec)


@pytest.mark.parametrize("name", list(ZOO))
def test_layer_and_stage_counts(name):
    _, _, layers, stages = ZOO[name]
    model, x = build(name)
    traced = auxwrap.trace(model)
    found = auxwrap.find_taps(traced, (x,), "layer")
    assert len(found) == layers, [t.name for t in found]
    order = {n.name: i for i, n in enumerate(traced.graph.nodes)}
    assert [order[t.node] for t in found] == sorted(order[t.node] for t in found)
    assert len({t.name for t in found}) == len(found)
    if stages is None:
        with pytest.raises(auxwrap.AuxwrapTapError, match="has no resolution stages"):
            auxwrap.find_taps(traced, (x,), "stage")
    else:
        ends = auxwrap.find_taps(traced, (x,), "stage")
        assert len(ends) == stages, [t.name for t in ends]
        assert all(t.kind == STAGE for t in ends)
        assert [t.node for t in ends] == [t.node for t in found if t.node in {e.node for e in ends}]


@pytest.mark.parametrize("name", ["tv_resnet50", "timm_efficientnet_b0", "timm_vit_base", "timm_swin_tiny",
                                  "timm_convnext_tiny", "residual_net"])
def test_block_shapes_match_the_module_outputs(name):
    model, x = build(name)
    taps = auxwrap.find_taps(auxwrap.trace(model), (x,))
    seen = {}
    modules = dict(model.named_modules())
    hooks = [modules[t.name].register_forward_hook(lambda m, i, o, n=t.name: seen.__setitem__(n, o.shape))
             for t in taps if t.kind == BLOCK]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    assert seen and all(tuple(seen[t.name]) == t.shape for t in taps if t.kind == BLOCK)


def test_resnet50_points_shapes_and_stages():
    taps = _taps("tv_resnet50")
    assert [t.name for t in taps[:4]] == ["layer1.0", "layer1.1", "layer1.2", "layer2.0"]
    assert {t.shape for t in taps if t.name.startswith("layer1")} == {(2, 256, 16, 16)}
    assert taps[-1].shape == (2, 2048, 2, 2) and taps[-1].layout == "nchw" and taps[-1].channels == 2048
    assert taps[-1].spatial == (2, 2)
    stages = _taps("tv_resnet50", "stage")
    assert [t.name for t in stages] == ["layer1.2", "layer2.3", "layer3.5", "layer4.2"]


def test_stage_points_from_feature_info_match_those_from_shapes():
    x = torch.randn(2, 3, 64, 64)
    with_info = auxwrap.find_taps(auxwrap.trace(timm.create_model("resnet50")), (x,), "stage")
    from_shapes = auxwrap.find_taps(auxwrap.trace(torchvision.models.resnet50()), (x,), "stage")
    assert [t.name for t in with_info] == [t.name for t in from_shapes]


def test_vit_points_are_tokens():
    taps = _taps("timm_vit_base")
    assert {t.layout for t in taps} == {"tokens"}
    assert {t.shape for t in taps} == {(2, 5, 768)}  # 2x2 patches + class token
    assert taps[0].spatial == (5,) and taps[0].channels == 768


def test_swin_points_are_channels_last_maps():
    taps = _taps("timm_swin_tiny")
    assert {t.layout for t in taps} == {"nhwc"}
    assert taps[0].shape == (2, 16, 16, 96) and taps[0].channels == 96 and taps[0].spatial == (16, 16)


def test_vgg_points_are_conv_units_with_their_norm_and_activation():
    model, x = build("tv_vgg16_bn")
    traced = auxwrap.trace(model)
    taps = auxwrap.find_taps(traced, (x,))
    convs = [t for t in taps if t.layout == "nchw"]
    assert len(convs) == 13 and all(t.kind == UNIT for t in taps)
    first = convs[0].unit
    nodes = {n.name: n for n in traced.graph.nodes}
    assert isinstance(traced.target_module(nodes[first.weight]), nn.Conv2d)
    assert isinstance(traced.target_module(nodes[first.norm]), nn.BatchNorm2d)
    assert isinstance(traced.target_module(nodes[first.activation]), nn.ReLU)
    assert convs[0].node == first.activation
    assert [t.layout for t in taps[13:]] == ["vector", "vector"]  # the two fc -> relu units


def test_unit_with_norm_that_applies_its_activation():
    # timm's BatchNormAct2d stays one call_module (timm's no-trace registry) and ends the unit
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), timm.layers.BatchNormAct2d(4), nn.Conv2d(4, 4, 3),
                        timm.layers.BatchNormAct2d(4))
    traced = auxwrap.trace(seq)
    taps = auxwrap.find_taps(traced, (torch.randn(2, 3, 12, 12),))
    assert [(t.unit.weight, t.unit.norm, t.unit.activation) for t in taps] == [("_0", "_1", None), ("_2", "_3", None)]


def test_plain_network_without_blocks_uses_units_on_its_main_path():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 8, 3)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = nn.functional.gelu(self.conv2(x))
            return self.fc(x.mean((2, 3)))

    taps = auxwrap.find_taps(auxwrap.trace(Plain()), (torch.randn(2, 3, 12, 12),))
    assert [(t.unit.weight, t.unit.norm) for t in taps] == [("conv1", "bn1"), ("conv2", None)]


def test_main_path_excludes_nodes_bypassed_by_a_skip():
    block = ResidualNet().block1
    traced = auxwrap.trace(block)
    values = analysis.propagate(traced, (torch.randn(2, 8, 6, 6),))
    cuts = {n.name for n in analysis.main_path(traced.graph, values)}
    assert "conv1" not in cuts and "bn2" not in cuts
    assert [n.name for n in traced.graph.nodes if n.name in cuts] == ["add", "relu_1"]


def test_shape_reads_do_not_break_the_main_path():
    class UsesBatchSize(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            batch = x.shape[0]
            return self.b(torch.relu(self.a(x))).reshape(batch, -1)

    traced = auxwrap.trace(UsesBatchSize())
    values = analysis.propagate(traced, (torch.randn(3, 4),))
    assert "a" in {n.name for n in analysis.main_path(traced.graph, values)}


def test_named_points_resolve_module_paths_and_node_names():
    model, x = build("residual_net")
    traced = auxwrap.trace(model)
    taps = auxwrap.find_taps(traced, (x,), ["block3", "stem", "block1_conv2"])
    assert [t.name for t in taps] == ["stem", "block1_conv2", "block3"]  # graph order
    assert all(t.kind == NAMED for t in taps)
    assert taps[2].node == [n.name for n in traced.owned_by("block3")][-1]
    assert taps[1].shape == (2, 8, 16, 16)


def test_unknown_name_lists_closest_names_and_candidates():
    model, x = build("tv_resnet18")
    with pytest.raises(auxwrap.AuxwrapTapError) as info:
        auxwrap.find_taps(auxwrap.trace(model), (x,), ["layer1.5", "layer2.0"])
    message = str(info.value)
    assert "unknown fusion point 'layer1.5' in ResNet" in message
    assert "Closest names: layer1.1" in message or "Closest names: layer1.0" in message
    assert "Layer points: layer1.0 (nchw 64x16x16)" in message
    assert "Stage points: layer1.1 (nchw 64x16x16), layer2.1" in message


def test_named_points_must_output_one_tensor_and_be_distinct():
    model, x = build("timm_vit_base")
    traced = auxwrap.trace(model)
    with pytest.raises(auxwrap.AuxwrapTapError, match="does not output one tensor"):
        auxwrap.find_taps(traced, (x,), ["unbind"])
    block_end = auxwrap.find_taps(traced, (x,), ["blocks.0"])[0].node
    with pytest.raises(auxwrap.AuxwrapTapError, match="name the same point twice"):
        auxwrap.find_taps(traced, (x,), ["blocks.0", block_end])


@pytest.mark.parametrize("bad", ["layers", [], [3], "block"])
def test_bad_taps_argument(bad):
    model, x = build("residual_net")
    with pytest.raises(auxwrap.AuxwrapArgumentError, match="taps"):
        auxwrap.find_taps(auxwrap.trace(model), (x,), bad)


def test_no_points_found_is_an_error_with_a_hint():
    class Lonely(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(auxwrap.AuxwrapTapError, match=r"no layer fusion points found in Lonely.*taps=\[\.\.\.\]"):
        auxwrap.find_taps(auxwrap.trace(Lonely()), (torch.randn(2, 4),))


def test_example_inputs_inferred_for_timm_and_required_otherwise():
    model = timm.create_model("resnet18", pretrained=False)
    taps = auxwrap.find_taps(auxwrap.trace(model))
    assert taps[0].shape == (2, 64, 56, 56)  # timm's default 224x224 input
    with pytest.raises(auxwrap.AuxwrapArgumentError, match=r"cannot infer example inputs for ResNet.*example_inputs="):
        auxwrap.find_taps(auxwrap.trace(torchvision.models.resnet18()))


def test_example_inputs_that_do_not_fit_name_the_model():
    failed = r"Sequential failed on the example inputs \[\(2, 5, 8, 8\)\]"
    with pytest.raises(auxwrap.AuxwrapArgumentError, match=failed):
        auxwrap.find_taps(auxwrap.trace(sequential_cnn()), torch.randn(2, 5, 8, 8))
    with pytest.raises(auxwrap.AuxwrapArgumentError, match="must be a tensor or a non-empty tuple"):
        auxwrap.find_taps(auxwrap.trace(sequential_cnn()), "image")


def test_inferred_example_inputs_leave_the_global_random_state_alone():
    model = timm.create_model("resnet18", pretrained=False)
    state = torch.get_rng_state()
    auxwrap.default_example_inputs(model)
    assert torch.equal(state, torch.get_rng_state())


def test_finding_points_changes_nothing_in_the_model():
    model = sequential_cnn().train()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    auxwrap.find_taps(auxwrap.trace(model), (torch.randn(4, 3, 16, 16) * 5 + 3,))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(stats[k], v) for k, v in model.state_dict().items())


def test_find_taps_takes_a_module_and_traces_it():
    model, x = build("residual_net")
    assert auxwrap.find_taps(model, (x,)) == auxwrap.find_taps(auxwrap.trace(model), (x,))
    with pytest.raises(auxwrap.AuxwrapArgumentError, match="takes a model or the result of auxwrap.trace"):
        auxwrap.find_taps("resnet50", (x,))


class _NoNorm(nn.Module):
    """Units whose norm is absent (timm's ``nn.Identity`` in its place) or behind a dropout of probability 0."""

    def __init__(self):
        super().__init__()
        self.conv1, self.norm1, self.act1 = nn.Conv2d(3, 8, 3), nn.Identity(), nn.ReLU()
        self.conv2, self.drop2, self.bn2, self.act2 = nn.Conv2d(8, 8, 3), nn.Dropout(0.0), nn.BatchNorm2d(8), nn.GELU()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.act1(self.norm1(self.conv1(x)))
        x = self.act2(self.bn2(self.drop2(self.conv2(x))))
        return self.fc(x.mean((2, 3)))


def test_identity_modules_are_transparent_in_units():
    x = torch.randn(2, 3, 12, 12)
    taps = auxwrap.find_taps(auxwrap.trace(_NoNorm()), (x,))
    assert [(t.unit.weight, t.unit.norm, t.unit.activation) for t in taps] == [
        ("conv1", None, "act1"), ("conv2", "bn2", "act2")]
    torch.manual_seed(0)
    primary, aux = _NoNorm().eval(), _NoNorm().eval()
    net = auxwrap.attach(primary, aux, "nas", example_inputs=(x,)).eval()
    with torch.no_grad():
        assert torch.equal(net(x).primary, primary(x))


def test_a_dropout_that_drops_is_not_transparent():
    model = _NoNorm()
    model.norm1 = nn.Dropout(0.5)
    taps = auxwrap.find_taps(auxwrap.trace(model), (torch.randn(2, 3, 12, 12),))
    assert [t.unit.weight for t in taps] == ["conv2"]


def test_fusion_names_stay_unique_where_tap_names_differ_only_by_dots():
    """``a.b`` (a module path) and ``a_b`` (a node name) gave two fusions one key: EfficientViT-M3 calls its
    patch-merge activation twice, and one fusion got the other's source channels."""
    from auxwrap.build import sites
    from auxwrap.plan import Connection

    shape = (2, 4, 4, 4)
    taps = {"primary": [Tap("a_b", "n1", "a", shape, "nchw", UNIT), Tap("a.b", "n2", "a.b", shape, "nchw", UNIT)],
            "aux0": [Tap("s", "m1", "s", (2, 8, 4, 4), "nchw", UNIT)]}
    links = [Connection("aux0", "s", "primary", dest, "aux->primary") for dest in ("a_b", "a.b")]
    found = sites(links, taps)
    assert len({s.name for s in found}) == 2 and [s.dest.name for s in found] == ["a_b", "a.b"]


def test_efficientvit_fuses_both_calls_of_its_patch_merge_activation():
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(0)
    primary, aux = (timm.create_model("efficientvit_m0", num_classes=5).eval() for _ in range(2))
    net = auxwrap.attach(primary, aux, "grad", example_inputs=(x,)).eval()
    placed = list(net.fusion_sites())
    assert len(net.fusions) == len(placed) == len({s.name for s, _ in placed})
    assert sum("patchmerge_act" in s.dest.name.replace(".", "_") for s, _ in placed) == 4  # 2 calls in 2 stages
    with torch.no_grad():
        assert torch.equal(net(x).primary, primary(x)) and torch.equal(net(x).aux[0], aux(x))


class _PosBlock(nn.Module):
    def __init__(self, pos: nn.Module):
        super().__init__()
        self.pos, self.conv = pos, nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return x + self.conv(torch.relu(self.pos(x)))


class _SharedPosition(nn.Module):
    """Blocks that hold one module between them, registered first at the root (CoaT's ``cpe1`` is also
    ``serial_blocks1.0.cpe``): ``named_modules()`` knows it by its first path only."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(_PosBlock(self.pos), _PosBlock(self.pos))
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def test_blocks_holding_a_shared_module_are_found():
    x = torch.randn(2, 3, 8, 8)
    assert [t.name for t in auxwrap.find_taps(auxwrap.trace(_SharedPosition()), (x,))] == ["blocks.0", "blocks.1"]
    primary, aux = _SharedPosition().eval(), _SharedPosition().eval()
    net = auxwrap.attach(primary, aux, "grad", example_inputs=(x,)).eval()
    with torch.no_grad():
        assert torch.equal(net(x).aux[0], aux(x))


class _StreamBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, xs):
        a, b = xs
        return [a + self.a(b), b + self.b(a)]


class _TwoStreams(nn.Module):
    """Blocks that pass two token streams on, as CrossViT's: no single tensor between them."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(_StreamBlock(), _StreamBlock())

    def forward(self, x):
        a, b = self.blocks([x, x * 2])
        return a + b


def test_blocks_that_pass_several_tensors_on_are_named_in_the_error():
    x = torch.randn(2, 5, 4)
    with pytest.raises(auxwrap.AuxwrapTapError, match=r"its repeated blocks \(blocks.0, blocks.1: _StreamBlock\) do "
                                                      r"not end in one tensor.*taps=\[\.\.\.\] naming points of one"):
        auxwrap.find_taps(auxwrap.trace(_TwoStreams()), (x,))
    net = auxwrap.attach(_TwoStreams(), _TwoStreams(), "nas", taps=["blocks.0.a", "blocks.1.a"], example_inputs=(x,))
    assert {s.dest.name for s, _ in net.fusion_sites()} == {"blocks.1.a"}  # one each way: the paper window
