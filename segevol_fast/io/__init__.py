"""Volumes in and out: NIfTI, DICOM series, numpy / torch arrays, MONAI MetaTensors <-> `Volume`."""

from .dicom import load_dicom
from .load import load_volume
from .nifti import load_nifti, save_nifti
from .volume import (
    DicomSeriesError,
    MissingDependencyError,
    Volume,
    VolumeError,
    VolumeFileError,
)

__all__ = [
    "Volume",
    "load_volume",
    "load_nifti",
    "save_nifti",
    "load_dicom",
    "VolumeError",
    "VolumeFileError",
    "DicomSeriesError",
    "MissingDependencyError",
]
