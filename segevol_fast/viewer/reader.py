"""napari's reader hook: NIfTI files and DICOM series open through `segevol_fast.io.load_volume`.

The layer holds the scan exactly as the model reads it (the stored array, not resampled; its axes
reordered only for scans stored along permuted axes, see `coords`), placed in world space by its
affine (`coords.image_transform`), so the masks drawn over it line up, and so do scans of other
grids. The `Volume` itself travels in the layer's metadata for the widget:
a session is built on it without reading the file again.

Plain tuples only, no napari import: napari turns them into layers.
"""

from __future__ import annotations

import os
import pathlib
from typing import Callable, Optional, Union

from ..io import load_volume
from ..io.dicom import is_dicom_folder
from ..io.paths import NIFTI_SUFFIXES, is_nifti_path
from .coords import image_transform

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
VOLUME_KEY = "segevol_volume"  # the layer metadata key holding the Volume

PathLike = Union[str, os.PathLike]
LayerData = tuple  # (array, layer keyword arguments, "image"): napari's layer-data tuple


def _source(path: PathLike) -> Optional[pathlib.Path]:
    """What to load for `path`: the file, or the series folder; None when it is no scan of ours.
    Decided from names (and a folder's listing), never by reading pixels."""
    p = pathlib.Path(path)
    if p.is_file() and (is_nifti_path(p) or p.suffix.lower() in DICOM_SUFFIXES):
        return p
    if is_dicom_folder(p):
        return p
    return None


def _layer_name(path: pathlib.Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.parent.name if path.suffix.lower() in DICOM_SUFFIXES else name


def read_volume(path: PathLike) -> list[LayerData]:
    """One image layer for a NIfTI file, a DICOM series folder or one of its files (its series):
    `image_transform(volume).to_layer(volume.array)` placed by `layer_kwargs()`, the `Volume` in
    the metadata. Errors are load_volume's (VolumeFileError and its kin): napari reports them."""
    volume = load_volume(path)
    transform = image_transform(volume)
    kwargs = {
        "name": _layer_name(pathlib.Path(path)),
        **transform.layer_kwargs(),
        "metadata": {VOLUME_KEY: volume, "path": str(path)},
    }
    return [(transform.to_layer(volume.array), kwargs, "image")]


def _read_all(paths: list[pathlib.Path]) -> list[LayerData]:
    return [layer for p in paths for layer in read_volume(p)]


def napari_get_reader(path: Union[PathLike, list[PathLike]]) -> Optional[Callable[..., list[LayerData]]]:
    """napari's hook: a reader for `path` (one path, or a list of them opened together), or None
    when some path is no NIfTI file, DICOM file or DICOM series folder.

    Several files of one DICOM folder (a series selected file by file) give one layer, the series
    of the first of them; pick other series of that folder one at a time.
    """
    paths = path if isinstance(path, (list, tuple)) else [path]
    sources = [_source(p) for p in paths]
    if not sources or any(s is None for s in sources):
        return None
    chosen: dict[pathlib.Path, pathlib.Path] = {}
    for s in sources:
        chosen.setdefault(s.parent if s.suffix.lower() in DICOM_SUFFIXES else s, s)

    def reader(_path=None) -> list[LayerData]:
        return _read_all(list(chosen.values()))

    return reader
