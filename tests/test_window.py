"""The three window forms of DESIGN §2: which of the other branch's points a fusion reads, and how
(``"paper"``: strictly earlier layer outputs; ``"code"``: the same depth before its fusion and the earlier
layer outputs; ``"group"``: as ``"code"`` within groups of ``window`` points)."""

from __future__ import annotations

import graphlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import auxwrap
from auxwrap.analysis import NCHW
from auxwrap.plan import (
    BEFORE,
    DEFAULT_WINDOW_FORM,
    OUTPUT,
    PRIMARY,
    TO_AUX,
    WINDOW_FORMS,
    AuxwrapPairingError,
    group_of,
    plan,
    window_of,
)
from auxwrap.taps import Tap

from .zoo import ResidualBlock

X = torch.randn(2, 3, 16, 16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors: one intra-op thread."""


class UnitStack(nn.Module):
    """``n`` conv -> norm -> activation units in a plain stack (each one fusion point), then a head."""

    def __init__(self, n: int = 6, channels: int = 8):
        super().__init__()
        layers: list[nn.Module] = []
        for k in range(n):
            layers += [nn.Conv2d(3 if k == 0 else channels, channels, 3, padding=1), nn.BatchNorm2d(channels),
                       nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))

    def conv(self, k: int) -> nn.Module:
        return self.features[3 * k]

    def after(self, k: int) -> nn.Module | None:
        """The module that reads unit ``k``'s output (None for the last unit)."""
        return self.features[3 * k + 3] if 3 * k + 3 < len(self.features) else None


class BlockStack(nn.Module):
    """A stem and ``n`` residual blocks (each one fusion point), then a head."""

    def __init__(self, n: int = 6, channels: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.Sequential(*(ResidualBlock(channels) for _ in range(n)))
        self.head = nn.Linear(channels, 10)

    def forward(self, x):
        return self.head(self.blocks(torch.relu(self.stem(x))).mean((2, 3)))

    def after(self, k: int) -> nn.Module | None:
        return self.blocks[k + 1].conv1 if k + 1 < len(self.blocks) else None


class HalvingBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return x + self.bn(self.conv(x))  # an add saves nothing for backward: its output may be changed in place


class InplaceAfterBlocks(nn.Module):
    """Every block's output is halved in place right after it: what another branch reads of a block (its
    output, fused or not) must be taken before that."""

    def __init__(self, n: int = 4, channels: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.ModuleList(HalvingBlock(channels) for _ in range(n))
        self.head = nn.Linear(channels, 10)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
            x.mul_(0.5)
        return self.head(x.mean((2, 3)))

    def after(self, k: int) -> nn.Module | None:
        return self.blocks[k + 1].conv if k + 1 < len(self.blocks) else None


# expected source indices per destination, equal-length branches of 6 points, window 3
EXPECTED = {
    "paper": [[], [0], [0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4]],
    "code": [[0], [0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5]],
    "group": [[0], [0, 1], [0, 1, 2], [3], [3, 4], [3, 4, 5]],
}
NETS = {"units": UnitStack, "blocks": BlockStack}


def _attach(kind: str, form: str, mode: str = "nas", n: tuple[int, int] = (6, 6), **kwargs) -> auxwrap.FusedNet:
    torch.manual_seed(0)
    return auxwrap.attach(NETS[kind](n[0]), NETS[kind](n[1]), mode, example_inputs=(X,), window_form=form, **kwargs)


def _planned(net: auxwrap.FusedNet, dest_branch: str) -> list[tuple[list[int], list[str]]]:
    """Per destination point of ``dest_branch``: the source indices it reads and how."""
    source_branch = "aux0" if dest_branch == PRIMARY else PRIMARY
    names = {b: [t.name for t in net.taps[b]] for b in (PRIMARY, "aux0")}
    planned = [([], []) for _ in names[dest_branch]]
    for c in net.connections():
        if c.dest_branch == dest_branch:
            indices, reads = planned[names[dest_branch].index(c.dest)]
            indices.append(names[source_branch].index(c.source))
            reads.append(c.reads)
    return planned


# ---------------------------------------------------------------------------- (a) planned sources


@pytest.mark.parametrize("kind", list(NETS))
@pytest.mark.parametrize("form", WINDOW_FORMS)
def test_planned_sources_per_destination(form, kind):
    net = _attach(kind, form)
    assert net.window_form == form
    assert [t.kind for t in net.taps[PRIMARY]] == ["unit" if kind == "units" else "block"] * 6
    for dest_branch in (PRIMARY, "aux0"):  # both directions of mode="nas"
        planned = _planned(net, dest_branch)
        assert [indices for indices, _ in planned] == EXPECTED[form]
        for i, (indices, reads) in enumerate(planned):
            # "paper" reads layer outputs only; "code" and "group" read the same depth before its fusion
            assert reads == [BEFORE if j == i and form != "paper" else OUTPUT for j in indices]
    sites = {site.dest.name: site for site, _ in net.fusion_sites("aux0")}
    assert len(sites) == (5 if form == "paper" else 6)  # the first point of "paper" has nothing earlier to read
    for site in sites.values():
        assert len(site.reads) == len(site.sources)


def test_default_form_is_the_one_constant():
    assert DEFAULT_WINDOW_FORM in WINDOW_FORMS
    net = auxwrap.attach(UnitStack(4), UnitStack(4), "grad", example_inputs=(X,))
    assert net.window_form == DEFAULT_WINDOW_FORM and net.window == 3


# ---------------------------------------------------------------------------- (b) what the fusions read


def _record(net: auxwrap.FusedNet, models: dict[str, nn.Module]):
    """Run ``net`` once; return what each fusion module was called with, and per branch each point's
    layer output as the branch's next layer reads it (captured at that layer's input)."""
    calls: dict[str, list[torch.Tensor]] = {}
    layer_outputs: dict[str, dict[int, torch.Tensor]] = {b: {} for b in models}
    conv_outputs: dict[str, dict[int, torch.Tensor]] = {b: {} for b in models}
    hooks = []
    for name, fusion in net.fusions.items():
        hooks.append(fusion.register_forward_hook(
            lambda _m, args, _out, name=name: calls.__setitem__(name, [a.detach().clone() for a in args])))
    for branch, model in models.items():
        for k in range(len(net.taps[branch])):
            after = model.after(k)
            if after is not None:
                hooks.append(after.register_forward_pre_hook(
                    lambda _m, args, b=branch, k=k: layer_outputs[b].__setitem__(k, args[0].detach().clone())))
            if isinstance(model, UnitStack):
                hooks.append(model.conv(k).register_forward_hook(
                    lambda _m, _a, out, b=branch, k=k: conv_outputs[b].__setitem__(k, out.detach().clone())))
    try:
        with torch.no_grad():
            net(X)
    finally:
        for hook in hooks:
            hook.remove()
    return calls, layer_outputs, conv_outputs


def _randomise(net: auxwrap.FusedNet) -> None:
    """Non-zero fusion weights, so a fused value differs from the value before its fusion."""
    with torch.no_grad():
        for fusion in net.fusions.values():
            fusion.weight.weight.normal_(0, 0.5)


@pytest.mark.parametrize("kind", list(NETS))
@pytest.mark.parametrize("form", WINDOW_FORMS)
def test_fusions_read_what_the_form_says(form, kind):
    net = _attach(kind, form).eval()
    _randomise(net)
    models = {PRIMARY: net.primary, "aux0": net.aux[0]}
    calls, layer_outputs, conv_outputs = _record(net, models)
    names = {b: [t.name for t in net.taps[b]] for b in models}
    dest_of = {site.name: site for site, _ in net.fusion_sites()}
    fusion_at = {(s.dest_branch, names[s.dest_branch].index(s.dest.name)): s.name for s in dest_of.values()}
    checked = {OUTPUT: 0, BEFORE: 0}
    for name, site in dest_of.items():
        _, *sources = calls[name]
        for tensor, tap, reads in zip(sources, site.sources, site.reads, strict=True):
            j = names[site.source_branch].index(tap.name)
            checked[reads] += 1
            if reads == OUTPUT:
                # the source branch's layer output: what its next layer reads, after its own fusion at j
                assert torch.equal(tensor, layer_outputs[site.source_branch][j]), (name, tap.name)
                if kind == "units":  # after the unit's norm and activation, not the raw conv output
                    assert tensor.min() >= 0 and not torch.equal(tensor, conv_outputs[site.source_branch][j])
            else:
                # the value before the source's own fusion at j: the first argument of that fusion
                before = calls[fusion_at[(site.source_branch, j)]][0]
                assert torch.equal(tensor, before), (name, tap.name)
                if kind == "units":  # at a conv -> norm -> activation unit that is the conv output
                    assert torch.equal(tensor, conv_outputs[site.source_branch][j])
                if j in layer_outputs[site.source_branch]:
                    assert not torch.equal(tensor, layer_outputs[site.source_branch][j])
    assert checked[OUTPUT] > 0 and (checked[BEFORE] > 0) == (form != "paper")


@pytest.mark.parametrize("form", WINDOW_FORMS)
@pytest.mark.parametrize("mode", ["grad", "nas"])
def test_a_later_inplace_op_does_not_change_the_output_another_branch_reads(form, mode):
    torch.manual_seed(0)
    primary, aux = InplaceAfterBlocks(), InplaceAfterBlocks()
    net = auxwrap.attach(primary, aux, mode, example_inputs=(X,), window_form=form).eval()
    assert "clone" in net.code
    _randomise(net)
    models = {PRIMARY: primary, "aux0": aux}
    calls, layer_outputs, _ = _record(net, models)
    names = {b: [t.name for t in net.taps[b]] for b in models}
    for site, _ in net.fusion_sites():
        _, *sources = calls[site.name]
        for tensor, tap, reads in zip(sources, site.sources, site.reads, strict=True):
            j = names[site.source_branch].index(tap.name)
            if reads == OUTPUT:  # the block's output as it left the block, before the in-place halving
                assert torch.equal(tensor * 0.5, layer_outputs[site.source_branch][j])
    net.train()
    out = net(X)
    (out.primary.square().mean() + out.aux[0].square().mean()).backward()  # no autograd in-place error


# ---------------------------------------------------------------------------- invariants in every form


@pytest.mark.parametrize("kind", list(NETS))
@pytest.mark.parametrize("form", WINDOW_FORMS)
def test_identity_at_init_and_gradients_reach_every_fusion_weight(form, kind):
    net = _attach(kind, form)
    primary, aux = NETS[kind](6), NETS[kind](6)
    primary.load_state_dict(net.primary.state_dict())
    aux.load_state_dict(net.aux[0].state_dict())
    for training in (True, False):
        net.train(training), primary.train(training), aux.train(training)
        with torch.no_grad():
            out = net(X)
            assert torch.equal(out.primary, primary(X)) and torch.equal(out.aux[0], aux(X))
    net.train()
    opt = torch.optim.SGD(net.weight_parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        out = net(X)
        (out.primary.square().mean() + out.aux[0].square().mean()).backward()
        assert all(f.weight.weight.grad is not None and f.weight.weight.grad.abs().sum() > 0
                   for f in net.fusions.values())
        opt.step()


@pytest.mark.parametrize("form", WINDOW_FORMS)
@pytest.mark.parametrize(("pair", "names"), [
    ("deit_tiny+resnet18", ("timm_deit_tiny", "tv_resnet18")),
    ("vgg11_bn", ("tv_vgg11_bn", "tv_vgg11_bn")),
])
def test_identity_at_init_for_zoo_pairs(form, pair, names):
    from .zoo import make

    primary, x = make(names[0])
    aux, _ = make(names[1])
    net = auxwrap.attach(primary, aux, "nas", example_inputs=(x,), window_form=form)
    net.graph.lint()
    for training in (True, False):
        net.train(training), primary.train(training)
        with torch.no_grad():
            assert torch.equal(net(x).primary, primary(x))


# ---------------------------------------------------------------------------- (c) branches of different lengths


def _dependencies(connections, lengths: dict[str, int]) -> dict[tuple, set[tuple]]:
    """The value graph of a plan: per branch and point, the value before its fusion and its layer output."""
    graph: dict[tuple, set[tuple]] = {}
    for branch, n in lengths.items():
        for i in range(n):
            graph[(branch, i, BEFORE)] = {(branch, i - 1, OUTPUT)} if i else set()
            graph[(branch, i, OUTPUT)] = {(branch, i, BEFORE)}
    for c in connections:
        dest, source = int(c.dest), int(c.source)
        graph[(c.dest_branch, dest, OUTPUT)].add((c.source_branch, source, c.reads))
    return graph


def _taps(n: int) -> list[Tap]:
    return [Tap(str(i), f"n{i}", f"m{i}", (2, 8, 4, 4), NCHW, "block") for i in range(n)]


@pytest.mark.parametrize("form", WINDOW_FORMS)
@pytest.mark.parametrize("kind", list(NETS))
@pytest.mark.parametrize("lengths", [(4, 6), (6, 4)])
def test_branches_of_different_lengths(lengths, kind, form):
    for mode in ("grad", "nas"):
        connections = plan({PRIMARY: _taps(lengths[0]), "aux0": _taps(lengths[1])}, mode, 3, form)
        graphlib.TopologicalSorter(_dependencies(connections, dict(zip((PRIMARY, "aux0"), lengths,
                                                                       strict=True)))).static_order()
    net = _attach(kind, form, n=lengths)
    net.graph.lint()  # acyclic
    primary = NETS[kind](lengths[0])
    primary.load_state_dict(net.primary.state_dict())
    net.eval(), primary.eval()
    with torch.no_grad():
        assert torch.equal(net(X).primary, primary(X))


def test_different_lengths_by_relative_depth():
    # 4 destination points reading 6: depths 1/4, 2/4, 3/4, 1 against 1/6 ... 1
    assert [[j for j, _ in window_of(i, 4, 6, 3, "paper")] for i in range(4)] == [[0], [0, 1], [1, 2, 3], [2, 3, 4]]
    assert [window_of(i, 4, 6, 3, "code") for i in range(4)] == [
        [(0, OUTPUT)], [(0, OUTPUT), (1, OUTPUT), (2, BEFORE)], [(1, OUTPUT), (2, OUTPUT), (3, OUTPUT)],
        [(3, OUTPUT), (4, OUTPUT), (5, BEFORE)]]
    assert [[j for j, _ in window_of(i, 4, 6, 3, "group")] for i in range(4)] == [[0], [0, 1, 2], [3], [3, 4, 5]]


# ---------------------------------------------------------------------------- (d) bad input


@pytest.mark.parametrize("form", ["sliding", "", None, 3, "Paper"])
def test_bad_window_form_is_refused(form):
    with pytest.raises(auxwrap.AuxwrapArgumentError, match=r"window_form.*'paper'.*'code'.*'group'"):
        auxwrap.attach(UnitStack(3), UnitStack(3), "grad", example_inputs=(X,), window_form=form)
    with pytest.raises(auxwrap.AuxwrapArgumentError, match="unknown window_form"):
        plan({PRIMARY: _taps(3), "aux0": _taps(3)}, "nas", 3, form)


def test_paper_form_with_a_one_point_primary_says_why_nothing_connects():
    with pytest.raises(AuxwrapPairingError, match="'paper' reads only strictly shallower points"):
        plan({PRIMARY: _taps(1), "aux0": _taps(4)}, "grad", 3, "paper")
    assert plan({PRIMARY: _taps(1), "aux0": _taps(4)}, "grad", 3, "code")


# ---------------------------------------------------------------------------- (e) the rule, over random plans


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 8), st.integers(1, 8), st.integers(1, 4), st.sampled_from(WINDOW_FORMS),
       st.sampled_from(["grad", "nas"]))
def test_window_rule(n_primary, n_aux, window, form, mode):
    taps = {PRIMARY: _taps(n_primary), "aux0": _taps(n_aux)}
    lengths = {PRIMARY: n_primary, "aux0": n_aux}
    try:
        connections = plan(taps, mode, window, form)
    except AuxwrapPairingError:
        # only where the window reads nothing in any planned direction
        assert not any(window_of(i, n_aux, n_primary, window, form) for i in range(n_aux))
        assert mode == "grad" or not any(window_of(i, n_primary, n_aux, window, form) for i in range(n_primary))
        return
    assert connections == plan(taps, mode, window, form)  # the same plan for the same inputs
    assert {c.direction for c in connections} <= ({TO_AUX} if mode == "grad" else {TO_AUX, "aux->primary"})
    per_dest: dict[tuple[str, int], list[int]] = {}
    for c in connections:
        i, j = int(c.dest), int(c.source)
        n_dest, n_source = lengths[c.dest_branch], lengths[c.source_branch]
        dest_depth, source_depth = (i + 1) * n_source, (j + 1) * n_dest  # relative depths, common denominator
        per_dest.setdefault((c.dest_branch, i), []).append(j)
        if form == "paper":
            assert source_depth < dest_depth and c.reads == OUTPUT
        else:
            assert source_depth <= dest_depth
            assert c.reads == (BEFORE if source_depth == dest_depth else OUTPUT)
        if form == "group":
            assert j // window == group_of(i, n_dest, n_source, window)
            if n_dest == n_source:
                assert j // window == i // window
    for (dest_branch, i), sources in per_dest.items():
        assert len(sources) <= window and sources == sorted(set(sources))
        n_dest, n_source = lengths[dest_branch], lengths[PRIMARY if dest_branch != PRIMARY else "aux0"]
        shallower = [j for j in range(n_source) if (j + 1) * n_dest < (i + 1) * n_source]
        reachable = [j for j in range(n_source) if (j + 1) * n_dest <= (i + 1) * n_source]
        if form == "paper":  # the deepest `window` strictly shallower points
            assert sources == shallower[-window:]
        elif form == "code":  # the deepest `window` points no deeper
            assert sources == reachable[-window:]
        else:  # those of them in the destination's group: from the group's first point to the deepest
            assert sources == list(range(reachable[-1] // window * window, reachable[-1] + 1))
    graphlib.TopologicalSorter(_dependencies(connections, lengths)).static_order()  # acyclic
