"""Properties of the prompt frames (hypothesis): input voxel <-> world <-> crop.

* voxel -> world -> voxel is the identity for random invertible affines: oblique, flipped, LPS,
  anisotropic;
* input -> crop -> input is the identity, and a crop-frame index reads the same voxel of the
  preprocessed crop as the input index it came from;
* a box (or points) given in world millimetres equals the same box given in voxels after
  `build_prompts`, whatever the affine's orientation;
* boxes come out ordered (min <= max per axis) and clipped inside the volume, and boxes farther
  than half a voxel outside are refused with a PromptError.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from segevol_fast.errors import PreprocessError, PromptError, SegVolFastError
from segevol_fast.inference.prompts import build_prompts, crop_to_input, input_to_crop
from segevol_fast.io import Volume
from segevol_fast.preprocess import preprocess

pytestmark = pytest.mark.usefixtures("one_thread")

coords_f = st.floats(-500, 500, allow_nan=False, allow_infinity=False)


@st.composite
def affines(draw):
    """Invertible (4, 4) voxel -> world maps: a rotation (any, from a unit quaternion), optional
    axis flips, an LPS/RAS sign flip, spacings 0.2..5 mm and an origin."""
    q = np.array([draw(st.floats(-1, 1)) for _ in range(4)])
    if np.linalg.norm(q) < 1e-3:  # degenerate quaternion: no rotation
        q = np.array([1.0, 0, 0, 0])
    if draw(st.booleans()):  # half the cases axis-aligned, as most scanners write
        q = np.array([1.0, 0, 0, 0])
    w, x, y, z = q / np.linalg.norm(q)
    rot = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )
    flips = np.diag([draw(st.sampled_from([-1.0, 1.0])) for _ in range(3)])
    lps = np.diag([-1.0, -1.0, 1.0]) if draw(st.booleans()) else np.eye(3)
    spacing = np.diag([draw(st.floats(0.2, 5.0)) for _ in range(3)])
    aff = np.eye(4)
    aff[:3, :3] = lps @ rot @ flips @ spacing
    aff[:3, 3] = [draw(coords_f) for _ in range(3)]
    return aff


shapes = st.tuples(*[st.integers(2, 30)] * 3)


@st.composite
def inside(draw, shape, n=1, integer=False):
    """n points (i, j, k) inside a volume of `shape` (voxel centres 0..s-1, fractional or not)."""
    elem = [st.integers(0, s - 1) if integer else st.floats(0, s - 1) for s in shape]
    return np.array([[draw(e) for e in elem] for _ in range(n)], dtype=np.float64)


@given(affines(), st.lists(st.tuples(coords_f, coords_f, coords_f), min_size=1, max_size=5))
def test_voxel_world_voxel_round_trip(aff, pts):
    vol = Volume(np.zeros((2, 2, 2), np.int16), aff)
    p = np.array(pts)
    world = vol.voxel_to_world(p)
    back = vol.world_to_voxel(world)
    np.testing.assert_allclose(back, p, rtol=0, atol=1e-9 * (1 + np.abs(p).max()))
    # and the other way, from world points
    np.testing.assert_allclose(
        vol.voxel_to_world(vol.world_to_voxel(p)),
        p,
        rtol=0,
        atol=1e-9 * (1 + np.abs(p).max()) * np.abs(aff[:3, :3]).max() * 5,
    )
    # the affine's own meaning: voxel (0, 0, 0) is the origin, a unit step along i is column 0
    np.testing.assert_allclose(vol.voxel_to_world([0, 0, 0]), aff[:3, 3])
    np.testing.assert_allclose(vol.voxel_to_world([1, 0, 0]) - aff[:3, 3], aff[:3, 0], atol=1e-12)


@given(shapes, st.data())
def test_input_crop_input_round_trip(shape, data):
    start = tuple(data.draw(st.integers(0, 200)) for _ in range(3))
    pts = data.draw(inside(shape, n=4))
    crop = input_to_crop(pts, start)
    np.testing.assert_allclose(crop_to_input(crop, start), pts, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(crop, pts[:, ::-1] - np.array(start))  # (d, h, w) = (k, j, i) - start
    ints = data.draw(inside(shape, n=4, integer=True))
    np.testing.assert_array_equal(crop_to_input(input_to_crop(ints, start), start), ints)  # exact


@given(shapes, st.integers(0, 2**32 - 1), st.data())
def test_a_crop_index_reads_the_input_voxel_it_came_from(shape, seed, data):
    rng = np.random.default_rng(seed)
    x = rng.integers(-1000, 1000, size=shape).astype(np.int16)
    try:
        prep = preprocess(x)
    except PreprocessError:  # a tiny volume whose foreground is one value: nothing to crop
        return
    (z0, y0, x0), (z1, y1, x1) = prep.start, prep.end
    p = np.array([[data.draw(st.integers(a, b - 1)) for a, b in ((x0, x1), (y0, y1), (z0, z1))]])
    d, h, w = (int(v) for v in input_to_crop(p, prep.start)[0])
    lo, hi = float(np.float32(prep.stats.lower)), float(np.float32(prep.stats.upper))
    want = (min(max(float(x[tuple(p[0].astype(int))]), lo), hi) - lo) / (hi - lo)
    assert float(prep.image[0, 0, d, h, w]) == pytest.approx(want, abs=2e-6)


def _world(aff, xyz):
    return np.asarray(xyz, np.float64) @ aff[:3, :3].T + aff[:3, 3]


@given(affines(), shapes, st.data())
def test_world_boxes_and_points_equal_the_same_voxel_boxes(aff, shape, data):
    corners = data.draw(inside(shape, n=2))
    pts = data.draw(inside(shape, n=data.draw(st.integers(1, 3))))
    start = tuple(data.draw(st.integers(0, s - 1)) for s in reversed(shape))
    text = data.draw(st.sampled_from([None, "liver", ["liver", "spleen"]]))
    vox = build_prompts(text, corners.reshape(6), pts, shape=shape, start=start)
    world = build_prompts(
        text, _world(aff, corners).reshape(6), _world(aff, pts), shape=shape, start=start, coords="world", affine=aff
    )
    assert [p.label for p in vox] == [p.label for p in world]
    for a, b in zip(vox, world):
        np.testing.assert_allclose(b.box, a.box, rtol=0, atol=1e-6)
        np.testing.assert_allclose(b.points, a.points, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(b.point_labels, a.point_labels)


@given(shapes, st.data())
def test_boxes_are_ordered_and_clipped_inside_the_volume(shape, data):
    # corners anywhere up to half a voxel outside (accepted, clipped), given in any order
    corners = np.array([[data.draw(st.floats(-0.5, s - 0.5)) for s in shape] for _ in range(2)])
    start = tuple(data.draw(st.integers(0, s - 1)) for s in reversed(shape))
    (p,) = build_prompts(box=corners.reshape(6), shape=shape, start=start)
    lo, hi = p.box[:3], p.box[3:]
    assert (lo <= hi).all()
    # back in input voxels, both corners lie on the grid 0..s-1 and are the clipped min / max corners
    in_lo, in_hi = crop_to_input(lo, start), crop_to_input(hi, start)
    limit = np.array(shape, np.float64) - 1
    np.testing.assert_allclose(in_lo, np.clip(corners.min(axis=0), 0, limit), atol=1e-12)
    np.testing.assert_allclose(in_hi, np.clip(corners.max(axis=0), 0, limit), atol=1e-12)


@given(shapes, st.data())
def test_boxes_and_points_beyond_half_a_voxel_outside_are_refused(shape, data):
    axis = data.draw(st.integers(0, 2))
    beyond = data.draw(st.sampled_from([-1.0, shape[axis] - 0.5 + 1e-3, shape[axis] + 10.0]))
    corner = np.zeros(3)
    corner[axis] = beyond
    box = np.concatenate([np.zeros(3), corner])
    with pytest.raises(PromptError, match="outside the volume") as info:
        build_prompts(box=box, shape=shape, start=(0, 0, 0))
    assert isinstance(info.value, SegVolFastError) and isinstance(info.value, ValueError)
    with pytest.raises(PromptError, match="outside the volume"):
        build_prompts("liver", points=corner, shape=shape, start=(0, 0, 0))
