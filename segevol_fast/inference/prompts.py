"""User prompts -> prompts in the model's frame.

Frames (docs/official-pipeline.md §5.1, §11.1):
    input voxel   (i, j, k) indices of the stored array (X, Y, Z), as the user sees the file
    world         millimetres, RAS, through the volume's affine (`coords="world"`)
    crop          (d, h, w) = (k, j, i) − crop start: the preprocessed foreground crop, model axes
    zoom-out      the crop resized to config.spatial_size (32×256×256 officially)

`Prompt` holds one prompt (one output mask) in the *crop* frame; the inference modes take them
from there. Boxes are (d_min, h_min, w_min, d_max, h_max, w_max) with inclusive maxima, like the
official `generate_box`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from ..errors import ArgumentTypeError, PromptError
from ..vocabulary import normalize as normalize_name

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


def _numbers(value, name: str) -> np.ndarray:
    """A box / points / labels argument -> float64 array, refusing what is not a list of numbers.

    Accepts numpy arrays, torch tensors (any device, detached) and nested lists / tuples of numbers.
    A string ("1,2,3,4,5,6"), a dict or a set is an ArgumentTypeError: numpy would turn them into
    0-d object arrays or split nothing, and the error would surface far from the call.
    """
    if isinstance(value, (str, bytes, dict, set, frozenset)):
        raise ArgumentTypeError(
            f"{name} must be numbers (a list, tuple, numpy array or torch tensor), got "
            f"{type(value).__name__} {value!r:.60}"
        )
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch here
        value = value.detach().cpu()
        value = (value.double() if value.is_floating_point() else value).numpy()  # numpy has no bfloat16
    try:
        arr = np.asarray(value)
    except ValueError as exc:  # ragged nested lists
        raise PromptError(f"{name} must be a regular array of numbers, got {value!r:.80} ({exc})") from None
    if arr.dtype.kind not in "iuf":  # bool, complex, object, strings
        raise ArgumentTypeError(f"{name} must hold real numbers, got {arr.dtype} values {value!r:.80}")
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        must = "1 (positive) or 0 (negative)" if name == "point_labels" else "a finite number"
        raise PromptError(
            f"{name} contains a non-finite value ({arr[bad][0]}): {arr.tolist()!r:.120}; each must be {must}"
        )
    return arr


def _text_names(text) -> list[str]:
    """`text=` -> a list of names; wrong types are ArgumentTypeError, empty names PromptError."""
    if text is None:
        return []
    if isinstance(text, str):
        names = [text]
    elif isinstance(text, (list, tuple)):
        names = list(text)
    elif isinstance(text, np.ndarray) and text.dtype.kind == "U" and text.ndim <= 1:
        names = [str(t) for t in text.reshape(-1)]
    else:
        raise ArgumentTypeError(f"text must be a name or a list of names, got {type(text).__name__} {text!r:.60}")
    wrong = [t for t in names if not isinstance(t, str)]
    if wrong:
        raise ArgumentTypeError(
            f"text prompts must be strings; {wrong[0]!r} is of type {type(wrong[0]).__name__} (in text={names!r:.80})"
        )
    if not names or any(not t.strip() for t in names):
        raise PromptError(f"text prompts must be non-empty strings, got {names!r}")
    return names


def _label_key(name: str) -> str:
    # "Liver", " liver" and "liver" ask for the same structure (CLIP's tokenizer lower-cases):
    # the same normal form the vocabulary matches names in
    return normalize_name(name)


def unique_labels(names: Sequence[str]) -> list[str]:
    """Result labels for text prompts: the names, with repeats numbered "liver (2)", "liver (3)".

    Two prompts that name the same structure (equal after lower-casing and collapsing spaces) still
    give two masks: the first keeps its name, later ones get " (n)". Repeats are legitimate, e.g.
    text=["kidney", "kidney"] with one box per name.
    """
    used, labels = set(), []
    for name in names:
        label, n = name, 1
        while _label_key(label) in used:
            n += 1
            label = f"{' '.join(name.split())} ({n})"
        used.add(_label_key(label))
        labels.append(label)
    return labels


def _as_boxes(box, n: Optional[int]) -> list[Optional[np.ndarray]]:
    if box is None:
        return [None] * (n or 1)
    arr = _numbers(box, "box")
    if arr.shape == (6,):
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 6 or len(arr) == 0:
        raise PromptError(f"box must be (6,) = (i0, j0, k0, i1, j1, k1) or (N, 6), got shape {arr.shape}")
    if n is not None and len(arr) not in (1, n):
        raise PromptError(f"{len(arr)} boxes for {n} text prompts: give one box, or one per text")
    if n is not None and len(arr) == 1:
        arr = np.repeat(arr, n, axis=0)
    return list(arr)


def checked_points(points, point_labels) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """(P, 3) float64 points and (P,) int64 labels (1 / 0), checked; (None, None) without points.
    Whether the points can stand alone (a positive one) is `_check_target`'s question."""
    pts = _points(points)
    return pts, _point_labels(pts, point_labels)


