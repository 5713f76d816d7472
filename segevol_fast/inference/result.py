"""`SegmentationResult`: what `segment()` returns, and how it is written to disk.

One mask per prompt, in prompt order, keyed by the prompt's label ("liver", "box 0", ...), each on
the *input* voxel grid (X, Y, Z) of the volume with the input's affine, so a mask saved here lines
up with the scan in any viewer.

Saving is all-or-nothing (`segevol_fast.io.output`): a result folder, or a label map with its
sidecar, is always one complete result, the new one or the old one, whatever interrupts the write;
concurrent saves to one output serialise on a lock. Every output records where it came from: the
input, the prompts, the package version, the weights (summary.json / sidecar fields, the NIfTI
header's `descrip`), and random weights are flagged in each file, the preview image included.

Label-map rule (`save("x.nii.gz")`, `label_map()`): ids 1..N follow prompt order and on overlap the
*later* prompt wins. The sidecar says what that cost: `voxels` (each mask), `map_voxels` (each id
in the map; equal to the map's own counts) and `overlaps` (every pair of masks that share voxels,
with how many). Probabilities, when present, go to `<name>_prob.nii.gz`, one 4-D float32 file whose
4th axis is the id minus one; they are never dropped.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import re
import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np

from ..errors import MissingDependencyError, OutputWarning, ResultError, VolumeFileError
from ..io.nifti import save_nifti
from ..io.output import (
    LOCK_TIMEOUT_S,
    WRITER,
    check_output_path,
    label_map_names,
    replace_files,
    replace_folder,
    write_file_atomic,
)
from ..io.paths import is_nifti_path
from ..io.volume import spacing_from_affine
from ..totalseg_names import totalseg_legend
from ..version import __version__

PathLike = Union[str, os.PathLike]

# preview layout (pixels); public so callers and tests can predict the PNG size
TILE_PX = 256  # longer side of one slice tile
PAD_PX = 4  # gap between tiles and around the montage
LEGEND_ROW_PX = 18  # height of one legend line
MAX_COLS = 3
OVERLAY_ALPHA = 0.45
# distinguishable on grey CT: red, green, blue, yellow, magenta, cyan, orange, purple, ...
BANNER_PX = 20  # height of the red "random weights" banner on top of a preview (only then)
BANNER_TEXT = "RANDOM WEIGHTS - MASKS ARE MEANINGLESS"
BANNER_RGB = (200, 0, 0)
OVERLAP_RULE = "later prompt wins: a voxel in several masks gets the id of the last of them in prompt order"
PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (255, 225, 25),
    (240, 50, 230),
    (70, 240, 240),
    (245, 130, 48),
    (145, 30, 180),
    (210, 245, 60),
    (250, 190, 212),
]


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


# stems of the files a result folder holds besides the masks: a mask may not take them
RESERVED_STEMS = {"label_map", "summary", "preview", "segmentation"}


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


def _package_version() -> str:
    return __version__


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


@dataclass
class SegmentationResult:
    """Masks (and optionally probabilities) of one `segment()` call.

    masks:         {label: bool ndarray (X, Y, Z)} on the input grid, in prompt order.
    affine:        (4, 4) float64 voxel -> RAS mm of the input volume.
    spacing:       (3,) mm along X, Y, Z; derived from the affine when None.
    modality:      "ct" / "mri" / None, as used for the text prompts.
    probabilities: None or {label: float32 ndarray (X, Y, Z) in [0, 1]}, same labels and grid.
    timings:       seconds per phase of the call: {"load", "preprocess", "inference", "paste_back",
                   "total"} (finer stages, and the CLI's model loading and saving, are the Progress
                   display's `timings`).
    peak_memory_bytes: peak memory of the call (device memory on CUDA, RSS on CPU), or None.
    mode:          "fast" or "exact".
    precision:     "fp32", "bf16" or "fp16": the autocast precision the model ran under.
    plan:          the memory plan it ran with (`Plan.summary()`: window batch, accumulator
                   dtype, cache size, estimated peak and its breakdown; in fast mode also
                   "oom_retries", what out-of-memory recovery changed); None when built by hand.
    zoom_in_windows: {label: zoom-in windows the prompt ran} (0 = coarse result kept). Exact mode
                   runs the official grid over the prompt's own ROI, fast mode shares one grid
                   over the crop, so the counts of the two modes can differ.
    notes:         human-readable caveats, e.g. "random weights: masks are meaningless".
    source:        the input: its path, "array" for an in-memory array, or None when unknown.
    series:        the SeriesInstanceUID the masks were computed on when the input was a DICOM
                   folder (`Volume.series`); the DICOM-SEG output references exactly its slices.
    prompts:       the prompts as given (`describe_prompts`), or None when unknown.
    weights_source: where the model's weights came from (a path), None when not loaded.
    random_weights: True when the model was not loaded from a checkpoint (masks are meaningless),
                   False when it was, None when unknown. True adds a banner to the preview and
                   "RANDOM WEIGHTS" to every NIfTI header.
    adapter:       which adapter ran ("base", a name, a mixture's choice for this scan), or None
                   when the call did not choose (the model as it was set).
    package_version: segevol_fast's version that produced the result.
    volume:        a reference (not a copy) to the input scan (X, Y, Z), used as the preview's
                   background; not in repr or summary. Set it to None to release the scan's memory.
    """

    masks: dict[str, np.ndarray]
    affine: np.ndarray
    spacing: Optional[tuple[float, float, float]] = None
    modality: Optional[str] = None
    probabilities: Optional[dict[str, np.ndarray]] = None
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: Optional[int] = None
    mode: str = "fast"
    notes: list[str] = field(default_factory=list)
    precision: str = "fp32"
    plan: Optional[dict] = None
    zoom_in_windows: Optional[dict[str, int]] = None
    source: Optional[str] = None
    series: Optional[str] = None
    prompts: Optional[dict] = None
    weights_source: Optional[str] = None
    random_weights: Optional[bool] = None
    adapter: Optional[str] = None
    package_version: str = field(default_factory=_package_version)
    volume: Optional[np.ndarray] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        aff = np.asarray(self.affine, dtype=np.float64)
        if aff.shape != (4, 4) or not np.isfinite(aff).all():
            raise ResultError(f"affine must be a finite 4x4 matrix, got shape {aff.shape}")
        self.affine = aff
        self.spacing = tuple(float(s) for s in (self.spacing if self.spacing is not None else spacing_from_affine(aff)))
        shapes = {np.shape(m) for m in self.masks.values()}
        if len(shapes) > 1 or any(len(s) != 3 for s in shapes):
            raise ResultError(f"masks must all be 3-D (X, Y, Z) on one grid, got shapes {sorted(shapes)}")
        # bool without a copy when it already is one; anything else is thresholded like logits > 0
        self.masks = {
            str(k): (v if v.dtype == np.bool_ else v > 0)
            for k, v in ((k, np.asarray(v)) for k, v in self.masks.items())
        }
        if self.probabilities is not None:
            if list(self.probabilities) != list(self.masks):
                raise ResultError(
                    f"probabilities labels {list(self.probabilities)} differ from masks {list(self.masks)}"
                )
            probs = {str(k): np.asarray(v, dtype=np.float32) for k, v in self.probabilities.items()}
            if any(p.shape != self.shape for p in probs.values()):
                raise ResultError(f"probabilities must have the masks' shape {self.shape}")
            self.probabilities = probs
        if self.volume is not None:
            vol = np.asarray(getattr(self.volume, "array", self.volume))  # a Volume or an array; no copy
            if self.masks and vol.shape != self.shape:
                raise ResultError(f"volume has shape {vol.shape}, masks have {self.shape}")
            self.volume = vol

    # ------------------------------------------------------------------ queries
    @property
    def labels(self) -> list[str]:
        """Mask labels in prompt order."""
        return list(self.masks)

    @property
    def shape(self) -> tuple[int, ...]:
        """(X, Y, Z) of the input grid; () when there are no masks."""
        return next(iter(self.masks.values())).shape if self.masks else ()

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel in mL (|det| of the affine's 3x3 part is mm³ per voxel; 1 mL = 1000 mm³)."""
        return abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def volume_ml(self, label: str) -> float:
        """Volume of one mask in millilitres."""
        if label not in self.masks:
            raise ResultError(f"no mask named {label!r}; labels are {self.labels}")
        return int(np.count_nonzero(self.masks[label])) * self.voxel_ml

    def volumes_ml(self) -> dict[str, float]:
        """{label: mL} in prompt order."""
        return {label: self.volume_ml(label) for label in self.masks}

    def label_map(self) -> np.ndarray:
        """(X, Y, Z) uint8 ids 1..N in prompt order (0 = background; later prompts win on
        overlap); uint16 beyond 255 masks."""
        dtype = np.uint8 if len(self.masks) < 256 else np.uint16
        out = np.zeros(self.shape, dtype=dtype)
        for i, m in enumerate(self.masks.values(), start=1):
            out[m] = i
        return out

    def summary(self) -> dict:
        """JSON-ready description: provenance (writer, version, input, prompts, weights), labels,
        volumes, timings, memory, mode, notes, geometry."""
        return {
            "writer": WRITER,
            "package_version": self.package_version,
            "source": self.source,
            "series": self.series,
            "prompts": self.prompts,
            "weights_source": self.weights_source,
            "random_weights": self.random_weights,
            "adapter": self.adapter,
            "labels": self.labels,
            "volumes_ml": {k: round(v, 3) for k, v in self.volumes_ml().items()},
            "voxels": {k: int(np.count_nonzero(m)) for k, m in self.masks.items()},
            "timings_s": {k: round(float(v), 4) for k, v in self.timings.items()},
            "peak_memory_bytes": None if self.peak_memory_bytes is None else int(self.peak_memory_bytes),
            "mode": self.mode,
            "precision": self.precision,
            "plan": self.plan,
            "zoom_in_windows": self.zoom_in_windows,
            "modality": self.modality,
            "shape": list(self.shape),
            "spacing_mm": list(self.spacing),
            "affine": self.affine.tolist(),
            "notes": list(self.notes),
        }

    # ------------------------------------------------------------------ output
    def description(self) -> str:
        """The NIfTI header `descrip` of every file written (at most 80 bytes)."""
        text = f"segevol_fast {self.package_version}"
        if self.random_weights:
            text += "; RANDOM WEIGHTS - MEANINGLESS"
        return text[:80]

    def save(
        self, path_or_dir: PathLike, *, preview: bool = False, volume=None, lock_timeout: float = LOCK_TIMEOUT_S
    ) -> pathlib.Path:
        """Write the result, all or nothing; returns the directory or label-map path written.

        * A path ending in .nii / .nii.gz: one label map (`label_map()`: later prompts win on
          overlap, see the module docstring), a sidecar `<name>.json` ("labels" maps id (str) ->
          label; `map_voxels`, `overlaps`, "files" and the summary fields), `<name>_prob.nii.gz`
          (4-D float32, id-1 along the 4th axis) when probabilities are present, and
          `<name>.png` with `preview=True`. These files are replaced together.
        * A new path ending in another kind of file (.png, .json, .dcm, ...; `io.output.FILE_SUFFIXES`)
          is refused (OutputError listing these forms): `save("x.png")` never makes a folder x.png.
        * Anything else is a directory, replaced as a whole: `<safe_label>.nii.gz` per mask (uint8
          0/1), `label_map.nii.gz` (all masks, ids in prompt order; legend and overlaps in
          summary.json "label_map"), `<safe_label>_prob.nii.gz` (float32) with probabilities,
          `preview.png` with `preview=True`, `segmentation.dcm` (DICOM-SEG referencing the series
          the masks were computed on) when the input was a DICOM series, and `summary.json`
          ("files": label -> mask file; "probability_files"). When the SEG cannot be written (the
          source folder gone, say) everything else is, with an OutputWarning, and summary.json's
          "dicom_seg_not_written" says why.
          An existing non-empty folder that segevol_fast did not write is refused (OutputError).

        volume: background of the preview (default: the scan kept in `self.volume`).
        lock_timeout: seconds to wait for another run writing the same output (OutputLockedError).
        """
        p = pathlib.Path(path_or_dir)
        if is_nifti_path(p):
            self._save_label_map(p, preview, volume, lock_timeout)
            return p
        check_output_path(p)  # before the lock: a path that cannot work fails without waiting
        with replace_folder(p, lock_timeout=lock_timeout) as stage:
            self._save_into(stage, preview, volume)
        return p

    def _save_into(self, folder: pathlib.Path, preview: bool, volume) -> None:
        stems = _unique_names(self.labels)
        descrip = self.description()
        files, prob_files = {}, {}
        for label, mask in self.masks.items():
            files[label] = save_nifti(
                folder / f"{stems[label]}.nii.gz", mask, self.affine, dtype=np.uint8, description=descrip
            ).name
            if self.probabilities is not None:
                prob_files[label] = save_nifti(
                    folder / f"{stems[label]}_prob.nii.gz", self.probabilities[label], self.affine, description=descrip
                ).name
        if preview:
            self.preview(folder / "preview.png", volume)
        # every mask in one map too (ids in prompt order, the legend in summary.json), for viewers
        # that load one label volume
        lm = self.label_map()
        save_nifti(folder / "label_map.nii.gz", lm, self.affine, description=descrip)
        dicom_seg, dicom_seg_missing = self._save_dicom_seg(folder)
        summary = self.summary()
        summary["files"] = files
        summary["probability_files"] = prob_files or None
        summary["preview"] = "preview.png" if preview else None
        summary["label_map"] = {"file": "label_map.nii.gz", **self.label_map_report(lm)}
        summary["dicom_seg"] = dicom_seg
        if dicom_seg_missing:
            summary["dicom_seg_not_written"] = dicom_seg_missing
            summary["notes"].append(dicom_seg_missing)
        write_bytes_atomic(folder / "summary.json", _json_bytes(summary))

    def _save_dicom_seg(self, folder: pathlib.Path) -> tuple[Optional[str], Optional[str]]:
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

        if not self.masks or (self.series is None and not is_dicom_source(self.source)):
            return None, None
        try:
            write_dicom_seg(
                folder / "segmentation.dcm",
                self.masks,
                self.source,
                series=self.series,
                software_version=self.package_version,
            )
        except (MissingDependencyError, VolumeFileError, ResultError) as exc:
            why = f"segmentation.dcm (DICOM-SEG) was not written: {exc}"
            warnings.warn(why, OutputWarning, stacklevel=4)  # at the caller of save()
            return None, why
        return "segmentation.dcm", None

    def _save_label_map(self, p: pathlib.Path, preview: bool, volume, lock_timeout: float) -> None:
        gz = p.name.lower().endswith(".nii.gz")
        name, sidecar = label_map_names(p)
        check_output_path(p)  # and again under the lock: the sidecar may have appeared meanwhile
        with replace_files(p, lock_timeout=lock_timeout, guard=lambda folder: check_output_path(p)) as group:
            lm = self.label_map()
            save_nifti(group.dir / p.name, lm, self.affine, description=self.description())
            files = {"label_map": p.name, "sidecar": sidecar, "probabilities": None, "preview": None}
            if self.probabilities is not None:
                files["probabilities"] = name + ("_prob.nii.gz" if gz else "_prob.nii")
                _save_probabilities_4d(
                    group.dir / files["probabilities"],
                    list(self.probabilities.values()),
                    self.affine,
                    self.description(),
                )
            if preview:
                files["preview"] = name + ".png"
                self.preview(group.dir / files["preview"], volume)
            side = self.summary()
            side.update(self.label_map_report(lm))
            side["files"] = files
            write_bytes_atomic(group.dir / sidecar, _json_bytes(side))
            group.remove = _stale_files(p.parent / sidecar, set(files.values()))

    def label_map_report(self, label_map: Optional[np.ndarray] = None) -> dict:
        """What the label map keeps of each mask: {"labels": {id: label}, "totalsegmentator_total":
        {id: {"name", "id"}} for labels naming a TotalSegmentator `total` class, "overlap_rule",
        "map_voxels": {label: voxels with its id in the map}, "overlaps": [{"labels": [a, b],
        "voxels": n}, ...] for every pair of masks sharing voxels}. `voxels` (in `summary()`) minus
        `map_voxels` is what later prompts took from a mask."""
        lm = self.label_map() if label_map is None else label_map
        counts = np.bincount(lm.ravel(), minlength=len(self.masks) + 1)
        labels = self.labels
        overlaps = []
        boxes = [_bbox(m) for m in self.masks.values()]
        for a in range(len(labels)):
            for b in range(a + 1, len(labels)):
                sl = _intersect(boxes[a], boxes[b])
                if sl is None:
                    continue
                n = int(np.count_nonzero(self.masks[labels[a]][sl] & self.masks[labels[b]][sl]))
                if n:
                    overlaps.append({"labels": [labels[a], labels[b]], "voxels": n})
        legend = {str(i): label for i, label in enumerate(labels, start=1)}
        return {
            "labels": legend,
            # the TotalSegmentator `total` class of each id whose label names one (ids differ)
            "totalsegmentator_total": totalseg_legend(legend),
            "overlap_rule": OVERLAP_RULE,
            "map_voxels": {label: int(counts[i]) for i, label in enumerate(labels, start=1)},
            "overlaps": overlaps,
        }

    def preview(self, png_path: PathLike, volume=None, n_slices: int = 6) -> pathlib.Path:
        """Write a PNG montage of up to `n_slices` axial slices (the array's 3rd axis) through the
        masks' extent, masks as coloured semi-transparent overlays, with a legend.

        volume: a `Volume` or an (X, Y, Z) array on the masks' grid for the background (windowed
        to its 0.5 / 99.5 percentiles); None (default) uses the scan kept in `self.volume`;
        False draws on black. With `random_weights` a red banner (BANNER_PX high) saying the
        masks are meaningless is added on top. A path that cannot be written raises OutputError
        naming it and why. Tiles show i to the right
        and j upwards, scaled so their longer side is TILE_PX with the in-plane spacing's aspect.
        Size: cols = min(n, MAX_COLS), rows = ceil(n / cols) for n distinct slices; width =
        cols*tile_w + (cols+1)*PAD_PX; height = rows*tile_h + (rows+1)*PAD_PX +
        len(labels)*LEGEND_ROW_PX + PAD_PX (+ BANNER_PX with the banner).
        """
        if volume is None:
            volume = self.volume
        arr = None if volume is None or volume is False else np.asarray(getattr(volume, "array", volume))
        if arr is not None and arr.shape != self.shape:
            raise ResultError(f"preview volume has shape {arr.shape}, masks have {self.shape}")
        if not self.masks:
            raise ResultError("nothing to preview: the result has no masks")
        image = _render_montage(
            arr, self.masks, self.spacing, n_slices, banner=BANNER_TEXT if self.random_weights else None
        )
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return write_bytes_atomic(png_path, buf.getvalue())

    def __repr__(self) -> str:
        lines = [
            f"SegmentationResult(mode={self.mode!r}, modality={self.modality!r}, shape={self.shape}, "
            f"{len(self.masks)} mask{'s' if len(self.masks) != 1 else ''})"
        ]
        for label, ml in self.volumes_ml().items():
            lines.append(f"  {label:<24} {ml:10.1f} mL")
        if self.timings:
            lines.append("  timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items()))
        if self.peak_memory_bytes is not None:
            lines.append(f"  peak memory: {self.peak_memory_bytes / 2**20:.0f} MiB")
        if self.random_weights:
            lines.append("  RANDOM WEIGHTS: the masks are meaningless")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


# ---------------------------------------------------------------------- saving helpers
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


def _bbox(m: np.ndarray):
    """Per-axis (lo, hi) of the set voxels, None when the mask is empty."""
    out = []
    for axis in range(m.ndim):
        idx = np.flatnonzero(m.any(axis=tuple(a for a in range(m.ndim) if a != axis)))
        if idx.size == 0:
            return None
        out.append((int(idx[0]), int(idx[-1]) + 1))
    return out


def _intersect(a, b):
    if a is None or b is None:
        return None
    sl = tuple(slice(max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    return None if any(s.start >= s.stop for s in sl) else sl


# ---------------------------------------------------------------------- preview rendering
def _pick_slices(masks: dict[str, np.ndarray], depth: int, n: int) -> list[int]:
    """Up to n distinct k indices spread evenly over the slices where any mask is set
    (over the whole depth when every mask is empty)."""
    any_k = np.zeros(depth, dtype=bool)
    for m in masks.values():
        any_k |= m.any(axis=(0, 1))
    ks = np.flatnonzero(any_k)
    lo, hi = (int(ks[0]), int(ks[-1])) if ks.size else (0, depth - 1)
    return sorted({int(round(v)) for v in np.linspace(lo, hi, max(1, int(n)))})


def _window(arr: np.ndarray) -> tuple[float, float]:
    """0.5 / 99.5 percentiles of the volume; strided so a 512×512×300 CT costs milliseconds."""
    step = max(1, int(np.ceil((arr.size / 4_000_000) ** (1 / 3))))
    lo, hi = np.percentile(arr[::step, ::step, ::step], [0.5, 99.5])
    return float(lo), float(hi) if hi > lo else float(lo) + 1.0


def _outline(m: np.ndarray) -> np.ndarray:
    """Pixels of a 2-D mask with a 4-neighbour outside it: drawn opaque so small masks show."""
    pad = np.pad(m, 1)
    inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    return m & ~inner


def _tile_size(shape_xy: tuple[int, int], spacing: tuple[float, ...]) -> tuple[int, int]:
    """(width, height) px of one tile: physical aspect, longer side TILE_PX."""
    w_mm, h_mm = shape_xy[0] * spacing[0], shape_xy[1] * spacing[1]
    s = TILE_PX / max(w_mm, h_mm)
    return max(1, int(round(w_mm * s))), max(1, int(round(h_mm * s)))


def _render_montage(arr, masks: dict[str, np.ndarray], spacing, n_slices: int, banner: Optional[str] = None):
    """PIL RGB image: an optional red banner, the slice tiles in a grid, then one legend line per mask."""
    try:
        from PIL import Image, ImageDraw
    except ImportError as exc:
        raise MissingDependencyError("preview images need Pillow: pip install pillow") from exc
    shape = next(iter(masks.values())).shape
    ks = _pick_slices(masks, shape[2], n_slices)
    tw, th = _tile_size(shape[:2], spacing)
    cols = min(len(ks), MAX_COLS)
    rows = -(-len(ks) // cols)
    width = cols * tw + (cols + 1) * PAD_PX
    top = BANNER_PX if banner else 0
    height = top + rows * th + (rows + 1) * PAD_PX + len(masks) * LEGEND_ROW_PX + PAD_PX
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    if banner:
        draw = ImageDraw.Draw(canvas)
        draw.rectangle([0, 0, width - 1, BANNER_PX - 1], fill=BANNER_RGB)
        draw.text((PAD_PX, 4), banner, fill=(255, 255, 255))
    lo, hi = _window(arr) if arr is not None else (0.0, 1.0)
    for idx, k in enumerate(ks):
        if arr is None:
            grey = np.zeros(shape[:2], dtype=np.float32)
        else:
            grey = np.clip((arr[:, :, k].astype(np.float32) - lo) / (hi - lo), 0, 1) * 255
        rgb = np.repeat(grey[..., None], 3, axis=2)
        for c, m in enumerate(masks.values()):
            colour = np.asarray(PALETTE[c % len(PALETTE)], dtype=np.float32)
            sl = m[:, :, k]
            rgb[sl] = (1 - OVERLAY_ALPHA) * rgb[sl] + OVERLAY_ALPHA * colour
            rgb[_outline(sl)] = colour
        # (X, Y) -> image rows = j flipped (j up), columns = i
        img = Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 0, 2)[::-1]).astype(np.uint8), "RGB")
        img = img.resize((tw, th), Image.Resampling.NEAREST)  # keep voxel edges crisp
        x0 = PAD_PX + (idx % cols) * (tw + PAD_PX)
        y0 = top + PAD_PX + (idx // cols) * (th + PAD_PX)
        canvas.paste(img, (x0, y0))
        ImageDraw.Draw(canvas).text((x0 + 3, y0 + 2), f"k={k}", fill=(255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = top + rows * th + (rows + 1) * PAD_PX
    for c, label in enumerate(masks):
        colour = PALETTE[c % len(PALETTE)]
        draw.rectangle([PAD_PX, y + 3, PAD_PX + 12, y + 15], fill=colour)
        draw.text((PAD_PX + 18, y + 3), str(label), fill=(255, 255, 255))
        y += LEGEND_ROW_PX
    return canvas
