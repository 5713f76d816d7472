"""World <-> voxel for napari layers: the layer transform puts every voxel where the volume's affine
says, for axis-aligned, flipped, permuted and oblique affines; a permuted scan's layer axes run
along the world's; the two conversions invert each other."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from nibabel.affines import apply_affine

from segevol_fast.errors import ArgumentTypeError, ShapeError, VolumeError
from segevol_fast.io import Volume
from segevol_fast.viewer.coords import LayerTransform, image_transform, voxel_to_world, world_to_voxel


def napari_world(layer_points: np.ndarray, kwargs: dict) -> np.ndarray:
    """napari's own composition of a layer's keyword arguments, written out independently of
    LayerTransform: world = affine @ (scale * data + translate), data in the layer's axis order."""
    physical = layer_points * np.asarray(kwargs["scale"]) + np.asarray(kwargs["translate"])
    return apply_affine(kwargs.get("affine", np.eye(4)), physical)


PERMUTATIONS = list(itertools.permutations(range(3)))  # the identity first


def random_affine(rng: np.random.Generator, kind: str) -> np.ndarray:
    """A voxel -> RAS affine like real headers give: spacing 0.3..5 mm, signs from RAS / LPS / LAS
    storage, an origin anywhere; "oblique" adds a rotation and a shear, "permuted" swaps axes (PSR)."""
    signs = rng.choice([-1.0, 1.0], size=3)
    linear = np.diag(signs * rng.uniform(0.3, 5.0, size=3))
    if kind == "oblique":
        shear = np.eye(3) + np.triu(rng.uniform(-0.2, 0.2, size=(3, 3)), 1)
        rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))  # orthonormal, a reflection or not
        linear = rotation @ shear @ linear
    elif kind == "permuted":  # stored axes along other world axes, never in order (PSR, ASL, ...)
        linear = linear[list(PERMUTATIONS[rng.integers(1, 6)])]
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = rng.uniform(-300, 300, size=3)
    return affine


def volume_with(affine: np.ndarray, shape=(7, 5, 4)) -> Volume:
    return Volume(np.zeros(shape, np.int16), affine)


@pytest.mark.parametrize("kind", ["aligned", "oblique", "permuted"])
def test_random_affines_round_trip_and_match_nibabel(fresh_seed, kind):
    rng = np.random.default_rng(fresh_seed)
    for _ in range(25):
        affine = random_affine(rng, kind)
        t = image_transform(volume_with(affine))
        assert (t.affine is None) == (kind != "oblique")
        assert (t.axes == (0, 1, 2)) == (kind == "aligned") or kind == "oblique"
        voxels = rng.uniform(-3, 12, size=(40, 3))
        world = voxel_to_world(voxels, t)
        np.testing.assert_allclose(world, apply_affine(affine, voxels), rtol=0, atol=1e-9)
        layer_points = voxels[:, list(t.axes)]  # voxel (i, j, k) in the layer's axis order
        np.testing.assert_allclose(napari_world(layer_points, t.layer_kwargs()), world, rtol=0, atol=1e-9)
        np.testing.assert_allclose(world_to_voxel(world, t), voxels, rtol=0, atol=1e-9)
        points = rng.uniform(-500, 500, size=(40, 3))
        np.testing.assert_allclose(voxel_to_world(world_to_voxel(points, t), t), points, rtol=0, atol=1e-8)


def test_a_permuted_scan_is_shown_with_its_axes_along_the_world_axes(fresh_seed):
    """napari slices only along a layer's own axes: a step along layer axis a must move along world
    axis a alone, and the layer data must hold the scan's voxels at the reordered indices."""
    rng = np.random.default_rng(fresh_seed)
    for axes in PERMUTATIONS:
        affine = np.eye(4)
        affine[:3, :3] = np.diag(rng.choice([-1.0, 1.0], 3) * rng.uniform(0.3, 5.0, 3))[:, np.argsort(axes)]
        volume = Volume(rng.integers(-1000, 1000, size=(7, 5, 4)).astype(np.int16), affine)
        t = image_transform(volume)
        assert t.axes == axes and t.affine is None
        steps = napari_world(np.eye(3), t.layer_kwargs()) - napari_world(np.zeros((1, 3)), t.layer_kwargs())
        np.testing.assert_array_equal(steps == 0, ~np.eye(3, dtype=bool))
        layer = t.to_layer(volume.array)
        assert layer.shape == tuple(volume.shape[a] for a in axes) and np.shares_memory(layer, volume.array)
        voxel = (6, 1, 3)
        assert layer[tuple(voxel[a] for a in axes)] == volume.array[voxel]
        np.testing.assert_array_equal(t.from_layer(layer), volume.array)
    assert t.to_layer(volume.array) is not volume.array  # the last order was not the stored one
    assert image_transform(volume_with(np.diag([2.0, 3.0, 4.0, 1.0]))).to_layer(volume.array) is volume.array


def test_flips_stay_a_signed_scale():
    """LPS storage (x and y flipped) is a diagonal affine: napari gets negative scales, no affine."""
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])
    affine[:3, 3] = [120.0, 90.0, -40.0]
    t = image_transform(volume_with(affine))
    assert t.affine is None and t.scale == (-0.8, -0.8, 2.5) and t.translate == (120.0, 90.0, -40.0)
    assert set(t.layer_kwargs()) == {"scale", "translate"}
    np.testing.assert_allclose(voxel_to_world([[1, 2, 3]], t), [[119.2, 88.4, -32.5]])


def test_header_noise_is_not_a_rotation():
    """Off-diagonal terms of 1e-9 mm (float rounding in a header) keep the simple scale/translate form,
    and the voxel lands within a nanometre-scale error of where the exact affine puts it."""
    affine = np.diag([0.7, 0.7, 3.0, 1.0])
    affine[0, 1] = affine[2, 0] = 1e-9
    t = image_transform(volume_with(affine))
    assert t.affine is None
    np.testing.assert_allclose(voxel_to_world([[6, 4, 3]], t), apply_affine(affine, [[6, 4, 3]]), atol=1e-7)
    affine[0, 1] = 0.05  # a real shear goes whole into the affine
    assert image_transform(volume_with(affine)).affine is not None


def test_the_transform_is_read_only_and_kwargs_are_copies():
    affine = random_affine(np.random.default_rng(0), "oblique")
    t = image_transform(volume_with(affine))
    with pytest.raises(ValueError):
        t.affine[0, 0] = 5.0
    kwargs = t.layer_kwargs()
    kwargs["affine"][0, 0] = 5.0
    assert t.affine[0, 0] == affine[0, 0]


def test_bad_input_is_a_typed_error():
    t = LayerTransform((1.0, 2.0, 3.0), (0.0, 0.0, 0.0))
    with pytest.raises(ShapeError):
        world_to_voxel([1.0, 2.0, 3.0], t)  # one point must still be a (1, 3) row
    with pytest.raises(ShapeError):
        voxel_to_world(np.zeros((4, 2)), t)
    with pytest.raises(VolumeError):
        voxel_to_world([[np.nan, 0, 0]], t)
    with pytest.raises(VolumeError):
        LayerTransform((1.0, 0.0, 1.0), (0.0, 0.0, 0.0))
    with pytest.raises(VolumeError):
        LayerTransform((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), affine=np.diag([1.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ShapeError):
        LayerTransform((1.0, 1.0), (0.0, 0.0, 0.0))
    with pytest.raises(VolumeError):
        LayerTransform((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), axes=(0, 0, 2))
    with pytest.raises(ArgumentTypeError):
        image_transform(np.zeros((3, 3, 3)))
