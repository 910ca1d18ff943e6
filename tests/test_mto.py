import contextlib
import copy
import datetime
import gc
import io
import itertools
import math
import time
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import auxwrap
from auxwrap import mto
from auxwrap.errors import AuxwrapArgumentError

from .zoo import ResidualNet


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors: see conftest.one_thread."""


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- pure functions


def test_pcgrad_projects_conflicting_gradients():
    # g1 . g2 = -1: g1 -> g1 + g2 / 2 = (0.5, 0.5); g2 -> g2 + g1 = (0, 1)
    assert torch.allclose(mto.pcgrad(t([1, 0], [-1, 1])), t(0.5, 1.5))


def test_pcgrad_leaves_agreeing_gradients_alone():
    grads = t([1, 0], [1, 1], [0, 2])
    assert torch.allclose(mto.pcgrad(grads), grads.sum(0))


def _pcgrad_reference(grads, orders):
    """The paper's Algorithm 1 with a given order of the other tasks for each task."""
    out = []
    for i, order in enumerate(orders):
        g = grads[i].clone()
        for j in order:
            dot = g @ grads[j]
            if dot < 0:
                g = g - dot / (grads[j] @ grads[j]) * grads[j]
        out.append(g)
    return torch.stack(out).sum(0)


def test_pcgrad_projects_against_original_gradients_in_some_order():
    grads = t([1, 0, 0], [-1, 1, 0], [-0.5, -2, 1])
    candidates = [_pcgrad_reference(grads, orders) for orders in itertools.product(
        *[list(itertools.permutations([j for j in range(3) if j != i])) for i in range(3)])]
    first = mto.pcgrad(grads, generator=torch.Generator().manual_seed(3))
    again = mto.pcgrad(grads, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert any(torch.allclose(first, c) for c in candidates)
    # projecting against the already projected g_j (not the paper) would give other sums
    assert len({tuple(c.round(decimals=6).tolist()) for c in candidates}) > 1


def test_pcgrad_aux_never_changes_the_primary_gradient():
    # the auxiliary conflicts: projected onto the normal plane of the primary, (-1, 1) -> (0, 1)
    assert torch.allclose(mto.pcgrad_aux(t([1, 0], [-1, 1])), t(1, 1))
    # symmetric PCGrad would also bend the primary gradient
    assert not torch.allclose(mto.pcgrad(t([1, 0], [-1, 1])), t(1, 1))
    # an agreeing auxiliary is kept as is; each auxiliary is judged against the primary only
    assert torch.allclose(mto.pcgrad_aux(t([1, 0], [1, 1], [-2, 3])), t(1, 0) + t(1, 1) + t(0, 3))


def test_gcs_gated_keeps_only_auxiliaries_pointing_the_primary_way():
    grads = t([1, 0], [-1, 1], [1, 1])  # cosines -0.71 and +0.71
    assert torch.allclose(mto.gcs(grads), t(2, 1))
    assert torch.allclose(mto.gcs(t([1, 0], [0, 1])), t(1, 0))  # orthogonal: cos 0 is not > 0


def test_gcs_weighted_scales_by_the_cosine():
    grads = t([1, 0], [-1, 1], [1, 1])
    c = 1 / math.sqrt(2)
    assert torch.allclose(mto.gcs(grads, weighted=True), t(1 + c, c))
    assert torch.allclose(mto.gcs(t([2, 0], [3, 0]), weighted=True), t(5, 0))  # cos 1: the plain sum


def test_cagrad_with_c_zero_is_the_mean_gradient():
    grads = t([1, 0], [-1.5, 0.5], [0.2, 3])
    assert torch.allclose(mto.cagrad(grads, c=0.0), grads.mean(0))


def test_cagrad_improves_the_worst_task_within_its_ball():
    # the theory: d maximises min_i g_i . d over |d - g0| <= c |g0|, and g0 is in that ball, so the worst
    # task does at least as well as under g0 (a non-negative inner product with every task is not promised)
    grads = t([1, 0], [-1.5, 0.5])
    g0, c = grads.mean(0), 0.4
    d = mto.cagrad(grads, c, rescale=0)
    assert (grads @ g0).min() < 0  # task 1 gets worse under the mean gradient
    assert (grads @ d).min() > (grads @ g0).min() + 0.1
    assert (d - g0).norm() <= c * g0.norm() + 1e-9
    assert torch.allclose(mto.cagrad(grads, c), d / (1 + c**2))  # the official code's default rescale
    assert torch.allclose(mto.cagrad(grads, c, rescale=2), d / (1 + c))


@pytest.mark.parametrize("k", [2, 3])
def test_cagrad_weights_minimise_the_dual_objective(k):
    grads = torch.randn(k, 20, dtype=torch.float64)
    grads[1] = -0.8 * grads[0] + 0.2 * grads[1]
    gram, c = grads @ grads.T, 0.4
    b, c0 = gram.mean(1), c * gram.mean().sqrt()

    def objective(w):
        return w @ b + c0 * ((w @ gram) * w).sum(-1).clamp_min(0).sqrt()

    w = mto.cagrad_weights(gram, c)
    assert w.min() >= 0 and torch.isclose(w.sum(), torch.tensor(1.0, dtype=torch.float64))
    steps = torch.linspace(0, 1, 401, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(*[steps] * (k - 1), indexing="ij"), -1).reshape(-1, k - 1)
    grid = torch.cat([grid, 1 - grid.sum(1, keepdim=True)], 1)
    grid = grid[grid[:, -1] >= 0]
    assert objective(w) <= objective(grid).min() + 1e-9


def test_dwa_weights_favour_the_slower_task():
    weights = mto.dwa_weights(t(0.5, 0.9), temperature=2.0)
    e = torch.exp(t(0.25, 0.45))
    assert torch.allclose(weights, 2 * e / e.sum())
    assert weights[1] > 1 > weights[0]


# ---------------------------------------------------------------------------------------------- balancers


class Scalars(nn.Module):
    """Losses with chosen values: loss_i = p_i * value_i with p = 1."""

    def __init__(self, k=2):
        super().__init__()
        self.p = nn.Parameter(torch.ones(k))

    def losses(self, *values):
        return [self.p[i] * v for i, v in enumerate(values)]


def test_uncertainty_weights_are_exp_minus_s_and_s_is_learned():
    model, balancer = Scalars(), mto.Balancer("uncertainty", 2)
    assert [p.shape for p in balancer.parameters()] == [torch.Size([2])]
    assert list(mto.Balancer("dwa", 2).parameters()) == []
    with torch.no_grad():
        balancer.log_vars.copy_(torch.tensor([0.5, -1.0]))
    assert torch.allclose(balancer.weights, torch.exp(-torch.tensor([0.5, -1.0])))
    combined = balancer.backward(model.losses(2.0, 3.0), model)
    s = torch.tensor([0.5, -1.0])
    assert torch.isclose(combined, (torch.exp(-s) * torch.tensor([2.0, 3.0]) + s).sum())
    assert torch.allclose(model.p.grad, torch.exp(-s) * torch.tensor([2.0, 3.0]))
    assert torch.allclose(balancer.log_vars.grad, 1 - torch.exp(-s) * torch.tensor([2.0, 3.0]))


def test_dwa_is_equal_for_two_windows_then_follows_the_loss_ratios():
    model, balancer = Scalars(), mto.Balancer("dwa", 2, window=2)
    for values in [(1.0, 1.0), (1.0, 1.0), (0.6, 0.9), (0.4, 0.9)]:
        assert torch.equal(balancer.weights, torch.ones(2))
        balancer.backward(model.losses(*values), model)
    expected = mto.dwa_weights(t(0.5, 0.9))  # window means (0.5, 0.9) over (1, 1)
    assert torch.allclose(balancer.weights, expected.float())
    model.p.grad = None
    combined = balancer.backward(model.losses(0.3, 0.8), model)
    assert torch.allclose(model.p.grad, expected.float() * torch.tensor([0.3, 0.8]))
    assert torch.isclose(combined, (expected.float() * torch.tensor([0.3, 0.8])).sum())


def test_module_level_backward_keeps_one_balancer_per_net_and_method():
    model = Scalars()
    for values in [(1.0, 1.0), (2.0, 1.0)]:
        mto.backward(model.losses(*values), model, "dwa", window=1)
    balancer = mto.balancer_for(model, "dwa", 2)
    assert balancer is mto.balancer_for(model, "dwa", 2, window=1)
    assert torch.allclose(balancer.weights, mto.dwa_weights(t(2.0, 1.0)).float())  # the history was kept
    assert mto.balancer_for(model, "uncertainty", 2) is not balancer
    with pytest.raises(AuxwrapArgumentError, match="window=1"):
        mto.backward(model.losses(1.0, 1.0), model, "dwa", window=5)
    with pytest.raises(AuxwrapArgumentError, match="for 2 losses, got 3"):
        mto.balancer_for(model, "dwa", 3)
    ref = weakref.ref(model)
    del model, balancer
    gc.collect()
    assert ref() is None  # the registry does not keep the network alive


def _three_losses(model, x):
    """Three conflicting losses on TwoHeads: PCGrad's projection order matters."""
    l1, l2 = model.losses(x, conflict=1.5)
    return [l1, l2, (model.head2(model.trunk(x)) + 1).pow(2).mean() - 0.5 * l2]


RESUME_OPTIONS = {"dwa": {"window": 2}, "pcgrad": {"seed": 0}}


def _resume_run(method, model, balancer, optimizer, batches):
    for x in batches:
        optimizer.zero_grad(set_to_none=True)
        balancer.backward(_three_losses(model, x), model)
        optimizer.step()


@pytest.mark.parametrize("method", mto.METHODS)
def test_balancer_state_dict_resumes_a_run_exactly(method):
    """Saved after 3 of 6 steps (mid-window for DWA), loaded into fresh objects: the same weights, weights of
    the tasks and balancer state as without the break. The DWA history and PCGrad's random order were lost."""
    batches = [torch.randn(8, 4, generator=torch.Generator().manual_seed(i)) for i in range(6)]

    def setup(seed):
        torch.manual_seed(seed)
        model, balancer = TwoHeads(), mto.Balancer(method, 3, **RESUME_OPTIONS.get(method, {}))
        return model, balancer, torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=0.1, momentum=0.9)

    model, balancer, optimizer = setup(0)
    _resume_run(method, model, balancer, optimizer, batches)
    model1, balancer1, optimizer1 = setup(0)
    _resume_run(method, model1, balancer1, optimizer1, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": model1.state_dict(), "balancer": balancer1.state_dict(), "opt": optimizer1.state_dict()},
               buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    model2, balancer2, optimizer2 = setup(1)
    model2.load_state_dict(state["model"])
    balancer2.load_state_dict(state["balancer"])
    optimizer2.load_state_dict(state["opt"])
    _resume_run(method, model2, balancer2, optimizer2, batches[3:])
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, p2), name
    assert torch.equal(balancer.weights, balancer2.weights)
    if method == "dwa":
        assert not torch.equal(balancer.weights, torch.ones(3))  # two full windows: the history is in use
    assert _same(balancer.state_dict(), balancer2.state_dict())


