"""`Volume`: a 3-D scan on its own voxel grid.

The array is the file's voxel array (X, Y, Z) = (i, j, k) exactly as stored, never reoriented:
SegVol was trained on unreoriented arrays (docs/official-pipeline.md §5.1, §11.1), so masks come back on this grid.
The affine maps voxel indices to world millimetres in RAS+, the convention nibabel uses.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from ..errors import ShapeError, SpacingWarning, VolumeError

MODALITIES = ("ct", "mri")
MODALITY_ALIASES = {"ct": "ct", "mri": "mri", "mr": "mri"}


def normalize_modality(modality: Optional[str]) -> Optional[str]:
    """'CT' / 'ct' -> 'ct'; 'MR' / 'MRI' -> 'mri'; None stays None. Anything else is an error."""
    if modality is None:
        return None
    key = str(modality).strip().lower()
    if key not in MODALITY_ALIASES:
        raise VolumeError(f"unknown modality {modality!r}; use one of {MODALITIES} or None")
    return MODALITY_ALIASES[key]


def check_3d_shape(shape, what: str) -> None:
    """A ShapeError unless `shape` is 3-D with no empty axis; the message names what is wrong
    (a 2-D slice, an empty axis) instead of a generic "not 3-D"."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3 and 0 in shape:
        empty = [a for a, n in enumerate(shape) if n == 0]
        axes = f"axis {empty[0]} is" if len(empty) == 1 else f"axes {', '.join(map(str, empty))} are"
        raise ShapeError(
            f"{what}: {axes} empty (shape {shape}); a 3-D scan needs at least one voxel along each of X, Y, Z"
        )
    if len(shape) == 2:
        raise ShapeError(
            f"{what} is 2-D (shape {shape}), a single slice; SegVol needs a 3-D volume (X, Y, Z): "
            "stack the slices, or add an axis (array[..., None]) for a one-slice volume"
        )
    if len(shape) != 3:
        raise ShapeError(f"{what} must be 3-D (X, Y, Z), got {len(shape)}-D shape {shape}")


