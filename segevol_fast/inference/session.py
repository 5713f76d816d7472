"""Interactive sessions: encode a scan once, then answer prompt after prompt from the cache.

    sess = model.session("ct.nii.gz", max_memory="4GB")
    res = sess.segment(text="liver")                      # zoom-out decode + the liver's windows
    res = sess.refine("liver", points=[[60, 50, 14]], point_labels=[0])   # decoder only (+ new windows)

A session keeps what `segment()` would recompute on every call: the loaded scan and its
preprocessing (the crop is read lazily, no float32 copy), the zoom-out embedding, the text
embeddings (the model's cache) and the zoom-in window embeddings in a `WindowCache` that lives as
long as the session, least recently used evicted first. Its capacity comes from the memory budget:
what `max_memory` leaves after the plan of one call (cache excluded) and the kept zoom-out
embedding, divided by one embedding's bytes, never more than the scan has windows. All of it is
one `PreparedScan` (`scan.py`). Every call is a full `segment()` (same checks, planner, stitching
and result type) on that prepared scan, so its result equals a fresh `segment()` with
the same prompts (tested bit for bit on the CPU), and only windows never seen are encoded.

`refine(name, points, point_labels)` re-runs a previous prompt (text, box and points as given)
with the new points added: the correction clicks of an interactive viewer.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..errors import InvalidArgumentError, PromptError
from ..geometry.sliding_window import global_grid
from ..io import Volume, load_volume
from ..model.network import model_device
from ..preprocess import preprocess, zoom_out_crop
from .adapter_scope import adapter_scope
from .approximations import ApproximationsLike
from .arguments import SegmentOptions, check_segment_arguments, check_session_arguments
from .budget import parse_memory, plan_fast, same_device
from .precision import inference_state, resolve_precision
from .prompts import checked_points
from .result import SegmentationResult
from .scan import PreparedScan
from .segment import run_segment
from .window_cache import WindowCache


class Session:
    """One scan, many prompts; see the module docstring. Build it with `model.session(volume, ...)`.

    Attributes: volume (the loaded `Volume`), modality, cache (the `WindowCache`: `len`, `hits`,
    `misses`, `capacity`), history ({mask name: the prompt arguments it was made with}), scan (the
    `PreparedScan` every call reuses: the volume, its preprocessing, zoom-out embedding and cache),
    options (the `SegmentOptions` every call starts from: fast mode, the session's modality,
    approximations (`inference.approximations`, one setting for the whole session),
    adapter, precision and memory budget; each call sets its own coords, zoom_in, ...).
    """

    def __init__(
        self,
        model,
        volume,
        *,
        modality: Optional[str] = None,
        adapter: Optional[str] = None,
        max_memory: Union[int, str, None] = None,
        device=None,
        series: Optional[str] = None,
        precision: Optional[str] = "auto",
        cache_windows: Optional[int] = None,
        approximations: ApproximationsLike = "default",
    ):
        given = SegmentOptions(
            modality=modality,
            mode="fast",
            max_memory=max_memory,
            device=device,
            progress=False,
            precision=precision,
            series=series,
            adapter=adapter,
            approximations=approximations,
        )
        check_session_arguments(model, volume, given)
        if device is not None and not same_device(model_device(model), device):
            model.to(device)
        # before the scan is read: a precision the weights cannot run is refused up front
        run_precision = resolve_precision(
            precision, model.precision, model_device(model), "fast", weights=model.weights_precision
        )
        self.model = model
        self.volume = volume if isinstance(volume, Volume) else load_volume(volume, series=series)
        self.modality = modality or self.volume.modality or "ct"
        # what every call starts from: the scan is loaded and the model placed (no series, no device)
        self.options = dataclasses.replace(given, modality=self.modality, device=None, series=None)
        self.scan = PreparedScan(self.volume, preprocess(self.volume.array, lazy=True))
        dev = model_device(model)
        size = model.config.spatial_size
        overlap = self.options.approximations.overlap
        n_windows = int(np.prod([len(a) for a in global_grid(self.scan.prep.crop.shape, size, overlap)]))
        if cache_windows is None:
            cache_windows = self._capacity(n_windows, dev)
        elif not isinstance(cache_windows, int) or cache_windows < 0:
            raise InvalidArgumentError(f"cache_windows must be a non-negative int, got {cache_windows!r}")
        self.cache = self.scan.window_cache = WindowCache(min(cache_windows, n_windows))
        self.history: dict[str, dict] = {}
        # the zoom-out embedding, under the session's adapter and precision, as segment() makes it
        image = zoom_out_crop(self.scan.prep.crop, size).to(dev)
        with (
            inference_state(model, run_precision),
            torch.inference_mode(),
            adapter_scope(model, adapter, self.modality, lambda: image),
        ):
            self.scan.zoom_out_embedding = model.encode_image(image)

    def _capacity(self, n_windows: int, dev) -> int:
        """Windows the budget leaves room for after one call's plan and the session's own zoom-out
        embedding, which outlives the calls (all of them without a budget)."""
        max_memory = self.options.max_memory
        if max_memory is None:
            return n_windows
        plan = plan_fast(self.model, self.scan.prep.crop.shape, 1, max_memory, dev)
        cfg = self.model.config
        per_window = cfg.hidden_size * int(np.prod(cfg.grid_size)) * 4  # a zoom-out embedding is one too
        spare = parse_memory(max_memory) - plan.estimated_peak_bytes + plan.breakdown.get("embedding_cache", 0)
        return max(0, min(n_windows, (spare - per_window) // per_window))

    def segment(
        self,
        text: Union[str, Sequence[str], None] = None,
        box=None,
        points=None,
        point_labels=None,
        *,
        coords: str = "voxel",
        zoom_in: bool = True,
        return_probabilities: bool = False,
        progress: bool = False,
    ) -> SegmentationResult:
        """`segment()` on the session's scan with these prompts (fast mode); see it for arguments."""
        options = dataclasses.replace(
            self.options, coords=coords, zoom_in=zoom_in, return_probabilities=return_probabilities, progress=progress
        )
        res = self._run(text, box, points, point_labels, options)
        args = dict(text=text, box=box, points=points, point_labels=point_labels, coords=coords, zoom_in=zoom_in)
        for i, name in enumerate(res.labels):
            self.history[name] = _one_prompt(args, i, len(res.labels))
        return res

    def refine(
        self, name: str, points, point_labels=None, *, return_probabilities: bool = False, progress: bool = False
    ) -> SegmentationResult:
        """Prompt `name` again (its text / box / earlier points) with `points` (P, 3) and
        `point_labels` (P,) added (default all positive); returns a result holding the refined
        mask under `name`, whose history it updates (no other name's). Negative-only clicks are
        fine when the prompt has a text, a box or earlier positive points. The points are checked
        like segment()'s. return_probabilities and progress as in `segment`."""
        if not isinstance(name, str) or name not in self.history:
            raise PromptError(f"nothing to refine called {name!r}; this session has {sorted(self.history) or 'none'}")
        if points is None:
            raise PromptError(
                f"refine({name!r}, ...) adds points: give points=[[i, j, k], ...] (and point_labels, "
                "1 positive / 0 negative); to re-run a prompt unchanged, call segment()"
            )
        new_pts, new_lbl = checked_points(points, point_labels)
        prev = self.history[name]
        old_pts, old_lbl = checked_points(prev["points"], prev["point_labels"])
        if old_pts is not None:
            new_pts, new_lbl = np.concatenate([old_pts, new_pts]), np.concatenate([old_lbl, new_lbl])
        options = dataclasses.replace(
            self.options,
            coords=prev["coords"],
            zoom_in=prev["zoom_in"],
            return_probabilities=return_probabilities,
            progress=progress,
        )
        res = self._run(prev["text"], prev["box"], new_pts, new_lbl, options)
        res = _renamed(res, name)
        self.history[name] = dict(prev, points=new_pts, point_labels=new_lbl)
        return res

    def _run(self, text, box, points, point_labels, options: SegmentOptions) -> SegmentationResult:
        """One fast-mode `segment()` on the session's prepared scan (`segment.run_segment`); its
        options are the session's (`self.options`) with the call's own."""
        check_segment_arguments(self.model, self.volume, text, box, points, point_labels, options)
        return run_segment(self.model, self.scan, text, box, points, point_labels, options)


def _renamed(res: SegmentationResult, name: str) -> SegmentationResult:
    """`res` (one mask) with that mask labelled `name`: a prompt re-run alone gets its plain label
    ("liver", "box 0"), but it refines the mask the session knows as `name` ("liver (2)", "box 1")."""
    (old,) = res.labels

    def rekey(d):
        return None if d is None else {name: d[old]}

    return dataclasses.replace(
        res, masks=rekey(res.masks), probabilities=rekey(res.probabilities), zoom_in_windows=rekey(res.zoom_in_windows)
    )


def _one_prompt(args: dict, i: int, n: int) -> dict:
    """Prompt i's own arguments out of a call's (lists of texts / boxes split per prompt)."""
    out = dict(args)
    text = args["text"]
    if isinstance(text, (list, tuple)):
        out["text"] = text[i]
    box = args["box"]
    if box is not None:
        arr = np.asarray(box, dtype=float)
        out["box"] = arr.reshape(-1, 6)[i] if arr.size == 6 * n and n > 1 else arr
    return out
