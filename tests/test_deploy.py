import math
import re
import tempfile
from fractions import Fraction

import numpy as np
import pytest
import timm
import timm.layers
import timm.utils
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import auxwrap
from auxwrap.cli import main
from auxwrap.deploy import export, export_onnx
from auxwrap.fold import fold_batchnorm

from .zoo import ARCHS, PAIRS, ResidualNet, make

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def _train_steps(net, x, steps=2):
    """A few small steps: BatchNorm statistics and weights move, activations stay in range."""
    opt = torch.optim.SGD(net.weight_parameters(), lr=1e-3)
    net.train()
    for _ in range(steps):
        out = net(x)
        flat = [o for o in (out.primary, out.aux[0]) for o in (o.values() if isinstance(o, dict) else [o])]
        loss = sum(o.square().mean() for o in flat)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _bn_after_conv(gm):
    """BatchNorm calls (module or functional) whose input is a conv or linear output."""
    found = []
    for node in gm.graph.nodes:
        is_bn = (node.op == "call_module" and isinstance(gm.get_submodule(node.target), BN_TYPES)) or (
            node.op == "call_function" and node.target in (F.batch_norm, torch.batch_norm))
        if is_bn:
            source = node.args[0]
            conv = source.op == "call_module" and isinstance(gm.get_submodule(source.target), (nn.Conv2d, nn.Linear))
            if conv or (source.op == "call_function" and source.target in (F.conv2d, F.linear)):
                found.append(node.name)
    return found


def _relative_error(a, b):
    if isinstance(a, dict):
        return max(_relative_error(a[k], b[k]) for k in a)
    return float((a - b).detach().norm() / b.detach().norm())


def _check_deployed(primary, deployed, x):
    primary.eval()
    with torch.no_grad():
        assert _relative_error(deployed(x), primary(x)) <= 1e-5
    assert auxwrap.count_flops(deployed, x) <= auxwrap.count_flops(primary, x)
    assert auxwrap.count_parameters(deployed) <= auxwrap.count_parameters(primary)
    assert _bn_after_conv(deployed) == []
    assert not deployed.training


@pytest.mark.parametrize("name", list(ARCHS))
def test_deployed_primary_is_the_original_at_single_task_cost(name):
    primary, x = make(name)
    aux, _ = make(name)
    net = auxwrap.attach(primary, aux, "grad", example_inputs=(x,))
    _train_steps(net, x)  # BatchNorm statistics are no longer the defaults
    deployed = auxwrap.prune(net)
    _check_deployed(primary, deployed, x)
    has_bn = any(isinstance(m, BN_TYPES) for m in primary.modules())
    assert bool(deployed.fold_report.folded) == has_bn


@pytest.mark.parametrize("pair", list(PAIRS))
def test_deployed_primary_of_mixed_pairs(pair):
    primary, x = make(PAIRS[pair][0])
    aux, _ = make(PAIRS[pair][1])
    net = auxwrap.attach(primary, aux, "grad", example_inputs=(x,))
    _train_steps(net, x)
    _check_deployed(primary, auxwrap.prune(net), x)


def test_timm_batchnormact_is_folded_and_its_activation_kept():
    model, x = make("timm_efficientnet_b0")
    assert any(isinstance(m, timm.layers.BatchNormAct2d) for m in model.modules())
    net = auxwrap.attach(model, make("timm_efficientnet_b0")[0], "grad", example_inputs=(x,))
    _train_steps(net, x)
    deployed = auxwrap.prune(net)
    assert not any(isinstance(m, BN_TYPES) for m in deployed.modules())
    assert any(isinstance(m, nn.SiLU) for m in deployed.modules())
    _check_deployed(model, deployed, x)


