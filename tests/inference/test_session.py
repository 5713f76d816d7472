"""Interactive sessions: results equal fresh segment() calls bit for bit, later prompts reuse the
cached window embeddings, the cache stays within its bound, refine adds points."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from segevol_fast import SegVol, SegVolConfig, adapters
from segevol_fast.adapters.lora import lora_layers
from segevol_fast.errors import ArgumentTypeError, PromptError
from segevol_fast.inference import segment

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(data_dir):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    m = SegVol(SegVolConfig.small(), tokenizer=data_dir / "clip_tokenizer").eval()  # 16x64x64: tens of windows
    m.weights_source = "test"
    return m


def _same(a, b):
    assert a.labels == b.labels
    for k in a.labels:
        np.testing.assert_array_equal(a.masks[k], b.masks[k])
        if a.probabilities is not None:
            np.testing.assert_array_equal(a.probabilities[k], b.probabilities[k])


def test_session_equals_fresh_calls_and_reuses_windows(model, ct):
    sess = model.session(ct)
    kw = dict(return_probabilities=True)
    first = sess.segment(text=["liver", "spleen"], **kw)
    _same(first, segment(model, ct, text=["liver", "spleen"], progress=False, **kw))
    misses = sess.cache.misses
    assert misses > 0 and sum(first.zoom_in_windows.values()) > 0
    again = sess.segment(text="liver", **kw)  # its windows are cached: decoder only
    assert sess.cache.misses == misses and sess.cache.hits > 0
    _same(again, segment(model, ct, text="liver", progress=False, **kw))
    box = sess.segment(box=[20, 20, 5, 80, 70, 25], **kw)
    _same(box, segment(model, ct, box=[20, 20, 5, 80, 70, 25], progress=False, **kw))


def test_refine_adds_points_to_the_prompt(model, ct):
    sess = model.session(ct)
    sess.segment(text="liver", box=[20, 20, 5, 80, 70, 25])
    refined = sess.refine("liver", points=[[50, 40, 14], [30, 30, 10]], point_labels=[1, 0], return_probabilities=True)
    fresh = segment(
        model,
        ct,
        text="liver",
        box=[20, 20, 5, 80, 70, 25],
        points=[[50, 40, 14], [30, 30, 10]],
        point_labels=[1, 0],
        progress=False,
        return_probabilities=True,
    )
    _same(refined, fresh)
    twice = sess.refine("liver", points=[[60, 45, 15]], point_labels=[0])  # a negative click on top
    fresh2 = segment(
        model,
        ct,
        text="liver",
        box=[20, 20, 5, 80, 70, 25],
        points=[[50, 40, 14], [30, 30, 10], [60, 45, 15]],
        point_labels=[1, 0, 0],
        progress=False,
    )
    _same(twice, fresh2)
    with pytest.raises(PromptError, match="nothing to refine"):
        sess.refine("spleen", points=[[1, 1, 1]], point_labels=[1])


def test_cache_bound_and_budget(model, ct):
    sess = model.session(ct, cache_windows=2)
    sess.segment(text=["liver", "spleen", "stomach"])
    assert sess.cache.capacity == 2 and len(sess.cache) <= 2
    budget = model.session(ct, max_memory="3GB")
    assert 0 <= budget.cache.capacity
    budget.segment(text="liver")
    assert len(budget.cache) <= budget.cache.capacity


def test_session_with_an_adapter_equals_segment_with_it(model, ct):
    m = SegVol(SegVolConfig.small(), tokenizer=model.tokenizer).eval()
    m.load_state_dict(model.state_dict())
    m.weights_source = "test"
    adapters.add_lora(m, "x", adapters.LoraConfig(rank=4))
    with torch.no_grad():
        for _, w in adapters.adapter_modules(m, "x"):
            for b in w.lora_B:
                b.normal_(0, 0.5)
    adapters.set_active(m, None)
    sess = m.session(ct, adapter="x")
    _same(sess.segment(text="liver"), segment(m, ct, text="liver", adapter="x", progress=False))
    assert all(layer.active is None for _, layer in lora_layers(m))


def test_cache_capacity_leaves_room_for_the_kept_zoom_out_embedding(model, ct, monkeypatch):
    """Capacity = (budget - one call's plan without its cache - the session's zoom-out embedding)
    // one window embedding; a plan fixed here makes the accounting exact."""
    from segevol_fast.inference import budget as budget_mod
    from segevol_fast.inference import session as session_mod

    cfg = model.config
    per = cfg.hidden_size * int(np.prod(cfg.grid_size)) * 4
    call_peak = 500_000_000
    fixed = budget_mod.Plan(
        device=torch.device("cpu"),
        cache_windows=2,
        estimated_peak_bytes=call_peak + 2 * per,
        breakdown={"embedding_cache": 2 * per},
    )
    monkeypatch.setattr(session_mod, "plan_fast", lambda *a, **k: fixed)
    for windows in (0, 1, 3):
        budget = call_peak + per + windows * per + per // 2  # zoom-out embedding + `windows` + a spare half
        assert model.session(ct, max_memory=budget).cache.capacity == windows
    assert model.session(ct, max_memory=call_peak + per // 2).cache.capacity == 0  # never negative


# ------------------------------------------------------------------ refine: names, histories, checks
BOXES = [[20, 20, 5, 80, 70, 25], [10, 10, 2, 60, 60, 20]]


def _same_prompt(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def _fresh(model, ct, **prompts):
    return segment(model, ct, zoom_in=False, progress=False, return_probabilities=True, **prompts)


def test_refine_answers_under_the_refined_name_and_leaves_other_histories(tiny_model, ct):
    sess = tiny_model.session(ct)
    assert sess.segment(text=["liver", "liver"], box=BOXES, zoom_in=False).labels == ["liver", "liver (2)"]
    first = copy.deepcopy(sess.history["liver"])
    res = sess.refine("liver (2)", points=[[30, 30, 10]], point_labels=[1], return_probabilities=True)
    assert res.labels == ["liver (2)"] and list(res.probabilities) == list(res.zoom_in_windows) == ["liver (2)"]
    fresh = _fresh(tiny_model, ct, text="liver", box=BOXES[1], points=[[30, 30, 10]])
    np.testing.assert_array_equal(res.masks["liver (2)"], fresh.masks["liver"])
    np.testing.assert_array_equal(res.probabilities["liver (2)"], fresh.probabilities["liver"])
    assert sorted(sess.history) == ["liver", "liver (2)"] and _same_prompt(sess.history["liver"], first)
    np.testing.assert_array_equal(sess.history["liver (2)"]["box"], BOXES[1])
    np.testing.assert_array_equal(sess.history["liver (2)"]["points"], [[30, 30, 10]])

    sess.segment(box=BOXES, zoom_in=False)
    box0 = copy.deepcopy(sess.history["box 0"])
    res = sess.refine("box 1", points=[[30, 30, 10]], point_labels=[0])
    assert res.labels == ["box 1"] and _same_prompt(sess.history["box 0"], box0)
    np.testing.assert_array_equal(sess.history["box 1"]["box"], BOXES[1])
    fresh = _fresh(tiny_model, ct, box=BOXES[1], points=[[30, 30, 10]], point_labels=[0])
    np.testing.assert_array_equal(res.masks["box 1"], fresh.masks["box 0"])


@pytest.mark.parametrize(
    "points,labels,error,phrase",
    [
        ([[1, 2]], [1], PromptError, r"points must be \(P, 3\)"),
        (None, None, PromptError, "adds points"),
        ("1,2,3", [1], ArgumentTypeError, "points must be numbers"),
        ([[1, 2, float("nan")]], [1], PromptError, "non-finite"),
        ([[1, 2, 3]], [2], PromptError, r"1 \(positive\) or 0 \(negative\)"),
        ([[1, 2, 3]], [1, 0], PromptError, "one label per point"),
        ([[1, 2, 3]], [-1], PromptError, "padding"),
    ],
    ids=["two-numbers", "none", "string", "nan", "label-two", "label-count", "label-minus-one"],
)
def test_refine_checks_its_points_like_segment(tiny_model, ct, points, labels, error, phrase):
    sess = tiny_model.session(ct)
    sess.segment(text="liver", zoom_in=False)
    before = copy.deepcopy(sess.history)
    with pytest.raises(error, match=phrase):
        sess.refine("liver", points=points, point_labels=labels)
    assert sess.history.keys() == before.keys() and _same_prompt(sess.history["liver"], before["liver"])


def test_negative_correction_clicks_refine_a_prompt_that_names_its_target(tiny_model, ct):
    sess = tiny_model.session(ct)
    sess.segment(text="liver", zoom_in=False)
    res = sess.refine("liver", points=[[60, 50, 14]], point_labels=[0], return_probabilities=True)  # the docstring's
    fresh = _fresh(tiny_model, ct, text="liver", points=[[60, 50, 14]], point_labels=[0])
    np.testing.assert_array_equal(res.probabilities["liver"], fresh.probabilities["liver"])
    # points alone: a negative click on top of an earlier positive one is fine
    sess.segment(points=[[50, 40, 14]], zoom_in=False)
    assert sess.refine("points", points=[[30, 30, 10]], point_labels=[0]).labels == ["points"]
    np.testing.assert_array_equal(sess.history["points"]["point_labels"], [1, 0])
    # negative points alone say nothing about the target
    with pytest.raises(PromptError, match="negative points only say where the target is not"):
        sess.segment(points=[[30, 30, 10]], point_labels=[0])


def test_a_session_keeps_its_approximations_and_equals_fresh_calls_with_them(model, ct):
    approx = {"overlap": 0.0, "skip_empty": False}
    sess = model.session(ct, approximations=approx)
    res = sess.segment(text="liver", return_probabilities=True)
    assert res.plan["approximations"]["overlap"] == 0.0
    _same(res, segment(model, ct, text="liver", progress=False, return_probabilities=True, approximations=approx))
    assert sess.cache.capacity <= res.plan["zoom_in"]["windows_official"] or res.zoom_in_windows["liver"] == 0
