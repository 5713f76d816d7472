"""`SegmentationResult`: what `segment()` returns, and how it is written to disk.

One mask per prompt, in prompt order, keyed by the prompt's label ("liver", "box 0", ...), each on
the *input* voxel grid (X, Y, Z) of the volume with the input's affine, so a mask saved here lines
up with the scan in any viewer. Every file is written atomically (temporary name in the same
folder, then `os.replace`): a crash never leaves a half-written mask, summary or preview.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import re
import uuid
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np

from ..errors import ResultError
from ..io.nifti import is_nifti_path, save_nifti
from ..io.volume import spacing_from_affine

PathLike = Union[str, os.PathLike]

# preview layout (pixels); public so callers and tests can predict the PNG size
TILE_PX = 256  # longer side of one slice tile
PAD_PX = 4  # gap between tiles and around the montage
LEGEND_ROW_PX = 18  # height of one legend line
MAX_COLS = 3
OVERLAY_ALPHA = 0.45
# distinguishable on grey CT: red, green, blue, yellow, magenta, cyan, orange, purple, ...
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (240, 50, 230),
           (70, 240, 240), (245, 130, 48), (145, 30, 180), (210, 245, 60), (250, 190, 212)]


def write_bytes_atomic(path: PathLike, data: bytes) -> pathlib.Path:
    """Write `data` to `path` so that the file appears complete or not at all."""
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, p)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return p


def safe_label(label: str) -> str:
    """A file-name-safe form of a label: 'left kidney' -> 'left_kidney', '../x' -> 'x'."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(label)).strip("._")
    return s or "mask"


def _unique_names(labels: list[str]) -> dict[str, str]:
    """label -> safe file stem, made unique ('a b' and 'a_b' both map to 'a_b' otherwise)."""
    out, used = {}, set()
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


