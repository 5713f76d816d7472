"""`load_volume`: one entry point for every kind of input the model accepts."""

from __future__ import annotations

import os
import pathlib
import sys
from typing import Optional, Sequence

import numpy as np

from ..errors import (
    ArgumentTypeError,
    InvalidArgumentError,
    ShapeError,
    UnreadableFileError,
    VolumeError,
    VolumeFileError,
    VolumeNotFoundError,
)
from .dicom import load_dicom
from .nifti import load_nifti
from .paths import is_nifti_path
from .volume import Volume, check_3d_shape, normalize_modality

_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def _is_metatensor(obj) -> bool:
    # a MetaTensor can only exist if monai is already imported, so never import it here
    mod = sys.modules.get("monai.data.meta_tensor")
    return mod is not None and isinstance(obj, mod.MetaTensor)


def _squeeze_leading(arr: np.ndarray, what: str) -> np.ndarray:
    """(X,Y,Z), (1,X,Y,Z) or (1,1,X,Y,Z) -> (X,Y,Z); anything else is a ShapeError."""
    if arr.ndim in (4, 5) and all(s == 1 for s in arr.shape[: arr.ndim - 3]):
        arr = arr.reshape(arr.shape[-3:])
    if arr.ndim > 3:
        raise ShapeError(
            f"{what} must be 3-D (X, Y, Z), or 4-D / 5-D with singleton leading (batch, channel) dims; "
            f"got shape {tuple(arr.shape)}"
        )
    check_3d_shape(arr.shape, what)
    return arr


def _to_numpy(t) -> np.ndarray:
    """torch tensor -> numpy, no copy for CPU tensors; dtypes numpy lacks become float32."""
    import torch

    t = t.detach()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()  # float16 would be exact too, but every later step works in float32
    elif t.dtype == torch.bool:
        t = t.to(torch.uint8)
    elif t.is_complex():
        raise VolumeError(f"a complex tensor ({t.dtype}) is not an image volume")
    return t.cpu().numpy()


def _floats(value, name: str) -> np.ndarray:
    if isinstance(value, (str, bytes, dict, set)):
        raise ArgumentTypeError(f"{name} must be numbers, got {type(value).__name__} {value!r:.60}")
    try:
        return np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ArgumentTypeError(f"{name} must be numbers, got {value!r:.80} ({exc})") from None


def _affine_from(affine, spacing: Optional[Sequence[float]]) -> np.ndarray:
    if affine is not None:
        aff = _floats(affine, "affine")
        if aff.ndim == 3 and aff.shape[0] == 1:  # a batched MetaTensor affine (1, 4, 4)
            aff = aff[0]
        if aff.shape != (4, 4):
            raise ShapeError(f"affine must be 4x4, got shape {aff.shape}")
        if spacing is not None:
            cols = np.linalg.norm(aff[:3, :3], axis=0)
            if not np.allclose(cols, _floats(spacing, "spacing"), rtol=1e-3, atol=1e-6):
                raise VolumeError(
                    f"spacing {tuple(spacing)} disagrees with the affine's voxel size {tuple(cols)}; pass only one"
                )
        return aff
    if spacing is not None:
        sp = _floats(spacing, "spacing")
        if sp.shape != (3,):
            raise ShapeError(f"spacing must be 3 numbers (X, Y, Z), got {spacing!r}")
        if not (np.isfinite(sp).all() and (sp > 0).all()):
            raise VolumeError(f"spacing must be 3 positive, finite voxel sizes in mm, got {spacing!r}")
        return np.diag([*sp, 1.0])
    return np.eye(4)


def _check_finite(arr: np.ndarray, what: str) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise VolumeError(f"{what} contains NaN or infinite voxels; fix or mask them before segmenting")


def _read_head(p: pathlib.Path, n: int) -> bytes:
    try:
        with open(p, "rb") as fh:
            return fh.read(n)
    except OSError as exc:  # PermissionError, IsADirectoryError, an I/O error on a network disk
        raise UnreadableFileError(
            f"cannot open {p}: {exc.strerror or exc}; check that the file is readable by this user"
        ) from exc


