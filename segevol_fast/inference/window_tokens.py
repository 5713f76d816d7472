"""Encode only the tokens of a zoom-in window that hold image, and fill in the rest.

A fast-mode window (config.spatial_size, officially 32×256×256 = 8×16×16 tokens) is zero padding
wherever the crop is shorter than the window on an axis (`sliding_window.global_grid` starts it
before the crop there). On a 120×126×164 crop three quarters of its 2048 tokens hold no image, yet
the full pass runs them all through the encoder. The image part of a window is a box, so the
tokens that touch it are a box of the token grid too: `token_box` finds it (grown by `margin`
tokens of padding a side, clamped to the grid), `read_boxes` reads its voxels, the encoder runs
on those tokens only (`SegVolNetwork.encode_image_tokens`), and the embedding is made whole again
for the decoder by one of the `FILLS`:

* "zeros": the missing tokens are 0.
* "edge": each missing token copies the nearest encoded one (replicate padding of the token grid);
  with margin >= 1 the copied tokens are themselves padding tokens, as the missing ones are.
* "mean": each missing token is the mean of the encoded tokens that hold no image (the margin);
  with no such token (margin 0, or a box with no padding in it) it falls back to "edge".
* "summary", "summary_fine", "summary1": the padding left out is not dropped from the attention.
  The grid is cut into cells of 2x4x4 / 1x2x2 tokens (one cell: the whole grid); the padding
  tokens of each cell are represented in the encoder by one summary token weighted by their count
  (`ImageEncoder.encode_box`'s padding_groups), and each missing token takes its cell's summary
  output. At most 64 / 512 / 1 tokens more than the box.

Without summaries the padding tokens' share of the image tokens' attention is lost (with random
weights, where attention is near uniform, it is most of it); with them it is approximated. With
the box equal to the whole grid the result is the full-window encoding bit for bit, and bench/
window_tokens_study.py measures the difference for margins 0..2.

Encoder-level adapters (`beside_patch_embed`, `after_encoder`) read the whole window; under them
`encode_window_tokens` encodes whole windows (`ImageEncoder.token_boxes_supported`).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..crop import CropReader
from ..errors import InvalidArgumentError, ShapeError
from ..model.network import model_device

Triple = tuple[int, int, int]
FILLS = ("zeros", "edge", "mean", "summary", "summary_fine", "summary1")
# The default: summary tokens per 1x2x2 cell, no margin. On the full-size model with smooth
# position embeddings (bench/window_tokens_study.py) it keeps the mask Dice at 0.999 of the full
# window's for ~0.47 of its encoder time; "summary" (2x4x4 cells) 0.994 at ~0.33; margins buy less
# than finer cells; zeros / edge / mean lose 0.2 of the Dice at margin 0 and 0.05 at margin 2.
DEFAULT_MARGIN, DEFAULT_FILL = 0, "summary_fine"
# summary fill -> the cells (token boxes) whose padding one summary token stands for; None: all of it
SUMMARY_FILLS = {"summary": (2, 4, 4), "summary_fine": (1, 2, 2), "summary1": None}


def token_box(
    crop_shape: Sequence[int], origin: Sequence[int], window: Sequence[int], patch: Sequence[int], margin: int = 0
) -> tuple[Triple, Triple]:
    """The box [lo, hi) of the window's token grid whose patches touch the crop, grown by
    `margin` tokens a side and clamped to the grid.

    Args:
        crop_shape: (D', H', W') of the crop.
        origin: the window's start corner in the crop frame (negative where it starts in the
            zero padding before the crop).
        window: the window size, a whole number of patches per axis.
        patch: the patch size.
        margin: tokens of padding kept around the image per side (>= 0).
    """
    if margin < 0:
        raise InvalidArgumentError(f"margin must be >= 0, got {margin}")
    lo, hi = [], []
    for n, o, r, p in zip(crop_shape, origin, window, patch):
        if r % p:
            raise ShapeError(f"window {tuple(window)} is not a whole number of patches {tuple(patch)}")
        first, end = max(0, -o), min(r, n - o)  # the window voxels that hold image, [first, end)
        if end <= first:
            raise ShapeError(f"window at {tuple(origin)} of size {tuple(window)} misses the crop {tuple(crop_shape)}")
        lo.append(max(0, first // p - margin))
        hi.append(min(r // p, -(-end // p) + margin))
    return tuple(lo), tuple(hi)


def encoded_tokens(
    crop_shape: Sequence[int],
    origin: Sequence[int],
    window: Sequence[int],
    patch: Sequence[int],
    margin: int = 0,
    fill: Optional[str] = None,
) -> int:
    """How many tokens the encoder runs for this window: the size of its `token_box`, plus the
    summary tokens of a summary fill (one per cell holding padding left out)."""
    lo, hi = token_box(crop_shape, origin, window, patch, margin)
    box = math.prod(b - a for a, b in zip(lo, hi))
    if fill not in SUMMARY_FILLS:
        return box
    grid = [r // p for r, p in zip(window, patch)]
    return box + len(padding_groups(lo, hi, grid, SUMMARY_FILLS[fill])[0])


def read_boxes(crop: CropReader, starts: Sequence[Sequence[int]], size: Sequence[int]) -> Tensor:
    """Boxes (B, 1, *size) float32 read from the crop at crop-frame `starts`, zero outside it
    (MONAI's padding), on the crop's device."""
    out = torch.zeros((len(starts), 1, *size), dtype=torch.float32, device=crop.device)
    for b, s in enumerate(starts):
        lo = [min(max(0, x), n) for x, n in zip(s, crop.shape)]
        hi = [max(min(n, x + r), a) for n, x, r, a in zip(crop.shape, s, size, lo)]
        if all(c > a for a, c in zip(lo, hi)):
            out[(b, 0) + tuple(slice(a - x, c - x) for a, c, x in zip(lo, hi, s))] = crop.block(lo, hi)
    return out


def fill_grid(
    box: Tensor, lo: Sequence[int], grid: Sequence[int], fill: str = "edge", image: Optional[tuple] = None
) -> Tensor:
    """Place a box embedding (B, C, bd, bh, bw) at token `lo` of a (B, C, *grid) embedding and fill
    the tokens outside it (module docstring). `image` is the (lo, hi) token box holding image
    (margin 0), which "mean" needs to tell margin tokens from image tokens."""
    if fill not in FILLS or fill in SUMMARY_FILLS:
        raise InvalidArgumentError(f"fill must be one of {FILLS[:3]} (summaries: fill_summaries), got {fill!r}")
    size = box.shape[2:]
    if fill == "mean" and image is not None:
        margin = torch.ones(size, dtype=torch.bool, device=box.device)
        margin[tuple(slice(a - o, b - o) for a, b, o in zip(*image, lo))] = False
        if bool(margin.any()):
            mean = box[..., margin].mean(-1)[..., None, None, None]
            return _placed(box, lo, mean.expand(*box.shape[:2], *grid).clone())
    if fill == "zeros":
        return _placed(box, lo, box.new_zeros((*box.shape[:2], *grid)))
    # edge (and mean without margin tokens): grid index i reads box index clamp(i - lo, 0, n - 1)
    for axis, (o, n, g) in enumerate(zip(lo, size, grid)):
        idx = (torch.arange(g, device=box.device) - o).clamp_(0, n - 1)
        box = box.index_select(2 + axis, idx)
    return box


def padding_groups(lo: Sequence[int], hi: Sequence[int], grid: Sequence[int], cell: Optional[Sequence[int]] = None):
    """Groups of the grid tokens outside the box [lo, hi): those of each cell of a regular
    partition of the grid into `cell`-sized token boxes (default: one cell, the whole grid), empty
    cells dropped. Returns (groups (K, N) float 0 / 1 over the N = prod(grid) tokens in raster
    order, owner (N,) int64: each token's group, -1 inside the box); K = 0 for a whole-grid box."""
    cell = tuple(grid if cell is None else cell)
    index = torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")
    inside = torch.ones(tuple(grid), dtype=torch.bool)
    cells = torch.zeros(tuple(grid), dtype=torch.int64)
    for i, a, b, c, g in zip(index, lo, hi, cell, grid):
        inside &= (i >= a) & (i < b)
        cells = cells * -(-g // c) + i // c
    cells = cells.flatten().masked_fill(inside.flatten(), -1)
    used, owner = torch.unique(cells, return_inverse=True)  # sorted: -1 (the box) first when present
    owner -= int(used[0] < 0)
    groups = torch.stack([owner == k for k in range(int((used >= 0).sum()))]) if bool((used >= 0).any()) else None
    return (torch.zeros(0, owner.numel()) if groups is None else groups.float()), owner


def fill_summaries(box: Tensor, lo: Sequence[int], grid: Sequence[int], summaries: Tensor, owner: Tensor) -> Tensor:
    """A box embedding (B, C, *box) placed at token `lo` of a (B, C, *grid) embedding whose other
    tokens are each the summary output (B, C, K) of its group (`owner`, from `padding_groups`)."""
    if summaries.shape[-1] == 0:  # the box is the whole grid
        return box
    out = summaries[:, :, owner.clamp(min=0).to(summaries.device)]  # (B, C, N); the box overwritten below
    return _placed(box, lo, out.reshape(*box.shape[:2], *grid))


def _placed(box: Tensor, lo: Sequence[int], out: Tensor) -> Tensor:
    """out (B, C, *grid), a tensor of the caller's own, with the box embedding (B, C, *box)
    written at token `lo`."""
    out[(slice(None), slice(None)) + tuple(slice(o, o + n) for o, n in zip(lo, box.shape[2:]))] = box
    return out


def encode_window_tokens(
    model,
    crop: CropReader,
    origins: Sequence[Sequence[int]],
    window: Optional[Sequence[int]] = None,
    margin: int = DEFAULT_MARGIN,
    fill: str = DEFAULT_FILL,
    batch: Optional[int] = None,
) -> list[Tensor]:
    """Embeddings (1, hidden, *grid) of the windows at `origins`, each encoded over its token box
    only and filled to the whole grid.

    Args:
        model: a `SegVolNetwork` (or `SegVol`) on its device.
        crop: the crop the windows read (`CropReader`; zero outside it).
        origins: crop-frame start corners, e.g. `grid_windows.window_origin` of global-grid windows.
        window: the window size; default config.spatial_size.
        margin: tokens of padding kept around the image per side (see `token_box`).
        fill: how the tokens outside the box are filled, one of `FILLS` (module docstring).
        batch: at most this many windows per encoder call (default: all that share a box size,
            or for the summary fills the same box: fast mode's global-grid windows all do).

    Windows in one encoder call each get their own position embeddings. Under an encoder-level
    adapter every window is encoded whole (`ImageEncoder.token_boxes_supported`).
    """
    cfg = model.config
    window = tuple(cfg.spatial_size if window is None else window)
    if fill not in FILLS:
        raise InvalidArgumentError(f"fill must be one of {FILLS}, got {fill!r}")
    patch, grid = tuple(cfg.patch_size), tuple(w // p for w, p in zip(window, cfg.patch_size))
    whole = not model.image_encoder.token_boxes_supported
    boxes = [((0, 0, 0), grid) if whole else token_box(crop.shape, o, window, patch, margin) for o in origins]
    summary = fill in SUMMARY_FILLS and not whole
    calls: dict[tuple, list[int]] = {}
    for i, (lo, hi) in enumerate(boxes):
        calls.setdefault((lo, hi) if summary else tuple(b - a for a, b in zip(lo, hi)), []).append(i)
    device, out = model_device(model), [None] * len(origins)
    for members in calls.values():
        step = batch or len(members)
        for start in range(0, len(members), step):
            part = members[start : start + step]
            parts = [origins[i] for i in part], [boxes[i] for i in part]
            for i, emb in zip(part, _encode_part(model, crop, *parts, window, fill if summary else None, device)):
                if summary or tuple(emb.shape[2:]) == grid:
                    out[i] = emb
                else:
                    image = token_box(crop.shape, origins[i], window, patch, 0)
                    out[i] = fill_grid(emb, boxes[i][0], grid, fill, image)
    return out  # type: ignore[return-value]


def _encode_part(model, crop, origins, boxes, window, summary, device) -> list[Tensor]:
    """One encoder call over windows whose boxes have one size (one box with a summary fill):
    the (1, hidden, *box) encodings, or for a summary fill the filled (1, hidden, *grid) ones."""
    cfg = model.config
    patch, grid = cfg.patch_size, tuple(w // p for w, p in zip(window, cfg.patch_size))
    size = [b - a for a, b in zip(*boxes[0])]
    starts = [tuple(o + a * p for o, a, p in zip(origin, lo, patch)) for origin, (lo, _) in zip(origins, boxes)]
    x = read_boxes(crop, starts, [n * p for n, p in zip(size, patch)]).to(device)
    if size == list(grid) and not model.image_encoder.token_boxes_supported:
        emb = model.encode_image(x)
    elif summary is None:
        emb = model.encode_image_tokens(x, [lo for lo, _ in boxes], [hi for _, hi in boxes])
    else:
        lo, hi = boxes[0]
        groups, owner = padding_groups(lo, hi, grid, SUMMARY_FILLS[summary])
        if len(groups) == 0:
            emb = model.encode_image_tokens(x, lo, hi)
        else:
            box, summaries = model.encode_image_tokens(x, lo, hi, padding_groups=groups[None])
            emb = fill_summaries(box, lo, grid, summaries, owner)
    return [emb[j : j + 1] for j in range(len(origins))]
