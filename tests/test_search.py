"""The gate search of Aux-NAS: alternating steps, L1 schedule, exact cut, data split, drawing, DDP."""

import io
import socket
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

import auxwrap
from auxwrap.plan import TO_AUX, TO_PRIMARY
from auxwrap.plot import plot_gates
from auxwrap.search import GateHistory, Search, cut_error, search_loaders

from .zoo import ResidualNet

SIZE = 8  # 8x8 inputs keep every step in milliseconds


def _fused(n_aux=1, **kwargs):
    """ResidualNet(4) with ``n_aux`` ResidualNet(2) auxiliaries, mode="nas"; every gate opens at 0.5 unless
    ``alpha_init`` says otherwise, so that the search has live auxiliary -> primary links to bring down and cut."""
    kwargs.setdefault("alpha_init", 0.5)
    primary = ResidualNet(4)
    aux = [ResidualNet(2) for _ in range(n_aux)]
    net = auxwrap.attach(primary, aux if n_aux > 1 else aux[0], mode="nas",
                         example_inputs=(torch.randn(2, 3, SIZE, SIZE),), **kwargs)
    return net, primary


def _task_loss(out, y, y_aux):
    return F.cross_entropy(out.primary, y) + F.cross_entropy(out.aux[0], y_aux)


def _synthetic(n=128, seed=0):
    """4 classes of noisy templates; the auxiliary label is the coarse class y // 2."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(4, 3, SIZE, SIZE, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    x = templates[y] + torch.randn(n, 3, SIZE, SIZE, generator=g)
    return TensorDataset(x, y, y // 2)


def _randomise_fusion_weights(net, std=0.1):
    with torch.no_grad():
        for _, fusion in net.fusion_sites():
            fusion.weight.weight.normal_(0.0, std)


def _to_primary(net):
    return [c.gate for c in net.connections() if c.direction == TO_PRIMARY]


def _to_aux(net):
    return [c.gate for c in net.connections() if c.direction == TO_AUX]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors: see conftest.one_thread."""


# ---------------------------------------------------------------------- the recipe end to end

@pytest.fixture(scope="module")
def trained():
    """The alternating recipe with the default schedule on a synthetic task (60 gate steps)."""
    torch.manual_seed(0)
    data = _synthetic()
    net, primary = _fused()
    search_loader, train_loader = search_loaders(data, batch_size=16, seed=0)
    total = 60
    search = Search(net, total_steps=total)
    opt = torch.optim.SGD(net.weight_parameters(), lr=0.05, momentum=0.9)
    probe = data.tensors[0][:32]
    losses, before_ramp, epoch = [], None, 0
    while search.steps_done < total:
        train_loader.sampler.set_epoch(epoch)
        epoch += 1
        for (xa, *ya), (xw, *yw) in zip(search_loader, train_loader, strict=True):
            search.step(_task_loss(net(xa), *ya))
            loss = _task_loss(net(xw), *yw)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if search.steps_done == total // 2:  # the ramp starts here: alpha^P still as learnt
                before_ramp = (cut_error(net, probe), max(_to_primary(net)))
            if search.steps_done == total:
                break
    return dict(net=net, primary=primary, search=search, losses=losses, probe=probe, before_ramp=before_ramp)


def test_recipe_cuts_every_aux_to_primary_gate_exactly(trained):
    net, search = trained["net"], trained["search"]
    gates = _to_primary(net)
    assert len(gates) == search.n_to_primary >= 6
    assert all(g == 0.0 for g in gates), gates
    assert all(f.live.eq(0).all() for _, f in net.fusion_sites(dest_branch="primary"))
    assert search.is_cut and search.max_gate_at_cut is not None
    # the linear decay, not the final zeroing, brought them down: nothing was left to cut
    assert search.max_gate_at_cut == 0.0


