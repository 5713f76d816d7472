"""`segment()`: a volume and prompts in, masks on the volume's own grid out.

Pipeline: load (NIfTI / DICOM / array / Volume) → official preprocessing (foreground crop in model
axes) → prompts to the crop frame → memory plan (fails up front when the budget cannot be met) →
zoom-out-zoom-in in `mode="fast"` (default) or `mode="exact"` → masks pasted back onto the input
grid → `SegmentationResult`.

In fast mode nothing holds a float32 copy of the crop (windows are normalised from the scan's own
voxels as they are read), and each mask is pasted back onto the input grid and its crop-frame
copy dropped before the next, so the call's peak is what the memory plan counted.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Optional, Sequence, Union

import torch

from ..determinism import sigmoid
from ..io import Volume, load_volume
from ..modality_hint import warn_if_mri
from ..model.network import model_device
from ..preprocess import paste_back, preprocess, zoom_out_crop
from ..vocabulary import check_names
from .adapter_scope import adapter_scope
from .approximations import ApproximationsLike, ZoomInCounts
from .arguments import SegmentOptions, check_segment_arguments
from .budget import same_device
from .memory import PeakMemory
from .precision import inference_state, resolve_precision
from .progress import display_for
from .prompts import build_prompts
from .result import SegmentationResult
from .result_files import describe_prompts
from .scan import PreparedScan


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
    precision: Optional[str] = "auto",
    series: Optional[str] = None,
    adapter: Optional[str] = None,
    approximations: ApproximationsLike = "default",
) -> SegmentationResult:
    """Segment `volume` with text / box / point prompts; one mask per prompt.

    Args:
        model: a `SegVol` (moved to `device` when one is given).
        volume: a path (NIfTI file, DICOM folder), a `Volume`, a numpy/torch array (X, Y, Z) or a
            MONAI MetaTensor.
        text: an organ name or a list of names (one mask each). A repeated name (equal after
            lower-casing and collapsing spaces) still gets its own mask, labelled "liver (2)", ...
        box: (6,) (i0, j0, k0, i1, j1, k1) inclusive, or (N, 6) one per name; input-voxel indices,
            or world millimetres with coords="world".
        points, point_labels: (P, 3) and (P,) (1 positive, 0 negative; 1. / 0. floats accepted),
            shared by all prompts. Lists, numpy arrays or torch tensors; numbers must be finite.
            Negative points alone need a text or a box beside them (they say where the target is not).
        modality: "ct" or "mri" (text template); default the volume's, else "ct".
        mode: "fast" (shared encodings, batched windows, compact accumulators) or "exact" (the
            official pipeline step by step, quirks included).
        zoom_in: run the sliding-window zoom-in after the zoom-out pass (official default).
        max_memory: peak memory bound of the whole call ("2GB", bytes): device memory on CUDA,
            process memory on CPU. The call fails before starting if it cannot be met.
        progress: True shows one progress display for the whole call (load, preprocess, zoom-out,
            zoom-in windows, paste back); or a `segevol_fast.inference.progress.Progress` to report
            into (its creator closes it; the CLI adds its load and save stages).
        return_probabilities: also keep sigmoid probabilities (float32, input grid).
        seed: seeds the random point sampling of exact mode (official behaviour is random).
        precision: "auto" (fast mode: bf16/fp16 autocast on CUDA, bf16 on CPUs with bf16
            instructions, else float32; exact mode: the model's precision), or "fp32" / "bf16" /
            "fp16" for this call (see `inference.precision.resolve_precision`).
        series: SeriesInstanceUID to read when `volume` is a DICOM folder holding several series
            (`segevol_fast.io.list_series(folder)` lists them; "no-series-uid" names one without).
        adapter: None (the model as set), "base", an adapter's name, or "auto" (the model's
            mixture of adapters, routed for this scan); see `inference.adapter_scope`. What ran
            is in `res.adapter`.
        approximations: what fast mode's zoom-in may leave out to encode less (window overlap,
            padding tokens, windows without coarse foreground; `inference.approximations`):
            "default" (those whose measured agreement with exact mode holds), "none" (the
            official zoom-in), a dict of settings changed from the defaults ({"overlap": 0.25},
            {"skip_empty": False}) or an `Approximations`. Exact mode ignores it. What ran, and
            the windows and tokens encoded against the official zoom-in, are in `res.plan`.

    Returns:
        SegmentationResult with masks (bool, input grid (X, Y, Z)), volumes in mL, timings, the
        measured peak memory, and `save` / `preview`.

    Raises:
        NonFiniteOutputError: the model gave NaN / inf logits for some prompts (named in the message
            and in `.prompts`), never turned into empty masks; no result is returned.
    """
    options = SegmentOptions(  # checks every setting, before anything is read
        coords=coords,
        modality=modality,
        mode=mode,
        zoom_in=zoom_in,
        max_memory=max_memory,
        device=device,
        progress=progress,
        return_probabilities=return_probabilities,
        seed=seed,
        precision=precision,
        series=series,
        adapter=adapter,
        approximations=approximations,
    )
    check_segment_arguments(model, volume, text, box, points, point_labels, options)
    return run_segment(model, volume, text, box, points, point_labels, options)


def run_segment(model, volume, text, box, points, point_labels, options: SegmentOptions) -> SegmentationResult:
    """`segment()` once its arguments are checked (`check_segment_arguments`; `options` checked
    itself when made). `volume` may also be a `PreparedScan`, as a session keeps it: its
    preprocessing, zoom-out embedding and window cache are used instead of being recomputed."""
    mode = options.mode
    if options.device is not None and not same_device(model_device(model), options.device):
        model.to(options.device)
    dev = model_device(model)
    run_precision = resolve_precision(options.precision, model.precision, dev, mode, weights=model.weights_precision)
    timings: dict[str, float] = {}

    # `options.progress` becomes the call's one display (a Progress), handed down to _run as such
    with PeakMemory(dev) as pm, display_for(options.progress) as progress:  # the whole call, reading the scan included
        t = time.perf_counter()
        scan = volume if isinstance(volume, PreparedScan) else None
        if scan is not None:
            volume = scan.volume
        if not isinstance(volume, Volume):  # a Volume was loaded by the caller (the CLI times that itself)
            progress.stage("load scan")
        vol = volume if isinstance(volume, Volume) else load_volume(volume, series=options.series)
        warn_if_mri(vol, options.modality, has_text=text is not None)  # before the default: None means "not given"
        modality = options.modality or vol.modality or "ct"
        timings["load"] = time.perf_counter() - t

        t = time.perf_counter()
        progress.stage("preprocess")
        # fast mode reads the crop window by window from the scan: no float32 copy of it is made;
        # an interactive session (`session.py`) hands in the preprocessing it keeps
        if scan is None:
            scan = PreparedScan(vol, preprocess(vol.array, lazy=(mode == "fast")))
        prep = scan.prep
        prompts = build_prompts(
            text, box, points, point_labels, shape=vol.shape, start=prep.start, coords=options.coords, affine=vol.affine
        )
        check_names([p.text for p in prompts if p.text is not None])  # a warning, never an error
        timings["preprocess"] = time.perf_counter() - t

        t = time.perf_counter()
        zoom_image = lambda: zoom_out_crop(prep.crop, model.config.spatial_size).to(dev)  # noqa: E731
        with (
            inference_state(model, run_precision),
            torch.inference_mode(),
            adapter_scope(model, options.adapter, modality, zoom_image) as adapter_used,
        ):
            crop_masks, crop_probs, run_info = _run(
                model, scan, prompts, options, modality=modality, device=dev, progress=progress
            )
        timings["inference"] = time.perf_counter() - t

        t = time.perf_counter()
        progress.stage("paste back")
        want_probs = options.return_probabilities
        masks, probs = {}, ({} if want_probs else None)
        for i, p in enumerate(prompts):  # one prompt at a time: its crop-frame copies go as it is pasted
            masks[p.label] = paste_back(crop_masks[i].numpy(), prep).astype(bool, copy=False)
            crop_masks[i] = None
            if want_probs:
                # fixed-chunk sigmoid: torch.sigmoid's last bit depends on the thread count
                probs[p.label] = paste_back(sigmoid(crop_probs[i].float()).numpy(), prep)
                crop_probs[i] = None
        timings["paste_back"] = time.perf_counter() - t
    timings["total"] = sum(timings.values())
    notes = run_info.pop("notes", [])  # e.g. out-of-memory retries of the fast run
    if getattr(model, "weights_source", None) is None:
        notes.append("model weights are random (not loaded with SegVol.from_pretrained): masks are meaningless")
        warnings.warn(notes[-1], stacklevel=2)
    weights_source = getattr(model, "weights_source", None)
    # provenance travels with the result (summary.json, NIfTI headers, preview banner); `volume` is a
    # reference to the scan already in memory, so `res.preview(path)` draws on it
    return SegmentationResult(
        masks=masks,
        probabilities=probs,
        affine=vol.affine,
        spacing=vol.spacing,
        modality=modality,
        timings=timings,
        peak_memory_bytes=pm.peak,
        mode=mode,
        notes=notes,
        precision=run_precision,
        adapter=adapter_used,
        **run_info,
        source=str(vol.source) if vol.source is not None else "array",
        series=vol.series,
        prompts=describe_prompts(text, box, points, point_labels, options.coords),
        weights_source=None if weights_source is None else str(weights_source),
        random_weights=weights_source is None,
        volume=vol.array,
    )


def _run(model, scan: PreparedScan, prompts, options: SegmentOptions, *, modality: str, device, progress):
    """Crop-frame masks (bool) and, when asked, logits (sigmoid is taken while pasting back), one
    per prompt; and the SegmentationResult fields describing the run (plan, windows). `modality`
    is the scan's (options.modality resolved), `progress` the call's display."""
    prep, zoom_in, max_memory, want_probs = scan.prep, options.zoom_in, options.max_memory, options.return_probabilities
    output_voxels = math.prod(scan.volume.shape)
    if options.mode == "exact":
        from .budget import plan_exact
        from .exact import run_exact

        # the official algorithm fixes its memory: the limit is met as it stands or refused here
        plan = plan_exact(
            model,
            prep.crop_shape,
            len(prompts),
            max_memory,
            device,
            zoom_in=zoom_in,
            return_logits=want_probs,
            output_voxels=output_voxels,
        )
        windows: list[int] = []
        logits = run_exact(
            model,
            prep,
            prompts,
            modality=modality,
            zoom_in=zoom_in,
            seed=options.seed,
            progress=progress,
            windows=windows,
        )
        # The official mask is sigmoid > 0.5, which differs from logits > 0 for logits below ~6e-8.
        info = {"plan": plan.summary(), "zoom_in_windows": {p.label: n for p, n in zip(prompts, windows)}}
        return [torch.sigmoid(lg) > 0.5 for lg in logits], (logits if want_probs else None), info
    from .budget import plan_fast
    from .fast import run_fast

    plan = plan_fast(
        model,
        prep.crop_shape,
        len(prompts),
        max_memory,
        device,
        return_logits=want_probs,
        output_voxels=output_voxels,
        approximations=options.approximations,
    )
    retries: list[dict] = []  # what run_fast changed after running out of device memory
    counts = ZoomInCounts()
    outs = run_fast(
        model,
        prep,
        prompts,
        modality=modality,
        zoom_in=zoom_in,
        plan=plan,
        progress=progress,
        return_logits=want_probs,
        oom_retries=retries,
        zoom_out_embedding=scan.zoom_out_embedding,
        window_cache=scan.window_cache,
        counts=counts,
    )
    info = {
        "plan": {**plan.summary(), "oom_retries": retries, "zoom_in": counts.summary()},
        "zoom_in_windows": {p.label: o.windows for p, o in zip(prompts, outs)},
    }
    if retries:
        changes = "; ".join(r["change"] for r in retries)
        info["notes"] = [
            f"ran out of {plan.device} memory {len(retries)} time(s) and retried with {changes} "
            "(results are unchanged; see plan['oom_retries'])"
        ]
    return [o.mask for o in outs], ([o.logits for o in outs] if want_probs else None), info
