"""The invariants (DESIGN I1-I3) on the torch.export capture path, end to end: Hugging Face transformers models
(which torch.fx cannot trace) as primary and as auxiliary beside timm models, models whose forward branches on
tensor shapes, the timm zoo captured both ways, round trips and the errors of ``capture=``.

The default job runs one or two cases of each test; the broad parametrisations are marked slow.
"""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

import auxwrap
from auxwrap.deploy import cut_links

from .hf_zoo import HF, hf_taps, make_hf
from .test_deploy import _relative_error, _train_steps
from .test_trace import assert_as_found, snapshot
from .zoo import PAIRS, ResidualBlock, ResidualNet, make, sequential_cnn

#: fused vs original output with the aux -> primary links cut (I1), relative; deployed vs fused (I2)
IDENTITY_TOLERANCE, DEPLOY_TOLERANCE = 1e-6, 1e-5


# capture="auto" says once per model that a transformers model went through torch.export; tested below
pytestmark = pytest.mark.filterwarnings("ignore::auxwrap.AuxwrapCaptureWarning")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: one intra-op thread (tests/conftest.py)."""


# ---------------------------------------------------------------------- cases: a transformers model beside a timm one

#: the timm model (tests/zoo.py) each transformers model is paired with: maps with tokens, tokens with maps
PARTNERS = {"hf_vit": "timm_regnetx_002", "hf_convnext": "timm_deit_tiny", "hf_swin": "timm_convnext_atto",
            "hf_segformer": "timm_regnetx_002"}


@dataclass(frozen=True)
class Case:
    hf: str
    hf_primary: bool  # the transformers model is the primary (else the auxiliary)
    mode: str

    def __str__(self) -> str:
        side = "primary" if self.hf_primary else "aux"
        return f"{self.hf}-as-{side}+{PARTNERS[self.hf]}-{self.mode}"

    def build(self) -> tuple[nn.Module, nn.Module, torch.Tensor, dict]:
        """Fresh primary and auxiliary (train mode, dropout off), an input batch, and attach()'s keywords."""
        timm_model, x = make(PARTNERS[self.hf])
        hf_model = make_hf(self.hf, size=x.shape[-1])
        branch = "primary" if self.hf_primary else "aux0"
        primary, aux = (hf_model, timm_model) if self.hf_primary else (timm_model, hf_model)
        return primary, aux, x, dict(example_inputs=(x,), taps={branch: hf_taps(self.hf)})


ALL_CASES = tuple(Case(hf, side, mode) for hf in HF for side in (True, False) for mode in ("nas", "grad"))
#: the default job's cases: a dense transformers primary with a BatchNorm to fold (mode "nas"), and a
#: transformers ViT as the auxiliary (mode "grad")
DEFAULT_CASES = (Case("hf_segformer", True, "nas"), Case("hf_vit", False, "grad"))


def _cases(default: tuple[Case, ...]) -> list:
    """Every case, those not in ``default`` marked slow."""
    return [pytest.param(case, id=str(case), marks=() if case in default else pytest.mark.slow) for case in ALL_CASES]


def _leaves(out: object) -> list[torch.Tensor]:
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _loss(*outputs: object) -> torch.Tensor:
    return sum(t.square().mean() for out in outputs for t in _leaves(out))


def _assert_same(got: object, want: object, tolerance: float, what: str) -> None:
    """Same output structure (ImageClassifierOutput, tensor...), every tensor within ``tolerance`` (relative)."""
    assert type(got) is type(want), f"{what}: {type(got).__name__}, not {type(want).__name__}"
    error = _relative_error(got, want)
    assert error <= tolerance, f"{what}: relative error {error:.3g}"


def _export_branches(case: Case) -> dict[str, str]:
    hf_branch, timm_branch = ("primary", "aux0") if case.hf_primary else ("aux0", "primary")
    return {hf_branch: "export", timm_branch: "fx"}


# ---------------------------------------------------------------------- I1 and I3 at attach, gradients


