"""Low-rank fusions, ``attach(..., fusion_rank=r)`` (issue 15): W = B . A, B zero-initialised.

What must hold as at full rank: I1 (the original branches at step 0, the primary alone once its links are
cut), gradients into every fusion weight, exact per-source contributions for prune (I5) and an exact deploy;
and what low rank is for: a fusion costs r * (sources' channels + C) multiply-adds per position, never more
than its full W.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import auxwrap
from auxwrap.analysis import NCHW, NHWC, TOKENS
from auxwrap.cli import main as cli_main
from auxwrap.demo.experiments import Config, _attach_options, method_label
from auxwrap.deploy import cut_links
from auxwrap.fusion import Fusion, Point, low_rank

from .zoo import ResidualNet, make


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: one intra-op thread (tests/conftest.py)."""


def _pair(mode: str = "nas", fusion_rank: object = 0.25, **options):
    x = torch.randn(2, 3, 16, 16)
    primary, aux = ResidualNet(), ResidualNet()
    net = auxwrap.attach(primary, aux, mode, example_inputs=(x,), fusion_rank=fusion_rank, **options)
    return net, primary, aux, x


def _loss(out) -> torch.Tensor:
    return out.primary.square().mean() + out.aux[0].square().mean()


def _steps(net, x, steps: int = 2, lr: float = 1e-2) -> None:
    opt = torch.optim.SGD(net.weight_parameters(), lr=lr)
    net.train()
    for _ in range(steps):
        opt.zero_grad()
        _loss(net(x)).backward()
        opt.step()


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------- the option


@pytest.mark.parametrize("bad", [0, -2, 0.0, 1.5, -0.25, float("nan"), float("inf"), True, "0.25", (4,)])
def test_bad_fusion_rank_raises_naming_the_argument_and_the_fix(bad):
    x = torch.randn(2, 3, 16, 16)
    primary = ResidualNet()
    before = copy.deepcopy(primary.state_dict())
    with pytest.raises(auxwrap.AuxwrapArgumentError, match=r"fusion_rank must be None, an int >= 1 or a float "
                                                            r"in \(0, 1\].*0\.25 for C/4"):
        auxwrap.attach(primary, ResidualNet(), example_inputs=(x,), fusion_rank=bad)
    assert all(torch.equal(v, before[k]) for k, v in primary.state_dict().items())


@pytest.mark.parametrize(("spec", "sources", "dest", "rank"), [
    (None, 64, 64, None),
    (0.25, 96, 64, 16),        # C/4
    (0.07, 300, 100, 7),       # 0.07 * 100 is 7.000000000000001 in floating point: still 7
    (0.3, 100, 10, 3),         # rounded up
    (0.001, 100, 10, 1),       # at least 1
    (1, 8, 8, 1),              # an int is a rank; 1 * 16 < 64
    (4, 8, 8, None),           # 4 * (8 + 8) = 64: no cheaper than the full W, which it keeps
    (4, 24, 16, 4),            # 4 * 40 < 384
    (1.0, 8, 8, None),         # the float 1.0 is C: never cheaper
])
def test_low_rank_is_the_int_or_the_fraction_of_c_and_never_costs_more(spec, sources, dest, rank):
    assert low_rank(spec, sources, dest) == rank


def test_extra_repr_shows_the_rank():
    net, *_ = _pair(fusion_rank=4)
    reprs = {name: f.extra_repr() for name, f in net.fusions.items()}
    assert all(("full rank" if f.rank is None else f"rank {f.rank},") in reprs[n] for n, f in net.fusions.items())
    assert {f.rank for f in net.fusions.values()} == {None, 4}  # 8 -> 8 channels stay full, wider ones drop


# ---------------------------------------------------------------------- I1 and gradients


@pytest.mark.parametrize("mode", ["grad", "nas"])
def test_step_0_computes_the_original_branches_in_train_and_eval_mode(mode):
    net, primary, aux, x = _pair(mode)
    for training in (True, False):
        originals = [copy.deepcopy(m).train(training) for m in (primary, aux)]
        expected = [m(x) for m in originals]
        with torch.no_grad():
            out = net.train(training)(x)
        assert torch.equal(out.primary, expected[0]) and torch.equal(out.aux[0], expected[1]), training


def test_gradients_reach_b_at_step_0_and_a_once_b_moved():
    net, _, _, x = _pair("nas", alpha_init=0.5)
    assert all(f.reduce is not None for f in net.fusions.values())
    _loss(net.train()(x)).backward()
    for name, f in net.fusions.items():
        assert f.weight.weight.grad is not None and f.weight.weight.grad.any(), f"B of {name}: no gradient"
        grad = f.reduce.weight.grad  # B = 0: nothing flows back through it yet
        assert grad is None or not grad.any(), f"A of {name} got a gradient through B = 0"
    _steps(net, x, steps=1)
    net.zero_grad()
    _loss(net(x)).backward()
    for name, f in net.fusions.items():
        grad = f.reduce.weight.grad
        for j in range(len(f.sources)):  # every source's columns of A
            start = sum(s.channels for s in f.sources[:j])
            assert grad[:, start:start + f.sources[j].channels].any(), f"A of {name}, source {j}: no gradient"
        assert f.gate.grad is not None and f.gate.grad.any(), f"gates of {name}: no gradient"


# ---------------------------------------------------------------------- per-source contributions, prune, deploy


