"""User prompts -> prompts in the model's frame.

Frames (reference §5.1, §11.1):
    input voxel   (i, j, k) indices of the stored array (X, Y, Z), as the user sees the file
    world         millimetres, RAS, through the volume's affine (`coords="world"`)
    crop          (d, h, w) = (k, j, i) − crop start: the preprocessed foreground crop, model axes
    zoom-out      the crop resized to config.spatial_size (32×256×256 officially)

`Prompt` holds one prompt (one output mask) in the *crop* frame; the inference modes take them
from there. Boxes are (d_min, h_min, w_min, d_max, h_max, w_max) with inclusive maxima, like the
official `generate_box`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from ..errors import PromptError

ArrayLike = Union[np.ndarray, Sequence]


@dataclass
class Prompt:
    """One prompt, producing one mask. Geometry in the crop frame (float voxel indices)."""

    label: str  # name of the mask in the result ("liver", "box 0", ...)
    text: Optional[str] = None
    box: Optional[np.ndarray] = None  # (6,) float64: d0, h0, w0, d1, h1, w1 (inclusive)
    points: Optional[np.ndarray] = None  # (P, 3) float64 (d, h, w)
    point_labels: Optional[np.ndarray] = None  # (P,) int64: 1 positive, 0 negative

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k, v in (("text", self.text), ("box", self.box), ("points", self.points)) if v is not None)


def input_to_crop(xyz: np.ndarray, start: Sequence[int]) -> np.ndarray:
    """(..., 3) input-voxel (i, j, k) -> crop-frame (d, h, w) = (k, j, i) − start."""
    xyz = np.asarray(xyz, dtype=np.float64)
    return xyz[..., ::-1] - np.asarray(start, dtype=np.float64)


def crop_to_input(dhw: np.ndarray, start: Sequence[int]) -> np.ndarray:
    """Inverse of `input_to_crop`."""
    dhw = np.asarray(dhw, dtype=np.float64) + np.asarray(start, dtype=np.float64)
    return dhw[..., ::-1]


def _to_input_voxels(xyz: np.ndarray, coords: str, affine: Optional[np.ndarray]) -> np.ndarray:
    if coords == "voxel":
        return xyz
    if coords == "world":
        if affine is None:
            raise PromptError("coords='world' needs the volume's affine")
        inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
        return xyz @ inv[:3, :3].T + inv[:3, 3]
    raise PromptError(f"coords must be 'voxel' or 'world', got {coords!r}")


def _as_boxes(box, n: Optional[int]) -> list[Optional[np.ndarray]]:
    if box is None:
        return [None] * (n or 1)
    arr = np.asarray(box, dtype=np.float64)
    if arr.shape == (6,):
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 6:
        raise PromptError(f"box must be (6,) = (i0, j0, k0, i1, j1, k1) or (N, 6), got shape {arr.shape}")
    if n is not None and len(arr) not in (1, n):
        raise PromptError(f"{len(arr)} boxes for {n} text prompts: give one box, or one per text")
    if n is not None and len(arr) == 1:
        arr = np.repeat(arr, n, axis=0)
    return list(arr)


def build_prompts(
    text: Union[str, Sequence[str], None] = None,
    box: Optional[ArrayLike] = None,
    points: Optional[ArrayLike] = None,
    point_labels: Optional[ArrayLike] = None,
    *,
    shape: Sequence[int],
    start: Sequence[int],
    coords: str = "voxel",
    affine: Optional[np.ndarray] = None,
) -> list[Prompt]:
    """Turn `segment()`'s prompt arguments into crop-frame `Prompt`s, one per output mask.

    Args:
        text: a name or a list of names: one mask each.
        box: (6,) (i0, j0, k0, i1, j1, k1) inclusive, or (N, 6) with N == len(text) (one per
            name) — in input-voxel indices, or world mm with coords="world". Without text, each
            box is its own prompt.
        points: (P, 3) (i, j, k) (or world mm); shared by every text prompt.
        point_labels: (P,) 1 positive / 0 negative; default all positive.
        shape: (X, Y, Z) of the input array, to reject prompts outside it.
        start: crop start (d, h, w) from preprocessing.

    Text, boxes and points combine: a text prompt also carries the box (its own or the shared
    one) and the points.
    """
    names = [text] if isinstance(text, str) else (list(text) if text is not None else [])
    if any(not isinstance(t, str) or not t.strip() for t in names):
        raise PromptError(f"text prompts must be non-empty strings, got {names!r}")
    n = len(names) or None
    boxes = _as_boxes(box, n)
    pts = labels = None
    if points is not None:
        pts = np.asarray(points, dtype=np.float64)
        if pts.ndim == 1 and pts.shape == (3,):
            pts = pts[None]
        if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) == 0:
            raise PromptError(f"points must be (P, 3) = (i, j, k) rows, got shape {pts.shape}")
        labels = np.ones(len(pts), np.int64) if point_labels is None else np.asarray(point_labels).astype(np.int64)
        if labels.shape != (len(pts),) or not np.isin(labels, (0, 1)).all():
            raise PromptError(f"point_labels must be {len(pts)} values of 1 (positive) or 0 (negative), got {labels}")
        if not (labels == 1).any():
            raise PromptError("at least one point must be positive (label 1)")
        pts = _check_inside(_to_input_voxels(pts, coords, affine), shape, "point")
        pts = input_to_crop(pts, start)
    elif point_labels is not None:
        raise PromptError("point_labels given without points")
    has_box = boxes[0] is not None
    if not names and not has_box and pts is None:
        raise PromptError("segment() needs at least one prompt: text=..., box=... or points=...")

    prompts = []
    for idx, b in enumerate(boxes):
        crop_box = None
        if b is not None:
            corners = _to_input_voxels(b.reshape(2, 3), coords, affine)
            lo, hi = np.minimum(corners[0], corners[1]), np.maximum(corners[0], corners[1])
            lo, hi = _check_inside(lo[None], shape, "box corner")[0], _check_inside(hi[None], shape, "box corner")[0]
            crop_box = np.concatenate([input_to_crop(lo, start), input_to_crop(hi, start)])
            # (d, h, w) order reverses (i, j, k): recompute min/max in the crop frame
            crop_box = np.concatenate([np.minimum(crop_box[:3], crop_box[3:]), np.maximum(crop_box[:3], crop_box[3:])])
        name = names[idx] if names else (f"box {idx}" if b is not None else "points")
        prompts.append(Prompt(label=name, text=names[idx] if names else None, box=crop_box,
                              points=pts, point_labels=labels))
    return prompts


def _check_inside(xyz: np.ndarray, shape: Sequence[int], what: str) -> np.ndarray:
    hi = np.asarray(shape, dtype=np.float64) - 1
    bad = ((xyz < -0.5) | (xyz > hi + 0.5)).any(axis=-1)
    if bad.any():
        raise PromptError(f"{what} {xyz[bad][0].tolist()} lies outside the volume of shape {tuple(shape)} "
                          "(voxel indices (i, j, k) of the input array; use coords='world' for millimetres)")
    return np.clip(xyz, 0, hi)
