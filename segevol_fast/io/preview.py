"""The preview montage: axial slices of a scan with its masks as coloured overlays, drawn with numpy
and Pillow (`SegmentationResult.preview` writes it as a PNG).

Layout: up to MAX_COLS tiles a row, PAD_PX between tiles and around the montage, each tile's longer
side TILE_PX with the in-plane spacing's aspect, one LEGEND_ROW_PX line per mask below the tiles in
the mask's colour (`io.palette`), and, for results of random weights, a red banner (BANNER_PX high)
on top saying the masks are meaningless. The sizes are public so callers and tests can predict the
image.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import MissingDependencyError
from .palette import organ_rgb

# preview layout (pixels); public so callers and tests can predict the PNG size
TILE_PX = 256  # longer side of one slice tile
PAD_PX = 4  # gap between tiles and around the montage
LEGEND_ROW_PX = 18  # height of one legend line
MAX_COLS = 3
OVERLAY_ALPHA = 0.45
BANNER_PX = 20  # height of the red "random weights" banner on top of a preview (only then)
BANNER_TEXT = "RANDOM WEIGHTS - MASKS ARE MEANINGLESS"
BANNER_RGB = (200, 0, 0)


def _pick_slices(masks: dict[str, np.ndarray], depth: int, n: int) -> list[int]:
    """Up to n distinct k indices spread evenly over the slices where any mask is set
    (over the whole depth when every mask is empty)."""
    any_k = np.zeros(depth, dtype=bool)
    for m in masks.values():
        any_k |= m.any(axis=(0, 1))
    ks = np.flatnonzero(any_k)
    lo, hi = (int(ks[0]), int(ks[-1])) if ks.size else (0, depth - 1)
    return sorted({int(round(v)) for v in np.linspace(lo, hi, max(1, int(n)))})


def _window(arr: np.ndarray) -> tuple[float, float]:
    """0.5 / 99.5 percentiles of the volume; strided so a 512×512×300 CT costs milliseconds."""
    step = max(1, int(np.ceil((arr.size / 4_000_000) ** (1 / 3))))
    lo, hi = np.percentile(arr[::step, ::step, ::step], [0.5, 99.5])
    return float(lo), float(hi) if hi > lo else float(lo) + 1.0


def _outline(m: np.ndarray) -> np.ndarray:
    """Pixels of a 2-D mask with a 4-neighbour outside it: drawn opaque so small masks show."""
    pad = np.pad(m, 1)
    inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    return m & ~inner


def _tile_size(shape_xy: tuple[int, int], spacing: tuple[float, ...]) -> tuple[int, int]:
    """(width, height) px of one tile: physical aspect, longer side TILE_PX."""
    w_mm, h_mm = shape_xy[0] * spacing[0], shape_xy[1] * spacing[1]
    s = TILE_PX / max(w_mm, h_mm)
    return max(1, int(round(w_mm * s))), max(1, int(round(h_mm * s)))


def render_montage(arr, masks: dict[str, np.ndarray], spacing, n_slices: int, banner: Optional[str] = None):
    """PIL RGB image: an optional red banner, the slice tiles in a grid, then one legend line per mask.

    arr: the (X, Y, Z) background on the masks' grid (windowed to its 0.5 / 99.5 percentiles), or
    None for black; masks: {label: bool (X, Y, Z)}, at least one; spacing: mm along X, Y, Z.
    Tiles show i to the right and j upwards, one for each of up to `n_slices` distinct axial slices
    (the 3rd axis) through the masks' extent.
    """
    try:
        from PIL import Image, ImageDraw
    except ImportError as exc:
        raise MissingDependencyError("preview images need Pillow: pip install pillow") from exc
    shape = next(iter(masks.values())).shape
    ks = _pick_slices(masks, shape[2], n_slices)
    tw, th = _tile_size(shape[:2], spacing)
    cols = min(len(ks), MAX_COLS)
    rows = -(-len(ks) // cols)
    width = cols * tw + (cols + 1) * PAD_PX
    top = BANNER_PX if banner else 0
    height = top + rows * th + (rows + 1) * PAD_PX + len(masks) * LEGEND_ROW_PX + PAD_PX
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    if banner:
        draw = ImageDraw.Draw(canvas)
        draw.rectangle([0, 0, width - 1, BANNER_PX - 1], fill=BANNER_RGB)
        draw.text((PAD_PX, 4), banner, fill=(255, 255, 255))
    lo, hi = _window(arr) if arr is not None else (0.0, 1.0)
    for idx, k in enumerate(ks):
        if arr is None:
            grey = np.zeros(shape[:2], dtype=np.float32)
        else:
            grey = np.clip((arr[:, :, k].astype(np.float32) - lo) / (hi - lo), 0, 1) * 255
        rgb = np.repeat(grey[..., None], 3, axis=2)
        for c, m in enumerate(masks.values()):
            colour = np.asarray(organ_rgb(c), dtype=np.float32)
            sl = m[:, :, k]
            rgb[sl] = (1 - OVERLAY_ALPHA) * rgb[sl] + OVERLAY_ALPHA * colour
            rgb[_outline(sl)] = colour
        # (X, Y) -> image rows = j flipped (j up), columns = i
        img = Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 0, 2)[::-1]).astype(np.uint8), "RGB")
        img = img.resize((tw, th), Image.Resampling.NEAREST)  # keep voxel edges crisp
        x0 = PAD_PX + (idx % cols) * (tw + PAD_PX)
        y0 = top + PAD_PX + (idx // cols) * (th + PAD_PX)
        canvas.paste(img, (x0, y0))
        ImageDraw.Draw(canvas).text((x0 + 3, y0 + 2), f"k={k}", fill=(255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = top + rows * th + (rows + 1) * PAD_PX
    for c, label in enumerate(masks):
        colour = organ_rgb(c)
        draw.rectangle([PAD_PX, y + 3, PAD_PX + 12, y + 15], fill=colour)
        draw.text((PAD_PX + 18, y + 3), str(label), fill=(255, 255, 255))
        y += LEGEND_ROW_PX
    return canvas
