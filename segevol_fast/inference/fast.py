"""`mode="fast"`: zoom-out-zoom-in with shared encodings, batched windows and compact stitching.

Same kind of result as the official pipeline (docs/official-pipeline.md §5.3–5.4), computed differently:

* Zoom-out: ONE `encode_image` of the resized crop for all prompts, and one batched decode per
  prompt signature (which of text / box / points it carries). Boxes and points go to the zoom-out
  frame exactly as in `exact.py`, so the coarse result equals exact mode's.
* ROI per prompt: box of sigmoid(coarse) > 0.5 in the crop frame, grown toward the window size by
  floor(pad / 2) a side and clamped (official `logits2roi_coor`); empty -> coarse result kept.
* Zoom-in windows lie on ONE global grid over the whole crop (MONAI arithmetic: stride
  window // 2, last window clamped to the far edge, symmetric zero padding on axes shorter than
  the window), so prompts with overlapping ROIs share window encodings. A prompt uses every grid
  window that meets its ROI. Windows are encoded in batches of `plan.window_batch`, each at most
  once per prompt group, and kept in an LRU cache of `plan.cache_windows` embeddings across
  groups (groups alternate direction so the windows just cached are met first).
* Per window, every prompt of the group that needs it is decoded in one call against the batch-1
  embedding (the decoder broadcasts). Window prompts, simplified from the official rules:
  text -> the text; box -> the box of the coarse mask in the window (the user's box, clipped, when
  the prompt needs one window only); points -> the user's points inside the window (no random
  sampling) plus the coarse box. Empty boxes / no points give the official all -1 box / -1 point.
* Logits are averaged over the windows covering a voxel, stitched one D-row of the ROI at a time:
  a row's sum (plan dtype) exists only while some window of the prompt still has to add to it.
  Each row counts the prompt's windows that cover it; when the last has been added the row is
  finished (mask = sum > 0, the mean's sign; logits = sum / coverage, the coverage being a product
  of per-axis window counts) and written into the crop-frame outputs, which start as the coarse
  result. Windows are walked in grid order (D slowest, either direction), so at most one window
  depth of rows is alive: 32 × H' × W' sums however deep the scan, not the whole ROI.
* The crop is read through `prep.crop`: with `preprocess(..., lazy=True)` each window and the
  zoom-out image are normalised from the scan's own voxels as they are read, and no float32 copy
  of the crop is ever made.
* Device out-of-memory (`oom.py`): a failed encoder or decoder call is repeated with half the
  window / decode batch; at batch 1, or when the stitching itself runs out, the call restarts
  with stitching on the host; then `DeviceOutOfMemoryError`. Every change is reported
  (`run_fast(oom_retries=...)`, `res.plan["oom_retries"]`).

mask = logits > 0 (sigmoid > 0.5). Masks and logits come back in the crop frame on the CPU.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..adapters.context import prompt_context
from ..crop import CropReader
from ..errors import PromptError, ShapeError
from ..geometry.prompt_frames import box_to_zoom_out, points_to_zoom_out
from ..geometry.sliding_window import global_grid
from ..model.network import model_device
from ..model.seams import adapter_state
from ..preprocess import Preprocessed, index_map, zoom_out_crop
from .budget import Plan, band_voxels, plan_fast, same_device
from .finite import check_finite_logits, finite_rows
from .oom import HostStitchNeeded, OutOfMemoryError, Retries
from .progress import stage, steps
from .prompts import Prompt

Triple = tuple[int, int, int]
Window = tuple[int, int, int]  # index of a window in the global grid (i_d, i_h, i_w)


@dataclass
class FastOutput:
    """One prompt's result in the crop frame.

    mask:    bool (D', H', W'), CPU.
    logits:  None, or (D', H', W') float32 (float16 with float16 accumulators), CPU; only when
             run_fast(return_logits=True).
    roi:     ((d0, h0, w0), (d1, h1, w1)) inclusive zoom-in region, or None (zoom-in off, or the
             coarse mask was empty: the official "Fail to detect foreground!" case).
    windows: number of global-grid windows the prompt's zoom-in used.
    """

    mask: Tensor
    logits: Optional[Tensor] = None
    roi: Optional[tuple[Triple, Triple]] = None
    windows: int = 0


# ------------------------------------------------------------------------------ windows on the global grid
def windows_for_roi(grid: Sequence[Sequence[int]], window: Sequence[int], lo: Triple, hi: Triple) -> list[Window]:
    """Grid windows meeting the inclusive box [lo, hi], in raster order (D slowest)."""
    per_axis = [
        [i for i, s in enumerate(starts) if s <= b and s + r - 1 >= a] for starts, r, a, b in zip(grid, window, lo, hi)
    ]
    return [(i, j, k) for i in per_axis[0] for j in per_axis[1] for k in per_axis[2]]


def _coverage(starts: Sequence[int], r: int, a: int, b: int) -> Tensor:
    """(b - a + 1,) float32: how many windows of one axis cover each voxel a..b."""
    x = np.arange(a, b + 1)
    return torch.from_numpy(sum(((x >= s) & (x < s + r)).astype(np.float32) for s in starts))


def _grow(lo: int, hi: int, size: int, win: int) -> tuple[int, int]:
    """Official ROI growth of one axis: floor(pad / 2) a side toward the window, clamped."""
    grow = max(0, win - (hi - lo + 1)) // 2
    return max(0, lo - grow), min(size - 1, hi + grow)


# ------------------------------------------------------------------------------ coarse -> crop frame
class _CropMap:
    """Legacy 'nearest' maps from the zoom-out size to the crop (the official logits resize).

    maps[a]: (crop[a],) int64, the zoom-out index each crop voxel reads along axis a.
    """

    def __init__(self, size: Sequence[int], crop_shape: Sequence[int], device: torch.device):
        self.maps = [index_map(int(s), int(c), "nearest").to(device) for s, c in zip(size, crop_shape)]
        self.used = [torch.unique(m) for m in self.maps]  # zoom-out indices that reach the crop

    def gather(self, x: Tensor, lo: Sequence[int] = (0, 0, 0), hi: Optional[Sequence[int]] = None) -> Tensor:
        """x (Z, Y, X) at zoom-out size -> its crop-frame resize, rows lo..hi inclusive (default all)."""
        hi = hi if hi is not None else [len(m) - 1 for m in self.maps]
        idx = [m[a : b + 1] for m, a, b in zip(self.maps, lo, hi)]
        return x.index_select(0, idx[0]).index_select(1, idx[1]).index_select(2, idx[2])

    def roi(self, fg: Tensor, window: Sequence[int]) -> Optional[tuple[Triple, Triple]]:
        """Zoom-out foreground (Z, Y, X) bool -> the grown crop-frame ROI, or None when empty.

        Projects only the zoom-out rows that reach the crop (a shrinking resize skips some), then
        maps each projection to the crop: the same box as taking it from the resized mask.
        """
        sub = fg.index_select(0, self.used[0]).index_select(1, self.used[1]).index_select(2, self.used[2])
        if not bool(sub.any()):
            return None
        lo, hi = [], []
        for axis in range(3):
            proj = torch.zeros(fg.shape[axis], dtype=torch.bool, device=fg.device)
            proj[self.used[axis]] = sub.any(dim=tuple(a for a in range(3) if a != axis))
            idx = torch.nonzero(proj[self.maps[axis]]).flatten()
            a, b = _grow(int(idx[0]), int(idx[-1]), len(self.maps[axis]), int(window[axis]))
            lo.append(a)
            hi.append(b)
        return tuple(lo), tuple(hi)


# ------------------------------------------------------------------------------ decoding
@dataclass
class _Item:
    """One decoder input: prompt index k, and its box (6,) / points ((P, 3), (P,)) in the window
    (or zoom-out) frame; the text comes from the prompt."""

    k: int
    box: Optional[Tensor]
    points: Optional[tuple[Tensor, Tensor]]

    def signature(self, has_text: bool) -> tuple:
        return has_text, self.box is not None, None if self.points is None else len(self.points[0])


def _decode(model, emb: Tensor, items: Sequence[_Item], texts: dict[int, Tensor], chunk, tasks: Sequence):
    """Decode items against emb (1, hidden, *grid), batching items with the same signature in
    chunks of `chunk` (an int, or a `Retries`: its plan's decode batch, halved on out-of-memory,
    the same items then decoded again). tasks[k]: prompt k's structure name (or None), declared to
    adapters per decode batch (`adapters.prompt_context`). Yields (item, logits (1, *spatial)
    float32 on the model's device)."""
    retry = chunk if isinstance(chunk, Retries) else None
    dev = emb.device
    groups: dict[tuple, list[_Item]] = {}
    for it in items:
        groups.setdefault(it.signature(it.k in texts), []).append(it)
    for (has_text, has_box, n_points), group in groups.items():
        s = 0
        while s < len(group):
            part = group[s : s + (retry.plan.decode_batch if retry is not None else chunk)]
            text = torch.cat([texts[it.k] for it in part]) if has_text else None
            boxes = torch.stack([it.box for it in part]).to(dev) if has_box else None
            points = None
            if n_points is not None:
                points = (
                    torch.stack([it.points[0] for it in part]).to(dev),
                    torch.stack([it.points[1] for it in part]).to(dev),
                )

            def call(part=part, text=text, boxes=boxes, points=points):
                with prompt_context(tasks=[tasks[it.k] for it in part]):
                    return model.decode(emb, text_embedding=text, boxes=boxes, points=points)

            logits = call() if retry is None else retry.attempt("decoder", call)
            if logits is None:
                continue  # the decode batch was halved: the same items again
            s += len(part)
            yield from zip(part, logits[:, 0])


# ------------------------------------------------------------------------------ window prompts
_EMPTY_BOX = torch.full((6,), -1.0)
_NO_POINT = (torch.full((1, 3), -1.0), torch.full((1,), -1, dtype=torch.int64))


def _coarse_box(cmap: _CropMap, fg: Tensor, origin: Triple, window: Sequence[int]) -> Tensor:
    """Box (6,) float32, window coordinates, of the coarse foreground fg (*size, zoom-out frame)
    resized to the crop, inside the window: only the window's part is resized."""
    lo = [max(0, o) for o in origin]
    hi = [min(len(m), o + r) for m, o, r in zip(cmap.maps, origin, window)]
    sub = cmap.gather(fg, lo, [h - 1 for h in hi])
    if not bool(sub.any()):
        return _EMPTY_BOX
    a, b = [], []
    for axis in range(3):
        idx = torch.nonzero(sub.any(dim=tuple(x for x in range(3) if x != axis))).flatten()
        a.append(int(idx[0]) + lo[axis] - origin[axis])
        b.append(int(idx[-1]) + lo[axis] - origin[axis])
    return torch.tensor(a + b, dtype=torch.float32)


def _user_box(box: np.ndarray, origin: Triple, window: Sequence[int]) -> Tensor:
    """The user's crop-frame box clipped to the window, in window coordinates (all -1 if outside)."""
    o, r = np.asarray(origin, np.float64), np.asarray(window, np.float64)
    lo, hi = np.maximum(box[:3] - o, 0), np.minimum(box[3:] - o, r - 1)
    if (lo > hi).any():
        return _EMPTY_BOX
    return torch.tensor(np.concatenate([lo, hi]), dtype=torch.float32)


def _window_points(prompt: Prompt, origin: Triple, window: Sequence[int]) -> tuple[Tensor, Tensor]:
    """The user's points inside the window, window coordinates; the -1 point when none are."""
    local = np.asarray(prompt.points, np.float64) - np.asarray(origin, np.float64)
    inside = ((local >= 0) & (local <= np.asarray(window) - 1)).all(axis=1)
    if not inside.any():
        return _NO_POINT
    labels = np.ones(len(local), np.int64) if prompt.point_labels is None else np.asarray(prompt.point_labels)
    return (torch.tensor(local[inside], dtype=torch.float32), torch.tensor(labels[inside], dtype=torch.int64))


def _window_item(
    k: int, prompt: Prompt, cmap: _CropMap, fg: Tensor, origin: Triple, window: Sequence[int], single: bool
) -> _Item:
    """Decoder input of prompt k in one window; fg: its coarse foreground (*size) for the box."""
    box = points = None
    if prompt.box is not None and single:
        box = _user_box(np.asarray(prompt.box, np.float64), origin, window)
    elif prompt.box is not None or prompt.points is not None:
        box = _coarse_box(cmap, fg, origin, window)
    if prompt.points is not None:
        points = _window_points(prompt, origin, window)
    return _Item(k, box, points)


# ------------------------------------------------------------------------------ window cache
class WindowCache:
    """At most `capacity` window embeddings, least recently used evicted first (`hits` / `misses`
    count lookups). Keys are
    (window, adapter state of the image encoder): an embedding computed under one adapter or
    route is never returned under another (`model.seams`)."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.data: OrderedDict[tuple, Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: tuple) -> Optional[Tensor]:
        if key in self.data:
            self.data.move_to_end(key)
            self.hits += 1
            return self.data[key]
        self.misses += 1
        return None

    def __len__(self) -> int:
        return len(self.data)

    def put(self, key: tuple, value: Tensor) -> None:
        if self.capacity <= 0:
            return
        self.data[key] = value
        self.data.move_to_end(key)
        while len(self.data) > self.capacity:
            self.data.popitem(last=False)


def _extract(crop: CropReader, origins: Sequence[Triple], window: Sequence[int]) -> Tensor:
    """Windows (B, 1, *window) float32 read from the crop, zero outside it (MONAI's padding)."""
    out = torch.zeros((len(origins), 1, *window), dtype=torch.float32, device=crop.device)
    for b, o in enumerate(origins):
        lo = [max(0, x) for x in o]
        hi = [min(n, x + r) for n, x, r in zip(crop.shape, o, window)]
        dst = tuple(slice(a - x, c - x) for a, c, x in zip(lo, hi, o))
        out[(b, 0) + dst] = crop.block(lo, hi)
    return out


class _Stitch:
    """One prompt's zoom-in, stitched D-row by D-row into its crop-frame outputs (module docstring).

    mask, logits: the prompt's outputs (crop frame, CPU) holding the coarse result; the ROI's
    rows are overwritten as they finish. origins: the prompt's windows (crop-frame starts).
    """

    def __init__(
        self,
        roi: tuple[Triple, Triple],
        origins: Sequence[Triple],
        size: Sequence[int],
        grid,
        mask: Tensor,
        logits: Optional[Tensor],
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.lo, self.hi = roi
        self.size, self.mask, self.logits, self.dtype, self.device = tuple(size), mask, logits, dtype, device
        self.row_shape = (self.hi[1] - self.lo[1] + 1, self.hi[2] - self.lo[2] + 1)
        self.pending = [0] * (self.hi[0] - self.lo[0] + 1)  # windows still to add, per ROI row
        for o in origins:
            for d in range(max(self.lo[0], o[0]), min(self.hi[0] + 1, o[0] + self.size[0])):
                self.pending[d - self.lo[0]] += 1
        self.rows: dict[int, Tensor] = {}  # crop row -> running sum (row_shape), plan dtype
        if logits is not None:
            cover = [_coverage(s, r, a, b).to(device) for s, r, a, b in zip(grid, self.size, self.lo, self.hi)]
            self.cover_d, self.cover_hw = cover[0].tolist(), cover[1][:, None] * cover[2][None, :]

    def add(self, logits: Tensor, origin: Triple) -> None:
        """Add one window's logits (*window) where the window meets the ROI; finish full rows."""
        a = [max(lo, o) for lo, o in zip(self.lo, origin)]
        b = [min(h + 1, o + r) for h, o, r in zip(self.hi, origin, self.size)]
        src_hw = tuple(slice(x - o, y - o) for x, y, o in zip(a[1:], b[1:], origin[1:]))
        dst_hw = tuple(slice(x - lo, y - lo) for x, y, lo in zip(a[1:], b[1:], self.lo[1:]))
        for d in range(a[0], b[0]):
            row = self.rows.get(d)
            if row is None:
                row = self.rows[d] = torch.zeros(self.row_shape, dtype=self.dtype, device=self.device)
            row[dst_hw] += logits[(d - origin[0],) + src_hw].to(self.device)
            self.pending[d - self.lo[0]] -= 1
            if self.pending[d - self.lo[0]] == 0:
                self._finish_row(d)

    def _finish_row(self, d: int) -> None:
        row = self.rows.pop(d)
        where = (d, slice(self.lo[1], self.hi[1] + 1), slice(self.lo[2], self.hi[2] + 1))
        self.mask[where] = (row > 0).cpu()  # the mean has the sum's sign: every ROI voxel has a window
        if self.logits is not None:
            self.logits[where] = (row.float() / (self.cover_d[d - self.lo[0]] * self.cover_hw)).cpu()

    def result(self, n_windows: int) -> FastOutput:
        if self.rows or any(self.pending):
            raise RuntimeError("zoom-in stitching ended with unfinished rows (a window was not decoded)")
        return FastOutput(mask=self.mask, logits=self.logits, roi=(self.lo, self.hi), windows=n_windows)


# ------------------------------------------------------------------------------ the pipeline
def _check(prep: Preprocessed, prompts: Sequence[Prompt], plan: Plan, device: torch.device) -> None:
    for p in prompts:
        if not p.kinds:
            raise PromptError(f"prompt {p.label!r} has no text, box or points")
    if not same_device(plan.device, device):
        raise ShapeError(f"the plan was made for {plan.device} but the model is on {device}; re-plan with plan_fast")


@torch.inference_mode()
def run_fast(
    model,
    prep: Preprocessed,
    prompts: Sequence[Prompt],
    modality: str = "ct",
    zoom_in: bool = True,
    plan: Optional[Plan] = None,
    progress: bool = False,
    return_logits: bool = False,
    oom_retries: Optional[list] = None,
    zoom_out_embedding: Optional[Tensor] = None,
    window_cache: Optional["WindowCache"] = None,
) -> list[FastOutput]:
    """Fast zoom-out-zoom-in for all prompts at once (see the module docstring).

    Args:
        model: a `SegVol` on its device (precision as set: "bf16" runs under autocast).
        prep: `preprocess(...)` output (lazy or stored crop; lazy keeps no float32 copy of it).
        prompts: crop-frame `Prompt`s, one mask each.
        modality: text template ("ct" official, "mri").
        zoom_in: run the zoom-in pass (official default); False returns the coarse result.
        plan: from `plan_fast`; default: planned here without a limit.
        progress: a `Progress` to report the zoom-out and zoom-in stages into, or True for a bar
            over zoom-in windows.
        return_logits: also return crop-frame logits (else FastOutput.logits stays None).
        oom_retries: a list to append what out-of-memory recovery changed to (`oom.py`: halved
            window / decode batches, stitching moved to the host), one dict per change.
        zoom_out_embedding: (1, hidden, *grid) of this crop's zoom-out image when the caller
            already encoded it (`segment_batch` encodes many scans' in one routed pass).
        window_cache: a `WindowCache` that outlives the call (an interactive session's); default a
            new one of plan.cache_windows entries.

    Returns:
        one `FastOutput` per prompt, in order.

    Raises:
        DeviceOutOfMemoryError: the device ran out of memory even at batch 1 with host stitching.
        NonFiniteOutputError: some prompts' zoom-out or zoom-in logits hold NaN / inf (`finite.py`).
    """
    device = model_device(model)
    crop_shape = prep.crop.shape
    if plan is None:
        plan = plan_fast(model, crop_shape, len(prompts), None, device, return_logits=return_logits)
    _check(prep, prompts, plan, device)
    if not prompts:
        return []
    retry = Retries(plan, oom_retries)
    while True:
        error = None
        try:
            return _run_once(
                model,
                prep,
                prompts,
                modality,
                zoom_in,
                retry,
                progress,
                return_logits,
                zoom_out_embedding,
                window_cache,
            )
        except OutOfMemoryError as err:  # outside the encoder and decoder calls: the stitch buffers
            error = f"{type(err).__name__}: {err}"  # text only: the traceback pins the failed tensors
        except HostStitchNeeded as err:  # a batch was already 1
            error = str(err)
        retry.to_host(error)  # raises DeviceOutOfMemoryError when nothing is left to try


def _run_once(
    model,
    prep,
    prompts,
    modality,
    zoom_in,
    retry: Retries,
    progress,
    return_logits,
    zoom_out_embedding=None,
    window_cache=None,
) -> list[FastOutput]:
    """One attempt of run_fast with retry.plan (which the encoder and decoder may shrink as they go)."""
    plan, crop_shape = retry.plan, prep.crop.shape
    size = tuple(model.config.spatial_size)
    cmap = _CropMap(size, crop_shape, plan.stitch_device)

    stage(progress, "zoom-out")
    texts = _text_embeddings(model, prompts, modality)
    logits = _zoom_out(model, prep.crop, prompts, texts, size, retry, zoom_out_embedding)  # (N, *size) fp32
    check_finite_logits(model, finite_rows(logits), [p.label for p in prompts], "zoom-out")
    # sigmoid > 0.5 picks the ROI and the window boxes (official); the mask is logits > 0
    coarse = _Coarse(torch.sigmoid(logits) > 0.5, logits > 0, logits if return_logits else None)
    del logits
    rois = [cmap.roi(coarse.fg[k], size) if zoom_in else None for k in range(len(prompts))]

    outputs: list[Optional[FastOutput]] = [None] * len(prompts)
    for k, roi in enumerate(rois):  # prompts without zoom-in: the coarse result, resized
        if roi is None:
            outputs[k] = FastOutput(*coarse.output(k, cmap, plan.accumulator_dtype))
    zoomed = [k for k, roi in enumerate(rois) if roi is not None]
    if zoomed:
        _ZoomIn(model, prep.crop, prompts, texts, cmap, coarse, rois, retry, progress, window_cache).run(
            zoomed, outputs
        )
    return outputs  # type: ignore[return-value]


@dataclass
class _Coarse:
    """Zoom-out results at zoom-out size, on the stitch device: fg = sigmoid > 0.5 and
    pos = logits > 0, (N, *size) bool; logits (N, *size) float32 only for return_logits."""

    fg: Tensor
    pos: Tensor
    logits: Optional[Tensor]

    def output(self, k: int, cmap: _CropMap, dtype: torch.dtype) -> tuple[Tensor, Optional[Tensor]]:
        """Prompt k's coarse mask (bool) and logits (dtype, or None) resized to the crop, on the CPU."""
        logits = None if self.logits is None else cmap.gather(self.logits[k]).to("cpu", dtype)
        return cmap.gather(self.pos[k]).cpu(), logits


def _text_embeddings(model, prompts: Sequence[Prompt], modality: str) -> dict[int, Tensor]:
    """Prompt index -> (1, hidden) text embedding; each distinct text is encoded once."""
    names = sorted({p.text for p in prompts if p.text is not None})
    if not names:
        return {}
    emb = model.encode_text(names, modality)
    row = {n: i for i, n in enumerate(names)}
    return {k: emb[row[p.text]][None] for k, p in enumerate(prompts) if p.text is not None}


def _zoom_out(model, crop: CropReader, prompts, texts, size, retry: Retries, emb: Optional[Tensor] = None) -> Tensor:
    """One encode of the resized crop (unless given), batched decodes -> coarse logits (N, *size)
    float32 on the stitch device."""
    plan = retry.plan
    dev, crop_shape = plan.device, crop.shape
    if emb is None:
        emb = model.encode_image(zoom_out_crop(crop, size).to(dev))
    items = []
    for k, p in enumerate(prompts):
        box = box_to_zoom_out(p.box, crop_shape, size) if p.box is not None else None
        points = None
        if p.points is not None:
            coords = points_to_zoom_out(p.points, crop_shape, size).float()
            labels = (
                torch.ones(len(coords), dtype=torch.int64)
                if p.point_labels is None
                else torch.as_tensor(np.asarray(p.point_labels), dtype=torch.int64)
            )
            points = (coords, labels)
        items.append(_Item(k, box, points))
    coarse = torch.empty((len(prompts), *size), dtype=torch.float32, device=plan.stitch_device)
    for it, logits in _decode(model, emb, items, texts, retry, [p.text for p in prompts]):
        coarse[it.k] = logits
    return coarse


class _ZoomIn:
    """The zoom-in pass over prompt groups; see the module docstring."""

    def __init__(
        self, model, crop: CropReader, prompts, texts, cmap, coarse, rois, retry: Retries, progress, window_cache=None
    ):
        self.model, self.crop, self.prompts, self.texts = model, crop, prompts, texts
        self.tasks = [p.text for p in prompts]
        self.cmap, self.coarse, self.rois, self.retry = cmap, coarse, rois, retry
        plan = retry.plan
        self.size, self.progress = tuple(model.config.spatial_size), progress
        self.grid = global_grid(crop.shape, self.size)
        self.cache = window_cache if window_cache is not None else WindowCache(plan.cache_windows)

    @property
    def plan(self) -> Plan:
        return self.retry.plan  # batches may shrink during the run (out-of-memory recovery)

    def _groups(self, ks: Sequence[int]) -> list[list[int]]:
        """Prompts in ROI order, grouped while their row sums fit prompt_group crop-wide bands."""
        budget = self.plan.prompt_group * band_voxels(self.crop.shape, self.size)
        groups, cur, used = [], [], 0
        for k in sorted(ks, key=lambda k: self.rois[k]):
            vox = band_voxels([b - a + 1 for a, b in zip(*self.rois[k])], self.size)
            if cur and used + vox > budget:
                groups.append(cur)
                cur, used = [], 0
            cur.append(k)
            used += vox
        return groups + [cur]

    def run(self, ks: Sequence[int], outputs: list) -> None:
        need = {k: windows_for_roi(self.grid, self.size, *self.rois[k]) for k in ks}
        groups = self._groups(ks)
        total = sum(len({w for k in g for w in need[k]}) for g in groups)
        bar = steps(self.progress, "zoom-in windows", total, unit="win", key="zoom-in")
        for gi, group in enumerate(groups):
            users: dict[Window, list[int]] = {}
            for k in group:
                for w in need[k]:
                    users.setdefault(w, []).append(k)
            order = sorted(users, reverse=bool(gi % 2))  # alternate: start where the cache is warm
            self._group(group, order, users, need, outputs, bar)
        if bar is not None:
            bar.close()

    def _origin(self, w: Window) -> Triple:
        return tuple(self.grid[a][w[a]] for a in range(3))

    def _group(self, group, order, users, need, outputs, bar) -> None:
        dtype = self.plan.accumulator_dtype
        stitches = {
            k: _Stitch(
                self.rois[k],
                [self._origin(w) for w in need[k]],
                self.size,
                self.grid,
                *self.coarse.output(k, self.cmap, dtype),
                dtype,
                self.plan.stitch_device,
            )
            for k in group
        }
        finite = {k: True for k in group}  # becomes a device flag per prompt, read once below
        for batch, embs in self._embeddings(order):
            for w in batch:
                origin = self._origin(w)
                items = [
                    _window_item(k, self.prompts[k], self.cmap, self.coarse.fg[k], origin, self.size, len(need[k]) == 1)
                    for k in users[w]
                ]
                for it, logits in _decode(self.model, embs[w], items, self.texts, self.retry, self.tasks):
                    stitches[it.k].add(logits, origin)
                    finite[it.k] = finite_rows(logits[None])[0] & finite[it.k]
                if bar is not None:
                    bar.update(1)
        check_finite_logits(self.model, [finite[k] for k in group], [self.prompts[k].label for k in group], "zoom-in")
        for k in group:
            outputs[k] = stitches.pop(k).result(len(need[k]))

    def _embeddings(self, order: Sequence[Window]) -> Iterable[tuple[list[Window], dict[Window, Tensor]]]:
        """Walk the windows in order, yielding (windows, embeddings) with at most window_batch
        encodes per step; cached embeddings are taken before new ones can evict them."""
        i = 0
        while i < len(order):
            state = adapter_state(self.model.image_encoder)
            batch, embs, todo = [], {}, []
            while i < len(order) and len(todo) < self.plan.window_batch:
                w = order[i]
                i += 1
                batch.append(w)
                hit = self.cache.get((w, state))
                if hit is None:
                    todo.append(w)
                else:
                    embs[w] = hit
            for w, e in zip(todo, self._encode(todo)):
                embs[w] = e
                self.cache.put((w, state), e)
            yield batch, embs

    def _encode(self, todo: Sequence[Window]) -> list[Tensor]:
        """Embeddings (1, hidden, *grid) of the windows todo, at most window_batch per encoder
        call; on out-of-memory the batch is halved and the same windows are encoded again."""
        out: list[Tensor] = []
        while len(out) < len(todo):
            part = todo[len(out) : len(out) + self.plan.window_batch]
            e = self.retry.attempt(
                "encoder",
                lambda: self.model.encode_image(
                    _extract(self.crop, [self._origin(w) for w in part], self.size).to(self.plan.device)
                ),
            )
            if e is not None:
                # clone: a cached slice must not pin the whole batch (clone keeps the strides)
                out.extend(e[j : j + 1].clone() for j in range(len(part)))
        return out
