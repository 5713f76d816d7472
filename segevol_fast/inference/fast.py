"""`mode="fast"`: zoom-out-zoom-in with shared encodings, batched windows and compact stitching.

Same kind of result as the official pipeline (docs/official-pipeline.md §5.3–5.4), computed differently:

* Zoom-out: ONE `encode_image` of the resized crop for all prompts, and one batched decode per
  prompt signature (which of text / box / points it carries; `decode.py`). Boxes and points go to
  the zoom-out frame exactly as in `exact.py`, so the coarse result equals exact mode's.
* ROI per prompt: box of sigmoid(coarse) > 0.5 in the crop frame, grown toward the window size by
  floor(pad / 2) a side and clamped (official `logits2roi_coor`; `geometry/crop_map.py`); empty ->
  coarse result kept.
* Zoom-in windows lie on ONE global grid over the whole crop (MONAI arithmetic: stride
  window // 2, last window clamped to the far edge, symmetric zero padding on axes shorter than
  the window), so prompts with overlapping ROIs share window encodings. A prompt uses every grid
  window that meets its ROI (`geometry/grid_windows.py`). Windows are encoded in batches of
  `plan.window_batch`, each at most once per prompt group, and kept in an LRU cache of
  `plan.cache_windows` embeddings across groups (`window_cache.py`; groups alternate direction so
  the windows just cached are met first).
* Per window, every prompt of the group that needs it is decoded in one call against the batch-1
  embedding (the decoder broadcasts), with window prompts simplified from the official rules
  (`window_prompts.py`).
* Logits are averaged over the windows covering a voxel, stitched one D-row of the ROI at a time
  into the crop-frame outputs, which start as the coarse result (`stitch.py`): at most one window
  depth of row sums is alive, however deep the scan.
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

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..crop import CropReader
from ..errors import PromptError, ShapeError
from ..geometry.crop_map import CropMap
from ..geometry.grid_windows import Window, window_origin, windows_for_roi
from ..geometry.prompt_frames import box_to_zoom_out, points_to_zoom_out
from ..geometry.sliding_window import Triple, global_grid
from ..model.network import model_device
from ..model.seams import adapter_state
from ..preprocess import Preprocessed, zoom_out_crop
from .approximations import ZoomInCounts
from .budget import Plan, plan_fast
from .cost_model import band_voxels, same_device
from .decode import DecodeItem, decode_items
from .finite import check_finite_logits, finite_rows
from .oom import HostStitchNeeded, OutOfMemoryError, Retries
from .progress import stage, steps
from .prompts import Prompt
from .stitch import Stitch
from .window_cache import WindowCache
from .window_decode import WindowJob, decode_windows
from .window_prompts import window_item
from .window_tokens import encode_window_tokens, encoded_tokens, read_boxes


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
    counts: Optional[ZoomInCounts] = None,
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
        counts: a `ZoomInCounts` to add what the zoom-in planned, skipped and encoded to, against
            the official zoom-in on the same ROIs (plan.approximations says what was left out).

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
                counts,
            )
        except OutOfMemoryError as err:  # outside the encoder and decoder calls: the stitch buffers
            error = f"{type(err).__name__}: {err}"  # text only: the traceback pins the failed tensors
        except HostStitchNeeded as err:  # a batch was already 1
            error = str(err)
        retry.to_host(error)  # raises DeviceOutOfMemoryError when nothing is left to try


def _check(prep: Preprocessed, prompts: Sequence[Prompt], plan: Plan, device: torch.device) -> None:
    for p in prompts:
        if not p.kinds:
            raise PromptError(f"prompt {p.label!r} has no text, box or points")
    if not same_device(plan.device, device):
        raise ShapeError(f"the plan was made for {plan.device} but the model is on {device}; re-plan with plan_fast")


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
    counts: Optional[ZoomInCounts] = None,
) -> list[FastOutput]:
    """One attempt of run_fast with retry.plan (which the encoder and decoder may shrink as they go)."""
    plan, crop_shape = retry.plan, prep.crop.shape
    size = tuple(model.config.spatial_size)
    cmap = CropMap(size, crop_shape, plan.stitch_device)

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
        zoom = _ZoomIn(model, prep.crop, prompts, texts, cmap, coarse, rois, retry, progress, window_cache)
        zoom.run(zoomed, outputs)
        if counts is not None:
            counts.add(zoom.counts)
    return outputs  # type: ignore[return-value]


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
        items.append(DecodeItem(k, box, points))
    coarse = torch.empty((len(prompts), *size), dtype=torch.float32, device=plan.stitch_device)
    # (the cross-attentions' cheaper product order: equal up to rounding, model/cross_attention.py)
    for it, logits in decode_items(model, emb, items, texts, retry, [p.text for p in prompts], reassociate=True):
        coarse[it.k] = logits
    return coarse


@dataclass
class _Coarse:
    """Zoom-out results at zoom-out size, on the stitch device: fg = sigmoid > 0.5 and
    pos = logits > 0, (N, *size) bool; logits (N, *size) float32 only for return_logits."""

    fg: Tensor
    pos: Tensor
    logits: Optional[Tensor]

    def output(self, k: int, cmap: CropMap, dtype: torch.dtype) -> tuple[Tensor, Optional[Tensor]]:
        """Prompt k's coarse mask (bool) and logits (dtype, or None) resized to the crop, on the CPU."""
        logits = None if self.logits is None else cmap.gather(self.logits[k]).to("cpu", dtype)
        return cmap.gather(self.pos[k]).cpu(), logits


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
        self.approx = plan.approximations
        self.grid = global_grid(crop.shape, self.size, self.approx.overlap)
        self.cache = window_cache if window_cache is not None else WindowCache(plan.cache_windows)
        self.single: dict[int, bool] = {}  # prompt -> its ROI needs one window (window_prompts.py)
        self.partial: dict[int, bool] = {}  # prompt -> some of its ROI's windows were skipped
        self.counts = ZoomInCounts()

    @property
    def plan(self) -> Plan:
        return self.retry.plan  # batches may shrink during the run (out-of-memory recovery)

    def run(self, ks: Sequence[int], outputs: list) -> None:
        every = {k: windows_for_roi(self.grid, self.size, *self.rois[k]) for k in ks}
        need = {}
        for k in ks:
            need[k] = [w for w in every[k] if self._holds_foreground(k, w)] if self.approx.skip_empty else every[k]
            self.single[k], self.partial[k] = len(every[k]) == 1, len(need[k]) < len(every[k])
            self.counts.windows_skipped += len(every[k]) - len(need[k])
        if self.approx.overlap != 0.5:  # the official zoom-in's windows lie on the overlap-0.5 grid
            official_grid = global_grid(self.crop.shape, self.size)
            every = {k: windows_for_roi(official_grid, self.size, *self.rois[k]) for k in ks}
        official = {w for k in ks for w in every[k]}
        self.counts.windows_official = len(official)
        self.counts.tokens_official = len(official) * math.prod(self.model.config.grid_size)
        self.counts.windows_planned = len({w for k in ks for w in need[k]})
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

    def _holds_foreground(self, k: int, w: Window) -> bool:
        """Whether window w's region of the crop, grown by skip_margin a side, holds some of
        prompt k's coarse foreground (resized to the crop, as the official zoom-in reads it)."""
        m, origin = self.approx.skip_margin, window_origin(self.grid, w)
        lo = [max(0, o - m) for o in origin]
        hi = [min(n, o + r + m) - 1 for n, o, r in zip(self.crop.shape, origin, self.size)]
        return bool(self.cmap.gather(self.coarse.fg[k], lo, hi).any())

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

    def _group(self, group, order, users, need, outputs, bar) -> None:
        dtype = self.plan.accumulator_dtype
        stitches = {
            k: Stitch(
                self.rois[k],
                [window_origin(self.grid, w) for w in need[k]],
                self.size,
                self.grid,
                *self.coarse.output(k, self.cmap, dtype),
                dtype,
                self.plan.stitch_device,
                partial=self.partial[k],
            )
            for k in group
        }
        finite = {k: True for k in group}  # becomes a device flag per prompt, read once below
        for batch, embs in self._embeddings(order):
            jobs = []  # the step's windows, each decoded over its prompts' ROI parts (window_decode.py)
            for w in batch:
                origin = window_origin(self.grid, w)
                items = [
                    window_item(k, self.prompts[k], self.cmap, self.coarse.fg[k], origin, self.size, self.single[k])
                    for k in users[w]
                ]
                jobs.append(WindowJob(origin, embs[w], items))
            for job, it, logits, done in decode_windows(
                self.model, jobs, self.texts, self.retry, self.tasks, self.rois
            ):
                stitches[it.k].add(logits, job.origin)
                finite[it.k] = finite_rows(logits[None])[0] & finite[it.k]
                if done and bar is not None:
                    bar.update(1)
        check_finite_logits(self.model, [finite[k] for k in group], [self.prompts[k].label for k in group], "zoom-in")
        for k in group:
            outputs[k] = FastOutput(*stitches.pop(k).result(), windows=len(need[k]))

    def _embeddings(self, order: Sequence[Window]) -> Iterable[tuple[list[Window], dict[Window, Tensor]]]:
        """Walk the windows in order, yielding (windows, embeddings) with at most window_batch
        encodes per step; cached embeddings are taken before new ones can evict them."""
        i = 0
        while i < len(order):
            # a cached embedding is reused only for the same place, tokens and adapter state (a
            # session's calls may differ in overlap and token settings)
            key = (self._token_setting(), adapter_state(self.model.image_encoder))
            batch, embs, todo = [], {}, []
            while i < len(order) and len(todo) < self.plan.window_batch:
                w = order[i]
                i += 1
                batch.append(w)
                hit = self.cache.get((window_origin(self.grid, w), key))
                if hit is None:
                    todo.append(w)
                else:
                    embs[w] = hit
            for w, e in zip(todo, self._encode(todo)):
                embs[w] = e
                self.cache.put((window_origin(self.grid, w), key), e)
            yield batch, embs

    def _encode(self, todo: Sequence[Window]) -> list[Tensor]:
        """Embeddings (1, hidden, *grid) of the windows todo, at most window_batch per encoder
        call; on out-of-memory the batch is halved and the same windows are encoded again."""
        out: list[Tensor] = []
        while len(out) < len(todo):
            part = todo[len(out) : len(out) + self.plan.window_batch]
            origins = [window_origin(self.grid, w) for w in part]
            e = self.retry.attempt("encoder", lambda: self._encode_windows(origins))
            if e is not None:
                # clone: a cached slice must not pin the whole batch (clone keeps the strides)
                out.extend(e[j : j + 1].clone() for j in range(len(part)))
                self.counts.windows_encoded += len(part)
                self.counts.tokens_encoded += sum(self._tokens(o) for o in origins)
        return out

    def _tokens(self, origin: Triple) -> int:
        """Tokens the encoder sees for the window at origin (summary tokens included)."""
        if self._token_setting() is None:
            return math.prod(self.model.config.grid_size)
        patch, a = self.model.config.patch_size, self.approx
        return encoded_tokens(self.crop.shape, origin, self.size, patch, a.token_margin, a.token_fill)

    def _token_setting(self) -> Optional[tuple]:
        """What decides a window's encoded tokens: None for the whole window (also under an
        encoder-level adapter, which reads whole windows)."""
        if not self.approx.token_subset or not self.model.image_encoder.token_boxes_supported:
            return None
        return self.approx.token_margin, self.approx.token_fill

    def _encode_windows(self, origins: Sequence[Triple]) -> Tensor:
        """(B, hidden, *grid) embeddings of the windows at origins."""
        if self._token_setting() is not None:
            a = self.approx
            embs = encode_window_tokens(self.model, self.crop, origins, self.size, a.token_margin, a.token_fill)
            return torch.cat(embs)
        return self.model.encode_image(read_boxes(self.crop, origins, self.size).to(self.plan.device))
