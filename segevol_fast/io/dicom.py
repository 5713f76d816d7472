"""A DICOM series folder -> `Volume`, on the grid a dcm2niix-style NIfTI conversion gives.

That convention (checked against the shared series and its converted label map):
  i = column index, j = row index counted from the last row (rows flipped), k = slice index in
  ascending position along the slice normal n = row_dir x col_dir; affine in RAS (LPS x, y negated).
So `load_dicom(folder).array` equals the converted NIfTI's voxel array, and masks predicted on it
line up with label maps made on that NIfTI.
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from ..errors import (
    DamagedFileError,
    DicomSeriesError,
    MissingDependencyError,
    ShapeError,
    UnreadableFileError,
    VolumeFileError,
    VolumeNotFoundError,
)
from .volume import Volume, apply_rescale

PathLike = Union[str, os.PathLike]
INSTALL_HINT = "pip install 'segevol_fast[dicom]'  (pydicom, pylibjpeg, pylibjpeg-openjpeg)"
_GEOM_TOL = 1e-4  # direction cosines / pixel spacing agree across slices to this
_SPACING_RTOL = 0.01  # slice gaps may vary by 1 % (float rounding in IPP) but not more
# The name of a series whose files have no SeriesInstanceUID, in listings, messages and series=.
# A real UID is digits and dots, so no UID can take this name; series="" picks that series too.
NO_UID_SERIES = "no-series-uid"


def _pydicom():
    try:
        import pydicom
    except ImportError as exc:
        raise MissingDependencyError(f"reading DICOM needs pydicom: {INSTALL_HINT}") from exc
    return pydicom


def _read_headers(folder: pathlib.Path) -> List[Tuple[pathlib.Path, object]]:
    """(path, header dataset) for every readable image DICOM file directly in `folder`."""
    pydicom = _pydicom()
    out = []
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name.upper() == "DICOMDIR":
            continue
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except PermissionError as exc:
            raise UnreadableFileError(f"cannot open {f}: {exc.strerror or exc}") from exc
        except Exception as exc:
            # not DICOM (README, thumbnails, ...): skip, as converters do; but a file that says it
            # is DICOM and does not parse is a damaged slice, and skipping it would drop a slice
            if _has_dicm_magic(f):
                raise DamagedFileError(
                    f"{f} is a damaged DICOM file ({type(exc).__name__}: {exc}); "
                    "copy the series again, or remove this slice"
                ) from exc
            continue
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            out.append((f, ds))
        elif _is_image_storage(ds) and _lacks_pixels(pydicom, f):  # an image slice cut short
            raise DamagedFileError(
                f"{f} is a damaged DICOM image: it lacks ImagePositionPatient / "
                "ImageOrientationPatient (truncated?); copy the series again, or remove this slice"
            )
    return out


def _is_image_storage(ds) -> bool:
    sop = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None) or getattr(ds, "SOPClassUID", None)
    return sop is not None and "Image Storage" in str(getattr(sop, "name", ""))


def _lacks_pixels(pydicom, path: pathlib.Path) -> bool:
    # an image file without geometry may be a legitimate screenshot (secondary capture); without
    # pixel data too, it was cut short
    try:
        return "PixelData" not in pydicom.dcmread(path)
    except Exception:
        return True


def _has_dicm_magic(path: pathlib.Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def is_dicom_folder(path) -> bool:
    """True when `path` is a folder holding DICOM files directly (a .dcm suffix or the DICM
    magic): a series folder, as opposed to a folder of scans."""
    p = pathlib.Path(path)
    return p.is_dir() and any(f.is_file() and (f.suffix.lower() == ".dcm" or _has_dicm_magic(f)) for f in p.iterdir())


def series_name(uid: str) -> str:
    """A series' name in listings and messages, and what series= / --series take: its
    SeriesInstanceUID, or NO_UID_SERIES when its files have none."""
    return uid or NO_UID_SERIES


def _series_key(series: str) -> str:
    """series= -> the SeriesInstanceUID the folder's series are grouped by ("" for no UID)."""
    return "" if series == NO_UID_SERIES else series


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series of a folder, as `list_series` reports it."""

    uid: str  # SeriesInstanceUID, "" when the files have none
    slices: int
    modality: str
    description: str

    @property
    def name(self) -> str:
        """What to pass as series= / --series: the UID, or NO_UID_SERIES ("no-series-uid")."""
        return series_name(self.uid)

    def __str__(self) -> str:
        missing = "" if self.uid else ", no SeriesInstanceUID in its files"
        return f"{self.name}  ({self.slices} slices, {self.modality or '?'}, {self.description!r}{missing})"


def group_series(folder: pathlib.Path) -> Dict[str, list]:
    """The folder's DICOM image files by SeriesInstanceUID ("" when a file has none): {uid: [(file, header)]}."""
    groups: Dict[str, list] = {}
    for f, ds in _read_headers(folder):
        groups.setdefault(_uid(ds), []).append((f, ds))
    return groups


