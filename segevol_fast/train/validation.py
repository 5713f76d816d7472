"""Validation during fine-tuning: Dice per organ and per prompt type, two ways.

* "segment" (`segment_validation`): what users will run. Each held-out case is read as stored
  (`cases.original_arrays`: NIfTI / DICOM, MSD / nnU-Net / M3D-Seg layouts) and segmented with the
  model's own zoom-out-zoom-in (`model.session(...)`, whose every call equals a fresh
  `model.segment()` on the scan), then scored on the scan's own grid against its labels. Prompts:
      text   the organs' names (the case's modality template), `ORGANS_PER_CALL` per call;
      box    the organs' ground-truth bounding boxes (input voxels, inclusive), as many per call;
      point  per organ, `points` positive clicks drawn inside it (voxels whose six neighbours are
             in the organ too, when there are any), from a generator seeded by (seed, case index,
             label id): the same clicks in every validation of every run.
  Voxels under an nnU-Net "ignore" label count for neither side of the Dice.
* "resized" (`resized_validation`): the cheap check. Each case is resized whole to the model's
  window (a `SegmentationDataset` with train=False) and decoded once, without zoom-in; prompts
  text, box and jittered_box (the box's corners moved by up to `jitter` voxels).

Both return the same summary (`summarize`). Under DDP every rank validates its share of the cases
(case i on rank i % world_size) and the rows are all-gathered, so every rank holds the whole
result: the choice of best checkpoint and early stopping is the same on every rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from .. import adapters
from .. import distributed as dist_utils
from ..adapters.manage import routed_adapters
from ..errors import InvalidArgumentError
from ..model.network import model_device
from .cases import Case, original_arrays
from .datasets import sample_seed
from .encode import encode_names, routed
from .metrics import dice
from .prompts import box_from_mask

SEGMENT_PROMPTS = ("text", "box", "point")
RESIZED_PROMPTS = ("text", "box", "jittered_box")
MODES = {"segment": SEGMENT_PROMPTS, "resized": RESIZED_PROMPTS}
EVAL_SEED = 0x5E6E  # jittered boxes and clicks draw from (EVAL_SEED, case index, ...): the same every call
ORGANS_PER_CALL = 8  # organs segmented in one call: its masks are held at once, each the size of the scan


# ---------------------------------------------------------------------------------- summary
def summarize(rows: list[dict], prompts: Sequence[str]) -> dict:
    """The validation result from its per-(case, organ) rows.

    Returns {"dice": mean over every (row, prompt) score, "mean": {prompt: mean over rows},
    "per_organ": {label: {prompt: mean over the cases holding it}}, "per_label": rows ordered by
    case index then position}. Means of nothing are nan."""
    rows = sorted(rows, key=lambda r: (r["index"], r["position"]))

    def mean(values) -> float:
        return float(np.mean(values)) if len(values) else float("nan")

    organs: dict[str, list[dict]] = {}
    for r in rows:
        organs.setdefault(r["label"], []).append(r)
    return {
        "dice": mean([r[k] for r in rows for k in prompts]),
        "mean": {k: mean([r[k] for r in rows]) for k in prompts},
        "per_organ": {name: {k: mean([r[k] for r in group]) for k in prompts} for name, group in organs.items()},
        "per_label": rows,
    }


def _gathered(rows: list[dict], prompts: Sequence[str]) -> dict:
    return summarize([r for part in dist_utils.all_gather_objects(rows) for r in part], prompts)


def check_prompts(mode: str, prompts: Sequence[str] | None) -> tuple[str, ...]:
    """The prompt types to validate with: `prompts`, or the mode's all when None."""
    if mode not in MODES:
        raise InvalidArgumentError(f"validation mode must be one of {sorted(MODES)}, got {mode!r}")
    chosen = MODES[mode] if prompts is None else tuple(prompts)
    if not chosen or any(p not in MODES[mode] for p in chosen) or len(set(chosen)) != len(chosen):
        raise InvalidArgumentError(f"{mode} validation prompts must be distinct among {MODES[mode]}, got {chosen}")
    return chosen


# ---------------------------------------------------------------------------------- segment()
def segment_validation(
    model,
    cases: Sequence[Case],
    prompts: Sequence[str] = SEGMENT_PROMPTS,
    *,
    points: int = 1,
    zoom_in: bool = True,
    adapter: str | None = None,
    precision: str = "auto",
) -> dict:
    """Dice of `model.segment()` on whole cases (module docstring); returns `summarize`'s dict.

    adapter: passed to segment(); None picks "auto" when the model holds one mixture of adapters
    (routed per scan, as training routes it), else the model as set. precision: segment()'s
    ("auto": what users get by default). The model is put back in its previous train / eval mode."""
    prompts = check_prompts("segment", prompts)
    if not callable(getattr(model, "session", None)):
        raise InvalidArgumentError("segment validation needs a SegVol (model.session / model.segment)")
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise InvalidArgumentError(f"points must be an int >= 1, got {points!r}")
    if adapter is None and len(routed_adapters(model)) == 1:
        adapter = "auto"
    was_training = model.training
    rows: list[dict] = []
    try:
        model.eval()
        for i in range(dist_utils.rank(), len(cases), dist_utils.world_size()):
            rows.extend(_segment_case(model, cases[i], i, prompts, points, zoom_in, adapter, precision))
    finally:
        model.train(was_training)
    return _gathered(rows, prompts)