def _same(a, b):
    """Equal nested states: tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def test_balancer_state_of_another_method_or_task_count_is_refused():
    dwa = mto.Balancer("dwa", 2)
    for other in (mto.Balancer("dwa", 3), mto.Balancer("equal", 2)):
        with pytest.raises(AuxwrapArgumentError, match=r"Balancer\('dwa', 2\)"):
            other.load_state_dict(dwa.state_dict())


# ---------------------------------------------------------------------------------------------- the machinery


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.unused = nn.Linear(2, 2)  # in the trunk's place in `shared` below, reached by no loss
        self.head1, self.head2 = nn.Linear(8, 1), nn.Linear(8, 1)

    def losses(self, x, conflict=0.0):
        z = self.trunk(x)
        l1 = self.head1(z).pow(2).mean()
        l2 = (self.head2(z) - 1).pow(2).mean()
        return [l1, l2 - conflict * l1]  # conflict > 0: the second loss pushes against the first


def _grads(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _plain_sum_grads(model, losses):
    model.zero_grad(set_to_none=True)
    sum(losses).backward()
    return _grads(model)


@pytest.mark.parametrize(("method", "options", "agree"),
                         [("equal", {}, False), ("cagrad", {"c": 0.0}, False), ("pcgrad-aux", {}, True)])
def test_backward_matches_the_plain_sum_where_nothing_is_changed(method, options, agree):
    model, x = TwoHeads(), torch.randn(16, 4)

    def losses():
        l1, l2 = model.losses(x)
        return [l1, 2 * l1] if agree else [l1, l2]  # agree: no conflict for PCGrad-Aux to remove

    expected = _plain_sum_grads(model, losses())
    model.zero_grad(set_to_none=True)
    batch = losses()
    shared = [*model.trunk.parameters(), *model.unused.parameters()]
    combined = mto.backward(batch, model, method, shared=shared, **options)
    got = _grads(model)
    assert got.keys() == expected.keys()
    for name in got:
        if expected[name] is None:
            assert got[name] is None, name  # like autograd: a parameter no loss reaches keeps .grad None
        else:
            assert torch.allclose(got[name], expected[name], atol=1e-6), name
    assert torch.isclose(combined, sum(batch).detach())
    assert not combined.requires_grad


def test_backward_adds_into_existing_grads():
    model, x = TwoHeads(), torch.randn(16, 4)
    mto.backward(model.losses(x, conflict=3.0), model, "gcs")
    once = _grads(model)
    mto.backward(model.losses(x, conflict=3.0), model, "gcs")
    for name, p in model.named_parameters():
        if once[name] is not None:
            assert torch.allclose(p.grad, 2 * once[name], atol=1e-6), name


def test_shared_parameters_get_the_method_and_the_rest_the_plain_sum():
    model, x = TwoHeads(), torch.randn(16, 4)
    losses = model.losses(x, conflict=3.0)
    shared = mto.shared_parameters(losses, model)
    # reached by both losses: the trunk, and head1 through the conflict term; not head2, not `unused`
    assert [id(p) for p in shared] == [id(p) for p in [*model.trunk.parameters(), *model.head1.parameters()]]
    grads = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)])
                         for loss in losses])
    assert F.cosine_similarity(grads[0], grads[1], dim=0) < 0  # the tasks conflict
    plain = _plain_sum_grads(model, model.losses(x, conflict=3.0))
    model.zero_grad(set_to_none=True)
    mto.backward(losses, model, "gcs")  # default shared
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    assert torch.allclose(got, mto.gcs(grads), atol=1e-6)
    assert torch.allclose(got, grads[0], atol=1e-6)  # gated: the conflicting gradient is dropped
    assert not torch.allclose(got, grads.sum(0), atol=1e-4)
    for p, name in [(model.head2.weight, "head2.weight"), (model.head2.bias, "head2.bias")]:
        assert torch.allclose(p.grad, plain[name], atol=1e-6), name
    assert model.unused.weight.grad is None


# ---------------------------------------------------------------------------------------------- on a fused network


@pytest.fixture(scope="module")
def fused():
    torch.manual_seed(0)
    return auxwrap.attach(ResidualNet(), ResidualNet(), "nas", example_inputs=(torch.randn(4, 3, 16, 16),))


def _expected_primary_grad(method, grads, weights):
    if method in mto.WEIGHTING_METHODS:
        return weights.to(grads) @ grads
    if method == "pcgrad":
        return mto.pcgrad(grads)  # two tasks: the order does not matter
    if method == "pcgrad-aux":
        return mto.pcgrad_aux(grads)
    if method in ("gcs", "gcs-weighted"):
        return mto.gcs(grads, weighted=method == "gcs-weighted")
    return 2 * mto.cagrad(grads)


@pytest.mark.parametrize("method", mto.METHODS)
def test_three_optimizer_steps_on_a_fused_network(fused, method):
    net = copy.deepcopy(fused)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    options = {"window": 1} if method == "dwa" else {}
    balancer = mto.balancer_for(net, method, 2, **options)
    optimizer = torch.optim.SGD([*net.parameters(), *balancer.parameters()], lr=0.1)
    primary = [p for p in net.primary.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in primary]
    for _ in range(3):
        out = net(x)
        losses = [F.cross_entropy(out.primary, y), F.cross_entropy(out.aux[0], y)]
        grads = torch.stack([torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(
            primary, torch.autograd.grad(loss, primary, retain_graph=True, allow_unused=True), strict=True)])
            for loss in losses])
        expected = _expected_primary_grad(method, grads, balancer.weights)
        optimizer.zero_grad(set_to_none=True)
        combined = mto.backward(losses, net, method, **options)
        assert torch.isfinite(combined)
        got = torch.cat([p.grad.reshape(-1) for p in primary])
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)
        optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, primary, strict=True))
    if method == "uncertainty":
        assert not torch.equal(balancer.log_vars.detach(), torch.zeros(2))
    if method == "dwa":
        assert not torch.equal(balancer.weights, torch.ones(2))
    # after two steps the zero-initialised fusion weights are not zero: the auxiliary loss reaches the primary
    assert grads[1].abs().max() > 0


@pytest.mark.parametrize("method", ["pcgrad-aux", "gcs"])
def test_fused_primary_is_protected_from_a_conflicting_auxiliary(fused, method):
    net = copy.deepcopy(fused)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    out = net(x)
    primary_loss = F.cross_entropy(out.primary, y)
    # at step 0 the fusion weights are zero, so on the primary branch this "auxiliary" gradient is exactly -2 g_p
    losses = [primary_loss, F.cross_entropy(out.aux[0], y) - 2 * primary_loss]
    primary = list(net.primary.parameters())
    g_p = torch.autograd.grad(primary_loss, primary, retain_graph=True)
    others = [p for p in net.parameters() if all(p is not q for q in primary)]
    plain = torch.autograd.grad(sum(losses), others, retain_graph=True, allow_unused=True)
    mto.backward(losses, net, method)
    for p, g in zip(primary, g_p, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-6)  # the plain sum would be -g_p
    for p, g in zip(others, plain, strict=True):
        if g is None:
            assert p.grad is None
        else:
            assert torch.allclose(p.grad, g, atol=1e-6)


# ---------------------------------------------------------------------------------------------- DistributedDataParallel


def _plain_cnn(classes):
    """No BatchNorm: a shard's gradient is then exactly its part of the whole batch's."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes))


