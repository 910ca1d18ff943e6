"""``torch.compile`` on fused networks (issue 15): the same gradients, gates and outputs as eager, in train
and eval mode (the train and eval graphs differ, as with timm's DropPath), through gate search steps and the
cut; no graph break and no recompilation once each mode has compiled; a compiled deployed primary.

The default job compiles mode "nas" with backend "aot_eager" (Dynamo + AOTAutograd, no code generation: about
10 s on one core); the slow job runs the same recipe in mode "grad" (aot_eager) and in mode "nas" with "inductor"
(about 2 minutes with a cold inductor cache).
"""

import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import auxwrap

from .zoo import ResidualBlock, ResidualNet

SIZE = 8  # 8x8 inputs, batch 2: compile time dominates, every step runs in milliseconds
STEPS = 5
EVAL_BEFORE = 3  # the train -> eval -> train switch comes before this step
TOL = 1e-5  # fp32: gradients, gates and outputs of the compiled network against eager


class DropPathBlock(ResidualBlock):
    """A residual block whose branch is behind a DropPath (p=0.5), as in timm's models: in train mode it draws
    random numbers, in eval mode it is the identity, so a fused network of it has two graphs."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.drop_path = DropPath(0.5)

    def forward(self, x):
        return torch.relu(x + self.drop_path(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))))


class DropPathNet(ResidualNet):
    """ResidualNet with DropPath blocks."""

    def __init__(self, num_classes: int = 4):
        super().__init__(num_classes)
        self.block1, self.block2 = DropPathBlock(8), DropPathBlock(8)
        self.block3, self.block4 = DropPathBlock(16), DropPathBlock(16)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test counts its own compilations, whatever ran before it."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _fused(mode: str) -> auxwrap.FusedNet:
    """DropPathNet(4) with a ResidualNet(2) auxiliary, in train mode; random fusion weights (zero-initialised
    ones would give every gate a zero gradient, and the comparison nothing to compare)."""
    kwargs = {"alpha_init": 0.5} if mode == "nas" else {}
    net = auxwrap.attach(DropPathNet(4), ResidualNet(2), mode=mode,
                         example_inputs=(torch.randn(2, 3, SIZE, SIZE),), **kwargs)
    with torch.no_grad():
        for _, fusion in net.fusion_sites():
            fusion.weight.weight.normal_(0.0, 0.1)
    return net.train()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(2, 3, SIZE, SIZE, generator=g), torch.randint(0, 4, (2,), generator=g), \
        torch.randint(0, 2, (2,), generator=g)


def _loss(out: auxwrap.AuxOutput, y: torch.Tensor, y_aux: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.primary, y) + F.cross_entropy(out.aux[0], y_aux)


def _forward(model: nn.Module, x: torch.Tensor, seed: int) -> auxwrap.AuxOutput:
    torch.manual_seed(seed)  # the same DropPath draws in both runs
    return model(x)


def _train(net: auxwrap.FusedNet, model: nn.Module, search_on: nn.Module | None,
           compilations=lambda: 0) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """STEPS steps of the alternating recipe on ``model`` (``net`` or a compiled ``net``): a gate step (mode
    "nas", on a ``Search`` built on ``search_on``; the L1 ramp and the cut fall inside the run) and a weight
    step, with an eval forward before step EVAL_BEFORE. Returns what each step computed (outputs, every
    parameter's gradient, the gates after it) and the number of compilations after each step."""
    search = None if search_on is None else auxwrap.Search(search_on, total_steps=STEPS, ramp=(0.2, 0.6))
    opt = torch.optim.SGD(model.weight_parameters(), lr=0.1)
    records, counts = [], []
    for step in range(STEPS):
        x, y, y_aux = _batch(step)
        record = {}
        if step == EVAL_BEFORE:
            model.eval()
            with torch.no_grad():
                record["eval"] = _forward(model, x, step).primary
            model.train()
        if search is not None:
            search.step(_loss(_forward(model, x, step), y, y_aux))
        out = _forward(model, x, 100 + step)
        opt.zero_grad()
        _loss(out, y, y_aux).backward()
        record.update(primary=out.primary.detach(), aux=out.aux[0].detach())
        record.update({f"grad {name}": p.grad.clone() for name, p in net.named_parameters() if p.grad is not None})
        opt.step()
        record.update({f"gates {i}": f.gates() for i, (_, f) in enumerate(net.gated_sites())})
        records.append(record)
        counts.append(compilations())
    if search is not None:
        assert search.is_cut  # the cut happened inside the compiled run
    return records, counts


def _check_compiled_recipe(mode: str, backend: str, search_on_compiled: bool) -> list[int]:
    """The recipe on a compiled network equals the recipe on its eager copy, step by step, and so does the
    compiled deployed primary at the end; returns the compilation counts after each step."""
    net = _fused(mode)
    twin = copy.deepcopy(net)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(net, backend=counter, fullgraph=True)  # fullgraph: a graph break fails the test
    search_on = (compiled if search_on_compiled else net) if mode == "nas" else None
    got, counts = _train(net, compiled, search_on, lambda: counter.frame_count)
    expected, _ = _train(twin, twin, twin if mode == "nas" else None)
    for step, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.keys() == e.keys(), step
        assert sum(k.startswith("grad ") for k in g) == sum(1 for _ in net.parameters()), step
        for key in e:
            torch.testing.assert_close(g[key], e[key], rtol=TOL, atol=TOL, msg=lambda m, k=key, s=step:
                                       f"step {s}, {k}: {m}")
    for (name, value), other in zip(net.state_dict().items(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(value, other, rtol=TOL, atol=TOL, msg=lambda m, k=name: f"{k}: {m}")
    _check_compiled_deploy(compiled, backend)
    return counts


def _check_compiled_deploy(compiled: nn.Module, backend: str) -> None:
    """``torch.compile(auxwrap.prune(compiled))`` computes what the eager deployed primary and the (cut)
    network compute."""
    deployed = auxwrap.prune(compiled)  # prune() takes the compiled network too
    x = _batch(STEPS)[0]
    with torch.no_grad():
        expected = deployed(x)
        got = torch.compile(deployed, backend=backend, fullgraph=True)(x)
        torch.testing.assert_close(got, expected, rtol=TOL, atol=TOL)
        torch.testing.assert_close(got, compiled.eval()(x).primary, rtol=TOL, atol=TOL)


def test_compiled_search_training_and_deploy_equal_eager_and_compile_once_per_mode():
    """aot_eager, mode "nas", Search built on the compiled network: the same gradients, gates, outputs and
    BN statistics as eager at every step, one compilation for train mode and one for eval mode, none after."""
    counts = _check_compiled_recipe("nas", "aot_eager", search_on_compiled=True)
    assert counts == [1, 1, 1, 2, 2]


def test_search_and_prune_accept_a_compiled_network():
    net = _fused("nas")
    compiled = torch.compile(net)  # nothing compiles until it is called
    assert auxwrap.Search(compiled, total_steps=1).net is net
    assert compiled.arch_parameters() == net.arch_parameters()
    with pytest.raises(auxwrap.AuxwrapArgumentError, match="torch.compile"):
        auxwrap.Search(torch.compile(nn.Linear(2, 2)), total_steps=1)


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "backend"), [("grad", "aot_eager"), ("nas", "inductor")])
def test_compiled_training_and_deploy_equal_eager_and_compile_once_per_mode(mode, backend):
    """Search (mode "nas") built on the plain network, stepping with the compiled network's losses."""
    import torch._inductor.config

    with torch._inductor.config.patch(fallback_random=True):  # inductor's DropPath draws as eager's
        counts = _check_compiled_recipe(mode, backend, search_on_compiled=False)
    assert counts == [1, 1, 1, 2, 2]
