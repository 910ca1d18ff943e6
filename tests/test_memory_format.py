"""Channels-last: a fused network converted with ``.to(memory_format=torch.channels_last)`` and fed channels-last
inputs keeps that format through its fusions, forward and backward: the fusions add no copy back to NCHW."""

from __future__ import annotations

import collections

import pytest
import timm
import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import auxwrap
from auxwrap.fusion import Point, resize

from .zoo import ResidualNet

pytestmark = pytest.mark.usefixtures("one_thread")

CL = torch.channels_last
COPIES = ("aten.clone.", "aten._to_copy.", "aten.copy_.", "aten.contiguous.")


def _channels_last(t: torch.Tensor) -> bool:
    """Strictly channels-last (not also NCHW-contiguous, as a map of one pixel or channel is)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=CL) and not t.is_contiguous()


def _nchw(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous() and not t.is_contiguous(memory_format=CL)


class FormatCopies(TorchDispatchMode):
    """Counts the ops that turn a channels-last input into a new NCHW tensor (views excluded), and the copies."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        name = str(func)
        inputs = [a for a in tree_leaves((args, kwargs)) if torch.is_tensor(a)]
        outputs = [o for o in tree_leaves(out) if torch.is_tensor(o)]
        if not func.is_view and any(map(_channels_last, inputs)) and any(map(_nchw, outputs)):
            self.ops[f"to NCHW: {name}"] += 1
        if name.startswith(COPIES):
            self.ops[f"copy: {name}"] += 1
        return out


def _train_step_ops(run) -> collections.Counter[str]:  # noqa: ANN001
    with FormatCopies() as mode:
        sum(t.float().sum() for t in run()).backward()
    return mode.ops


def _pair(kind: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "maps":
        return ResidualNet(4), ResidualNet(2), torch.randn(2, 3, 16, 16)
    # a ResNet and a ViT with a class token: maps into tokens (and the class token from the pooled map), and back
    vit = timm.create_model("deit_tiny_patch16_224", img_size=32, depth=2, num_classes=5, drop_rate=0.0)
    return torchvision.models.resnet18(num_classes=5), vit, torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("kind", ["maps", "maps+tokens"])
def test_fusions_add_no_copy_back_to_nchw(kind):
    """Forward and backward in train mode: the fused network makes no more format changes or copies than its
    two models run on their own (before the fix, each map feeding a class token got an NCHW gradient: 13 ops
    in this pair)."""
    primary, aux, x = _pair(kind)
    net = auxwrap.attach(primary, aux, mode="nas", example_inputs=(x,), alpha_init=0.5)
    with torch.no_grad():  # live links: every fusion computes, as in training
        for _, fusion in net.fusion_sites():
            fusion.weight.weight.normal_(0.0, 0.1)
    net = net.to(memory_format=CL).train()
    x = x.to(memory_format=CL)
    alone = _train_step_ops(lambda: (primary(x), aux(x)))
    fused = _train_step_ops(lambda: (lambda out: (out.primary, *out.aux))(net(x)))
    assert fused - alone == collections.Counter()


def test_every_map_fusion_outputs_channels_last():
    primary, aux, x = _pair("maps+tokens")
    net = auxwrap.attach(primary, aux, mode="nas", example_inputs=(x,), alpha_init=0.5).to(memory_format=CL)
    outputs = {}
    for name, fusion in net.fusions.items():
        fusion.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
    net(x.to(memory_format=CL))
    maps = {name: o for name, o in outputs.items() if _channels_last(o) or _nchw(o)}
    assert maps and all(_channels_last(o) for o in maps.values()), sorted(n for n, o in maps.items() if _nchw(o))


def test_class_tokens_from_a_channels_last_map_send_back_a_channels_last_gradient():
    """The pooled map that fills a destination's prefix tokens: its gradient keeps the source's format (the
    gradient of ``.mean((2, 3))`` came back NCHW and made the source's whole gradient NCHW)."""
    source, dest = Point("nchw", 4), Point("tokens", 4, prefix=1, grid=(2, 2))
    x = (torch.randn(2, 4, 6, 6).to(memory_format=CL) * 1).requires_grad_()
    inner = x * 1  # a non-leaf, as a feature map is: its gradient arrives as autograd made it
    seen = []
    inner.register_hook(seen.append)
    out = resize(inner, source, dest, torch.zeros(2, 5, 4))
    out[:, 0].sum().backward()  # the class token alone
    assert _channels_last(seen[0]), seen[0].stride()
    assert torch.allclose(out[:, 0], x.detach().mean((2, 3)), atol=1e-6)