def _segment_case(model, case: Case, index: int, prompts, points: int, zoom_in: bool, adapter, precision) -> list:
    image, masks, annotated = original_arrays(case)
    ids = list(masks)
    if not ids:
        return []
    session = model.session(image, modality=case.modality, adapter=adapter, precision=precision)
    scores: dict[str, list[float]] = {k: [] for k in prompts}
    for start in range(0, len(ids), ORGANS_PER_CALL):
        chunk = ids[start : start + ORGANS_PER_CALL]
        truths = [_scored(masks[i], annotated) for i in chunk]
        for kind in prompts:
            predicted = _predict(session, model, case, index, kind, {i: masks[i] for i in chunk}, points, zoom_in)
            scores[kind] += [dice(_scored(p, annotated), t) for p, t in zip(predicted, truths)]
    return [
        {
            "case": case.case_id,
            "index": index,
            "position": n,
            "label": case.label_map[i],
            **{k: scores[k][n] for k in prompts},
        }
        for n, i in enumerate(ids)
    ]


def _scored(mask: np.ndarray, annotated: np.ndarray | None) -> np.ndarray:
    """The part of a mask that counts: all of it, or its annotated voxels."""
    return mask if annotated is None else mask & annotated


def _predict(session, model, case: Case, index: int, kind: str, masks: dict, points: int, zoom_in: bool) -> list:
    """segment()'s masks for the organs of `masks` ({label id: truth}) prompted by `kind`, in order."""
    if kind == "text":
        names = [case.label_map[i] for i in masks]
        with torch.no_grad():  # cache them as training does, one at a time, in float32 (see encode_names)
            encode_names(model, names, case.modality)
        return list(session.segment(text=names, zoom_in=zoom_in).masks.values())
    if kind == "box":
        return list(
            session.segment(box=np.stack([organ_box(m) for m in masks.values()]), zoom_in=zoom_in).masks.values()
        )
    predicted = []
    for i, truth in masks.items():
        clicks = organ_clicks(truth, points, np.random.default_rng(sample_seed(EVAL_SEED, index, i)))
        predicted += session.segment(points=clicks, point_labels=[1] * len(clicks), zoom_in=zoom_in).masks.values()
    return predicted


def organ_box(mask: np.ndarray) -> np.ndarray:
    """(i0, j0, k0, i1, j1, k1) inclusive voxel bounds of a non-empty mask: segment()'s box."""
    where = np.nonzero(mask)
    return np.array([w.min() for w in where] + [w.max() for w in where], dtype=np.int64)


def organ_clicks(mask: np.ndarray, n: int, g: np.random.Generator) -> np.ndarray:
    """n voxels (n, 3) inside `mask`, distinct while there are enough, preferring the interior
    (six neighbours inside too): where a user clicks, not on the organ's edge."""
    inner = mask.copy()
    for axis in range(3):
        for shift in (1, -1):
            inner &= np.roll(mask, shift, axis=axis)
            edge = [slice(None)] * 3
            edge[axis] = 0 if shift == 1 else -1  # np.roll wraps around: the volume's faces are edges
            inner[tuple(edge)] = False
    where = np.argwhere(inner if inner.any() else mask)
    pick = g.choice(len(where), size=min(n, len(where)), replace=False)
    return where[np.sort(pick)]


# ---------------------------------------------------------------------------------- resized
def resized_validation(
    model,
    dataset,
    prompts: Sequence[str] = RESIZED_PROMPTS,
    *,
    jitter: int = 5,
    autocast=None,
) -> dict:
    """Dice of (logits > 0) vs the label on whole cases resized to the window (`dataset[i]`, a
    SegmentationDataset with train=False), one decode per prompt type, no zoom-in; labels empty
    after resizing are skipped. autocast: a context manager factory for the forward (e.g. the
    trainer's AMP), None for none. Returns `summarize`'s dict; runs under no_grad in eval mode and
    puts the model back in its previous mode."""
    prompts = check_prompts("resized", prompts)
    device = model_device(model)
    was_training = model.training
    rows: list[dict] = []
    try:
        model.eval()
        with torch.no_grad(), autocast() if autocast is not None else contextlib.nullcontext():
            for i in range(dist_utils.rank(), len(dataset), dist_utils.world_size()):
                rows.extend(_resized_case(model, dataset, i, prompts, jitter, device))
    finally:
        model.train(was_training)
    return _gathered(rows, prompts)


def _resized_case(model, dataset, index: int, prompts, jitter: int, device) -> list[dict]:
    sample = dataset[index]
    labels = sample["labels"] > 0.5  # (C, D, H, W) bool
    keep = [c for c in range(labels.shape[0]) if bool(labels[c].any())]
    if not keep:
        return []
    names, modality = [sample["names"][c] for c in keep], sample["modality"]
    image = sample["image"][None].to(device)
    route = adapters.batch_route(model, image, [modality])
    with adapters.prompt_context(modalities=[modality]), routed(route):
        emb = model.encode_image(image)
    scores: dict[str, list[float]] = {}
    # a box alone reaches context priors as it does in segment(): without a task when they have a
    # "no task" prior
    box_tasks = [None] * len(names) if adapters.prompts_without_text_are_untasked(model) else names
    for kind in prompts:
        if kind == "text":
            with adapters.prompt_context(modalities=[modality], tasks=names), routed(route):
                logits = model.decode(emb, text_embedding=encode_names(model, names, modality))
        else:
            g = torch.Generator().manual_seed(sample_seed(EVAL_SEED, index))
            shift = jitter if kind == "jittered_box" else 0
            boxes = torch.stack([box_from_mask(labels[c], shift, g) for c in keep]).to(device)
            with adapters.prompt_context(modalities=[modality], tasks=box_tasks), routed(route):
                logits = model.decode(emb, boxes=boxes)
        scores[kind] = [dice(logits[n, 0] > 0, labels[c].to(logits.device)) for n, c in enumerate(keep)]
    return [
        {"case": sample["case"], "index": index, "position": n, "label": name, **{k: scores[k][n] for k in prompts}}
        for n, name in enumerate(names)
    ]
