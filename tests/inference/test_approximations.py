"""Fast mode's zoom-in approximations: each off equals the official zoom-in bit for bit, each on
leaves out what it says (windows, tokens) and records it; settings are checked."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from segevol_fast import SegVolConfig
from segevol_fast.errors import ArgumentTypeError, InvalidArgumentError
from segevol_fast.geometry.sliding_window import global_grid
from segevol_fast.inference.approximations import Approximations, ZoomInCounts, as_approximations
from segevol_fast.inference.fast import run_fast
from segevol_fast.inference.prompts import Prompt

from .test_fast import SIZE, BoxBiased, _plan, _prep

pytestmark = pytest.mark.usefixtures("one_thread")

NONE = Approximations.none()
SHAPE = (20, 90, 100)  # 3 x 5 x 5 windows of the tiny model's (8, 32, 32) at overlap 0.5


class TwoBlobs(BoxBiased):
    """The tiny model whose zoom-out sees two far-apart blobs: the ROI spans the crop but the
    windows between the blobs hold no coarse foreground."""

    def decode(self, image_embedding, text_embedding=None, boxes=None, points=None, upsample=True):
        out = super().decode(image_embedding, text_embedding, boxes, points, upsample)
        if self.zoom_out_pending:  # run_fast decodes the zoom-out first
            self.zoom_out_pending = False
            out = out - 5.0
            out[..., :2, :4, :4] += 10.0
            out[..., -2:, -4:, -4:] += 10.0
        return out


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TwoBlobs(SegVolConfig.tiny()).eval()


def _run(model, prep, prompts, approx, **kw):
    model.zoom_out_pending = True
    counts = ZoomInCounts()
    outs = run_fast(model, prep, prompts, plan=_plan(approximations=approx), return_logits=True, counts=counts, **kw)
    return outs, counts


def _same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x.mask, y.mask) and torch.equal(x.logits, y.logits) and x.roi == y.roi


PROMPT = Prompt("box", box=np.array([0.0, 0, 0, 19, 89, 99]))


def test_a_plan_leaves_nothing_out_unless_told_and_counts_what_it_encoded(model):
    assert _plan().approximations == NONE  # run_fast's own default plan is the official zoom-in
    a, counts = _run(model, _prep(SHAPE), [PROMPT], NONE)
    assert counts.windows_planned == counts.windows_official == counts.windows_encoded == a[0].windows
    assert (
        counts.tokens_encoded
        == counts.tokens_official
        == counts.windows_official * int(np.prod(model.config.grid_size))
    )


def test_windows_without_coarse_foreground_are_skipped_and_keep_the_coarse_result(model):
    prep = _prep(SHAPE)
    (full,), official = _run(model, prep, [PROMPT], NONE)
    (skip,), counts = _run(model, prep, [PROMPT], dataclasses.replace(NONE, skip_empty=True))
    assert skip.roi == full.roi  # the ROI spans both blobs: the whole crop
    assert counts.windows_official == official.windows_planned == full.windows
    assert 0 < counts.windows_planned < counts.windows_official  # only windows near a blob are kept
    assert counts.windows_skipped == counts.windows_official - counts.windows_planned
    assert counts.windows_encoded == counts.windows_planned == skip.windows
    # the blobs' corners are reached by kept windows only where all their windows were kept; the
    # middle of the crop, far from both blobs, was reached by no window: the coarse result stays
    (coarse,), _ = _run(model, prep, [PROMPT], NONE, zoom_in=False)
    mid = tuple(slice(n // 2 - 1, n // 2 + 1) for n in SHAPE)
    assert torch.equal(skip.logits[mid], coarse.logits[mid])
    assert not torch.equal(full.logits[mid], coarse.logits[mid])


def test_skipping_with_a_margin_that_reaches_everything_equals_the_official_zoom_in(model):
    prep = _prep(SHAPE)
    official, _ = _run(model, prep, [PROMPT], NONE)
    wide, counts = _run(model, prep, [PROMPT], dataclasses.replace(NONE, skip_empty=True, skip_margin=200))
    assert counts.windows_skipped == 0
    _same(official, wide)


@pytest.mark.parametrize("overlap", [0.0, 0.25])
def test_less_overlap_plans_fewer_windows_on_its_own_grid(model, overlap):
    prep = _prep(SHAPE)
    (out,), counts = _run(model, prep, [PROMPT], dataclasses.replace(NONE, overlap=overlap))
    grid = global_grid(SHAPE, SIZE, overlap)
    assert counts.windows_planned == out.windows == int(np.prod([len(g) for g in grid]))
    assert counts.windows_planned < counts.windows_official == int(np.prod([len(g) for g in global_grid(SHAPE, SIZE)]))
    assert out.mask.shape == SHAPE


def test_settings_are_checked():
    assert as_approximations("none") == NONE and NONE.is_official
    assert as_approximations(None) == as_approximations("default") == Approximations()
    assert as_approximations({"overlap": 0.25}).overlap == 0.25
    for bad, error in [
        ({"overlap": 1.0}, InvalidArgumentError),
        ({"overlap": "half"}, ArgumentTypeError),
        ({"token_margin": -1}, InvalidArgumentError),
        ({"token_fill": "median"}, InvalidArgumentError),
        ({"skip_empty": 1}, ArgumentTypeError),
        ({"speed": "max"}, InvalidArgumentError),
        ("fastest", InvalidArgumentError),
        (0.5, ArgumentTypeError),
    ]:
        with pytest.raises(error):
            as_approximations(bad)


def test_segment_records_the_approximations_and_what_was_encoded(tiny_model, ct):
    res = tiny_model.segment(ct, text="liver", box=[30, 20, 5, 80, 70, 20], progress=False, approximations="none")
    assert res.plan["approximations"] == NONE.summary()
    zoom = res.plan["zoom_in"]
    assert zoom["windows_encoded"] == zoom["windows_official"] == res.zoom_in_windows["liver"] > 0
    res = tiny_model.segment(ct, text="liver", progress=False, approximations={"overlap": 0.0})
    assert res.plan["approximations"]["overlap"] == 0.0
    assert res.plan["zoom_in"]["windows_planned"] <= res.plan["zoom_in"]["windows_official"]


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return BoxBiased(SegVolConfig.small()).eval()  # a 4x4x4 token grid: room for a token box


@pytest.mark.parametrize("fill", ["summary_fine", "edge"])
def test_token_subset_encodes_fewer_tokens_and_a_margin_covering_the_window_changes_nothing(small, fill):
    prep = _prep((8, 20, 150))  # shorter than the (16, 64, 64) window on two axes: padding tokens
    prompt = Prompt("box", box=np.array([0.0, 0, 0, 7, 19, 149]))
    official, _ = _run(small, prep, [prompt], NONE)
    subset, counts = _run(small, prep, [prompt], dataclasses.replace(NONE, token_subset=True, token_fill=fill))
    assert counts.windows_encoded == counts.windows_official > 0
    assert counts.tokens_encoded < counts.tokens_official
    whole, counts = _run(
        small, prep, [prompt], dataclasses.replace(NONE, token_subset=True, token_margin=64, token_fill=fill)
    )
    assert counts.tokens_encoded == counts.tokens_official
    _same(official, whole)
    assert subset[0].mask.shape == official[0].mask.shape
    assert not torch.equal(subset[0].logits, official[0].logits)  # the subset did run
