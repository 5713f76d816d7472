"""Properties of the zoom-in window planning and stitching (hypothesis).

For random crop / ROI shapes and window sizes (smaller than the window on some axes, exact
multiples, off by one):
* the official sliding-window grid (padded frame) and the fast mode's global grid (crop frame)
  cover every voxel, never leave the zero-padded volume, and are the same grid;
* `windows_for_roi` picks exactly the grid windows that meet the ROI, and together they cover it;
* the row-by-row `Stitch` gives the same sums, coverage counts, means and masks as a plain
  full-size accumulator written here, walking the windows in either direction, with at most one
  window depth of rows alive;
* `sliding_window_average` (exact mode) equals the same plain accumulator in the padded frame.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from segevol_fast.geometry.grid_windows import window_origin, windows_for_roi
from segevol_fast.geometry.sliding_window import (
    global_grid,
    pad_widths,
    padded_size,
    scan_interval,
    sliding_window_average,
    window_slices,
    window_starts,
)
from segevol_fast.inference.stitch import Stitch

pytestmark = pytest.mark.usefixtures("one_thread")


@st.composite
def axis_sizes(draw, max_window: int = 12, max_multiple: int = 4):
    """(n, r) for one axis: n smaller than r, a multiple of r, off by one from one, or anything."""
    r = draw(st.integers(1, max_window))
    how = draw(st.sampled_from(["smaller", "multiple", "off_by_one", "any"]))
    if how == "smaller":
        n = draw(st.integers(1, r))
    elif how == "any":
        n = draw(st.integers(1, r * max_multiple + 3))
    else:
        n = r * draw(st.integers(1, max_multiple))
        if how == "off_by_one":
            n = max(1, n + draw(st.sampled_from([-1, 1])))
    return n, r


@st.composite
def crops_and_windows(draw, **kw):
    pairs = [draw(axis_sizes(**kw)) for _ in range(3)]
    return tuple(n for n, _ in pairs), tuple(r for _, r in pairs)


@st.composite
def rois(draw, shape):
    """An inclusive box [lo, hi] inside a crop of `shape`."""
    lo, hi = [], []
    for n in shape:
        a = draw(st.integers(0, n - 1))
        lo.append(a)
        hi.append(draw(st.integers(a, n - 1)))
    return tuple(lo), tuple(hi)


def _covers(starts, r, a, b):
    """Per voxel a..b (inclusive) of one axis: how many windows [s, s + r) contain it."""
    x = np.arange(a, b + 1)
    return sum(((x >= s) & (x < s + r)).astype(np.int64) for s in starts)


@given(crops_and_windows())
def test_the_official_grid_covers_the_padded_volume_and_stays_inside_it(shape_window):
    shape, window = shape_window
    size = padded_size(shape, window)
    starts = window_starts(shape, window)
    slices = window_slices(shape, window)
    assert len(starts) == len(slices) == len(set(starts))
    assert starts == sorted(starts)  # MONAI order: first axis slowest
    count = np.zeros(size, np.int64)
    for sl in slices:
        assert all(0 <= s.start and s.stop <= n and s.stop - s.start == r for s, n, r in zip(sl, size, window))
        count[sl] += 1
    assert (count >= 1).all()  # every voxel of the padded volume, hence of the image, is covered
    # neighbours overlap by at least half a window (or the window covers the axis exactly)
    for axis, (n, r, step) in enumerate(zip(size, window, scan_interval(shape, window))):
        per_axis = sorted({st[axis] for st in starts})
        assert per_axis[0] == 0 and per_axis[-1] == n - r
        assert all(0 < b - a <= step for a, b in zip(per_axis, per_axis[1:]))
        assert step == r if n == r else step == max(1, r // 2)


@given(crops_and_windows())
def test_the_global_grid_is_the_official_grid_in_the_crop_frame(shape_window):
    shape, window = shape_window
    grid = global_grid(shape, window)
    pads = pad_widths(shape, window)
    ours = list(itertools.product(*grid))
    assert ours == [tuple(s - p for s, (p, _) in zip(st, pads)) for st in window_starts(shape, window)]
    for starts, n, r, (before, after) in zip(grid, shape, window, pads):
        # never outside the zero-padded crop; exactly inside it where the crop is at least a window
        assert all(-before <= s and s + r <= n + after for s in starts)
        if n >= r:
            assert before == after == 0 and all(0 <= s and s + r <= n for s in starts)
        assert (_covers(starts, r, 0, n - 1) >= 1).all()


@given(crops_and_windows(), st.data())
def test_windows_for_roi_are_exactly_the_grid_windows_meeting_it(shape_window, data):
    shape, window = shape_window
    lo, hi = data.draw(rois(shape))
    grid = global_grid(shape, window)
    picked = windows_for_roi(grid, window, lo, hi)
    assert picked == sorted(picked)  # raster order, D slowest
    everything = itertools.product(*[range(len(g)) for g in grid])
    meets = [
        w
        for w in everything
        if all(grid[a][w[a]] <= hi[a] and grid[a][w[a]] + window[a] - 1 >= lo[a] for a in range(3))
    ]
    assert picked == meets
    # together they cover every ROI voxel
    roi_shape = tuple(b - a + 1 for a, b in zip(lo, hi))
    count = np.zeros(roi_shape, np.int64)
    for w in picked:
        o = [grid[a][w[a]] for a in range(3)]
        sl = tuple(slice(max(o[a], lo[a]) - lo[a], min(o[a] + window[a], hi[a] + 1) - lo[a]) for a in range(3))
        count[sl] += 1
    assert (count >= 1).all()


def _window_outputs_and_coarse(shape, window, n, seed):
    """n random window outputs, and a random coarse mask and logits for the crop, from seed."""
    gen = torch.Generator().manual_seed(seed)
    outs = [torch.randn(window, generator=gen) for _ in range(n)]
    return outs, torch.rand(shape, generator=gen) > 0.5, torch.randn(shape, generator=gen)


def _plain_stitch(shape, window, lo, hi, origins, outs):
    """The reference: full-size sum and count over the crop, windows added in the given order."""
    acc = torch.zeros(shape, dtype=torch.float32)
    cnt = torch.zeros(shape, dtype=torch.float32)
    for o, out in zip(origins, outs):
        a = [max(low, x) for low, x in zip(lo, o)]
        b = [min(h + 1, x + r) for h, x, r in zip(hi, o, window)]
        dst = tuple(slice(x, y) for x, y in zip(a, b))
        src = tuple(slice(x - oo, y - oo) for x, y, oo in zip(a, b, o))
        acc[dst] += out[src]
        cnt[dst] += 1
    return acc, cnt


@given(crops_and_windows(max_window=10, max_multiple=3), st.booleans(), st.integers(0, 2**31 - 1), st.data())
def test_row_by_row_stitching_equals_a_full_size_accumulator(shape_window, reverse, seed, data):
    shape, window = shape_window
    lo, hi = data.draw(rois(shape))
    grid = global_grid(shape, window)
    picked = windows_for_roi(grid, window, lo, hi)
    if reverse:  # the zoom-in walks alternate prompt groups backwards (cache reuse)
        picked = picked[::-1]
    origins = [window_origin(grid, w) for w in picked]
    outs, coarse_mask, coarse_logits = _window_outputs_and_coarse(shape, window, len(origins), seed)
    mask, logits = coarse_mask.clone(), coarse_logits.clone()
    stitch = Stitch((lo, hi), origins, window, grid, mask, logits, torch.float32, torch.device("cpu"))
    alive = 0
    for o, out in zip(origins, outs):
        stitch.add(out, o)
        alive = max(alive, len(stitch.rows))
    mask, logits, roi_box = stitch.result()
    assert roi_box == (lo, hi)
    assert alive <= window[0]  # at most one window depth of row sums at any time

    acc, cnt = _plain_stitch(shape, window, lo, hi, origins, outs)
    roi = tuple(slice(a, b + 1) for a, b in zip(lo, hi))
    # the coverage each voxel is divided by is the number of windows that added to it
    expected_cnt = torch.from_numpy(
        np.einsum("i,j,k->ijk", *[_covers(g, r, a, b).astype(np.float32) for g, r, a, b in zip(grid, window, lo, hi)])
    )
    assert torch.equal(cnt[roi], expected_cnt)
    assert torch.equal(mask[roi], acc[roi] > 0)
    assert torch.equal(logits[roi], acc[roi] / cnt[roi])  # same order of additions: bit-identical
    outside = torch.ones(shape, dtype=torch.bool)
    outside[roi] = False
    assert torch.equal(mask[outside], coarse_mask[outside])  # the coarse result is kept there
    assert torch.equal(logits[outside], coarse_logits[outside])


@given(crops_and_windows(max_window=10, max_multiple=3), st.integers(0, 2**31 - 1))
def test_exact_mode_sliding_window_average_equals_a_plain_accumulator(shape_window, seed):
    shape, window = shape_window
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn((1, 1) + shape, generator=gen)
    # predict: a fixed random per-window field plus the window itself, so both content and
    # position of every window reach the result
    fields = {}

    def predict(win, index, sl):
        fields[index] = torch.randn(window, generator=gen)
        return win + fields[index]

    got = sliding_window_average(image, window, predict)
    size = padded_size(shape, window)
    pads = pad_widths(shape, window)
    padded = torch.zeros((1, 1) + size)
    padded[(0, 0) + tuple(slice(b, b + n) for (b, _), n in zip(pads, shape))] = image[0, 0]
    acc, cnt = torch.zeros(size), torch.zeros(size)
    for i, sl in enumerate(window_slices(shape, window)):
        acc[sl] += padded[(0, 0) + sl] + fields[i]
        cnt[sl] += 1
    want = (acc / cnt)[tuple(slice(b, b + n) for (b, _), n in zip(pads, shape))]
    assert got.shape == (1, 1) + shape
    assert torch.equal(got[0, 0], want)


@given(
    crops_and_windows(max_window=10, max_multiple=3),
    st.sampled_from([0.0, 0.25, 0.5, 0.75]),
    st.integers(0, 2**31 - 1),
    st.data(),
)
def test_partial_stitching_averages_the_windows_added_and_keeps_the_coarse_result_elsewhere(
    shape_window, overlap, seed, data
):
    """Fast mode's skipped windows: any subset of the ROI's windows on a grid of any overlap."""
    shape, window = shape_window
    lo, hi = data.draw(rois(shape))
    grid = global_grid(shape, window, overlap)
    picked = windows_for_roi(grid, window, lo, hi)
    kept = [w for w in picked if data.draw(st.booleans())]
    origins = [window_origin(grid, w) for w in kept]
    outs, coarse_mask, coarse_logits = _window_outputs_and_coarse(shape, window, len(origins), seed)
    mask, logits = coarse_mask.clone(), coarse_logits.clone()
    stitch = Stitch((lo, hi), origins, window, grid, mask, logits, torch.float32, torch.device("cpu"), partial=True)
    for o, out in zip(origins, outs):
        stitch.add(out, o)
    mask, logits, _ = stitch.result()

    acc, cnt = _plain_stitch(shape, window, lo, hi, origins, outs)
    reached = cnt > 0
    assert torch.equal(mask[reached], acc[reached] > 0)
    assert torch.equal(logits[reached], acc[reached] / cnt[reached])
    assert torch.equal(mask[~reached], coarse_mask[~reached])
    assert torch.equal(logits[~reached], coarse_logits[~reached])