@pytest.mark.parametrize("case", _cases(DEFAULT_CASES))
def test_attach_keeps_the_originals_outputs_gradients_and_objects(case):
    """I3: attach() leaves both models as found and holds them; I1: at attach (fusion weights zero) the fused
    outputs are the originals' in eval and train mode, and a train-mode forward moves the BatchNorm statistics as
    the original's does; the primary loss's gradients are the eager model's; every fusion weight learns from a
    loss on both outputs; an optimiser on ``primary.parameters()`` trains the user's tensors."""
    primary, aux, x, options = case.build()
    originals = [copy.deepcopy(m) for m in (primary, aux)]
    before = snapshot(primary, aux)
    net = auxwrap.attach(primary, aux, case.mode, **options)
    assert_as_found(before, primary, aux)
    assert net.primary is primary and net.aux[0] is aux
    assert net.captures == _export_branches(case)
    assert len(net.connections()) > 0

    for training in (False, True):
        net.train(training)
        with torch.no_grad():
            out = net(x)
            want = [m.train(training)(x) for m in originals]
        _assert_same(out.primary, want[0], IDENTITY_TOLERANCE, f"primary, train={training}")
        _assert_same(out.aux[0], want[1], IDENTITY_TOLERANCE, f"aux0, train={training}")
    for model, original in zip((primary, aux), originals, strict=True):
        for key, value in original.state_dict().items():  # running statistics moved once, as the original's
            torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-6, atol=1e-7, msg=key)

    _loss(net(x).primary).backward()
    _loss(originals[0](x)).backward()
    for (name, p), q in zip(primary.named_parameters(), originals[0].parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)

    net.zero_grad()
    out = net(x)
    _loss(out.primary, out.aux[0]).backward()
    for name, fusion in net.fusions.items():
        grad = fusion.weight.weight.grad
        assert grad is not None and grad.any(), f"fusion {name} got no gradient"

    user_tensors = {n: p.detach().clone() for n, p in primary.named_parameters()}
    optimiser = torch.optim.SGD(primary.parameters(), lr=0.1)
    optimiser.zero_grad()
    _loss(net(x).primary).backward()
    optimiser.step()
    assert any(not torch.equal(p, user_tensors[n]) for n, p in primary.named_parameters())
    for name, p in primary.named_parameters():  # the step went into the user's own tensors
        step = 0 if p.grad is None else 0.1 * p.grad
        torch.testing.assert_close(p.detach(), user_tensors[name] - step, rtol=1e-6, atol=1e-9, msg=name)


# ---------------------------------------------------------------------- I2 after training


@pytest.mark.parametrize("case", _cases(DEFAULT_CASES[:1]))
def test_deployed_primary_after_training_is_the_primary_at_its_single_task_cost(case):
    """After a few training steps and the cut: the fused primary is the trained primary alone (I1, eval and train
    mode); the deployed module (prune) gives the fused network's output, of the model's own type, at the original's
    FLOPs and no more parameters (I2), and goes through ``auxwrap.export``."""
    primary, aux, x, options = case.build()
    original = copy.deepcopy(primary).eval()
    net = auxwrap.attach(primary, aux, case.mode, **options)
    _train_steps(net, x, steps=2)
    assert any(f.weight.weight.any() for f in net.fusions.values()), "training moved no fusion weight"
    cut_links(net)
    for training in (True, False):
        net.train(training)
        with torch.no_grad():
            fused = net(x).primary
            alone = primary.train(training)(x)
        _assert_same(fused, alone, IDENTITY_TOLERANCE, f"fused primary vs the primary alone, train={training}")

    deployed = auxwrap.prune(net)
    with torch.no_grad():
        got = deployed(x)
    _assert_same(got, fused, DEPLOY_TOLERANCE, "deployed vs fused")
    assert auxwrap.count_flops(deployed, x) == auxwrap.count_flops(original, x)
    assert auxwrap.count_parameters(deployed) <= auxwrap.count_parameters(original)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in original.modules())
    assert bool(deployed.fold_report.folded) == has_bn, deployed.fold_report
    program = auxwrap.export(deployed, x)
    with torch.no_grad():
        _assert_same(program.module()(x), fused, DEPLOY_TOLERANCE, "auxwrap.export of the deployed module")


# ---------------------------------------------------------------------- one capture per training mode


def test_train_and_eval_captures_stay_apart_with_dropout():
    """With dropout on: the eval graph is deterministic and the model's eval output; the train graph draws new
    dropout masks each run, as the model does, and the same masks as the model from the same seed."""
    timm_model, x = make("timm_regnetx_002")
    primary = make_hf("hf_vit", size=x.shape[-1], dropout=0.3)
    net = auxwrap.attach(primary, timm_model, "grad", example_inputs=(x,))
    assert net.captures == {"primary": "export", "aux0": "fx"}
    original = copy.deepcopy(primary)
    with torch.no_grad():
        net.eval()
        first, second = net(x).primary, net(x).primary
        assert torch.equal(first.logits, second.logits)
        _assert_same(first, original.eval()(x), IDENTITY_TOLERANCE, "eval")

        net.train()
        original.train()
        first, second = net(x).primary, net(x).primary
        assert not torch.equal(first.logits, second.logits)
        assert not torch.equal(original(x).logits, original(x).logits)
        torch.manual_seed(5)
        fused = net(x).primary
        torch.manual_seed(5)
        _assert_same(fused, original(x), IDENTITY_TOLERANCE, "train, same seed")


