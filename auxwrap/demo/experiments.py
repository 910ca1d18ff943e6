"""A small training harness shared by ``python -m auxwrap demo`` and ``benchmarks/accuracy.py``.

Built-in models (random init, nothing downloaded) for the tasks of :mod:`auxwrap.demo.data`, and one
function, :func:`run`, that trains one method on one task and evaluates the *deployed* primary:

- ``"single"``: the primary alone.
- ``"aux-head"``: one shared encoder, two heads (the primary's model with an extra head for the
  auxiliary task); the deployed model drops the extra head.
- ``"aux-module"``: the auxiliary module of Liu et al. (2019), ``attach(primary, AuxModule(...), mode="grad",
  taps="stage")``: adaptors on the primary's stage outputs and a light head, no second backbone.
- ``"aux-g-stage"`` / ``"aux-g-layer"``: ``attach(primary, aux, mode="grad", taps="stage" | "layer")``.
- ``"aux-nas"``: ``attach(..., mode="nas")`` with :class:`auxwrap.Search` on :func:`auxwrap.search_loaders`
  (the README's recipe).
- ``"aux-nas+mto"``: Aux-NAS whose weight step is ``auxwrap.mto.backward(..., method=Config.mto)``.
- ``"aux-g-layer-rank"`` / ``"aux-nas-rank"``: Aux-G-Layer / Aux-NAS with low-rank fusions,
  ``attach(..., fusion_rank=Config.fusion_rank)`` (C/4 by default), to compare with full rank seed by seed.

Two protocols (``Config.protocol``, DESIGN.md §8). ``"scratch"``: every model starts from random init.
``"pretrained"`` (the paper's, Appendix C): the primary's model and the auxiliary model are first trained
alone for ``pretrain_epochs`` each (the Single recipe; :func:`pretrain`, cached per process), every method of
one seed starts from those same weights (parts without a single-task model, such as Aux-Head's head or the
Aux-Module, start fresh) and trains ``epochs`` more; "single" is the pretrained primary trained ``epochs`` more
alone, so every method's primary makes the same total number of weight steps.

Fairness: every method makes the same number of weight steps (``epochs * (n_train // batch_size)``, after
the same pretraining) with the same optimiser, learning-rate schedule and batch size. Aux-NAS reads one
batch from each half of :func:`auxwrap.search_loaders` per step (one for the gates, one for the weights), so
it cycles the halves twice per epoch: its weights see as many samples as everyone else's; its gates take as many
steps again. The primary is evaluated on the validation split after every epoch and the best state is
kept (for Aux-NAS only after the cut of the auxiliary -> primary gates, when the network *is* the
deployed primary); the test split is scored once, on the deployed model (``auxwrap.prune(net)``, or the
primary with its BatchNorms folded for the methods without a fused network).
"""

from __future__ import annotations

import copy
import functools
import itertools
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .. import mto
from ..attach import DEFAULT_ALPHA_INIT, attach
from ..auxmodule import AuxModule
from ..deploy import fold_module, prune
from ..errors import AuxwrapArgumentError, is_integer, is_real
from ..flops import count_flops, count_parameters
from ..fused import FusedNet
from ..fusion import DEFAULT_GATE
from ..plan import DEFAULT_WINDOW_FORM
from ..search import DEFAULT_DECAY, Search, search_loaders
from . import data

__all__ = [
    "FULL",
    "METHODS",
    "PROTOCOLS",
    "QUICK",
    "TASKS",
    "Config",
    "DigitNet",
    "Result",
    "SceneClassNet",
    "SceneNet",
    "Task",
    "TwoHeads",
    "dominant_object",
    "evaluate",
    "make_task",
    "method_label",
    "pretrain",
    "pretrain_epochs",
    "pretrained_parts",
    "run",
    "shared_config",
]

TASKS = ("digits", "scenes-seg", "scenes-normals", "scenes-few")
METHODS = ("single", "aux-head", "aux-module", "aux-g-stage", "aux-g-layer", "aux-g-layer-rank", "aux-nas",
           "aux-nas-rank", "aux-nas+mto")
#: the display names of the methods, as in the paper's tables
LABELS = {"single": "Single", "aux-head": "Aux-Head", "aux-module": "Aux-Module", "aux-g-stage": "Aux-G-Stage",
          "aux-g-layer": "Aux-G-Layer", "aux-g-layer-rank": "Aux-G-Layer rank {rank}", "aux-nas": "Aux-NAS",
          "aux-nas-rank": "Aux-NAS rank {rank}", "aux-nas+mto": "Aux-NAS + {mto}"}
#: the suffix of the methods with low-rank fusions (``attach(..., fusion_rank=Config.fusion_rank)``)
RANK_SUFFIX = "-rank"
#: ``Config.protocol``: every model from random init, or both single-task models pretrained first (the paper's)
PROTOCOLS = ("scratch", "pretrained")