def _uid(ds) -> str:
    return str(getattr(ds, "SeriesInstanceUID", "") or "")


def _infos(groups: Dict[str, list]) -> List[SeriesInfo]:
    return [
        SeriesInfo(
            uid,
            len(items),
            str(getattr(items[0][1], "Modality", "") or ""),
            str(getattr(items[0][1], "SeriesDescription", "") or ""),
        )
        for uid, items in groups.items()
    ]


def list_series(folder: PathLike) -> List[SeriesInfo]:
    """The image series in a DICOM folder (not its sub-folders): UID, slice count, modality,
    description. Pick one with `load_volume(folder, series=info.name)` or `--series NAME` (the
    UID, or "no-series-uid" for a series whose files have no SeriesInstanceUID)."""
    p = pathlib.Path(folder)
    if not p.is_dir():
        raise VolumeNotFoundError(f"no such DICOM folder: {p}")
    return _infos(group_series(p))


def describe_series(series: Dict[str, list]) -> str:
    """`group_series`' groups as indented lines (name, slices, modality, description), for messages."""
    return "\n".join(f"  {info}" for info in _infos(series))


def _no_series_message(folder: pathlib.Path) -> str:
    """Why a folder without DICOM image files cannot be read; a folder of scans is a cohort."""
    from .paths import is_nifti_path

    nifti = sum(1 for c in folder.iterdir() if c.is_file() and is_nifti_path(c))
    series = sum(1 for c in folder.iterdir() if is_dicom_folder(c))
    if not nifti and not series:
        return f"{folder} holds no DICOM image files (sub-folders are not searched)"
    held = " and ".join(
        f"{n} {what}{'s' if n > 1 else ''}" for n, what in ((nifti, "NIfTI file"), (series, "DICOM series folder")) if n
    )
    return (
        f"{folder} holds {held}, not one DICOM series: segment() and load_volume() take one scan (a NIfTI "
        f"file or one series folder). To segment every scan in it, run `segevol-fast segment {folder} --out DIR` "
        "or, in Python, segevol_fast.inference.cohort.segment_cohort(model, "
        f"cohort_items({str(folder)!r}, text=...), out_dir)"
    )


def _check_decoder(ds, path: pathlib.Path) -> None:
    """Fail before decoding anything when the transfer syntax has no installed decoder."""
    from pydicom.pixels import get_decoder

    tsyntax = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise VolumeFileError(f"{path}: pixel data in transfer syntax {tsyntax.name} cannot be decoded") from exc
    if not decoder.is_available:
        raise MissingDependencyError(
            f"{path} is compressed ({tsyntax.name}) and no decoder for it is installed; install one: {INSTALL_HINT}"
        )


def _same(values, name: str, tol: float) -> np.ndarray:
    first = np.asarray(values[0], dtype=np.float64)
    for v in values[1:]:
        if not np.allclose(np.asarray(v, dtype=np.float64), first, atol=tol, rtol=0):
            raise DicomSeriesError(f"slices disagree on {name} ({first} vs {v}); not one regular 3-D grid")
    return first


