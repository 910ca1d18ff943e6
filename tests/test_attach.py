import copy
import pickle
import warnings

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

import auxwrap
from auxwrap.build import BRANCH, entry_node, read_node
from auxwrap.plan import BEFORE, OUTPUT, TO_AUX, TO_PRIMARY, WINDOW_FORMS, plan, sources_of
from auxwrap.taps import Tap

from .test_trace import Recording, WithGate, assert_as_found, snapshot
from .zoo import ARCHS, PAIRS, DictNet, ResidualNet, make

tv = torchvision.models


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    return next(iter(out.values())) if isinstance(out, dict) else out[0]


def _assert_primary_equals_original(net, primary, x):
    for training in (True, False):
        net.train(training)
        primary.train(training)
        with torch.no_grad():
            fused = net(x).primary
            original = primary(x)
        if isinstance(original, dict):
            assert fused.keys() == original.keys()
            assert all(torch.equal(fused[k], original[k]) for k in original)
        else:
            assert torch.equal(fused, original), f"train={training}"


@pytest.mark.parametrize("mode", ["grad", "nas"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_identity_at_initialisation(name, mode):
    primary, x = make(name)
    aux, _ = make(name)
    net = auxwrap.attach(primary, aux, mode, example_inputs=(x,))
    _assert_primary_equals_original(net, primary, x)
    with torch.no_grad():
        net.eval()
        aux.eval()
        assert torch.equal(_first_tensor(net(x).aux[0]), _first_tensor(aux(x)))


@pytest.mark.parametrize("mode", ["grad", "nas"])
@pytest.mark.parametrize("pair", list(PAIRS))
def test_identity_for_mixed_pairs(pair, mode):
    primary, x = make(PAIRS[pair][0])
    aux, _ = make(PAIRS[pair][1])
    net = auxwrap.attach(primary, aux, mode, example_inputs=(x,))
    assert len(net.connections()) > 0
    _assert_primary_equals_original(net, primary, x)


def _train_steps(net, x, steps=3, aux_only=False):
    opt = torch.optim.SGD(net.weight_parameters(), lr=0.05)
    net.train()
    for _ in range(steps):
        out = net(x)
        loss = _first_tensor(out.aux[0]).square().mean()
        if not aux_only:
            loss = loss + _first_tensor(out.primary).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("pair", ["resnet18+vgg11_bn", "deit_tiny+resnet18"])
def test_grad_mode_primary_stays_the_original_after_training(pair):
    primary, x = make(PAIRS[pair][0])
    aux, _ = make(PAIRS[pair][1])
    net = auxwrap.attach(primary, aux, "grad", example_inputs=(x,))
    _train_steps(net, x)
    assert any(f.weight.weight.abs().sum() > 0 for f in net.fusions.values())  # the links moved
    _assert_primary_equals_original(net, primary, x)


@pytest.mark.parametrize("name", ["tv_resnet18", "tv_vgg11_bn", "timm_deit_tiny", "timm_swin_tiny"])
def test_auxiliary_loss_alone_trains_the_primary_once_links_moved(name):
    primary, x = make(name)
    aux, _ = make(name)
    net = auxwrap.attach(primary, aux, "grad", example_inputs=(x,))

    def primary_grad_from_aux_loss():
        net.zero_grad()
        _first_tensor(net(x).aux[0]).square().mean().backward()
        return sum(p.grad.abs().sum().item() for p in primary.parameters() if p.grad is not None)

    assert primary_grad_from_aux_loss() == 0.0  # zero-initialised links: no gradient yet
    _train_steps(net, x, steps=1, aux_only=True)
    assert primary_grad_from_aux_loss() > 0.0
    reached = [n for n, p in primary.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(reached) > len(list(primary.parameters())) // 2, reached


@pytest.mark.parametrize("name", ["tv_resnet18", "timm_deit_tiny", "tv_vgg11_bn"])
def test_nas_mode_has_the_auxiliary_to_primary_path(name):
    primary, x = make(name)
    aux, _ = make(name)
    net = auxwrap.attach(primary, aux, "nas", example_inputs=(x,)).eval()
    before = net(x).primary
    with torch.no_grad():
        for _, fusion in net.fusion_sites(dest_branch="primary"):
            fusion.weight.weight.normal_(0, 0.02)
    assert not torch.equal(net(x).primary, before)
    for _, fusion in net.fusion_sites(dest_branch="primary"):
        fusion.set_gates(0.0)  # gates at zero cut the path again, whatever the weights
    assert torch.equal(net(x).primary, before)


def test_grad_mode_has_no_auxiliary_to_primary_links_and_fixed_gates():
    primary, x = make("tv_resnet18")
    aux, _ = make("tv_resnet18")
    net = auxwrap.attach(primary, aux, "grad", example_inputs=(x,))
    assert net.arch_parameters() == []
    assert {c.direction for c in net.connections()} == {TO_AUX}
    assert {c.gate for c in net.connections()} == {1.0}
    assert not any(n.meta.get(BRANCH) == "primary" and "fuse_" in n.name for n in net.graph.nodes)


def test_nas_mode_links_both_ways_with_gates_at_alpha_init():
    primary, x = make("tv_resnet18")
    aux, _ = make("tv_resnet18")
    net = auxwrap.attach(primary, aux, "nas", example_inputs=(x,), alpha_init=0.25)
    links = net.connections()
    assert {c.direction for c in links} == {TO_AUX, TO_PRIMARY}
    assert {round(c.gate, 6) for c in links} == {0.25}
    assert sum(p.numel() for p in net.arch_parameters()) == len(links)
    arch = {id(p) for p in net.arch_parameters()}
    weights = {id(p) for p in net.weight_parameters()}
    assert not arch & weights and arch | weights == {id(p) for p in net.parameters()}


def test_alpha_init_per_direction_as_the_authors_config():
    primary, x = make("tv_resnet18")
    net = auxwrap.attach(primary, make("tv_resnet18")[0], "nas", example_inputs=(x,), alpha_init=(0.001, 0.5))
    gates = {c.direction: set() for c in net.connections()}
    for c in net.connections():
        gates[c.direction].add(round(c.gate, 6))
    assert gates == {TO_PRIMARY: {0.001}, TO_AUX: {0.5}}


def test_window_and_relative_depth_pairing():
    assert sources_of(5, 8, 8, 3, "code") == [3, 4, 5]     # same depth and the two before it
    assert sources_of(5, 8, 8, 3, "paper") == [2, 3, 4]    # the three strictly earlier
    assert sources_of(5, 8, 8, 3, "group") == [3, 4, 5]    # the group of 3..5
    assert sources_of(0, 8, 8, 3, "code") == [0]
    assert sources_of(0, 8, 8, 3, "paper") == []
    assert sources_of(3, 16, 4, 3, "code") == [0]          # 16 points reading 4: depth 4/16 reads 1/4
    assert sources_of(3, 16, 4, 3, "paper") == []          # ... which is not strictly shallower
    assert sources_of(2, 16, 4, 3, "code") == []           # nothing of the other branch is that shallow yet
    assert sources_of(3, 4, 16, 3, "code") == [13, 14, 15]  # 4 points reading 16
    assert sources_of(3, 4, 16, 3, "paper") == [12, 13, 14]
    assert sources_of(3, 4, 16, 3, "group") == [15]


@pytest.mark.parametrize("form", WINDOW_FORMS)
def test_window_forms_on_a_network(form):
    primary, x = make("tv_resnet18")
    aux, _ = make("tv_resnet18")
    net = auxwrap.attach(primary, aux, "nas", example_inputs=(x,), window=2, window_form=form)
    assert net.window_form == form and net.window == 2
    names = [t.name for t in net.taps["primary"]]
    lags = {c.dest: set() for c in net.connections()}
    for c in net.connections():
        i, j = names.index(c.dest), names.index(c.source)
        lags[c.dest].add(i - j)
        assert c.reads == (BEFORE if i == j and form != "paper" else OUTPUT)
        if form == "group":
            assert i // 2 == j // 2
    expected = {"paper": {1, 2}, "code": {0, 1}, "group": {0, 1}}[form]
    assert set().union(*lags.values()) == expected
    _assert_primary_equals_original(net, primary, x)


@pytest.mark.parametrize("form", WINDOW_FORMS)
def test_graph_reads_every_source_as_its_window_form_says(form):
    primary, x = make("timm_deit_tiny")
    aux, _ = make("tv_resnet18")
    net = auxwrap.attach(primary, aux, "nas", example_inputs=(x,), window_form=form)
    graph = net.graph
    graph.lint()  # every node is defined before it is used: the graph is acyclic
    sites = {f"fusions.{site.name}": site for site, _ in net.fusion_sites()}
    fused_at = {(s.dest_branch, entry_node(s.dest)): f"fuse_{s.name}" for s in sites.values()}
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target in sites]
    assert len(calls) == len(sites) > 0
    reads = set()
    for node in calls:
        site = sites[node.target]
        _, *sources = node.args
        for source, tap, how in zip(sources, site.sources, site.reads, strict=True):
            reads.add(how)
            if source.target == "clone":  # kept from a later in-place op
                source = source.args[0]
            name = read_node(tap, how)
            if how == BEFORE:  # the source branch's own value at its entry, before its fusion
                assert source.name == f"{site.source_branch}_{name}"
            else:  # its layer output: the fused value where the fusion enters at that very node
                assert source.name == fused_at.get((site.source_branch, name), f"{site.source_branch}_{name}")
    assert reads == ({OUTPUT} if form == "paper" else {OUTPUT, BEFORE})


@pytest.mark.parametrize("mode", ["grad", "nas"])
def test_connections_grow_linearly_with_the_number_of_auxiliaries(mode):
    x = torch.randn(2, 3, 16, 16)
    counts = []
    for k in (1, 2, 3):
        net = auxwrap.attach(ResidualNet(), [ResidualNet() for _ in range(k)], mode, example_inputs=(x,))
        links = net.connections()
        assert all("primary" in (c.source_branch, c.dest_branch) for c in links)  # never aux <-> aux
        assert {c.dest_branch for c in links if c.direction == TO_AUX} == {f"aux{i}" for i in range(k)}
        counts.append(len(links))
        out = net(x)
        assert len(out.aux) == k
    assert counts == [counts[0], 2 * counts[0], 3 * counts[0]]


def test_outputs_keep_each_models_structure():
    x = torch.randn(2, 3, 16, 16)
    primary, aux = DictNet().eval(), ResidualNet().eval()
    net = auxwrap.attach(primary, aux, "nas", example_inputs=(x,)).eval()
    out = net(x)
    assert isinstance(out, auxwrap.AuxOutput)
    assert isinstance(out.primary, dict) and set(out.primary) == {"logits", "mask"}
    assert isinstance(out.aux, tuple) and torch.equal(out.aux[0], aux(x))


def test_parameter_names_keep_the_originals_under_a_branch_prefix():
    primary, x = make("tv_resnet18")
    aux, _ = make("timm_deit_tiny")
    net = auxwrap.attach(primary, aux, "nas", example_inputs=(x,))
    keys = net.state_dict().keys()
    assert {f"primary.{k}" for k in primary.state_dict()} <= keys
    assert {f"aux.0.{k}" for k in aux.state_dict()} <= keys
    # the fused network holds the user's tensors: an optimizer on primary.parameters() trains it
    assert net.primary is primary and net.aux[0] is aux
    fresh = tv.resnet18(num_classes=10)
    net.primary.load_state_dict(fresh.state_dict())
    net.eval()
    assert torch.equal(net(x).primary, fresh.eval()(x))


def test_state_dict_round_trip_into_a_new_fused_network():
    primary, x = make("tv_resnet18")
    aux, _ = make("tv_resnet18")
    net = auxwrap.attach(primary, aux, "nas", example_inputs=(x,))
    _train_steps(net, x, steps=2)
    other = auxwrap.attach(*(make("tv_resnet18")[0] for _ in range(2)), "nas", example_inputs=(x,))
    other.load_state_dict(net.state_dict())
    net.eval(), other.eval()
    assert torch.equal(net(x).primary, other(x).primary)
    assert [c.gate for c in net.connections()] == [c.gate for c in other.connections()]


def test_deepcopy_and_pickle_give_independent_equal_networks():
    x = torch.randn(2, 3, 16, 16)
    net = auxwrap.attach(ResidualNet(), ResidualNet(), "nas", example_inputs=(x,))
    _train_steps(net, x, steps=1)
    net.eval()
    expected = net(x)
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        out = clone(x)
        assert torch.equal(out.primary, expected.primary) and torch.equal(out.aux[0], expected.aux[0])
        with torch.no_grad():
            next(clone.primary.parameters()).add_(1.0)
        assert torch.equal(net(x).primary, expected.primary)  # the original is untouched


def test_train_eval_and_dtype():
    primary, x = make("tv_resnet18")
    aux, _ = make("tv_resnet18")
    net = auxwrap.attach(primary, aux, "nas", example_inputs=(x,))
    assert net.train() is net and all(m.training for m in net.modules())
    net.eval()
    assert not primary.training and not aux.training
    net.to(torch.float64)
    out = net(x.double())
    assert out.primary.dtype == torch.float64
    assert torch.equal(out.primary, primary(x.double()))


def test_train_and_eval_graphs_are_kept_apart_where_they_differ():
    # timm's DropPath reads self.training in Python: train and eval graphs differ
    primary = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, drop_path_rate=0.5)
    aux = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32)
    x = torch.randn(2, 3, 32, 32)
    net = auxwrap.attach(primary, aux, "grad", example_inputs=(x,))
    net.eval()
    assert torch.equal(net(x).primary, primary.eval()(x))  # no drop-path at eval
    net.train()
    assert "drop_path" in net.code and not torch.equal(net(x).primary, net(x).primary)


