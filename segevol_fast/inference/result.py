"""`SegmentationResult`: what `segment()` returns: the masks, how they were made, and what they measure.

One mask per prompt, in prompt order, keyed by the prompt's label ("liver", "box 0", ...), each on
the *input* voxel grid (X, Y, Z) of the volume with the input's affine, so a mask saved here lines
up with the scan in any viewer.

Label-map rule (`save("x.nii.gz")`, `label_map()`): ids 1..N follow prompt order and on overlap the
*later* prompt wins; `label_map_report()` says what that cost (`map_voxels`, `overlaps`).

Writing it (`save()`) is `result_files`' job: a result folder, or a label map with its sidecar JSON
and 4-D probability file, all or nothing, with provenance in every file. `preview()` draws the
montage with `segevol_fast.io.preview`.
"""

from __future__ import annotations

import io
import pathlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..errors import ResultError
from ..io.output import LOCK_TIMEOUT_S, WRITER
from ..io.paths import is_nifti_path
from ..io.preview import BANNER_TEXT, render_montage
from ..io.volume import spacing_from_affine
from ..totalseg_names import totalseg_legend
from ..version import __version__
from .result_files import PathLike, write_bytes_atomic, write_label_map, write_result_folder

OVERLAP_RULE = "later prompt wins: a voxel in several masks gets the id of the last of them in prompt order"


def _package_version() -> str:
    return __version__


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
            write_label_map(self, p, preview=preview, volume=volume, lock_timeout=lock_timeout)
        else:
            write_result_folder(self, p, preview=preview, volume=volume, lock_timeout=lock_timeout)
        return p

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
        naming it and why. Tiles show i to the right and j upwards, scaled so their longer side
        is TILE_PX with the in-plane spacing's aspect (the sizes are `segevol_fast.io.preview`'s).
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
        image = render_montage(
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


# ---------------------------------------------------------------------- label-map overlaps
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
