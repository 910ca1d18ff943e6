import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from auxwrap.demo import data
from auxwrap.errors import AuxwrapArgumentError

# ---------------------------------------------------------------------------------------------- digit pairs


@pytest.fixture(scope="module")
def digits():
    bunch = load_digits()
    return torch.from_numpy(bunch.images / 16.0).float(), torch.from_numpy(bunch.target)


def test_digit_pairs_shapes_dtypes_and_ranges():
    ds = data.digit_pairs("train", n=200)
    image, primary, aux = ds.tensors
    assert len(ds) == 200 and len(ds[0]) == 3
    assert image.shape == (200, 1, 16, 16) and image.dtype == torch.float32
    assert image.min() >= 0 and image.max() == 1
    assert primary.dtype == torch.long and aux.dtype == torch.long
    assert set(primary.tolist()) == set(range(10)) and set(aux.tolist()) == set(range(10))
    assert ds.source_indices.shape == (200, 2) and ds.offsets.shape == (200, 2, 2)


def test_digit_pairs_rgb_and_resize():
    grey = data.digit_pairs("val", n=20).images
    rgb = data.digit_pairs("val", n=20, channels=3).images
    assert rgb.shape == (20, 3, 16, 16)
    assert torch.equal(rgb[:, 0], grey[:, 0]) and torch.equal(rgb[:, 2], grey[:, 0])
    big = data.digit_pairs("val", n=20, size=32).images
    assert big.shape == (20, 1, 32, 32) and big.min() >= 0 and big.max() <= 1


def test_digit_pairs_deterministic_per_seed_and_different_across_seeds():
    a, b = data.digit_pairs("train", n=100, seed=3), data.digit_pairs("train", n=100, seed=3)
    for x, y in zip(a.tensors, b.tensors, strict=True):
        assert torch.equal(x, y)
    c = data.digit_pairs("train", n=100, seed=4)
    assert not torch.equal(a.source_indices, c.source_indices)
    assert not torch.equal(a.images, c.images)


def test_digit_splits_use_disjoint_stratified_source_images(digits):
    _, targets = digits
    pools = {split: set(data.digit_split_indices(split).tolist()) for split in data.SPLITS}
    assert not pools["train"] & pools["val"] and not pools["train"] & pools["test"]
    assert not pools["val"] & pools["test"]
    assert set().union(*pools.values()) == set(range(len(targets)))
    for split, fraction in zip(data.SPLITS, data.SPLIT_FRACTIONS, strict=True):
        counts = torch.bincount(targets[sorted(pools[split])], minlength=10)
        expected = fraction * torch.bincount(targets, minlength=10)
        assert (counts - expected).abs().max() <= 1, split
        used = set(data.digit_pairs(split, n=500).source_indices.flatten().tolist())
        assert used <= pools[split], split
    # another split_seed gives another partition
    assert set(data.digit_split_indices("test", split_seed=1).tolist()) != pools["test"]


def test_labels_and_pixels_of_known_pairs(digits):
    images, targets = digits
    pairs = torch.tensor([[0, 5], [11, 1], [3, 3]])
    ds = data.compose_pairs(pairs, aux=("right", "sum", "equal"))
    _, primary, right, total, equal = ds.tensors
    assert primary.tolist() == targets[pairs[:, 0]].tolist()
    assert right.tolist() == targets[pairs[:, 1]].tolist()
    assert total.tolist() == (targets[pairs[:, 0]] + targets[pairs[:, 1]]).tolist()
    assert equal.tolist() == (targets[pairs[:, 0]] == targets[pairs[:, 1]]).long().tolist()
    assert equal[2] == 1  # the same image twice
    expected = torch.zeros(3, 16, 16)
    expected[:, 1:9, 1:9] = images[pairs[:, 0]]
    expected[:, 7:15, 7:15] = torch.maximum(expected[:, 7:15, 7:15], images[pairs[:, 1]])
    assert torch.equal(ds.images[:, 0], expected)


def test_jitter_moves_digits_within_the_canvas():
    still = data.digit_pairs("train", n=300, jitter=0)
    assert (still.offsets == torch.tensor([data.LEFT_AT, data.RIGHT_AT])).all()
    moved = data.digit_pairs("train", n=300, jitter=1)
    shift = moved.offsets - torch.tensor([data.LEFT_AT, data.RIGHT_AT])
    assert set(shift.flatten().tolist()) == {-1, 0, 1}
    rebuilt = data.compose_pairs(moved.source_indices, moved.offsets)
    assert torch.equal(rebuilt.images, moved.images)


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"split": "dev"}, "split"), ({"n": 0}, "n"), ({"channels": 2}, "channels"), ({"aux": "parity"}, "aux"),
    ({"jitter": 2}, "jitter"), ({"seed": -1}, "seed"),
])
def test_digit_pairs_bad_arguments(kwargs, name):
    with pytest.raises(AuxwrapArgumentError, match=name):
        data.digit_pairs(**{"n": 10, **kwargs})