@pytest.mark.parametrize("layout", [NCHW, NHWC, TOKENS])
def test_low_rank_fusion_equals_the_full_fusion_of_its_effective_w(layout):
    shapes = {NCHW: lambda c: (2, c, 4, 4), NHWC: lambda c: (2, 4, 4, c), TOKENS: lambda c: (2, 16, c)}[layout]
    sources = [Point(layout, 12), Point(layout, 20)]
    low = Fusion(sources, Point(layout, 16), gate_init=0.3, rank=0.25)
    assert low.rank == 4 and "rank 4" in low.extra_repr()
    with torch.no_grad():
        low.weight.weight.normal_()
    full = Fusion(sources, Point(layout, 16), gate_init=0.3)
    with torch.no_grad():  # W = [W_0 W_1], the columns of each source, in either layer's weight layout
        full.weight.weight.copy_(torch.cat([low.source_weight(j) for j in range(2)], dim=1))
        full.gate.copy_(low.gate)
    dest, a, b = torch.randn(shapes(16)), torch.randn(shapes(12)), torch.randn(shapes(20))
    parts = low.source_contributions(dest, a, b)
    assert [tuple(w.shape) for w in (low.source_weight(0), low.source_weight(1))] == [
        tuple(full.source_weight(j).shape) for j in range(2)]
    torch.testing.assert_close(parts[0] + parts[1], low.contribution(dest, a, b))
    torch.testing.assert_close(low(dest, a, b), full(dest, a, b))
    torch.testing.assert_close(parts, full.source_contributions(dest, a, b))


def test_prune_refuses_a_large_low_rank_link_and_deploys_exactly_once_it_is_negligible():
    net, _, _, x = _pair("nas")
    _steps(net, x)
    with torch.no_grad():
        for _, fusion in net.fusion_sites(dest_branch="primary"):
            fusion.weight.weight.normal_(0, 10.0)  # B: a small gate with large weights is not a small contribution
    with pytest.raises(auxwrap.AuxwrapPruneError, match="aux0"):
        auxwrap.prune(net)
    with torch.no_grad():
        for _, fusion in net.fusion_sites(dest_branch="primary"):
            fusion.weight.weight.mul_(1e-12)
    deployed = auxwrap.prune(net)
    net.eval()
    with torch.no_grad():
        assert _relative_error(deployed(x), net(x).primary) <= 1e-5
        assert _relative_error(deployed(x), net.primary(x)) <= 1e-5  # I1: the user's trained primary alone
    assert auxwrap.count_flops(deployed, x) == auxwrap.count_flops(net.primary, x)


def test_cut_network_is_the_trained_primary_alone_in_train_and_eval_mode():
    net, primary, _, x = _pair("nas", alpha_init=0.5)
    _steps(net, x)
    cut_links(net)
    for training in (True, False):
        reference = copy.deepcopy(primary).train(training)
        with torch.no_grad():
            assert torch.equal(net.train(training)(x).primary, reference(x)), training


def test_mixed_pair_of_tokens_and_maps_starts_exact_and_learns():
    (primary, x), (aux, _) = make("timm_deit_tiny"), make("tv_resnet18")
    net = auxwrap.attach(primary, aux, "nas", example_inputs=(x,), fusion_rank=0.25, alpha_init=0.5)
    assert any(isinstance(f.weight, nn.Linear) and f.rank for f in net.fusions.values())
    expected = copy.deepcopy(primary).eval()(x)
    with torch.no_grad():
        assert torch.equal(net.eval()(x).primary, expected)
    _steps(net, x, steps=1)
    assert all(f.weight.weight.any() for f in net.fusions.values()), "a step moved no B"


# ---------------------------------------------------------------------- cost


def _fusion_flops(net, batch: int) -> int:
    """2 x multiply-adds of every fusion: r * (S + C), or S * C at full rank, per destination position."""
    total = 0
    for site, fusion in net.fusion_sites():
        shape = site.dest.shape
        positions = batch * math.prod(shape[2:] if fusion.dest.layout == NCHW else shape[1:-1])
        s, c = sum(p.channels for p in fusion.sources), fusion.dest.channels
        total += 2 * positions * (s * c if fusion.rank is None else fusion.rank * (s + c))
    return total


@pytest.mark.parametrize("fusion_rank", [None, 0.25, 4])
def test_fused_forward_flops_are_the_branches_plus_the_analytic_fusion_count(fusion_rank):
    net, primary, aux, x = _pair("nas", fusion_rank=fusion_rank)
    branches = auxwrap.count_flops(primary, x) + auxwrap.count_flops(aux, x)
    assert auxwrap.count_flops(net, x) == branches + _fusion_flops(net, x.shape[0])
    if fusion_rank is not None:
        full, *_ = _pair("nas", fusion_rank=None)
        assert auxwrap.count_flops(net, x) < auxwrap.count_flops(full, x)


# ---------------------------------------------------------------------- command line, experiments


def test_cli_flops_takes_fusion_rank_and_refuses_a_bad_one(capsys):
    args = ["flops", "--primary", "timm:resnet18", "--aux", "timm:resnet18", "--size", "32", "--taps", "stage"]
    assert cli_main([*args, "--fusion-rank", "0.25"]) == 0
    assert "fusion_rank=0.25" in capsys.readouterr().out
    assert cli_main([*args, "--fusion-rank", "2.5"]) == 2
    assert "fusion_rank must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main([*args, "--fusion-rank", "quarter"])
    assert "'quarter' is not a number" in capsys.readouterr().err


def test_rank_methods_attach_with_the_configs_fusion_rank():
    assert _attach_options("aux-nas-rank", Config())["fusion_rank"] == 0.25
    assert _attach_options("aux-g-layer-rank", Config(fusion_rank=8))["fusion_rank"] == 8
    assert "fusion_rank" not in _attach_options("aux-nas", Config())
    assert method_label("aux-nas-rank") == "Aux-NAS rank C/4"
