"""The auxiliary module of Liu et al. (2019): a light train-time branch on the primary's features.

``AuxModule`` needs no backbone of its own. At each fusion point of the primary it reads, an
adaptor (1x1 conv + BN + ReLU by default, 3x3 as an option) maps the feature to ``hidden``
channels; an aggregator carries a hidden state from point to point (``"sum"``: resize and add;
``"concat"``: resize, concatenate, project back), and a head makes the output. Its loss sends
hierarchical gradients into the primary at every point it reads; ``detach_primary()`` / ``prune()``
drop it like any auxiliary branch, so it costs nothing at inference.

It is attached like any auxiliary, ``auxwrap.attach(primary, auxwrap.AuxModule(num_outputs=10),
mode="grad")``, and reads the primary's points as the primary computes them (it never feeds back,
so it has no gates). Feature maps, channels-last maps, tokens (through their grid, prefix tokens
left out) and vectors (as 1x1 maps) are all read as NCHW maps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .analysis import VECTOR
from .errors import AuxwrapArgumentError, check_choice, check_int
from .fusion import Point, resize_map, to_map

ADAPTORS = ("1x1", "3x3")
AGGREGATES = ("sum", "concat")
HEADS = ("classifier", "dense")


class AuxModule(nn.Module):
    """An auxiliary branch made of adaptors on the primary's fusion points, an aggregator and a head.

    Args:
        num_outputs: outputs of the built-in head (classes, or channels of a dense map).
        head: ``"classifier"`` (global average pool + linear; the default), ``"dense"`` (1x1 conv,
            upsampled to the input's height and width), or your own module taking the final
            hidden map (B, hidden, h, w).
        adaptor: ``"1x1"`` (conv + BN + ReLU, Liu et al.) or ``"3x3"``.
        aggregate: ``"sum"`` or ``"concat"`` (concatenate, then a 1x1 projection back to ``hidden``).
        hidden: channels of the adaptors' outputs and of the hidden state.
        taps: the primary's points to read: ``"layer"``, ``"stage"`` or names; default: the
            ``taps`` given to attach() for the primary.
    """

    def __init__(self, num_outputs: int | None = None, head: str | nn.Module | None = None, adaptor: str = "1x1",
                 aggregate: str = "sum", hidden: int = 64, taps: str | Sequence[str] | None = None):
        super().__init__()
        head = "classifier" if head is None else head
        if isinstance(head, str):
            _check_choice("head", head, HEADS)
            check_int("num_outputs", num_outputs, 1, allowed="a positive int", why="classes or output channels",
                      fix=f"AuxModule(head={head!r}) needs num_outputs, e.g. num_outputs=10; or pass your own head")
        elif not isinstance(head, nn.Module):
            raise AuxwrapArgumentError(f"head must be 'classifier', 'dense' or an nn.Module, got {head!r}.")
        _check_choice("adaptor", adaptor, ADAPTORS)
        _check_choice("aggregate", aggregate, AGGREGATES)
        check_int("hidden", hidden, 1, allowed="a positive int")
        self.num_outputs, self.head_kind, self.adaptor_kind = num_outputs, head, adaptor
        self.aggregate, self.hidden, self.taps = aggregate, hidden, taps
        self.points: list[Point] = []
        self.adaptors = nn.ModuleList()
        self.projections = nn.ModuleList()
        self.head = head if isinstance(head, nn.Module) else None

    @property
    def bound(self) -> bool:
        return bool(self.points)

    def bind(self, points: Sequence[Point]) -> None:
        """Build the adaptors for the primary's points (attach() calls this once)."""
        if self.bound:
            raise AuxwrapArgumentError(
                "this AuxModule is already attached to a network; create a new AuxModule for each attach().")
        if not points:
            raise AuxwrapArgumentError("an AuxModule needs at least one fusion point of the primary to read.")
        self.points = list(points)
        kernel = 1 if self.adaptor_kind == "1x1" else 3
        for point in self.points:
            self.adaptors.append(nn.Sequential(
                nn.Conv2d(point.channels, self.hidden, kernel, padding=kernel // 2, bias=False),
                nn.BatchNorm2d(self.hidden), nn.ReLU()))
        if self.aggregate == "concat":
            self.projections.extend(nn.Conv2d(2 * self.hidden, self.hidden, 1) for _ in self.points[1:])
        if self.head is None:
            self.head = (nn.Linear(self.hidden, self.num_outputs) if self.head_kind == "classifier"
                         else nn.Conv2d(self.hidden, self.num_outputs, 1))

    def forward(self, x: torch.Tensor, *features: torch.Tensor) -> torch.Tensor:
        """``x``: the network's input (for the dense head's output size); ``features``: the primary's
        points, in depth order."""
        if len(features) != len(self.points):
            raise RuntimeError(f"AuxModule reads {len(self.points)} points, got {len(features)} features")
        state = None
        for i, (feature, point, adaptor) in enumerate(zip(features, self.points, self.adaptors, strict=True)):
            mapped = adaptor(_as_map(feature, point))
            if state is None:
                state = mapped
                continue
            state = resize_map(state, mapped.shape[-2:])
            state = state + mapped if self.aggregate == "sum" else self.projections[i - 1](
                torch.cat([state, mapped], dim=1))
        return self._head(x, state)

    def _head(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        if self.head_kind == "classifier":
            return self.head(state.mean((2, 3)))
        if self.head_kind == "dense":
            return resize_map(self.head(state), x.shape[-2:])
        return self.head(state)

    def extra_repr(self) -> str:
        return (f"reads {len(self.points)} points, adaptor={self.adaptor_kind}, aggregate={self.aggregate}, "
                f"hidden={self.hidden}")


def _as_map(feature: torch.Tensor, point: Point) -> torch.Tensor:
    if point.layout == VECTOR:
        return feature[:, :, None, None]
    return to_map(feature, point)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """:func:`auxwrap.errors.check_choice`, its fix written as ``name=value is not one of (...)``."""
    check_choice(name, value, choices, fix=f"{name}={value!r} is not one of {choices}")
