"""Hypothesis strategies for the property tests: small generated architectures and attach() options.

A strategy draws a *spec* (a frozen dataclass: printable, shrinkable, and evaluable as a reproducer),
and :func:`build` turns a spec into a fresh ``nn.Module`` with seeded weights. Every generated module
is fx-traceable (no data-dependent control flow) and dropout-free, takes ``(B, 3, 16, 16)`` inputs and
returns one tensor.

Families:

- ``CNNSpec``: a conv -> norm -> activation stem, then 2-4 blocks: plain units, stride-2 units,
  residual blocks (``out + x`` or in-place ``out.add_(x)``: fx traces ``out += x`` as a plain add),
  two-way branches (concatenated or summed), depthwise-separable blocks (with or without a residual),
  one unit applied twice (``shared_unit``: its conv and norm have two call sites), two convs sharing
  one norm module (``shared_norm``) and a unit whose forward keeps state (``recorder``: caches its
  output on ``self.last``, counts calls in a buffer, in place); norm BatchNorm (affine or not),
  timm's BatchNormAct2d (norm and activation in one opaque module), GroupNorm, LayerNorm over
  channels (a permute around ``F.layer_norm``, as timm's ``LayerNorm2d``), ``nn.Identity`` or none;
  convs with or without a bias before their norm; activation ReLU, in-place ReLU, functional ReLU,
  GELU or SiLU; head pooled linear (``cls``), pooled linear -> [BatchNorm1d] -> ReLU -> linear
  (``mlp``: vector fusion points), a 1x1 conv map (``dense``) or a transposed conv (grouped or not)
  -> norm -> activation back to full resolution, then a 1x1 conv (``dense_up*``); the cls/mlp head an
  ``nn.Sequential`` or a class of its own.
- ``TokenSpec``: a stride-4 patch embedding (a 4x4 grid of tokens), an optional class token and a
  position embedding, 2-3 pre-norm blocks (an attention-like mixer written out with matmuls, fused
  ``F.scaled_dot_product_attention``, or none; then an MLP), LayerNorm or none; head pooled / class
  token linear (``cls``) or the token grid as a map through a 1x1 conv (``dense``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from timm.layers import BatchNormAct2d
from torch import nn

#: input batch: 4 rather than 2 so that a train-mode BatchNorm1d on (B, C) vectors still passes a
#: gradient (with 2 samples per channel its input gradient is exactly zero, a fact of the arithmetic)
BATCH, SIZE = 4, 16
NORMS = ("bn", "bn_noaffine", "bnact", "gn", "ln", "identity", "none")
ACTS = ("relu", "relu_inplace", "f_relu", "gelu", "silu")
CNN_BLOCKS = ("plain", "down", "residual", "residual_inplace", "branch_cat", "branch_add", "depthwise",
              "depthwise_residual", "shared_unit", "shared_norm", "recorder")
TOKEN_MIXERS = ("attn", "sdpa", "none")
WIDTHS = (4, 6, 8, 12, 16)


@dataclass(frozen=True)
class CNNSpec:
    width: int
    norm: str
    act: str
    blocks: tuple[str, ...]
    head: str  # "cls" | "mlp" | "dense" | "dense_up" | "dense_up_grouped"
    conv_bias: bool = False  # a bias on convs (and the mlp head's linear) that a norm follows too
    seq_head: bool = True  # the cls/mlp head an nn.Sequential (as torchvision's classifiers), else its own class
    seed: int = 0


@dataclass(frozen=True)
class TokenSpec:
    width: int
    norm: str  # "ln" | "none"
    act: str   # "gelu" | "relu"
    mixer: str
    depth: int
    cls_token: bool
    head: str  # "cls" | "dense"
    seed: int = 0


@dataclass(frozen=True)
class Case:
    """One attach() call: the primary, K auxiliaries and the options."""

    primary: CNNSpec | TokenSpec
    aux: tuple[CNNSpec | TokenSpec, ...]
    mode: str
    window: int = 3
    window_form: str = "paper"
    gate: str = "sigmoid"
    flags: str = "train"  # the user's training flags at attach(): "train", "eval" or "mixed" (norms in eval)
    seed: int = 0

    def models(self) -> tuple[nn.Module, list[nn.Module]]:
        """Fresh primary and auxiliaries, with the training flags of ``flags``."""
        models = [build(self.primary), *(build(a) for a in self.aux)]
        for model in models:
            model.train(self.flags != "eval")
            if self.flags == "mixed":  # frozen norms, as when fine-tuning with BatchNorm statistics fixed
                for m in model.modules():
                    if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
                        m.eval()
        return models[0], models[1:]

    def inputs(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(1000 + self.seed)
        return torch.randn(BATCH, 3, SIZE, SIZE, generator=generator)


# ---------------------------------------------------------------------- strategies

seeds = st.integers(0, 3)


@st.composite
def cnn_specs(draw: st.DrawFn) -> CNNSpec:
    blocks = draw(st.lists(st.sampled_from(CNN_BLOCKS), min_size=2, max_size=4))
    if blocks.count("down") > 2:  # keep maps at 4x4 or more
        blocks = [b for b in blocks if b != "down"][:2] + ["down", "down"]
    return CNNSpec(width=draw(st.sampled_from(WIDTHS)), norm=draw(st.sampled_from(NORMS)),
                   act=draw(st.sampled_from(ACTS)), blocks=tuple(blocks),
                   head=draw(st.sampled_from(("cls", "mlp", "dense", "dense_up", "dense_up_grouped"))),
                   conv_bias=draw(st.booleans()), seq_head=draw(st.booleans()), seed=draw(seeds))


@st.composite
def token_specs(draw: st.DrawFn) -> TokenSpec:
    return TokenSpec(width=draw(st.sampled_from((4, 8, 12, 16))), norm=draw(st.sampled_from(("ln", "none"))),
                     act=draw(st.sampled_from(("gelu", "relu"))), mixer=draw(st.sampled_from(TOKEN_MIXERS)),
                     depth=draw(st.integers(2, 3)), cls_token=draw(st.booleans()),
                     head=draw(st.sampled_from(("cls", "dense"))), seed=draw(seeds))


architectures = st.one_of(cnn_specs(), token_specs())


@st.composite
def cases(draw: st.DrawFn, modes: tuple[str, ...] = ("grad", "nas")) -> Case:
    """A primary and K in {1, 2} auxiliaries, each the primary's architecture with other weights, one of the
    other family (maps with tokens), or any."""
    primary = draw(architectures)
    other_family = token_specs() if isinstance(primary, CNNSpec) else cnn_specs()
    aux = []
    for k in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(("same", "other", "any")))
        if kind == "same":
            aux.append(_reseeded(primary, 10 + k))
        else:
            aux.append(draw(other_family if kind == "other" else architectures))
    return Case(primary, tuple(aux), mode=draw(st.sampled_from(modes)), window=draw(st.sampled_from((1, 3))),
                window_form=draw(st.sampled_from(("paper", "code", "group"))),
                gate=draw(st.sampled_from(("sigmoid", "clamp"))),
                flags=draw(st.sampled_from(("train", "eval", "mixed"))), seed=draw(seeds))


def _reseeded(spec: CNNSpec | TokenSpec, seed: int) -> CNNSpec | TokenSpec:
    return dataclasses.replace(spec, seed=seed)


# ---------------------------------------------------------------------- building

def build(spec: CNNSpec | TokenSpec) -> nn.Module:
    """A fresh module for ``spec``, its weights drawn from ``spec.seed`` (the global RNG is left alone).

    Norm-free ReLU networks this small can be born dead (every unit of a layer negative on every
    input: no gradient reaches any weight); such a draw is redrawn from the next seeds, so that a zero
    gradient in a property test is the library's doing, not the generator's.
    """
    with torch.random.fork_rng(devices=[]):
        for attempt in range(8):
            torch.manual_seed(spec.seed + 1000 * attempt)
            model = GenCNN(spec) if isinstance(spec, CNNSpec) else GenTokens(spec)
            _perturb_norms(model)
            if _alive(model):
                break
    return model


def _alive(model: nn.Module) -> bool:
    """Whether every conv and linear weight gets a non-zero gradient from the output on a probe batch."""
    probe = copy.deepcopy(model).train()
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    probe(x).square().mean().backward()
    return all(m.weight.grad is not None and bool(m.weight.grad.any()) for m in probe.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)))


def _perturb_norms(model: nn.Module) -> None:
    """Non-trivial norm affine parameters and running statistics, so BN folding does real arithmetic."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, ChannelLayerNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of an NCHW map (as timm's LayerNorm2d): permute, layer_norm, permute."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), (self.weight.numel(),), self.weight, self.bias, 1e-6)
        return x.permute(0, 3, 1, 2)


class FunctionalReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


def _norm(kind: str, channels: int, act: str | None = None) -> nn.Module | None:
    """The norm module of ``kind``; ``act`` is the activation that follows, which ``bnact`` (timm's
    BatchNormAct2d, one opaque module) applies itself."""
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "bnact":
        return BatchNormAct2d(channels, apply_act=act is not None, act_layer=_ACT_CLASSES[act or "relu"],
                              inplace=act == "relu_inplace")
    if kind == "bn_noaffine":
        return nn.BatchNorm2d(channels, affine=False)
    if kind == "gn":
        return nn.GroupNorm(2, channels)
    if kind == "ln":
        return ChannelLayerNorm(channels)
    if kind == "identity":
        return nn.Identity()
    return None


def _act(kind: str) -> nn.Module:
    return {"relu": nn.ReLU, "relu_inplace": lambda: nn.ReLU(inplace=True), "f_relu": FunctionalReLU,
            "gelu": nn.GELU, "silu": nn.SiLU}[kind]()


_ACT_CLASSES = {"relu": nn.ReLU, "relu_inplace": nn.ReLU, "f_relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def _norm_and_act(s: CNNSpec, channels: int, act: bool = True) -> tuple[nn.Module, nn.Module]:
    """Norm and activation modules of a unit (``nn.Identity`` where there is none; ``bnact`` brings its own)."""
    n = _norm(s.norm, channels, s.act if act else None)
    own_act = act and s.norm != "bnact"
    return n if n is not None else nn.Identity(), _act(s.act) if own_act else nn.Identity()


def _bias(s: CNNSpec) -> bool:
    """A conv bias where the spec asks for one, and wherever no real norm follows."""
    return s.conv_bias or s.norm in ("identity", "none")


class ConvUnit(nn.Module):
    """conv -> [norm] -> [activation]; norm, activation and conv bias as the spec says."""

    def __init__(self, cin: int, cout: int, s: CNNSpec, act: bool = True, k: int = 3, stride: int = 1,
                 groups: int = 1):
        super().__init__()
        n = _norm(s.norm, cout, s.act if act else None)
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=_bias(s))
        if n is not None:
            self.norm = n
        if act and s.norm != "bnact":
            self.act = _act(s.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if hasattr(self, "norm"):
            x = self.norm(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


class Residual(nn.Module):
    def __init__(self, c: int, s: CNNSpec, inplace_add: bool):
        super().__init__()
        self.inplace_add = inplace_add
        self.unit1 = ConvUnit(c, c, s)
        self.unit2 = ConvUnit(c, c, s, act=False)
        self.act = _act(s.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.unit2(self.unit1(x))
        out = out.add_(x) if self.inplace_add else out + x
        return self.act(out)


class Branch(nn.Module):
    def __init__(self, c: int, s: CNNSpec, cat: bool):
        super().__init__()
        self.cat = cat
        self.a = ConvUnit(c, c, s, k=3)
        self.b = ConvUnit(c, c, s, k=1)
        self.proj = ConvUnit(2 * c if cat else c, c, s, k=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a(x), self.b(x)
        return self.proj(torch.cat([a, b], dim=1) if self.cat else a + b)


class Depthwise(nn.Module):
    def __init__(self, c: int, s: CNNSpec, residual: bool):
        super().__init__()
        self.residual = residual
        self.dw = ConvUnit(c, c, s, k=3, groups=c)
        self.pw = ConvUnit(c, c, s, act=not residual, k=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pw(self.dw(x))
        return out + x if self.residual else out


class SharedUnit(nn.Module):
    """One conv -> norm -> activation unit applied twice (shared weights, as in a recurrent refinement)."""

    def __init__(self, c: int, s: CNNSpec):
        super().__init__()
        self.unit = ConvUnit(c, c, s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unit(self.unit(x))


class SharedNorm(nn.Module):
    """Two convs, each followed by the same norm module (two call sites of one norm)."""

    def __init__(self, c: int, s: CNNSpec):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=_bias(s))
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=_bias(s))
        self.norm, self.act = _norm_and_act(s, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv2(self.act(self.norm(self.conv1(x))))))


class Recorder(nn.Module):
    """A unit whose forward keeps state, as feature-caching code does: ``self.last = y`` (fx cannot replay
    it: auxwrap warns), and an in-place call counter in a buffer, computed from the input so that the
    traced graph holds (and replays) the update."""

    def __init__(self, c: int, s: CNNSpec):
        super().__init__()
        self.unit = ConvUnit(c, c, s)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.unit(x)
        self.last = y
        self.calls.add_(y.new_ones((), dtype=torch.long))
        return y


class UpHead(nn.Module):
    """A dense head back up to the input resolution: transposed conv -> norm -> activation -> 1x1 conv."""

    def __init__(self, c: int, s: CNNSpec, scale: int, groups: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(c, c, scale, stride=scale, groups=groups, bias=_bias(s))
        self.norm, self.act = _norm_and_act(s, c)
        self.out = nn.Conv2d(c, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.norm(self.up(x))))


class GenCNN(nn.Module):
    def __init__(self, spec: CNNSpec):
        super().__init__()
        c = spec.width
        self.stem = ConvUnit(3, c, spec)
        blocks = []
        for kind in spec.blocks:
            if kind == "plain":
                blocks.append(ConvUnit(c, c, spec))
            elif kind == "down":
                blocks.append(ConvUnit(c, min(2 * c, 16), spec, stride=2))
                c = min(2 * c, 16)
            elif kind.startswith("residual"):
                blocks.append(Residual(c, spec, inplace_add=kind == "residual_inplace"))
            elif kind == "shared_unit":
                blocks.append(SharedUnit(c, spec))
            elif kind == "shared_norm":
                blocks.append(SharedNorm(c, spec))
            elif kind == "recorder":
                blocks.append(Recorder(c, spec))
            elif kind.startswith("branch"):
                blocks.append(Branch(c, spec, cat=kind == "branch_cat"))
            else:
                blocks.append(Depthwise(c, spec, residual=kind == "depthwise_residual"))
        self.blocks = nn.Sequential(*blocks)
        if spec.head == "dense":
            self.head = nn.Conv2d(c, 3, 1)
        elif spec.head.startswith("dense_up"):  # back to full resolution (2x where nothing went down)
            scale = max(2 ** spec.blocks.count("down"), 2)
            self.head = UpHead(c, spec, scale, groups=2 if spec.head == "dense_up_grouped" else 1)
        else:
            self.head = _pooled_head(c, spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def _pooled_head(c: int, spec: CNNSpec) -> nn.Module:
    if spec.head == "cls":
        layers = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 5)]
    else:
        bn = [nn.BatchNorm1d(c, affine=spec.norm != "bn_noaffine")] if spec.norm.startswith("bn") else []
        layers = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, c, bias=spec.conv_bias or not bn), *bn,
                  nn.ReLU(), nn.Linear(c, 5)]
    return nn.Sequential(*layers) if spec.seq_head else Head(layers)


