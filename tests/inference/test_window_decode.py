"""Zoom-in window decoding computing only each window's ROI part equals decoding whole windows:
pair by pair (logits within float32 tolerance where the stitcher reads them) and through
run_fast (identical masks), with text, box and point prompts sharing windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segevol_fast import SegVol, SegVolConfig
from segevol_fast.inference import window_decode
from segevol_fast.inference.budget import Plan
from segevol_fast.inference.decode import DecodeItem
from segevol_fast.inference.fast import run_fast
from segevol_fast.inference.oom import Retries
from segevol_fast.inference.prompts import Prompt
from segevol_fast.inference.window_decode import WindowJob, decode_windows
from segevol_fast.preprocess import Preprocessed
from tests.numerics import assert_matches_reference

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = SegVolConfig.tiny()
SIZE = tuple(CFG.spatial_size)  # (8, 32, 32)


@pytest.fixture(scope="module")
def model():
    return SegVol(CFG).eval()


def _items(k0: int, n_points: int) -> list[DecodeItem]:
    """Prompt k0: text only; k0 + 1: text and box; k0 + 2: box and points (n_points)."""
    box = torch.tensor([1.0, 2, 3, 6, 20, 25])
    pts = (torch.rand(n_points, 3) * torch.tensor(SIZE), torch.randint(0, 2, (n_points,)))
    return [DecodeItem(k0, None, None), DecodeItem(k0 + 1, box, None), DecodeItem(k0 + 2, box, pts)]


def _rois(n: int) -> dict:
    """Random crop-frame ROIs (inclusive) meeting the windows at (0, 0, 0) and (3, -4, 5)."""
    out = {}
    for k in range(n):
        lo = [int(torch.randint(0, 4, ())) for _ in SIZE]
        out[k] = (tuple(lo), tuple(a + int(torch.randint(6, s, ())) for a, s in zip(lo, SIZE)))
    return out


def _decode_all(model, jobs, texts, rois, regions, dtype=torch.float32):
    plan = Plan(device="cpu", decode_batch=2, window_batch=2, prompt_group=8)
    tasks = [None] * len(rois)
    with torch.inference_mode():
        return {
            (job.origin, it.k): logits.to(dtype) if dtype != torch.float32 else logits
            for job, it, logits, _ in decode_windows(model, jobs, texts, Retries(plan), tasks, rois, regions)
        }


def test_region_pairs_equal_whole_windows_inside_the_roi(model):
    hidden = CFG.hidden_size
    texts = {k: torch.randn(1, hidden) for k in (0, 1, 3, 4)}
    rois = _rois(6)
    origins = [(0, 0, 0), (3, -4, 5)]
    jobs = [WindowJob(o, torch.randn(1, hidden, *CFG.grid_size), _items(0, 2) + _items(3, 1)) for o in origins]
    region = _decode_all(model, jobs, texts, rois, True)
    whole = _decode_all(model, jobs, texts, rois, False)
    assert region.keys() == whole.keys() and len(region) == 12
    model64 = SegVol(CFG).eval()
    model64.load_state_dict(model.state_dict())
    jobs64 = [WindowJob(j.origin, j.emb.double(), j.items) for j in jobs]
    exact = _decode_all(model64.double(), jobs64, {k: t.double() for k, t in texts.items()}, rois, False, torch.float64)
    for (origin, k), logits in region.items():
        box = window_decode._window_box(rois[k], origin, SIZE)
        inside = tuple(slice(a, b) for a, b in zip(*box))
        assert_matches_reference(logits[inside], whole[origin, k][inside], exact[origin, k][inside], f"pair {k}")


def test_each_window_reports_done_once_after_its_last_pair(model):
    hidden = CFG.hidden_size
    texts = {0: torch.randn(1, hidden), 1: torch.randn(1, hidden)}
    jobs = [WindowJob((0, 0, 0), torch.randn(1, hidden, *CFG.grid_size), _items(0, 1)) for _ in range(2)]
    plan = Plan(device="cpu", decode_batch=1)
    with torch.inference_mode():
        seen = [
            (id(job), done)
            for job, _, _, done in decode_windows(model, jobs, texts, Retries(plan), [None] * 3, _rois(3))
        ]
    assert [d for _, d in seen] == [False, False, True] * 2
    assert [j for j, _ in seen] == [id(jobs[0])] * 3 + [id(jobs[1])] * 3


def test_run_fast_with_regions_equals_whole_windows(model, monkeypatch):
    shape = (14, 40, 20)  # tiny windows (8, 32, 32): W shorter than a window, so windows are padded
    prep = Preprocessed(torch.rand(1, 1, *shape), (0, 0, 0), shape, tuple(reversed(shape)), None)
    prompts = [
        Prompt("box", box=np.array([1.0, 3, 2, 12, 30, 15])),
        Prompt("points", points=np.array([[5.0, 10, 8], [9, 30, 12]]), point_labels=np.array([1, 0])),
        Prompt("both", box=np.array([0.0, 0, 0, 13, 39, 19]), points=np.array([[7.0, 20, 10]])),
    ]
    plan = Plan(device="cpu", window_batch=2, decode_batch=2, prompt_group=3, cache_windows=64)
    region = run_fast(model, prep, prompts, plan=plan, return_logits=True)
    monkeypatch.setattr(window_decode, "plain_decode", lambda m: False)
    whole = run_fast(model, prep, prompts, plan=plan, return_logits=True)
    assert sum(o.windows for o in region) > len(prompts)  # prompts share several windows
    for a, b in zip(region, whole, strict=True):
        assert a.roi == b.roi and a.windows == b.windows
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-6)
        same_side = (a.logits > 0) == (b.logits > 0)
        assert torch.equal(a.mask, b.mask) or not bool(same_side.all())  # a flip only at a logit of ~0


def test_a_cached_session_prompt_on_the_region_path_equals_a_fresh_call(tiny_model, ct, monkeypatch):
    from segevol_fast.inference import segment

    calls, real = [], window_decode._decode_box
    monkeypatch.setattr(window_decode, "_decode_box", lambda *a: calls.append(1) or real(*a))
    volume = ct.array[30:90, 20:80, 5:25]
    sess = tiny_model.session(volume, precision="fp32")
    sess.segment(text=["liver", "spleen"])  # every window encoded
    before, misses = len(calls), sess.cache.misses
    cached = sess.segment(text="spleen", return_probabilities=True)
    assert len(calls) > before and sess.cache.misses == misses  # decoder only, windows by region
    fresh = segment(tiny_model, volume, text="spleen", precision="fp32", progress=False, return_probabilities=True)
    np.testing.assert_array_equal(cached.masks["spleen"], fresh.masks["spleen"])
    np.testing.assert_array_equal(cached.probabilities["spleen"], fresh.probabilities["spleen"])
