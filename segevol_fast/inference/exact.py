"""`mode="exact"`: the official zoom-out-zoom-in pipeline, step by step, quirks included
(docs/official-pipeline.md §5.2–5.4 and §11.8–11.10; GitHub `inference_demo.py` + `utils/monai_inferers_utils.py`).

Per prompt, with S = config.spatial_size and the crop (D', H', W') = prep.image's shape:

1. Zoom-out prompts. The official demo derives its prompts from a label resized to S with
   'nearest-exact'; here the user's crop-frame prompt takes that label's place:
   - box: the cube of crop voxels round(d0)..round(d1) (round = floor(x + 0.5), clamped to the crop)
     resized to S with torch 'nearest-exact', then `generate_box` (min / max of > 0, inclusive).
     A box thinner than a zoom-out voxel can vanish: it becomes the official empty box (all -1).
   - points: crop voxel p -> zoom-out voxel floor((p + 0.5) * S / crop) (float64, clamped to
     0..S-1): the zoom-out voxel whose footprint holds the centre of voxel p. Going up in size it
     is one of the voxels that 'nearest-exact' copies from p (the middle one), so the model sees
     the point on the image content the user clicked.
     The official reflection map goes back with legacy 'nearest', which reads floor(c * S / crop):
     it skips some zoom-out indices whenever S does not divide evenly, and a point there is
     absent from the map (a ZoomInWarning says so; its windows then get the -1 point). The
     official demo has the same hole for its own zoom-out points.
2. Reflection maps: the zoom-out box as a cube at S, and a binary map of the positive zoom-out
   points at S, each resized to the crop with torch 'nearest' (legacy), like the official code.
3. Coarse pass: encode the zoom-out image, decode, logits -> crop shape with 'nearest'.
4. Zoom-in (`zoom_in=True`): ROI = box of sigmoid(coarse) > 0.5 grown by floor(pad / 2) a side
   towards the window size and clamped; empty -> warn "Fail to detect foreground!" and keep the
   coarse result. global_preds = sigmoid(coarse[ROI]) > 0.5. Sliding window over the ROI crop
   (roi = S, overlap 0.5, zero padding, logits averaged); per window:
   - text: the same embedding;
   - box prompt, one window: box of the cube map in the window (original bug §11.10: the map
     is *not* padded, so the box lacks the pad offset);
   - box prompt, several windows: box of global_preds (padded) in the window;
   - point prompt: `select_points` on the (unpadded, same bug) point map in the window, 1 + 4
     random positives from a torch.Generator seeded with `seed` per prompt, plus the box of
     global_preds in the window; the map holds the positive points only, so negative points act
     in the coarse pass alone (negative-only clicks next to a text give every window the -1 point);
   - empty maps give the all -1 box / the single (-1, -1, -1) point, still fed in.
   The stitched logits overwrite the coarse logits inside the ROI.

The image encoder runs again for every prompt and every window, as officially: this mode is the
reference that the fast mode is measured against, not a fast path.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..adapters.context import prompt_context
from ..errors import PromptError, ZoomInWarning
from ..geometry.prompt_frames import box_to_zoom_out, generate_box, points_to_zoom_out
from ..geometry.sliding_window import pad_volume, pad_widths, sliding_window_average, window_starts
from ..model.network import model_device
from ..preprocess import Preprocessed, index_map, resize_logits_back, zoom_out_resize
from .finite import check_finite_logits, finite_rows
from .progress import display_for, steps
from .prompts import Prompt

Triple = tuple[int, int, int]
NUM_POSITIVE_EXTRA = 4  # select_points defaults in the official zoom-in (1 + 4 positives, 0 negatives)
POSITIVE_THRESHOLD = 0.9  # select_points: a map value > 0.9 is a positive candidate


# ------------------------------------------------------------------------------ official helpers
def select_points(
    point_map: Tensor, generator: torch.Generator, num_positive_extra: int = NUM_POSITIVE_EXTRA
) -> tuple[Tensor, Tensor]:
    """Official `select_points` with no negatives: (d, h, w) map -> coords (P, 3) float32, labels
    (P,) int64, P = 1 + num_positive_extra, or P = 1 (the (-1, -1, -1) point, label -1) when the
    map has no value > 0.9.

    Random draws, in the official order: randint for the first point, then randperm for the
    extras (which may repeat the first); missing extras are padded with -1 points.
    """
    pos = torch.nonzero(point_map > POSITIVE_THRESHOLD)  # (n, 3), C order like nonzero(as_tuple=True)
    if len(pos) == 0:
        return torch.full((1, 3), -1.0), torch.full((1,), -1, dtype=torch.int64)
    first = torch.randint(len(pos), (1,), generator=generator)
    extra = torch.randperm(len(pos), generator=generator)[:num_positive_extra]
    chosen = torch.cat([pos[first], pos[extra]]).float()
    labels = torch.ones(len(chosen), dtype=torch.int64)
    missing = 1 + num_positive_extra - len(chosen)
    if missing > 0:
        chosen = torch.cat([chosen, torch.full((missing, 3), -1.0)])
        labels = torch.cat([labels, torch.full((missing,), -1, dtype=torch.int64)])
    return chosen, labels


def roi_from_logits(logits: Tensor, window: Sequence[int]) -> Optional[tuple[Triple, Triple]]:
    """Official `logits2roi_coor`: (D, H, W) logits -> (lo, hi) inclusive corners, or None when
    sigmoid(logits) > 0.5 nowhere.

    Each axis grows by floor(max(0, window - extent) / 2) a side, clamped to the volume (the
    official clamps the maximum to the size and lets the inclusive slice truncate it: same thing).
    The threshold is sigmoid > 0.5, not logits > 0: they differ for 0 < x < ~6e-8 in float32.
    """
    fg = torch.sigmoid(logits) > 0.5
    if not bool(fg.any()):
        return None
    lo, hi = [], []
    for axis in range(3):
        idx = torch.nonzero(fg.any(dim=tuple(a for a in range(3) if a != axis))).flatten()
        a, b = int(idx[0]), int(idx[-1])
        grow = max(0, int(window[axis]) - (b - a + 1)) // 2
        lo.append(max(0, a - grow))
        hi.append(min(logits.shape[axis] - 1, b + grow))
    return tuple(lo), tuple(hi)


@dataclass
class ZoomOutPrompt:
    """One prompt in the official zoom-out form, plus what its reflection maps need.

    box:       (1, 6) float32 zoom-out box, or None.
    points:    (coords (1, P, 3) float32, labels (1, P) int64) in the zoom-out frame, or None.
    point_map: (*S) float32 binary map of the positive zoom-out points, or None.
    """

    box: Optional[Tensor]
    points: Optional[tuple[Tensor, Tensor]]
    point_map: Optional[Tensor]


def zoom_out_prompt(prompt: Prompt, crop_shape: Sequence[int], size: Sequence[int]) -> ZoomOutPrompt:
    """Convert a crop-frame `Prompt` to the zoom-out frame (see the module docstring)."""
    box = points = point_map = None
    if prompt.box is not None:
        box = box_to_zoom_out(prompt.box, crop_shape, size)[None]
        if bool((box < 0).all()):
            warnings.warn(
                f"prompt {prompt.label!r}: the box {np.asarray(prompt.box).tolist()} vanished when the crop "
                f"{tuple(crop_shape)} was resized to {tuple(size)} ('nearest-exact', as officially); the model "
                "gets the empty box. Use a thicker box or mode='fast'.",
                ZoomInWarning,
                stacklevel=3,
            )
    if prompt.points is not None:
        coords = points_to_zoom_out(prompt.points, crop_shape, size)
        labels = (
            torch.ones(len(coords), dtype=torch.int64)
            if prompt.point_labels is None
            else torch.as_tensor(np.asarray(prompt.point_labels), dtype=torch.int64)
        )
        points = (coords.float()[None], labels[None])
        # build_binary_points: positives only, at the zoom-out size
        point_map = torch.zeros(tuple(size), dtype=torch.float32)
        pos = coords[labels == 1]
        point_map[pos[:, 0], pos[:, 1], pos[:, 2]] = 1.0
    return ZoomOutPrompt(box, points, point_map)


def _reflect(zoom_map: Tensor, crop_shape: Sequence[int], roi: tuple[Triple, Triple]) -> Tensor:
    """(*S) zoom-out map -> its 'nearest' upsampling to the crop, only inside the ROI (inclusive)."""
    lo, hi = roi
    idx = [index_map(zoom_map.shape[a], crop_shape[a], "nearest")[lo[a] : hi[a] + 1] for a in range(3)]
    return zoom_map[idx[0]][:, idx[1]][:, :, idx[2]]


def _points_reflected(zp: ZoomOutPrompt, crop_shape: Sequence[int]) -> bool:
    """True when every positive zoom-out point survives the 'nearest' upsampling of the point map."""
    coords, labels = zp.points
    pos = coords[0][labels[0] == 1].long()
    for axis in range(3):
        kept = torch.zeros(zp.point_map.shape[axis], dtype=torch.bool)
        kept[index_map(zp.point_map.shape[axis], crop_shape[axis], "nearest")] = True
        if not bool(kept[pos[:, axis]].all()):
            return False
    return True


def _cube(box: Tensor, size: Sequence[int]) -> Tensor:
    """build_binary_cube: (1, 6) zoom-out box -> (*S) float32 cube; the all -1 box gives zeros."""
    cube = torch.zeros(tuple(size), dtype=torch.float32)
    lo, hi = box[0, :3].int().tolist(), box[0, 3:].int().tolist()
    cube[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = 1.0
    return cube


# ------------------------------------------------------------------------------ the pipeline
def _forward(
    model, image: Tensor, text: Optional[Tensor], box: Optional[Tensor], points: Optional[tuple[Tensor, Tensor]]
) -> Tensor:
    """One official model call: image (1, 1, *S) -> logits (1, 1, *S) float32 on the CPU."""
    dev = model_device(model)
    emb = model.encode_image(image.to(dev))
    pts = None if points is None else (points[0].to(dev), points[1].to(dev))
    out = model.decode(emb, text_embedding=text, boxes=None if box is None else box.to(dev), points=pts)
    return out.float().cpu()


def _check(prep: Preprocessed, prompts: Sequence[Prompt], zoom_in: bool) -> None:
    for p in prompts:
        if not p.kinds:
            raise PromptError(f"prompt {p.label!r} has no text, box or points")
        if zoom_in and p.box is not None and p.points is not None:
            raise PromptError(
                f"prompt {p.label!r} has both a box and points: the official zoom-in cannot combine them "
                "(it asserts). Use one of them, zoom_in=False, or mode='fast'."
            )


def run_exact(
    model,
    prep: Preprocessed,
    prompts: Sequence[Prompt],
    modality: str = "ct",
    zoom_in: bool = True,
    seed: int = 0,
    progress: bool = False,
    windows: Optional[list[int]] = None,
) -> list[Tensor]:
    """The official zoom-out-zoom-in inference, one prompt at a time.

    Args:
        model: a `SegVol` (any config; windows are config.spatial_size).
        prep: `preprocess(...)` output; its crop (D', H', W') float32 in [0, 1] is materialised
            once (the official pipeline holds it whole).
        prompts: crop-frame `Prompt`s (text and/or box and/or points).
        modality: text template ("ct" is the official one).
        zoom_in: run the zoom-in pass (official default); False returns the coarse result.
        seed: seeds the torch.Generator (one per prompt) that `select_points` draws from.
        progress: a `Progress` to report each prompt's zoom-out and zoom-in windows into, or True
            for a display of its own.
        windows: a list to append each prompt's zoom-in window count to (0: coarse result kept).

    Returns:
        one float32 logits tensor (D', H', W') per prompt, crop frame, CPU; mask = sigmoid > 0.5.

    Raises:
        NonFiniteOutputError: a prompt's logits hold NaN / inf (`finite.py`); later prompts do not run.
    """
    _check(prep, prompts, zoom_in)
    size = tuple(model.config.spatial_size)
    image = prep.image.detach().float().cpu()
    crop_shape = tuple(image.shape[2:])
    zoom_image = zoom_out_resize(image, size)
    results = []
    with torch.no_grad(), display_for(progress) as display:
        for i, prompt in enumerate(prompts):
            display.stage(f"prompt {i + 1}/{len(prompts)} {prompt.label!r}: zoom-out", key="zoom-out")
            logits, n_windows = _run_prompt(
                model, image, zoom_image, crop_shape, size, prompt, modality, zoom_in, seed, display
            )
            # before the next prompt's minutes: NaN weights make every prompt's logits NaN
            check_finite_logits(model, finite_rows(logits[None]), [prompt.label], "zoom-out-zoom-in")
            results.append(logits)
            if windows is not None:
                windows.append(n_windows)
    return results


def _run_prompt(model, image, zoom_image, crop_shape, size, prompt, modality, zoom_in, seed, progress):
    with prompt_context(tasks=[prompt.text]):  # for adapters that read the prompt's task
        return _run_prompt_in_context(
            model, image, zoom_image, crop_shape, size, prompt, modality, zoom_in, seed, progress
        )


def _run_prompt_in_context(model, image, zoom_image, crop_shape, size, prompt, modality, zoom_in, seed, progress):
    """(logits, zoom-in windows run) of one prompt."""
    text = model.encode_text([prompt.text], modality) if prompt.text is not None else None
    zp = zoom_out_prompt(prompt, crop_shape, size)
    coarse = resize_logits_back(_forward(model, zoom_image, text, zp.box, zp.points), crop_shape)[0, 0]
    if not zoom_in:
        return coarse, 0
    roi = roi_from_logits(coarse, size)
    if roi is None:
        warnings.warn(
            f"Fail to detect foreground! (prompt {prompt.label!r}): keeping the zoom-out result",
            ZoomInWarning,
            stacklevel=3,
        )
        return coarse, 0
    if zp.points is not None and not _points_reflected(zp, crop_shape):
        warnings.warn(
            f"prompt {prompt.label!r}: a positive point's zoom-out voxel is not copied back to the crop by the "
            "official 'nearest' upsampling of the point map, so zoom-in windows cannot sample it (an official "
            "quirk; windows without a positive get the (-1, -1, -1) point)",
            ZoomInWarning,
            stacklevel=3,
        )
    lo, hi = roi
    region = tuple(slice(a, b + 1) for a, b in zip(lo, hi))
    roi_image = image[(0, 0) + region][None, None]
    global_preds = (torch.sigmoid(coarse[region]) > 0.5).long()
    # only global_preds is padded like the image; the prompt maps stay unpadded (§11.10)
    preds_padded = pad_volume(global_preds, pad_widths(global_preds.shape, size))
    if zp.points is not None:
        prompt_map = _reflect(zp.point_map, crop_shape, roi)
    elif zp.box is not None:
        prompt_map = _reflect(_cube(zp.box, size), crop_shape, roi)
    else:
        prompt_map = None
    generator = torch.Generator().manual_seed(int(seed))
    n_windows = len(window_starts(global_preds.shape, size))

    def predict(window: Tensor, index: int, sl: tuple[slice, ...]) -> Tensor:
        box = points = None
        if zp.points is not None:
            # the padded-frame slice on the unpadded map: the official pad-offset bug
            points = tuple(t[None] for t in select_points(prompt_map[sl], generator))
            box = generate_box(preds_padded[sl])[None]
        elif zp.box is not None:
            source = prompt_map if n_windows == 1 else preds_padded  # same bug for the cube map
            box = generate_box(source[sl])[None]
        return _forward(model, window, text, box, points)

    bar = steps(progress, f"{prompt.label!r}: zoom-in windows", n_windows, unit="win", key="zoom-in")

    def counted(window: Tensor, index: int, sl: tuple[slice, ...]) -> Tensor:
        out = predict(window, index, sl)
        if bar is not None:
            bar.update(1)
        return out

    stitched = sliding_window_average(roi_image, size, counted, overlap=0.5)
    if bar is not None:
        bar.close()
    out = coarse.clone()
    out[region] = stitched[0, 0]
    return out, n_windows
