"""Models by name, for the command line and the benchmarks: ``timm:resnet50``, ``torchvision:vgg16``.

Every model is built with random weights (``pretrained=False``): nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import AuxwrapArgumentError

SOURCES = ("timm", "torchvision")


def build_model(spec: str, **kwargs: Any) -> nn.Module:
    """Build ``source:name`` (source ``timm`` or ``torchvision``; a bare name means timm)."""
    source, _, name = spec.rpartition(":")
    source = source or "timm"
    if source not in SOURCES:
        raise AuxwrapArgumentError(f"unknown model source {source!r} in {spec!r}; use one of {SOURCES}.")
    try:
        if source == "timm":
            import timm

            return timm.create_model(name, pretrained=False, **kwargs)
        import torchvision

        return torchvision.models.get_model(name, weights=None, **kwargs)
    except (RuntimeError, ValueError, KeyError) as error:
        raise AuxwrapArgumentError(f"cannot build {spec!r}: {error}") from error
