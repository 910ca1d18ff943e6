"""The fusion node of Aux-NAS (Eq. 13/14) and the resizing that brings a source to its destination.

At destination point i, from the sources j of one other branch::

    R_i = R~_i + W_i . concat_j(alpha_j * resize(S_j))

W_i is a 1x1 convolution (NCHW maps) or a linear layer (channels-last maps, tokens, vectors),
zero-initialised and bias-free, so at step 0 the fused network computes exactly the original
branches. Where the destination ends a conv -> norm -> activation unit, R~_i is the conv output and
the backbone's own norm and activation follow the fusion (Eq. 13 as written); elsewhere they are
identity.

With ``fusion_rank`` (an option, not the default; :func:`check_fusion_rank`, :func:`low_rank`) W_i = B . A
has rank r: A (bias-free, torch's default init) projects the concatenated sources to r channels, which is
the sum of one projection A_j per source, and B (bias-free, zero-initialised, so step 0 is still exact) maps
those r channels to the destination's: r * (sources' channels + C) multiply-adds per position instead of
sources' channels * C. Summing the projected sources costs less than concatenating them (then B would read
n_sources * r channels) and is the plain rank-r factorisation of W.

The gates (DESIGN.md §2): each ``alpha_j = map(theta_j) * ceiling * live_j`` with a learnable ``theta``:

- ``gate="sigmoid"`` (the authors'): ``map = sigmoid``. Its gradient is positive everywhere, so no gate
  is ever stuck, and with Adam (which normalises the step) a gate moves however small its gradient.
- ``gate="clamp"``: ``map`` = clamp to [0, 1] in the forward pass with the identity as its gradient
  (straight-through), ``theta`` projected back to [0, 1] after every step: a gate can sit at exactly 0
  or 1 and still receive the task's gradient.

``live`` (a buffer, 1 or 0 per source) is how a link is cut: at 0 the gate is exactly 0 whatever
``theta`` is, so cutting a link whose gate was already small changes nothing. ``ceiling`` (a scalar
buffer, 1 unless :class:`auxwrap.Search` lowers it with ``decay="linear"``) bounds every gate of the
fusion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from .analysis import NCHW, NHWC, TOKENS, VECTOR
from .errors import AuxwrapArgumentError, argument_error, check_int, check_real, is_integer, is_real


@dataclass(frozen=True)
class Point:
    """What the fusion needs to know of a point's output: layout, channels, token prefix and grid."""

    layout: str
    channels: int
    prefix: int = 0                    # class/distillation/register tokens before the grid (tokens)
    grid: tuple[int, int] | None = None  # (h, w) of the token grid on the example inputs (tokens)


def token_grid(n_tokens: int, prefix: int | None, aspect: tuple[int, int] | None = None
               ) -> tuple[int, tuple[int, int]]:
    """Prefix count and (h, w) grid of ``n_tokens`` tokens: the grid has the ``aspect`` (h, w) of the input
    image (square where it is not known). ``prefix`` (a model's ``num_prefix_tokens``) is tried first, then
    0 to 8: a model attribute is not proof that a tensor carries those tokens (XCiT's blocks hold none)."""
    candidates = ([prefix] if prefix is not None else []) + list(range(0, min(n_tokens, 9)))
    for p in candidates:
        grid = _grid_of_aspect(n_tokens - p, aspect or (1, 1))
        if grid is not None:
            return p, grid
    raise ValueError(f"{n_tokens} tokens do not form a grid of aspect {aspect or (1, 1)} after {prefix} "
                     "or 0 to 8 prefix tokens")


