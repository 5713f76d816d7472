"""mode="exact": MONAI window arithmetic, and run_exact against the independent literal re-run
(bench/official_rerun.py) on a tiny random model, quirks included (docs/official-pipeline.md §5.3–5.4, §11.8–11.10).

Random tiny weights give tiny logits (|x| < 0.1), so most tests add a fixed "blob" to every decode
output: a ball of positive logits centred in the decoded frame. That makes the zoom-in take a
chosen path (one window, several windows, nothing) while the network still moves the boundary.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.official_rerun import load_real_ct, official_rerun, real_ct_prompts
from segevol_fast import SegVol, SegVolConfig
from segevol_fast.errors import PromptError, ZoomInWarning
from segevol_fast.geometry.prompt_frames import box_to_zoom_out, generate_box, points_to_zoom_out
from segevol_fast.geometry.sliding_window import pad_widths, sliding_window_average, window_starts
from segevol_fast.inference.exact import roi_from_logits, run_exact
from segevol_fast.inference.prompts import Prompt
from segevol_fast.preprocess import preprocess, resize_logits_back, zoom_out_resize

ROI = (8, 32, 32)  # SegVolConfig.tiny().spatial_size
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- helpers
def _model(tokenizer=None) -> SegVol:
    return SegVol(SegVolConfig.tiny(), tokenizer=tokenizer).eval()


@pytest.fixture
def text_model(data_dir):
    return _model(data_dir / "clip_tokenizer")


def _with_blob(model: SegVol, radius: float, record: list | None = None) -> SegVol:
    """Make decode return raw + 4 * (radius - distance from the frame centre, in [-1, 1] units)."""
    raw = model.decode

    def decode(emb, text_embedding=None, boxes=None, points=None, upsample=True):
        if record is not None:
            record.append(
                (
                    None if boxes is None else boxes.clone(),
                    None if points is None else (points[0].clone(), points[1].clone()),
                )
            )
        out = raw(emb, text_embedding=text_embedding, boxes=boxes, points=points, upsample=upsample)
        axes = [(torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1 for n in out.shape[2:]]
        d, h, w = torch.meshgrid(*axes, indexing="ij")
        return out + 4.0 * (radius - torch.sqrt(d * d + h * h + w * w))

    model.decode = decode
    return model


def _synthetic(shape_xyz=(40, 36, 12), seed=0):
    """A noisy volume with a bright ellipsoid -> Preprocessed (the crop is nearly all of it)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 20, size=shape_xyz).astype(np.float32) + 100
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_xyz], indexing="ij")
    x[(g[0] ** 2 + g[1] ** 2 + g[2] ** 2) < 0.4] += 300
    return preprocess(x)


