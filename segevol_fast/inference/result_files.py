"""Writing a `SegmentationResult` to disk: a result folder, or a label map with its sidecar JSON and
its 4-D probability file, plus the small helpers the writers share (atomic bytes, file-safe labels,
JSON-ready prompts).

Saving is all-or-nothing (`segevol_fast.io.output`): a result folder, or a label map with its
sidecar, is always one complete result, the new one or the old one, whatever interrupts the write;
concurrent saves to one output serialise on a lock. Every output records where it came from: the
input, the prompts, the package version, the weights (summary.json / sidecar fields, the NIfTI
header's `descrip`), and random weights are flagged in each file, the preview image included.

A label map's sidecar says what the overlap rule (`SegmentationResult.label_map`) cost: `voxels`
(each mask), `map_voxels` (each id in the map; equal to the map's own counts) and `overlaps` (every
pair of masks that share voxels, with how many). Probabilities, when present, go to
`<name>_prob.nii.gz`, one 4-D float32 file whose 4th axis is the id minus one; they are never
dropped. A rerun removes the files of the previous label map of that name that the new one lacks.

The writers take the result as their first argument and use only its public API (`labels`, `masks`,
`probabilities`, `affine`, `summary()`, `label_map()`, `label_map_report()`, `description()`,
`preview()`), so the result type stays a plain data class with thin `save()` and `preview()`.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import warnings
from typing import Optional, Union

import numpy as np

from ..errors import MissingDependencyError, OutputWarning, ResultError, VolumeFileError
from ..io.nifti import save_nifti
from ..io.output import (
    WRITER,
    check_output_path,
    label_map_names,
    replace_files,
    replace_folder,
    write_file_atomic,
)

PathLike = Union[str, os.PathLike]

# stems of the files a result folder holds besides the masks: a mask may not take them
RESERVED_STEMS = {"label_map", "summary", "preview", "segmentation"}


def write_bytes_atomic(path: PathLike, data: bytes) -> pathlib.Path:
    """Write `data` to `path` so that the file appears complete or not at all (`write_file_atomic`:
    a normal file's mode, OutputError naming `path` when it cannot be written)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return write_file_atomic(path, write)


def safe_label(label: str) -> str:
    """A file-name-safe form of a label: 'left kidney' -> 'left_kidney', '../x' -> 'x'."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(label)).strip("._")
    return s or "mask"


def _unique_names(labels: list[str]) -> dict[str, str]:
    """label -> safe file stem, made unique ('a b' and 'a_b' both map to 'a_b' otherwise) and
    never one of the folder's own files (a prompt called "label map" gets label_map_2)."""
    out, used = {}, set(RESERVED_STEMS)
    for label in labels:
        base = stem = safe_label(label)
        n = 2
        while stem.lower() in used:  # case-insensitive: macOS / Windows file systems
            stem, n = f"{base}_{n}", n + 1
        used.add(stem.lower())
        out[label] = stem
    return out


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def _jsonable(value):
    """numpy / torch values -> plain lists and numbers (None stays None)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    return np.asarray(value).tolist()


def describe_prompts(text=None, box=None, points=None, point_labels=None, coords: str = "voxel") -> dict:
    """The prompts as the user gave them, JSON-ready (recorded in summary.json as "prompts")."""
    return {
        "text": _jsonable(text),
        "box": _jsonable(box),
        "points": _jsonable(points),
        "point_labels": _jsonable(point_labels),
        "coords": coords,
    }


# ---------------------------------------------------------------------- result folder
def write_result_folder(result, path: pathlib.Path, *, preview: bool, volume, lock_timeout: float) -> None:
    """Replace the folder `path` as a whole with `result` (the folder form of
    `SegmentationResult.save`, which documents the files)."""
    check_output_path(path)  # before the lock: a path that cannot work fails without waiting
    with replace_folder(path, lock_timeout=lock_timeout) as stage:
        _write_folder(result, stage, preview, volume)


def _write_folder(result, folder: pathlib.Path, preview: bool, volume) -> None:
    stems = _unique_names(result.labels)
    descrip = result.description()
    files, prob_files = {}, {}
    for label, mask in result.masks.items():
        files[label] = save_nifti(
            folder / f"{stems[label]}.nii.gz", mask, result.affine, dtype=np.uint8, description=descrip
        ).name
        if result.probabilities is not None:
            prob_files[label] = save_nifti(
                folder / f"{stems[label]}_prob.nii.gz", result.probabilities[label], result.affine, description=descrip
            ).name
    if preview:
        result.preview(folder / "preview.png", volume)
    # every mask in one map too (ids in prompt order, the legend in summary.json), for viewers
    # that load one label volume
    lm = result.label_map()
    save_nifti(folder / "label_map.nii.gz", lm, result.affine, description=descrip)
    dicom_seg, dicom_seg_missing = _write_dicom_seg(result, folder)
    summary = result.summary()
    summary["files"] = files
    summary["probability_files"] = prob_files or None
    summary["preview"] = "preview.png" if preview else None
    summary["label_map"] = {"file": "label_map.nii.gz", **result.label_map_report(lm)}
    summary["dicom_seg"] = dicom_seg
    if dicom_seg_missing:
        summary["dicom_seg_not_written"] = dicom_seg_missing
        summary["notes"].append(dicom_seg_missing)
    write_bytes_atomic(folder / "summary.json", _json_bytes(summary))


def _write_dicom_seg(result, folder: pathlib.Path) -> tuple[Optional[str], Optional[str]]:
    """(file name, None) when segmentation.dcm was written (a DICOM-SEG referencing the slices
    of exactly the series the masks were computed on); (None, None) for a non-DICOM input;
    (None, why) when a DICOM input's SEG could not be written: highdicom missing, the source
    folder moved or deleted, the series no longer in it or no longer on the masks' grid.

    That last case warns (OutputWarning) and the save goes on. Raising instead would throw
    away the masks with the whole save (a save is all or nothing), and they stand on their own
    as NIfTI files; rereading the source is unavoidable, since a SEG copies every source slice's
    patient, study and instance identifiers and positions, which the result does not keep. The
    warning names the folder and summary.json records why ("dicom_seg_not_written" and a note);
    warnings.simplefilter("error", OutputWarning) makes it an error."""
    from ..io.dicom_seg import is_dicom_source, write_dicom_seg

    if not result.masks or (result.series is None and not is_dicom_source(result.source)):
        return None, None
    try:
        write_dicom_seg(
            folder / "segmentation.dcm",
            result.masks,
            result.source,
            series=result.series,
            software_version=result.package_version,
        )
    except (MissingDependencyError, VolumeFileError, ResultError) as exc:
        why = f"segmentation.dcm (DICOM-SEG) was not written: {exc}"
        # at the caller of SegmentationResult.save(): here, _write_folder, write_result_folder, save
        warnings.warn(why, OutputWarning, stacklevel=5)
        return None, why
    return "segmentation.dcm", None


# ---------------------------------------------------------------------- label map + sidecar
def write_label_map(result, path: pathlib.Path, *, preview: bool, volume, lock_timeout: float) -> None:
    """Replace the label map at `path` (.nii / .nii.gz), its sidecar `<name>.json`, its
    `<name>_prob` file and its `<name>.png` preview together (the label-map form of
    `SegmentationResult.save`, which documents the files)."""
    gz = path.name.lower().endswith(".nii.gz")
    name, sidecar = label_map_names(path)
    check_output_path(path)  # and again under the lock: the sidecar may have appeared meanwhile
    with replace_files(path, lock_timeout=lock_timeout, guard=lambda folder: check_output_path(path)) as group:
        lm = result.label_map()
        save_nifti(group.dir / path.name, lm, result.affine, description=result.description())
        files = {"label_map": path.name, "sidecar": sidecar, "probabilities": None, "preview": None}
        if result.probabilities is not None:
            files["probabilities"] = name + ("_prob.nii.gz" if gz else "_prob.nii")
            _save_probabilities_4d(
                group.dir / files["probabilities"],
                list(result.probabilities.values()),
                result.affine,
                result.description(),
            )
        if preview:
            files["preview"] = name + ".png"
            result.preview(group.dir / files["preview"], volume)
        side = result.summary()
        side.update(result.label_map_report(lm))
        side["files"] = files
        write_bytes_atomic(group.dir / sidecar, _json_bytes(side))
        group.remove = _stale_files(path.parent / sidecar, set(files.values()))


def _save_probabilities_4d(path: pathlib.Path, probs: list, affine: np.ndarray, description: str) -> None:
    """One (X, Y, Z, N) float32 NIfTI at `path` (in the caller's staging folder)."""
    import nibabel as nib

    arr = np.stack([np.asarray(p, dtype=np.float32) for p in probs], axis=-1)
    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = description.encode("ascii", "replace")[:80]
    write_file_atomic(path, lambda tmp: nib.save(img, tmp), suffix=".nii.gz" if path.name.endswith(".gz") else ".nii")


def _stale_files(old_sidecar: pathlib.Path, keep: set) -> list[str]:
    """Files the previous label map of this name listed (in its sidecar) that the new one lacks."""
    try:
        old = json.loads(old_sidecar.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(old, dict) or old.get("writer") != WRITER or not isinstance(old.get("files"), dict):
        return []
    names = {n for n in old["files"].values() if isinstance(n, str)}
    # plain names in the same folder only: a tampered sidecar cannot make us delete elsewhere
    return sorted(n for n in names - keep if n and pathlib.PurePath(n).name == n and not n.startswith("."))