def _grid_of_aspect(n: int, aspect: tuple[int, int]) -> tuple[int, int] | None:
    """The (h, w) with h * w = n and h : w = aspect, if there is one."""
    ah, aw = aspect
    if n <= 0 or ah <= 0 or aw <= 0:
        return None
    h = math.isqrt(n * ah // aw) if (n * ah) % aw == 0 else 0
    for candidate in (h, h + 1):  # isqrt rounds down
        if candidate > 0 and n % candidate == 0 and candidate * aw == (n // candidate) * ah:
            return candidate, n // candidate
    return None


def to_map(x: torch.Tensor, point: Point) -> torch.Tensor:
    """A spatial source as an NCHW map."""
    if point.layout == NCHW:
        return x
    if point.layout == NHWC:
        return x.permute(0, 3, 1, 2)
    h, w = _grid(x.shape[1] - point.prefix, point.grid)
    return x[:, point.prefix:].transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


def resize(x: torch.Tensor, source: Point, dest: Point, like: torch.Tensor) -> torch.Tensor:
    """Bring source ``x`` to the layout and size of the destination tensor ``like``."""
    if dest.layout == VECTOR:
        return x
    if dest.layout == NCHW:
        return resize_map(to_map(x, source), like.shape[-2:])
    if dest.layout == NHWC:
        if source.layout == NHWC and x.shape[1:3] == like.shape[1:3]:
            return x
        return resize_map(to_map(x, source), like.shape[1:3]).permute(0, 2, 3, 1)
    if source.layout == TOKENS and source.prefix == dest.prefix and x.shape[1] == like.shape[1]:
        return x
    # tokens through the destination's grid; its prefix tokens are the source's where they match, else the
    # source's mean over its grid (zeros there would leave the weights that a class token's loss reaches, as at
    # a ViT's last block, without any gradient)
    h, w = _grid(like.shape[1] - dest.prefix, dest.grid)
    source_map = to_map(x, source)
    grid = resize_map(source_map, (h, w)).flatten(2).transpose(1, 2)
    if dest.prefix == 0:
        return grid
    if source.layout == TOKENS and source.prefix == dest.prefix:
        prefix = x[:, :dest.prefix]
    else:
        # the mean as a pool over the whole map: its gradient keeps a channels-last source's memory format
        # (the gradients of .mean((2, 3)) and adaptive_avg_pool2d come back NCHW, and turn the source's NCHW)
        pooled = F.avg_pool2d(source_map, tuple(source_map.shape[-2:])).flatten(1)
        prefix = pooled.unsqueeze(1).expand(-1, dest.prefix, -1)
    return torch.cat([prefix, grid], dim=1)


def resize_map(x: torch.Tensor, size) -> torch.Tensor:  # noqa: ANN001
    """Bilinear resize of an NCHW map to ``size`` (h, w); the map itself where it already fits."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _grid(n: int, example: tuple[int, int] | None) -> tuple[int, int]:
    if example is not None and example[0] * example[1] == n:
        return example
    side = math.isqrt(n)
    if side * side != n:
        raise RuntimeError(f"auxwrap: {n} grid tokens do not form the example's {example} grid or a square one")
    return side, side


GATES = ("sigmoid", "clamp")
DEFAULT_GATE = "sigmoid"
#: sigmoid gates start at most this close to 0 or 1: ``alpha_init=0`` gives the authors' 0.001, a gate Adam can
#: still open within a few hundred steps (at 1e-6 it would take thousands)
SIGMOID_MARGIN = 1e-3


def check_gate(gate: object) -> str:
    if gate not in GATES:
        raise AuxwrapArgumentError(
            f"gate={gate!r}: use 'sigmoid' (alpha = sigmoid(theta), the authors' form) or 'clamp' (alpha = theta "
            "clamped to [0, 1] with a straight-through gradient).")
    return gate


FUSION_RANK_FIX = ("pass fusion_rank=None (full rank, the default), an int r >= 1 (r channels at every fusion) or a "
                   "fraction in (0, 1] of each destination's channels, e.g. 0.25 for C/4")


def check_fusion_rank(fusion_rank: object) -> int | float | None:
    """``fusion_rank`` as given where it is valid: None (full rank), an int >= 1 (that rank at every fusion) or
    a float in (0, 1] (that fraction of each destination's channels; ``1`` is rank 1, ``1.0`` all of C)."""
    if fusion_rank is None:
        return None
    if is_integer(fusion_rank):
        return check_int("fusion_rank", fusion_rank, 1, allowed="None, an int >= 1 or a float in (0, 1]",
                         fix=FUSION_RANK_FIX)
    if is_real(fusion_rank):
        return check_real("fusion_rank", fusion_rank, 0.0, 1.0, low_open=True,
                          allowed="None, an int >= 1 or a float in (0, 1]", fix=FUSION_RANK_FIX)
    raise argument_error("fusion_rank", fusion_rank, "None, an int >= 1 or a float in (0, 1]", fix=FUSION_RANK_FIX)


def low_rank(fusion_rank: int | float | None, in_channels: int, out_channels: int) -> int | None:
    """The rank r of a fusion from ``in_channels`` source channels to ``out_channels`` (``fusion_rank`` checked
    by :func:`check_fusion_rank`: an int r, or a fraction of ``out_channels`` rounded up, at least 1); None (full
    rank) where r channels would cost at least the full W: ``r * (in + out) >= in * out`` multiply-adds per
    position, so a low-rank fusion never costs more than the full one."""
    if fusion_rank is None:
        return None
    # a fraction is rounded before ceil: 0.07 * 100 is 7.000000000000001 in floating point, and 7 % of 100 is 7
    rank = int(fusion_rank) if is_integer(fusion_rank) else max(1, math.ceil(round(fusion_rank * out_channels, 9)))
    return rank if rank * (in_channels + out_channels) < in_channels * out_channels else None


def _channel_map(layout: str, in_channels: int, out_channels: int, init: bool) -> nn.Module:
    """A bias-free 1x1 convolution (NCHW) or linear layer (the channels last) from ``in_channels`` to
    ``out_channels``; torch's default init where ``init``, else left uninitialised (:func:`skip_init`)."""
    layer, args = nn.Linear, (in_channels, out_channels)
    if layout == NCHW:
        layer, args = nn.Conv2d, (*args, 1)
    return layer(*args, bias=False) if init else skip_init(layer, *args, bias=False)


class Fusion(nn.Module):
    """``dest + W . concat(alpha_j * resize(source_j))`` at one point, from one other branch.

    Args:
        sources: the source points, in the order their tensors are passed to ``forward``.
        dest: the destination point.
        gate_init: initial gate value of every source; ``None`` for fixed gates of 1 (Aux-G).
        gate: how a gate value comes from its parameter: ``"sigmoid"`` or ``"clamp"`` (see the module doc).
        rank: ``fusion_rank`` (:func:`check_fusion_rank`); the fusion's own rank is :func:`low_rank` of it.

    ``weight`` is W (full rank), or B of W = B . A (low rank, :attr:`rank` r), both zero-initialised;
    ``reduce`` is A (None at full rank), from the concatenated source channels to r.
    """

    def __init__(self, sources: list[Point], dest: Point, gate_init: float | None, gate: str = DEFAULT_GATE,
                 rank: int | float | None = None):
        super().__init__()
        self.sources = list(sources)
        self.dest = dest
        in_channels = sum(s.channels for s in sources)
        self.rank = low_rank(check_fusion_rank(rank), in_channels, dest.channels)
        self.reduce = None if self.rank is None else _channel_map(dest.layout, in_channels, self.rank, init=True)
        # skip_init: the random init would be overwritten by zeros anyway
        self.weight = _channel_map(dest.layout, in_channels if self.rank is None else self.rank, dest.channels,
                                   init=False)
        nn.init.zeros_(self.weight.weight)
        self.gate_map = check_gate(gate)
        self.gate = None
        if gate_init is not None:
            self.gate = nn.Parameter(torch.empty(len(sources)))
            self.register_buffer("live", torch.ones(len(sources)))
            self.register_buffer("ceiling", torch.ones(()))
            with torch.no_grad():  # open and trainable even at 0 or 1 (set_gates(0.0) would cut instead)
                self.gate.copy_(self._theta(torch.tensor(float(gate_init))).expand_as(self.gate))

    # ------------------------------------------------------------------ gates

    def gate_values(self) -> torch.Tensor:
        """The gates alpha in [0, 1], differentiable w.r.t. :attr:`gate` (ones for fixed gates)."""
        if self.gate is None:
            return torch.ones(len(self.sources), device=self.weight.weight.device)
        theta = self.gate
        if self.gate_map == "sigmoid":
            mapped = torch.sigmoid(theta)
        else:  # straight-through clamp: the bounds in the forward pass, the identity in the backward pass
            mapped = theta + (theta.clamp(0.0, 1.0) - theta).detach()
        return mapped * self.ceiling * self.live

    def gates(self) -> torch.Tensor:
        """The gate values now, detached."""
        return self.gate_values().detach()

    @torch.no_grad()
    def set_gates(self, value: float | torch.Tensor) -> None:
        """Set the gates to ``value`` in [0, 1] (one number, or one per source); a gate set to exactly 0 is
        cut (see :meth:`cut`), any other value opens it again. The ceiling is left as it is."""
        value = torch.as_tensor(value, dtype=self.gate.dtype, device=self.gate.device).expand_as(self.gate)
        self.gate.copy_(self._theta(value))
        self.live.copy_((value != 0).to(self.live.dtype))

    def _theta(self, value: torch.Tensor) -> torch.Tensor:
        """The parameter that gives gate ``value`` (sigmoid gates: as near 0 or 1 as a sigmoid gets)."""
        if self.gate_map == "sigmoid":
            return torch.logit(value.clamp(SIGMOID_MARGIN, 1.0 - SIGMOID_MARGIN))
        return value.clamp(0.0, 1.0)

    @torch.no_grad()
    def cut(self) -> None:
        """Cut every link of this fusion: its gates become exactly 0 and receive no gradient."""
        self.live.zero_()

    @torch.no_grad()
    def project(self) -> None:
        """Keep a clamp gate's parameter in [0, 1] (after an optimiser step); sigmoid gates need nothing."""
        if self.gate is not None and self.gate_map == "clamp":
            self.gate.clamp_(0.0, 1.0)

    def contribution(self, dest: torch.Tensor, *sources: torch.Tensor) -> torch.Tensor:
        """``W . concat(alpha_j * resize(source_j))``: what this fusion adds to ``dest`` (low rank: B . A . concat)."""
        channel_dim = 1 if self.dest.layout == NCHW else -1
        features = torch.cat(self._gated_features(dest, sources), dim=channel_dim)
        return self.weight(features if self.reduce is None else self.reduce(features))

    def source_contributions(self, dest: torch.Tensor, *sources: torch.Tensor) -> list[torch.Tensor]:
        """What each source adds on its own: ``W_j . (alpha_j * resize(source_j))``; they sum to
        :meth:`contribution`."""
        features = self._gated_features(dest, sources)
        if self.dest.layout == NCHW:
            return [F.conv2d(f, self.source_weight(j)) for j, f in enumerate(features)]
        return [F.linear(f, self.source_weight(j)) for j, f in enumerate(features)]

    def source_weight(self, j: int) -> torch.Tensor:
        """The columns of W that read source ``j`` (low rank: the effective ``W_j = B . A_j``), in the layer's
        weight layout (``(C, C_j, 1, 1)`` for a 1x1 convolution, ``(C, C_j)`` for a linear layer)."""
        start = sum(s.channels for s in self.sources[:j])
        columns = slice(start, start + self.sources[j].channels)
        if self.reduce is None:
            return self.weight.weight[:, columns]
        a = self.reduce.weight[:, columns]
        w = self.weight.weight.flatten(1) @ a.flatten(1)
        return w.reshape(w.shape + a.shape[2:])

    def _gated_features(self, dest: torch.Tensor, sources: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        features = [resize(x, point, self.dest, dest) for x, point in zip(sources, self.sources, strict=True)]
        if self.gate is None:
            return features
        gates = self.gate_values()
        return [gates[j] * f for j, f in enumerate(features)]

    def forward(self, dest: torch.Tensor, *sources: torch.Tensor) -> torch.Tensor:
        return dest + self.contribution(dest, *sources)

    def extra_repr(self) -> str:
        gates = "fixed 1" if self.gate is None else f"learnable ({self.gate_map})"
        rank = "full rank" if self.rank is None else f"rank {self.rank}"
        return f"{len(self.sources)} sources -> {self.dest.layout} x{self.dest.channels}, {rank}, gates {gates}"
