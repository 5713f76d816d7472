"""A prompt's decoder input in one zoom-in window, simplified from the official rules:

* text -> the text;
* box -> the box of the coarse mask in the window (the user's box, clipped, when the prompt needs
  one window only);
* points -> the user's points inside the window (no random sampling) plus the coarse box.

Empty boxes / no points give the official all -1 box / -1 point. Coordinates are the window's
(its crop-frame origin subtracted).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..geometry.crop_map import CropMap
from ..geometry.sliding_window import Triple
from .decode import DecodeItem
from .prompts import Prompt

_EMPTY_BOX = torch.full((6,), -1.0)
_NO_POINT = (torch.full((1, 3), -1.0), torch.full((1,), -1, dtype=torch.int64))


def window_item(
    k: int, prompt: Prompt, cmap: CropMap, fg: Tensor, origin: Triple, window: Sequence[int], single: bool
) -> DecodeItem:
    """Decoder input of prompt k in one window; fg: its coarse foreground (*size) for the box;
    single: the prompt's zoom-in needs this window only."""
    box = points = None
    if prompt.box is not None and single:
        box = _user_box(np.asarray(prompt.box, np.float64), origin, window)
    elif prompt.box is not None or prompt.points is not None:
        box = _coarse_box(cmap, fg, origin, window)
    if prompt.points is not None:
        points = _window_points(prompt, origin, window)
    return DecodeItem(k, box, points)


def _coarse_box(cmap: CropMap, fg: Tensor, origin: Triple, window: Sequence[int]) -> Tensor:
    """Box (6,) float32, window coordinates, of the coarse foreground fg (*size, zoom-out frame)
    resized to the crop, inside the window: only the window's part is resized."""
    lo = [max(0, o) for o in origin]
    hi = [min(len(m), o + r) for m, o, r in zip(cmap.maps, origin, window)]
    sub = cmap.gather(fg, lo, [h - 1 for h in hi])
    if not bool(sub.any()):
        return _EMPTY_BOX
    a, b = [], []
    for axis in range(3):
        idx = torch.nonzero(sub.any(dim=tuple(x for x in range(3) if x != axis))).flatten()
        a.append(int(idx[0]) + lo[axis] - origin[axis])
        b.append(int(idx[-1]) + lo[axis] - origin[axis])
    return torch.tensor(a + b, dtype=torch.float32)


def _user_box(box: np.ndarray, origin: Triple, window: Sequence[int]) -> Tensor:
    """The user's crop-frame box clipped to the window, in window coordinates (all -1 if outside)."""
    o, r = np.asarray(origin, np.float64), np.asarray(window, np.float64)
    lo, hi = np.maximum(box[:3] - o, 0), np.minimum(box[3:] - o, r - 1)
    if (lo > hi).any():
        return _EMPTY_BOX
    return torch.tensor(np.concatenate([lo, hi]), dtype=torch.float32)


def _window_points(prompt: Prompt, origin: Triple, window: Sequence[int]) -> tuple[Tensor, Tensor]:
    """The user's points inside the window, window coordinates; the -1 point when none are."""
    local = np.asarray(prompt.points, np.float64) - np.asarray(origin, np.float64)
    inside = ((local >= 0) & (local <= np.asarray(window) - 1)).all(axis=1)
    if not inside.any():
        return _NO_POINT
    labels = np.ones(len(local), np.int64) if prompt.point_labels is None else np.asarray(prompt.point_labels)
    return (torch.tensor(local[inside], dtype=torch.float32), torch.tensor(labels[inside], dtype=torch.int64))