# ---------------------------------------------------------------------------------------------- models

class Block(nn.Module):
    """A ResNet basic block: two 3x3 conv-BN, the shortcut added before the last ReLU (1x1 projection
    where the block changes stride or width)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.shortcut(x) + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


def _stage_widths(width: int) -> tuple[int, int, int]:
    """Channels of the encoder's three stages: width, 2x, 4x (the heads are built to match)."""
    return width, 2 * width, 4 * width


class Encoder(nn.Module):
    """A conv-BN-ReLU stem and three stages of ``blocks`` residual blocks (width, 2x, 4x channels; the
    2nd and 3rd stage halve the resolution)."""

    def __init__(self, in_channels: int, width: int = 16, blocks: int = 2, stem_stride: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, stem_stride, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        widths = _stage_widths(width)
        self.stages = nn.ModuleList(
            nn.Sequential(*(Block(widths[max(s - 1, 0)] if b == 0 else w, w, 2 if s and b == 0 else 1)
                            for b in range(blocks)))
            for s, w in enumerate(widths))
        self.widths = widths

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x


class ClassHead(nn.Module):
    """Global average pooling of the last stage and a linear classifier."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        return self.fc(features.mean((2, 3)))


class Up(nn.Module):
    """Decoder block: upsample 2x (bilinear), two 3x3 conv-BN-ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class DenseHead(nn.Module):
    """The decoder of an FCN: two :class:`Up` blocks back to the first stage's resolution, a 1x1 conv to the
    outputs, bilinear upsampling by ``scale`` (the encoder's stem stride) to the input resolution. No skip
    connections, so that every block is on the main path and each is a fusion point (``taps="layer"``)."""

    def __init__(self, widths: tuple[int, int, int], out_channels: int, scale: int = 1):
        super().__init__()
        self.up2 = Up(widths[2], widths[1])
        self.up1 = Up(widths[1], widths[0])
        self.out = nn.Conv2d(widths[0], out_channels, 1)
        self.scale = float(scale)

    def forward(self, features: Tensor) -> Tensor:
        y = self.out(self.up1(self.up2(features)))
        return F.interpolate(y, scale_factor=self.scale, mode="bilinear", align_corners=False)


class EncoderHead(nn.Module):
    """``head(encoder(x))``: the single-task model of every built-in task."""

    def __init__(self, encoder: Encoder, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


class DigitNet(EncoderHead):
    """A small ResNet for 1x16x16 digit pairs: 3 stages (16x16, 8x8, 4x4) of ``blocks`` basic blocks."""

    def __init__(self, num_classes: int = 10, width: int = 16, blocks: int = 2, in_channels: int = 1):
        encoder = Encoder(in_channels, width, blocks)
        super().__init__(encoder, ClassHead(encoder.widths[-1], num_classes))


class SceneClassNet(EncoderHead):
    """A small ResNet classifier for 3x32x32 scenes: stride-1 stem, 3 stages (32, 16, 8 pixels) of ``blocks``
    basic blocks, global average pooling and a linear layer."""

    def __init__(self, num_classes: int = 3, width: int = 16, blocks: int = 2, in_channels: int = 3):
        encoder = Encoder(in_channels, width, blocks)
        super().__init__(encoder, ClassHead(encoder.widths[-1], num_classes))


class SceneNet(EncoderHead):
    """A small encoder-decoder (FCN) for 3x64x64 scenes with per-pixel outputs (segmentation logits or
    normals): stride-2 stem, 3 stages (32, 16, 8 pixels) of ``blocks`` basic blocks, a 2-block decoder."""

    def __init__(self, out_channels: int, width: int = 16, blocks: int = 2, in_channels: int = 3):
        encoder = Encoder(in_channels, width, blocks, stem_stride=2)
        super().__init__(encoder, DenseHead(encoder.widths, out_channels, scale=2))


class TwoHeads(nn.Module):
    """Aux-Head: the primary's model with an extra head for the auxiliary task on its shared encoder."""

    def __init__(self, primary: EncoderHead, aux_head: nn.Module):
        super().__init__()
        self.primary = primary
        self.aux_head = aux_head

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.primary.encoder(x)
        return self.primary.head(features), self.aux_head(features)


# ---------------------------------------------------------------------------------------------- tasks

@dataclass(frozen=True)
class Config:
    """The training budget and model size of one run; the same for every method.

    ``n_train`` / ``n_val`` / ``n_test``: samples (None: 6000/2000/2000 digit pairs, 512/128/128 scenes,
    160/400/800 for ``"scenes-few"``). ``protocol``: ``"scratch"`` or ``"pretrained"`` (see the module's
    docstring); ``pretrain_epochs``: the epochs of each single-task pretraining (None: as many as ``epochs``).
    ``mto``: the :func:`auxwrap.mto.backward` method of ``"aux-nas+mto"``.

    Aux-NAS options, passed to :func:`auxwrap.attach` and :class:`auxwrap.Search`: ``taps`` (its fusion
    points), ``alpha_init`` (the initial gates: one value, or ``(aux_to_primary, primary_to_aux)``), ``gate``
    (the gate's form), ``window_form`` (which source points feed a fusion point; Aux-G-Stage/-Layer too),
    ``search_lr`` (the gates' Adam lr), ``l1`` (the final penalty weight; None: Search's default), ``decay``
    (the penalty's form), ``ramp`` (where the penalty's weight rises; the cut is at its end); ``fusion_rank``:
    the ``attach(fusion_rank=...)`` of the ``"-rank"`` methods (0.25: C/4; the other methods use full rank).
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    aux_weight: float = 1.0
    width: int = 16
    blocks: int = 2
    size: int = 64
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None
    protocol: str = "scratch"
    pretrain_epochs: int | None = None
    mto: str = "pcgrad-aux"
    taps: str = "layer"
    alpha_init: float | tuple[float, float] = DEFAULT_ALPHA_INIT
    window_form: str = DEFAULT_WINDOW_FORM
    gate: str = DEFAULT_GATE
    search_lr: float = 1e-2
    l1: float | None = None
    decay: str = DEFAULT_DECAY
    ramp: tuple[float, float] = (0.5, 0.8)
    fusion_rank: int | float = 0.25
    progress: bool = True


#: the Config fields that change only how a method trains once set up: the task's data, its models and their
#: pretraining do not depend on them (see :func:`shared_config`)
METHOD_FIELDS = ("epochs", "protocol", "aux_weight", "mto", "taps", "alpha_init", "window_form", "gate", "search_lr",
                 "l1", "decay", "ramp", "fusion_rank", "progress")


def pretrain_epochs(config: Config) -> int:
    """The epochs of each single-task pretraining: ``config.pretrain_epochs``, or as many as ``config.epochs``."""
    return config.epochs if config.pretrain_epochs is None else config.pretrain_epochs


def shared_config(config: Config) -> Config:
    """``config`` without what only a method uses (those fields at their defaults, ``pretrain_epochs`` made
    explicit): what a task's data, its models and their pretraining depend on. Runs whose configs share it can
    share a :class:`Task` and the pretrained weights of a seed."""
    defaults = Config()
    return replace(config, pretrain_epochs=pretrain_epochs(config),
                   **{name: getattr(defaults, name) for name in METHOD_FIELDS})


@dataclass
class Task:
    """A primary task and its auxiliary: the three splits (items ``x, y_primary, y_aux``), a model
    builder, the losses and the metrics of the primary (``metric`` selects on val; higher is better
    unless ``lower_is_better``)."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    build: Callable[[bool], nn.Module]            # build(aux=False) -> the primary's model, True: the aux model
    head: Callable[[], nn.Module]                 # the extra head of Aux-Head
    aux_module: Callable[[], AuxModule]           # the auxiliary of Aux-Module
    primary_loss: Callable[[Tensor, Tensor], Tensor]
    aux_loss: Callable[[Tensor, Tensor], Tensor]
    metrics: Callable[[Tensor, Tensor], dict[str, float]]
    metric: str
    lower_is_better: bool = False

    def better(self, a: float, b: float | None) -> bool:
        return b is None or (a < b if self.lower_is_better else a > b)


#: the budgets of ``benchmarks/accuracy.py`` per task; ``python -m auxwrap demo`` trains the "scenes-few" one. The
#: protocol is "pretrained" (the paper's), the base of benchmarks/ablation.py, which "scratch" did not beat by more
#: than its paired spread. Scenes at 32x32: a 64x64 run costs ~4x as much per step (the models take
#: either size). "scenes-few": few labelled images, so that the dense auxiliary label has room to help; its 300
#: steps (and 400 val scenes scored after each of its 30 epochs) make a run cost 2-3x one of the other tasks (one
#: thread: Single 14 s, Aux-NAS 50-60 s, a pretraining 8 s).
FULL = {
    "digits": Config(width=8, epochs=10, batch_size=64, n_train=1000, n_val=1000, n_test=2000, protocol="pretrained"),
    "scenes-seg": Config(width=8, epochs=10, batch_size=32, n_train=512, n_val=128, n_test=256, size=32,
                         protocol="pretrained"),
    "scenes-normals": Config(width=8, epochs=10, batch_size=32, n_train=512, n_val=128, n_test=256, size=32,
                             protocol="pretrained"),
    "scenes-few": Config(width=8, epochs=30, batch_size=16, n_train=160, n_val=400, n_test=800, size=32,
                         protocol="pretrained"),
}
#: ``--quick``: a few steps per method, to check that everything runs (the models do not learn much); the FULL
#: configs' protocol, with one epoch of pretraining
QUICK = {
    "digits": Config(width=4, blocks=1, epochs=2, batch_size=32, n_train=128, n_val=64, n_test=64, pretrain_epochs=1,
                     protocol="pretrained"),
    "scenes-seg": Config(width=4, blocks=1, epochs=2, batch_size=16, n_train=32, n_val=16, n_test=16, size=32,
                         pretrain_epochs=1, protocol="pretrained"),
    "scenes-normals": Config(width=4, blocks=1, epochs=2, batch_size=16, n_train=32, n_val=16, n_test=16, size=32,
                             pretrain_epochs=1, protocol="pretrained"),
    "scenes-few": Config(width=4, blocks=1, epochs=2, batch_size=16, n_train=32, n_val=32, n_test=32, size=32,
                         pretrain_epochs=1, protocol="pretrained"),
}


def normals_loss(pred: Tensor, target: Tensor) -> Tensor:
    """1 - cosine between the predicted (normalised) and true unit normals, averaged over pixels."""
    return (1.0 - F.cosine_similarity(pred, target, dim=1)).mean()


def _seg_metrics(pred: Tensor, target: Tensor) -> dict[str, float]:
    return {"mIoU": data.miou(pred, target, len(data.CLASSES)), "pixel_acc": data.pixel_accuracy(pred, target)}


def _normal_metrics(pred: Tensor, target: Tensor) -> dict[str, float]:
    errors = data.normal_errors(pred, target)
    return {"mean_err": errors["mean"], "median_err": errors["median"], "within_11.25": errors["within_11.25"]}


def _sizes(config: Config, default: tuple[int, int, int]) -> tuple[int, int, int]:
    given = (config.n_train, config.n_val, config.n_test)
    return tuple(d if n is None else n for n, d in zip(given, default, strict=True))  # type: ignore[return-value]


def _digits_task(config: Config) -> Task:
    sizes = (config.n_train, config.n_val, config.n_test)  # None: data.DEFAULT_PAIRS
    splits = [data.digit_pairs(split, n, aux="right") for split, n in zip(data.SPLITS, sizes, strict=True)]
    width, blocks = config.width, config.blocks
    last = _stage_widths(width)[-1]
    return Task("digits", *splits,
                build=lambda aux=False: DigitNet(10, width, blocks),
                head=lambda: ClassHead(last, 10),
                aux_module=lambda: AuxModule(10, head="classifier", hidden=last),
                primary_loss=F.cross_entropy, aux_loss=F.cross_entropy,
                metrics=lambda p, y: {"accuracy": data.accuracy(p, y)}, metric="accuracy")


@functools.lru_cache(maxsize=6)
def _scene_tensors(split: str, n: int, size: int) -> tuple[Tensor, ...]:
    """Rendered once per split, number and size: the scene tasks read the same scenes (only the targets
    differ), and ray casting them is most of a task's set-up time."""
    return data.scenes(n, size, seed=0, split=split).tensors


def _scene_split(split: str, n: int, size: int, seg_primary: bool) -> TensorDataset:
    rgb, seg, _, normals = _scene_tensors(split, n, size)
    return TensorDataset(rgb, seg, normals) if seg_primary else TensorDataset(rgb, normals, seg)


def _scenes_task(config: Config, seg_primary: bool) -> Task:
    sizes = _sizes(config, (512, 128, 128))
    splits = [_scene_split(split, n, config.size, seg_primary) for split, n in zip(data.SPLITS, sizes, strict=True)]
    n_seg, width, blocks = len(data.CLASSES), config.width, config.blocks
    outs = (n_seg, 3) if seg_primary else (3, n_seg)
    losses = (F.cross_entropy, normals_loss) if seg_primary else (normals_loss, F.cross_entropy)
    widths = _stage_widths(width)
    return Task("scenes-seg" if seg_primary else "scenes-normals", *splits,
                build=lambda aux=False: SceneNet(outs[aux], width, blocks),
                head=lambda: DenseHead(widths, outs[1], scale=2),
                aux_module=lambda: AuxModule(outs[1], head="dense", hidden=widths[-1]),
                primary_loss=losses[0], aux_loss=losses[1],
                metrics=_seg_metrics if seg_primary else _normal_metrics,
                metric="mIoU" if seg_primary else "mean_err", lower_is_better=not seg_primary)


#: the object classes of "scenes-few", in label order
OBJECTS = (data.SPHERE, data.BOX, data.CYLINDER)


def dominant_object(segmentation: Tensor) -> Tensor:
    """The label of "scenes-few" per scene of ``segmentation`` (N, H, W): which of :data:`OBJECTS` covers the
    most pixels (0 sphere, 1 box, 2 cylinder; a tie goes to the first)."""
    counts = torch.stack([(segmentation == c).sum((-2, -1)) for c in OBJECTS], -1)
    return counts.argmax(-1)


def _few_split(split: str, n: int, size: int) -> TensorDataset:
    rgb, seg, _, normals = _scene_tensors(split, n, size)
    return TensorDataset(rgb, dominant_object(seg), normals)


def _scenes_few_task(config: Config) -> Task:
    """Few labelled scenes (160 by default), each with one class label and a dense auxiliary label; the
    primary (a classifier) and the auxiliary (an encoder-decoder) are different architectures."""
    sizes = _sizes(config, (160, 400, 800))
    splits = [_few_split(split, n, config.size) for split, n in zip(data.SPLITS, sizes, strict=True)]
    width, blocks = config.width, config.blocks
    widths = _stage_widths(width)
    return Task("scenes-few", *splits,
                build=lambda aux=False: SceneNet(3, width, blocks) if aux else SceneClassNet(len(OBJECTS), width,
                                                                                              blocks),
                head=lambda: DenseHead(widths, 3, scale=1),
                aux_module=lambda: AuxModule(3, head="dense", hidden=widths[-1]),
                primary_loss=F.cross_entropy, aux_loss=normals_loss,
                metrics=lambda p, y: {"accuracy": data.accuracy(p, y)}, metric="accuracy")


def make_task(name: str, config: Config | None = None) -> Task:
    """One of :data:`TASKS`: ``"digits"`` (left digit, aux: right digit), ``"scenes-seg"`` (segmentation,
    aux: normals), ``"scenes-normals"`` (normals, aux: segmentation) or ``"scenes-few"`` (the dominant object
    class of a scene, from few labelled scenes; aux: normals, from a different architecture)."""
    config = config or Config()
    if name == "digits":
        return _digits_task(config)
    if name in ("scenes-seg", "scenes-normals"):
        return _scenes_task(config, seg_primary=name == "scenes-seg")
    if name == "scenes-few":
        return _scenes_few_task(config)
    raise AuxwrapArgumentError(f"task={name!r}: expected one of {TASKS}")


# ---------------------------------------------------------------------------------------------- results

@dataclass
class Result:
    """One trained method: the deployed primary's test metrics and cost, and how it got there (``seconds``:
    this run's training and scoring, not the pretraining it shares with the other methods of its seed)."""

    task: str
    method: str
    label: str                         # the display name, e.g. "Aux-NAS + pcgrad-aux"
    seed: int
    metrics: dict[str, float]          # test split, deployed model
    val: float                         # the selection metric on val at the kept state
    best_epoch: int
    flops: int                         # deployed primary, one sample
    params: int                        # deployed primary (BatchNorm folded)
    weight_steps: int
    gate_steps: int
    seconds: float
    deployed: nn.Module = field(repr=False)
    search: Search | None = field(default=None, repr=False)
    protocol: str = "scratch"
    pretrain_steps: int = 0            # of each pretrained model, before weight_steps ("pretrained")

    def row(self) -> dict[str, Any]:
        """A flat, picklable record (for CSV files and worker processes)."""
        return {"task": self.task, "method": self.method, "label": self.label, "seed": self.seed, **self.metrics,
                "val": self.val, "best_epoch": self.best_epoch, "flops": self.flops, "params": self.params,
                "protocol": self.protocol, "pretrain_steps": self.pretrain_steps, "weight_steps": self.weight_steps,
                "gate_steps": self.gate_steps, "seconds": round(self.seconds, 1)}


def method_label(method: str, config: Config | None = None) -> str:
    """The display name of ``method`` (``"aux-nas+mto"`` names its optimisation method, a ``"-rank"`` method its
    fusion rank: ``C/4`` for 0.25)."""
    config = config or Config()
    return LABELS[method].format(mto=config.mto, rank=_rank_text(config.fusion_rank))


def _rank_text(fusion_rank: int | float) -> str:
    """``fusion_rank`` in words: an int as is, a fraction of C as ``C/4`` (or ``0.3C`` where 1/f is no int)."""
    if is_integer(fusion_rank) or not is_real(fusion_rank) or not 0 < fusion_rank <= 1:
        return str(fusion_rank)  # an int, or a value attach() refuses with its reason
    inverse = 1 / fusion_rank
    return f"C/{round(inverse)}" if abs(inverse - round(inverse)) < 1e-9 else f"{fusion_rank:g}C"


# ---------------------------------------------------------------------------------------------- training

@dataclass
class _Setup:
    """What differs between methods: the network, its weight parameters and its two outputs."""

    net: nn.Module
    primary: nn.Module
    outputs: Callable[[Any], tuple[Tensor, Tensor | None]]
    search: Search | None = None


def _outputs_of(method: str) -> Callable[[Any], tuple[Tensor, Tensor | None]]:
    if method == "single":
        return lambda out: (out, None)
    if method == "aux-head":
        return lambda out: out
    return lambda out: (out.primary, out.aux[0])


def _network(method: str, task: Task, config: Config, states: Mapping[str, Mapping] | None = None) -> _Setup:
    """The primary's model (built first, so a seed gives every method the same primary init) and the
    training network of ``method`` around it; ``states``: the pretrained weights of the primary's model
    (``"primary"``) and of the auxiliary model (``"aux"``), loaded into them ("pretrained" protocol)."""
    primary = task.build(False)
    if states is not None:
        primary.load_state_dict(states["primary"])
    if method == "single":
        return _Setup(primary, primary, _outputs_of(method))
    if method == "aux-head":
        return _Setup(TwoHeads(primary, task.head()), primary, _outputs_of(method))
    example = (task.train[0][0][None].repeat(2, 1, 1, 1),)
    if method == "aux-module":
        aux, mode, taps = task.aux_module(), "grad", "stage"
    else:
        aux = task.build(True)
        if states is not None:
            aux.load_state_dict(states["aux"])
        base = method.removesuffix(RANK_SUFFIX)
        mode, taps = ("grad", base.removeprefix("aux-g-")) if base.startswith("aux-g-") else ("nas", config.taps)
    net = attach(primary, aux, mode=mode, taps=taps, example_inputs=example, **_attach_options(method, config))
    return _Setup(net, primary, _outputs_of(method))


def _attach_options(method: str, config: Config) -> dict[str, Any]:
    """The Config's options for ``attach``: the window form for Aux-G and Aux-NAS (not the Aux-Module: its
    adaptors read the primary's stages as Liu et al. built them), the gates' form and init for Aux-NAS."""
    options: dict[str, Any] = {}
    if method.startswith(("aux-g-", "aux-nas")):
        options["window_form"] = config.window_form
    if method.startswith("aux-nas"):
        options |= {"alpha_init": config.alpha_init, "gate": config.gate}
    if method.endswith(RANK_SUFFIX):
        options["fusion_rank"] = config.fusion_rank
    return options


def _search(net: nn.Module, total: int, config: Config) -> Search:
    l1 = {} if config.l1 is None else {"l1": config.l1}  # None: Search's default
    return Search(net, total_steps=total, lr=config.search_lr, ramp=config.ramp, decay=config.decay, **l1)


def _weight_parameters(net: nn.Module) -> list[nn.Parameter]:
    return net.weight_parameters() if isinstance(net, FusedNet) else list(net.parameters())


def _batches(method: str, task: Task, config: Config, seed: int) -> Iterator[tuple]:
    """Endless (search batch or None, weight batch) pairs. Aux-NAS: one batch from each half of a fresh
    split per pass (:func:`auxwrap.search_loaders`); the others: shuffled batches of the whole split."""
    if method.startswith("aux-nas"):
        search_loader, train_loader = search_loaders(task.train, config.batch_size, seed=seed, drop_last=True)
        for epoch in itertools.count():
            search_loader.sampler.set_epoch(epoch)
            # the train half has one sample more for an odd size: with drop_last both may differ by a batch
            yield from zip(search_loader, train_loader, strict=False)
    for batch in _shuffled(task.train, config.batch_size, seed):
        yield None, batch


def _shuffled(dataset: Dataset, batch_size: int, seed: int) -> Iterator[tuple]:
    """Endless shuffled batches of ``dataset`` (the last incomplete one of each pass dropped), the order
    drawn from a generator seeded by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size, shuffle=True, drop_last=True, generator=generator)
    while True:
        yield from loader


def _sgd(parameters: list[nn.Parameter], config: Config, total: int) -> tuple[torch.optim.Optimizer, Any]:
    """The optimiser of every weight step (SGD, momentum, weight decay) and its cosine schedule over ``total``."""
    opt = torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)


def _losses(task: Task, setup: _Setup, batch: tuple, aux_weight: float) -> tuple[Tensor, Tensor | None]:
    x, y, y_aux = batch
    primary_out, aux_out = setup.outputs(setup.net(x))
    aux_loss = None if aux_out is None else aux_weight * task.aux_loss(aux_out, y_aux)
    return task.primary_loss(primary_out, y), aux_loss


def _weight_step(method: str, task: Task, setup: _Setup, batch: tuple, opt: torch.optim.Optimizer,
                 config: Config) -> float:
    primary_loss, aux_loss = _losses(task, setup, batch, config.aux_weight)
    opt.zero_grad(set_to_none=True)
    if method == "aux-nas+mto":
        loss = mto.backward([primary_loss, aux_loss], setup.net, method=config.mto)
    else:
        loss = primary_loss if aux_loss is None else primary_loss + aux_loss
        loss.backward()
    opt.step()
    return float(loss.detach())


class _NoBar:
    """Stands in for a tqdm bar when progress is off or tqdm is not installed."""

    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kwargs: Any) -> None: ...
    def close(self) -> None: ...


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar over ``total`` steps (removed when done), or a silent stand-in (tqdm is then not even imported)."""
    if not enabled:
        return _NoBar()
    try:
        from ..optional import require  # an AuxwrapMissingDependencyError is an ImportError: no bar then
        tqdm = require("tqdm.auto", extra="demo", purpose="the progress bar").tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """``model``'s outputs on every sample of ``dataset`` (eval mode, restored) and the primary targets."""
    was_training = model.training
    model.eval()
    outputs, targets = [], []
    for x, y, *_ in DataLoader(dataset, batch_size):
        outputs.append(model(x))
        targets.append(y)
    model.train(was_training)
    return torch.cat(outputs), torch.cat(targets)


def evaluate(model: nn.Module, task: Task, split: str = "test") -> dict[str, float]:
    """The primary metrics of ``model`` (the primary alone, or its deployed module) on a split."""
    return task.metrics(*predict(model, getattr(task, split)))


def deploy(setup: _Setup) -> nn.Module:
    """The primary alone, BatchNorms folded: :func:`auxwrap.prune` of a fused network, else the primary's
    model traced and folded in the same way (the Aux-Head's extra head is simply not in it)."""
    if isinstance(setup.net, FusedNet):
        return prune(setup.net)
    return fold_module(setup.primary)


def _check(task: str | Task, method: str, config: Config) -> None:
    if method not in METHODS:
        raise AuxwrapArgumentError(f"method={method!r}: expected one of {METHODS}")
    if not isinstance(task, Task) and task not in TASKS:
        raise AuxwrapArgumentError(f"task={task!r}: expected one of {TASKS}")
    for name in ("epochs", "batch_size", "width", "blocks"):
        value = getattr(config, name)
        if not is_integer(value) or value < 1:
            raise AuxwrapArgumentError(f"Config.{name}={value!r}: expected an int >= 1")
    if config.mto not in mto.METHODS:
        raise AuxwrapArgumentError(f"Config.mto={config.mto!r}: expected one of {mto.METHODS}")
    if config.protocol not in PROTOCOLS:
        raise AuxwrapArgumentError(f"Config.protocol={config.protocol!r}: expected one of {PROTOCOLS}")
    epochs = config.pretrain_epochs
    if epochs is not None and (not is_integer(epochs) or epochs < 1):
        raise AuxwrapArgumentError(f"Config.pretrain_epochs={epochs!r}: expected None (as many as epochs) or an "
                                   "int >= 1")


def _check_batch_fits(task: Task, method: str, config: Config) -> None:
    """A batch must fit in what a method draws from: the training split, or for Aux-NAS its smaller half
    (with drop_last, a half smaller than a batch would yield no batch at all)."""
    nas = method.startswith("aux-nas")
    samples = len(task.train) // 2 if nas else len(task.train)
    if config.batch_size > samples:
        where = (f"the smaller half ({samples}) of the {len(task.train)} training samples, which Aux-NAS splits "
                 "between its gate and weight steps") if nas else f"the {samples} training samples"
        raise AuxwrapArgumentError(f"batch_size={config.batch_size} is larger than {where}; lower batch_size "
                                   "or raise Config.n_train.")


# ---------------------------------------------------------------------------------------------- pretraining

#: pretrained state_dicts of this process, per (task name, shared_config, seed, part): see :func:`pretrain`
_PRETRAINED: dict[tuple, dict[str, Tensor]] = {}
PARTS = ("primary", "aux")


def pretrain(task: Task, config: Config, seed: int = 0, part: str = "primary") -> dict[str, Tensor]:
    """The state_dict of the primary's model (``part="primary"``) or of the auxiliary model (``"aux"``, on the
    auxiliary loss) after ``pretrain_epochs`` epochs of training alone: the Single recipe (the same SGD,
    momentum and weight decay, a cosine schedule over the pretraining steps, shuffled batches from a generator
    seeded by ``seed``), from the initial weights that :func:`run` gives every method of ``seed``.

    Cached in this process per (task name, :func:`shared_config`, seed, part), so the methods of one seed, and
    configs that differ only in what a method does, pretrain once. Do not modify the returned tensors."""
    if part not in PARTS:
        raise AuxwrapArgumentError(f"part={part!r}: expected one of {PARTS}")
    key = (task.name, shared_config(config), seed, part)
    if key not in _PRETRAINED:
        _PRETRAINED[key] = _pretrain(task, config, seed, part)
    return _PRETRAINED[key]


def _pretrain(task: Task, config: Config, seed: int, part: str) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    model = task.build(False)  # the primary first, as in _network: the aux model then gets the init it gets there
    if part == "aux":
        model = task.build(True)
    loss, target = (task.primary_loss, 1) if part == "primary" else (task.aux_loss, 2)
    total = _pretrain_steps(task, config)
    opt, schedule = _sgd(list(model.parameters()), config, total)
    model.train()
    bar = progress_bar(total, f"{task.name} pretrain {part} seed {seed}", config.progress)
    for _, batch in zip(range(total), _shuffled(task.train, config.batch_size, seed), strict=False):
        opt.zero_grad(set_to_none=True)
        value = loss(model(batch[0]), batch[target])
        value.backward()
        opt.step()
        schedule.step()
        bar.update()
    bar.close()
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def pretrained_parts(method: str) -> tuple[str, ...]:
    """What ``method`` starts from under the "pretrained" protocol: the primary's model, and the auxiliary
    model (``task.build(True)``) where the method trains one (Aux-G, Aux-NAS)."""
    return PARTS if method.startswith(("aux-g-", "aux-nas")) else PARTS[:1]


def _pretrain_steps(task: Task, config: Config) -> int:
    return pretrain_epochs(config) * (len(task.train) // config.batch_size) if config.protocol == "pretrained" else 0


def _starting_states(task: Task, method: str, seed: int, config: Config,
                     given: Mapping[str, Mapping] | None) -> dict[str, Mapping] | None:
    """The pretrained weights ``method`` starts from ("pretrained"), from ``given`` or :func:`pretrain`."""
    if config.protocol != "pretrained":
        if given is not None:
            raise AuxwrapArgumentError(f"pretrained= was given, but Config.protocol={config.protocol!r} trains "
                                       "from random init; use protocol='pretrained'.")
        return None
    parts = pretrained_parts(method)
    if given is None:
        return {part: pretrain(task, config, seed, part) for part in parts}
    missing = [part for part in parts if part not in given]
    if missing:
        raise AuxwrapArgumentError(f"pretrained= lacks {missing} for method={method!r}: give a state_dict per part "
                                   f"{parts} (see auxwrap.demo.experiments.pretrain).")
    return {part: given[part] for part in parts}


# ---------------------------------------------------------------------------------------------- run

def run(task: str | Task, method: str, seed: int = 0, config: Config | None = None, *,
        pretrained: Mapping[str, Mapping] | None = None) -> Result:
    """Train ``method`` on ``task`` (a name of :data:`TASKS` or a :func:`make_task` result, reused across
    runs), keep the best-on-val state, deploy the primary and score it on the test split.

    Under ``Config.protocol="pretrained"`` the models start from :func:`pretrain`'s weights for ``seed``
    (trained here and cached in this process), or from ``pretrained``: ``{"primary": state_dict, "aux":
    state_dict}`` made by :func:`pretrain` elsewhere, e.g. in another process."""
    config = config or Config()
    _check(task, method, config)
    task = make_task(task, config) if isinstance(task, str) else task
    _check_batch_fits(task, method, config)
    states = _starting_states(task, method, seed, config, pretrained)
    start = time.perf_counter()
    torch.manual_seed(seed)
    setup = _network(method, task, config, states)
    steps_per_epoch = len(task.train) // config.batch_size
    total = config.epochs * steps_per_epoch
    if method.startswith("aux-nas"):
        setup.search = _search(setup.net, total, config)
    opt, schedule = _sgd(_weight_parameters(setup.net), config, total)
    best: tuple[float, int, dict] | None = None
    batches = _batches(method, task, config, seed)
    setup.net.train()
    bar = progress_bar(total, f"{task.name} {method_label(method, config)} seed {seed}", config.progress)
    for step in range(1, total + 1):
        search_batch, batch = next(batches)
        if setup.search is not None:
            setup.search.step(sum(_losses(task, setup, search_batch, config.aux_weight)))
        loss = _weight_step(method, task, setup, batch, opt, config)
        schedule.step()
        bar.update()
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        if step % steps_per_epoch == 0 and (setup.search is None or setup.search.is_cut):
            score = evaluate(setup.primary, task, "val")[task.metric]
            if best is None or task.better(score, best[0]):
                best = (score, step // steps_per_epoch, copy.deepcopy(setup.primary.state_dict()))
    bar.close()
    setup.net.train(False)
    setup.primary.load_state_dict(best[2])
    deployed = deploy(setup)
    sample = task.test[0][0][None]
    return Result(task.name, method, method_label(method, config), seed, evaluate(deployed, task, "test"),
                  val=best[0], best_epoch=best[1], flops=count_flops(deployed, sample),
                  params=count_parameters(deployed), weight_steps=total,
                  gate_steps=total if setup.search is not None else 0, seconds=time.perf_counter() - start,
                  deployed=deployed, search=setup.search, protocol=config.protocol,
                  pretrain_steps=_pretrain_steps(task, config))

