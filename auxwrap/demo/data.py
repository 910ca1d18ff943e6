"""Datasets that need no download, for the accuracy benchmark and the demo, and their metrics.

Two primary/auxiliary task pairs:

- :func:`digit_pairs`: two of scikit-learn's 8x8 handwritten digits on one 16x16 canvas (MultiMNIST in
  miniature). Primary label: the left digit; auxiliary label(s): the right digit and labels derived from
  both. Train, val and test draw from disjoint pools of the 1797 source images.
- :func:`scenes`: procedurally rendered 3D scenes (floor, back wall, spheres, boxes, cylinders under a
  pinhole camera) with exact per-pixel segmentation, depth and surface normals, like the NYUv2 pairs of
  Aux-NAS (segmentation with normals, and the reverse).

Metric helpers: :func:`accuracy`, :func:`miou`, :func:`pixel_accuracy`, :func:`normal_errors`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ..errors import AuxwrapArgumentError, check_choice, check_int, check_real

__all__ = [
    "AUX_CLASSES",
    "CLASSES",
    "Box",
    "Camera",
    "Cylinder",
    "DigitPairs",
    "Rendered",
    "SceneSpec",
    "Scenes",
    "Sphere",
    "accuracy",
    "compose_pairs",
    "confusion_matrix",
    "digit_pairs",
    "digit_split_indices",
    "miou",
    "normal_errors",
    "pixel_accuracy",
    "pixel_rays",
    "render",
    "render_specs",
    "scenes",
]

SPLITS = ("train", "val", "test")
#: fractions of every digit class's source images that go to train, val and test
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)

# ----------------------------------------------------------------------------------------------
# Digit pairs
# ----------------------------------------------------------------------------------------------

#: number of classes of every auxiliary label :func:`digit_pairs` offers
AUX_CLASSES = {"right": 10, "sum": 19, "equal": 2}
#: canvas of a digit pair (height, width); the 8x8 digits sit at LEFT_AT and RIGHT_AT (top, left), +- jitter
CANVAS = (16, 16)
LEFT_AT = (1, 1)
RIGHT_AT = (7, 7)
DIGIT = 8
DEFAULT_PAIRS = {"train": 6000, "val": 2000, "test": 2000}


def _check_split(split: str) -> int:
    """The index of ``split`` in :data:`SPLITS`."""
    return SPLITS.index(check_choice("split", split, SPLITS))


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 digits (shipped with it, nothing downloaded): images (1797, 8, 8) in [0, 1], targets."""
    from ..optional import require  # scikit-learn comes with the demo extra: pip install 'auxwrap[demo]'
    load_digits = require("sklearn.datasets", extra="demo", purpose="the digit-pair tasks").load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)
    return images, torch.from_numpy(bunch.target.astype(np.int64))


def digit_split_indices(split: str, split_seed: int = 0) -> torch.Tensor:
    """The source images (indices into ``load_digits()``) that ``split`` may use, sorted.

    Stratified 60/20/20 by digit class with a permutation seeded by ``split_seed``, so the three pools are
    disjoint: no test or val digit image is ever seen in training. Keep ``split_seed`` the same for all splits.
    """
    which = _check_split(split)
    check_int("split_seed", split_seed, 0)
    _, targets = _digits()
    rng = np.random.default_rng([split_seed, 7])
    chosen = []
    for digit in range(10):
        members = np.flatnonzero(targets.numpy() == digit)
        members = members[rng.permutation(len(members))]
        bounds = np.round(np.cumsum((0.0, *SPLIT_FRACTIONS)) * len(members)).astype(int)
        chosen.append(members[bounds[which]:bounds[which + 1]])
    return torch.from_numpy(np.sort(np.concatenate(chosen)))