def test_other_batch_and_input_sizes_than_the_example():
    primary, x = make("timm_convnext_atto")
    aux, _ = make("tv_resnet18")
    net = auxwrap.attach(primary, aux, "nas", example_inputs=(x,)).eval()
    with torch.no_grad():
        for fusion in net.fusions.values():
            fusion.weight.weight.normal_(0, 0.01)
    out = net(torch.randn(3, 3, 96, 96))
    assert out.primary.shape == (3, 10) and out.aux[0].shape == (3, 10)


def test_generated_code_interleaves_the_branches_and_shows_the_fusion_calls():
    primary, x = make("tv_resnet18")
    aux, _ = make("tv_vgg11_bn")
    net = auxwrap.attach(primary, aux, "nas", example_inputs=(x,), window_form="paper")
    code = net.code
    # each fusion reads the other branch's layer outputs: a fused block output, a unit's activation
    assert "self.fusions.aux0_features_6_from_primary(aux0_features_4, fuse_primary_layer1_0_from_aux0)" in code
    assert "self.fusions.primary_layer1_0_from_aux0(primary_layer1_0_relu_1, aux0_features_2)" in code
    lines = [line.strip().split(" = ")[0] for line in code.splitlines() if " = " in line]
    branch_of = ["primary" if n.startswith("primary_") else "aux" if n.startswith("aux0_") else "fusion" for n in lines]
    switches = sum(1 for a, b in zip(branch_of, branch_of[1:], strict=False) if a != b)
    assert switches > 10  # interleaved, not one branch after the other


