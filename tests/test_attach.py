import copy
import pickle

import pytest
import timm
import torch
import torchvision
from torch import nn

import auxwrap
from auxwrap.build import BRANCH, entry_node, read_node
from auxwrap.plan import BEFORE, OUTPUT, TO_AUX, TO_PRIMARY, WINDOW_FORMS, sources_of

from .zoo import ARCHS, PAIRS, DictNet, ResidualNet, make

tv = torchvision.models


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    return next(iter(out.values())) if isinstance(out, dict) else out[0]


def _snapshot(*models):
    return [({k: v.clone() for k, v in m.state_dict().items()},
             [(n, type(x), x.training) for n, x in m.named_modules()],
             [id(p) for p in m.parameters()]) for m in models]


def _same(a, b):
    return a.shape == b.shape if a.is_meta else torch.equal(a, b)


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


# ---------------------------------------------------------------------------- bad input


def _refused(error, match, primary, aux, *args, **kwargs):
    models = [primary] + (list(aux) if isinstance(aux, (list, tuple)) else [aux])
    models = [m for m in models if isinstance(m, nn.Module)]
    before = _snapshot(*models)
    with pytest.raises(error, match=match):
        auxwrap.attach(primary, aux, *args, **kwargs)
    after = _snapshot(*models)
    for (state_a, mods_a, ids_a), (state_b, mods_b, ids_b) in zip(before, after, strict=True):
        assert mods_a == mods_b and ids_a == ids_b
        assert all(_same(state_a[k], v) for k, v in state_b.items())


X16 = (torch.randn(2, 3, 16, 16),)


def test_same_instance_as_primary_and_auxiliary_is_refused():
    model = ResidualNet()
    _refused(auxwrap.AuxwrapArgumentError, "aux0 is the same module instance as the primary", model, model,
             example_inputs=X16)
    other = ResidualNet()
    _refused(auxwrap.AuxwrapArgumentError, "aux1 is the same module instance as another auxiliary",
             model, [other, other], example_inputs=X16)


def test_shared_parameters_are_refused():
    primary, aux = ResidualNet(), ResidualNet()
    aux.head = primary.head
    _refused(auxwrap.AuxwrapArgumentError, "aux0 parameter 'head.weight' is the same tensor as primary parameter",
             primary, aux, example_inputs=X16)


def test_branches_on_different_devices_are_refused():
    primary, aux = ResidualNet(), ResidualNet().to("meta")
    _refused(auxwrap.AuxwrapArgumentError, r"different devices \(primary on cpu, aux0 on meta\)", primary, aux,
             example_inputs=X16)


@pytest.mark.parametrize("mode", ["Aux-NAS", "", None])
def test_unknown_mode_is_refused(mode):
    _refused(auxwrap.AuxwrapArgumentError, "unknown mode", ResidualNet(), ResidualNet(), mode, example_inputs=X16)


def test_points_that_cannot_be_paired_are_refused():
    # the primary's points are vectors, the auxiliary's maps
    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(768, 16), nn.Linear(16, 16), nn.Linear(16, 2)

        def forward(self, x):
            return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))

    _refused(auxwrap.AuxwrapPairingError, r"primary \(vector\) and of aux0 \(nchw\) cannot be paired",
             Mlp(), ResidualNet(), example_inputs=X16)


def test_missing_example_inputs_are_asked_for():
    _refused(auxwrap.AuxwrapArgumentError, r"cannot infer example inputs for ResidualNet.*example_inputs=",
             ResidualNet(), ResidualNet())


def test_auxiliary_that_does_not_take_the_primarys_inputs():
    grey = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
    _refused(auxwrap.AuxwrapArgumentError, r"aux0: Sequential failed on the example inputs \[\(2, 3, 16, 16\)\]",
             ResidualNet(), grey, example_inputs=X16)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"window": 0}, "window must be a positive int"),
    ({"alpha_init": 1.5}, r"alpha_init must be a gate value in \[0, 1\]"),
    ({"alpha_init": (0.1, 0.2, 0.3)}, r"or a pair \(aux_to_primary, primary_to_aux\)"),
    ({"taps": {"aux7": "layer"}}, r"taps has unknown branch keys \['aux7'\]"),
    ({"taps": ["nope"]}, "unknown fusion point 'nope' in ResidualNet"),
])
def test_bad_options_are_refused(kwargs, match):
    error = auxwrap.AuxwrapTapError if "nope" in str(kwargs) else auxwrap.AuxwrapArgumentError
    _refused(error, match, ResidualNet(), ResidualNet(), example_inputs=X16, **kwargs)


@pytest.mark.parametrize("aux", ["resnet", [], [ResidualNet(), "x"]])
def test_bad_auxiliaries_are_refused(aux):
    _refused(auxwrap.AuxwrapArgumentError, "aux must be an nn.Module or a non-empty sequence", ResidualNet(), aux,
             example_inputs=X16)
