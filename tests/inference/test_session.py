"""Interactive sessions: results equal fresh segment() calls bit for bit, later prompts reuse the
cached window embeddings, the cache stays within its bound, refine adds points."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segevol_fast import SegVol, SegVolConfig, adapters
from segevol_fast.errors import PromptError
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
    fresh = segment(model, ct, text="liver", box=[20, 20, 5, 80, 70, 25], points=[[50, 40, 14], [30, 30, 10]],
                    point_labels=[1, 0], progress=False, return_probabilities=True)
    _same(refined, fresh)
    twice = sess.refine("liver", points=[[60, 45, 15]], point_labels=[0])  # a negative click on top
    fresh2 = segment(model, ct, text="liver", box=[20, 20, 5, 80, 70, 25],
                     points=[[50, 40, 14], [30, 30, 10], [60, 45, 15]], point_labels=[1, 0, 0], progress=False)
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
    assert all(layer.active is None for _, layer in adapters._lora_layers(m))


def test_cache_capacity_leaves_room_for_the_kept_zoom_out_embedding(model, ct, monkeypatch):
    """Capacity = (budget - one call's plan without its cache - the session's zoom-out embedding)
    // one window embedding; a plan fixed here makes the accounting exact."""
    from segevol_fast.inference import budget as budget_mod
    from segevol_fast.inference import session as session_mod

    cfg = model.config
    per = cfg.hidden_size * int(np.prod(cfg.grid_size)) * 4
    call_peak = 500_000_000
    fixed = budget_mod.Plan(device=torch.device("cpu"), cache_windows=2, estimated_peak_bytes=call_peak + 2 * per,
                            breakdown={"embedding_cache": 2 * per})
    monkeypatch.setattr(session_mod, "plan_fast", lambda *a, **k: fixed)
    for windows in (0, 1, 3):
        budget = call_peak + per + windows * per + per // 2  # zoom-out embedding + `windows` + a spare half
        assert model.session(ct, max_memory=budget).cache.capacity == windows
    assert model.session(ct, max_memory=call_peak + per // 2).cache.capacity == 0  # never negative