# ---------------------------------------------------------------------------------------------- scenes


@pytest.fixture(scope="module")
def batch():
    return data.scenes(12, size=32, seed=0)


def _world(camera: data.Camera, depth: torch.Tensor, normals: torch.Tensor, size: int):
    """World hit points and world normals (H, W, 3) from one scene's depth and camera-space normals."""
    rotation = camera.rotation()
    hit_cam = depth[0, ..., None] * data.pixel_rays(camera, size)
    hit = hit_cam @ rotation.T + torch.tensor([0.0, camera.height, 0.0])
    return hit, normals.permute(1, 2, 0) @ rotation.T


def test_scene_shapes_dtypes_and_ranges(batch):
    rgb, seg, depth, normals = batch.tensors
    assert rgb.shape == (12, 3, 32, 32) and rgb.dtype == torch.float32
    assert seg.shape == (12, 32, 32) and seg.dtype == torch.long
    assert depth.shape == (12, 1, 32, 32) and normals.shape == (12, 3, 32, 32)
    assert rgb.min() >= 0 and rgb.max() <= 1 and rgb.std() > 0.05
    assert ((seg >= 0) & (seg < len(data.CLASSES))).all()
    assert set(seg.unique().tolist()) == set(range(len(data.CLASSES)))
    assert torch.isfinite(depth).all() and depth.min() > 0
    assert torch.allclose(normals.norm(dim=1), torch.ones(12, 32, 32), atol=1e-5)
    assert len(batch[0]) == 4 and all(2 <= len(spec.objects) <= 5 for spec in batch.specs)


def test_scenes_deterministic_and_different_across_seeds_and_splits(batch):
    again = data.scenes(5, size=32, seed=0)
    for x, y in zip(again.tensors, batch.tensors, strict=True):
        assert torch.equal(x, y[:5])
    other_seed = data.scenes(5, size=32, seed=1)
    other_split = data.scenes(5, size=32, seed=0, split="test")
    for other in (other_seed, other_split):
        assert not any(torch.equal(other.tensors[0][i], batch.tensors[0][j]) for i in range(5) for j in range(12))
        assert all(a != b for a in other.specs for b in batch.specs)


def test_floor_and_wall_labels_are_exact(batch):
    rgb, seg, depth, normals = batch.tensors
    for i, spec in enumerate(batch.specs):
        pitch = math.radians(spec.camera.pitch)
        up = torch.tensor([0.0, math.cos(pitch), math.sin(pitch)])
        towards_camera = torch.tensor([0.0, -math.sin(pitch), math.cos(pitch)])
        floor, wall = seg[i] == data.FLOOR, seg[i] == data.WALL
        n = normals[i].permute(1, 2, 0)
        assert floor.any() and wall.any()
        assert torch.allclose(n[floor], up.expand_as(n[floor]), atol=1e-6)
        assert (n[floor][:, 1] > 0.8).all()  # floor normals point up in camera coordinates
        assert torch.allclose(n[wall], towards_camera.expand_as(n[wall]), atol=1e-6)
        hit, _ = _world(spec.camera, depth[i], normals[i], 32)
        assert hit[floor][:, 1].abs().max() < 1e-4  # floor pixels lie on y = 0
        assert (hit[wall][:, 2] + spec.wall_distance).abs().max() < 1e-3  # wall pixels on z = -wall_distance


def test_all_normals_face_the_camera(batch):
    _, _, _, normals = batch.tensors
    for i, spec in enumerate(batch.specs):
        rays = data.pixel_rays(spec.camera, 32)
        assert ((normals[i].permute(1, 2, 0) * rays).sum(-1) < 0).all()


def test_sphere_depth_and_normals_are_analytic():
    camera = data.Camera(height=1.5, pitch=0.0, fov=40.0)
    out = data.render([data.Sphere((0.0, 1.5, -5.0), 1.0)], camera, size=33)
    assert out.segmentation[16, 16] == data.SPHERE
    assert out.depth[0, 16, 16].item() == pytest.approx(4.0, abs=1e-5)
    assert torch.allclose(out.normals[:, 16, 16], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)
    sphere = out.segmentation == data.SPHERE
    hit = out.depth[0, ..., None] * data.pixel_rays(camera, 33)  # camera coordinates, centre at (0, 0, -5)
    outward = hit - torch.tensor([0.0, 0.0, -5.0])
    assert sphere.sum() > 100
    assert torch.allclose(outward[sphere].norm(dim=-1), torch.ones(int(sphere.sum())), atol=1e-4)
    assert torch.allclose(out.normals.permute(1, 2, 0)[sphere], outward[sphere], atol=1e-4)


