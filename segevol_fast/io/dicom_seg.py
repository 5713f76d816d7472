"""DICOM-SEG output (through highdicom) for results whose input was a DICOM series.

A PACS or a viewer (3D Slicer, OHIF) reads a DICOM Segmentation object that references the
source series: one binary segment per mask, frames aligned to the source slices. The masks come
back from `segment()` on the loaded array (X, Y, Z) = (columns, rows counted from the last one,
slices sorted along the slice normal, `io.dicom.load_dicom`), so frame k of a segment is
mask[:, ::-1, k] transposed, and the source images are passed in that same sorted order.

The segments carry their text label; their coded property is the generic SNOMED CT "Organ" or,
for any other name, "Tissue" (segevol_fast has no per-structure code table), so consumers should
read the segment label. highdicom is an optional dependency: `pip install highdicom`.
"""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

import numpy as np

from ..errors import DicomSeriesError, MissingDependencyError, ResultError, VolumeNotFoundError

ORGANS = {
    "liver",
    "spleen",
    "pancreas",
    "stomach",
    "gallbladder",
    "left kidney",
    "right kidney",
    "kidney",
    "esophagus",
    "duodenum",
    "bladder",
    "urinary bladder",
    "prostate",
    "heart",
    "brain",
    "aorta",
}


def _highdicom():
    try:
        import highdicom
    except ImportError as exc:
        raise MissingDependencyError("DICOM-SEG output needs highdicom: pip install highdicom") from exc
    return highdicom


def is_dicom_source(source) -> bool:
    """True when `source` (a result's input) is a folder holding DICOM slices."""
    if not source or source == "array":
        return False
    from .dicom import is_dicom_folder

    return is_dicom_folder(source)


def sorted_source_images(folder: str | os.PathLike, series: str | None = None) -> list:
    """The slices (pydicom datasets, pixels included) of one series of `folder`, in the order
    load_dicom stacks them: `series` (its SeriesInstanceUID), or the folder's only series.

    A folder that is gone, a series it no longer holds, or several series and no `series` raise
    (VolumeNotFoundError, DicomSeriesError): a SEG referencing any other series' slices would put
    the masks on the wrong images."""
    import pydicom

    from .dicom import describe_series, group_series

    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise VolumeNotFoundError(
            f"the source DICOM folder {folder} is gone (moved or deleted since the scan was read)"
        )
    groups = group_series(folder)
    if series is None:
        if len(groups) != 1:
            raise DicomSeriesError(
                f"{folder} holds {len(groups)} series and the masks do not say which one they "
                "were computed on (series=):\n" + describe_series(groups)
            )
        series = next(iter(groups))
    if series not in groups:
        raise DicomSeriesError(
            f"series {series}, the one the masks were computed on, is no longer in {folder}"
            + (":\n" + describe_series(groups) if groups else " (it holds no DICOM images)")
        )
    items = groups[series]
    iop = np.asarray([float(v) for v in items[0][1].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    along = [np.dot([float(v) for v in ds.ImagePositionPatient], normal) for _, ds in items]
    sources = [pydicom.dcmread(items[i][0]) for i in np.argsort(along, kind="stable")]
    _fill_identifiers(sources)
    return sources


def _fill_identifiers(sources: list) -> list[str]:
    """De-identified series often blank the UIDs a SEG must reference. Fill them in memory (never
    in the files): SOP class / instance from the file meta, else new ones; one frame of reference
    for the series. Returns what was filled (recorded in the SEG's content description)."""
    from pydicom.uid import generate_uid

    filled = []
    frame = next((str(ds.get("FrameOfReferenceUID", "")) for ds in sources if ds.get("FrameOfReferenceUID")), "")
    if not frame:
        frame = generate_uid()
        filled.append("FrameOfReferenceUID")
    for ds in sources:
        meta = getattr(ds, "file_meta", None)
        if not ds.get("SOPClassUID"):
            ds.SOPClassUID = getattr(meta, "MediaStorageSOPClassUID", None) or "1.2.840.10008.5.1.4.1.1.2"
            filled.append("SOPClassUID")
        if not ds.get("SOPInstanceUID"):
            ds.SOPInstanceUID = getattr(meta, "MediaStorageSOPInstanceUID", None) or generate_uid()
            filled.append("SOPInstanceUID")
        for tag in ("StudyInstanceUID", "SeriesInstanceUID"):
            if not ds.get(tag):
                setattr(ds, tag, str(sources[0].get(tag)) or generate_uid())
                filled.append(tag)
        ds.FrameOfReferenceUID = frame
    return sorted(set(filled))


def frames(mask: np.ndarray) -> np.ndarray:
    """A mask (X, Y, Z) on the loaded DICOM grid -> (Z, rows, columns) frames of the source slices."""
    return np.ascontiguousarray(mask[:, ::-1, :].transpose(2, 1, 0))


def write_dicom_seg(
    path: str | os.PathLike,
    masks: dict,
    source_folder: str | os.PathLike,
    *,
    series: str | None = None,
    software_version: str = "",
) -> pathlib.Path:
    """Write masks {label: bool (X, Y, Z)} as one DICOM-SEG file referencing the source series:
    `series` (the SeriesInstanceUID the masks were computed on, `Volume.series`), or the folder's
    only series (see `sorted_source_images`)."""
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    sources = sorted_source_images(source_folder, series)
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    labels: Sequence[str] = list(masks)
    if not labels:
        raise ResultError("no masks to write as DICOM-SEG")
    stack = np.stack([frames(np.asarray(masks[k], dtype=bool)) for k in labels], axis=-1)  # (Z, rows, cols, S)
    if stack.shape[:3] != (len(sources), rows, cols):
        raise ResultError(
            f"masks of shape {np.asarray(masks[labels[0]]).shape} do not lie on the grid of "
            f"series {sources[0].SeriesInstanceUID} in {source_folder} ({len(sources)} slices of "
            f"{rows}x{cols}); has the folder changed since the scan was read?"
        )
    algorithm = hd.AlgorithmIdentificationSequence(
        name="segevol_fast", family=codes.cid7162.ArtificialIntelligence, version=software_version or "unknown"
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=label[:64],
            segmented_property_category=codes.SCT.Organ if label.lower() in ORGANS else codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Organ if label.lower() in ORGANS else codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for i, label in enumerate(labels)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=stack.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="segevol_fast",
        manufacturer_model_name="SegVol",
        software_versions=software_version or "unknown",
        device_serial_number="0",
        omit_empty_frames=False,
    )
    path = pathlib.Path(path)
    seg.save_as(path)
    return path