@pytest.mark.parametrize("form", WINDOW_FORMS)
def test_inplace_activations_do_not_overwrite_what_the_other_branch_reads(form):
    # torchvision's VGG classifier: Linear -> ReLU(inplace=True), which overwrites the linear output that
    # "code" and "group" read before fusion; "paper" reads the ReLU's output, which nothing overwrites
    primary, x = make("tv_vgg11_bn")
    aux, _ = make("tv_vgg11_bn")
    net = auxwrap.attach(primary, aux, "grad", example_inputs=(x,), window_form=form)
    assert ("primary_classifier_0_kept = " in net.code) == (form != "paper")
    _train_steps(net, x, steps=2)  # autograd would fail on a tensor changed in place after use
    _assert_primary_equals_original(net, primary, x)


def test_taps_per_branch():
    primary, x = make("tv_resnet18")
    aux, _ = make("timm_deit_tiny")
    net = auxwrap.attach(primary, aux, "grad", taps={"primary": "stage", "aux": ["blocks.3", "blocks.7"]},
                         example_inputs=(x,))
    assert [t.name for t in net.taps["primary"]] == ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert [t.name for t in net.taps["aux0"]] == ["blocks.3", "blocks.7"]


def test_example_inputs_inferred_for_timm_models():
    net = auxwrap.attach(timm.create_model("resnet18", pretrained=False), timm.create_model("resnet18"), "grad")
    assert net.taps["primary"][0].shape == (2, 64, 56, 56)


