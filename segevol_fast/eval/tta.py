"""Test-time augmentation by rotation about the body's long axis: a baseline that needs no training.

The scan is segmented k times, rotated by 0, 360/k, 2*360/k, ... degrees about world z (the
longitudinal axis, `rotation.Rotation`), with its box and point prompts carried along by the same
rotation. Each view's probabilities are rotated back onto the scan, averaged, and thresholded at
0.5. k = 1 is the plain segmentation: its mask is segment()'s own (logits > 0; a float32 sigmoid
compared with 0.5 would differ where |logit| < 6e-8).

    from segevol_fast.eval.tta import segment_with_tta
    masks = segment_with_tta(model, image, affine, k=4, text=["liver"], modality="ct")

A view rotates a box by bounding its eight rotated corners (so it grows unless the turn is a
quarter turn) and clips it to the grid, as it clips points whose anatomy the rotation carried off
the grid.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from ..errors import ArgumentTypeError, InvalidArgumentError
from ..io import Volume
from .rotation import Rotation, rotate_probabilities, rotate_scan

OpenSession = Callable[[np.ndarray, np.ndarray], object]  # (image, affine) -> a Session


def tta_rotations(k: int) -> list[Rotation]:
    """The k rotations about world z of a TTA run, the identity first."""
    check_tta(k)
    return [Rotation(f"tta z{360.0 * i / k:+g}", (0.0, 0.0, 360.0 * i / k)) for i in range(k)]


def check_tta(k) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ArgumentTypeError(f"tta must be a whole number of rotations (or None for none), got {k!r:.60}")
    if k < 1:
        raise InvalidArgumentError(f"tta must be >= 1 rotations about the long axis (1 is no TTA), got {k}")


def rotate_points(points, affine, shape, rotation: Rotation) -> np.ndarray:
    """Voxel positions (n, 3) -> where `rotate_scan` moves what lies there, as float64 voxel indices
    clipped to the grid of `shape`: the content at world p goes to c + R (p - c), c the grid's
    centre in world mm."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    affine = np.asarray(affine, dtype=np.float64)
    linear = affine[:3, :3]
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    # in voxel indices the world rotation about c is u -> m + L^-1 R L (u - m), m the centre voxel
    moved = centre + (pts - centre) @ np.linalg.solve(linear, rotation.matrix() @ linear).T
    return np.clip(moved, 0, np.asarray(shape, dtype=np.float64) - 1)


def rotate_box(box, affine, shape, rotation: Rotation) -> np.ndarray:
    """An inclusive (i0, j0, k0, i1, j1, k1) box -> the box bounding its eight rotated corners,
    clipped to the grid, float64 (6,)."""
    lo, hi = np.asarray(box, dtype=np.float64).reshape(2, 3)
    corners = np.array([[(lo, hi)[b >> a & 1][a] for a in range(3)] for b in range(8)])
    moved = rotate_points(corners, affine, shape, rotation)
    return np.concatenate([moved.min(axis=0), moved.max(axis=0)])


class RotatedViews:
    """The k views of one scan, each with its own session (opened on first use and kept, so every
    prompt after the first reuses its encodings). `segment` answers like a session's segment(),
    with the views' masks fused (module docstring)."""

    def __init__(self, open_session: OpenSession, image: np.ndarray, affine, k: int):
        self.rotations = tta_rotations(k)
        self._open, self.image, self.affine = open_session, image, np.asarray(affine, dtype=np.float64)
        self._sessions: dict[int, object] = {}

    def session(self, view: int):
        if view not in self._sessions:
            rotation = self.rotations[view]
            image = self.image if rotation.is_identity else rotate_scan(self.image, self.affine, rotation)[0]
            self._sessions[view] = self._open(image, self.affine)
        return self._sessions[view]

    def segment(self, text=None, box=None, points=None, point_labels=None, *, zoom_in: bool = True) -> dict:
        """{label: bool mask} for the prompts, as `Session.segment(...).masks`; boxes (N, 6) or (6,)
        and points (P, 3) in the scan's voxels."""
        prompts = dict(text=text, point_labels=point_labels, zoom_in=zoom_in)
        if len(self.rotations) == 1:
            return self.session(0).segment(box=box, points=points, **prompts).masks
        shape = self.image.shape
        total: Optional[np.ndarray] = None
        for view, rotation in enumerate(self.rotations):
            turned_box = None if box is None else np.asarray(box, dtype=np.float64).reshape(-1, 6)
            turned_points = points
            if not rotation.is_identity:
                if turned_box is not None:
                    turned_box = np.stack([rotate_box(b, self.affine, shape, rotation) for b in turned_box])
                if points is not None:
                    turned_points = rotate_points(points, self.affine, shape, rotation)
            res = self.session(view).segment(box=turned_box, points=turned_points, return_probabilities=True, **prompts)
            labels = list(res.probabilities)
            probs = np.stack([res.probabilities[name] for name in labels])
            if not rotation.is_identity:
                probs = rotate_probabilities(probs, self.affine, rotation.matrix().T)  # R^T turns it back
            total = probs if total is None else total + probs
        return {name: total[n] / len(self.rotations) > 0.5 for n, name in enumerate(labels)}


def session_opener(model_or_opener, **session_options) -> OpenSession:
    """(image, affine) -> a session: `model.session(Volume(image, affine), **session_options)` for a
    SegVol, or the given callable itself."""
    if callable(getattr(model_or_opener, "session", None)):
        modality = session_options.get("modality")

        def open_session(image, affine):
            return model_or_opener.session(Volume(image, affine, modality=modality), **session_options)

        return open_session
    if callable(model_or_opener):
        if session_options:
            raise ArgumentTypeError(
                f"session options {sorted(session_options)} go to model.session(); a session factory takes none"
            )
        return model_or_opener
    raise ArgumentTypeError(
        f"expected a SegVol or a callable (image, affine) -> session, got {type(model_or_opener).__name__}"
    )


def segment_with_tta(
    model_or_session_factory,
    image,
    affine,
    text=None,
    box=None,
    points=None,
    point_labels=None,
    *,
    k: int,
    zoom_in: bool = True,
    **session_options,
) -> dict:
    """Segment `image` (X, Y, Z) on the grid of `affine` with k rotated views (module docstring).

    model_or_session_factory: a SegVol (each view opens `model.session(...)` with
        `session_options`: modality, adapter, precision, max_memory, ...) or a callable
        (image, affine) -> session.
    text, box, points, point_labels: as segment()'s, boxes and points in voxel indices.
    Returns {label: bool mask (X, Y, Z)}, labelled as segment() labels them."""
    image = np.asarray(image)
    opener = session_opener(model_or_session_factory, **session_options)
    return RotatedViews(opener, image, affine, k).segment(text, box, points, point_labels, zoom_in=zoom_in)
