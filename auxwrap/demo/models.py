"""Models by name, for the command line and the benchmarks: ``timm:resnet50``, ``torchvision:vgg16``.

Every model is built with random weights (``pretrained=False``): nothing is downloaded.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..errors import AuxwrapArgumentError

SOURCES = ("timm", "torchvision")


def build_model(spec: str, **kwargs: Any) -> nn.Module:
    """Build ``source:name`` (source ``timm`` or ``torchvision``; a bare name means timm).

    An unknown name raises :class:`~auxwrap.AuxwrapArgumentError` suggesting the closest known names.
    """
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
        known = model_names(source)
        if name not in known and name.partition(".")[0] not in known:  # timm: name.tag is a model's weights
            raise AuxwrapArgumentError(unknown_model_message(source, name, known)) from error
        raise AuxwrapArgumentError(f"cannot build {spec!r}: {error}") from error


def model_names(source: str) -> list[str]:
    """The model names ``source`` (``"timm"`` or ``"torchvision"``) knows."""
    if source == "timm":
        import timm

        return timm.list_models()
    import torchvision

    return torchvision.models.list_models()


def unknown_model_message(source: str, name: str, known: Sequence[str]) -> str:
    """``name`` is not a ``source`` model: the closest known names, or how to list them all."""
    close = difflib.get_close_matches(name.lower(), known, n=3)
    listing = "timm.list_models('*PATTERN*')" if source == "timm" else "torchvision.models.list_models()"
    if not close:
        return f"unknown {source} model {name!r}; {listing} lists the names it knows."
    best, *others = (f"{source}:{match}" for match in close)
    also = f" Also close: {', '.join(others)}." if others else ""
    return f"unknown {source} model {name!r}: did you mean {best}?{also} ({listing} lists the names it knows)"