@dataclass
class SegmentationResult:
    """Masks (and optionally probabilities) of one `segment()` call.

    masks:         {label: bool ndarray (X, Y, Z)} on the input grid, in prompt order.
    affine:        (4, 4) float64 voxel -> RAS mm of the input volume.
    spacing:       (3,) mm along X, Y, Z; derived from the affine when None.
    modality:      "ct" / "mri" / None, as used for the text prompts.
    probabilities: None or {label: float32 ndarray (X, Y, Z) in [0, 1]}, same labels and grid.
    timings:       seconds per stage, e.g. {"preprocess": .., "zoom_out": .., "zoom_in": .., "total": ..}.
    peak_memory_bytes: peak memory of the call (device memory on CUDA, RSS on CPU), or None.
    mode:          "fast" or "exact".
    precision:     "fp32", "bf16" or "fp16": the autocast precision the model ran under.
    plan:          fast mode: the memory plan it ran with (`Plan.summary()`: window batch,
                   accumulator dtype, cache size, estimated peak and its breakdown); else None.
    zoom_in_windows: fast mode: {label: zoom-in windows the prompt used} (0 = coarse result kept).
    notes:         human-readable caveats, e.g. "random weights: masks are meaningless".
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
        self.masks = {str(k): (v if v.dtype == np.bool_ else v > 0)
                      for k, v in ((k, np.asarray(v)) for k, v in self.masks.items())}
        if self.probabilities is not None:
            if list(self.probabilities) != list(self.masks):
                raise ResultError(f"probabilities labels {list(self.probabilities)} differ from "
                                  f"masks {list(self.masks)}")
            probs = {str(k): np.asarray(v, dtype=np.float32) for k, v in self.probabilities.items()}
            if any(p.shape != self.shape for p in probs.values()):
                raise ResultError(f"probabilities must have the masks' shape {self.shape}")
            self.probabilities = probs

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
        """JSON-ready description: labels, volumes, timings, memory, mode, notes, geometry."""
        return {
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
    def save(self, path_or_dir: PathLike) -> pathlib.Path:
        """Write the result; returns the directory or label-map path written.

        * A path ending in .nii / .nii.gz: one label map (`label_map()`, input affine) plus a
          sidecar `<name>.json` whose "labels" maps id (str) -> label, with the summary fields.
          Probabilities are not stored in this form.
        * Anything else is a directory: `<safe_label>.nii.gz` per mask (uint8 0/1), with
          probabilities `<safe_label>_prob.nii.gz` (float32) when present, and `summary.json`
          (its "files" maps label -> file name). summary.json is written last, so its presence
          means every mask file is complete.
        """
        p = pathlib.Path(path_or_dir)
        if is_nifti_path(p):
            save_nifti(p, self.label_map(), self.affine)
            name = p.name[: -len(".nii.gz")] if p.name.lower().endswith(".nii.gz") else p.stem
            side = self.summary()
            side["labels"] = {str(i): label for i, label in enumerate(self.masks, start=1)}
            write_bytes_atomic(p.with_name(name + ".json"), _json_bytes(side))
            return p
        if p.exists() and not p.is_dir():
            raise ResultError(f"{p} is a file; give a directory, or a .nii / .nii.gz path for one label map")
        p.mkdir(parents=True, exist_ok=True)
        stems = _unique_names(self.labels)
        files = {}
        for label, mask in self.masks.items():
            files[label] = save_nifti(p / f"{stems[label]}.nii.gz", mask, self.affine, dtype=np.uint8).name
            if self.probabilities is not None:
                save_nifti(p / f"{stems[label]}_prob.nii.gz", self.probabilities[label], self.affine)
        summary = self.summary()
        summary["files"] = files
        write_bytes_atomic(p / "summary.json", _json_bytes(summary))
        return p

    def preview(self, png_path: PathLike, volume=None, n_slices: int = 6) -> pathlib.Path:
        """Write a PNG montage of up to `n_slices` axial slices (the array's 3rd axis) through the
        masks' extent, masks as coloured semi-transparent overlays, with a legend.

        volume: a `Volume` or an (X, Y, Z) array on the masks' grid for the background (windowed
        to its 0.5 / 99.5 percentiles), or None for a black background. Tiles show i to the right
        and j upwards, scaled so their longer side is TILE_PX with the in-plane spacing's aspect.
        Size: cols = min(n, MAX_COLS), rows = ceil(n / cols) for n distinct slices; width =
        cols*tile_w + (cols+1)*PAD_PX; height = rows*tile_h + (rows+1)*PAD_PX +
        len(labels)*LEGEND_ROW_PX + PAD_PX.
        """
        arr = None if volume is None else np.asarray(getattr(volume, "array", volume))
        if arr is not None and arr.shape != self.shape:
            raise ResultError(f"preview volume has shape {arr.shape}, masks have {self.shape}")
        if not self.masks:
            raise ResultError("nothing to preview: the result has no masks")
        image = _render_montage(arr, self.masks, self.spacing, n_slices)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return write_bytes_atomic(png_path, buf.getvalue())

    def __repr__(self) -> str:
        lines = [f"SegmentationResult(mode={self.mode!r}, modality={self.modality!r}, shape={self.shape}, "
                 f"{len(self.masks)} mask{'s' if len(self.masks) != 1 else ''})"]
        for label, ml in self.volumes_ml().items():
            lines.append(f"  {label:<24} {ml:10.1f} mL")
        if self.timings:
            lines.append("  timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items()))
        if self.peak_memory_bytes is not None:
            lines.append(f"  peak memory: {self.peak_memory_bytes / 2**20:.0f} MiB")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


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


def _render_montage(arr, masks: dict[str, np.ndarray], spacing, n_slices: int):
    """PIL RGB image: the slice tiles in a grid, then one legend line per mask."""
    try:
        from PIL import Image, ImageDraw
    except ImportError as exc:
        from ..io.volume import MissingDependencyError

        raise MissingDependencyError("preview images need Pillow: pip install pillow") from exc
    shape = next(iter(masks.values())).shape
    ks = _pick_slices(masks, shape[2], n_slices)
    tw, th = _tile_size(shape[:2], spacing)
    cols = min(len(ks), MAX_COLS)
    rows = -(-len(ks) // cols)
    width = cols * tw + (cols + 1) * PAD_PX
    height = rows * th + (rows + 1) * PAD_PX + len(masks) * LEGEND_ROW_PX + PAD_PX
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    lo, hi = _window(arr) if arr is not None else (0.0, 1.0)
    for idx, k in enumerate(ks):
        if arr is None:
            grey = np.zeros(shape[:2], dtype=np.float32)
        else:
            grey = (np.clip((arr[:, :, k].astype(np.float32) - lo) / (hi - lo), 0, 1) * 255)
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
        y0 = PAD_PX + (idx // cols) * (th + PAD_PX)
        canvas.paste(img, (x0, y0))
        ImageDraw.Draw(canvas).text((x0 + 3, y0 + 2), f"k={k}", fill=(255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = rows * th + (rows + 1) * PAD_PX
    for c, label in enumerate(masks):
        colour = PALETTE[c % len(PALETTE)]
        draw.rectangle([PAD_PX, y + 3, PAD_PX + 12, y + 15], fill=colour)
        draw.text((PAD_PX + 18, y + 3), str(label), fill=(255, 255, 255))
        y += LEGEND_ROW_PX
    return canvas
