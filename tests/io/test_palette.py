"""One organ, one colour: the n-th mask of a preview PNG and organ id n + 1 in the viewer agree,
and a result with more organs than the palette holds still gets a distinct colour for each."""

from __future__ import annotations

import numpy as np
import pytest

from segevol_fast.io.palette import PALETTE, organ_rgb
from segevol_fast.io.preview import LEGEND_ROW_PX, PAD_PX, render_montage
from segevol_fast.viewer.labels import label_color


def test_viewer_ids_take_the_preview_colours():
    for position in range(30):
        rgba = label_color(position + 1)
        assert rgba[3] == 1.0
        assert tuple(round(v * 255) for v in rgba[:3]) == organ_rgb(position)


def test_colours_never_repeat_past_the_palette():
    colours = [organ_rgb(i) for i in range(40)]
    assert colours[: len(PALETTE)] == PALETTE
    assert len(set(colours)) == 40 and all(0 <= v <= 255 for c in colours for v in c)
    with pytest.raises(ValueError):
        organ_rgb(-1)


def test_the_preview_legend_draws_each_organ_in_its_colour():
    shape = (12, 10, 3)
    masks = {}
    for i in range(12):  # twelve organs: two more than the palette's ten colours
        m = np.zeros(shape, dtype=bool)
        m[i, :, 1] = True
        masks[f"organ{i}"] = m
    image = np.asarray(render_montage(np.zeros(shape, np.float32), masks, (1.0, 1.0, 1.0), n_slices=1))
    legend_top = image.shape[0] - 12 * LEGEND_ROW_PX - PAD_PX  # legend rows fill the bottom
    swatches = [tuple(int(v) for v in image[legend_top + i * LEGEND_ROW_PX + 9, PAD_PX + 6]) for i in range(12)]
    assert swatches == [organ_rgb(i) for i in range(12)]
