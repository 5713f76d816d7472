"""Sliding-window arithmetic of the official zoom-in (MONAI 0.9.0 `sliding_window_inference` as
SegVol's `utils/monai_inferers_utils.py` uses it; docs/official-pipeline.md §5.4).

For one axis of size n and window r, with overlap 0.5:

    padded size     N = max(n, r)      zeros, split (diff // 2 before, the rest after)
    scan interval   s = r if r == N else max(1, int(r * (1 - overlap)))
    window starts   0, s, 2s, ... up to the first start k*s with k*s + r >= N, each clamped
                    to N - r (so the last window ends exactly at the padded edge)

The 3-D grid is the 'ij' meshgrid of the per-axis starts: D varies slowest, W fastest. Window
outputs are blended with a constant importance map, i.e. a plain average per voxel (logits in
SegVol). Every start and slice here is in the *padded* frame, except `global_grid`'s: the same
starts in the crop frame, the one grid on which fast mode and the memory planner place windows.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ShapeError

Triple = tuple[int, int, int]


def _check_sizes(image_size: Sequence[int], roi: Sequence[int]) -> None:
    if len(image_size) != len(roi) or not image_size:
        raise ShapeError(f"image_size {tuple(image_size)} and roi {tuple(roi)} must have the same, non-zero rank")
    if any(int(v) < 1 for v in image_size) or any(int(v) < 1 for v in roi):
        raise ShapeError(f"sizes must be positive: image_size {tuple(image_size)}, roi {tuple(roi)}")


def pad_widths(image_size: Sequence[int], roi: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Per axis (before, after) zero padding that makes the image at least roi: MONAI's split,
    diff // 2 before and the odd voxel after."""
    _check_sizes(image_size, roi)
    out = []
    for n, r in zip(image_size, roi):
        diff = max(int(r) - int(n), 0)
        out.append((diff // 2, diff - diff // 2))
    return tuple(out)


def padded_size(image_size: Sequence[int], roi: Sequence[int]) -> tuple[int, ...]:
    """Size the windows tile: max(image, roi) per axis."""
    _check_sizes(image_size, roi)
    return tuple(max(int(n), int(r)) for n, r in zip(image_size, roi))


def scan_interval(image_size: Sequence[int], roi: Sequence[int], overlap: float = 0.5) -> tuple[int, ...]:
    """Step between window starts per axis, from the *padded* size: a full step where the window
    covers the axis exactly, else int(roi * (1 - overlap)), at least 1."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    size = padded_size(image_size, roi)
    return tuple(r if r == n else max(1, int(r * (1 - overlap))) for n, r in zip(size, roi))


def axis_starts(n: int, r: int, step: int) -> list[int]:
    """Window starts along one axis of padded size n >= r: 0, step, ... with the last clamped to n - r.

    The count is the first k with k*step + r >= n, plus one: ceil((n - r) / step) + 1.
    """
    count = -(-(n - r) // step) + 1
    return [min(k * step, n - r) for k in range(count)]


def window_starts(image_size: Sequence[int], roi: Sequence[int], overlap: float = 0.5) -> list[tuple[int, ...]]:
    """All window start corners in the padded frame, MONAI order (first axis slowest).

    image_size: the unpadded image size, e.g. (D, H, W); roi: the window size.
    """
    size = padded_size(image_size, roi)
    steps = scan_interval(image_size, roi, overlap)
    per_axis = [axis_starts(n, int(r), s) for n, r, s in zip(size, roi, steps)]
    return list(itertools.product(*per_axis))  # product == 'ij' meshgrid flattened in C order


def window_slices(image_size: Sequence[int], roi: Sequence[int], overlap: float = 0.5) -> list[tuple[slice, ...]]:
    """`window_starts` as slices (start, start + roi) in the padded frame."""
    return [tuple(slice(s, s + int(r)) for s, r in zip(st, roi)) for st in window_starts(image_size, roi, overlap)]


def pad_volume(x: Tensor, widths: Sequence[tuple[int, int]], value: float = 0.0) -> Tensor:
    """Zero-pad the last len(widths) axes of x by (before, after) each (F.pad order is reversed)."""
    flat = []
    for before, after in reversed(tuple(widths)):
        flat += [before, after]
    if not any(flat):
        return x
    return F.pad(x, flat, mode="constant", value=value)


def iter_windows(
    image: Tensor, roi: Sequence[int], overlap: float = 0.5
) -> Iterator[tuple[int, tuple[slice, ...], Tensor]]:
    """Yield (index, slices, window) over a (B, C, *spatial) image padded to at least roi.

    window: (B, C, *roi), contiguous (the official code concatenates window copies).
    """
    spatial = tuple(image.shape[2:])
    padded = pad_volume(image, pad_widths(spatial, roi))
    for i, sl in enumerate(window_slices(spatial, roi, overlap)):
        yield i, sl, padded[(slice(None), slice(None)) + sl].contiguous()


def sliding_window_average(
    image: Tensor,
    roi: Sequence[int],
    predict: Callable[[Tensor, int, tuple[slice, ...]], Tensor],
    overlap: float = 0.5,
    progress: bool = False,
    desc: str = "zoom-in windows",
) -> Tensor:
    """Constant-weight sliding-window inference, MONAI 0.9.0 arithmetic.

    Args:
        image: (B, C, *spatial) float tensor (the official code has B = 1).
        roi: window size, one per spatial axis.
        predict: called as predict(window (B, C, *roi), index, slices in the padded frame); returns
            (B, K, *roi) float outputs (SegVol: logits), on any device.
        overlap: fraction of the window shared by neighbours (0.5 officially).
        progress: show a tqdm bar.

    Returns:
        (B, K, *spatial) float32 on the CPU: per voxel the mean of the window outputs covering it,
        summed in window order and divided by the count, as MONAI does with a map of ones.
    """
    spatial = tuple(image.shape[2:])
    widths = pad_widths(spatial, roi)
    size = padded_size(spatial, roi)
    slices = window_slices(spatial, roi, overlap)
    windows = iter_windows(image, roi, overlap)
    if progress:
        from tqdm.auto import tqdm

        windows = tqdm(windows, total=len(slices), desc=desc, leave=False)
    acc = count = None
    for i, sl, win in windows:
        out = predict(win, i, sl).detach().to("cpu", torch.float32)
        if out.shape[2:] != tuple(int(r) for r in roi):
            raise ShapeError(f"predict returned {tuple(out.shape)}, expected (B, K, *{tuple(roi)})")
        if acc is None:
            acc = torch.zeros(out.shape[:2] + size, dtype=torch.float32)
            count = torch.zeros((1, 1) + size, dtype=torch.float32)
        region = (slice(None), slice(None)) + sl
        acc[region] += out
        count[region] += 1.0
    acc = acc / count
    crop = tuple(slice(b, b + n) for (b, _), n in zip(widths, spatial))
    return acc[(slice(None), slice(None)) + crop].contiguous()


def global_grid(crop_shape: Sequence[int], window: Sequence[int], overlap: float = 0.5) -> list[list[int]]:
    """Per axis, the window starts in the crop frame (negative on an axis shorter than the
    window: the zero padding MONAI puts before it). MONAI 0.9 arithmetic; overlap 0.5 officially."""
    pads = pad_widths(crop_shape, window)
    steps = scan_interval(crop_shape, window, overlap)
    sizes = padded_size(crop_shape, window)
    return [[s - p[0] for s in axis_starts(n, int(r), st)] for n, r, st, p in zip(sizes, window, steps, pads)]
