"""A volume's geometry as a napari layer transform, and napari world <-> voxel conversions.

The layer's data is the `Volume`'s array as stored, so napari's data coordinates are the voxel
indices (i, j, k) that `segment()` and a session take for boxes and points (coords="voxel"), with
voxel centres at integers as in NIfTI. napari's world is the volume's world: the affine applied to
those indices (RAS+ mm), so layers of scans with other grids, and the masks, line up.

napari composes a layer's transform as world = affine @ (scale * data + translate). An affine whose
3x3 part is diagonal (spacing, possibly negative: a flipped axis, which napari draws mirrored) is
passed as `scale` and `translate` alone, which keeps napari's scale bar and 2-D slicing simple;
any other (rotation, shear, permuted axes such as a PSR scan) goes whole into `affine`, with unit
scale and no translation.
"""

from __future__ import annotations

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
    """napari's placement of a 3-D layer: world = affine @ (scale * voxel + translate).

    scale:     per-axis factor (voxel size in mm; negative for a flipped axis), never 0.
    translate: world position of voxel (0, 0, 0) when `affine` is None.
    affine:    the full (4, 4) voxel -> world matrix, only when the volume's axes are not aligned
               with the world's (then scale is 1 and translate 0); None otherwise. Read-only.
    """

    scale: tuple[float, float, float]
    translate: tuple[float, float, float]
    affine: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", _triple(self.scale, "scale"))
        object.__setattr__(self, "translate", _triple(self.translate, "translate"))
        if 0.0 in self.scale:
            raise VolumeError(f"scale must not be 0 along any axis, got {self.scale}")
        if self.affine is not None:
            aff = np.array(self.affine, dtype=np.float64)
            if aff.shape != (4, 4):
                raise ShapeError(f"affine must be 4x4, got shape {aff.shape}")
            if not np.isfinite(aff).all() or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
                raise VolumeError(f"affine must be finite and invertible, got\n{aff}")
            aff.flags.writeable = False
            object.__setattr__(self, "affine", aff)

    def matrix(self) -> np.ndarray:
        """The whole voxel -> world map as one (4, 4) matrix."""
        local = np.diag([*self.scale, 1.0])
        local[:3, 3] = self.translate
        return local if self.affine is None else self.affine @ local

    def layer_kwargs(self) -> dict:
        """Keyword arguments for napari's `add_image` / `Labels(...)`: scale, translate and, for
        oblique volumes, affine (a fresh writable copy)."""
        kwargs = {"scale": self.scale, "translate": self.translate}
        if self.affine is not None:
            kwargs["affine"] = np.array(self.affine)
        return kwargs


def image_transform(volume: Volume) -> LayerTransform:
    """The layer transform that puts `volume`'s voxels where its affine says (see the module
    docstring for when the affine travels whole)."""
    if not isinstance(volume, Volume):
        raise ArgumentTypeError(f"image_transform needs a segevol_fast Volume, got {type(volume).__name__}")
    aff = np.asarray(volume.affine, dtype=np.float64)
    linear = aff[:3, :3]
    diagonal = np.diag(linear)
    off = linear - np.diag(diagonal)
    size = np.abs(diagonal).max()
    if np.abs(off).max() <= _AXIS_ALIGNED_RTOL * size and (np.abs(diagonal) > _AXIS_ALIGNED_RTOL * size).all():
        return LayerTransform(scale=tuple(diagonal), translate=tuple(aff[:3, 3]))
    return LayerTransform(scale=(1.0, 1.0, 1.0), translate=(0.0, 0.0, 0.0), affine=aff)


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