def test_nearer_object_occludes_and_boxes_have_face_normals():
    camera = data.Camera(height=1.0, pitch=0.0, fov=40.0)
    behind = data.Sphere((0.0, 1.0, -9.0), 3.0)
    box = data.Box((-1.0, 0.0, -6.0), (1.0, 2.0, -4.0))
    out = data.render([behind, box], camera, size=33, wall_distance=20.0)
    assert out.segmentation[16, 16] == data.BOX
    assert out.depth[0, 16, 16].item() == pytest.approx(4.0, abs=1e-5)
    box = out.segmentation == data.BOX
    hit, normal = _world(camera, out.depth, out.normals, 33)
    expected = torch.zeros_like(normal)  # the face each box pixel lies on: front z = -4, sides x = -1, x = 1
    for axis, value, sign in ((2, -4.0, 1.0), (0, -1.0, -1.0), (0, 1.0, 1.0)):
        expected[..., axis] += sign * ((hit[..., axis] - value).abs() < 1e-4).float()
    assert (expected[box].abs().sum(-1) == 1).all()
    assert torch.allclose(normal[box], expected[box], atol=1e-6)
    assert (out.segmentation == data.SPHERE).any()  # the sphere shows around the box


def test_cylinder_sides_are_radial_and_caps_point_up():
    camera = data.Camera(height=2.5, pitch=25.0, fov=50.0)
    cylinder = data.Cylinder((0.3, 0.0, -5.0), radius=0.8, height=1.5)
    out = data.render([cylinder], camera, size=48)
    hit, normal = _world(camera, out.depth, out.normals, 48)
    mask = out.segmentation == data.CYLINDER
    cap = mask & ((hit[..., 1] - 1.5).abs() < 1e-3)
    side = mask & ~cap
    assert cap.sum() > 20 and side.sum() > 20
    assert torch.allclose(normal[cap], torch.tensor([0.0, 1.0, 0.0]).expand_as(normal[cap]), atol=1e-5)
    radial = (hit[side] - torch.tensor([0.3, 0.0, -5.0])) * torch.tensor([1.0, 0.0, 1.0]) / 0.8
    assert torch.allclose(normal[side], radial, atol=1e-3)
    assert torch.allclose(radial.norm(dim=-1), torch.ones(len(radial)), atol=1e-3)


def test_shading_is_lambert_with_cast_shadows():
    camera = data.Camera(height=1.5, pitch=20.0, fov=60.0)
    light = (0.0, 1.0, 0.0)  # straight down: the sphere's shadow is right beneath it
    sphere = data.Sphere((0.0, 0.8, -4.0), 0.8)
    kwargs = {"light": light, "ambient": 0.25, "floor_color": (0.6, 0.4, 0.2), "wall_color": (0.5, 0.5, 0.5)}
    out = data.render([sphere], camera, size=64, **kwargs)
    hit, _ = _world(camera, out.depth, out.normals, 64)
    floor = out.segmentation == data.FLOOR
    below = floor & ((hit[..., 0] ** 2 + (hit[..., 2] + 4.0) ** 2) < 0.5**2)
    lit = floor & ~below & ((hit[..., 0] ** 2 + (hit[..., 2] + 4.0) ** 2) > 0.9**2)
    rgb = out.rgb.permute(1, 2, 0)
    assert below.any() and lit.any()
    assert torch.allclose(rgb[below], torch.tensor([0.6, 0.4, 0.2]) * 0.25, atol=1e-6)
    assert torch.allclose(rgb[lit], torch.tensor([0.6, 0.4, 0.2]), atol=1e-6)
    wall = out.segmentation == data.WALL  # the wall faces +z, lit at 90 degrees: ambient only
    assert torch.allclose(rgb[wall], torch.tensor([0.5, 0.5, 0.5]) * 0.25, atol=1e-6)
    no_shadow = data.render([sphere], camera, size=64, shadows=False, **kwargs)
    assert torch.allclose(no_shadow.rgb.permute(1, 2, 0)[below], torch.tensor([0.6, 0.4, 0.2]), atol=1e-6)