# ---------------------------------------------------------------------- control flow torch.fx cannot trace


class ShapeGate(nn.Module):
    """Pools only maps wider than 16: Python control flow on a tensor's shape (torch.fx cannot trace it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 16:
            x = F.max_pool2d(x, 2)
        return x


class ShapeNet(nn.Module):
    """ResidualNet's blocks with a ShapeGate after the first two."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block1, self.block2 = ResidualBlock(8), ResidualBlock(8)
        self.gate = ShapeGate()
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.block3, self.block4 = ResidualBlock(16), ResidualBlock(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.gate(self.block2(self.block1(torch.relu(self.stem(x)))))
        x = self.block4(self.block3(self.down(x)))
        return self.head(x.mean((2, 3)))


class OtherShapeNet(ShapeNet):
    """The same, by another name (one warning per model must name each)."""


def _capture_warnings(caught: list) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, auxwrap.AuxwrapCaptureWarning)]


def test_shape_control_flow_fails_torch_fx_by_name():
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(auxwrap.AuxwrapTraceError) as info:
        auxwrap.attach(ShapeNet(), ResidualNet(), "nas", example_inputs=(x,), capture="fx")
    assert info.value.module_path == "gate" and info.value.module_type is ShapeGate
    assert "'gate' (ShapeGate)" in str(info.value)


def test_auto_captures_shape_control_flow_with_torch_export_and_one_warning_per_model():
    torch.manual_seed(0)
    primary, aux, traceable = ShapeNet(), OtherShapeNet(), ResidualNet()
    originals = [copy.deepcopy(m).eval() for m in (primary, aux, traceable)]
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = auxwrap.attach(primary, [aux, traceable], "nas", example_inputs=(x,))
    messages = _capture_warnings(caught)
    assert len(messages) == 2, messages
    assert sorted(m.split(":")[0] for m in messages) == ["OtherShapeNet", "ShapeNet"]
    assert all("torch.export" in m and "'gate'" in m for m in messages), messages
    assert net.captures == {"primary": "export", "aux0": "export", "aux1": "fx"}
    net.eval()
    with torch.no_grad():
        for batch in (x, torch.randn(3, 3, 32, 32)):  # the batch dimension stays dynamic
            out = net(batch)
            for got, original in zip((out.primary, *out.aux), originals, strict=True):
                _assert_same(got, original(batch), IDENTITY_TOLERANCE, f"batch of {len(batch)}")


def test_capture_export_attaches_shape_control_flow_without_a_warning():
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = auxwrap.attach(ShapeNet(), ResidualNet(), "grad", example_inputs=(x,), capture="export")
    assert _capture_warnings(caught) == []
    assert net.captures == {"primary": "export", "aux0": "export"}
    assert all(t.name in dict(ShapeNet().named_modules()) for t in net.taps["primary"])


# ---------------------------------------------------------------------- the timm zoo both ways

DEFAULT_PAIRS = ("deit_tiny+resnet18",)  # tokens with maps; every pair in the slow job


@pytest.mark.parametrize("pair", [pytest.param(p, marks=() if p in DEFAULT_PAIRS else pytest.mark.slow)
                                  for p in PAIRS])
def test_export_capture_of_the_zoo_has_the_connections_and_outputs_of_fx(pair):
    nets, inputs = {}, None
    for capture in ("fx", "export"):
        primary, inputs = make(PAIRS[pair][0])
        aux, _ = make(PAIRS[pair][1])
        nets[capture] = auxwrap.attach(primary, aux, "nas", example_inputs=(inputs,), capture=capture)
        assert set(nets[capture].captures.values()) == {capture}
    fx_net, exported = nets["fx"], nets["export"]
    assert len(fx_net.connections()) > 0
    assert exported.connections() == fx_net.connections()
    for training in (False, True):
        with torch.no_grad():
            want, got = fx_net.train(training)(inputs), exported.train(training)(inputs)
        _assert_same(got.primary, want.primary, IDENTITY_TOLERANCE, f"primary, train={training}")
        _assert_same(got.aux[0], want.aux[0], IDENTITY_TOLERANCE, f"aux0, train={training}")


