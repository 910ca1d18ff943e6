"""Round trips of fused networks large enough to matter (>= 500 graph nodes, train and eval graphs):
state_dict, deepcopy, pickle, torch.save/load, .to(dtype), and the deployed primary through torch.export
and ONNX (run with onnxruntime). One network per mode, built once for the module."""

import copy
import io
import pickle
import warnings

import pytest
import timm
import torch
from torch import nn

import auxwrap
from auxwrap.build import BRANCH

SIZE = 32
MIN_NODES = 500


def _effnet(name):
    # drop-path makes the train graph differ from the eval one: FusedNet holds two graphs
    return timm.create_model(name, pretrained=False, num_classes=10, drop_path_rate=0.1)


def _perturb(net):
    """Every weight, gate and BatchNorm statistic moved off its initial value (fusion weights start at 0),
    except the auxiliary -> primary fusion weights, kept negligible so that prune() cuts without refusing."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        for _, fusion in net.fusion_sites(dest_branch="primary"):
            fusion.weight.weight.mul_(1e-9)


def _attach(mode, seed):
    torch.manual_seed(seed)
    x = torch.randn(2, 3, SIZE, SIZE)
    return auxwrap.attach(_effnet("efficientnet_b1"), _effnet("efficientnet_b0"), mode, example_inputs=(x,))


@pytest.fixture(scope="module", params=["grad", "nas"])
def fused(request, one_thread):
    net = _attach(request.param, seed=0)
    _perturb(net)
    graphs = _graphs(net)
    nodes = {training: len(graph.nodes) for training, graph in graphs.items()}
    print(f"\nefficientnet_b1 + efficientnet_b0 at {SIZE}px, mode={request.param}: graph nodes {nodes}")
    assert min(nodes.values()) >= MIN_NODES and graphs[True] is not graphs[False]
    return net


def _graphs(net):
    """The fused graph of each mode (train: True), the network left in eval mode."""
    return {training: net.train(training).graph for training in (True, False)}


@pytest.fixture(scope="module")
def probe():
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))  # another batch size


@pytest.fixture(scope="module")
def deployed(fused):
    """What prune() makes of the network (of a copy: in mode "nas" prune cuts the links)."""
    return auxwrap.prune(copy.deepcopy(fused))


def _outputs(net, x):
    net.eval()
    with torch.no_grad():
        out = net(x)
    return out.primary, out.aux[0]


def _same_network(clone, net, x):
    assert clone is not net and clone.mode == net.mode
    others = _graphs(clone)
    for training, graph in _graphs(net).items():
        other = others[training]
        assert other.python_code("self").src == graph.python_code("self").src
        assert [n.meta.get(BRANCH) for n in other.nodes] == [n.meta.get(BRANCH) for n in graph.nodes]
    assert all(torch.equal(a, b) for a, b in zip(_outputs(clone, x), _outputs(net, x), strict=True))
    assert not any(a is b for a, b in zip(clone.parameters(), net.parameters(), strict=True))
    assert [c.gate for c in clone.connections()] == [c.gate for c in net.connections()]


def _pickled(net):
    return pickle.loads(pickle.dumps(net))


def _torch_saved(net):
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("round_trip", [copy.deepcopy, _pickled, _torch_saved])
def test_copies_compute_the_same_and_deploy_the_same(fused, deployed, probe, round_trip):
    clone = round_trip(fused)
    _same_network(clone, fused, probe)
    with torch.no_grad():
        assert torch.equal(auxwrap.prune(clone)(probe), deployed(probe))
    clone.train()(probe)  # the train graph runs too


def test_state_dict_loads_into_a_fresh_attach(fused, probe):
    buffer = io.BytesIO()
    torch.save(fused.state_dict(), buffer)
    buffer.seek(0)
    fresh = _attach(fused.mode, seed=1)
    assert not torch.equal(_outputs(fresh, probe)[0], _outputs(fused, probe)[0])
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(_outputs(fresh, probe), _outputs(fused, probe), strict=True))


@pytest.mark.parametrize("fused", [pytest.param("grad", marks=pytest.mark.slow), "nas"], indirect=True)
def test_example_inputs_follow_to_and_prune_and_report_run_in_float64(fused, deployed, probe):
    net = copy.deepcopy(fused)
    with torch.no_grad():
        expected = deployed(probe)
    assert net.to(torch.float64) is net
    assert net.example_inputs[0].dtype == torch.float64
    assert torch.equal(net.example_inputs[0], fused.example_inputs[0].double())
    double = auxwrap.prune(net)
    assert next(double.parameters()).dtype == torch.float64
    with torch.no_grad():
        got = double(probe.double()).float()
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    rows = {row.model: row for row in auxwrap.report(net).rows}
    assert rows["deployed primary"].flops == rows["original primary"].flops
    net.float()
    assert net.example_inputs[0].dtype == torch.float32


@pytest.mark.parametrize("fused", [pytest.param("grad", marks=pytest.mark.slow), "nas"], indirect=True)
def test_torch_export_of_the_deployed_primary(fused, deployed, probe):
    program = auxwrap.export(deployed, *fused.example_inputs)
    with torch.no_grad():
        assert torch.allclose(program.module()(probe), deployed(probe), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_onnx_of_the_deployed_primary_runs_in_onnxruntime(fused, deployed, probe, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / f"deployed_{fused.mode}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auxwrap.export_onnx(deployed, str(path), *fused.example_inputs)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: probe.numpy()})  # batch 3: the batch is dynamic
    with torch.no_grad():
        expected = deployed(probe)
    assert torch.allclose(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prune_of_a_half_precision_network_checks_within_its_tolerance(dtype):
    from .zoo import ResidualNet

    x = torch.randn(2, 3, 16, 16)
    net = auxwrap.attach(ResidualNet(), ResidualNet(), "nas", example_inputs=(x,))
    _perturb(net)
    net.to(dtype)
    assert net.example_inputs[0].dtype == dtype
    deployed = auxwrap.prune(net)
    assert 0.0 < deployed.relative_error <= auxwrap.deploy.deploy_tolerance(dtype)