# ---------------------------------------------------------------------------- the user's modules stay theirs

X16 = (torch.randn(2, 3, 16, 16),)


@pytest.mark.parametrize("mode", ["grad", "nas"])
def test_attach_leaves_the_users_modules_as_it_found_them(mode):
    # forwards that store their output, append to a list, set a new attribute and update buffers in place
    primary, aux = Recording(), Recording().eval()
    before = snapshot(primary, aux)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = auxwrap.attach(primary, aux, mode, example_inputs=X16)
    assert_as_found(before, primary, aux)
    assert any("stores last_features, history, first_seen and updates the buffers calls, tally.total in place"
               in str(w.message) for w in caught)  # the fused network will not replay those
    for model in (primary, aux):
        assert model.calls.item() == 0 and model.tally.total.item() == 0  # run by no check
        assert model.last_features is None and model.history == [] and not hasattr(model, "first_seen")
    pickle.loads(pickle.dumps(primary))  # no fx Proxy left behind
    clone = pickle.loads(pickle.dumps(net))
    _train_steps(net, X16[0], steps=1)  # the network works on the restored modules
    clone.eval()
    assert torch.equal(clone(X16[0]).primary, clone.primary(X16[0]))


@pytest.mark.parametrize(("failure", "error"), [
    ({"taps": ["block1", "nope"]}, auxwrap.AuxwrapTapError),                 # after both branches are traced
    ({"taps": {"aux": ["head"]}}, auxwrap.AuxwrapPairingError),               # after shapes are propagated
    ({"aux": WithGate}, auxwrap.AuxwrapTraceError),                          # while tracing the last branch
])
@pytest.mark.parametrize("mode", ["grad", "nas"])
@pytest.mark.filterwarnings("ignore:Recording.forward stores")
def test_failed_attach_leaves_the_users_modules_as_it_found_them(failure, error, mode):
    options = dict(failure)
    primary, aux = Recording(), [Recording(), options.pop("aux", Recording)()]
    before = snapshot(primary, *aux)
    with pytest.raises(error):
        auxwrap.attach(primary, aux, mode, example_inputs=X16, **options)
    assert_as_found(before, primary, *aux)
    assert primary.calls.item() == 0 and not hasattr(primary, "first_seen")