def _points(points) -> Optional[np.ndarray]:
    """(P, 3) float64, or None without points."""
    if points is None:
        return None
    pts = _numbers(points, "points")
    if pts.shape == (3,):
        pts = pts[None]
    if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) == 0:
        raise PromptError(f"points must be (P, 3) = (i, j, k) rows, got shape {pts.shape}")
    return pts


def _point_labels(pts: Optional[np.ndarray], point_labels) -> Optional[np.ndarray]:
    """(P,) int64 labels for the checked points `pts` (default all positive), None without points."""
    if pts is None:
        if point_labels is not None:
            raise PromptError("point_labels given without points")
        return None
    if point_labels is None:
        return np.ones(len(pts), np.int64)
    raw = np.atleast_1d(_numbers(point_labels, "point_labels"))
    if raw.shape != (len(pts),):
        raise PromptError(
            f"point_labels must give one label per point ({len(pts)} points: 1 positive, "
            f"0 negative), got {raw.size} labels"
        )
    if (raw == -1).any():
        # official code: -1 marks padding ("not a point", its position ignored) added by select_points;
        # segment() adds that padding itself where the official pipeline does
        raise PromptError(
            "point_labels: -1 marks a padding (not-a-point) entry in the official SegVol code; "
            "segment() adds the padding itself, so leave those points out (labels: 1 positive, "
            "0 negative)"
        )
    if not np.isin(raw, (0.0, 1.0)).all():
        wrong = raw[~np.isin(raw, (0.0, 1.0))][0]
        raise PromptError(
            f"point_labels must be 1 (positive) or 0 (negative), one per point; got {wrong:g} in {raw.tolist()}"
        )
    return raw.astype(np.int64)


def _check_target(names: Sequence[str], box, labels: Optional[np.ndarray]) -> None:
    """Some prompt must say what to segment: a text, a box or a positive point. Negative points
    alone only say where the target is not (the decoder would get no target at all); next to a
    text, a box or a positive point they are correction clicks, as in an interactive viewer."""
    if not names and box is None and labels is None:
        raise PromptError("segment() needs at least one prompt: text=..., box=... or points=...")
    if not names and box is None and not (labels == 1).any():
        raise PromptError(
            "at least one point must be positive (label 1) when points are the only prompt: "
            "negative points only say where the target is not; give a positive point, a box or "
            "a text prompt"
        )


def check_prompt_arguments(text=None, box=None, points=None, point_labels=None) -> None:
    """Check `segment()`'s prompt arguments without a volume (types, shapes, finiteness, labels),
    so a bad prompt fails before the scan is read. `build_prompts` repeats the same checks.

    The PromptError / ArgumentTypeError raised carries `argument`: the one at fault, "text",
    "box", "points" or "point_labels" (None when no prompt is given at all), for callers that
    report where the value came from (a cohort manifest names the column). An argument is at
    fault when the ones before it, in that order, pass without it: a box count that does not
    match the names is the box's fault, a negative-only point set the labels'.
    """
    with _at_fault("text"):
        names = _text_names(text)
    with _at_fault("box"):
        _as_boxes(box, len(names) or None)
    with _at_fault("points"):
        pts = _points(points)
    with _at_fault("point_labels"):
        labels = _point_labels(pts, point_labels)
    # without labels, points are all positive: only labels can leave points without a target
    with _at_fault("point_labels" if point_labels is not None else None):
        _check_target(names, box, labels)


