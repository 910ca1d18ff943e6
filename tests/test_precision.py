"""Mixed precision: bfloat16 autocast on the CPU through the fused forward and backward, the gate search, the
multi-task gradient methods and a GradScaler weight step; the gates and the L1 term stay float32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import auxwrap
from auxwrap import mto
from auxwrap.fusion import Fusion

from .zoo import ResidualNet

pytestmark = pytest.mark.usefixtures("one_thread")

BF16 = torch.bfloat16
#: bfloat16 keeps 8 bits of mantissa (relative rounding 2**-9): a few roundings along a small net
BF16_RTOL = 2e-2


def _autocast():
    return torch.autocast("cpu", dtype=BF16)


def _net(mode: str = "nas") -> tuple[auxwrap.FusedNet, torch.Tensor, torch.Tensor]:
    """ResidualNet(4) with a ResidualNet(2) auxiliary, every gate at 0.5 and random fusion weights: every
    link carries features, so that low precision anywhere along them shows."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
    kwargs = {"alpha_init": 0.5} if mode == "nas" else {}
    net = auxwrap.attach(ResidualNet(4), ResidualNet(2), mode=mode, example_inputs=(x[:2],), **kwargs)
    with torch.no_grad():
        for _, fusion in net.fusion_sites():
            fusion.weight.weight.normal_(0.0, 0.1)
    return net.train(), x, y


def _losses(net: auxwrap.FusedNet, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    out = net(x)
    return [F.cross_entropy(out.primary, y), F.cross_entropy(out.aux[0], y // 2)]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_autocast_outputs_are_close_to_float32():
    net, x, _ = _net()
    reference = net(x)
    with _autocast():
        out = net(x)
    assert out.primary.dtype == BF16  # autocast did run the convolutions in bfloat16
    for low, full in zip((out.primary, *out.aux), (reference.primary, *reference.aux), strict=True):
        assert _relative(low, full) < BF16_RTOL


def test_gates_and_l1_stay_float32_under_autocast(monkeypatch):
    net, x, y = _net()
    gate_dtypes = []
    gate_values = Fusion.gate_values

    def spy(self):  # noqa: ANN001, ANN202
        values = gate_values(self)
        gate_dtypes.append(values.dtype)
        return values

    monkeypatch.setattr(Fusion, "gate_values", spy)
    search = auxwrap.Search(net, total_steps=4, ramp=(0.0, 1.0))
    search.steps_done = 2  # on the ramp: lambda > 0
    with _autocast():
        _losses(net, x, y)
        penalty = search.penalty()
    assert len(gate_dtypes) >= len(net.fusions) and set(gate_dtypes) == {torch.float32}
    assert search.lam() > 0 and penalty.dtype == torch.float32


def test_every_gate_and_fusion_weight_gets_a_finite_gradient_under_autocast():
    net, x, y = _net()
    with _autocast():
        loss = sum(_losses(net, x, y))
    loss.backward()
    for name, fusion in net.fusions.items():
        for p in (fusion.gate, fusion.weight.weight):
            assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name
            assert torch.isfinite(p.grad).all() and p.grad.any(), name


def test_search_and_grad_scaler_steps_under_autocast_then_prune():
    """The alternating loop under autocast (the gate step inside the autocast block, the weight step through a
    GradScaler), through the cut; prune() then checks the cut in float32 and deploys."""
    net, x, y = _net()
    search = auxwrap.Search(net, total_steps=4, ramp=(0.0, 0.5), cut=0.5)
    opt = torch.optim.SGD(net.weight_parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu")
    gates_before = torch.cat([g.detach().clone() for g in net.arch_parameters()])
    weights_before = net.primary.stem.weight.detach().clone()
    for _ in range(4):
        with _autocast():
            search.step(sum(_losses(net, x, y)))
            loss = sum(_losses(net, x, y))
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert search.is_cut and all(g.dtype == torch.float32 for g in net.arch_parameters())
    assert not torch.equal(torch.cat([g.detach() for g in net.arch_parameters()]), gates_before)
    assert not torch.equal(net.primary.stem.weight, weights_before)  # the scaler stepped (no inf skipped it)
    deploy = auxwrap.prune(net)
    net.eval()
    with torch.no_grad():
        assert torch.allclose(deploy(x), net(x).primary, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["cagrad", "pcgrad-aux"])
def test_mto_backward_inside_autocast_combines_in_float32(method):
    """Called inside the autocast block, the gradient methods combine as outside it (CAGrad's Gram matrix
    and PCGrad-aux's products dropped to bfloat16: relative errors 6e-4 and 5e-5 before the fix)."""
    grads = []
    for inside in (False, True):
        net, x, y = _net("grad")
        with _autocast():
            losses = _losses(net, x, y)
            if inside:
                mto.backward(losses, net, method)
        if not inside:
            mto.backward(losses, net, method)
        grads.append(torch.cat([p.grad.flatten() for p in net.primary.parameters()]))
    assert grads[1].dtype == torch.float32 and grads[1].any()
    assert torch.equal(grads[0], grads[1])