def spacing_from_affine(affine: np.ndarray) -> Tuple[float, float, float]:
    """Voxel size in mm along i, j, k: the lengths of the affine's first three columns."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0))


# Voxel sizes of medical scans, in mm: clinical CT and MR lie within 0.1..10 (thick legacy
# slices and gapped MR up to ~20), preclinical micro-CT goes down to a few tens of micrometres.
# Outside 0.01..50 the unit is almost surely wrong (metres: 0.001; micrometres: 1000; centimetres
# on a CT-sized grid give too large a body); volumes in mL would be off by powers of ten.
PLAUSIBLE_SPACING_MM = (0.01, 50.0)


def warn_if_implausible_spacing(spacing, source: Optional[str]) -> None:
    """A SpacingWarning when a voxel size lies outside PLAUSIBLE_SPACING_MM (mm)."""
    lo, hi = PLAUSIBLE_SPACING_MM
    if all(lo <= s <= hi for s in spacing):
        return
    sp = ", ".join(f"{s:.4g}" for s in spacing)
    warnings.warn(
        f"voxel spacing ({sp}) mm of {source or 'the volume'} is implausible for a medical scan (expected "
        f"{lo:g}..{hi:g} mm per voxel): volumes in mL and world-coordinate prompts will be wrong; check the "
        "file's header or the spacing= / affine= given",
        SpacingWarning,
        stacklevel=4,
    )


def apply_rescale(raw: np.ndarray, slope: float, inter: float) -> np.ndarray:
    """raw * slope + inter, keeping integers integral when that is exact.

    Integer data with integral slope/intercept (the usual CT case, e.g. slope 1, intercept -1024)
    stays integer, narrowed to int16 when the values fit: exact, half the memory of float32, and it
    lets `preprocess` take its histogram path. Anything else becomes float32, the dtype MONAI's
    LoadImage hands the official pipeline.
    """
    slope, inter = float(slope), float(inter)
    if slope == 1.0 and inter == 0.0:
        return raw
    if raw.dtype.kind in "iub" and slope.is_integer() and inter.is_integer() and raw.size:
        s, i = int(slope), int(inter)
        ends = (int(raw.min()) * s, int(raw.max()) * s)
        # the work dtype must hold raw*slope and the result; the output dtype only the result
        work = np.int32 if max(abs(e) + abs(i) for e in ends) < 2**31 else np.int64
        out = raw.astype(work)
        out *= s
        out += i
        lo, hi = min(ends) + i, max(ends) + i
        if np.iinfo(np.int16).min <= lo and hi <= np.iinfo(np.int16).max:
            return out.astype(np.int16)
        return out
    return (raw.astype(np.float64) * slope + inter).astype(np.float32)


@dataclass
class Volume:
    """A 3-D scan.

    array:    numpy array (X, Y, Z), the file's voxel array as stored (any real dtype; int16 for
              most CT). Not reoriented, not resampled.
    affine:   (4, 4) float64, voxel index (i, j, k, 1) -> world (x, y, z, 1) in mm, RAS+.
    spacing:  voxel size in mm along (X, Y, Z); derived from the affine when left None.
    modality: "ct", "mri" or None (unknown).
    source:   where it came from (a path, "array", ...) for messages; None if unknown.
    series:   the SeriesInstanceUID read when `source` is a DICOM folder (a folder may hold several;
              DICOM-SEG output references exactly this one); None for other inputs.
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: Optional[Tuple[float, float, float]] = None
    modality: Optional[str] = None
    source: Optional[str] = None
    series: Optional[str] = None

    def __post_init__(self) -> None:
        arr = np.asarray(self.array)
        check_3d_shape(arr.shape, "a Volume array")
        if arr.dtype.kind not in "iufb":
            raise VolumeError(f"a Volume array must be numeric, got dtype {arr.dtype}")
        self.array = arr
        aff = np.asarray(self.affine, dtype=np.float64)
        if aff.shape != (4, 4):
            raise ShapeError(f"affine must be 4x4, got shape {aff.shape}")
        if not np.isfinite(aff).all() or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
            raise VolumeError(f"affine must be finite and invertible, got\n{aff}")
        self.affine = aff
        if self.spacing is None:
            self.spacing = spacing_from_affine(aff)
        else:
            sp = tuple(float(s) for s in self.spacing)
            if len(sp) != 3 or not all(np.isfinite(s) and s > 0 for s in sp):
                raise VolumeError(f"spacing must be 3 positive finite numbers, got {self.spacing}")
            self.spacing = sp
        self.modality = normalize_modality(self.modality)
        warn_if_implausible_spacing(self.spacing, self.source)

    @property
    def shape(self) -> Tuple[int, int, int]:
        """(X, Y, Z) voxel counts."""
        return tuple(int(s) for s in self.array.shape)

    def voxel_to_world(self, points_vox) -> np.ndarray:
        """(..., 3) voxel coordinates (i, j, k), integer or fractional -> (..., 3) float64 mm (RAS)."""
        p = np.asarray(points_vox, dtype=np.float64)
        if p.shape[-1:] != (3,):
            raise ShapeError(f"points must have shape (..., 3), got {p.shape}")
        return p @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_voxel(self, points_mm) -> np.ndarray:
        """(..., 3) world points in mm (RAS) -> (..., 3) float64 fractional voxel coordinates.

        Round (np.rint) for the nearest voxel; the result may lie outside the grid.
        """
        p = np.asarray(points_mm, dtype=np.float64)
        if p.shape[-1:] != (3,):
            raise ShapeError(f"points must have shape (..., 3), got {p.shape}")
        # solve instead of an explicit inverse: better conditioned for oblique affines
        return np.linalg.solve(self.affine[:3, :3], (p - self.affine[:3, 3]).reshape(-1, 3).T).T.reshape(p.shape)

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.4g}" for s in self.spacing)
        return (
            f"Volume(shape={self.shape}, dtype={self.array.dtype}, spacing=({sp}), "
            f"modality={self.modality!r}, source={self.source!r})"
        )