def test_recipe_cut_is_lossless(trained):
    net, primary, probe = trained["net"], trained["primary"], trained["probe"]
    error_before, gate_before = trained["before_ramp"]
    assert gate_before > 0.1 and error_before > 1e-4  # the measurement sees a live link
    summary = trained["search"].summary(probe)
    assert summary.cut_error == 0.0
    assert cut_error(net, probe) == 0.0
    net.eval()
    primary.eval()
    with torch.no_grad():  # removing the links: the user's primary alone computes the same output
        assert torch.equal(net(probe).primary, primary(probe))
        deployed = auxwrap.prune(net, probe=probe, tol=0.0)  # prune passes: nothing left to cut
        expected = net(probe).primary
        assert float((deployed(probe) - expected).norm() / expected.norm()) <= 1e-5
    net.train()


def test_recipe_keeps_primary_to_aux_gates_and_trains_weights(trained):
    net, losses, search = trained["net"], trained["losses"], trained["search"]
    to_aux = _to_aux(net)
    assert any(g > 0.05 for g in to_aux), to_aux
    assert all(0.0 <= g <= 1.0 for g in to_aux)
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8, (losses[:8], losses[-8:])
    summary = search.summary()
    assert summary.steps == 60 and summary.cut and summary.max_to_primary == 0.0
    n = search.n_to_primary
    assert f"{n} exactly 0" in str(summary)
    history = search.history.tensor()
    assert history.shape == (61, n + len(to_aux))  # the initial values and one row per step
    assert search.history.cut_step == 48  # default cut: the ramp's end, 80 % of 60


def test_plot_gates_draws_and_saves(trained, tmp_path):
    from matplotlib.figure import Figure

    path = tmp_path / "gates.png"
    fig = plot_gates(trained["search"], path=path)
    assert isinstance(fig, Figure)
    assert path.exists() and path.stat().st_size > 10_000
    curves, links = fig.axes[0], fig.axes[1]
    n = len(trained["search"].history.connections)
    assert len(curves.lines) >= n  # one line per connection
    assert len(links.patches) == n  # one link per connection
    # the cut aux -> primary links, dotted
    assert sum(p.get_linestyle() == ":" for p in links.patches) == trained["search"].n_to_primary
    # with a history cut half-way (before the ramp), every link is drawn in colour, none dotted
    h = trained["search"].history
    half = GateHistory(h.connections, h.points, h.steps[:20], h.values[:20], h.lam[:20])
    fig = plot_gates(half, path=tmp_path / "half.png")
    assert all(p.get_linestyle() == "solid" for p in fig.axes[1].patches)
    with pytest.raises(auxwrap.AuxwrapArgumentError, match="Search"):
        plot_gates(trained["net"])


# ---------------------------------------------------------------------- one gate step

