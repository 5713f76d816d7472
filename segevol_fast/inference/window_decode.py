"""Decoding the zoom-in windows of one encoder step, each computing only the part of its window
that the stitcher reads.

* Per window, the prompts that use it are decoded in batches of the plan's decode batch, grouped
  by signature (text / box / points, `decode.group_items`), against the window's batch-1
  embedding (the decoder broadcasts it), halved on out-of-memory (`Retries`). Windows are not
  batched together: on a CPU a 2048-token window already fills the GEMMs (measured: no gain), and
  a batch that depended on which windows an encoder step holds (the cache state, the window
  batch) would round differently from run to run; this way a session's cached prompt equals a
  fresh call bit for bit.
* Regions: a pair's output is only read where its window meets the prompt's ROI (`stitch.py`).
  When `model.decode` is `SegVolNetwork.decode` itself, it computes only the union of the call's
  prompts' parts (`decode(region=...)`: the decoder's upscaling over the low-res box that part's
  trilinear upsample reads, and the upsample of that part only); the window-shaped logits handed
  on are zero elsewhere. Its cross-attentions take their products in the order that is cheap for
  a few prompt tokens (`model/cross_attention.py`). A model whose `decode` is replaced (a subclass, an instance
  attribute such as `optimize`'s backend wrapper or a test's double) is called as it is, on whole
  windows.

Equal to `model.decode` of the whole window, cropped, up to summation order (float32 tolerance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

from ..geometry.sliding_window import Triple
from ..model.region_upsample import Box
from .decode import DecodeItem, decode_items, plain_decode
from .oom import Retries


@dataclass
class WindowJob:
    """One window of an encoder step: its crop-frame origin, embedding (1, hidden, *grid) and the
    decoder inputs of the prompts that use it (`window_prompts.window_item`)."""

    origin: Triple
    emb: Tensor
    items: list[DecodeItem]


def decode_windows(
    model, jobs: Sequence[WindowJob], texts: dict[int, Tensor], retry: Retries, tasks: Sequence, rois, regions=True
) -> Iterator[tuple[WindowJob, DecodeItem, Tensor, bool]]:
    """Decode every (window, prompt) pair of `jobs` (module docstring).

    Args:
        texts: prompt index -> (1, hidden) text embedding; tasks[k]: prompt k's structure name
            (or None), declared to adapters per decoder call (`adapters.prompt_context`).
        retry: its plan's decode batch is the most prompts per call, halved on out-of-memory
            (the same pairs are then decoded again).
        rois: prompt index -> crop-frame ROI ((d0, h0, w0), (d1, h1, w1)), inclusive.
        regions: compute only the windows' ROI parts where the model allows (False: whole windows).

    Yields:
        (job, item, logits (*window) float32 on the model's device, whether it was the job's last
        pair), job by job.
    """
    region_path = regions and plain_decode(model) and len(jobs) > 0
    size = tuple(model.config.spatial_size)
    if region_path:  # the dense positional encoding: one for all the step's decoder calls
        with model._autocast(jobs[0].emb.device):
            image_pe = model.prompt_encoder.get_dense_pe()
    for job in jobs:
        left = len(job.items)

        def decode(part, text, boxes, points, job=job):
            return _decode_box(model, job.emb, image_pe, text, boxes, points, _union(rois, part, job.origin, size))

        for it, logits in decode_items(model, job.emb, job.items, texts, retry, tasks, decode if region_path else None):
            left -= 1
            yield job, it, logits, left == 0


def _window_box(roi, origin: Triple, size: Sequence[int]) -> Box:
    """The window-frame box (hi exclusive) where the window at origin meets the ROI."""
    lo, hi = roi
    return (
        tuple(max(a - o, 0) for a, o in zip(lo, origin)),
        tuple(min(b + 1 - o, n) for b, o, n in zip(hi, origin, size)),
    )


def _union(rois, part: Sequence[DecodeItem], origin: Triple, size: Sequence[int]) -> Box:
    """The window-frame box (hi exclusive) holding every ROI part of the prompts of `part`."""
    boxes = [_window_box(rois[it.k], origin, size) for it in part]
    return tuple(min(b[0][a] for b in boxes) for a in range(3)), tuple(max(b[1][a] for b in boxes) for a in range(3))


def _decode_box(model, emb: Tensor, image_pe: Tensor, text, boxes, points, box: Box) -> Tensor:
    """`model.decode(...)[:, 0]` computed inside `box` (spatial_size frame, hi exclusive) only, zero
    elsewhere (`SegVolNetwork.decode(region=...)`). image_pe: `prompt_encoder.get_dense_pe()`."""
    part = model.decode(
        emb, text_embedding=text, boxes=boxes, points=points, region=box, image_pe=image_pe, reassociate=True
    )[:, 0]
    out = torch.zeros((len(part), *model.config.spatial_size), dtype=torch.float32, device=emb.device)
    out[(slice(None),) + tuple(slice(lo, hi) for lo, hi in zip(*box))] = part
    return out