# ---------------------------------------------------------------------- round trips


def _torch_saved(net: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.fixture(scope="module")
def exported_net(one_thread):
    """A transformers ViT primary (export) beside a timm RegNet (fx), trained 2 steps, and its input batch."""
    case = Case("hf_vit", True, "nas")
    primary, aux, x, options = case.build()
    net = auxwrap.attach(primary, aux, case.mode, **options)
    _train_steps(net, x, steps=2)
    return net, x


@pytest.mark.parametrize("round_trip", [copy.deepcopy, _torch_saved])
def test_copies_of_a_net_with_an_exported_branch_compute_the_same(exported_net, round_trip):
    net, x = exported_net
    clone = round_trip(net)
    assert clone.captures == net.captures == {"primary": "export", "aux0": "fx"}
    assert not any(a is b for a, b in zip(clone.parameters(), net.parameters(), strict=True))
    for training in (False, True):
        with torch.no_grad():
            want, got = net.train(training)(x), clone.train(training)(x)
        _assert_same(got.primary, want.primary, 0.0, f"primary, train={training}")
        _assert_same(got.aux[0], want.aux[0], 0.0, f"aux0, train={training}")
    _loss(*clone(x)).backward()  # the copy trains
    assert all(p.grad is not None for p in clone.primary.parameters())


# ---------------------------------------------------------------------- errors


class SignGate(nn.Module):
    """Python control flow on a tensor's values: neither torch.fx nor torch.export can capture it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if x.sum() > 0 else x


def _value_branching_net() -> nn.Module:
    model = ResidualNet()
    model.block3 = nn.Sequential(ResidualBlock(16), SignGate())
    return model


@pytest.mark.parametrize("capture", ["bogus", "FX", None])
def test_unknown_capture_is_refused_with_the_choices(capture):
    primary, aux = ResidualNet(), ResidualNet()
    before = snapshot(primary, aux)
    with pytest.raises(auxwrap.AuxwrapArgumentError, match=r"(?s)capture.*'auto'.*'fx'.*'export'"):
        auxwrap.attach(primary, aux, "nas", capture=capture, example_inputs=(torch.randn(2, 3, 16, 16),))
    with pytest.raises(auxwrap.AuxwrapArgumentError, match="capture"):
        auxwrap.trace(primary, capture=capture)
    assert_as_found(before, primary, aux)


def test_fx_only_options_with_capture_export_are_refused_by_trace():
    x = torch.randn(2, 3, 16, 16)
    for option in (dict(leaf_modules=[ResidualBlock]), dict(concrete_args={"x": None}),
                   dict(autowrap_functions=[F.relu])):
        name = next(iter(option))
        with pytest.raises(auxwrap.AuxwrapArgumentError, match=f"{name}.*capture='export'"):
            auxwrap.trace(ResidualNet(), capture="export", example_inputs=(x,), **option)


def test_fx_only_options_with_capture_export_are_refused_by_attach():
    primary, aux = sequential_cnn(), sequential_cnn()
    before = snapshot(primary, aux)
    with pytest.raises(auxwrap.AuxwrapArgumentError, match=r"leaf_modules.*capture='export'"):
        auxwrap.attach(primary, aux, "nas", example_inputs=(torch.randn(2, 3, 16, 16),), capture="export",
                       leaf_modules=[nn.ReLU])
    assert_as_found(before, primary, aux)


@pytest.mark.parametrize("capture", ["export", "auto"])
def test_a_model_torch_export_cannot_capture_names_the_module_and_is_left_as_found(capture):
    primary, aux = _value_branching_net(), ResidualNet()
    before = snapshot(primary, aux)
    with pytest.raises(auxwrap.AuxwrapTraceError) as info:
        auxwrap.attach(primary, aux, "nas", example_inputs=(torch.randn(2, 3, 16, 16),), capture=capture)
    assert info.value.module_path == "block3.1" and info.value.module_type is SignGate
    assert "torch.export" in str(info.value) and "'block3.1' (SignGate)" in str(info.value)
    assert_as_found(before, primary, aux)


def test_a_failed_attach_after_an_export_capture_leaves_the_models_as_found():
    primary, aux = ShapeNet(), OtherShapeNet()
    before = snapshot(primary, aux)
    with pytest.raises(auxwrap.AuxwrapTapError, match="no_such_block"):
        auxwrap.attach(primary, aux, "nas", example_inputs=(torch.randn(2, 3, 32, 32),), capture="export",
                       taps={"aux0": ["no_such_block"]})
    assert_as_found(before, primary, aux)
