import pickle
import warnings

import pytest
import timm.layers
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

import auxwrap
from auxwrap.trace import MODULE_PATH, kept_as_found

from .zoo import ZOO, DictNet, ResidualNet, build


def _assert_same_outputs(a, b):
    flat_a, spec_a = tree_flatten(a)
    flat_b, spec_b = tree_flatten(b)
    assert spec_a == spec_b
    for x, y in zip(flat_a, flat_b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", list(ZOO))
def test_traced_graph_equals_eager_exactly(name):
    model, x = build(name)
    traced = auxwrap.trace(model)
    with torch.no_grad():
        _assert_same_outputs(traced.graph_module(x), model(x))


@pytest.mark.parametrize("name", ["tv_resnet50", "timm_vit_base", "dict_net"])
def test_graph_module_holds_the_original_parameters(name):
    model, _ = build(name)
    traced = auxwrap.trace(model)
    originals = {id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}
    held = list(traced.graph_module.parameters()) + list(traced.graph_module.buffers())
    assert held and all(id(t) in originals for t in held)
    assert sum(p.numel() for p in traced.graph_module.parameters()) == sum(p.numel() for p in model.parameters())
    # same names, same objects: a step on the graph module's parameters is a step on the user's model
    assert all(model.get_parameter(n) is p for n, p in traced.graph_module.named_parameters())


def test_every_node_records_its_owning_module():
    model = ResidualNet()
    traced = auxwrap.trace(model)
    owners = {n.name: traced.owner(n) for n in traced.graph.nodes}
    assert all(MODULE_PATH in n.meta for n in traced.graph.nodes)
    for node in traced.graph.nodes:
        if node.op == "call_module":
            assert owners[node.name] == node.target
    # the functional relu and add inside block1 belong to block1, the mean in forward to the root
    block1_ops = [n for n in traced.graph.nodes if owners[n.name] == "block1" and n.op == "call_function"]
    assert {n.target for n in block1_ops} >= {torch.relu}
    assert any(n.op == "call_method" and n.target == "mean" and owners[n.name] == "" for n in traced.graph.nodes)
    assert [n.name for n in traced.owned_by("block3")][-1] == [
        n.name for n in traced.graph.nodes if owners[n.name] == "block3"][-1]


def test_trace_leaves_the_model_untouched():
    model = DictNet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [(n, type(m)) for n, m in model.named_modules()]
    auxwrap.trace(model)
    assert model.training
    assert [(n, type(m)) for n, m in model.named_modules()] == modules_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class Gate(nn.Module):
    """Python control flow on a tensor: untraceable unless kept as a leaf."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return x


class WithGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 3, 1), Gate())

    def forward(self, x):
        return self.body(x)


def test_trace_failure_names_module_class_and_fixes_in_order():
    with pytest.raises(auxwrap.AuxwrapTraceError) as info:
        auxwrap.trace(WithGate())
    message = str(info.value)
    assert "'body.1' (Gate)" in message
    assert info.value.module_path == "body.1" and info.value.module_type is Gate
    fixes = [message.index(s) for s in ("leaf_modules=[Gate]", "concrete_args", "register_notrace_module(Gate)")]
    assert fixes == sorted(fixes)
    assert isinstance(info.value, auxwrap.AuxwrapError)


def test_trace_failure_in_the_root_forward_names_the_root():
    class Root(nn.Module):
        def forward(self, x):
            return x * 2 if x.mean() > 0 else x

    with pytest.raises(auxwrap.AuxwrapTraceError, match=r"(?s)inside Root\.forward itself.*1\. concrete_args"):
        auxwrap.trace(Root())


def test_leaf_modules_make_it_traceable_and_stay_opaque():
    model = WithGate().eval()
    traced = auxwrap.trace(model, leaf_modules=[Gate])
    assert any(n.op == "call_module" and n.target == "body.1" for n in traced.graph.nodes)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(traced.graph_module(x), model(x))


def test_timm_notrace_registry_is_applied(monkeypatch):
    registered = set(timm.layers.get_notrace_modules())
    monkeypatch.setattr(timm.layers._fx, "_leaf_modules", registered | {Gate})
    traced = auxwrap.trace(WithGate())
    assert any(n.op == "call_module" and n.target == "body.1" for n in traced.graph.nodes)


def scale_by_sign(x):
    return x * 2 if x.mean() > 0 else x


class UsesFunction(nn.Module):
    def forward(self, x):
        return scale_by_sign(x) + 1


def test_autowrap_functions_keep_a_function_opaque():
    with pytest.raises(auxwrap.AuxwrapTraceError):
        auxwrap.trace(UsesFunction())
    traced = auxwrap.trace(UsesFunction(), autowrap_functions=[scale_by_sign])
    assert any(n.target is scale_by_sign for n in traced.graph.nodes)
    x = torch.randn(4)
    assert torch.equal(traced.graph_module(x), UsesFunction()(x))


class Flagged(nn.Module):
    def forward(self, x, double: bool = True):
        return x * 2 if double else x


def test_concrete_args_fix_control_flow_inputs():
    traced = auxwrap.trace(Flagged(), concrete_args={"double": False})
    x = torch.randn(3)
    assert torch.equal(traced.graph_module(x, False), x)  # the specialised value is checked


@pytest.mark.parametrize(
    ("bad", "match"),
    [("resnet50", "expected an nn.Module, got str"),
     (nn.Conv2d, "expected an nn.Module, got type"),
     (torch.randn(2), "expected an nn.Module, got Tensor")],
)
def test_non_modules_are_refused(bad, match):
    with pytest.raises(auxwrap.AuxwrapArgumentError, match=match):
        auxwrap.trace(bad)


def test_torchscript_modules_are_refused():
    scripted = torch.jit.script(nn.Linear(2, 2))
    with pytest.raises(auxwrap.AuxwrapArgumentError, match="TorchScript"):
        auxwrap.trace(scripted)


@pytest.mark.parametrize("bad", [[Gate()], ["Gate"], [int]])
def test_bad_leaf_modules_are_refused(bad):
    with pytest.raises(auxwrap.AuxwrapArgumentError, match="leaf_modules must hold nn.Module classes"):
        auxwrap.trace(WithGate(), leaf_modules=bad)


def test_bad_autowrap_functions_are_refused():
    with pytest.raises(auxwrap.AuxwrapArgumentError, match="autowrap_functions"):
        auxwrap.trace(UsesFunction(), autowrap_functions=["scale_by_sign"])


# ---------------------------------------------------------------------------- the user's modules stay theirs


class Tally(nn.Module):
    """Counts in place what passes through it: a buffer updated by every real run of its forward."""

    def __init__(self):
        super().__init__()
        self.register_buffer("total", torch.zeros(()))

    def forward(self, x):
        self.total.add_(1)
        return x


class Recording(ResidualNet):
    """A forward with side effects: it counts its calls in a buffer (and in a submodule's), stores its output,
    appends to a list, and sets an attribute that does not exist before its first call. One block is in eval
    mode, the rest in train mode."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.tally = Tally()
        self.last_features = None
        self.history = []
        self.block2.eval()

    def forward(self, x):
        self.calls.add_(1)
        y = super().forward(self.tally(x))
        self.last_features = y
        self.history.append(y)
        self.first_seen = y
        return y


def snapshot(*models):
    """What attach() / trace() must leave as found, per module: its class and training flag, each instance
    attribute by identity (lists, dicts and sets also by content), every tensor's identity and value."""
    def module_state(module):
        attributes = {k: id(v) for k, v in vars(module).items()}
        contents = {k: [id(x) for x in (v.values() if isinstance(v, dict) else v)]
                    for k, v in vars(module).items() if isinstance(v, (list, dict, set))}
        return type(module), module.training, attributes, contents

    return [([(n, *module_state(m)) for n, m in model.named_modules()],
             {n: (id(t), t.clone()) for n, t in [*model.named_parameters(), *model.named_buffers()]})
            for model in models]


def assert_as_found(before, *models):
    for (modules_a, tensors_a), (modules_b, tensors_b) in zip(before, snapshot(*models), strict=True):
        assert modules_a == modules_b
        assert tensors_a.keys() == tensors_b.keys()
        for name, (id_a, value_a) in tensors_a.items():
            id_b, value_b = tensors_b[name]
            assert id_a == id_b, name
            assert value_a.shape == value_b.shape if value_a.is_meta else torch.equal(value_a, value_b), name


@pytest.mark.parametrize("training", [None, True, False])
def test_trace_leaves_a_forward_with_side_effects_as_found(training):
    model = Recording()
    before = snapshot(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = auxwrap.trace(model, training=training)
    assert_as_found(before, model)
    assert [str(w.message).split(";")[0] for w in caught] == [
        "Recording.forward stores last_features, history, first_seen and updates the buffers calls, tally.total "
        "in place with values the graph does not compute"]
    assert model.last_features is None and not hasattr(model, "first_seen") and model.history == []
    pickle.dumps(model)  # no fx Proxy left behind
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    with torch.no_grad():
        assert torch.equal(traced.graph_module.eval()(x), model(x))


@pytest.mark.filterwarnings("ignore:Recording.forward stores")
def test_trace_failure_leaves_the_model_as_found():
    model = Recording()
    model.block3 = WithGate()  # untraceable: Python control flow on a tensor
    before = snapshot(model)
    with pytest.raises(auxwrap.AuxwrapTraceError):
        auxwrap.trace(model)
    assert_as_found(before, model)


def test_find_taps_leaves_buffers_updated_in_place_as_found():
    model = Recording()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = auxwrap.trace(model)
    before = snapshot(model)
    auxwrap.find_taps(traced, torch.randn(2, 3, 8, 8))  # runs the graph, which adds to both buffers
    assert_as_found(before, model)
    assert model.calls.item() == 0 and model.tally.total.item() == 0


def test_kept_as_found_restores_on_failure_and_leaves_nested_blocks_to_the_outer_one():
    model = Recording()
    model.scratch = torch.zeros(3)  # a plain tensor attribute, not a buffer
    before = snapshot(model)
    scratch = model.scratch
    with pytest.raises(RuntimeError, match="boom"), kept_as_found(model):
        with kept_as_found(model):
            model.calls.add_(5)
            model.block1.conv1.weight.data.mul_(2)  # not seen by autograd's version counter
            model.history.append(1)
            model.new_attribute = 1
        assert model.calls.item() == 5  # the inner block leaves it to the outer one
        model.scratch.resize_(7)
        model.stem = nn.Identity()
        model.train(False)
        raise RuntimeError("boom")
    assert_as_found(before, model)
    assert model.scratch is scratch and torch.equal(scratch, torch.zeros(3))


def test_trace_keeps_the_tensor_constants_its_graph_reads():
    class Constant(nn.Module):
        def forward(self, x):
            return x + torch.tensor([1.0, 2.0])

    model = Constant()
    traced = auxwrap.trace(model)
    stowed = [k for k in vars(model) if k.startswith("_tensor_constant")]
    assert stowed and traced.graph_module(torch.zeros(2)).tolist() == [1.0, 2.0]