def test_a_module_list_is_a_sequence_of_auxiliaries():
    first, second = ResidualNet(), ResidualNet()
    net = auxwrap.attach(ResidualNet(), nn.ModuleList([first, second]), "nas", example_inputs=X16)
    assert list(net.aux) == [first, second] and len(net(X16[0]).aux) == 2
    assert {c.dest_branch for c in net.connections() if c.direction == TO_AUX} == {"aux0", "aux1"}


def test_inferred_example_inputs_take_the_models_dtype():
    model = ResidualNet().double()
    model.pretrained_cfg = {"input_size": (3, 16, 16)}
    (x,) = auxwrap.default_example_inputs(model)
    assert x.dtype == torch.float64 and x.shape == (2, 3, 16, 16)


def test_numpy_numbers_are_numbers():
    net = auxwrap.attach(ResidualNet(), ResidualNet(), "nas", example_inputs=X16, window=np.int64(2),
                         alpha_init=(np.float32(0.25), np.float64(0.5)))
    assert net.window == 2 and type(net.window) is int
    gates = {c.direction: round(c.gate, 6) for c in net.connections()}
    assert gates == {TO_PRIMARY: 0.25, TO_AUX: 0.5}


def test_pairing_errors_name_their_cause():
    def points(layouts):
        shapes = {"nchw": (2, 8, 4, 4), "vector": (2, 8), "other": (2, 8, 2, 2, 2)}
        return [Tap(f"p{i}", f"p{i}", f"p{i}", shapes[lay], lay, "named") for i, lay in enumerate(layouts)]

    def message(primary, aux, mode="nas", window=3, form="paper"):
        with pytest.raises(auxwrap.AuxwrapPairingError) as info:
            plan({"primary": points(primary), "aux0": points(aux)}, mode, window, form)
        return str(info.value)

    # both branches have maps, but the only map of aux0 sits where 'paper' reads nothing: depth pairing
    depth = message(["nchw"] * 4, ["nchw", "vector", "vector", "vector"], mode="grad")
    assert "points the window pairs by relative depth" in depth and "aux0 p1 (vector 8) reads primary p0" in depth
    assert "maps and tokens fuse" in depth and "a branch of one point" not in depth
    assert "leave out the vector points" in depth
    one = message(["nchw"], ["nchw"])
    assert "window_form='paper'" in one and "a source branch of one point has none" in one
    assert "window_form='code'" in one and "1 point:" in one
    layouts = message(["other"], ["nchw", "nchw"], form="code")
    assert "no fusion point of the primary (1 point: other) and aux0 (2 points: nchw)" in layouts
    assert "taps={'primary': [...], 'aux0': [...]}" in layouts