class Head(nn.Module):
    """The same layers as an nn.Sequential head, in a class of its own."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Mixer(nn.Module):
    """Single-head token mixing: written out with matmuls, or through fused scaled_dot_product_attention."""

    def __init__(self, c: int, fused: bool):
        super().__init__()
        self.fused = fused
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.scale = c ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1) @ v
        return self.proj(out)


class TokenBlock(nn.Module):
    def __init__(self, c: int, norm: str, act: str, mixer: str):
        super().__init__()
        make_norm = (lambda: nn.LayerNorm(c)) if norm == "ln" else nn.Identity
        if mixer != "none":
            self.norm1 = make_norm()
            self.mix = Mixer(c, fused=mixer == "sdpa")
        self.norm2 = make_norm()
        self.fc1 = nn.Linear(c, 2 * c)
        self.act = nn.GELU() if act == "gelu" else nn.ReLU()
        self.fc2 = nn.Linear(2 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "mix"):
            x = x + self.mix(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class GenTokens(nn.Module):
    PATCH = 4

    def __init__(self, spec: TokenSpec):
        super().__init__()
        c = spec.width
        self.grid = SIZE // self.PATCH
        self.num_prefix_tokens = 1 if spec.cls_token else 0  # as timm's ViTs say it
        self.head_kind = spec.head
        self.patch_embed = nn.Conv2d(3, c, self.PATCH, self.PATCH)
        if spec.cls_token:
            self.cls_token = nn.Parameter(torch.randn(1, 1, c) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_prefix_tokens + self.grid ** 2, c) * 0.02)
        self.blocks = nn.Sequential(*[TokenBlock(c, spec.norm, spec.act, spec.mixer) for _ in range(spec.depth)])
        self.norm = nn.LayerNorm(c) if spec.norm == "ln" else nn.Identity()
        self.head = nn.Conv2d(c, 3, 1) if spec.head == "dense" else nn.Linear(c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.num_prefix_tokens:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm(self.blocks(x + self.pos_embed))
        if self.head_kind == "dense":
            grid = x[:, self.num_prefix_tokens:].transpose(1, 2)
            return self.head(grid.reshape(grid.shape[0], grid.shape[1], self.grid, self.grid))
        pooled = x[:, 0] if self.num_prefix_tokens else x.mean(dim=1)
        return self.head(pooled)
