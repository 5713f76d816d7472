"""NIfTI read / write through nibabel.

Reading matches what the official pipeline sees (MONAI NibabelReader, `as_closest_canonical=False`):
the stored voxel array, unreoriented, with nibabel's affine (sform, else qform, else zooms).
"""

from __future__ import annotations

import os
import pathlib
import zlib
from typing import Optional, Union

import numpy as np

from ..errors import (
    DamagedFileError,
    ShapeError,
    UnreadableFileError,
    VolumeError,
    VolumeFileError,
    VolumeNotFoundError,
)
from .output import write_file_atomic
from .paths import is_nifti_path
from .volume import Volume, apply_rescale, check_3d_shape

PathLike = Union[str, os.PathLike]


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _open(nib, p: pathlib.Path):
    """nib.load with its errors turned into ours: nibabel raises unrelated types for damaged files."""
    if p.stat().st_size == 0:
        raise DamagedFileError(f"{p} is empty (0 bytes): the file is damaged or was not fully written")
    try:
        return nib.load(str(p))
    except PermissionError as exc:
        raise UnreadableFileError(f"cannot open {p}: {exc.strerror or exc}") from exc
    except Exception as exc:
        gz = "gzip" in str(exc).lower() or isinstance(exc, (EOFError, zlib.error))
        raise DamagedFileError(
            f"{p} is damaged or not a NIfTI file: its {'gzip stream' if gz else 'header'} cannot be read "
            f"({type(exc).__name__}: {_first_line(exc)}); copy or export the file again"
        ) from exc


def load_nifti(path: PathLike, modality: Optional[str] = None) -> Volume:
    """Read a .nii / .nii.gz file into a `Volume`.

    The array keeps the file's dtype (int16 stays int16) unless scl_slope / scl_inter are
    non-trivial; then they are applied as nibabel's get_fdata would, but into integers when exact
    and float32 otherwise (see `apply_rescale`). Trailing singleton dims, e.g. (X, Y, Z, 1), are
    dropped; a real 4-D series is refused.
    """
    import nibabel as nib

    p = pathlib.Path(path)
    if not p.is_file():
        raise VolumeNotFoundError(f"no such NIfTI file: {p}")
    img = _open(nib, p)
    shape = tuple(img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 3:  # nibabel reads an empty axis as a flat (0,) array: judge by the header
        check_3d_shape(shape, str(p))
    proxy = img.dataobj
    try:
        raw = np.asanyarray(proxy.get_unscaled()) if hasattr(proxy, "get_unscaled") else np.asanyarray(proxy)
    except PermissionError as exc:
        raise UnreadableFileError(f"cannot open {p}: {exc.strerror or exc}") from exc
    except (EOFError, OSError, ValueError, zlib.error) as exc:  # truncated / corrupt voxel data
        raise DamagedFileError(
            f"{p} is damaged or truncated: its header reads but its voxel data does not "
            f"({type(exc).__name__}: {_first_line(exc)}); copy or export the file again"
        ) from exc
    slope = getattr(proxy, "slope", 1.0)
    inter = getattr(proxy, "inter", 0.0)
    while raw.ndim > 3 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    if raw.ndim != 3:
        raise ShapeError(
            f"{p} holds an array of shape {img.shape}; a 3-D volume (X, Y, Z) is needed "
            "(split 4-D series into one file per volume)"
        )
    array = apply_rescale(raw, slope, inter)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise VolumeError(f"{p} contains NaN or infinite voxels; fix or mask them before segmenting")
    return Volume(array=array, affine=np.asarray(img.affine, dtype=np.float64), modality=modality, source=str(p))


def save_nifti(path: PathLike, array, affine, dtype=None, description: Optional[str] = None) -> pathlib.Path:
    """Write a 3-D array (numpy or torch, (X, Y, Z)) with a (4, 4) RAS affine as NIfTI, atomically.

    The file appears complete or not at all: it is written under a temporary name in the same
    folder and then renamed over `path` (os.replace is atomic within one file system).
    bool arrays are stored as uint8 (NIfTI has no bool); `dtype` forces another on-disk dtype.
    `description` goes into the header's `descrip` field (cut to its 80 bytes). Returns the final path.
    """
    import nibabel as nib

    p = pathlib.Path(path)
    if not is_nifti_path(p):
        raise VolumeFileError(f"{p}: a NIfTI file name must end in .nii or .nii.gz")
    if hasattr(array, "detach"):  # torch tensor; torch itself is not needed to save numpy arrays
        array = array.detach().cpu().numpy()
    arr = np.asarray(array)
    if arr.ndim != 3:
        raise ShapeError(f"save_nifti expects a 3-D (X, Y, Z) array, got shape {arr.shape}")
    if dtype is not None:
        arr = arr.astype(dtype)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise ShapeError(f"affine must be 4x4, got shape {aff.shape}")
    img = nib.Nifti1Image(arr, aff)
    img.header.set_xyzt_units("mm")
    if description:
        img.header["descrip"] = description.encode("ascii", "replace")[:80]
    suffix = ".nii.gz" if str(p).lower().endswith(".gz") else ".nii"
    return write_file_atomic(p, lambda tmp: nib.save(img, tmp), suffix=suffix)