# ---------------------------------------------------------------------------- bad input


class Mlp(nn.Module):
    """Vector points only: nothing to pair with a network of feature maps."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(768, 16), nn.Linear(16, 16), nn.Linear(16, 2)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


class CastsItsInput(ResidualNet):
    """Runs in its parameters' dtype, whatever it is given: alone it works, fused with a float32 branch not."""

    def forward(self, x):
        return super().forward(x.to(self.stem.weight.dtype))


def _net():
    net = ResidualNet()
    net.block2.eval()  # mixed training flags, to be kept
    return net


def _shared():
    primary, aux = _net(), _net()
    aux.head = primary.head
    return primary, aux


def _bound():
    reader = auxwrap.AuxModule(num_outputs=10)
    auxwrap.attach(_net(), reader, "grad", example_inputs=X16)
    return reader


_SAME = _net()
_TWICE = _net()
_FIX_ALPHA = "pass e.g. alpha_init=0.5"
_FIX_AUX = "pass aux=model or aux=[model1, model2]"
_FIX_WINDOW = "pass e.g. window=3"
_FIX_DTYPE = "convert every model to one dtype with .to(dtype) before attach()"

#: (case, call: a function returning (primary, aux, keyword arguments), error class, substrings of the message:
#: the argument, module or tap at fault, and the fix to try). Positional mode "nas" unless the kwargs say.
BAD_INPUT = [
    ("primary-a-string", lambda: ("resnet", _net(), {}), auxwrap.AuxwrapArgumentError,
     ["primary must be an nn.Module, got str", "pass the model instance"]),
    ("primary-a-class", lambda: (ResidualNet, _net(), {}), auxwrap.AuxwrapArgumentError,
     ["primary must be an nn.Module, got type", "not its class"]),
    ("primary-a-module-list", lambda: (nn.ModuleList([_net()]), _net(), {}), auxwrap.AuxwrapArgumentError,
     ["primary (ModuleList) has no forward()", "pass the model that runs"]),
    ("aux-a-string", lambda: (_net(), "resnet", {}), auxwrap.AuxwrapArgumentError,
     ["aux must be an nn.Module or a non-empty sequence", _FIX_AUX]),
    ("aux-empty", lambda: (_net(), [], {}), auxwrap.AuxwrapArgumentError, ["got []", _FIX_AUX]),
    ("aux-holds-a-string", lambda: (_net(), [_net(), "x"], {}), auxwrap.AuxwrapArgumentError,
     ["aux must be an nn.Module", _FIX_AUX]),
    ("aux-a-module-dict", lambda: (_net(), nn.ModuleDict({"seg": _net()}), {}), auxwrap.AuxwrapArgumentError,
     ["aux is an nn.ModuleDict", "aux=list(modules.values())"]),
    ("aux-without-forward", lambda: (_net(), [_net(), nn.Module()], {}), auxwrap.AuxwrapArgumentError,
     ["aux1 (Module) has no forward()", "aux=[model1, model2]"]),
    ("same-instance-as-primary", lambda: (_SAME, _SAME, {}), auxwrap.AuxwrapArgumentError,
     ["aux0 is the same module instance as the primary", "copy.deepcopy(model)"]),
    ("same-instance-twice", lambda: (_net(), [_TWICE, _TWICE], {}), auxwrap.AuxwrapArgumentError,
     ["aux1 is the same module instance as another auxiliary", "copy.deepcopy(model)"]),
    ("shared-parameters", lambda: (*_shared(), {}), auxwrap.AuxwrapArgumentError,
     ["aux0 parameter 'head.weight' is the same tensor as primary parameter 'head.weight'", "pass a copy"]),
    ("aux-module-already-bound", lambda: (_net(), _bound(), {"mode": "grad"}), auxwrap.AuxwrapArgumentError,
     ["aux0 is an AuxModule already attached", "create a new AuxModule"]),
    ("devices", lambda: (_net(), _net().to("meta"), {}), auxwrap.AuxwrapArgumentError,
     ["different devices (primary on cpu, aux0 on meta)", "with .to(device) before attach()"]),
    ("dtypes", lambda: (_net(), _net().double(), {}), auxwrap.AuxwrapArgumentError,
     ["different dtypes (primary torch.float32, aux0 torch.float64)", _FIX_DTYPE, "aux.to(torch.float32)"]),
    ("dtypes-aux-casts-its-input", lambda: (_net(), CastsItsInput().double(), {}), auxwrap.AuxwrapArgumentError,
     ["different dtypes (primary torch.float32, aux0 torch.float64)", _FIX_DTYPE]),
    ("dtypes-of-a-second-aux", lambda: (_net(), [_net(), CastsItsInput().double()], {}),
     auxwrap.AuxwrapArgumentError, ["aux1 torch.float64", _FIX_DTYPE]),
    ("dtype-of-example-inputs", lambda: (_net().double(), _net().double(), {}), auxwrap.AuxwrapArgumentError,
     ["primary: ResidualNet: the example inputs are torch.float32 but its parameters are torch.float64",
      "x.to(torch.float64)"]),
    ("mode-unknown", lambda: (_net(), _net(), {"mode": "Aux-NAS"}), auxwrap.AuxwrapArgumentError,
     ["unknown mode 'Aux-NAS'", "use mode='grad'"]),
    ("mode-none", lambda: (_net(), _net(), {"mode": None}), auxwrap.AuxwrapArgumentError,
     ["unknown mode None", "mode='nas'"]),
    ("window-zero", lambda: (_net(), _net(), {"window": 0}), auxwrap.AuxwrapArgumentError,
     ["window must be a positive integer, got 0", _FIX_WINDOW]),
    ("window-float", lambda: (_net(), _net(), {"window": 2.0}), auxwrap.AuxwrapArgumentError,
     ["window must be a positive integer, got 2.0", _FIX_WINDOW]),
    ("window-bool", lambda: (_net(), _net(), {"window": True}), auxwrap.AuxwrapArgumentError,
     ["got True", _FIX_WINDOW]),
    ("window-numpy-negative", lambda: (_net(), _net(), {"window": np.int64(-1)}), auxwrap.AuxwrapArgumentError,
     ["window must be a positive integer", _FIX_WINDOW]),
    ("window-form", lambda: (_net(), _net(), {"window_form": "sliding"}), auxwrap.AuxwrapArgumentError,
     ["unknown window_form 'sliding'", "use 'paper'"]),
    ("gate", lambda: (_net(), _net(), {"gate": "relu"}), auxwrap.AuxwrapArgumentError,
     ["gate='relu'", "use 'sigmoid'"]),
    ("alpha-init-above-one", lambda: (_net(), _net(), {"alpha_init": 1.5}), auxwrap.AuxwrapArgumentError,
     ["alpha_init must be a gate value in [0, 1]", "got 1.5", _FIX_ALPHA]),
    ("alpha-init-in-grad-mode", lambda: (_net(), _net(), {"mode": "grad", "alpha_init": 7}),
     auxwrap.AuxwrapArgumentError, ["alpha_init must be", "got 7", _FIX_ALPHA]),
    ("alpha-init-triple", lambda: (_net(), _net(), {"alpha_init": (0.1, 0.2, 0.3)}), auxwrap.AuxwrapArgumentError,
     ["or a pair (aux_to_primary, primary_to_aux)", _FIX_ALPHA]),
    ("alpha-init-nan", lambda: (_net(), _net(), {"alpha_init": float("nan")}), auxwrap.AuxwrapArgumentError,
     ["got nan", _FIX_ALPHA]),
    ("alpha-init-bool", lambda: (_net(), _net(), {"alpha_init": True}), auxwrap.AuxwrapArgumentError,
     ["got True", _FIX_ALPHA]),
    ("alpha-init-string", lambda: (_net(), _net(), {"alpha_init": "0.5"}), auxwrap.AuxwrapArgumentError,
     ["got '0.5'", _FIX_ALPHA]),
    ("taps-branch-key", lambda: (_net(), _net(), {"taps": {"aux7": "layer"}}), auxwrap.AuxwrapArgumentError,
     ["taps has unknown branch keys ['aux7']", "use 'primary', 'aux'"]),
    ("taps-choice", lambda: (_net(), _net(), {"taps": "layers"}), auxwrap.AuxwrapArgumentError,
     ["primary: taps='layers' is not a known choice for ResidualNet", "use 'layer', 'stage'"]),
    ("taps-type", lambda: (_net(), _net(), {"taps": 5}), auxwrap.AuxwrapArgumentError,
     ["taps for ResidualNet must be 'layer', 'stage' or a non-empty list of names, got 5"]),
    ("taps-unknown-name", lambda: (_net(), _net(), {"taps": ["block1", "blok2"]}), auxwrap.AuxwrapTapError,
     ["unknown fusion point 'blok2' in ResidualNet", "Closest names: block2", "Layer points: block1"]),
    ("example-inputs-missing", lambda: (_net(), _net(), {"example_inputs": None}), auxwrap.AuxwrapArgumentError,
     ["cannot infer example inputs for ResidualNet", "pass example_inputs=(torch.randn(2, 3, H, W),)"]),
    ("example-inputs-type", lambda: (_net(), _net(), {"example_inputs": "x"}), auxwrap.AuxwrapArgumentError,
     ["example_inputs for ResidualNet must be a tensor or a non-empty tuple", "example_inputs=(torch.randn("]),
    ("aux-takes-other-inputs",
     lambda: (_net(), nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU()), {}),
     auxwrap.AuxwrapArgumentError,
     ["aux0: Sequential failed on the example inputs [(2, 3, 16, 16)]", "pass example_inputs that"]),
    ("leaf-modules", lambda: (_net(), _net(), {"leaf_modules": [nn.ReLU()]}), auxwrap.AuxwrapArgumentError,
     ["leaf_modules must hold nn.Module classes, got ReLU()", "pass the class"]),
    ("autowrap-functions", lambda: (_net(), _net(), {"autowrap_functions": ["relu"]}),
     auxwrap.AuxwrapArgumentError, ["autowrap_functions must hold module-level functions, got 'relu'",
                                    "autowrap_functions=[my_function]"]),
    ("untraceable-aux", lambda: (_net(), WithGate(), {}), auxwrap.AuxwrapTraceError,
     ["inside module 'body.1' (Gate)", "leaf_modules=[Gate]"]),
    ("unpairable-layouts", lambda: (Mlp(), _net(), {}), auxwrap.AuxwrapPairingError,
     ["the primary (2 points: vector) and aux0 (4 points: nchw)", "taps={'primary': [...], 'aux0': [...]}"]),
    ("unpairable-depths", lambda: (_net(), _net(), {"taps": ["block4"]}), auxwrap.AuxwrapPairingError,
     ["the primary (1 point: nchw) and aux0 (1 point: nchw)", "window_form='code'"]),
]


@pytest.mark.parametrize(("call", "error", "parts"), [case[1:] for case in BAD_INPUT],
                         ids=[case[0] for case in BAD_INPUT])
def test_bad_input_is_refused_by_name_with_the_fix_and_changes_nothing(call, error, parts):
    primary, aux, kwargs = call()
    kwargs = {"mode": "nas", "example_inputs": X16} | kwargs
    models = [m for m in [primary, *(aux if isinstance(aux, (list, tuple)) else [aux])] if isinstance(m, nn.Module)]
    before = snapshot(*models)
    with pytest.raises(error) as info:
        auxwrap.attach(primary, aux, **kwargs)
    assert isinstance(info.value, auxwrap.AuxwrapError)
    missing = [part for part in parts if part not in str(info.value)]
    assert not missing, f"{missing} not in: {info.value}"
    assert_as_found(before, *models)