def _prompts(crop_shape, text=True):
    D, H, W = crop_shape
    out = [
        Prompt("box", box=np.array([D * 0.3, H * 0.25, W * 0.2, D * 0.7, H * 0.6, W * 0.75])),
        Prompt(
            "points",
            points=np.array([[D // 2, H // 2, W // 2], [D // 3, H // 2 + 3, W // 2 - 4], [1.0, 2.0, 3.0]]),
            point_labels=np.array([1, 1, 0]),
        ),
    ]
    if text:
        out += [
            Prompt("text", text="liver"),
            Prompt("text+box", text="spleen", box=np.array([1.0, 2.0, 3.0, D - 2.0, H / 2, W - 5.0])),
        ]
    return out


def _assert_same(model, prep, prompts, seed, **kw):
    got = run_exact(model, prep, prompts, seed=seed, **kw)
    for p, g in zip(prompts, got):
        ref = official_rerun(model, prep, p, "ct", seed, **kw)
        assert g.dtype == torch.float32 and g.shape == prep.crop_shape
        assert torch.equal(g > 0, ref > 0), p.label
        assert torch.equal(g, ref), (p.label, float((g - ref).abs().max()))
    return got


# ---------------------------------------------------------------------------- window arithmetic
@pytest.mark.parametrize(
    "size", [(8, 32, 32), (5, 20, 31), (9, 33, 47), (31, 96, 121), (16, 64, 64), (17, 200, 255), (1, 1, 1), (8, 100, 7)]
)
@pytest.mark.parametrize("roi", [(8, 32, 32), (3, 7, 5)])
def test_window_starts_match_monai_dense_patch_slices(size, roi):
    utils = pytest.importorskip("monai.data.utils")
    inferers = pytest.importorskip("monai.inferers.utils")
    padded = tuple(max(n, r) for n, r in zip(size, roi))
    interval = inferers._get_scan_interval(padded, roi, 3, (0.5,) * 3)
    monai_starts = [tuple(s.start for s in sl) for sl in utils.dense_patch_slices(padded, roi, interval)]
    assert window_starts(size, roi, 0.5) == monai_starts


def test_pad_widths_put_the_odd_voxel_after():
    assert pad_widths((5, 32, 33), ROI) == ((1, 2), (0, 0), (0, 0))
    assert pad_widths((2, 29, 1), ROI) == ((3, 3), (1, 2), (15, 16))


def test_sliding_window_average_is_a_plain_mean():
    img = torch.rand(1, 1, 11, 40, 37)
    # identity predictor: the average of copies is the image (to rounding), padding cropped away
    same = sliding_window_average(img, ROI, lambda w, i, sl: w)
    torch.testing.assert_close(same, img, rtol=1e-6, atol=0)
    # window index as output: each voxel gets the mean of the indices covering it
    got = sliding_window_average(img, ROI, lambda w, i, sl: torch.full_like(w, float(i)))
    acc, cnt = torch.zeros(11, 40, 37), torch.zeros(11, 40, 37)
    for i, st in enumerate(window_starts((11, 40, 37), ROI)):
        sl = tuple(slice(s, s + r) for s, r in zip(st, ROI))
        acc[sl] += i
        cnt[sl] += 1
    assert torch.equal(got[0, 0], acc / cnt)


# ---------------------------------------------------------------------------- prompt mapping
def test_box_to_zoom_out_equals_literal_label_resize():
    rng = np.random.default_rng(0)
    for _ in range(30):
        crop = tuple(int(v) for v in rng.integers(3, 90, size=3))
        size = tuple(int(v) for v in rng.integers(4, 70, size=3))
        lo = rng.uniform(-1, np.array(crop) - 1)
        box = np.concatenate([lo, lo + rng.uniform(0, np.array(crop) / 2)])
        cube = torch.zeros(crop)
        a = np.clip(np.floor(box[:3] + 0.5).astype(int), 0, np.array(crop) - 1)
        b = np.clip(np.floor(box[3:] + 0.5).astype(int), 0, np.array(crop) - 1)
        cube[a[0] : b[0] + 1, a[1] : b[1] + 1, a[2] : b[2] + 1] = 1
        label = F.interpolate(cube[None, None], size=size, mode="nearest-exact")[0, 0]
        assert torch.equal(box_to_zoom_out(box, crop, size), generate_box(label))


def test_points_to_zoom_out_hit_the_voxel_that_nearest_exact_copies():
    crop, size = (5, 20, 13), (8, 32, 32)  # every axis grows: each crop voxel is copied somewhere
    pts = np.argwhere(np.ones(crop))
    z = points_to_zoom_out(pts, crop, size)
    img = torch.arange(np.prod(crop), dtype=torch.float32).reshape(crop)
    up = F.interpolate(img[None, None], size=size, mode="nearest-exact")[0, 0]
    assert torch.equal(up[z[:, 0], z[:, 1], z[:, 2]], img.reshape(-1))


def test_roi_grows_by_half_the_pad_and_clamps():
    logits = torch.full((20, 50, 40), -1.0)
    logits[10, 3:6, 30:39] = 1.0
    lo, hi = roi_from_logits(logits, ROI)
    # d: extent 1, pad 7 -> 3 a side; h: extent 3, pad 29 -> 14, clamped at 0; w: extent 9, pad 23 -> 11
    assert (lo, hi) == ((7, 0, 19), (13, 19, 39))
    assert roi_from_logits(torch.full((4, 4, 4), -1.0), ROI) is None
    # sigmoid(x) > 0.5 is the official test, not x > 0
    assert roi_from_logits(torch.full((4, 4, 4), 1e-8), ROI) is None


# ---------------------------------------------------------------------------- exact == official re-run
@pytest.mark.parametrize("radius", [0.25, 1.2, None], ids=["one-window", "many-windows", "raw"])
def test_exact_equals_official_rerun_synthetic(text_model, radius, fresh_seed):
    model = text_model if radius is None else _with_blob(text_model, radius)
    prep = _synthetic()
    _assert_same(model, prep, _prompts(prep.crop_shape), seed=fresh_seed)


def test_exact_equals_official_rerun_on_real_ct(text_model, data_dir, fresh_seed):
    prep, labels = load_real_ct(data_dir)
    chosen = [
        p
        for p in real_ct_prompts(labels, seed=fresh_seed % 1000)
        if p.label in ("liver (text)", "liver (box)", "spleen (points)")
    ]
    assert len(chosen) == 3
    _with_blob(text_model, 0.4)  # 12 windows per prompt (ROI 15x36x46 of the 30x96x121 crop)
    _assert_same(text_model, prep, chosen, seed=fresh_seed)


def test_point_windows_are_reproducible_with_the_seed(fresh_seed):
    model = _with_blob(_model(), 1.2)
    prep = _synthetic()
    p = _prompts(prep.crop_shape, text=False)[1:]
    a = run_exact(model, prep, p, seed=fresh_seed)[0]
    assert torch.equal(a, run_exact(model, prep, p, seed=fresh_seed)[0])


# ---------------------------------------------------------------------------- quirks
@pytest.mark.parametrize("kind", ["box", "points"])
def test_pad_offset_bug_single_window_prompt_map_is_not_padded(kind, fresh_seed):
    """§11.10: the ROI (the whole depth, 4 or 6) is padded (2, 2) or (1, 1) to the window, the
    prompt map is not, so the window's box (or points) from the map lack that offset along D."""
    record: list = []
    model = _with_blob(_model(), 0.5, record)
    depth = 4 if kind == "box" else 6  # 6: crop d 3 -> zoom-out 4 is copied back to d 3 by 'nearest'
    prep = _synthetic(shape_xyz=(40, 36, depth))
    D, H, W = prep.crop_shape
    before = (ROI[0] - D) // 2
    assert D == depth and pad_widths((D, 32, 32), ROI)[0][0] == before > 0
    prompt = (
        Prompt("box", box=np.array([1.0, 10, 12, 2, 20, 25]))
        if kind == "box"
        else Prompt("points", points=np.array([[3.0, 15, 20]]), point_labels=np.array([1]))
    )
    _assert_same(model, prep, [prompt], seed=fresh_seed)
    coarse = run_exact(model, prep, [prompt], zoom_in=False)[0]
    lo, hi = roi_from_logits(coarse, ROI)
    assert lo[0] == 0 and hi[0] == D - 1  # the whole depth: one window along D, padded
    record.clear()
    out = run_exact(model, prep, [prompt], seed=fresh_seed)[0]
    windows = record[1:]  # record[0] is the zoom-out call
    assert len(windows) == 1  # a single window
    wbox, wpts = windows[0]
    # the map in the ROI frame, where the official box/point comes from, without the pad
    if kind == "box":
        zb = box_to_zoom_out(prompt.box, prep.crop_shape, ROI)
        nd = F.interpolate(torch.arange(ROI[0], dtype=torch.float32)[None, None], size=D, mode="nearest")[0, 0]
        rows = torch.nonzero((nd >= zb[0]) & (nd <= zb[3])).flatten()
        # the window box is in the unpadded ROI frame; the padded window frame would add `before`
        assert wbox[0, 0] == rows.min() - lo[0] and wbox[0, 3] == rows.max() - lo[0]
    else:
        pos = wpts[0][0][wpts[1][0] == 1]
        assert len(pos) > 0 and (pos[:, 0] == 3).all()  # crop d 3, not the padded window's 3 + 1
        # global_preds is padded with the image: its box carries the offset
        first_fg = int(
            torch.nonzero(
                (torch.sigmoid(coarse[:, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1]) > 0.5).flatten(1).any(1)
            ).min()
        )
        assert wbox is not None and wbox[0, 0] == first_fg + before
    assert not torch.equal(out, coarse)


def test_empty_roi_keeps_the_zoom_out_result():
    model = _with_blob(_model(), -10.0)
    prep = _synthetic()
    p = _prompts(prep.crop_shape, text=False)
    with pytest.warns(ZoomInWarning, match="Fail to detect foreground"):
        got = run_exact(model, prep, p)
    for g, c in zip(got, run_exact(model, prep, p, zoom_in=False)):
        assert torch.equal(g, c) and not (g > 0).any()


def test_zoom_in_false_is_the_coarse_pass_only():
    model = _with_blob(_model(), 0.25)
    prep = _synthetic()
    prompt = _prompts(prep.crop_shape, text=False)[0]
    coarse = run_exact(model, prep, [prompt], zoom_in=False)[0]
    zb = box_to_zoom_out(prompt.box, prep.crop_shape, ROI)[None]
    with torch.no_grad():
        emb = model.encode_image(zoom_out_resize(prep.image, ROI))
        manual = resize_logits_back(model.decode(emb, boxes=zb), prep.crop_shape)[0, 0]
    assert torch.equal(coarse, manual)
    windows: list[int] = []
    full = run_exact(model, prep, [prompt], windows=windows)[0]
    lo, hi = roi_from_logits(coarse, ROI)
    inside = torch.zeros(prep.crop_shape, dtype=torch.bool)
    inside[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = True
    assert torch.equal(full[~inside], coarse[~inside]) and not torch.equal(full[inside], coarse[inside])
    # the window count reported is the official grid over the ROI (padded to at least one window)
    roi_shape = [max(b - a + 1, r) for a, b, r in zip(lo, hi, ROI)]
    assert windows == [len(window_starts(roi_shape, ROI))] and windows[0] >= 1
    run_exact(model, prep, [prompt], zoom_in=False, windows=windows)
    assert windows[1:] == [0]


def test_box_and_points_together_cannot_zoom_in():
    prep = _synthetic()
    p = Prompt("both", box=np.array([1.0, 1, 1, 5, 9, 9]), points=np.array([[3.0, 4, 4]]), point_labels=np.array([1]))
    with pytest.raises(PromptError, match="box and points"):
        run_exact(_model(), prep, [p])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ZoomInWarning)
        assert run_exact(_model(), prep, [p], zoom_in=False)[0].shape == prep.crop_shape