def _ddp_net():
    torch.manual_seed(0)
    net = auxwrap.attach(_plain_cnn(4), _plain_cnn(2), "grad", example_inputs=(torch.randn(2, 3, 8, 8),))
    with torch.no_grad():  # non-zero fusions: the auxiliary loss reaches the shared primary branch
        for _, fusion in net.fusion_sites():
            fusion.weight.weight.normal_(0.0, 0.3)
    return net


DDP_BATCHES = [(torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(s)),
                torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(s))) for s in range(3)]


def _ddp_train(model, method, batches):
    """An optimiser step of ``method`` on ``model`` (a FusedNet or a DDP wrapping one) per batch (DWA weighs
    the third from the first two); the parameters of the network and of its balancer after them."""
    options = {"window": 1} if method == "dwa" else {}
    balancer = mto.balancer_for(model, method, 2, **options)
    optimizer = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=0.5)
    for x, y in batches:
        out = model(x)
        optimizer.zero_grad()
        mto.backward([F.cross_entropy(out.primary, y), F.cross_entropy(out.aux[0], y // 2)], model, method, **options)
        optimizer.step()
    return [p.detach().clone() for p in [*model.parameters(), *balancer.parameters()]]


def _ddp_accumulate(ddp, method, batches):
    """Gradient accumulation: the first batch's backward in ``ddp.no_sync()``, the second's synchronised, then
    one optimiser step; the parameters after it."""
    options = {"window": 1} if method == "dwa" else {}
    balancer = mto.balancer_for(ddp, method, 2, **options)
    optimizer = torch.optim.SGD([*ddp.parameters(), *balancer.parameters()], lr=0.5)
    for i, (x, y) in enumerate(batches[:2]):
        with ddp.no_sync() if i == 0 else contextlib.nullcontext():
            out = ddp(x)
            mto.backward([F.cross_entropy(out.primary, y), F.cross_entropy(out.aux[0], y // 2)], ddp, method, **options)
    optimizer.step()
    return [p.detach().clone() for p in [*ddp.parameters(), *balancer.parameters()]]


def _ddp_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        shard = [(x[rank::world], y[rank::world]) for x, y in DDP_BATCHES]  # each rank its own data
        results = {method: _ddp_train(nn.parallel.DistributedDataParallel(_ddp_net()), method, shard)
                   for method in mto.METHODS}
        results.update({f"{method}, no_sync": _ddp_accumulate(nn.parallel.DistributedDataParallel(_ddp_net()),
                                                               method, shard) for method in mto.METHODS})
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_gives_every_rank_the_update_of_the_whole_batch(tmp_path):
    """Two gloo ranks, each on half of every batch: after three steps every rank holds the same network and
    balancer (bit for bit), and they are those of one process on the whole batch (to float rounding): the
    gradient methods combine the task gradients of the whole batch, DWA weighs the whole batch's losses, and
    the log-variances of "uncertainty" follow their mean gradient. With gradient accumulation in
    ``no_sync()`` too, the ranks end alike."""
    start = time.perf_counter()
    fork = "fork" in mp.get_all_start_methods()  # seconds instead of ~30 s of imports in fresh interpreters
    mp.start_processes(_ddp_worker, args=(2, tmp_path / "init", tmp_path), nprocs=2, join=True,
                       start_method="fork" if fork else "spawn")
    elapsed = time.perf_counter() - start
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for method in mto.METHODS:
        single = _ddp_train(_ddp_net(), method, DDP_BATCHES)
        first, second = ranks[0][method], ranks[1][method]
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True)), method
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(first, single, strict=True)), method
        first, second = ranks[0][f"{method}, no_sync"], ranks[1][f"{method}, no_sync"]
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True)), f"{method}, no_sync"
    assert elapsed < 60, f"DDP test took {elapsed:.0f} s"


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_input_raises_argument_errors():
    model, x = TwoHeads(), torch.randn(16, 4)
    with pytest.raises(AuxwrapArgumentError, match=r"unknown method 'gradnorm'.*'pcgrad-aux'.*'cagrad'"):
        mto.backward(model.losses(x), model, "gradnorm")
    with pytest.raises(AuxwrapArgumentError, match="got 1 loss"):
        mto.backward(model.losses(x)[:1], model, "gcs")
    with pytest.raises(AuxwrapArgumentError, match=r"losses\[1\] must be a floating-point scalar, got shape \(16, 1\)"):
        mto.backward([model.losses(x)[0], model.head2(model.trunk(x))], model, "gcs")
    with pytest.raises(AuxwrapArgumentError, match="got 3 losses, this balancer is for 2"):
        mto.Balancer("gcs", 2).backward([*model.losses(x), model.losses(x)[0]], model)
    with pytest.raises(AuxwrapArgumentError, match="unknown option.*temperature.*valid: c, rescale"):
        mto.Balancer("cagrad", 2, temperature=2.0)
    with pytest.raises(AuxwrapArgumentError, match="window must be an int >= 1"):
        mto.Balancer("dwa", 2, window=0)
    with pytest.raises(AuxwrapArgumentError, match="c must be >= 0"):
        mto.Balancer("cagrad", 2, c=-1)
    with pytest.raises(AuxwrapArgumentError, match="seed or generator, not both"):
        mto.Balancer("pcgrad", 2, seed=0, generator=torch.Generator())
    with pytest.raises(AuxwrapArgumentError, match="num_tasks must be an int >= 2"):
        mto.Balancer("equal", 1)
    assert mto.Balancer("PCGrad_Aux", 2).method == "pcgrad-aux"
