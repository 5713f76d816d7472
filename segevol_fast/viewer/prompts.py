"""What a viewer user gives (clicks, rectangles, typed names) -> segment()'s prompt arguments.

Points and boxes come out in voxel indices (i, j, k) of the scan's stored array, the convention of
`segment()` / a session's `segment` and `refine` with coords="voxel": points (P, 3) with labels 1
(positive) / 0 (negative), a box (i0, j0, k0, i1, j1, k1) with inclusive maxima. A viewer's data
coordinates are those indices (see `coords`); its world points go through `coords.world_to_voxel`
first.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import ArgumentTypeError, InvalidArgumentError, PromptError, ShapeError
from ..inference.prompts import checked_points
from ..vocabulary import NAMES, normalize


def _shape(shape) -> np.ndarray:
    arr = np.asarray(shape)
    if arr.shape != (3,) or arr.dtype.kind not in "iu" or (arr < 1).any():
        raise ShapeError(f"shape must be the scan's three voxel counts (X, Y, Z), got {shape!r}")
    return arr.astype(np.int64)


def _outside(points: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """Rows more than half a voxel outside the grid: segment()'s own rule, so what passes here
    passes there."""
    return ((points < -0.5) | (points > shape - 0.5)).any(axis=-1)


def click_prompt(voxel_points, positive: Sequence[bool], shape) -> tuple[np.ndarray, np.ndarray]:
    """Clicks -> (points int64 (N, 3), labels int64 (N,)): each point rounded to its nearest voxel,
    label 1 where `positive` is true, 0 where false (a correction click: "not here").

    A click more than half a voxel outside the scan is a PromptError naming it; wrong shapes,
    non-finite coordinates or a label count that differs from the point count are errors too.
    """
    grid = _shape(shape)
    flags = np.asarray(positive)
    if flags.size and flags.dtype.kind not in "biu":  # [] is float to numpy; checked_points refuses no points
        raise ArgumentTypeError(f"positive must be booleans, one per point, got {flags.dtype} values {positive!r:.80}")
    points, labels = checked_points(voxel_points, flags.astype(np.int64))
    bad = _outside(points, grid)
    if bad.any():
        raise PromptError(
            f"click {points[bad][0].tolist()} lies outside the scan (voxel indices of a grid of shape "
            f"{tuple(grid.tolist())}); click inside the image"
        )
    return np.clip(np.rint(points), 0, grid - 1).astype(np.int64), labels


def box_from_vertices(voxel_vertices, shape) -> np.ndarray:
    """The bounding box of rectangles' vertices, as segment()'s box: int64 (i0, j0, k0, i1, j1, k1),
    inclusive, rounded to voxels and clipped to the scan.

    An axis along which every vertex lies on the same voxel (a rectangle drawn on one slice is flat
    along the slicing axis) spans the whole scan: a rectangle drawn on one slice means "the organ is
    within these rows and columns", not "on this slice only". Vertices flat along two axes or more
    (a line, a dot) enclose nothing: a PromptError, as is a box wholly outside the scan.
    """
    grid = _shape(shape)
    vertices = np.asarray(voxel_vertices, dtype=np.float64)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or len(vertices) == 0:
        raise ShapeError(f"rectangle vertices must be (M, 3) voxel coordinates, M >= 1, got shape {vertices.shape}")
    if not np.isfinite(vertices).all():
        raise PromptError(f"rectangle vertices must be finite, got {vertices.tolist()!r:.120}")
    lo, hi = np.rint(vertices.min(axis=0)), np.rint(vertices.max(axis=0))
    flat = lo == hi
    if flat.sum() > 1:
        raise PromptError(
            f"the rectangle from {lo.tolist()} to {hi.tolist()} has no area (flat along axes "
            f"{np.flatnonzero(flat).tolist()}); drag a rectangle over the organ"
        )
    if (hi < 0).any() or (lo > grid - 1).any():
        raise PromptError(
            f"the rectangle from {lo.tolist()} to {hi.tolist()} lies outside the scan (voxel indices of a grid of "
            f"shape {tuple(grid.tolist())})"
        )
    lo = np.where(flat, 0, np.clip(lo, 0, grid - 1))
    hi = np.where(flat, grid - 1, np.clip(hi, 0, grid - 1))
    return np.concatenate([lo, hi]).astype(np.int64)


def text_prompts(text: str) -> list[str]:
    """ "liver, spleen; left kidney" -> ["liver", "spleen", "left kidney"]: names separated by commas
    or semicolons, surrounding and repeated spaces removed, a name repeated (in any letter case)
    kept once, first spelling first. No name at all is a PromptError."""
    if not isinstance(text, str):
        raise ArgumentTypeError(f"text must be a string of names, got {type(text).__name__} {text!r:.60}")
    names: dict[str, str] = {}
    for piece in text.replace(";", ",").split(","):
        name = " ".join(piece.split())
        if name:
            names.setdefault(normalize(name), name)
    if not names:
        raise PromptError(
            f"no organ name in {text!r}; type one or more names separated by commas, e.g. 'liver, spleen'"
        )
    return list(names.values())


def complete(prefix: str, limit: int = 20) -> list[str]:
    """Up to `limit` known structure names (segevol_fast.vocabulary) for a partly typed one: those
    starting with `prefix` first, then those with a word starting with it, each group sorted
    ("kid" -> "kidney", ..., then "left kidney", ...). Case and spacing are ignored; an empty
    prefix lists names from the start of the alphabet."""
    if not isinstance(prefix, str):
        raise ArgumentTypeError(f"prefix must be a string, got {type(prefix).__name__} {prefix!r:.60}")
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)):
        raise ArgumentTypeError(f"limit must be an int, got {type(limit).__name__} {limit!r:.60}")
    if limit < 0:
        raise InvalidArgumentError(f"limit must be 0 or more, got {limit}")
    key = normalize(prefix)
    names = sorted(NAMES)
    starts = [n for n in names if n.startswith(key)]
    inside = [n for n in names if not n.startswith(key) and f" {key}" in f" {n}"]
    return (starts + inside)[:limit]