@contextlib.contextmanager
def _at_fault(argument: Optional[str]) -> Iterator[None]:
    """Tag a prompt error raised in the block with the argument at fault (`exc.argument`)."""
    try:
        yield
    except (PromptError, ArgumentTypeError) as exc:
        exc.argument = argument
        raise


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
        point_labels: (P,) 1 positive / 0 negative; default all positive. Floats equal to 1. / 0.
            (the official code's float tensors) are accepted; -1 (the official padding label) and
            anything else is a PromptError. Negative points alone say only where the target is
            not: without a text or a box, at least one point must be positive.
        shape: (X, Y, Z) of the input array, to reject prompts outside it.
        start: crop start (d, h, w) from preprocessing.

    Text, boxes and points combine: a text prompt also carries the box (its own or the shared
    one) and the points.

    Boxes, points and labels may be lists, numpy arrays or torch tensors; every number must be
    finite. Names that repeat (equal after lower-casing and collapsing spaces) still give one mask
    each: later ones are labelled "liver (2)", "liver (3)" (see `unique_labels`), so no mask ever
    replaces another in the result.
    """
    names = _text_names(text)
    n = len(names) or None
    boxes = _as_boxes(box, n)
    pts, labels = checked_points(points, point_labels)
    _check_target(names, box, labels)
    if pts is not None:
        pts = _check_inside(_to_input_voxels(pts, coords, affine), shape, "point", coords, affine, pts)
        pts = input_to_crop(pts, start)
    labels_out = unique_labels(names)

    prompts = []
    for idx, b in enumerate(boxes):
        crop_box = None
        if b is not None:
            corners = _check_inside(
                _to_input_voxels(b.reshape(2, 3), coords, affine), shape, "box corner", coords, affine, b.reshape(2, 3)
            )
            lo, hi = np.minimum(corners[0], corners[1]), np.maximum(corners[0], corners[1])
            crop_box = np.concatenate([input_to_crop(lo, start), input_to_crop(hi, start)])
            # (d, h, w) order reverses (i, j, k): recompute min/max in the crop frame
            crop_box = np.concatenate([np.minimum(crop_box[:3], crop_box[3:]), np.maximum(crop_box[:3], crop_box[3:])])
        name = labels_out[idx] if names else (f"box {idx}" if b is not None else "points")
        prompts.append(
            Prompt(label=name, text=names[idx] if names else None, box=crop_box, points=pts, point_labels=labels)
        )
    return prompts


def _check_inside(
    xyz: np.ndarray,
    shape: Sequence[int],
    what: str,
    coords: str = "voxel",
    affine: Optional[np.ndarray] = None,
    given: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Clip input-voxel points to the grid; a point more than half a voxel outside is a PromptError,
    reported in the units the user gave (`given`, voxels or world mm)."""
    hi = np.asarray(shape, dtype=np.float64) - 1
    bad = ((xyz < -0.5) | (xyz > hi + 0.5)).any(axis=-1)
    if bad.any():
        if coords == "world" and affine is not None and given is not None:
            mm = np.asarray(given, dtype=np.float64).reshape(-1, 3)[np.flatnonzero(bad)[0]]
            lo_mm, hi_mm = world_extent(shape, affine)
            extent = ", ".join(f"{ax} {a:.1f}..{b:.1f}" for ax, a, b in zip("xyz", lo_mm, hi_mm))
            raise PromptError(
                f"{what} ({', '.join(f'{v:g}' for v in mm)}) mm lies outside the volume: its "
                f"world extent (RAS mm, voxel centres) is {extent}; that point is voxel "
                f"{np.round(xyz[bad][0], 1).tolist()} of shape {tuple(shape)}"
            )
        raise PromptError(
            f"{what} {xyz[bad][0].tolist()} lies outside the volume of shape {tuple(shape)} "
            "(voxel indices (i, j, k) of the input array; use coords='world' for millimetres)"
        )
    return np.clip(xyz, 0, hi)


def world_extent(shape: Sequence[int], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) world mm over the eight corner voxel centres of a grid of `shape`."""
    hi = np.asarray(shape, dtype=np.float64) - 1
    corners = np.array([[a, b, c] for a in (0, hi[0]) for b in (0, hi[1]) for c in (0, hi[2])])
    aff = np.asarray(affine, dtype=np.float64)
    world = corners @ aff[:3, :3].T + aff[:3, 3]
    return world.min(axis=0), world.max(axis=0)
