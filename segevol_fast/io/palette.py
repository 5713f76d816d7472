"""Organ colours, shared by the preview PNGs (`io.preview`) and the napari viewer, so that the
n-th organ of a result has the same colour in both."""

from __future__ import annotations

import colorsys

# distinguishable on grey CT: red, green, blue, yellow, magenta, cyan, orange, purple, lime, pink
PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (255, 225, 25),
    (240, 50, 230),
    (70, 240, 240),
    (245, 130, 48),
    (145, 30, 180),
    (210, 245, 60),
    (250, 190, 212),
]
_GOLDEN = 0.618033988749895  # hue step: consecutive organs land far apart on the colour wheel


def organ_rgb(position: int) -> tuple[int, int, int]:
    """The colour (0..255 RGB) of the organ at `position` (0 = first) in a result or a session:
    the ten PALETTE colours first, then hues stepped by the golden ratio with alternating
    saturation, which never repeat (a 15-organ result gets 15 colours)."""
    if position < 0:
        raise ValueError(f"an organ's position is >= 0, got {position}")
    if position < len(PALETTE):
        return PALETTE[position]
    hue = (position * _GOLDEN) % 1.0
    saturation = 0.85 if position % 2 else 0.55
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)