class DigitPairs(TensorDataset):
    """Pairs of digits on one canvas: items ``(image, primary, aux...)``; see :func:`digit_pairs`.

    ``source_indices`` (N, 2) are the left and right source images (indices into ``load_digits()``),
    ``offsets`` (N, 2, 2) their (top, left) on the canvas, ``aux_names`` the auxiliary labels in item order.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], source_indices: torch.Tensor, offsets: torch.Tensor,
                 aux_names: tuple[str, ...]):
        super().__init__(*tensors)
        self.source_indices = source_indices
        self.offsets = offsets
        self.aux_names = aux_names

    @property
    def images(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def labels(self) -> torch.Tensor:
        """The primary labels (the left digits)."""
        return self.tensors[1]


def _aux_names(aux: str | Sequence[str]) -> tuple[str, ...]:
    names = (aux,) if isinstance(aux, str) else tuple(aux)
    bad = [name for name in names if name not in AUX_CLASSES]
    if not names or bad:
        raise AuxwrapArgumentError(f"aux={aux!r}: expected one or more of {tuple(AUX_CLASSES)}")
    return names


def _paste(canvas: torch.Tensor, digits: torch.Tensor, top_left: torch.Tensor) -> None:
    """canvas[b, top:top+8, left:left+8] = max(itself, digits[b]) for every b, vectorised."""
    steps = torch.arange(DIGIT)
    rows = (top_left[:, 0, None] + steps)[:, :, None]
    cols = (top_left[:, 1, None] + steps)[:, None, :]
    batch = torch.arange(len(canvas))[:, None, None]
    canvas[batch, rows, cols] = torch.maximum(canvas[batch, rows, cols], digits)


def compose_pairs(source_indices: torch.Tensor, offsets: torch.Tensor | None = None, *,
                  aux: str | Sequence[str] = "right", channels: int = 1, size: int | None = None) -> DigitPairs:
    """Build digit pairs from explicit source images: row i of ``source_indices`` (N, 2) is (left, right).

    ``offsets`` (N, 2, 2) gives each digit's (top, left) on the 16x16 canvas (default: the fixed places,
    left digit up-left, right digit down-right, overlapping by 2 pixels each way); overlaps combine with max.
    Images are float in [0, 1] (the source values 0..16 divided by 16), shaped (channels, H, W) with H = W =
    ``size`` (bilinear resize; default 16). ``channels=3`` repeats the grey image for RGB models.
    Labels: primary = left digit; ``aux`` names the auxiliary labels, one or several of ``"right"`` (the
    right digit, 10 classes), ``"sum"`` (left + right, 19 classes), ``"equal"`` (1 if the digits are the
    same number, 2 classes).
    """
    names = _aux_names(aux)
    if channels not in (1, 3):
        raise AuxwrapArgumentError(f"channels={channels!r}: expected 1 or 3")
    if size is not None:
        check_int("size", size, 4)
    images, targets = _digits()
    source_indices = torch.as_tensor(source_indices, dtype=torch.long)
    if source_indices.dim() != 2 or source_indices.shape[1] != 2:
        raise AuxwrapArgumentError(f"source_indices: expected shape (N, 2), got {tuple(source_indices.shape)}")
    if len(source_indices) and (source_indices.min() < 0 or source_indices.max() >= len(images)):
        raise AuxwrapArgumentError(f"source_indices: expected values in [0, {len(images)})")
    n = len(source_indices)
    if offsets is None:
        offsets = torch.tensor([LEFT_AT, RIGHT_AT]).expand(n, 2, 2)
    offsets = torch.as_tensor(offsets, dtype=torch.long)
    limit = min(CANVAS) - DIGIT
    if offsets.shape != (n, 2, 2) or (n and (offsets.min() < 0 or offsets.max() > limit)):
        raise AuxwrapArgumentError(f"offsets: expected shape ({n}, 2, 2) with values in [0, {limit}]")
    canvas = torch.zeros(n, *CANVAS)
    _paste(canvas, images[source_indices[:, 0]], offsets[:, 0])
    _paste(canvas, images[source_indices[:, 1]], offsets[:, 1])
    canvas = canvas[:, None]
    if size is not None and (size, size) != CANVAS:
        canvas = F.interpolate(canvas, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    if channels == 3:
        canvas = canvas.expand(-1, 3, -1, -1).contiguous()
    left, right = targets[source_indices[:, 0]], targets[source_indices[:, 1]]
    derived = {"right": right, "sum": left + right, "equal": (left == right).long()}
    return DigitPairs((canvas, left, *(derived[name] for name in names)), source_indices, offsets, names)


def digit_pairs(split: str = "train", n: int | None = None, seed: int = 0, *, aux: str | Sequence[str] = "right",
                jitter: int = 1, channels: int = 1, size: int | None = None, split_seed: int = 0) -> DigitPairs:
    """MultiMNIST-style pairs of real handwritten digits (scikit-learn's, no download) for classification.

    Each sample puts a left digit (up-left) and a right digit (down-right) on a 16x16 canvas; the primary
    label is the left digit, the auxiliary label(s) ``aux`` are the right digit and/or derived labels (see
    :func:`compose_pairs`). Both digits are drawn uniformly, independently, from the split's pool of source
    images (:func:`digit_split_indices`: disjoint across splits). Each digit moves by up to ``jitter`` pixels
    (0..1) each way. ``n`` defaults to 6000 / 2000 / 2000 for train / val / test. Deterministic for a given
    (split, seed); ``split_seed`` chooses the source partition and must be the same for all splits.
    """
    which = _check_split(split)
    n = DEFAULT_PAIRS[split] if n is None else check_int("n", n, 1)
    seed = check_int("seed", seed, 0)
    jitter = check_int("jitter", jitter, 0, 1, why="pixels; the digits must stay on the canvas")
    pool = digit_split_indices(split, split_seed)
    rng = np.random.default_rng([seed, which, 11])
    picks = pool[torch.from_numpy(rng.integers(0, len(pool), size=(n, 2)))]
    shifts = torch.from_numpy(rng.integers(-jitter, jitter + 1, size=(n, 2, 2)))
    offsets = torch.tensor([LEFT_AT, RIGHT_AT]) + shifts
    return compose_pairs(picks, offsets, aux=aux, channels=channels, size=size)


# ----------------------------------------------------------------------------------------------
# Rendered scenes
# ----------------------------------------------------------------------------------------------

#: class ids of :func:`scenes` segmentation maps
CLASSES = ("floor", "wall", "sphere", "box", "cylinder")
FLOOR, WALL, SPHERE, BOX, CYLINDER = range(len(CLASSES))
_EPS = 1e-4
_BIG = 1e12  # no hit
_GREY = (0.7, 0.7, 0.7)


def _vec3(name: str, value: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(v) for v in value)
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise AuxwrapArgumentError(f"{name}={value!r}: expected 3 finite numbers")
    return values  # type: ignore[return-value]


@dataclass(frozen=True)
class Sphere:
    """A sphere in world coordinates (y up, floor at y = 0)."""

    center: tuple[float, float, float]
    radius: float
    color: tuple[float, float, float] = _GREY

    def __post_init__(self):
        object.__setattr__(self, "center", _vec3("center", self.center))
        object.__setattr__(self, "radius", check_real("radius", self.radius, 0.0, low_open=True))
        object.__setattr__(self, "color", _vec3("color", self.color))


@dataclass(frozen=True)
class Box:
    """An axis-aligned box from corner ``lo`` to corner ``hi`` (world coordinates)."""

    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    color: tuple[float, float, float] = _GREY

    def __post_init__(self):
        object.__setattr__(self, "lo", _vec3("lo", self.lo))
        object.__setattr__(self, "hi", _vec3("hi", self.hi))
        object.__setattr__(self, "color", _vec3("color", self.color))
        if not all(h > lo for lo, h in zip(self.lo, self.hi, strict=True)):
            raise AuxwrapArgumentError(f"hi={self.hi}: expected every coordinate above lo={self.lo}")


@dataclass(frozen=True)
class Cylinder:
    """A vertical (y-axis) capped cylinder: bottom-cap centre ``base`` = (x, y, z), ``radius``, ``height``."""

    base: tuple[float, float, float]
    radius: float
    height: float
    color: tuple[float, float, float] = _GREY

    def __post_init__(self):
        object.__setattr__(self, "base", _vec3("base", self.base))
        object.__setattr__(self, "radius", check_real("radius", self.radius, 0.0, low_open=True))
        object.__setattr__(self, "height", check_real("height", self.height, 0.0, low_open=True))
        object.__setattr__(self, "color", _vec3("color", self.color))


Primitive = Sphere | Box | Cylinder


@dataclass(frozen=True)
class Camera:
    """A pinhole camera at (0, ``height``, 0) looking along world -z, tilted down by ``pitch`` degrees.

    Camera coordinates (those of the normals :func:`render` returns): x right, y up, z towards the viewer
    (OpenGL convention; the camera looks along -z, so visible normals have z > 0). ``fov``: the vertical
    (= horizontal, images are square) field of view in degrees.
    """

    height: float = 1.6
    pitch: float = 20.0
    fov: float = 60.0

    def __post_init__(self):
        check_real("height", self.height, 0.0, low_open=True)
        check_real("fov", self.fov, 0.0, 150.0, low_open=True, high_open=True, why="degrees")
        check_real("pitch", self.pitch, 0.0, 90 - self.fov / 2, high_open=True, why="degrees, below 90 - fov/2")

    def rotation(self) -> torch.Tensor:
        """R (3, 3) with world = R @ camera for directions (a rotation about x by -pitch)."""
        c, s = math.cos(math.radians(self.pitch)), math.sin(math.radians(self.pitch))
        return torch.tensor([[1.0, 0.0, 0.0], [0.0, c, s], [0.0, -s, c]])


def pixel_rays(camera: Camera, size: int) -> torch.Tensor:
    """Ray directions (size, size, 3) through the pixel centres, in camera coordinates, scaled to z = -1.

    A hit at distance ``depth`` along the camera's viewing axis is ``depth * ray``.
    """
    size = check_int("size", size, 1)
    focal = (size / 2) / math.tan(math.radians(camera.fov) / 2)
    centres = (torch.arange(size, dtype=torch.float32) + 0.5 - size / 2) / focal
    v, u = torch.meshgrid(-centres, centres, indexing="ij")
    return torch.stack([u, v, -torch.ones_like(u)], dim=-1)


@dataclass(frozen=True)
class SceneSpec:
    """Everything that defines one scene: geometry, camera, light and appearance (see :func:`render`)."""

    objects: tuple[Primitive, ...]
    camera: Camera = field(default_factory=Camera)
    wall_distance: float = 8.0
    light: tuple[float, float, float] = (0.4, 0.8, 0.6)
    ambient: float = 0.3
    floor_color: tuple[float, float, float] = (0.6, 0.55, 0.5)
    wall_color: tuple[float, float, float] = (0.75, 0.75, 0.8)
    checker: tuple[float, float] = (1.0, 0.0)  # floor tile size, contrast
    stripes: tuple[float, float, float] = (3.0, 0.0, 0.0)  # wall frequency, contrast, phase
    noise: float = 0.0
    noise_seed: int = 0
    shadows: bool = True

    def __post_init__(self):
        check_real("wall_distance", self.wall_distance, 0.0, low_open=True)
        check_real("ambient", self.ambient, 0.0, 1.0)
        check_real("noise", self.noise, 0.0)
        if not any(_vec3("light", self.light)):
            raise AuxwrapArgumentError("light=(0, 0, 0): expected a direction")


class Rendered(NamedTuple):
    """One rendered scene (or a batch, with a leading N)."""

    rgb: torch.Tensor  # (3, H, W) float in [0, 1]
    segmentation: torch.Tensor  # (H, W) long class ids, see CLASSES
    depth: torch.Tensor  # (1, H, W) float, distance along the viewing axis (camera -z)
    normals: torch.Tensor  # (3, H, W) float unit vectors, camera coordinates


def _pack(specs: Sequence[SceneSpec], kind: type, values) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-scene padded geometry (B, K, 1, 6), colours (B, K, 3) and validity (B, K) of one primitive kind."""
    per_scene = [[obj for obj in spec.objects if isinstance(obj, kind)] for spec in specs]
    k = max(len(objs) for objs in per_scene)
    geometry, colors, valid = torch.zeros(len(specs), k, 6), torch.zeros(len(specs), k, 3), torch.zeros(len(specs), k)
    for b, objs in enumerate(per_scene):
        for i, obj in enumerate(objs):
            geometry[b, i] = torch.tensor(values(obj))
            colors[b, i] = torch.tensor(obj.color)
            valid[b, i] = 1
    return geometry[:, :, None], colors, valid.bool()


# Each kind has a hit function, t (B, K, P) of the nearest positive hit of rays o + t d (o, d: (B, 1, P|1, 3))
# on geometry g (B, K, 1, 6) plus what its normal needs, and a normal function evaluated only for the
# winning slot of every ray: normal(o, d (B, P|1, 3), t (B, P), g (B, P, 6), part (B, P)) -> (B, P, 3).


def _hit_spheres(o: torch.Tensor, d: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    oc = o - g[..., 0:3]
    a, b = (d * d).sum(-1), (d * oc).sum(-1)
    disc = b * b - a * ((oc * oc).sum(-1) - g[..., 3] ** 2)
    t = (-b - disc.clamp(min=0).sqrt()) / a
    return torch.where((disc > 0) & (t > _EPS), t, _BIG), None


def _sphere_normals(o, d, t, g, part) -> torch.Tensor:
    """(hit - centre) / radius."""
    return (o + t[..., None] * d - g[..., 0:3]) / g[..., 3:4]


def _safe(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.abs() < 1e-12, torch.full_like(x, 1e-12), x)


def _hit_boxes(o: torch.Tensor, d: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slab test; part = the axis of the slab entered last (the face hit)."""
    d = _safe(d)
    t1, t2 = (g[..., 0:3] - o) / d, (g[..., 3:6] - o) / d
    t_near, axis = torch.minimum(t1, t2).max(-1)
    t_far = torch.maximum(t1, t2).min(-1).values
    return torch.where((t_near <= t_far) & (t_near > _EPS), t_near, _BIG), axis


def _box_normals(o, d, t, g, axis) -> torch.Tensor:
    """The face's axis, against the ray."""
    return -(axis[..., None] == torch.arange(3)).to(d.dtype) * torch.sign(_safe(d))


def _hit_cylinders(o: torch.Tensor, d: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertical capped cylinders (g = x, z, radius, y0, y1): side or cap, whichever is nearer; part = on a cap."""
    cx, cz, radius, y0, y1 = g[..., 0], g[..., 1], g[..., 2], g[..., 3], g[..., 4]
    ox, oy, oz = o[..., 0] - cx, o[..., 1], o[..., 2] - cz
    dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
    a = (dx * dx + dz * dz).clamp(min=1e-12)
    b = dx * ox + dz * oz
    disc = b * b - a * (ox * ox + oz * oz - radius * radius)
    t_side = (-b - disc.clamp(min=0).sqrt()) / a
    y_side = oy + t_side * dy
    t_side = torch.where((disc > 0) & (t_side > _EPS) & (y_side >= y0) & (y_side <= y1), t_side, _BIG)
    dy = _safe(dy)
    t_cap = torch.where(dy < 0, (y1 - oy) / dy, (y0 - oy) / dy)
    px, pz = ox + t_cap * dx, oz + t_cap * dz
    t_cap = torch.where((t_cap > _EPS) & (px * px + pz * pz <= radius * radius), t_cap, _BIG)
    return torch.minimum(t_side, t_cap), t_cap < t_side


def _cylinder_normals(o, d, t, g, on_cap) -> torch.Tensor:
    """Caps: up or down, against the ray; side: horizontal, from the axis to the hit."""
    hit = o + t[..., None] * d
    side = torch.stack([hit[..., 0] - g[..., 0], torch.zeros_like(t), hit[..., 2] - g[..., 1]], -1) / g[..., 2:3]
    cap = torch.zeros_like(side)
    cap[..., 1] = -torch.sign(_safe(d[..., 1])).expand_as(t)
    return torch.where(on_cap[..., None], cap, side)


_KINDS = (
    (SPHERE, Sphere, lambda s: (*s.center, s.radius, 0.0, 0.0), _hit_spheres, _sphere_normals),
    (BOX, Box, lambda s: (*s.lo, *s.hi), _hit_boxes, _box_normals),
    (CYLINDER, Cylinder, lambda s: (s.base[0], s.base[2], s.radius, s.base[1], s.base[1] + s.height, 0.0),
     _hit_cylinders, _cylinder_normals),
)


def _nearest(o: torch.Tensor, d: torch.Tensor, packed, shade: bool = True):
    """The nearest object hit of every ray: t (B, P) and, if ``shade``, class, normal and colour of the hit."""
    batch, pixels = d.shape[0], max(d.shape[1], o.shape[1])
    best_t = torch.full((batch, pixels), _BIG)
    best_class = torch.full((batch, pixels), -1, dtype=torch.long)
    best_normal, best_color = torch.zeros(batch, pixels, 3), torch.zeros(batch, pixels, 3)
    for class_id, hit, normals, (geometry, colors, valid) in packed:
        t, part = hit(o[:, None], d[:, None], geometry)
        t_min, slot = torch.where(valid[..., None], t, _BIG).min(1)
        closer = t_min < best_t
        best_t = torch.where(closer, t_min, best_t)
        if not shade:
            continue
        best_class = torch.where(closer, class_id, best_class)
        won = geometry[:, :, 0].gather(1, slot[..., None].expand(-1, -1, 6))
        part = None if part is None else part.gather(1, slot[:, None])[:, 0]
        best_normal = torch.where(closer[..., None], normals(o, d, t_min, won, part), best_normal)
        best_color = torch.where(closer[..., None], colors.gather(1, slot[..., None].expand(-1, -1, 3)), best_color)
    return best_t, best_class, best_normal, best_color


def _spec_tensor(specs: Sequence[SceneSpec], get) -> torch.Tensor:
    return torch.tensor([get(spec) for spec in specs], dtype=torch.float32)


def render_specs(specs: Sequence[SceneSpec], size: int = 64) -> Rendered:
    """Render a batch of scenes by vectorised ray casting: :class:`Rendered` tensors with a leading N.

    Per pixel, the nearest of floor (y = 0), back wall (z = -wall_distance) and objects. Exact labels: the
    class of the hit, depth = its distance along the viewing axis, normal = the analytic surface normal
    (facing the camera) in camera coordinates. Colour: albedo (textured floor and wall) times ambient +
    (1 - ambient) * Lambert of the directional ``light`` (world direction towards the light), with cast
    shadows of objects, plus Gaussian noise of std ``noise``; clamped to [0, 1].
    """
    size = check_int("size", size, 1)
    if not specs:
        raise AuxwrapArgumentError("specs: expected at least one scene")
    n_pixels = size * size
    rotation = torch.stack([spec.camera.rotation() for spec in specs])  # (B, 3, 3)
    rays = torch.stack([pixel_rays(spec.camera, size).reshape(n_pixels, 3) for spec in specs])
    d = rays @ rotation.transpose(1, 2)  # world directions, (B, P, 3)
    o = torch.zeros(len(specs), 1, 3)
    o[:, 0, 1] = _spec_tensor(specs, lambda s: s.camera.height)
    packed = [(cid, hit, normals, _pack(specs, kind, values)) for cid, kind, values, hit, normals in _KINDS
              if any(isinstance(obj, kind) for spec in specs for obj in spec.objects)]

    # floor and wall: every ray hits one of them (rays point down or forward, the wall is infinite)
    t_floor = torch.where(d[..., 1] < 0, -o[..., 1] / d[..., 1].clamp(max=-1e-12), _BIG)
    wall_z = -_spec_tensor(specs, lambda s: s.wall_distance)[:, None]
    t_wall = torch.where(d[..., 2] < 0, (wall_z - o[..., 2]) / d[..., 2].clamp(max=-1e-12), _BIG)
    on_floor = t_floor < t_wall
    t = torch.minimum(t_floor, t_wall)
    seg = torch.where(on_floor, FLOOR, WALL)
    normal = torch.zeros_like(d)
    normal[..., 1] = on_floor.float()
    normal[..., 2] = (~on_floor).float()
    hit = o + t[..., None] * d
    albedo = _background_albedo(specs, hit, on_floor)

    if packed:
        t_obj, cls, n_obj, color = _nearest(o, d, packed)
        closer = t_obj < t
        t = torch.where(closer, t_obj, t)
        seg = torch.where(closer, cls, seg)
        normal = torch.where(closer[..., None], n_obj, normal)
        albedo = torch.where(closer[..., None], color, albedo)
        hit = o + t[..., None] * d

    rgb = _shade(specs, albedo, normal, hit, packed)
    normal_cam = normal @ rotation  # camera = R^T world
    normal_cam = normal_cam / normal_cam.norm(dim=-1, keepdim=True)
    batch = len(specs)
    return Rendered(
        rgb.reshape(batch, size, size, 3).permute(0, 3, 1, 2).contiguous(),
        seg.reshape(batch, size, size),
        t.reshape(batch, 1, size, size),
        normal_cam.reshape(batch, size, size, 3).permute(0, 3, 1, 2).contiguous(),
    )


def _background_albedo(specs: Sequence[SceneSpec], hit: torch.Tensor, on_floor: torch.Tensor) -> torch.Tensor:
    """Floor: checkerboard of (tile, contrast); wall: vertical sine stripes of (frequency, contrast, phase)."""
    tile = _spec_tensor(specs, lambda s: s.checker[0])[:, None]
    contrast = _spec_tensor(specs, lambda s: s.checker[1])[:, None]
    parity = (torch.floor(hit[..., 0] / tile) + torch.floor(hit[..., 2] / tile)).remainder(2)
    floor_factor = 1 + contrast * (parity - 0.5)
    freq, amp, phase = (_spec_tensor(specs, lambda s, i=i: s.stripes[i])[:, None] for i in range(3))
    wall_factor = 1 + amp * torch.sin(freq * hit[..., 0] + phase)
    floor = _spec_tensor(specs, lambda s: s.floor_color)[:, None] * floor_factor[..., None]
    wall = _spec_tensor(specs, lambda s: s.wall_color)[:, None] * wall_factor[..., None]
    return torch.where(on_floor[..., None], floor, wall)


def _shade(specs: Sequence[SceneSpec], albedo: torch.Tensor, normal: torch.Tensor, hit: torch.Tensor,
           packed) -> torch.Tensor:
    light = F.normalize(_spec_tensor(specs, lambda s: s.light), dim=-1)[:, None]  # (B, 1, 3)
    lambert = (normal * light).sum(-1).clamp(min=0)
    shadowed = [spec.shadows for spec in specs]
    if packed and any(shadowed):
        t_block = _nearest(hit + 1e-3 * normal, light, packed, shade=False)[0]
        blocked = (t_block < _BIG) & torch.tensor(shadowed)[:, None]
        lambert = torch.where(blocked, 0.0, lambert)
    ambient = _spec_tensor(specs, lambda s: s.ambient)[:, None, None]
    rgb = albedo * (ambient + (1 - ambient) * lambert[..., None])
    for b, spec in enumerate(specs):
        if spec.noise > 0:
            generator = torch.Generator().manual_seed(spec.noise_seed)
            rgb[b] += spec.noise * torch.randn(rgb.shape[1:], generator=generator)
    return rgb.clamp_(0, 1)


def render(objects: Sequence[Primitive], camera: Camera | None = None, size: int = 64, **appearance) -> Rendered:
    """Render one scene of ``objects`` (on a floor at y = 0, before a back wall) from ``camera``.

    ``appearance``: any other :class:`SceneSpec` field (``wall_distance=8.0``, ``light``, ``ambient``,
    ``noise=0.0``...). Returns :class:`Rendered` without a batch dimension. Exact by construction: for a
    sphere of radius r whose centre lies on the optical axis at distance D, the centre pixel (odd ``size``)
    has depth D - r and normal (0, 0, 1).
    """
    bad = [obj for obj in objects if not isinstance(obj, (Sphere, Box, Cylinder))]
    if bad:
        raise AuxwrapArgumentError(f"objects: expected Sphere, Box or Cylinder instances, got {bad[0]!r}")
    unknown = set(appearance) - (set(SceneSpec.__dataclass_fields__) - {"objects", "camera"})
    if unknown:
        raise AuxwrapArgumentError(f"{sorted(unknown)[0]}: not a SceneSpec field")
    spec = SceneSpec(objects=tuple(objects), camera=camera or Camera(), **appearance)
    return Rendered(*(x[0] for x in render_specs([spec], size)))


def _random_spec(rng: np.random.Generator) -> SceneSpec:
    """A random scene: camera, wall, 2-5 non-overlapping objects on the floor, light and appearance.

    Colours of every class come from overlapping ranges, so that segmentation needs shape and context.
    """
    camera = Camera(height=rng.uniform(1.3, 1.9), pitch=rng.uniform(12, 26), fov=rng.uniform(55, 65))
    wall = rng.uniform(7, 10)
    half_fov = math.tan(math.radians(camera.fov) / 2)
    placed: list[tuple[float, float, float]] = []  # x, z, footprint radius
    objects: list[Primitive] = []
    for _ in range(rng.integers(2, 6)):
        kind = rng.integers(0, 3)
        for _attempt in range(20):
            z = -rng.uniform(2.5, wall - 1.0)
            x = rng.uniform(-0.8, 0.8) * (-z) * half_fov
            color = tuple(rng.uniform(0.15, 0.95, 3))
            if kind == 0:
                r = rng.uniform(0.35, 0.9)
                obj, reach = Sphere((x, r, z), r, color), r
            elif kind == 1:
                hx, hz, h = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.5, 1.6)
                obj, reach = Box((x - hx, 0.0, z - hz), (x + hx, h, z + hz), color), math.hypot(hx, hz)
            else:
                r = rng.uniform(0.25, 0.55)
                obj, reach = Cylinder((x, 0.0, z), r, rng.uniform(0.6, 2.0), color), r
            free = all(math.hypot(x - px, z - pz) > reach + pr + 0.05 for px, pz, pr in placed)
            if free and z - reach > -wall:
                placed.append((x, z, reach))
                objects.append(obj)
                break
    azimuth, elevation = rng.uniform(-80, 80), rng.uniform(30, 75)
    el, az = math.radians(elevation), math.radians(azimuth)
    return SceneSpec(
        objects=tuple(objects), camera=camera, wall_distance=wall,
        light=(math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)),
        ambient=rng.uniform(0.2, 0.45),
        floor_color=tuple(rng.uniform(0.2, 0.9, 3)), wall_color=tuple(rng.uniform(0.2, 0.9, 3)),
        checker=(rng.uniform(0.4, 1.2), rng.uniform(0.0, 0.35)),
        stripes=(rng.uniform(1.0, 6.0), rng.uniform(0.0, 0.2), rng.uniform(0, 2 * math.pi)),
        noise=rng.uniform(0.01, 0.04), noise_seed=int(rng.integers(2**62)),
    )


class Scenes(TensorDataset):
    """Rendered scenes: items ``(rgb, segmentation, depth, normals)``; ``specs`` holds each scene's parameters."""

    classes = CLASSES

    def __init__(self, rendered: Rendered, specs: list[SceneSpec]):
        super().__init__(*rendered)
        self.specs = specs

    @property
    def rendered(self) -> Rendered:
        return Rendered(*self.tensors)


def scenes(n: int, size: int = 64, seed: int = 0, split: str = "train", *, chunk: int = 32) -> Scenes:
    """``n`` random scenes (2-5 objects: spheres, boxes, cylinders) with exact per-pixel labels, for dense tasks.

    Items: rgb (3, size, size) float in [0, 1]; segmentation (size, size) long ids of :data:`CLASSES`
    (floor 0, wall 1, sphere 2, box 3, cylinder 4); depth (1, size, size) float, distance along the viewing
    axis in world units (about 1 to 12); normals (3, size, size) unit vectors in camera coordinates (x right,
    y up, z towards the viewer; see :class:`Camera`). Scene i depends only on (seed, split, i): a larger ``n``
    extends a smaller one, and other seeds or splits give other scenes. Rendered ``chunk`` scenes at a time.
    """
    n = check_int("n", n, 1)
    size = check_int("size", size, 1)
    seed = check_int("seed", seed, 0)
    chunk = check_int("chunk", chunk, 1)
    which = _check_split(split)
    specs = [_random_spec(np.random.default_rng([seed, which, i, 23])) for i in range(n)]
    parts = [render_specs(specs[i:i + chunk], size) for i in range(0, n, chunk)]
    return Scenes(Rendered(*(torch.cat(p) for p in zip(*parts, strict=True))), specs)


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def _labels(pred: torch.Tensor, target: torch.Tensor, name: str = "pred") -> torch.Tensor:
    """Class ids from ``pred``: itself if shaped like ``target``, else the argmax over dim 1 (logits)."""
    if pred.dim() == target.dim() + 1:
        pred = pred.argmax(1)
    if pred.shape != target.shape:
        raise AuxwrapArgumentError(
            f"{name}: shape {tuple(pred.shape)} matches neither target {tuple(target.shape)} nor its logits")
    return pred


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of correct classifications; ``logits`` (N, C) or predicted ids (N,)."""
    pred = _labels(logits, labels, "logits")
    if labels.numel() == 0:
        raise AuxwrapArgumentError("labels: expected at least one label")
    return (pred == labels).float().mean().item()


def pixel_accuracy(pred: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None) -> float:
    """Fraction of pixels labelled correctly; ``pred`` ids like ``target`` or logits (N, C, H, W)."""
    pred = _labels(pred, target)
    keep = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    if not keep.any():
        raise AuxwrapArgumentError("target: no pixel to score")
    return (pred[keep] == target[keep]).float().mean().item()


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int | None = None) -> torch.Tensor:
    """(num_classes, num_classes) counts, rows = target class, columns = predicted class."""
    num_classes = check_int("num_classes", num_classes, 1)
    pred = _labels(pred, target)
    keep = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    pred, target = pred[keep].long(), target[keep].long()
    for name, ids in (("pred", pred), ("target", target)):
        if ids.numel() and (ids.min() < 0 or ids.max() >= num_classes):
            raise AuxwrapArgumentError(f"{name}: class ids must lie in [0, num_classes={num_classes})")
    return torch.bincount(target * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = None) -> float:
    """Mean intersection over union over the classes present in ``target`` or ``pred`` (others are skipped).

    ``pred``: class ids shaped like ``target`` or logits with classes on dim 1.
    """
    conf = confusion_matrix(pred, target, num_classes, ignore_index).double()
    intersection = conf.diag()
    union = conf.sum(0) + conf.sum(1) - intersection
    present = union > 0
    if not present.any():
        raise AuxwrapArgumentError("target: no pixel to score")
    return (intersection[present] / union[present]).mean().item()


def normal_errors(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                  dim: int = -3) -> dict[str, float]:
    """Angle errors of surface normals, as in the NYUv2 papers: mean and median degrees, fraction within
    11.25, 22.5 and 30 degrees. Vectors lie along ``dim`` (default -3: (N, 3, H, W) or (3, H, W)); both are
    normalised first. ``mask`` (the shape without ``dim``, bool) picks the pixels to score.
    """
    if pred.shape != target.shape or pred.shape[dim] != 3:
        raise AuxwrapArgumentError(f"pred: expected the shape of target with 3 along dim {dim}, got "
                                   f"{tuple(pred.shape)} and {tuple(target.shape)}")
    p, t = F.normalize(pred.double(), dim=dim), F.normalize(target.double(), dim=dim)
    # 2 atan2(|p - t|, |p + t|): accurate near 0 and 180 degrees (unlike acos), exactly 0 for equal vectors
    angles = torch.rad2deg(2 * torch.atan2((p - t).norm(dim=dim), (p + t).norm(dim=dim)))
    if mask is not None:
        if mask.shape != angles.shape:
            raise AuxwrapArgumentError(f"mask: expected shape {tuple(angles.shape)}, got {tuple(mask.shape)}")
        angles = angles[mask.bool()]
    angles = angles.flatten()
    if angles.numel() == 0:
        raise AuxwrapArgumentError("mask: no pixel to score")
    return {
        "mean": angles.mean().item(),
        "median": float(np.median(angles.numpy())),
        "within_11.25": (angles < 11.25).double().mean().item(),
        "within_22.5": (angles < 22.5).double().mean().item(),
        "within_30": (angles < 30).double().mean().item(),
    }