def test_empty_scene_is_floor_and_wall_only():
    out = data.render([], data.Camera(), size=16)
    assert set(out.segmentation.unique().tolist()) == {data.FLOOR, data.WALL}


@pytest.mark.parametrize(("make", "name"), [
    (lambda: data.Sphere((0, 0, -3), -1.0), "radius"),
    (lambda: data.Box((0, 0, 0), (1, -1, 1)), "hi"),
    (lambda: data.Camera(pitch=80.0), "pitch"),
    (lambda: data.scenes(2, split="dev"), "split"),
    (lambda: data.scenes(0), "n"),
    (lambda: data.render(["ball"]), "objects"),
    (lambda: data.render([], glow=1.0), "glow"),
    (lambda: data.render([], wall_distance=0.0), "wall_distance"),
])
def test_scene_bad_arguments(make, name):
    with pytest.raises(AuxwrapArgumentError, match=name):
        make()


# ---------------------------------------------------------------------------------------------- metrics


def test_classification_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 1])
    assert data.accuracy(logits, labels) == pytest.approx(0.75)
    assert data.accuracy(logits.argmax(1), labels) == pytest.approx(0.75)
    with pytest.raises(AuxwrapArgumentError, match="logits"):
        data.accuracy(logits[:3], labels)


def test_miou_and_pixel_accuracy_known_values():
    target = torch.tensor([[[0, 0], [1, 1]]])
    assert data.miou(target, target, num_classes=3) == 1.0
    assert data.pixel_accuracy(target, target) == 1.0
    pred = torch.tensor([[[0, 1], [1, 1]]])
    # class 0: intersection 1, union 2; class 1: intersection 2, union 3; class 2 absent: skipped
    assert data.miou(pred, target, num_classes=3) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert data.pixel_accuracy(pred, target) == pytest.approx(0.75)
    logits = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float()
    assert data.miou(logits, target, num_classes=3) == pytest.approx((1 / 2 + 2 / 3) / 2)
    wrong = torch.tensor([[[1, 1], [0, 0]]])
    assert data.miou(wrong, target, num_classes=2) == 0.0
    # pixels of target 0 ignored: class 1 is perfect, class 0 absent
    assert data.miou(pred, target, num_classes=2, ignore_index=0) == 1.0
    assert data.pixel_accuracy(pred, target, ignore_index=0) == 1.0
    with pytest.raises(AuxwrapArgumentError, match="num_classes"):
        data.miou(pred, target, num_classes=1)


def _normals_at(angles_deg):
    """(1, 3, 1, K) unit vectors at the given angles from +z, in the xz plane."""
    a = torch.deg2rad(torch.tensor(angles_deg, dtype=torch.float64))
    return torch.stack([a.sin(), torch.zeros_like(a), a.cos()])[None, :, None]


def test_normal_errors_known_values():
    normals = _unit(torch.randn(2, 3, 4, 5, dtype=torch.float64))
    same = data.normal_errors(normals, normals)
    assert same == {"mean": 0.0, "median": 0.0, "within_11.25": 1.0, "within_22.5": 1.0, "within_30": 1.0}
    z, x = _normals_at([0.0]), _normals_at([90.0])
    assert data.normal_errors(x, z)["mean"] == pytest.approx(90.0)
    assert data.normal_errors(5.0 * x, z)["mean"] == pytest.approx(90.0)  # predictions are normalised
    target = _normals_at([0.0] * 4)
    errors = data.normal_errors(7.0 * _normals_at([0.0, 10.0, 20.0, 90.0]), target)
    assert errors["mean"] == pytest.approx(30.0)
    assert errors["median"] == pytest.approx(15.0)
    assert (errors["within_11.25"], errors["within_22.5"], errors["within_30"]) == (0.5, 0.75, 0.75)
    mask = torch.tensor([[[True, True, False, False]]])
    assert data.normal_errors(_normals_at([0.0, 10.0, 20.0, 90.0]), target, mask=mask)["mean"] == pytest.approx(5.0)
    with pytest.raises(AuxwrapArgumentError, match="pred"):
        data.normal_errors(z[:, :2], z[:, :2])


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def test_scene_normals_score_zero_error_against_themselves(batch):
    _, seg, _, normals = batch.tensors
    assert data.normal_errors(normals, normals)["mean"] == 0.0
    flipped = normals * torch.tensor([1.0, -1.0, 1.0])[:, None, None]
    assert data.normal_errors(flipped, normals)["mean"] > 10
    assert np.isclose(data.miou(seg, seg, len(data.CLASSES)), 1.0)
