"""mode="fast": equal to the official coarse path, batched prompts equal separate calls, windows
shared through the global grid and the cache, and equal to exact mode where the rules coincide."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segevol_fast import SegVol, SegVolConfig
from segevol_fast.geometry.crop_map import CropMap
from segevol_fast.geometry.grid_windows import windows_for_roi
from segevol_fast.geometry.prompt_frames import box_to_zoom_out, points_to_zoom_out
from segevol_fast.geometry.sliding_window import global_grid, pad_widths, window_starts
from segevol_fast.inference.budget import Plan
from segevol_fast.inference.exact import roi_from_logits, run_exact
from segevol_fast.inference.fast import run_fast
from segevol_fast.inference.prompts import Prompt
from segevol_fast.preprocess import Preprocessed, preprocess, resize_logits_back, zoom_out_resize

SIZE = (8, 32, 32)  # SegVolConfig.tiny().spatial_size


class BoxBiased(SegVol):
    """The tiny SegVol pushed toward its box prompt: +bias inside the box, -bias beyond a 2-voxel
    margin (the real logits decide in between). Keeps each ROI where a test puts it; the random
    tiny model alone predicts scattered foreground, whose ROI is the whole crop."""

    bias = 0.2  # the tiny model's logits have a std of ~0.02
    text_bias = 0.0  # added with a text prompt

    def decode(self, image_embedding, text_embedding=None, boxes=None, points=None, upsample=True):
        out = super().decode(image_embedding, text_embedding, boxes, points, upsample)
        if text_embedding is not None:
            out = out + self.text_bias
        if boxes is None:
            return out
        b = boxes.float()

        def region(margin):
            ax = [
                (torch.arange(n, device=out.device) >= b[:, a, None] - margin)
                & (torch.arange(n, device=out.device) <= b[:, a + 3, None] + margin)
                for a, n in enumerate(out.shape[2:])
            ]
            return (ax[0][:, :, None, None] & ax[1][:, None, :, None] & ax[2][:, None, None, :])[:, None]

        return out + self.bias * region(0) - self.bias * ~region(2)


@pytest.fixture(scope="module")
def model():
    # fixed weights: with some random draws the tiny model's own logits outweigh the box bias and
    # every ROI becomes the whole crop, which the window-sharing tests cannot use
    torch.manual_seed(0)
    return BoxBiased(SegVolConfig.tiny()).eval()


def _prep(shape) -> Preprocessed:
    image = torch.rand(1, 1, *shape)
    return Preprocessed(image, (0, 0, 0), tuple(shape), tuple(reversed(shape)), None)


def _plan(**kw) -> Plan:
    base = dict(
        device="cpu",
        window_batch=4,
        accumulator_dtype=torch.float32,
        cache_windows=10_000,
        decode_batch=8,
        prompt_group=8,
    )
    return Plan(**{**base, **kw})


def _fake_text(model, monkeypatch):
    """encode_text without a tokenizer: a fixed random vector per name."""
    hidden = model.config.hidden_size

    def encode_text(names, modality="ct"):
        names = [names] if isinstance(names, str) else list(names)
        return torch.stack(
            [torch.randn(hidden, generator=torch.Generator().manual_seed(sum(map(ord, n)))) for n in names]
        )

    monkeypatch.setattr(model, "encode_text", encode_text)


def _count_encodes(model, monkeypatch) -> list[int]:
    """Record the batch size of every encode_image call."""
    calls = []
    original = model.encode_image

    def encode_image(x, *args, **kwargs):
        calls.append(x.shape[0])
        return original(x, *args, **kwargs)

    monkeypatch.setattr(model, "encode_image", encode_image)
    return calls


BOX = Prompt("box", box=np.array([3.0, 10, 12, 14, 40, 55]))
POINTS = Prompt("points", points=np.array([[5.0, 20, 30], [12, 50, 70]]), point_labels=np.array([1, 0]))
BOX_POINTS = Prompt(
    "both", box=np.array([2.0, 30, 40, 17, 66, 88]), points=np.array([[9.0, 45, 60]]), point_labels=np.array([1])
)


# ------------------------------------------------------------------------------ the grid
@pytest.mark.parametrize("shape", [(20, 70, 90), (6, 70, 90), (8, 32, 33), (6, 28, 30)])
def test_global_grid_is_monai_grid_in_the_crop_frame(shape):
    grid = global_grid(shape, SIZE)
    pads = [p[0] for p in pad_widths(shape, SIZE)]
    ours = [(a, b, c) for a in grid[0] for b in grid[1] for c in grid[2]]
    theirs = [tuple(s - p for s, p in zip(st, pads)) for st in window_starts(shape, SIZE)]
    assert ours == theirs
    lo, hi = (0, 0, 0), tuple(n - 1 for n in shape)
    assert len(windows_for_roi(grid, SIZE, lo, hi)) == len(theirs)


@pytest.mark.parametrize("shape", [(20, 70, 90), (6, 20, 90), (5, 31, 33)])
def test_roi_from_zoom_out_projections_equals_official(shape):
    cmap = CropMap(SIZE, shape, torch.device("cpu"))
    logits = torch.full(SIZE, -1.0)
    logits[torch.rand(SIZE) > 0.995] = 1.0  # a few scattered positives, some skipped by the resize
    ref = roi_from_logits(resize_logits_back(logits, shape), SIZE)
    assert cmap.roi(torch.sigmoid(logits) > 0.5, SIZE) == ref
    assert torch.equal(cmap.gather(logits), resize_logits_back(logits, shape))


# ------------------------------------------------------------------------------ zoom-out
@pytest.mark.parametrize("prompt", [BOX, POINTS, BOX_POINTS], ids=["box", "points", "box+points"])
def test_zoom_out_only_equals_the_official_coarse_path(model, prompt):
    prep = _prep((20, 70, 90))
    (out,) = run_fast(model, prep, [prompt], zoom_in=False, plan=_plan(), return_logits=True)
    crop = prep.crop_shape
    with torch.inference_mode():
        emb = model.encode_image(zoom_out_resize(prep.image, SIZE))
        box = box_to_zoom_out(prompt.box, crop, SIZE)[None] if prompt.box is not None else None
        points = None
        if prompt.points is not None:
            points = (
                points_to_zoom_out(prompt.points, crop, SIZE).float()[None],
                torch.as_tensor(prompt.point_labels)[None],
            )
        ref = resize_logits_back(model.decode(emb, boxes=box, points=points), crop)[0, 0]
    assert out.roi is None and out.mask.dtype == torch.bool and out.mask.shape == crop
    assert torch.equal(out.mask, ref > 0)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=0)


def test_logits_only_on_request(model):
    (out,) = run_fast(model, _prep((20, 70, 90)), [BOX], plan=_plan())
    assert out.logits is None and out.roi is not None and out.windows > 1


# ------------------------------------------------------------------------------ sharing
def test_n_prompts_in_one_call_equal_separate_calls(model, monkeypatch):
    _fake_text(model, monkeypatch)
    prep = _prep((20, 70, 90))
    prompts = [
        BOX,
        POINTS,
        BOX_POINTS,
        Prompt("liver", text="liver"),
        Prompt("spleen+box", text="spleen", box=np.array([0.0, 0, 0, 9, 35, 45])),
    ]
    together = run_fast(model, prep, prompts, plan=_plan(), return_logits=True)
    for prompt, joint in zip(prompts, together):
        (alone,) = run_fast(model, prep, [prompt], plan=_plan(), return_logits=True)
        assert joint.roi == alone.roi and joint.windows == alone.windows
        assert torch.equal(joint.mask, alone.mask), prompt.label
        torch.testing.assert_close(joint.logits, alone.logits, rtol=0, atol=1e-6)


# Two box prompts whose ROIs overlap in W; each ROI is over half the crop, so prompt_group=1
# stitches them in two groups, which must share windows through the cache.
SHARE_SHAPE = (16, 64, 96)
SHARED = [
    Prompt("left", box=np.array([0.0, 0, 0, 15, 63, 50])),
    Prompt("right", box=np.array([0.0, 0, 45, 15, 63, 95])),
]


def test_each_window_is_encoded_once_with_a_large_cache(model, monkeypatch):
    prep = _prep(SHARE_SHAPE)
    calls = _count_encodes(model, monkeypatch)
    outs = run_fast(model, prep, SHARED, plan=_plan(prompt_group=1, window_batch=3))
    grid = global_grid(SHARE_SHAPE, SIZE)
    needed = [set(windows_for_roi(grid, SIZE, *o.roi)) for o in outs]
    assert all(len(n) == o.windows for n, o in zip(needed, outs))
    assert needed[0] & needed[1] and needed[0] != needed[1]  # the setting the test is about
    assert calls[0] == 1 and max(calls) <= 3  # the zoom-out, then batches of window_batch
    assert sum(calls[1:]) == len(needed[0] | needed[1])  # every needed window, each once


def test_a_tiny_cache_re_encodes_but_gives_identical_results(model, monkeypatch):
    prep = _prep(SHARE_SHAPE)
    big = run_fast(model, prep, SHARED, plan=_plan(prompt_group=1), return_logits=True)
    calls = _count_encodes(model, monkeypatch)
    for cache in (0, 1, 5):
        calls.clear()
        small = run_fast(model, prep, SHARED, plan=_plan(prompt_group=1, cache_windows=cache), return_logits=True)
        if cache == 0:
            assert sum(calls[1:]) == sum(o.windows for o in small)  # no sharing across groups
        for a, b in zip(big, small):
            assert torch.equal(a.mask, b.mask)
            torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-6)


def test_window_batch_and_decode_batch_do_not_change_results(model):
    prep = _prep((20, 70, 90))
    prompts = [BOX, BOX_POINTS, Prompt("b2", box=np.array([1.0, 5, 5, 10, 30, 30]))]
    ref = run_fast(model, prep, prompts, plan=_plan(window_batch=1, decode_batch=1), return_logits=True)
    got = run_fast(model, prep, prompts, plan=_plan(window_batch=8, decode_batch=3), return_logits=True)
    for a, b in zip(ref, got):
        assert torch.equal(a.mask, b.mask)
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-6)


def test_a_lazy_crop_gives_results_identical_to_the_stored_crop(model, monkeypatch):
    _fake_text(model, monkeypatch)
    vol = torch.randint(-1000, 1000, (90, 70, 20), dtype=torch.int16)  # (X, Y, Z) -> crop (20, 70, 90)
    stored, lazy = preprocess(vol), preprocess(vol, lazy=True)
    assert lazy.lazy and lazy.crop_shape == stored.crop_shape == (20, 70, 90)
    prompts = [BOX, POINTS, Prompt("liver", text="liver")]
    for a, b in zip(
        run_fast(model, stored, prompts, plan=_plan(), return_logits=True),
        run_fast(model, lazy, prompts, plan=_plan(), return_logits=True),
    ):
        assert a.roi == b.roi and a.windows == b.windows
        assert torch.equal(a.mask, b.mask) and torch.equal(a.logits, b.logits)


def test_row_sums_alive_never_exceed_one_window_depth(model, monkeypatch):
    # a crop five windows deep, two full-depth prompts stitched one after the other: the second
    # group walks the grid backwards (cache reuse), and rows must be finished in both directions
    import segevol_fast.inference.stitch as stitch

    alive = []
    add = stitch.Stitch.add

    def counting_add(self, logits, origin):
        add(self, logits, origin)
        alive.append(len(self.rows))

    monkeypatch.setattr(stitch.Stitch, "add", counting_add)
    shape = (40, 64, 96)
    prompts = [
        Prompt("left", box=np.array([0.0, 0, 0, 39, 63, 50])),
        Prompt("right", box=np.array([0.0, 0, 45, 39, 63, 95])),
    ]
    outs = run_fast(model, _prep(shape), prompts, plan=_plan(prompt_group=1), return_logits=True)
    assert all(o.roi[0][0] == 0 and o.roi[1][0] == 39 for o in outs)  # ROIs span the whole depth
    assert len(alive) == sum(o.windows for o in outs)
    assert 0 < max(alive) <= SIZE[0] < shape[0]
    assert all(torch.isfinite(o.logits).all() for o in outs)


def test_float16_accumulators_agree(model):
    prep = _prep((20, 70, 90))
    ref = run_fast(model, prep, [BOX, POINTS], plan=_plan(), return_logits=True)
    half = run_fast(model, prep, [BOX, POINTS], plan=_plan(accumulator_dtype=torch.float16), return_logits=True)
    for a, b in zip(ref, half):
        assert b.logits.dtype == torch.float16
        torch.testing.assert_close(b.logits.float(), a.logits, rtol=0, atol=2e-3)
        assert (a.mask != b.mask).float().mean() < 1e-3  # only voxels within rounding of 0 may flip


# ------------------------------------------------------------------------------ against exact mode
def test_single_window_text_prompt_equals_exact_mode(model, monkeypatch):
    # crop smaller than the window on every axis: one window over the whole (padded) crop in both,
    # as long as the coarse foreground reaches every face of the crop (ROI = crop): text_bias
    # makes every voxel foreground; the logits, compared to 1e-6, are still the model's
    _fake_text(model, monkeypatch)
    monkeypatch.setattr(model, "text_bias", 1.0)
    prep = _prep((6, 28, 30))
    prompts = [Prompt("liver", text="liver"), Prompt("kidney", text="kidney")]
    fast = run_fast(model, prep, prompts, plan=_plan(), return_logits=True)
    exact = run_exact(model, prep, prompts)
    for f, e in zip(fast, exact):
        assert f.windows == 1 and f.roi == ((0, 0, 0), (5, 27, 29))
        assert torch.equal(f.mask, e > 0)
        torch.testing.assert_close(f.logits, e, rtol=0, atol=1e-6)


def test_multi_window_box_prompt_equals_exact_mode_when_the_roi_is_the_crop(model):
    # a box over the whole crop: ROI = crop, so exact's windows are the global grid, and both use
    # the coarse box per window (several windows). The bias fills the box, so the masks are all
    # True; the logits, compared to 1e-6, are still the model's
    prep = _prep((20, 70, 90))
    prompt = Prompt("all", box=np.array([0.0, 0, 0, 19, 69, 89]))
    (f,) = run_fast(model, prep, [prompt], plan=_plan(), return_logits=True)
    (e,) = run_exact(model, prep, [prompt])
    assert f.roi == ((0, 0, 0), (19, 69, 89)) and f.windows == 80
    assert torch.equal(f.mask, e > 0)
    torch.testing.assert_close(f.logits, e, rtol=0, atol=1e-6)


def test_progress_bar_and_empty_prompt_list(model, capsys):
    assert run_fast(model, _prep((10, 40, 40)), [], plan=_plan()) == []
    run_fast(model, _prep((10, 40, 40)), [BOX], plan=_plan(), progress=True)
    assert "zoom-in windows" in capsys.readouterr().err
