"""Box and point jitter: moves within the bound, clipped to the grid, ordered, reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from segevol_fast.errors import ArgumentTypeError, InvalidArgumentError, PromptError
from segevol_fast.eval import jitter_box, jitter_points

SHAPE = (40, 30, 20)
BOX = np.array([10, 8, 6, 25, 20, 13])  # far enough from the edges and wide enough for voxels=4


def _boxes(voxels, seed, n=400, box=BOX, shape=SHAPE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([jitter_box(box, voxels, rng, shape) for _ in range(n)])


def test_every_bound_moves_independently_within_the_bound(fresh_seed):
    boxes = _boxes(4, fresh_seed)
    assert boxes.dtype == np.int64 and boxes.shape == (400, 6)
    moves = boxes - BOX
    assert np.abs(moves).max() <= 4
    for bound in range(6):  # each bound reaches both ends of [-4, 4] and everything between
        assert set(moves[:, bound]) == set(range(-4, 5)), f"bound {bound} moved by {sorted(set(moves[:, bound]))}"
    # independent: the six moves are not one shared shift, and no two bounds move in lockstep
    assert (moves != moves[:, :1]).any(axis=1).mean() > 0.9
    corr = np.corrcoef(moves.T)
    assert np.abs(corr[~np.eye(6, dtype=bool)]).max() < 0.3


def test_bounds_are_clipped_to_the_grid(fresh_seed):
    edge_box = np.array([0, 0, 0, 39, 29, 19])
    boxes = _boxes(3, fresh_seed, box=edge_box)
    assert boxes.min() >= 0 and (boxes[:, 3:] <= np.array(SHAPE) - 1).all()
    assert (boxes[:, :3] > 0).any() and (boxes[:, 3:] < np.array(SHAPE) - 1).any()  # yet they do move inwards


def test_bounds_are_reordered_when_they_cross(fresh_seed):
    thin = np.array([5, 5, 5, 5, 6, 5])  # a one-voxel box: large moves cross lo and hi
    boxes = _boxes(3, fresh_seed, box=thin)
    assert (boxes[:, :3] <= boxes[:, 3:]).all()
    assert (boxes[:, :3] < boxes[:, 3:]).any(axis=1).mean() > 0.5  # not collapsed to a point


def test_seeded_generator_is_reproducible(fresh_seed):
    np.testing.assert_array_equal(_boxes(5, fresh_seed, n=20), _boxes(5, fresh_seed, n=20))
    assert not np.array_equal(_boxes(5, fresh_seed, n=20), _boxes(5, fresh_seed + 1, n=20))


def test_zero_voxels_returns_the_box_and_points_unchanged(fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    state = rng.bit_generator.state
    box = jitter_box(BOX.tolist(), 0, rng, SHAPE)
    assert box.dtype == np.int64 and box.tolist() == BOX.tolist()
    points = jitter_points([[1, 2, 3], [39, 29, 19]], 0, rng, SHAPE)
    assert points.dtype == np.int64 and points.tolist() == [[1, 2, 3], [39, 29, 19]]
    assert rng.bit_generator.state == state


def test_the_input_box_is_not_modified(fresh_seed):
    box = BOX.copy()
    jitter_box(box, 3, np.random.default_rng(fresh_seed), SHAPE)
    np.testing.assert_array_equal(box, BOX)


def test_points_move_within_the_bound_and_stay_on_the_grid(fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    points = np.array([[20, 15, 10], [0, 0, 0], [39, 29, 19]])
    moved = np.stack([jitter_points(points, 2, rng, SHAPE) for _ in range(300)])
    assert moved.dtype == np.int64 and moved.shape == (300, 3, 3)
    assert np.abs(moved - points).max() <= 2
    assert moved.min() >= 0 and (moved <= np.array(SHAPE) - 1).all()
    assert set((moved[:, 0] - points[0]).ravel()) == set(range(-2, 3))  # an interior point moves both ways
    assert (moved[:, 0, 0] != moved[:, 0, 1] - 5).any()  # its coordinates move independently


@pytest.mark.parametrize(
    "args, error",
    [
        ((BOX, -1), InvalidArgumentError),
        ((BOX, 1.5), ArgumentTypeError),
        ((BOX, True), ArgumentTypeError),
        ((BOX[:5], 2), PromptError),
        ((np.array([0, 0, 0, 40, 1, 1]), 2), PromptError),  # i1 = 40 is outside 0..39
        ((np.array([-1, 0, 0, 1, 1, 1]), 2), PromptError),
        ((np.array([5, 0, 0, 4, 1, 1]), 2), PromptError),  # lo above hi
        ((BOX + 0.5, 2), ArgumentTypeError),
        (("0 0 0 1 1 1", 2), ArgumentTypeError),
    ],
)
def test_bad_box_arguments_are_refused(args, error):
    with pytest.raises(error):
        jitter_box(*args, np.random.default_rng(0), SHAPE)


def test_bad_shared_arguments_are_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(ArgumentTypeError, match="Generator"):
        jitter_box(BOX, 2, np.random.RandomState(0), SHAPE)
    with pytest.raises(InvalidArgumentError, match="shape"):
        jitter_box(BOX, 2, rng, (40, 30))
    with pytest.raises(InvalidArgumentError, match="shape"):
        jitter_box(BOX, 2, rng, (40, 0, 20))
    with pytest.raises(PromptError, match=r"\(n, 3\)"):
        jitter_points(np.zeros((2, 2), dtype=int), 2, rng, SHAPE)
    with pytest.raises(PromptError, match="outside"):
        jitter_points([[0, 30, 0]], 2, rng, SHAPE)
    assert jitter_box(BOX.astype(float), 0, rng, SHAPE).dtype == np.int64  # whole floats are accepted
