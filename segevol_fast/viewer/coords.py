"""A volume's geometry as a napari layer transform, and napari world <-> voxel conversions.

Voxel indices here are (i, j, k) of the `Volume`'s array as stored, the convention `segment()` and
a session take for boxes and points (coords="voxel"), voxel centres at integers as in NIfTI.
napari's world is the volume's world: the affine applied to those indices (RAS+ mm), so layers of
scans with other grids, and the masks, line up.

napari slices a 3-D layer in 2-D only along its own data axes, and draws a layer whose axes are
permuted relative to the world (a sagittal PSR scan: stored axis 0 runs along world y) as an empty
slice. So the layer's data is the stored array with its axes reordered (`LayerTransform.axes`,
`to_layer`) such that each layer axis runs closest to the world axis of its position; the array is
then placed as napari composes it, world = affine @ (scale * data + translate):

* a diagonal remainder (spacing, negative for a flipped axis, which napari draws mirrored) is
  `scale` and `translate` alone;
* anything else (a rotation, a shear) goes whole into `affine`, with unit scale and no
  translation; napari slices it approximately (it warns "Non-orthogonal slicing").

The common RAS / LPS / LAS scans keep their stored axis order: their layer data is the array itself.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import ArgumentTypeError, ShapeError, VolumeError
from ..io import Volume

# off-diagonal terms this small (relative to the voxel size) are rounding noise of a header, not a
# rotation: dropping them moves a voxel by less than 1e-6 of the scan's extent
_AXIS_ALIGNED_RTOL = 1e-6


def _triple(values, name: str) -> tuple[float, float, float]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (3,):
        raise ShapeError(f"{name} must be 3 numbers (one per axis), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise VolumeError(f"{name} must be finite, got {arr.tolist()}")
    return tuple(float(v) for v in arr)


@dataclass(frozen=True, eq=False)
class LayerTransform:
    """napari's placement of a 3-D scan: world = affine @ (scale * layer + translate), where layer
    axis a shows the stored array's axis `axes[a]` (see `to_layer`).

    scale:     per layer axis factor (voxel size in mm; negative for a flipped axis), never 0.
    translate: world position of voxel (0, 0, 0) when `affine` is None.
    affine:    a (4, 4) layer -> world matrix, only when the scan's axes are not aligned with the
               world's (then scale is 1 and translate 0); None otherwise. Read-only.
    axes:      the stored axis shown as each layer axis, a permutation of (0, 1, 2).
    """

    scale: tuple[float, float, float]
    translate: tuple[float, float, float]
    affine: Optional[np.ndarray] = None
    axes: tuple[int, int, int] = (0, 1, 2)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", _triple(self.scale, "scale"))
        object.__setattr__(self, "translate", _triple(self.translate, "translate"))
        if 0.0 in self.scale:
            raise VolumeError(f"scale must not be 0 along any axis, got {self.scale}")
        if sorted(self.axes) != [0, 1, 2]:
            raise VolumeError(f"axes must be a permutation of (0, 1, 2), got {self.axes!r}")
        object.__setattr__(self, "axes", tuple(int(a) for a in self.axes))
        if self.affine is not None:
            aff = np.array(self.affine, dtype=np.float64)
            if aff.shape != (4, 4):
                raise ShapeError(f"affine must be 4x4, got shape {aff.shape}")
            if not np.isfinite(aff).all() or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
                raise VolumeError(f"affine must be finite and invertible, got\n{aff}")
            aff.flags.writeable = False
            object.__setattr__(self, "affine", aff)

    def matrix(self) -> np.ndarray:
        """The whole stored voxel -> world map as one (4, 4) matrix (axis reordering included)."""
        local = np.diag([*self.scale, 1.0])
        local[:3, 3] = self.translate
        layer = local if self.affine is None else self.affine @ local
        reorder = np.eye(4)[[*self.axes, 3]]  # stored voxel -> layer data coordinates
        return layer @ reorder

    def to_layer(self, array: np.ndarray) -> np.ndarray:
        """A (X, Y, Z) array on the scan's grid (the scan, a mask, a label map) as the layer's data:
        its axes reordered, a view (the array itself when the order is unchanged)."""
        return array if self.axes == (0, 1, 2) else np.transpose(array, self.axes)

    def from_layer(self, array: np.ndarray) -> np.ndarray:
        """Inverse of `to_layer`: a layer's data (e.g. a label map the user painted) back on the
        stored grid (X, Y, Z), a view."""
        return array if self.axes == (0, 1, 2) else np.transpose(array, np.argsort(self.axes))

    def layer_kwargs(self) -> dict:
        """Keyword arguments for napari's `add_image` / `Labels(...)` of `to_layer`'s data: scale,
        translate and, for oblique volumes, affine (a fresh writable copy)."""
        kwargs = {"scale": self.scale, "translate": self.translate}
        if self.affine is not None:
            kwargs["affine"] = np.array(self.affine)
        return kwargs


def _closest_axes(linear: np.ndarray) -> tuple[int, int, int]:
    """The stored axis to show as each layer axis: the order whose axes run closest to the world
    axes of their positions (the largest summed |cosine|); the stored order wins ties."""
    cosines = np.abs(linear) / np.linalg.norm(linear, axis=0)
    return max(itertools.permutations(range(3)), key=lambda p: sum(cosines[a, p[a]] for a in range(3)))


def image_transform(volume: Volume) -> LayerTransform:
    """The layer transform that puts `volume`'s voxels where its affine says (see the module
    docstring for the axis order and for when the affine travels whole)."""
    if not isinstance(volume, Volume):
        raise ArgumentTypeError(f"image_transform needs a segevol_fast Volume, got {type(volume).__name__}")
    aff = np.asarray(volume.affine, dtype=np.float64)
    axes = _closest_axes(aff[:3, :3])
    linear = aff[:3, list(axes)]  # layer axis a -> world
    diagonal = np.diag(linear)
    off = linear - np.diag(diagonal)
    if np.abs(off).max() <= _AXIS_ALIGNED_RTOL * np.abs(diagonal).min():
        return LayerTransform(scale=tuple(diagonal), translate=tuple(aff[:3, 3]), axes=axes)
    layer = np.eye(4)
    layer[:3, :3], layer[:3, 3] = linear, aff[:3, 3]
    return LayerTransform(scale=(1.0, 1.0, 1.0), translate=(0.0, 0.0, 0.0), affine=layer, axes=axes)


def _points(points, name: str) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ShapeError(f"{name} must be (N, 3) rows of three coordinates, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise VolumeError(f"{name} must be finite, got {arr.tolist()!r:.120}")
    return arr


def voxel_to_world(points, t: LayerTransform) -> np.ndarray:
    """(N, 3) voxel coordinates (i, j, k), fractional allowed -> (N, 3) float64 napari world (mm)."""
    m = t.matrix()
    return _points(points, "voxel points") @ m[:3, :3].T + m[:3, 3]


def world_to_voxel(points, t: LayerTransform) -> np.ndarray:
    """(N, 3) napari world points (mm) -> (N, 3) float64 voxel coordinates, the exact inverse of
    `voxel_to_world`; not rounded, and possibly outside the scan."""
    m = t.matrix()
    world = _points(points, "world points")
    # solve rather than invert: better conditioned for oblique affines
    return np.linalg.solve(m[:3, :3], (world - m[:3, 3]).T).T
