"""Volumes in and out: NIfTI, DICOM series, numpy / torch arrays, MONAI MetaTensors <-> `Volume`."""

from .dicom import SeriesInfo, list_series, load_dicom
from .load import load_volume
from .nifti import load_nifti, save_nifti
from .output import check_output_path
from .volume import Volume

__all__ = [
    "Volume",
    "load_volume",
    "load_nifti",
    "save_nifti",
    "check_output_path",
    "load_dicom",
    "list_series",
    "SeriesInfo",
]
