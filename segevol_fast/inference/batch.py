"""`segment_batch`: several scans, each with its own adapter, served by one model.

    results = segment_batch(model, ["ct.nii.gz", "t2.nii.gz", "pd.nii.gz"],
                            adapters=["base", "mri_t2", "auto"], text=["liver", "spleen"])

Step 1, the zoom-out pass, runs every scan's zoom-out image through the encoder in ONE routed
call (`adapters.route`: each batch row takes its scan's adapter, mixtures resolved per scan), so
serving K adapters costs one batched encoder pass, not K. Step 2, zoom-in, then runs scan by scan
(windows batched within the scan, as in `segment()`), each under its adapter, on the embedding
step 1 computed. Fast mode only: exact mode re-encodes per prompt, as the official pipeline does.

Each result equals `segment(model, scan, adapter=...)` run alone up to float rounding: the routed
GEMMs sum in another order than one adapter's (tested: probabilities within 1e-4).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from .. import adapters as _adapters
from ..errors import AdapterError, ArgumentTypeError, InvalidArgumentError
from ..io import Volume, load_volume
from ..model.network import model_device
from ..preprocess import preprocess, zoom_out_crop
from .adapter_scope import mixture_for, scan_route
from .arguments import SegmentOptions, check_adapter, check_segment_arguments
from .result import SegmentationResult
from .scan import PreparedScan
from .segment import run_segment


def _choice(model, adapter: Optional[str], modality: str, image: torch.Tensor):
    """A scan's adapter as (name or None) for hard rows, or (expert names, gates (E,)) for soft."""
    if adapter is None:
        return _adapters.active_adapter(model), None
    if adapter == "base":
        return None, None
    mixture = mixture_for(model, adapter)
    if mixture is None:
        return adapter, None
    r = scan_route(model, mixture, modality, lambda: image)
    if r.index is not None:
        i = int(r.index[0])
        return (None if i < 0 else r.names[i]), None
    return r.names, r.gates[0]


def _route(choices) -> Optional[_adapters.Route]:
    """One Route over every scan's choice: hard indices when all are single adapters, else gates."""
    names = []
    for name, gates in choices:
        for n in [name] if gates is None and name is not None else (name if gates is not None else []):
            if n not in names:
                names.append(n)
    if not names:
        return None
    if all(g is None for _, g in choices):
        return _adapters.Route(
            tuple(names), index=torch.tensor([-1 if n is None else names.index(n) for n, _ in choices])
        )
    rows = torch.zeros(len(choices), len(names))
    for i, (name, gates) in enumerate(choices):
        if gates is not None:
            for n, g in zip(name, gates):
                rows[i, names.index(n)] = g
        elif name is not None:
            rows[i, names.index(name)] = 1.0
    return _adapters.Route(tuple(names), gates=rows)


def segment_batch(
    model,
    volumes: Sequence,
    adapters: Sequence[Optional[str]],
    text=None,
    box=None,
    points=None,
    point_labels=None,
    *,
    modality=None,
    batch_size: int = 4,
    **kwargs,
) -> list[SegmentationResult]:
    """Segment each of `volumes` with its own entry of `adapters` (None, "base", a name, "auto"),
    the same prompts for every scan. `modality`: one for all, or one per scan (default: each
    scan's own, else "ct"). `batch_size`: scans per routed zoom-out pass. Other keyword
    arguments go to `segment()` (mode must stay "fast"). Returns one result per scan."""
    if kwargs.get("mode", "fast") != "fast":
        raise InvalidArgumentError("segment_batch runs fast mode only (exact mode encodes per prompt, officially)")
    if len(adapters) != len(volumes) or not volumes:
        raise AdapterError(f"give one adapter entry per scan: {len(volumes)} scans, {len(adapters)} entries")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be a positive int, got {batch_size!r}")
    if "adapter" in kwargs:
        raise ArgumentTypeError("segment_batch takes one adapter per scan, adapters=[...], not adapter=")
    common = SegmentOptions(**kwargs)  # the settings every scan shares, checked before any is read
    for a in adapters:
        check_adapter(model, a)
    mods = [modality] * len(volumes) if modality is None or isinstance(modality, str) else list(modality)
    if len(mods) != len(volumes):
        raise InvalidArgumentError(f"modality: one for all or one per scan, got {len(mods)} for {len(volumes)} scans")
    vols = [v if isinstance(v, Volume) else load_volume(v) for v in volumes]
    mods = [m or v.modality or "ct" for m, v in zip(mods, vols)]
    device = model_device(model)
    size = model.config.spatial_size

    results: list[SegmentationResult] = []
    for start in range(0, len(vols), batch_size):
        part = range(start, min(start + batch_size, len(vols)))
        preps = {i: preprocess(vols[i].array, lazy=True) for i in part}
        images = torch.cat([zoom_out_crop(preps[i].crop, size) for i in part]).to(device)
        choices = [_choice(model, adapters[i], mods[i], images[j : j + 1]) for j, i in enumerate(part)]
        r = _route(choices)
        saved = _adapters.active_state(model)
        try:
            _adapters.set_active(model, None)
            with torch.inference_mode(), _adapters.prompt_context(modalities=[mods[i] for i in part]):
                if r is None:
                    embs = model.encode_image(images)
                else:
                    with _adapters.route(r):
                        embs = model.encode_image(images)  # step 1: every scan, one routed pass
        finally:
            _adapters.restore_active(model, saved)
        del images
        for j, i in enumerate(part):
            # segment() on the scan as prepared here: its zoom-out embedding comes from the routed pass
            scan = PreparedScan(vols[i], preps[i], zoom_out_embedding=embs[j : j + 1])
            options = dataclasses.replace(common, modality=mods[i], adapter=adapters[i])
            check_segment_arguments(model, vols[i], text, box, points, point_labels, options)
            results.append(run_segment(model, scan, text, box, points, point_labels, options))
    return results