def _load_path(p: pathlib.Path, modality: Optional[str], series: Optional[str] = None) -> Volume:
    if p.is_dir():
        return load_dicom(p, series=series, modality=modality)
    if not p.exists():
        raise VolumeNotFoundError(f"no such file or folder: {p}")
    if is_nifti_path(p):
        if series is not None:
            raise InvalidArgumentError(f"series= picks a DICOM series; {p} is a NIfTI file (leave series out)")
        _read_head(p, 1)  # unreadable files fail here with the path, not inside nibabel
        return load_nifti(p, modality=modality)
    if p.suffix.lower() in _DICOM_SUFFIXES:
        return load_dicom(p, series=series, modality=modality)
    head = _read_head(p, 132)  # DICOM files often have no suffix: look for the DICM magic
    if head[128:132] == b"DICM":
        return load_dicom(p, series=series, modality=modality)
    raise VolumeFileError(
        f"{p}: unknown kind of file; give a NIfTI file (.nii, .nii.gz), a DICOM series folder or one of its files"
    )


def load_volume(
    src,
    modality: Optional[str] = None,
    affine=None,
    spacing: Optional[Sequence[float]] = None,
    series: Optional[str] = None,
) -> Volume:
    """Turn any supported input into a `Volume` on its own voxel grid.

    src may be:
      * a path (str / PathLike): .nii / .nii.gz file, a DICOM series folder, or one DICOM file
        (its folder is read and its series chosen);
      * a `Volume` (returned as is, or a copy with `modality` / `affine` / `spacing` replaced);
      * a numpy array or torch tensor (X, Y, Z), or (1, X, Y, Z) / (1, 1, X, Y, Z);
      * a MONAI MetaTensor: its `.affine` is used unless `affine` is given.
    affine:   (4, 4) voxel -> RAS mm for array inputs; default diag(spacing) or the identity.
    spacing:  (3,) mm, used to build a diagonal affine when no affine is known.
    modality: "ct" / "mri" / None; a path's DICOM Modality tag fills it when None.
    series:   SeriesInstanceUID to read from a DICOM folder holding several series
              (`segevol_fast.io.list_series(folder)` lists them; "no-series-uid" names a series
              whose files have no UID); only with paths.

    The array is never reoriented or resampled (docs/official-pipeline.md §5.1). Errors: ShapeError for wrong
    dims, VolumeError for non-finite data or bad geometry, VolumeFileError for unknown paths.
    """
    modality = normalize_modality(modality)
    if series is not None and not isinstance(src, (str, os.PathLike)):
        raise InvalidArgumentError("series= picks a DICOM series from a folder; pass it only with a path")
    if isinstance(src, Volume):
        if affine is None and spacing is None and (modality is None or modality == src.modality):
            return src
        aff = src.affine if affine is None and spacing is None else _affine_from(affine, spacing)
        return Volume(src.array, aff, modality=modality or src.modality, source=src.source, series=src.series)
    if isinstance(src, (str, os.PathLike)):
        if affine is not None or spacing is not None:
            raise VolumeError("affine / spacing are taken from the file; pass them only with arrays")
        return _load_path(pathlib.Path(src), modality, series)
    if _is_metatensor(src):
        meta_aff = getattr(src, "affine", None)
        arr = _squeeze_leading(_to_numpy(src.as_tensor()), "a MetaTensor")
        aff = _affine_from(affine if affine is not None else meta_aff, spacing)
        _check_finite(arr, "the MetaTensor")
        return Volume(arr, aff, modality=modality, source="MetaTensor")
    if hasattr(src, "detach") and hasattr(src, "dtype"):  # torch.Tensor without importing torch eagerly
        arr = _squeeze_leading(_to_numpy(src), "a tensor")
        what = "tensor"
    elif isinstance(src, np.ndarray):
        arr = _squeeze_leading(src, "an array")
        what = "array"
    else:
        raise VolumeError(
            f"cannot make a volume from {type(src).__name__}; give a path, Volume, numpy array, torch tensor "
            "or MONAI MetaTensor"
        )
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "iuf":
        raise VolumeError(f"the {what} has dtype {arr.dtype}; a real-valued image is needed")
    _check_finite(arr, f"the {what}")
    return Volume(arr, _affine_from(affine, spacing), modality=modality, source=what)
