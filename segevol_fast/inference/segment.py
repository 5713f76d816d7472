"""`segment()`: a volume and prompts in, masks on the volume's own grid out.

Pipeline: load (NIfTI / DICOM / array / Volume) → official preprocessing (foreground crop in model
axes) → prompts to the crop frame → memory plan (fails up front when the budget cannot be met) →
zoom-out-zoom-in in `mode="fast"` (default) or `mode="exact"` → masks pasted back onto the input
grid → `SegmentationResult`.
"""

from __future__ import annotations

import time
import warnings
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..io import Volume, load_volume
from ..preprocess import paste_back, preprocess
from .budget import _model_device, same_device
from .memory import PeakMemory
from .prompts import build_prompts
from .result import SegmentationResult

MODES = ("fast", "exact")


def segment(
    model,
    volume,
    text: Union[str, Sequence[str], None] = None,
    box=None,
    points=None,
    point_labels=None,
    *,
    coords: str = "voxel",
    modality: Optional[str] = None,
    mode: str = "fast",
    zoom_in: bool = True,
    max_memory: Union[int, str, None] = None,
    device: Union[str, torch.device, None] = None,
    progress: bool = True,
    return_probabilities: bool = False,
    seed: int = 0,
) -> SegmentationResult:
    """Segment `volume` with text / box / point prompts; one mask per prompt.

    Args:
        model: a `SegVol` (moved to `device` when one is given).
        volume: a path (NIfTI file, DICOM folder), a `Volume`, a numpy/torch array (X, Y, Z) or a
            MONAI MetaTensor.
        text: an organ name or a list of names (one mask each).
        box: (6,) (i0, j0, k0, i1, j1, k1) inclusive, or (N, 6) one per name; input-voxel indices,
            or world millimetres with coords="world".
        points, point_labels: (P, 3) and (P,) (1 positive, 0 negative), shared by all prompts.
        modality: "ct" or "mri" (text template); default the volume's, else "ct".
        mode: "fast" (shared encodings, batched windows, compact accumulators) or "exact" (the
            official pipeline step by step, quirks included).
        zoom_in: run the sliding-window zoom-in after the zoom-out pass (official default).
        max_memory: peak memory bound of the whole call ("2GB", bytes): device memory on CUDA,
            process memory on CPU. The call fails before starting if it cannot be met.
        progress: show a progress bar over windows.
        return_probabilities: also keep sigmoid probabilities (float32, input grid).
        seed: seeds the random point sampling of exact mode (official behaviour is random).

    Returns:
        SegmentationResult with masks (bool, input grid (X, Y, Z)), volumes in mL, timings, the
        measured peak memory, and `save` / `preview`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    vol = volume if isinstance(volume, Volume) else load_volume(volume)
    modality = modality or vol.modality or "ct"
    timings["load"] = time.perf_counter() - t

    if device is not None and not same_device(_model_device(model), device):
        model.to(device)
    dev = _model_device(model)

    with PeakMemory(dev) as pm:
        t = time.perf_counter()
        prep = preprocess(vol.array)
        prompts = build_prompts(text, box, points, point_labels, shape=vol.shape, start=prep.start,
                                coords=coords, affine=vol.affine)
        timings["preprocess"] = time.perf_counter() - t

        t = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                crop_masks, crop_probs = _run(model, prep, prompts, modality, mode, zoom_in, max_memory, dev,
                                              progress, return_probabilities, seed)
        finally:
            model.train(was_training)
        timings["inference"] = time.perf_counter() - t

        t = time.perf_counter()
        masks = {p.label: paste_back(m.numpy(), prep).astype(bool) for p, m in zip(prompts, crop_masks)}
        probs = None
        if return_probabilities:
            probs = {p.label: paste_back(pr.float().numpy(), prep).astype(np.float32) for p, pr in zip(prompts, crop_probs)}
        timings["paste_back"] = time.perf_counter() - t
    timings["total"] = sum(timings.values())
    notes = []
    if getattr(model, "weights_source", None) is None:
        notes.append("model weights are random (not loaded with SegVol.from_pretrained): masks are meaningless")
        warnings.warn(notes[-1], stacklevel=2)
    return SegmentationResult(masks=masks, probabilities=probs, affine=vol.affine, spacing=vol.spacing,
                              modality=modality, timings=timings, peak_memory_bytes=pm.peak, mode=mode,
                              notes=notes)


def _run(model, prep, prompts, modality, mode, zoom_in, max_memory, device, progress, want_probs, seed):
    """Crop-frame masks (bool) and, when asked, probabilities, one per prompt."""
    if mode == "exact":
        from .exact import run_exact

        if max_memory is not None:
            warnings.warn("max_memory is planned for mode='fast'; mode='exact' follows the official memory use",
                          stacklevel=3)
        logits = run_exact(model, prep, prompts, modality=modality, zoom_in=zoom_in, seed=seed, progress=progress)
        # The official mask is sigmoid > 0.5, which differs from logits > 0 for logits below ~6e-8.
        probs = [torch.sigmoid(lg) for lg in logits]
        return [p > 0.5 for p in probs], (probs if want_probs else None)
    from .budget import plan_fast
    from .fast import run_fast

    plan = plan_fast(model, tuple(prep.image.shape[-3:]), len(prompts), max_memory, device, return_logits=want_probs)
    outs = run_fast(model, prep, prompts, modality=modality, zoom_in=zoom_in, plan=plan, progress=progress,
                    return_logits=want_probs)
    return [o.mask for o in outs], ([torch.sigmoid(o.logits.float()) for o in outs] if want_probs else None)