def load_dicom(path: PathLike, series: Optional[str] = None, modality: Optional[str] = None) -> Volume:
    """Read one DICOM series into a `Volume` (array (X, Y, Z) = (columns, rows flipped, slices)).

    path:     a folder of slice files, or one .dcm file (its folder is read, its series chosen).
    series:   SeriesInstanceUID to pick when the folder holds several (the error lists them);
              "no-series-uid" (NO_UID_SERIES) or "" picks the series whose files have none.
    modality: "ct" / "mri"; by default taken from the DICOM Modality tag (CT, MR), else None.

    RescaleSlope / RescaleIntercept are applied (integers stay integers when exact, e.g. int16 HU).
    Compressed series (JPEG 2000, JPEG-LS ...) need a decoder plugin: `pip install segevol_fast[dicom]`.
    """
    p = pathlib.Path(path)
    if p.is_file():
        folder = p.parent
        if series is None:
            try:
                series = _uid(_pydicom().dcmread(p, stop_before_pixels=True))
            except PermissionError as exc:
                raise UnreadableFileError(f"cannot open {p}: {exc.strerror or exc}") from exc
            except Exception as exc:
                raise DamagedFileError(
                    f"{p} cannot be read as DICOM ({type(exc).__name__}: {exc}); is it damaged?"
                ) from exc
    elif p.is_dir():
        folder = p
    else:
        raise VolumeNotFoundError(f"no such DICOM file or folder: {p}")

    groups = group_series(folder)
    if not groups:
        raise VolumeFileError(_no_series_message(folder))
    if series is None:
        if len(groups) > 1:
            raise DicomSeriesError(
                f"{folder} holds {len(groups)} series; pick one with load_volume(folder, series=UID), "
                "segment(..., series=UID) or `segevol-fast segment FOLDER --series UID` "
                f"(segevol_fast.io.list_series(folder) lists them):\n" + describe_series(groups)
            )
        series = next(iter(groups))
    if _series_key(series) not in groups:
        raise DicomSeriesError(
            f"series {series or repr(series)} is not in {folder}; pick one of the series it "
            "holds:\n" + describe_series(groups)
        )
    series = _series_key(series)  # the UID itself from here on ("" for none)
    items = groups[series]
    first = items[0][1]
    for f, ds in items:
        missing = [tag for tag in ("PixelSpacing", "Rows", "Columns") if tag not in ds]
        if missing:
            raise DicomSeriesError(f"{f} lacks {', '.join(missing)}: not a slice of a 3-D image series")
    if int(getattr(first, "NumberOfFrames", 1) or 1) > 1:
        raise DicomSeriesError(f"{items[0][0]} is a multi-frame image; convert it to NIfTI (e.g. dcm2niix) first")

    # geometry: one orientation, one pixel grid for the whole series
    iop = _same([ds.ImageOrientationPatient for _, ds in items], "ImageOrientationPatient", _GEOM_TOL)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    dr, dc = _same([ds.PixelSpacing for _, ds in items], "PixelSpacing", _GEOM_TOL)  # between rows, columns
    _same([(ds.Rows, ds.Columns) for _, ds in items], "Rows/Columns", 0)
    ipp = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in items], dtype=np.float64)
    order = np.argsort(ipp @ normal, kind="stable")
    ipp = ipp[order]
    items = [items[i] for i in order]
    along = ipp @ normal
    if len(items) > 1:
        gaps = np.diff(along)
        if gaps.min() <= 1e-3:
            raise DicomSeriesError(
                f"{len(items)} slices of series {series_name(series)} share positions (several acquisitions, "
                "echoes or phases in one series?); split them before loading"
            )
        if np.abs(gaps - np.median(gaps)).max() > _SPACING_RTOL * np.median(gaps) + 1e-3:
            raise DicomSeriesError(
                f"slices of series {series_name(series)} are unevenly spaced (gaps {gaps.min():.4g}.."
                f"{gaps.max():.4g} mm; missing slices?); resample or convert it with dcm2niix first"
            )
        # the mean step between neighbours, as a vector: keeps any in-plane drift (gantry tilt)
        step = (ipp[-1] - ipp[0]) / (len(items) - 1)
    else:
        thick = float(getattr(first, "SpacingBetweenSlices", 0) or getattr(first, "SliceThickness", 0) or 1.0)
        step = normal * thick

    rows = int(first.Rows)
    # voxel (i, j, k) sits at IPP_0 + i*dc*row_dir + (rows-1-j)*dr*col_dir + k*step (LPS);
    # negating x and y turns LPS into RAS
    lps = np.eye(4)
    lps[:3, 0] = dc * row_dir
    lps[:3, 1] = -dr * col_dir
    lps[:3, 2] = step
    lps[:3, 3] = ipp[0] + (rows - 1) * dr * col_dir
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps

    _check_decoder(first, items[0][0])
    from pydicom.pixels import pixel_array

    stack = None
    slopes, inters = [], []
    for k, (f, ds) in enumerate(items):
        try:
            pix = pixel_array(f)
        except Exception as exc:  # truncated pixel data, a broken JPEG 2000 stream, ...
            raise DamagedFileError(
                f"{f} is damaged: its pixel data cannot be decoded ({type(exc).__name__}: "
                f"{exc}); copy the series again, or remove this slice"
            ) from exc
        if pix.ndim != 2:
            raise ShapeError(f"{f}: expected one grey-level 2-D frame, got pixel array of shape {pix.shape}")
        if stack is None:
            stack = np.empty((len(items),) + pix.shape, dtype=pix.dtype)
        stack[k] = pix[::-1]  # rows flipped: j counts up from the last row
        slopes.append(float(getattr(ds, "RescaleSlope", 1) or 1))
        inters.append(float(getattr(ds, "RescaleIntercept", 0) or 0))

    if len(set(slopes)) == 1 and len(set(inters)) == 1:
        stack = apply_rescale(stack, slopes[0], inters[0])
    else:  # per-slice scaling (seen on some PET/MR): float32 like MONAI's loader would give
        stack = stack.astype(np.float32) * np.float32(slopes)[:, None, None] + np.float32(inters)[:, None, None]
    if modality is None:
        modality = {"CT": "ct", "MR": "mri"}.get(str(getattr(first, "Modality", "")).upper())
    # (Z, Y, X) C-order transposed = (X, Y, Z) F-order: the same memory layout nibabel returns
    return Volume(array=stack.transpose(2, 1, 0), affine=affine, modality=modality, source=str(folder), series=series)
