"""Random perturbations of box and point prompts, as a user's imprecise drawing or clicking.

Boxes are segment()'s (i0, j0, k0, i1, j1, k1), inclusive voxel bounds on the stored grid; points
are (n, 3) voxel indices (i, j, k). Every coordinate moves by its own integer drawn uniformly from
[-voxels, voxels] and is clipped to the grid, so a perturbed prompt is always a valid prompt.
"""

from __future__ import annotations

import numpy as np

from ..errors import ArgumentTypeError, InvalidArgumentError, PromptError


def jitter_box(box, voxels: int, rng: np.random.Generator, shape) -> np.ndarray:
    """Move each of the box's six bounds independently by up to `voxels` voxels, clip to the grid
    and reorder each axis so that lo <= hi. Returns int64 (6,); voxels=0 returns the box as given
    (and draws nothing from `rng`)."""
    shape = _checked_shape(shape)
    voxels = _checked_voxels(voxels)
    _checked_rng(rng)
    box = _integers(box, "box")
    if box.shape != (6,):
        raise PromptError(f"box must be (i0, j0, k0, i1, j1, k1), 6 integers, got shape {box.shape}")
    _check_inside(box.reshape(2, 3), shape, "box bound")
    if (box[:3] > box[3:]).any():
        raise PromptError(f"box {box.tolist()} has a lower bound above its upper bound; give (i0, j0, k0, i1, j1, k1)")
    if voxels == 0:
        return box
    moved = np.clip(box.reshape(2, 3) + rng.integers(-voxels, voxels, size=(2, 3), endpoint=True), 0, shape - 1)
    return np.concatenate([moved.min(axis=0), moved.max(axis=0)])


def jitter_points(points, voxels: int, rng: np.random.Generator, shape) -> np.ndarray:
    """Move each coordinate of each (n, 3) point independently by up to `voxels` voxels and clip
    it to the grid. Returns int64 (n, 3); voxels=0 returns the points as given (drawing nothing)."""
    shape = _checked_shape(shape)
    voxels = _checked_voxels(voxels)
    _checked_rng(rng)
    points = _integers(points, "points")
    if points.ndim != 2 or points.shape[1] != 3:
        raise PromptError(f"points must be (n, 3) rows of voxel indices (i, j, k), got shape {points.shape}")
    _check_inside(points, shape, "point")
    if voxels == 0:
        return points
    return np.clip(points + rng.integers(-voxels, voxels, size=points.shape, endpoint=True), 0, shape - 1)


def _integers(value, name: str) -> np.ndarray:
    """Whole numbers (integer dtype, or floats with no fractional part) -> a new int64 array."""
    if isinstance(value, (str, bytes, dict)):
        raise ArgumentTypeError(f"{name} must be integers (a list or numpy array), got {type(value).__name__}")
    try:
        arr = np.asarray(value)
    except ValueError as exc:  # ragged nested lists
        raise PromptError(f"{name} must be a regular array of integers, got {value!r:.80} ({exc})") from None
    if arr.dtype.kind == "f" and np.isfinite(arr).all() and (arr == np.round(arr)).all():
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise ArgumentTypeError(f"{name} must hold whole voxel indices, got {arr.dtype} values {value!r:.80}")
    return arr.astype(np.int64, copy=True)


def _check_inside(coords: np.ndarray, shape: np.ndarray, what: str) -> None:
    bad = ((coords < 0) | (coords >= shape)).any(axis=-1)
    if bad.any():
        raise PromptError(
            f"{what} {coords[bad][0].tolist()} lies outside the grid of shape {tuple(shape.tolist())} "
            "(voxel indices run from 0 to size - 1)"
        )


def _checked_shape(shape) -> np.ndarray:
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__len__") or len(shape) != 3:
        raise InvalidArgumentError(f"shape must be the grid's (X, Y, Z) voxel counts, got {shape!r:.60}")
    if not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0 for n in shape):
        raise InvalidArgumentError(f"shape must be 3 positive integers, got {tuple(shape)!r}")
    return np.asarray(shape, dtype=np.int64)


def _checked_voxels(voxels) -> int:
    if isinstance(voxels, bool) or not isinstance(voxels, (int, np.integer)):
        raise ArgumentTypeError(f"voxels must be a whole number of voxels, got {type(voxels).__name__} {voxels!r}")
    if voxels < 0:
        raise InvalidArgumentError(f"voxels must be >= 0 (the largest move of a coordinate), got {voxels}")
    return int(voxels)


def _checked_rng(rng) -> None:
    if not isinstance(rng, np.random.Generator):
        raise ArgumentTypeError(
            f"rng must be a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}"
        )
