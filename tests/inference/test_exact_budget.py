"""mode="exact" under max_memory: the limit is met as the official algorithm stands, or refused
before anything runs; the plan (its only one) is recorded in the result like fast mode's."""

from __future__ import annotations

import warnings

import pytest
import torch

from segevol_fast import SegVol, SegVolConfig
from segevol_fast.errors import BudgetError, SegVolFastError
from segevol_fast.inference import segment
from segevol_fast.inference.budget import estimate_exact, format_bytes

CROP = (120, 300, 300)
KW = dict(text=["liver", "spleen"], box=[30, 20, 5, 80, 70, 20], mode="exact", progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def official():
    with torch.device("meta"):
        return SegVol(SegVolConfig())


def test_exact_estimate_items_have_the_documented_sizes(official):
    V, Vc, Vp = 32 * 256 * 256, 120 * 300 * 300, 120 * 300 * 300  # the crop is bigger than a window
    total, items = estimate_exact(official, CROP, 3, device="cpu", baseline_bytes=0, output_voxels=2 * Vc)
    assert items["zoom_in"] == Vp * 40 + Vc * 13 and items["results"] == 3 * Vc * 4
    assert items["masks"] == 3 * Vc + Vc * 4 and items["output"] == 3 * 2 * Vc and items["zoom_out"] == 3 * V * 4
    assert items["not_concurrent"] == -min(items["encoder"], items["decoder"]) < 0
    assert sum(items.values()) == total
    _, small = estimate_exact(official, (20, 100, 100), 1, device="cpu", baseline_bytes=0)
    assert small["zoom_in"] == V * 40 + 20 * 100 * 100 * 13  # the ROI is padded to a whole window
    _, off = estimate_exact(official, CROP, 3, device="cpu", baseline_bytes=0, zoom_in=False)
    assert off["zoom_in"] == Vc * 8
    _, cuda = estimate_exact(official, CROP, 3, device="cuda", baseline_bytes=0)
    assert cuda["zoom_in"] == cuda["results"] == cuda["output"] == 0  # host memory: not the device's budget


def test_exact_mode_refuses_a_budget_it_cannot_meet_before_running(model, ct, monkeypatch):
    import segevol_fast.inference.exact as exact

    def must_not_run(*a, **k):
        raise AssertionError("exact inference started although the budget cannot be met")

    monkeypatch.setattr(exact, "run_exact", must_not_run)
    with pytest.raises(BudgetError) as info:
        segment(model, ct, max_memory="10MB", **KW)
    err = info.value
    assert isinstance(err, SegVolFastError) and isinstance(err, MemoryError)
    msg = str(err)
    assert "mode='exact' needs at least" in msg and format_bytes(err.required) in msg and "10.00 MB" in msg
    assert "mode='fast'" in msg  # the way out: fast mode plans within a limit


def test_exact_mode_meets_a_budget_at_its_estimate_and_records_the_plan(model, ct):
    segment(model, ct, **KW)  # warm-up: first-call allocations are not the call's own
    with pytest.raises(BudgetError) as info:
        segment(model, ct, max_memory="1MB", **KW)
    budget = info.value.required + 5_000_000  # the baseline (process RSS) is re-measured and drifts by kBs
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*max_memory.*")  # no "exact mode ignores it" warning any more
        res = segment(model, ct, max_memory=budget, **KW)
    plan = res.plan
    assert plan["max_memory"] == budget and plan["estimated_peak_bytes"] <= budget
    assert (plan["window_batch"], plan["decode_batch"], plan["prompt_group"], plan["cache_windows"]) == (1, 1, 1, 0)
    assert plan["accumulator_dtype"] == "float32" and plan["stitch_device"] == "cpu"
    assert res.peak_memory_bytes <= budget


def test_exact_mode_without_a_limit_records_its_estimate(model, ct):
    res = segment(model, ct, **KW)
    assert res.plan["max_memory"] is None and res.plan["estimated_peak_bytes"] > res.plan["breakdown"]["weights"]