def test_step_changes_only_the_gates():
    net, _ = _fused()
    _randomise_fusion_weights(net)  # zero fusion weights give the gates zero gradients
    search = Search(net, total_steps=10)
    x, y = torch.randn(4, 3, SIZE, SIZE), torch.tensor([0, 1, 2, 3])
    loss = _task_loss(net(x), y, y // 2)
    weights = {n: p.detach().clone() for n, p in net.named_parameters() if not n.endswith(".gate")}
    gates = [g.detach().clone() for g in net.arch_parameters()]
    search.step(loss)
    assert len(weights) == len(net.weight_parameters())
    for name, p in net.named_parameters():
        if name in weights:
            assert torch.equal(p, weights[name]), name
            assert p.grad is None, name
    assert all(g.grad is None for g in net.arch_parameters())
    changed = [not torch.equal(g, old) for g, old in zip(net.arch_parameters(), gates, strict=True)]
    assert all(changed)
    assert search.steps_done == 1


def test_clamp_gates_are_projected_back_into_range_after_a_step():
    net, _ = _fused(gate="clamp")
    search = Search(net, total_steps=10)
    with torch.no_grad():
        net.arch_parameters()[0].fill_(3.0)
        net.arch_parameters()[1].fill_(-2.0)
    search.after_step()
    assert all(((g >= 0) & (g <= 1)).all() for g in net.arch_parameters())


# ---------------------------------------------------------------------- gates keep a gradient everywhere

@pytest.mark.parametrize("gate", ["sigmoid", "clamp"])
@pytest.mark.parametrize("alpha_init", [0.0, 1.0])
def test_a_gate_at_its_bound_still_receives_gradient_and_trains(gate, alpha_init):
    """DESIGN §2 (1): a clamp in the forward pass gave gates at 0 or 1 a zero gradient for good."""
    torch.manual_seed(0)
    net, _ = _fused(gate=gate, alpha_init=alpha_init)
    _randomise_fusion_weights(net)
    x, y = torch.randn(8, 3, SIZE, SIZE), torch.randint(0, 4, (8,))
    _task_loss(net(x), y, y // 2).backward()
    grads = torch.cat([g.grad for g in net.arch_parameters()])
    assert bool((grads != 0).all())
    search = Search(net, total_steps=100, l1=0.0)
    before = torch.cat([g.detach().clone() for g in net.arch_parameters()])
    search.step(_task_loss(net(x), y, y // 2))
    after = torch.cat([g.detach() for g in net.arch_parameters()])
    inward = grads < 0 if alpha_init == 0.0 else grads > 0  # the task asks these to leave the bound
    if gate == "sigmoid":
        inward = torch.ones_like(inward)  # a sigmoid gate never sits on a bound: all move
    assert bool(inward.any())
    assert bool((after != before)[inward].all())


def test_fusion_weights_train_from_closed_gates():
    """alpha_init=0 with zero-initialised W was a saddle: neither gates nor W ever moved."""
    torch.manual_seed(0)
    net, _ = _fused(alpha_init=0.0)
    search = Search(net, total_steps=100, l1=0.0)
    opt = torch.optim.Adam(net.weight_parameters(), lr=1e-2)
    x, y = torch.randn(8, 3, SIZE, SIZE), torch.randint(0, 4, (8,))
    for _ in range(20):
        search.step(_task_loss(net(x), y, y // 2))
        opt.zero_grad()
        _task_loss(net(x), y, y // 2).backward()
        opt.step()
    assert all(bool(f.weight.weight.any()) for _, f in net.fusion_sites())
    assert all(g > 1e-6 for g in _to_primary(net))


# ---------------------------------------------------------------------- schedule, prox, normalisation

def test_schedule_ramps_from_start_to_end():
    net, _ = _fused()
    search = Search(net, total_steps=100)
    assert search.lam(0) == 0.0
    assert search.lam(49) == 0.0 and search.lam(50) == 0.0
    assert search.lam(65) == pytest.approx(50.0)
    assert search.lam(80) == 100.0 and search.lam(99) == 100.0
    custom = Search(net, total_steps=10, l1=50.0, ramp=(0.0, 0.5))
    assert [custom.lam(t) for t in (0, 1, 5, 9)] == pytest.approx([0.0, 10.0, 50.0, 50.0])
    assert search.cut_step == 80 and Search(net, total_steps=10, cut=1.0).cut_step == 10


def test_l1_moves_only_aux_to_primary_gates_by_about_lr_per_step():
    net, _ = _fused()  # fusion weights at zero: the task gradient of every gate is exactly 0
    search = Search(net, total_steps=100, lr=0.01, l1=90.0, ramp=(0.0, 0.0), cut=1.0, decay="l1")
    x, y = torch.randn(4, 3, SIZE, SIZE), torch.tensor([0, 1, 2, 3])
    thetas = [p.detach().clone() for p in net.arch_parameters()]
    assert search.lam(0) == 90.0
    search.step(_task_loss(net(x), y, y // 2))
    for (site, fusion), theta in zip(net.fusion_sites(), thetas, strict=True):
        moved = fusion.gate.detach() - theta
        if site.dest_branch == "primary":  # Adam's first step with a gradient: lr, whatever lambda is
            assert moved == pytest.approx(torch.full_like(moved, -0.01), rel=1e-3)
        else:
            assert bool((moved == 0).all())
    assert all(0.0 < g < 0.5 for g in _to_primary(net))  # down, gradually, never a step to 0
    assert _to_aux(net) == pytest.approx([0.5] * len(_to_aux(net)))


def test_penalty_pulls_each_gate_alike_whatever_the_number_of_gates():
    one, _ = _fused(n_aux=1)
    two, _ = _fused(n_aux=2)
    s1, s2 = (Search(n, total_steps=10, ramp=(0.0, 0.0), decay="l1") for n in (one, two))
    assert s2.n_to_primary == 2 * s1.n_to_primary
    for net in (one, two):
        for _, f in net.fusion_sites(dest_branch="primary"):
            f.set_gates(0.3)
    assert s1.penalty().item() == pytest.approx(100.0 * 0.3 * s1.n_to_primary, rel=1e-5)
    grads = []
    for search, net in ((s1, one), (s2, two)):
        search.penalty().backward()
        grads.append(torch.cat([f.gate.grad for _, f in net.fusion_sites(dest_branch="primary")]))
    assert grads[0] == pytest.approx(torch.full_like(grads[0], 100.0 * 0.3 * 0.7), rel=1e-4)  # lambda * slope
    assert grads[1] == pytest.approx(torch.full_like(grads[1], 100.0 * 0.3 * 0.7), rel=1e-4)


def _deep_pair(blocks: int):
    """Two plain residual stacks of ``blocks`` blocks (4 channels), window 1: about ``blocks`` aux -> primary gates."""
    from .zoo import ResidualBlock

    def stack():
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), *(ResidualBlock(4) for _ in range(blocks)),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    torch.manual_seed(blocks)
    net = auxwrap.attach(stack(), stack(), mode="nas", window=1, example_inputs=(torch.randn(2, 3, 4, 4),))
    _randomise_fusion_weights(net, std=0.3)
    return net


def _trajectory(blocks: int, decay: str, total: int = 100, ramp=(0.2, 0.8)) -> tuple[int, list[float]]:
    """Mean alpha^P after each gate step, on a task that pulls every gate up (targets from gates at 1)."""
    net = _deep_pair(blocks)
    x = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _, f in net.fusion_sites():
            f.set_gates(1.0)
        target = net(x).primary
        for _, f in net.fusion_sites():
            f.set_gates(0.5)
    search = Search(net, total_steps=total, ramp=ramp, decay=decay)
    means = []
    for _ in range(total):
        search.step(F.mse_loss(net(x).primary, target))
        means.append(sum(_to_primary(net)) / search.n_to_primary)
    return search.n_to_primary, means


def _ramp_shape(blocks: int, decay: str, total: int = 50, ramp=(0.2, 0.8)) -> tuple[int, list[float]]:
    """Check the decline of the mean alpha^P along the ramp; its values relative to the ramp's start."""
    start, end = round(ramp[0] * total), round(ramp[1] * total)
    n, means = _trajectory(blocks, decay, total, ramp)
    assert n in (blocks - 1, blocks)
    at = {q: means[start + int(q * (end - start)) - 1] for q in (0.0, 0.25, 0.5)}
    assert at[0.0] >= 0.45, (n, at)                  # the task kept them up before the ramp
    assert at[0.25] >= 0.4 * at[0.0], (n, at)        # no collapse early in the ramp
    assert at[0.5] < at[0.25] < at[0.0], (n, at)     # a steady decline along it
    if decay == "linear":
        assert means[end - 1] == 0.0 and means[-1] == 0.0  # exactly 0 at the ramp's end, then cut
    return n, [m / at[0.0] for m in means[start:]]


@pytest.mark.parametrize("blocks", [25, pytest.param(151, marks=pytest.mark.slow)])
def test_aux_to_primary_gates_decline_along_the_ramp_for_any_number_of_gates(blocks):
    """DESIGN §2 (2), the default decay: alpha^P follow the ramp, the same for 4, 24 or 150 gates (a proximal
    shrink lr * lambda / n had every gate at 0 at 6 % of the ramp for n = 4 and never for n = 600)."""
    _, reference = _ramp_shape(5, "linear")
    _, shape = _ramp_shape(blocks, "linear")
    assert max(abs(a - b) for a, b in zip(reference, shape, strict=True)) < 0.15


def test_l1_decay_alone_is_gradual_but_not_bounded_by_the_ramp():
    """decay="l1" (the authors' form): no collapse, a gradual decline (Adam moves a gate ~lr per step), but
    nothing makes alpha^P reach 0 by the ramp's end: the cut then warns with their size."""
    with pytest.warns(UserWarning, match="as large as"):
        for blocks in (5, 25):
            _ramp_shape(blocks, "l1")


def test_cut_zeroes_holds_and_reports_large_gates():
    net, _ = _fused()
    search = Search(net, total_steps=2, l1=0.0, cut=0.5)
    x, y = torch.randn(4, 3, SIZE, SIZE), torch.tensor([0, 1, 2, 3])
    with pytest.warns(UserWarning, match="as large as 0.5"):
        search.step(_task_loss(net(x), y, y // 2))
    assert search.max_gate_at_cut == 0.5 and search.history.cut_step == 1
    assert all(g == 0.0 for g in _to_primary(net))
    _randomise_fusion_weights(net)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        search.step(_task_loss(net(x), y, y // 2))
        assert search.finish() == 0.5  # idempotent: the first cut's value
    assert all(g == 0.0 for g in _to_primary(net))  # held at 0 although Adam pulled on them


def test_joint_variant_in_one_optimiser():
    torch.manual_seed(0)
    net, _ = _fused()
    search = Search(net, total_steps=6)
    opt = torch.optim.Adam([{"params": net.weight_parameters()}, search.param_group()], lr=1e-3)
    x, y = torch.randn(8, 3, SIZE, SIZE), torch.randint(0, 4, (8,))
    for _ in range(6):
        loss = _task_loss(net(x), y, y // 2) + search.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        search.after_step()
    assert search.is_cut and all(g == 0.0 for g in _to_primary(net))
    assert opt.param_groups[1]["weight_decay"] == 0.0 and opt.param_groups[1]["lr"] == search.lr


def test_state_dict_resumes():
    net, _ = _fused()
    search = Search(net, total_steps=10)
    x, y = torch.randn(4, 3, SIZE, SIZE), torch.tensor([0, 1, 2, 3])
    search.step(_task_loss(net(x), y, y // 2))
    buffer = io.BytesIO()
    torch.save(search.state_dict(), buffer)
    buffer.seek(0)
    resumed = Search(net, total_steps=10)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.steps_done == 1 and resumed.history.values == search.history.values
    assert resumed.history.connections == search.history.connections
    assert resumed.optimizer.state_dict()["state"][0]["step"] == 1
    other = Search(_fused(n_aux=2)[0], total_steps=10)
    with pytest.raises(auxwrap.AuxwrapArgumentError, match="other gates"):
        other.load_state_dict(search.state_dict())
    assert other.steps_done == 0 and other.optimizer.state_dict()["state"] == {}


RESUME_TOTAL = 12  # 3 epochs of 4 steps; the ramp runs over steps 6-9.6, the cut after step 10


def _resume_setup(seed):
    """A fresh network (initialised from ``seed``), its weight optimiser, a Search and the two loaders."""
    torch.manual_seed(seed)
    net, _ = _fused()
    opt = torch.optim.SGD(net.weight_parameters(), lr=0.05, momentum=0.9)
    loaders = search_loaders(_synthetic(64), batch_size=8, seed=0)
    return net, opt, loaders


def _resume_train(net, opt, search, loaders, epochs):
    search_loader, train_loader = loaders
    for epoch in epochs:
        train_loader.sampler.set_epoch(epoch)
        for (xa, *ya), (xw, *yw) in zip(search_loader, train_loader, strict=True):
            search.step(_task_loss(net(xa), *ya))
            loss = _task_loss(net(xw), *yw)
            opt.zero_grad()
            loss.backward()
            opt.step()


@pytest.mark.parametrize("search_after_net", [False, True])
def test_resumed_search_matches_an_uninterrupted_one_bit_for_bit(search_after_net):
    """Saved mid-ramp (gate ceiling below 1, L1 on) at an epoch boundary, reloaded into fresh objects with
    torch.load(weights_only=True): the same gates, weights, buffers and history as without the break;
    ``search_after_net``: the Search is built after the network's state is loaded (it used to reset the
    ceiling to 1)."""
    net, opt, loaders = _resume_setup(0)
    search = Search(net, total_steps=RESUME_TOTAL)
    _resume_train(net, opt, search, loaders, range(3))
    assert search.is_cut and 0.0 < search.ceiling(8) < 1.0 and search.lam(8) > 0

    net1, opt1, loaders1 = _resume_setup(0)
    search1 = Search(net1, total_steps=RESUME_TOTAL)
    _resume_train(net1, opt1, search1, loaders1, range(2))
    buffer = io.BytesIO()
    torch.save({"net": net1.state_dict(), "opt": opt1.state_dict(), "search": search1.state_dict(),
                "loaders": [loader.sampler.state_dict() for loader in loaders1]}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    net2, opt2, loaders2 = _resume_setup(1)  # other initial weights: everything must come from the state
    if search_after_net:
        net2.load_state_dict(state["net"])
        search2 = Search(net2, total_steps=RESUME_TOTAL)
    else:
        search2 = Search(net2, total_steps=RESUME_TOTAL)
        net2.load_state_dict(state["net"])
    opt2.load_state_dict(state["opt"])
    search2.load_state_dict(state["search"])
    for loader, loader_state in zip(loaders2, state["loaders"], strict=True):
        loader.sampler.load_state_dict(loader_state)
    _resume_train(net2, opt2, search2, loaders2, range(2, 3))

    expected, got = net.state_dict(), net2.state_dict()
    assert expected.keys() == got.keys()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    assert search2.steps_done == search.steps_done and search2.max_gate_at_cut == search.max_gate_at_cut
    assert search2.history == search.history
    assert search2.summary().connections == search.summary().connections


def test_bad_arguments_name_the_fix():
    grad_net = auxwrap.attach(ResidualNet(4), ResidualNet(2), mode="grad",
                              example_inputs=(torch.randn(2, 3, SIZE, SIZE),))
    with pytest.raises(auxwrap.AuxwrapArgumentError, match="mode='nas'"):
        Search(grad_net, total_steps=10)
    net, _ = _fused()
    for kwargs, match in [(dict(total_steps=0), "total_steps"), (dict(total_steps=1.5), "total_steps"),
                          (dict(total_steps=10, lr=0), "lr"), (dict(total_steps=10, l1=-1), "l1"),
                          (dict(total_steps=10, ramp=(0.8, 0.5)), "start <= end"),
                          (dict(total_steps=10, ramp=(0.5, 1.5)), "ramp"),
                          (dict(total_steps=10, cut=2), "cut"), (dict(total_steps=10, decay="cosine"), "linear")]:
        with pytest.raises(auxwrap.AuxwrapArgumentError, match=match):
            Search(net, **kwargs)
    with pytest.raises(auxwrap.AuxwrapArgumentError, match="FusedNet"):
        Search(ResidualNet(), total_steps=10)
    search = Search(net, total_steps=10)
    out = net(torch.randn(2, 3, SIZE, SIZE))
    with pytest.raises(auxwrap.AuxwrapArgumentError, match="scalar"):
        search.step(out.primary)
    with pytest.raises(auxwrap.AuxwrapArgumentError, match="no_grad"):
        search.step(out.primary.sum().detach())


# ---------------------------------------------------------------------- the data split

def test_split_halves_are_disjoint_cover_and_reshuffle():
    data = TensorDataset(torch.arange(11))
    search_loader, train_loader = search_loaders(data, batch_size=4, seed=0)
    partitions, orders = [], []
    for epoch in range(2):
        train_loader.sampler.set_epoch(epoch)  # a new partition for both halves
        for _ in range(2):
            a = torch.cat([b[0] for b in search_loader]).tolist()
            b = torch.cat([b[0] for b in train_loader]).tolist()
            assert not set(a) & set(b)
            assert sorted(a + b) == list(range(11))
            assert (len(a), len(b)) == (5, 6) == (len(search_loader.sampler), len(train_loader.sampler))
            orders.append(a)
        partitions.append(sorted(a))
    assert partitions[0] != partitions[1]
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1])  # each pass reshuffles its half
    search_loader.sampler.set_epoch(3)  # the same epoch, the same partition
    first = (sorted(search_loader.sampler), sorted(train_loader.sampler))
    assert first == (sorted(search_loader.sampler), sorted(train_loader.sampler))


def test_split_halves_stay_disjoint_without_set_epoch_however_iterated():
    """An extra iter() on one loader made 4 of 10 samples overlap when each sampler counted its own passes."""
    data = TensorDataset(torch.arange(10))
    search_loader, train_loader = search_loaders(data, batch_size=2, seed=0)
    iter(search_loader)  # a peek, e.g. to look at one batch
    a = list(search_loader.sampler)
    b = list(train_loader.sampler)
    assert not set(a) & set(b) and sorted(a + b) == list(range(10))


@given(st.lists(st.sampled_from([0, 1]), min_size=1, max_size=12), st.integers(2, 40), st.integers(0, 5))
@settings(max_examples=60, deadline=None)
def test_split_halves_are_disjoint_for_any_order_of_passes(order, n, seed):
    halves = [loader.sampler for loader in search_loaders(TensorDataset(torch.arange(n)), 1, seed=seed)]
    latest: list[list[int]] = [list(halves[0]), list(halves[1])]
    for which in order:
        latest[which] = list(halves[which])
        assert not set(latest[0]) & set(latest[1])
        assert sorted(latest[0] + latest[1]) == list(range(n))


def test_split_shards_ranks():
    data = TensorDataset(torch.arange(20))
    ranks = [search_loaders(data, 2, seed=1, num_replicas=2, rank=r) for r in range(2)]
    for half in range(2):
        r0, r1 = (list(ranks[r][half].sampler) for r in range(2))
        assert len(r0) == len(r1) == 5 and not set(r0) & set(r1)
    everything = [i for r in range(2) for half in range(2) for i in ranks[r][half].sampler.indices(0)]
    assert sorted(everything) == list(range(20))
    with pytest.raises(auxwrap.AuxwrapArgumentError, match="shuffle"):
        search_loaders(data, 2, shuffle=True)
    with pytest.raises(auxwrap.AuxwrapArgumentError, match="rank"):
        search_loaders(data, 2, num_replicas=2, rank=2)


# ---------------------------------------------------------------------- DistributedDataParallel

def _ddp_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same initial model on every rank (DDP would broadcast rank 0's anyway)
        net, _ = _fused()
        _randomise_fusion_weights(net, std=0.05)
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        search = Search(ddp, total_steps=6)
        opt = torch.optim.SGD(net.weight_parameters(), lr=0.1)
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data: unsynchronised gates would differ
        for step in range(6):
            x, y = torch.randn(8, 3, SIZE, SIZE, generator=g), torch.randint(0, 4, (8,), generator=g)
            model = ddp if step % 2 else net  # the search forward through the wrapper or the plain net
            search.step(_task_loss(model(x), y, y // 2))
            loss = _task_loss(ddp(x), y, y // 2)
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save({"gates": [p.detach() for p in net.arch_parameters()],
                    "weights": [p.detach() for p in net.weight_parameters()]}, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_keeps_gates_and_weights_identical_on_all_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    fork = "fork" in mp.get_all_start_methods()  # seconds instead of ~30 s of imports in fresh interpreters
    mp.start_processes(_ddp_worker, args=(2, port, tmp_path), nprocs=2, join=True,
                       start_method="fork" if fork else "spawn")
    elapsed = time.perf_counter() - start
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert all(torch.equal(a, b) for a, b in zip(r0["gates"], r1["gates"], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(r0["weights"], r1["weights"], strict=True))
    assert any(not torch.equal(g, torch.full_like(g, 0.5)) for g in r0["gates"])  # the gates did move
    assert elapsed < 60, f"DDP test took {elapsed:.0f} s"
