"""Fusions into and out of token models: every fusion weight can learn, the class/prefix tokens a tensor holds
are read from the tensor (not from a model attribute alone), the grid follows the input's aspect."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

import auxwrap
from auxwrap.fusion import Point, resize, token_grid

pytestmark = pytest.mark.usefixtures("one_thread")


def _vit(name: str, img_size: int | tuple[int, int] = 32, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, img_size=img_size, depth=3, num_classes=5, drop_rate=0.0, **kwargs)


def _resnet() -> torch.nn.Module:
    torch.manual_seed(1)
    return torchvision.models.resnet18(num_classes=5)


def _tensors(out: auxwrap.AuxOutput) -> list[torch.Tensor]:
    return [out.primary, *out.aux]


def _zero_gradient_fusions(net: auxwrap.FusedNet, x: torch.Tensor) -> list[str]:
    """Fusions whose weight gets an identically zero gradient from a loss on every output."""
    net.train()
    sum(t.sum() for t in _tensors(net(x))).backward()
    return [name for name, f in net.fusions.items() if f.weight.weight.grad is None or not f.weight.weight.grad.any()]


@pytest.mark.parametrize("vit", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
@pytest.mark.parametrize("vit_is_primary", [True, False])
def test_every_fusion_weight_gets_a_gradient_between_maps_and_class_token_vits(vit, vit_is_primary):
    """A ViT's loss reads its class token(s) only at the last block: a fusion from a map that wrote zeros
    there left its weight without gradient, forever (12 generated cases). Both directions, mode nas."""
    x = torch.randn(2, 3, 32, 32)
    models = (_vit(vit), _resnet())
    primary, aux = models if vit_is_primary else models[::-1]
    net = auxwrap.attach(primary, aux, "nas", example_inputs=(x,))
    assert _zero_gradient_fusions(net, x) == []


@pytest.mark.parametrize("vit", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_fusions_into_prefix_tokens_keep_the_original_outputs_at_init(vit):
    """I1: the weights still start at zero, so the prefix tokens' new source changes no output."""
    x = torch.randn(2, 3, 32, 32)
    vit_model, resnet = _vit(vit), _resnet()
    net = auxwrap.attach(resnet, vit_model, "nas", example_inputs=(x,), alpha_init=0.5)  # the ViT receives maps
    for training in (False, True):
        for model in (net, vit_model, resnet):
            model.train(training)
        with torch.no_grad():
            out = net(x)
            assert torch.equal(out.primary, resnet(x)) and torch.equal(out.aux[0], vit_model(x))
    assert all(not f.weight.weight.any() for f in net.fusions.values())


def test_prefix_tokens_read_the_pooled_map():
    source, dest = Point("nchw", 4), Point("tokens", 4, prefix=2, grid=(2, 2))
    x = torch.randn(3, 4, 4, 4)
    out = resize(x, source, dest, torch.zeros(3, 6, 4))
    assert out.shape == (3, 6, 4)
    assert torch.allclose(out[:, 0], x.mean((2, 3))) and torch.allclose(out[:, 1], x.mean((2, 3)))
    assert torch.allclose(out[:, 2:], torch.nn.functional.avg_pool2d(x, 2).flatten(2).transpose(1, 2))


def test_token_grid_infers_the_prefix_the_tensor_holds():
    assert token_grid(17, 1) == (1, (4, 4))
    assert token_grid(16, 1) == (0, (4, 4))  # XCiT: num_prefix_tokens=1, its blocks hold no class token
    assert token_grid(9, 5) == (5, (2, 2))   # four registers and a class token before a 2x2 grid
    assert token_grid(9, 1, aspect=(32, 64)) == (1, (2, 4))
    assert token_grid(24, None, aspect=(96, 64)) == (0, (6, 4))
    with pytest.raises(ValueError, match="do not form a grid"):
        token_grid(3, 0, aspect=(10, 70))


def test_xcit_blocks_without_a_class_token_fuse_with_maps():
    """All five timm XCiT models failed: num_prefix_tokens=1, but their blocks carry the grid alone."""
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    xcit = timm.create_model("xcit_nano_12_p8_224", img_size=32, depth=2, num_classes=5)
    resnet = _resnet()
    net = auxwrap.attach(xcit, resnet, "nas", example_inputs=(x,))
    taps = auxwrap.find_taps(auxwrap.trace(xcit), (x,))
    prefixes = {t.name: (t.prefix, t.grid) for t in taps}
    assert prefixes["blocks.0"] == (0, (4, 4)) and prefixes["cls_attn_blocks.0"] == (1, (4, 4))
    net.eval()
    xcit.eval()
    with torch.no_grad():
        assert torch.equal(net(x).primary, xcit(x))
    assert _zero_gradient_fusions(net, x) == []


def test_non_square_inputs_use_the_grid_of_their_aspect():
    """A 2x4 grid and a class token (9 tokens) is not a 3x3 grid without one."""
    x = torch.randn(2, 3, 32, 64)
    net = auxwrap.attach(_vit("vit_tiny_patch16_224", img_size=(32, 64)), _resnet(), "nas", example_inputs=(x,))
    points = {(t.prefix, t.grid) for t in auxwrap.find_taps(auxwrap.trace(net.primary), (x,))}
    assert points == {(1, (2, 4))}
    assert _zero_gradient_fusions(net, x) == []
