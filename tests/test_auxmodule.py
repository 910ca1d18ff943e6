import pytest
import torch
from torch import nn

import auxwrap
from auxwrap import AuxModule

from .zoo import DictNet, make

ARCHS = ["tv_resnet18", "tv_vgg11_bn", "timm_efficientnet_b0", "timm_convnext_atto", "timm_deit_tiny",
         "timm_swin_tiny"]


def _relative_error(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("name", ARCHS)
def test_identity_and_single_task_deployment_with_aux_modules(name):
    primary, x = make(name)
    net = auxwrap.attach(primary, [AuxModule(num_outputs=5), AuxModule(num_outputs=3, head="dense")], "grad",
                         example_inputs=(x,))
    for training in (True, False):  # I1: the primary's output is the original's
        net.train(training)
        primary.train(training)
        with torch.no_grad():
            assert torch.equal(net(x).primary, primary(x))
    net.train()
    opt = torch.optim.SGD(net.weight_parameters(), lr=1e-3)
    for _ in range(2):
        out = net(x)
        loss = out.primary.square().mean() + out.aux[0].square().mean() + out.aux[1].square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    deployed = auxwrap.prune(net)  # I2: the primary alone, BatchNorms folded
    primary.eval()
    assert _relative_error(deployed(x), primary(x)) <= 1e-5
    assert auxwrap.count_flops(deployed, x) <= auxwrap.count_flops(primary, x)
    assert auxwrap.count_parameters(deployed) <= auxwrap.count_parameters(primary)
    assert out.aux[1].shape == (x.shape[0], 3, *x.shape[-2:])  # the dense head answers at input size


@pytest.mark.parametrize("name", ["tv_resnet18", "timm_deit_tiny", "tv_vgg11_bn"])
@pytest.mark.parametrize("aggregate", ["sum", "concat"])
def test_the_auxiliary_loss_reaches_the_primary_at_every_point_it_reads(name, aggregate):
    primary, x = make(name)
    module = AuxModule(num_outputs=4, aggregate=aggregate, adaptor="3x3")
    net = auxwrap.attach(primary, module, "grad", example_inputs=(x,))
    features = []

    def keep(_, args):
        for feature in args[1:]:
            feature.retain_grad()
            features.append(feature)

    module.register_forward_pre_hook(keep)
    net(x).aux[0].square().mean().backward()
    assert len(features) == len(net.taps["aux0"]) == len(net.taps["primary"])
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in features)
    reached = [p for p in primary.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(reached) >= len(list(primary.parameters())) - 4  # all but the primary's own head


def test_aux_module_reads_its_own_points_and_reports_its_links():
    primary, x = make("tv_resnet18")
    net = auxwrap.attach(primary, [make("tv_resnet18")[0], AuxModule(num_outputs=2, taps="stage")], "nas",
                         example_inputs=(x,))
    reads = [c for c in net.connections() if c.dest_branch == "aux1"]
    assert [c.source for c in reads] == ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert {c.gate for c in reads} == {1.0} and {c.direction for c in reads} == {"primary->aux"}
    assert not any(c.source_branch == "aux1" for c in net.connections())  # it never feeds back
    assert net(x).aux[1].shape == (2, 2)


def test_hard_parameter_sharing_network_with_one_aux_module_per_task():
    torch.manual_seed(0)
    primary, x = DictNet(), torch.randn(8, 3, 16, 16)  # a shared encoder, a 5-class head and a 3-class dense head
    cls, seg = torch.randint(0, 5, (8,)), torch.randint(0, 3, (8, 16, 16))
    net = auxwrap.attach(primary, [AuxModule(num_outputs=5), AuxModule(num_outputs=3, head="dense")], "grad",
                         example_inputs=(x,))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    ce = nn.functional.cross_entropy
    losses = []
    for _ in range(15):
        out = net(x)
        task = ce(out.primary["logits"], cls) + ce(out.primary["mask"], seg)
        auxiliary = ce(out.aux[0], cls) + ce(out.aux[1], seg)  # each module supervised by its task's labels
        opt.zero_grad()
        (task + 0.5 * auxiliary).backward()
        opt.step()
        losses.append(task.item())
    assert losses[-1] < losses[0]
    deployed = auxwrap.prune(net)
    primary.eval()
    expected = primary(x)
    assert set(deployed(x)) == {"logits", "mask"}
    assert all(_relative_error(deployed(x)[k], expected[k]) <= 1e-5 for k in expected)
    table = {row.model: row for row in auxwrap.report(net).rows}
    assert table["deployed primary"].flops == table["original primary"].flops  # zero inference overhead
    assert table["fused training graph, forward"].flops > table["original primary"].flops  # training cost


@pytest.mark.parametrize(("kwargs", "match"), [
    ({}, "needs num_outputs"),
    ({"num_outputs": 3, "head": "pool"}, "head='pool' is not one of"),
    ({"num_outputs": 3, "adaptor": "5x5"}, "adaptor='5x5' is not one of"),
    ({"num_outputs": 3, "aggregate": "max"}, "aggregate='max' is not one of"),
    ({"num_outputs": 3, "hidden": 0}, "hidden must be a positive int"),
])
def test_bad_aux_module_options(kwargs, match):
    with pytest.raises(auxwrap.AuxwrapArgumentError, match=match):
        AuxModule(**kwargs)


def test_an_aux_module_attaches_once_and_a_failed_attach_leaves_it_unbound():
    primary, x = make("tv_resnet18")
    module = AuxModule(num_outputs=3, taps=["nope"])
    with pytest.raises(auxwrap.AuxwrapTapError, match="unknown fusion point 'nope'"):
        auxwrap.attach(primary, module, "grad", example_inputs=(x,))
    assert not module.bound and len(list(module.parameters())) == 0
    module = AuxModule(num_outputs=3)
    auxwrap.attach(primary, module, "grad", example_inputs=(x,))
    with pytest.raises(auxwrap.AuxwrapArgumentError, match="already attached"):
        auxwrap.attach(make("tv_resnet18")[0], module, "grad", example_inputs=(x,))


def test_user_head_module():
    primary, x = make("tv_resnet18")
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 6))
    net = auxwrap.attach(primary, AuxModule(head=head, hidden=32), "grad", example_inputs=(x,))
    assert net(x).aux[0].shape == (2, 6)
