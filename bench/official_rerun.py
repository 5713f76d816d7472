"""An independent, deliberately literal re-run of SegVol's official zoom-out-zoom-in inference, used
to check `segevol_fast.inference.exact.run_exact` (docs/official-pipeline.md §5.2–5.4, §11.8–11.10).

It follows the official GitHub demo (`inference_demo.py::zoom_in_zoom_out` and the custom
`sliding_window_inference` of `utils/monai_inferers_utils.py`) statement by statement, with its own
code for everything: full-size prompt maps resized with F.interpolate, `torch.nonzero` boxes,
MONAI's window-count loop, numpy float32 accumulation. It shares with exact mode only the model
and the *definition* of how a user prompt in the crop frame enters the zoom-out frame:

    box    -> cube of crop voxels floor(x + 0.5), clamped to the crop, resized like a label
    points -> zoom-out voxel floor((p + 0.5) * S / crop), clamped to 0..S-1

    python -m bench.official_rerun            # tiny random model on the shared real CT
    python -m bench.official_rerun --full     # the official architecture (random weights)

It prints, per prompt, whether exact mode and this re-run give identical masks and logits, and
writes nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from segevol_fast.inference.prompts import Prompt

POS_THRED = 0.9


# ---------------------------------------------------------------------------- official helpers
def _generate_box(label: torch.Tensor) -> torch.Tensor:
    """Official generate_box (no jitter): min/max of the indices of label > 0, else all -1."""
    ones_idx = (label > 0).nonzero(as_tuple=True)
    if all(t.nelement() == 0 for t in ones_idx):
        return torch.tensor([-1, -1, -1, -1, -1, -1])
    mins = [int(t.min()) for t in ones_idx]
    maxs = [min(label.shape[i], int(t.max())) for i, t in enumerate(ones_idx)]
    return torch.tensor(mins + maxs)


def _build_binary_cube(box: torch.Tensor, shape) -> torch.Tensor:
    lo = box[0][:3].int().tolist()
    hi = box[0][3:].int().tolist()
    cube = torch.zeros(shape)
    cube[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = 1
    return cube


def _build_binary_points(points: torch.Tensor, labels: torch.Tensor, shape) -> torch.Tensor:
    out = torch.zeros(shape, dtype=torch.int16)
    keep = labels == 1
    out[points[keep, 0].long(), points[keep, 1].long(), points[keep, 2].long()] = 1
    return out


def _select_points(preds: torch.Tensor, gen: torch.Generator, num_positive_extra: int = 4):
    """Official select_points with num_negative_extra=0, drawing from `gen`."""
    points = torch.zeros((0, 3))
    labels = torch.zeros(0)
    positive_indices = torch.nonzero(preds > POS_THRED, as_tuple=True)
    if positive_indices[0].nelement() == 0:
        num_positive_extra = 0
        points = torch.cat((points, torch.tensor([[-1, -1, -1]])), dim=0)
        labels = torch.cat((labels, torch.tensor([-1])))
    else:
        random_idx = torch.randint(len(positive_indices[0]), (1,), generator=gen)
        first = torch.tensor([[int(positive_indices[i][random_idx]) for i in range(3)]])
        points = torch.cat((points, first), dim=0)
        labels = torch.cat((labels, torch.ones(1)))
    if num_positive_extra > 0:
        picks = torch.randperm(len(positive_indices[0]), generator=gen)[:num_positive_extra]
        extra = torch.tensor([[int(positive_indices[i][j]) for i in range(3)] for j in picks]).reshape(-1, 3)
        points = torch.cat((points, extra.float()), dim=0)
        labels = torch.cat((labels, torch.ones(extra.shape[0])))
    for _ in range(num_positive_extra + 1 - labels.shape[0]):
        points = torch.cat((points, torch.tensor([[-1, -1, -1]])), dim=0)
        labels = torch.cat((labels, torch.tensor([-1])))
    return points.float(), labels.long()  # our decode wants integer labels


def _logits2roi_coor(spatial_size, logits: torch.Tensor):
    nz = torch.nonzero(torch.sigmoid(logits) > 0.5)
    if nz.shape[0] == 0:
        return None
    out_min, out_max = [], []
    for axis in range(3):
        lo, hi = int(nz[:, axis].min()), int(nz[:, axis].max())
        padding = max(0, spatial_size[axis] - (hi - lo + 1))
        out_min.append(max(0, lo - padding // 2))
        out_max.append(min(logits.shape[axis], hi + padding // 2))
    return out_min, out_max


# ---------------------------------------------------------------------------- MONAI 0.9.0 windows
def _scan_interval(image_size, roi_size, overlap):
    out = []
    for n, r in zip(image_size, roi_size):
        if r == n:
            out.append(int(r))
        else:
            step = int(r * (1 - overlap))
            out.append(step if step > 0 else 1)
    return out


def _dense_patch_starts(image_size, roi_size, interval):
    """dense_patch_slices: per axis, windows until one reaches the end, the last one clamped."""
    starts = []
    for n, r, s in zip(image_size, roi_size, interval):
        count = 1
        for d in range(int(math.ceil(n / s))):
            if d * s + r >= n:
                count = d + 1
                break
        starts.append([i * s - max(i * s + r - n, 0) for i in range(count)])
    grid = np.meshgrid(*starts, indexing="ij")
    return np.stack([g.flatten() for g in grid], axis=1)


def _sliding_window(inputs, prompt_reflection, roi_size, predictor, overlap, use_box, use_point, gen):
    assert not (use_box and use_point)
    image_size_ = list(inputs.shape[2:])
    image_size = [max(n, r) for n, r in zip(image_size_, roi_size)]
    pad_size = []
    for k in range(len(inputs.shape) - 1, 1, -1):  # last axis first, as F.pad wants
        diff = max(roi_size[k - 2] - inputs.shape[k], 0)
        pad_size.extend([diff // 2, diff - diff // 2])
    inputs = F.pad(inputs, pad=pad_size, mode="constant", value=0.0)
    if use_box or use_point:
        binary_prompt_map, global_preds = prompt_reflection  # the map is not padded (official)
        global_preds = F.pad(global_preds, pad=pad_size, mode="constant", value=0.0)
    starts = _dense_patch_starts(image_size, roi_size, _scan_interval(image_size, roi_size, overlap))
    acc = np.zeros([1, 1] + image_size, dtype=np.float32)
    cnt = np.zeros([1, 1] + image_size, dtype=np.float32)
    for st in starts:
        win = [slice(0, 1), slice(None)] + [slice(int(s), int(s) + r) for s, r in zip(st, roi_size)]
        window = inputs[tuple(win)].clone()
        boxes = points = None
        if use_point:
            point, point_label = _select_points(binary_prompt_map[tuple(win)][0, 0], gen)
            points = (point.unsqueeze(0), point_label.unsqueeze(0))
            boxes = _generate_box(global_preds[tuple(win)][0, 0]).unsqueeze(0).float()
        if use_box:
            source = binary_prompt_map if len(starts) == 1 else global_preds
            boxes = _generate_box(source[tuple(win)][0, 0]).unsqueeze(0).float()
        logits = predictor(window, boxes, points)
        acc[tuple(win)] += logits.numpy()
        cnt[tuple(win)] += 1.0
    out = acc / cnt
    keep = [slice(0, 1), slice(None)]
    for axis in range(3):
        before = pad_size[2 * (2 - axis)]
        keep.append(slice(before, before + image_size_[axis]))
    return torch.from_numpy(np.ascontiguousarray(out[tuple(keep)])), len(starts)


# ---------------------------------------------------------------------------- the demo loop, one prompt
def _zoom_out_points(points, crop_shape, size):
    out = []
    for p in np.asarray(points, dtype=np.float64).reshape(-1, 3):
        row = []
        for axis in range(3):
            o = math.floor((float(p[axis]) + 0.5) * size[axis] / crop_shape[axis])
            row.append(min(max(o, 0), size[axis] - 1))
        out.append(row)
    return torch.tensor(out, dtype=torch.float32)


def _user_cube(box, crop_shape) -> torch.Tensor:
    """The user's box as a label at crop size (what the official demo resizes to get its box)."""
    lo = [min(max(math.floor(float(v) + 0.5), 0), n - 1) for v, n in zip(box[:3], crop_shape)]
    hi = [min(max(math.floor(float(v) + 0.5), 0), n - 1) for v, n in zip(box[3:], crop_shape)]
    label = torch.zeros(crop_shape)
    label[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = 1
    return label


def official_rerun(
    model, prep, prompt: Prompt, modality: str = "ct", seed: int = 0, zoom_in: bool = True, trace: Optional[dict] = None
) -> torch.Tensor:
    """One prompt through the official pipeline -> float32 logits (D', H', W') in the crop frame.

    `trace`, when a dict, receives "roi" ((min, max) inclusive, or None) and "windows" (count).
    """
    spatial_size = list(model.config.spatial_size)
    dev = next(model.parameters()).device
    image_single = prep.image[0, 0].float().cpu()
    ori_shape = list(image_single.shape)
    image_single_resize = F.interpolate(image_single[None, None], size=spatial_size, mode="nearest-exact")

    def segvol(img, boxes, points):
        pts = None if points is None else (points[0].to(dev), points[1].to(dev))
        with torch.no_grad():
            out = model(
                img.to(dev),
                text=prompt.text,
                boxes=None if boxes is None else boxes.to(dev),
                points=pts,
                modality=modality,
            )
        return out.float().cpu()

    use_box, use_point = prompt.box is not None, prompt.points is not None
    box_single = points_single = None
    if use_point:
        point = _zoom_out_points(prompt.points, ori_shape, spatial_size)
        point_label = (
            torch.ones(len(point), dtype=torch.long)
            if prompt.point_labels is None
            else torch.tensor(np.asarray(prompt.point_labels), dtype=torch.long)
        )
        points_single = (point.unsqueeze(0), point_label.unsqueeze(0))
        binary_points_resize = _build_binary_points(point, point_label, spatial_size)
    if use_box:
        label_resize = F.interpolate(
            _user_cube(prompt.box, ori_shape)[None, None], size=spatial_size, mode="nearest-exact"
        )[0, 0]
        box_single = _generate_box(label_resize).unsqueeze(0).float()
        binary_cube_resize = _build_binary_cube(box_single, spatial_size)

    logits_global_single = segvol(image_single_resize, box_single, points_single)
    logits_global_single = F.interpolate(logits_global_single, size=ori_shape, mode="nearest")[0][0]
    if use_point:
        binary_points = F.interpolate(binary_points_resize[None, None].float(), size=ori_shape, mode="nearest")[0][0]
    if use_box:
        binary_cube = F.interpolate(binary_cube_resize[None, None].float(), size=ori_shape, mode="nearest")[0][0]
    if trace is not None:
        trace.update(roi=None, windows=0)
    if not zoom_in:
        return logits_global_single

    roi = _logits2roi_coor(spatial_size, logits_global_single)
    if roi is None:
        print(f"Fail to detect foreground! ({prompt.label})")
        return logits_global_single
    (min_d, min_h, min_w), (max_d, max_h, max_w) = roi
    sl = (slice(min_d, max_d + 1), slice(min_h, max_h + 1), slice(min_w, max_w + 1))
    image_single_cropped = image_single[sl].unsqueeze(0).unsqueeze(0)
    global_preds = (torch.sigmoid(logits_global_single[sl]) > 0.5).long()
    assert not (use_box and use_point)
    prompt_reflection = None
    if use_box:
        prompt_reflection = (binary_cube[sl][None, None], global_preds[None, None])
    if use_point:
        prompt_reflection = (binary_points[sl][None, None], global_preds[None, None])
    gen = torch.Generator().manual_seed(int(seed))
    cropped, n_windows = _sliding_window(
        image_single_cropped, prompt_reflection, spatial_size, segvol, 0.5, use_box, use_point, gen
    )
    logits_global_single[sl] = cropped[0, 0]
    if trace is not None:
        trace.update(
            roi=(
                [int(v) for v in (min_d, min_h, min_w)],
                [min(int(v), n - 1) for v, n in zip((max_d, max_h, max_w), ori_shape)],
            ),
            windows=n_windows,
        )
    return logits_global_single


# ---------------------------------------------------------------------------- main: exact vs re-run on real CT
def real_ct_prompts(labels_crop: np.ndarray, seed: int = 0) -> list[Prompt]:
    """Text, box and point prompts on real organs of the shared CT (labels in the crop frame, model axes)."""
    rng = np.random.default_rng(seed)

    def box_of(k):
        idx = np.argwhere(labels_crop == k)
        return np.concatenate([idx.min(0), idx.max(0)]).astype(np.float64)

    def points_in(k, n):
        idx = np.argwhere(labels_crop == k)
        return idx[rng.choice(len(idx), size=n, replace=False)].astype(np.float64)

    present = set(np.unique(labels_crop).tolist())
    liver, spleen, kidney = (k if k in present else None for k in (5, 1, 3))
    out = [Prompt("liver (text)", text="liver"), Prompt("spleen (text)", text="spleen")]
    if liver:
        out.append(Prompt("liver (box)", box=box_of(liver)))
    if kidney:
        out.append(Prompt("kidney_left (text+box)", text="kidney_left", box=box_of(kidney)))
    if spleen:
        out.append(Prompt("spleen (points)", points=points_in(spleen, 3), point_labels=np.ones(3, np.int64)))
    if liver:
        pts = np.concatenate([points_in(liver, 2), np.argwhere(labels_crop == 0)[:1].astype(np.float64)])
        out.append(Prompt("liver (text+points)", text="liver", points=pts, point_labels=np.array([1, 1, 0])))
    return out


def load_real_ct(data_dir: pathlib.Path):
    """(prep, labels in the crop frame (D', H', W') int) for the shared ct_abdomen_sm volume."""
    import nibabel as nib

    from segevol_fast.preprocess import preprocess

    ct = nib.load(str(data_dir / "ct_abdomen_sm.nii.gz")).get_fdata(dtype=np.float32)  # as MONAI LoadImage
    labels = np.asarray(nib.load(str(data_dir / "ct_abdomen_sm_labels.nii.gz")).dataobj)
    prep = preprocess(ct)
    labels = np.swapaxes(labels, 0, 2)  # (X, Y, Z) -> (D, H, W)
    (z0, y0, x0), (z1, y1, x1) = prep.start, prep.end
    return prep, labels[z0:z1, y0:y1, x0:x1]


def main(argv=None) -> int:
    from segevol_fast import SegVol, SegVolConfig
    from segevol_fast.inference.exact import run_exact

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="official architecture (random weights) instead of tiny")
    ap.add_argument("--data", default=os.environ.get("SEGEVOL_DATA", "../shared/data"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    data = pathlib.Path(args.data)
    torch.manual_seed(args.seed)
    config = SegVolConfig() if args.full else SegVolConfig.tiny()
    model = SegVol(config, tokenizer=data / "clip_tokenizer").eval()
    prep, labels = load_real_ct(data)
    print(
        f"CT crop {tuple(prep.crop_shape)}, window {config.spatial_size}, "
        f"{'official' if args.full else 'tiny'} config, random weights (seed {args.seed})"
    )
    all_same = True
    for prompt in real_ct_prompts(labels, args.seed):
        t0 = time.perf_counter()
        exact = run_exact(model, prep, [prompt], seed=args.seed)[0]
        t1 = time.perf_counter()
        trace: dict = {}
        ref = official_rerun(model, prep, prompt, "ct", args.seed, trace=trace)
        t2 = time.perf_counter()
        same_mask = torch.equal(exact > 0, ref > 0)
        same_logits = torch.equal(exact, ref)
        all_same &= same_mask and same_logits
        print(
            f"{prompt.label:26s} masks identical {same_mask!s:5s} logits identical {same_logits!s:5s} "
            f"max|diff| {float((exact - ref).abs().max()):.3g}  fg {int((ref > 0).sum()):7d}  "
            f"roi {trace['roi']} windows {trace['windows']}  exact {t1 - t0:.1f}s rerun {t2 - t1:.1f}s"
        )
    print("ALL IDENTICAL" if all_same else "MISMATCH")
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
