"""The architectures the tests run on: timm and torchvision models with random weights at small
input sizes, and a few plain custom modules. Each entry: (builder, input size)."""

from __future__ import annotations

import timm
import torch
import torchvision
from torch import nn

tv = torchvision.models


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResidualNet(nn.Module):
    """A stem, two residual blocks at one resolution, two at half of it, a linear head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block1, self.block2 = ResidualBlock(8), ResidualBlock(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.block3, self.block4 = ResidualBlock(16), ResidualBlock(16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.block2(self.block1(torch.relu(self.stem(x))))
        x = self.block4(self.block3(self.down(x)))
        return self.head(x.mean((2, 3)))


class DictNet(nn.Module):
    """Returns a dict of two heads; blocks shared by both."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(ResidualBlock(8), ResidualBlock(8), ResidualBlock(8))
        self.cls = nn.Linear(8, 5)
        self.seg = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        x = self.blocks(torch.relu(self.stem(x)))
        return {"logits": self.cls(x.mean((2, 3))), "mask": self.seg(x)}


def sequential_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def timm_model(name: str, **kwargs):
    return lambda: timm.create_model(name, pretrained=False, **kwargs)


#: name -> (builder, input size, layer points, stage points; None where no stages)
ZOO = {
    "tv_vgg16": (tv.vgg16, 32, 15, 5),
    "tv_vgg16_bn": (tv.vgg16_bn, 32, 15, 5),
    "tv_resnet18": (tv.resnet18, 64, 8, 4),
    "tv_resnet50": (tv.resnet50, 64, 16, 4),
    "timm_resnet50": (timm_model("resnet50"), 64, 16, 4),
    "timm_efficientnet_b0": (timm_model("efficientnet_b0"), 64, 16, 5),
    "tv_mobilenet_v3_large": (tv.mobilenet_v3_large, 64, 18, 5),
    "timm_mobilenetv3_large_100": (timm_model("mobilenetv3_large_100"), 64, 15, 5),
    "timm_convnext_tiny": (timm_model("convnext_tiny"), 64, 18, 4),
    "timm_regnetx_002": (timm_model("regnetx_002"), 64, 13, 4),
    "tv_densenet121": (tv.densenet121, 64, 4, 4),
    "timm_vit_base": (timm_model("vit_base_patch16_224", img_size=32), 32, 12, None),
    "timm_deit_tiny_distilled": (timm_model("deit_tiny_distilled_patch16_224", img_size=32), 32, 12, None),
    "timm_swin_tiny": (timm_model("swin_tiny_patch4_window7_224", img_size=64, window_size=2), 64, 12, 4),
    "sequential_cnn": (sequential_cnn, 16, 3, 2),
    "residual_net": (ResidualNet, 16, 4, 2),
    "dict_net": (DictNet, 16, 3, None),
}


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    builder, size, _, _ = ZOO[name]
    model = builder().eval()
    return model, torch.randn(2, 3, size, size)


def _no_dropout(name, **kwargs):
    return lambda: timm.create_model(name, pretrained=False, drop_rate=0.0, drop_path_rate=0.0, **kwargs)


# (builder, input size); dropout and drop-path off so that train-mode outputs are deterministic
ARCHS = {
    "tv_resnet18": (lambda: tv.resnet18(num_classes=10), 32),
    "tv_vgg11_bn": (lambda: tv.vgg11_bn(num_classes=10, dropout=0.0), 32),
    "timm_resnet50": (_no_dropout("resnet50", num_classes=10), 64),
    "timm_efficientnet_b0": (_no_dropout("efficientnet_b0", num_classes=10), 64),
    "tv_mobilenet_v3_small": (lambda: tv.mobilenet_v3_small(num_classes=10, dropout=0.0), 64),
    "timm_convnext_atto": (_no_dropout("convnext_atto", num_classes=10), 64),
    "timm_regnetx_002": (_no_dropout("regnetx_002", num_classes=10), 64),
    "tv_densenet121": (lambda: tv.densenet121(num_classes=10), 64),
    "timm_deit_tiny": (_no_dropout("deit_tiny_patch16_224", img_size=32, num_classes=10), 32),
    "timm_swin_tiny": (_no_dropout("swin_tiny_patch4_window7_224", img_size=64, window_size=2, num_classes=10), 64),
    "sequential_cnn": (sequential_cnn, 16),
    "dict_net": (DictNet, 16),
}
# mixed pairs: maps with maps of another depth, tokens with maps both ways
PAIRS = {
    "resnet18+vgg11_bn": ("tv_resnet18", "tv_vgg11_bn"),
    "deit_tiny+resnet18": ("timm_deit_tiny", "tv_resnet18"),
    "resnet18+deit_tiny": ("tv_resnet18", "timm_deit_tiny"),
    "swin_tiny+convnext_atto": ("timm_swin_tiny", "timm_convnext_atto"),
}


def make(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A fresh model of ARCHS (seeded) and an input batch for it."""
    builder, size = ARCHS[name]
    torch.manual_seed(0)
    return builder(), torch.randn(2, 3, size, size)
