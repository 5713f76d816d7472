"""Rotations of a scan's content in world space: phantoms whose rotated answer is known exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from segevol_fast.errors import ArgumentTypeError, InvalidArgumentError, ShapeError
from segevol_fast.eval import PUBLISHED, Rotation, rotate_probabilities, rotate_scan, sweep
from segevol_fast.eval import rotation as rotation_module


def _about(axis: str, deg: float) -> Rotation:
    angles = [0.0, 0.0, 0.0]
    angles["xyz".index(axis)] = deg
    return Rotation(f"{axis}{deg:+g}", tuple(angles))


def _written_out(ax: float, ay: float, az: float) -> np.ndarray:
    """Rz @ Ry @ Rx from the textbook right-handed matrices (radians): the reference for matrix()."""
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _affine(linear: np.ndarray, origin) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = linear, origin
    return affine


def _world(shape, affine) -> np.ndarray:
    """(X, Y, Z, 3) world mm of every voxel centre."""
    index = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1).astype(np.float64)
    return index @ affine[:3, :3].T + affine[:3, 3]


def _centre(shape, affine) -> np.ndarray:
    return affine[:3, :3] @ ((np.asarray(shape) - 1) / 2) + affine[:3, 3]


# ---------------------------------------------------------------------------------- the rotation
def test_published_matrix_is_a_proper_rotation_with_the_stated_angles():
    r = PUBLISHED.matrix()
    assert r.dtype == np.float64 and r.shape == (3, 3)
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(r, _written_out(0.1, 0.1, math.pi / 4), atol=1e-12)
    # the angles read back from R = Rz Ry Rx (Tait-Bryan z-y-x)
    ay = -math.asin(r[2, 0])
    ax, az = math.atan2(r[2, 1], r[2, 2]), math.atan2(r[1, 0], r[0, 0])
    np.testing.assert_allclose((ax, ay, az), (0.1, 0.1, math.pi / 4), atol=1e-12)
    assert not PUBLISHED.is_identity and Rotation("none", (0, 360, -720)).is_identity


@pytest.mark.parametrize(
    "axis, before, after",
    # right-handed about RAS axes: z turns right (+x) to anterior (+y), x turns +y to +z, y turns +z to +x
    [("z", (1, 0, 0), (0, 1, 0)), ("x", (0, 1, 0), (0, 0, 1)), ("y", (0, 0, 1), (1, 0, 0))],
)
def test_positive_quarter_turns_are_right_handed_and_exact(axis, before, after):
    np.testing.assert_array_equal(_about(axis, 90).matrix() @ before, after)  # exact: no 6e-17 residue


def test_composition_order_is_z_after_y_after_x(fresh_seed):
    angles = np.random.default_rng(fresh_seed).uniform(-180, 180, size=3)
    got = Rotation("r", tuple(angles)).matrix()
    np.testing.assert_allclose(got, _written_out(*np.radians(angles)), atol=1e-12)


def test_sweep_names_count_and_angles():
    rotations = sweep()
    assert len(rotations) == 30
    assert [r.name for r in rotations[:10]] == [
        "x-90",
        "x-45",
        "x-30",
        "x-15",
        "x-5",
        "x+5",
        "x+15",
        "x+30",
        "x+45",
        "x+90",
    ]
    assert rotations[-1].name == "z+90" and rotations[-1].angles_deg == (0.0, 0.0, 90.0)
    assert rotations[12].name == "y-30" and rotations[12].angles_deg == (0.0, -30.0, 0.0)
    only_z = sweep((7.5, -2), axes="z")
    assert [(r.name, r.angles_deg) for r in only_z] == [("z+7.5", (0, 0, 7.5)), ("z-2", (0, 0, -2))]


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"axes": "w"}, InvalidArgumentError),
        ({"axes": "zz"}, InvalidArgumentError),
        ({"axes": ""}, InvalidArgumentError),
        ({"axes": ["z"]}, ArgumentTypeError),
        ({"angles": ()}, InvalidArgumentError),
        ({"angles": (5, 5)}, InvalidArgumentError),
        ({"angles": (5, float("nan"))}, InvalidArgumentError),
        ({"angles": 45}, ArgumentTypeError),
        ({"angles": "45"}, ArgumentTypeError),
        ({"angles": (True,)}, ArgumentTypeError),
    ],
)
def test_sweep_refuses_bad_arguments(kwargs, error):
    with pytest.raises(error):
        sweep(**kwargs)


def test_rotation_refuses_bad_angles():
    with pytest.raises(InvalidArgumentError, match="3 angles"):
        Rotation("r", (1.0, 2.0))
    with pytest.raises(InvalidArgumentError, match="finite"):
        Rotation("r", (0.0, float("inf"), 0.0))
    with pytest.raises(InvalidArgumentError, match="empty"):
        Rotation("", (0.0, 0.0, 0.0))
    with pytest.raises(ArgumentTypeError, match="name"):
        Rotation(45, (0.0, 0.0, 45.0))


# ---------------------------------------------------------------------------------- known answers
@pytest.mark.parametrize("axis, plane", [("z", (0, 1)), ("x", (1, 2)), ("y", (2, 0))])
def test_quarter_turn_on_an_identity_grid_is_rot90(axis, plane, fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    image = rng.normal(size=(7, 7, 7)).astype(np.float32)
    labels = rng.integers(0, 6, size=(7, 7, 7)).astype(np.int16)
    rotated, rotated_labels = rotate_scan(image, np.eye(4), _about(axis, 90), labels)
    assert rotated.dtype == np.float32 and rotated_labels.dtype == np.int16
    np.testing.assert_array_equal(rotated_labels, np.rot90(labels, 1, axes=plane))
    np.testing.assert_allclose(rotated, np.rot90(image, 1, axes=plane), atol=1e-5)
    # the other sense is a different answer on this asymmetric phantom
    assert not np.array_equal(rotated_labels, np.rot90(labels, -1, axes=plane))


def test_quarter_turn_moves_a_marker_from_right_to_anterior():
    labels = np.zeros((9, 9, 9), dtype=np.uint8)
    labels[7, 4, 4] = 1  # 3 mm to the patient's right (+x) of the centre (4, 4, 4)
    _, rotated = rotate_scan(np.zeros(labels.shape), np.eye(4), _about("z", 90), labels)
    assert np.argwhere(rotated).tolist() == [[4, 7, 4]]  # now 3 mm anterior (+y)


@pytest.mark.parametrize("oblique", [False, True], ids=["axis-aligned", "oblique"])
def test_off_centre_ball_on_anisotropic_grid_lands_where_predicted(oblique):
    shape, spacing = (48, 30, 18), np.diag([0.8, 1.6, 3.0])  # anisotropic within the rotated plane too
    turn = _about("x", 20).matrix() @ _about("y", -15).matrix() if oblique else np.eye(3)
    affine = _affine(turn @ spacing, (-20.0, 5.0, 30.0))
    centre = _centre(shape, affine)
    ball_centre = centre + np.array([9.0, -4.0, 5.0])
    ball = np.linalg.norm(_world(shape, affine) - ball_centre, axis=-1) <= 9.0
    r = _about("z", 45).matrix()

    image, labels = rotate_scan(ball.astype(np.float32), affine, r, {"ball": ball})
    mask = labels["ball"]
    expected = centre + r @ (ball_centre - centre)
    voxel_mm = np.linalg.norm(affine[:3, :3], axis=0).max()
    for weights in (mask.astype(np.float64), image.astype(np.float64)):
        got = affine[:3, :3] @ (np.argwhere(np.ones(shape)).T @ weights.ravel() / weights.sum()) + affine[:3, 3]
        assert np.linalg.norm(got - expected) < voxel_mm, f"centre of mass {got}, predicted {expected}"
    voxel_volume = abs(np.linalg.det(affine[:3, :3]))
    assert mask.sum() * voxel_volume == pytest.approx(ball.sum() * voxel_volume, rel=0.03)
    assert image.sum() == pytest.approx(ball.sum(), rel=0.03)


def test_rotation_and_its_inverse_return_labels_up_to_a_boundary_band():
    shape = (40, 32, 16)
    affine = _affine(np.diag([0.9, 1.2, 2.5]), (0.0, 0.0, 0.0))
    world = _world(shape, affine) - _centre(shape, affine)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[np.linalg.norm((world - (4, 2, 0)) / (9, 7, 10), axis=-1) <= 1] = 1
    labels[np.linalg.norm((world - (-6, -3, 3)) / (5, 5, 6), axis=-1) <= 1] = 2
    r = PUBLISHED.matrix()
    _, there = rotate_scan(np.zeros(shape), affine, r, labels)
    _, back = rotate_scan(np.zeros(shape), affine, r.T, there)
    # the band: voxels whose 3x3x3 neighbourhood holds more than one label
    padded = np.pad(labels, 1, mode="edge")
    lo, hi = labels.copy(), labels.copy()
    for di in range(3):
        for dj in range(3):
            for dk in range(3):
                near = padded[di : di + shape[0], dj : dj + shape[1], dk : dk + shape[2]]
                lo, hi = np.minimum(lo, near), np.maximum(hi, near)
    band = lo != hi
    changed = back != labels
    assert not (changed & ~band).any(), "labels changed away from any boundary"
    assert changed.sum() < 0.2 * band.sum()
    assert not np.array_equal(there, labels)


# ---------------------------------------------------------------------------------- fill and labels
def test_fill_defaults_to_the_image_minimum_and_can_be_set():
    image = np.full((12, 12, 5), 40, dtype=np.int16)
    image[0, 0, 0] = -1000  # the minimum, far from the corners that rotate in from outside
    image = np.roll(image, (6, 6, 2), axis=(0, 1, 2))
    rotated, _ = rotate_scan(image, np.eye(4), _about("z", 45))
    assert rotated[0, 0, 2] == -1000 and rotated[11, 11, 2] == -1000  # corners come from outside
    assert rotated[6, 3, 2] == pytest.approx(40, abs=1e-4)  # away from the minimum's voxel: untouched
    rotated, _ = rotate_scan(image, np.eye(4), _about("z", 45), fill=7.5)
    assert rotated[0, 0, 2] == 7.5 and rotated[11, 11, 2] == 7.5


def test_labels_as_dict_and_as_integer_map_agree_and_keep_their_form(fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    labels = rng.integers(0, 3, size=(11, 9, 6)).astype(np.uint16)
    masks = {"b": labels == 2, "a": labels == 1}
    affine = _affine(np.diag([1.0, 1.5, 2.0]), (3.0, -2.0, 1.0))
    _, as_map = rotate_scan(np.zeros(labels.shape), affine, PUBLISHED, labels)
    _, as_dict = rotate_scan(np.zeros(labels.shape), affine, PUBLISHED, masks)
    assert as_map.dtype == np.uint16 and list(as_dict) == ["b", "a"]
    assert all(m.dtype == np.bool_ for m in as_dict.values())
    np.testing.assert_array_equal(as_dict["a"], as_map == 1)
    np.testing.assert_array_equal(as_dict["b"], as_map == 2)
    assert (as_map[0, 0] == 0).all()  # a corner column rotated in from outside the grid
    assert rotate_scan(np.zeros(labels.shape), affine, PUBLISHED)[1] is None


def test_chunked_resampling_equals_one_pass(monkeypatch, fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    image = rng.normal(size=(9, 8, 7))
    labels = rng.integers(0, 4, size=image.shape)
    whole = rotate_scan(image, np.eye(4), PUBLISHED, labels)
    monkeypatch.setattr(rotation_module, "CHUNK_VOXELS", 5)  # one row of X per chunk
    chunked = rotate_scan(image, np.eye(4), PUBLISHED, labels)
    np.testing.assert_array_equal(whole[0], chunked[0])
    np.testing.assert_array_equal(whole[1], chunked[1])


def test_identity_returns_copies_exactly(fresh_seed):
    image = np.random.default_rng(fresh_seed).normal(size=(5, 4, 3))
    labels = (image > 0).astype(np.int64) * (2**40)  # past float32's exact integers
    rotated, rotated_labels = rotate_scan(image, np.eye(4), Rotation("none", (0.0, 360.0, 0.0)), labels)
    np.testing.assert_array_equal(rotated, image.astype(np.float32))
    np.testing.assert_array_equal(rotated_labels, labels)
    assert rotated_labels is not labels


def test_large_label_ids_survive_a_real_rotation():
    labels = np.zeros((6, 6, 6), dtype=np.int64)
    labels[4, 2, 2] = 2**40 + 1
    _, rotated = rotate_scan(np.zeros(labels.shape), np.eye(4), _about("z", 90), labels)
    assert rotated.max() == 2**40 + 1


def test_one_voxel_thick_scan_rotates_in_its_plane():
    image = np.zeros((5, 5, 1), dtype=np.float32)
    image[4, 2, 0] = 1.0
    rotated, _ = rotate_scan(image, np.eye(4), _about("z", 90), fill=0.0)
    np.testing.assert_allclose(rotated[..., 0], np.rot90(image[..., 0]), atol=1e-5)


# ---------------------------------------------------------------------------------- probabilities
def test_probabilities_rotate_per_channel_and_back(fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    prob = rng.uniform(size=(2, 10, 9, 5))
    affine = _affine(np.diag([1.0, 1.3, 2.2]), (0, 0, 0))
    stack = rotate_probabilities(prob, affine, PUBLISHED)
    assert stack.shape == prob.shape and stack.dtype == np.float32
    assert stack.min() >= 0 and stack.max() <= 1 and stack[0, 0, 0, 0] == 0  # fill 0 outside
    np.testing.assert_allclose(stack[1], rotate_probabilities(prob[1], affine, PUBLISHED), atol=0)
    image, _ = rotate_scan(prob[0], affine, PUBLISHED, fill=0.0)
    np.testing.assert_allclose(stack[0], image, atol=1e-6)
    smooth = np.ones((12, 12, 12))  # a constant stays constant well inside the grid, there and back
    back = rotate_probabilities(rotate_probabilities(smooth, np.eye(4), PUBLISHED), np.eye(4), PUBLISHED.matrix().T)
    np.testing.assert_allclose(back[4:8, 4:8, 4:8], 1.0, atol=1e-5)


# ---------------------------------------------------------------------------------- bad input
def _reflection():
    return np.diag([-1.0, 1.0, 1.0])


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"image": np.zeros((4, 4))}, ShapeError, "2-D"),
        ({"image": np.zeros((4, 4, 4), dtype=complex)}, ShapeError, "real"),
        ({"image": np.full((4, 4, 4), np.nan)}, InvalidArgumentError, "NaN"),
        ({"affine": np.eye(3)}, ShapeError, "4x4"),
        ({"affine": np.diag([1.0, np.inf, 1.0, 1.0])}, InvalidArgumentError, "finite"),
        ({"affine": np.diag([1.0, 0.0, 1.0, 1.0])}, InvalidArgumentError, "invertible"),
        ({"rotation": _reflection()}, InvalidArgumentError, "reflection"),
        ({"rotation": 2 * np.eye(3)}, InvalidArgumentError, "orthonormal"),
        ({"rotation": np.eye(2)}, ShapeError, "3x3"),
        ({"rotation": "z+45"}, ArgumentTypeError, "Rotation"),
        ({"labels": np.zeros((4, 4, 5), dtype=np.uint8)}, ShapeError, "shape"),
        ({"labels": {"liver": np.zeros((4, 5, 4), dtype=bool)}}, ShapeError, "liver"),
        ({"labels": np.zeros((4, 4, 4), dtype=np.float32)}, ShapeError, "dtype"),
        ({"labels": [[[0]]]}, ArgumentTypeError, "numpy"),
        ({"fill": float("nan")}, InvalidArgumentError, "finite"),
        ({"fill": "air"}, ArgumentTypeError, "fill"),
    ],
)
def test_bad_input_is_refused_with_a_typed_error(change, error, match):
    kwargs = {"image": np.zeros((4, 4, 4)), "affine": np.eye(4), "rotation": PUBLISHED, **change}
    with pytest.raises(error, match=match):
        rotate_scan(**kwargs)


def test_bad_probabilities_are_refused():
    with pytest.raises(ShapeError):
        rotate_probabilities(np.zeros((2, 2, 4, 4, 4)), np.eye(4), PUBLISHED)
    with pytest.raises(InvalidArgumentError):
        rotate_probabilities(np.full((4, 4, 4), np.inf), np.eye(4), PUBLISHED)
