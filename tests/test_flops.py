"""count_flops: convolution counts against hand formulas (grouped, depthwise, transposed; forward and
backward), and a count that leaves the module as it was."""

import math

import pytest
import timm
import torch
from torch import nn
from torch.utils import flop_counter

import auxwrap
from auxwrap import flops


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors: see conftest.one_thread."""


def _conv_flops(conv: nn.Module, x_shape: tuple, y_shape: tuple) -> int:
    """2 x MACs of one convolution, by hand: every output element (every input element for a transposed
    convolution, which scatters it) meets in_channels / groups x kernel weights of each of its group's
    output channels."""
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        n, c_in, *spatial = x_shape
        return 2 * n * c_in * math.prod(spatial) * (conv.out_channels // conv.groups) * math.prod(conv.kernel_size)
    n, c_out, *spatial = y_shape
    return 2 * n * c_out * math.prod(spatial) * (conv.in_channels // conv.groups) * math.prod(conv.kernel_size)


CONVS = {  # the convolution, its input
    "plain 1d": (lambda: nn.Conv1d(8, 12, 3), (2, 8, 10)),
    "grouped 2d": (lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4), (2, 8, 9, 9)),
    "depthwise 2d": (lambda: nn.Conv2d(16, 16, 3, padding=1, groups=16), (2, 16, 8, 8)),
    "transposed grouped 2d": (lambda: nn.ConvTranspose2d(8, 12, 3, stride=2, groups=4), (2, 8, 5, 5)),
    "transposed grouped 1d": (lambda: nn.ConvTranspose1d(6, 4, 2, stride=2, groups=2), (2, 6, 7)),
}


@pytest.mark.parametrize("name", CONVS)
def test_forward_of_a_convolution_counts_as_by_hand(name):
    build, shape = CONVS[name]
    conv, x = build(), torch.randn(shape)
    assert auxwrap.count_flops(conv, x) == _conv_flops(conv, x.shape, conv(x).shape)


@pytest.mark.parametrize(("grad_input", "grad_weight"), [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("name", CONVS)
def test_backward_of_a_convolution_counts_each_gradient_as_one_forward(name, grad_input, grad_weight):
    """The input gradient and the weight gradient each cost the forward convolution, counted only where
    autograd computes them (torch 2.14.1 counted the weight gradient of a grouped one ``groups`` times)."""
    build, shape = CONVS[name]
    conv = build()
    stem = (nn.Conv1d if len(shape) == 3 else nn.Conv2d)(shape[1], shape[1], 1)  # feeds conv a gradient-carrying input
    stem.requires_grad_(grad_input)
    conv.weight.requires_grad_(grad_weight)
    x = torch.randn(shape)
    forward_stem, forward_conv = _conv_flops(stem, shape, shape), _conv_flops(conv, shape, conv(x).shape)
    expected = forward_stem * (1 + grad_input) + forward_conv * (1 + grad_input + grad_weight)
    assert auxwrap.count_flops(nn.Sequential(stem, conv), x, backward=True) == expected


def test_torch_formula_is_kept_where_it_counts_grouped_convolutions_right(monkeypatch):
    """No double correction: once torch's own formula counts groups (pytorch/pytorch#183405), it is used."""
    op = torch.ops.aten.convolution_backward
    assert flops._formula_corrections() == {op: flops._conv_backward_flop}  # torch 2.14.1 miscounts
    monkeypatch.setitem(flop_counter.flop_registry, op, flop_counter.shape_wrapper(flops._conv_backward_flop))
    assert flops._formula_corrections() == {}


def test_training_step_of_a_mobilenet_costs_about_three_forward_passes():
    """Forward + backward ~ 3 forward passes (the first layer needs no input gradient); the grouped-conv
    miscount made it 30 x for MobileNetV3."""
    model, x = timm.create_model("mobilenetv3_small_050", pretrained=False), torch.randn(1, 3, 64, 64)
    ratio = auxwrap.count_flops(model, x, backward=True) / auxwrap.count_flops(model, x)
    assert 2.0 < ratio < 3.0, ratio


# ---------------------------------------------------------------------- the module is left as it was

def _state(module):
    return {name: t.detach().clone() for name, t in module.state_dict(keep_vars=True).items()}


@pytest.mark.parametrize("backward", [False, True])
def test_count_flops_in_train_mode_leaves_batchnorm_statistics_and_gradients_alone(backward):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    first_bn = model[1]
    grad = torch.ones_like(model[0].weight)
    model[0].weight.grad = grad  # an accumulated gradient stays as it is; None stays None
    before = _state(model)
    x = torch.randn(4, 3, 8, 8) + 3.0  # statistics far from the initial (0, 1)
    assert auxwrap.count_flops(model, x, backward=backward) > 0
    after = _state(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before), [k for k in before if not torch.equal(
        after[k], before[k])]
    assert int(first_bn.num_batches_tracked) == 0
    assert model[0].weight.grad is grad and torch.equal(grad, torch.ones_like(grad))
    assert all(p.grad is None for name, p in model.named_parameters() if name != "0.weight")
    assert model.training
    model(x)  # the same module objects are still in place: a pass moves their statistics
    assert int(first_bn.num_batches_tracked) == 1