class FunctionalBN(nn.Module):
    """A conv followed by a functional batch_norm on stored statistics, and a linear -> BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)
        self.gamma, self.beta = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
        self.fc, self.bn1d = nn.Linear(4, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        x = F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-5)
        return self.bn1d(self.fc(torch.relu(x).mean((2, 3))))


def test_functional_batch_norm_and_linear_bn_fold():
    model = FunctionalBN().eval()
    model.bn1d.running_mean.normal_()
    gm = auxwrap.trace(model).graph_module
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    report = fold_batchnorm(gm)
    assert len(report.folded) == 2 and report.skipped == []
    assert torch.allclose(gm(x), expected, atol=1e-5)
    assert not any(n.target in (F.batch_norm,) for n in gm.graph.nodes)


def test_a_conv_output_with_several_users_is_reported_not_folded():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = TwoUsers().eval()
    gm = auxwrap.trace(model).graph_module
    report = fold_batchnorm(gm)
    assert report.folded == [] and report.skipped == [("bn", "the output of conv has 2 users, not only this norm")]
    assert "not folded: bn" in str(report)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(gm(x), model(x))


def _nas_net(x=None):
    x = torch.randn(2, 3, 16, 16) if x is None else x
    return auxwrap.attach(ResidualNet(), ResidualNet(), "nas", example_inputs=(x,)), x


def test_prune_refuses_and_names_the_link_that_contributes():
    net, x = _nas_net()
    site, fusion = next((s, f) for s, f in net.fusion_sites(dest_branch="primary") if len(s.sources) == 2)
    fusion.set_gates(1e-3)                            # a small gate...
    with torch.no_grad():
        fusion.source_weight(1).normal_(0, 1e3)       # ...with large weights is not a small contribution
    gates = [c.gate for c in net.connections()]
    with pytest.raises(auxwrap.AuxwrapPruneError) as info:
        auxwrap.prune(net)
    lines = str(info.value).splitlines()
    assert "above tol=0.0001" in lines[0]
    assert lines[1].strip().startswith(f"aux0.{site.sources[1].name} -> primary.{site.dest.name} (gate 0.001")
    assert not any(site.sources[0].name in line and "->" in line for line in lines[1:2])
    assert [c.gate for c in net.connections()] == gates  # nothing cut
    with pytest.raises(auxwrap.AuxwrapPruneError, match="not cut"):
        net.detach_primary()


def test_prune_accepts_negligible_links_and_returns_the_cut_network():
    net, x = _nas_net()
    _train_steps(net, x)
    with torch.no_grad():
        for _, fusion in net.fusion_sites(dest_branch="primary"):
            fusion.weight.weight.mul_(1e-9)
    deployed = auxwrap.prune(net)
    assert all(c.gate == 0.0 for c in net.connections() if c.direction == "aux->primary")
    net.eval()
    assert _relative_error(deployed(x), net(x).primary) <= 1e-5
    assert net(x).aux[0].shape == (2, 10)  # the fused network is still usable


def test_prune_force_cuts_and_warns_with_the_measured_change():
    net, x = _nas_net()
    with torch.no_grad():
        for _, fusion in net.fusion_sites(dest_branch="primary"):
            fusion.weight.weight.normal_(0, 0.5)
    with pytest.warns(auxwrap.AuxwrapPruneWarning, match=r"cutting changed the primary's output by \d"):
        deployed = auxwrap.prune(net, force=True)
    net.eval()
    assert _relative_error(deployed(x), net(x).primary) <= 1e-5


def test_prune_in_grad_mode_has_nothing_to_cut():
    x = torch.randn(2, 3, 16, 16)
    net = auxwrap.attach(ResidualNet(), ResidualNet(), "grad", example_inputs=(x,))
    _train_steps(net, x)
    deployed = auxwrap.prune(net, tol=0.0)
    assert _relative_error(deployed(x), net.primary.eval()(x)) <= 1e-5


def test_deployed_module_is_new_and_the_fused_network_stays_usable():
    x = torch.randn(2, 3, 16, 16)
    net = auxwrap.attach(ResidualNet(), ResidualNet(), "grad", example_inputs=(x,))
    deployed = net.detach_primary()
    fused = {id(p) for p in net.parameters()}
    assert not any(id(p) in fused for p in deployed.parameters())
    _train_steps(net, x)  # training goes on
    assert not torch.equal(deployed(x), net.primary.eval()(x))  # the deployed copy did not move


def _hand_count_conv_linear(model, x):
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += 2 * output.numel() * k
        elif isinstance(module, nn.Linear):
            total += 2 * output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total


def test_count_flops_agrees_with_a_hand_count_on_resnet50():
    model, x = torchvision.models.resnet50().eval(), torch.randn(1, 3, 224, 224)
    counted = auxwrap.count_flops(model, x)
    assert math.isclose(counted, _hand_count_conv_linear(model, x), rel_tol=0.02)
    assert math.isclose(counted, 2 * 4.09e9, rel_tol=0.02)  # torchvision's published 4.09 GMACs


def test_count_flops_on_vit_base_agrees_with_a_hand_count_with_fused_attention_on_and_off():
    model, x = timm.create_model("vit_base_patch16_224", pretrained=False).eval(), torch.randn(1, 3, 224, 224)
    tokens, dim, heads, blocks = 197, 768, 12, 12
    attention = blocks * 2 * (2 * heads * tokens * tokens * (dim // heads))  # q k^T and attn v
    hand = _hand_count_conv_linear(model, x) + attention
    fused = auxwrap.count_flops(model, x)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    unfused = auxwrap.count_flops(model, x)
    assert fused == unfused
    assert math.isclose(fused, hand, rel_tol=0.02)


def test_report_table():
    x = torch.randn(2, 3, 16, 16)
    net = auxwrap.attach(ResidualNet(), ResidualNet(), "nas", example_inputs=(x,))
    table = auxwrap.report(net)
    rows = {row.model: row for row in table.rows}
    original, deployed = rows["original primary"], rows["deployed primary"]
    assert deployed.flops == original.flops and deployed.params <= original.params
    assert deployed.norm_layers == 0 < original.norm_layers
    assert rows["fused training graph, forward"].flops > 2 * original.flops
    assert rows["fused training graph, forward + backward"].flops > rows["fused training graph, forward"].flops
    assert rows["fused training graph, forward"].norm_layers == 2 * original.norm_layers
    assert original.macs * 2 == original.flops
    assert "| deployed primary |" in str(table)
    assert all(c.gate > 0.0 for c in net.connections())  # the report cut nothing


def test_deployed_module_saves_loads_and_exports_with_another_batch_size():
    x = torch.randn(2, 3, 16, 16)
    net = auxwrap.attach(ResidualNet(), ResidualNet(), "grad", example_inputs=(x,))
    _train_steps(net, x)
    deployed = auxwrap.prune(net)
    x3 = torch.randn(3, 3, 16, 16)
    expected = deployed(x3)
    other = auxwrap.prune(net)
    other.load_state_dict(deployed.state_dict())
    assert torch.equal(other(x3), expected)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(deployed, f"{tmp}/deployed.pt")
        loaded = torch.load(f"{tmp}/deployed.pt", weights_only=False)
        assert torch.equal(loaded(x3), expected)
        program = export(deployed, x)
        assert torch.allclose(program.module()(x3), expected, atol=1e-6)
        onnx = pytest.importorskip("onnx")
        export_onnx(deployed, f"{tmp}/deployed.onnx", x)
        model = onnx.load(f"{tmp}/deployed.onnx")
        onnx.checker.check_model(model)
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a dynamic batch


def test_switch_to_deploy_and_timm_reparameterize_model():
    x = torch.randn(2, 3, 16, 16)
    net = auxwrap.attach(ResidualNet(), ResidualNet(), "grad", example_inputs=(x,))
    _train_steps(net, x)
    expected = net.primary.eval()(x)
    converted = timm.utils.reparameterize_model(net)
    assert converted is not net and converted.deployed and not net.deployed
    out = converted(x)
    assert out.aux == () and _relative_error(out.primary, expected) <= 1e-5
    assert auxwrap.count_parameters(converted) <= auxwrap.count_parameters(net.primary)
    net.reparameterize()
    assert net.deployed and net(x).aux == ()


def test_flops_command(capsys):
    args = ["flops", "--primary", "torchvision:resnet18", "--aux", "torchvision:resnet18", "--mode", "grad",
            "--size", "64"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| original primary | 0.2" in out and "| deployed primary | 0.2" in out


# ---------------------------------------------------------------------- the deployed module is checked

class _Mean(nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


class _Max(nn.Module):
    def forward(self, x):
        return x.amax((2, 3))


class PoolNet(ResidualNet):
    """ResidualNet with its pooling as a submodule that fx traces through (its ops land in the graph) and a
    Python flag read at trace time."""

    def __init__(self):
        super().__init__()
        self.pool, self.scale_logits = _Mean(), False

    def forward(self, x):
        x = self.block4(self.block3(self.down(self.block2(self.block1(torch.relu(self.stem(x)))))))
        logits = self.head(self.pool(x))
        return logits * 2 if self.scale_logits else logits


def _replace_pool(model):
    model.pool = _Max()


def _set_flag(model):
    model.scale_logits = True


@pytest.mark.parametrize("change", [_replace_pool, _set_flag])
@pytest.mark.parametrize("mode", ["grad", "nas"])
def test_deploy_refuses_a_primary_that_no_longer_computes_what_the_fused_network_trained(mode, change):
    x = torch.randn(2, 3, 16, 16)
    primary = PoolNet()
    net = auxwrap.attach(primary, PoolNet(), mode, example_inputs=(x,)).train()
    change(primary)  # after attach() returned: the fused network still runs the graph traced before
    gates = [c.gate for c in net.connections()]
    for deploy in (auxwrap.prune, auxwrap.deploy.detach_primary, lambda n: n.detach_primary()):
        with pytest.raises(auxwrap.deploy.AuxwrapDeployError) as info:
            deploy(net)
        message = str(info.value)
        differs = float(message.split("differs from the fused network's primary output by ")[1].split(" ")[0])
        assert differs > 0.1
        assert "above 1e-05 for torch.float32" in message and "re-run auxwrap.attach()" in message
    assert [c.gate for c in net.connections()] == gates  # nothing cut
    assert all(m.training for m in net.modules())      # the mode it was in


def test_the_deployed_module_carries_its_measured_difference():
    x = torch.randn(2, 3, 16, 16)
    net = auxwrap.attach(ResidualNet(), ResidualNet(), "grad", example_inputs=(x,))
    _train_steps(net, x)
    deployed = auxwrap.prune(net, probe=torch.randn(3, 3, 16, 16))  # another batch size is a fine probe
    assert 0.0 < deployed.relative_error <= 1e-5
    assert auxwrap.deploy.deploy_tolerance(torch.float32) == 1e-5
    assert auxwrap.deploy.deploy_tolerance(torch.float64) == 1e-5
    assert auxwrap.deploy.deploy_tolerance(torch.bfloat16) == 8 * torch.finfo(torch.bfloat16).eps


# ---------------------------------------------------------------------- arguments

@pytest.mark.parametrize("tol", [float("nan"), float("inf"), -1, -1e-9, "a", None, True, np.bool_(True),
                                 torch.tensor(1e-4)])
def test_prune_refuses_a_tol_that_is_not_a_finite_number_at_least_zero(tol):
    net, _ = _nas_net()
    _contributing(net)
    gates = [c.gate for c in net.connections()]
    with pytest.raises(auxwrap.AuxwrapArgumentError, match=r"tol must be a finite number >= 0.*prune\(net, tol=1e-3\)"):
        auxwrap.prune(net, tol=tol)
    assert [c.gate for c in net.connections()] == gates


@pytest.mark.parametrize("tol", [np.float32(10.0), np.float64(10.0), 10, Fraction(10)])
def test_prune_takes_tol_as_any_real_number(tol):
    net, _ = _nas_net()
    _contributing(net)
    auxwrap.prune(net, tol=tol)  # the change is far below 10
    assert all(c.gate == 0.0 for c in net.connections() if c.direction == "aux->primary")


def _contributing(net):
    """Links into the primary whose cut changes its output by about 1e-3 (relative): above the default tol."""
    with torch.no_grad():
        for _, fusion in net.fusion_sites(dest_branch="primary"):
            fusion.weight.weight.normal_(0, 0.5)


@pytest.mark.parametrize("not_fused", [nn.Linear(2, 2), "x", None])
@pytest.mark.parametrize("deploy", ["prune", "detach_primary"])
def test_prune_and_detach_want_the_network_attach_returned(deploy, not_fused):
    function = getattr(auxwrap.deploy, deploy)
    with pytest.raises(auxwrap.AuxwrapArgumentError,
                       match=rf"{deploy}\(net\): net must be the FusedNet that auxwrap.attach\(\) returns.*got "
                             rf"{type(not_fused).__name__}"):
        function(not_fused)


@pytest.mark.parametrize("mode", ["grad", "nas"])
@pytest.mark.parametrize("deploy", ["prune", "detach_primary"])
def test_a_probe_unlike_the_example_inputs_is_named(mode, deploy):
    x = torch.randn(2, 3, 16, 16)
    net = auxwrap.attach(ResidualNet(), ResidualNet(), mode, example_inputs=(x,))
    if deploy == "detach_primary":
        auxwrap.deploy.cut_links(net)
    function = getattr(auxwrap.deploy, deploy)
    gates = [c.gate for c in net.connections()]
    with pytest.raises(auxwrap.AuxwrapArgumentError, match=re.escape(
            "the probe [(2, 4, 16, 16) float32 on cpu] is unlike the example inputs given to attach() "
            "[(2, 3, 16, 16) float32 on cpu]")) as info:
        function(net, probe=torch.randn(2, 4, 16, 16))
    assert "leave probe=None" in str(info.value)
    with pytest.raises(auxwrap.AuxwrapArgumentError, match=r"\[\(2, 3, 16, 16\) float64 on cpu\] is unlike"):
        function(net, probe=x.double())
    assert [c.gate for c in net.connections()] == gates


# ---------------------------------------------------------------------- norms called at several sites

class SharedNorm(nn.Module):
    """One norm module called after two convs (as a timm BatchNormAct2d used twice stays one call_module)."""

    def __init__(self, norm):
        super().__init__()
        self.conv1, self.conv2, self.norm = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), norm

    def forward(self, x):
        return self.norm(self.conv2(self.norm(self.conv1(x))))


def _random_stats(norm):
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.normal_()
        norm.bias.normal_()
    return norm


@pytest.mark.parametrize("norm", [nn.BatchNorm2d, timm.layers.BatchNormAct2d])
def test_a_norm_module_called_at_two_sites_folds_into_each_conv(norm):
    model = SharedNorm(_random_stats(norm(4))).eval()
    gm = auxwrap.trace(model).graph_module
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv1", "norm", "conv2", "norm"]
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    report = fold_batchnorm(gm)
    assert report.folded == [("norm", "conv1"), ("norm_1", "conv2")] and report.skipped == []
    assert _relative_error(gm(x), expected) <= 1e-5
    assert not any(isinstance(m, BN_TYPES) for m in gm.modules())
    assert sum(isinstance(m, nn.ReLU) for m in gm.modules()) == (norm is timm.layers.BatchNormAct2d)


def test_a_shared_norm_module_stays_where_a_site_cannot_fold():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(4, 4, 3, padding=1), _random_stats(timm.layers.BatchNormAct2d(4))

        def forward(self, x):
            return self.norm(self.conv(x)) + self.norm(x * 2)

    model = Mixed().eval()
    gm = auxwrap.trace(model).graph_module
    x = torch.randn(2, 4, 8, 8)
    expected = model(x)
    report = fold_batchnorm(gm)
    assert report.folded == [("norm", "conv")]
    assert report.skipped == [("norm_1", "its input is not a conv or linear layer")]
    assert _relative_error(gm(x), expected) <= 1e-5
    assert isinstance(gm.norm, timm.layers.BatchNormAct2d) and isinstance(gm.norm_act, nn.Sequential)


def test_functional_batch_norm_on_statistics_used_at_two_sites_folds_into_each_conv():
    class SharedStats(FunctionalBN):
        def __init__(self):
            super().__init__()
            self.conv2 = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-5)
            return y + F.batch_norm(self.conv2(x), self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-5)

    model = SharedStats().eval()
    gm = auxwrap.trace(model).graph_module
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    report = fold_batchnorm(gm)
    assert [layer for _, layer in report.folded] == ["conv", "conv2"] and report.skipped == []
    assert _relative_error(gm(x), expected) <= 1e-5
    assert not any(n.target is F.batch_norm for n in gm.graph.nodes)
    assert torch.equal(gm.mean, model.mean) and torch.equal(gm.var, model.var)  # read, not changed


def test_prune_folds_a_batchnormact_called_at_two_sites_of_a_primary():
    x = torch.randn(2, 3, 8, 8)
    primary = SharedNorm(_random_stats(timm.layers.BatchNormAct2d(4)))
    net = auxwrap.attach(primary, SharedNorm(timm.layers.BatchNormAct2d(4)), "grad", example_inputs=(x,),
                         taps=["conv1", "conv2"])
    deployed = auxwrap.prune(net)
    assert deployed.relative_error <= 1e-5 and len(deployed.fold_report.folded) == 2
