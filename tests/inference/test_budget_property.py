"""Property tests of the memory planner on the phantom: a plan it accepts never exceeds its budget,
its choices grow with the budget, and (slow, a few examples) a real call stays within the budget.

The planning properties use the official architecture on the meta device (sizes only) with a fixed
baseline, so hundreds of plans cost milliseconds; the measured examples run the full-size model.
"""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from segevol_fast import SegVol, SegVolConfig  # noqa: E402
from segevol_fast.errors import BudgetError  # noqa: E402
from segevol_fast.inference.budget import estimate, plan_exact, plan_fast  # noqa: E402
from segevol_fast.phantom import make_phantom  # noqa: E402
from segevol_fast.preprocess import preprocess  # noqa: E402

BASELINE = 400_000_000
GB = 10**9


@pytest.fixture(scope="module")
def official():
    with torch.device("meta"):
        return SegVol(SegVolConfig())


@pytest.fixture(scope="module")
def crop_shapes():
    """Crops of a few phantom sizes, as segment() would plan them."""
    shapes = []
    for shape in [(64, 64, 24), (160, 160, 64), (240, 200, 40)]:
        vol, _, _ = make_phantom(shape)
        shapes.append(preprocess(vol.array, lazy=True).crop_shape)
    return shapes


def _minimum(model, crop, n, device) -> int:
    with pytest.raises(BudgetError) as info:
        plan_fast(model, crop, n, 1, device, baseline_bytes=BASELINE)
    return info.value.required


def _key(plan, device) -> tuple:
    """The planner's choices in its order of priority (module docstring of budget.py)."""
    return (
        plan.accumulator_dtype == torch.float32,
        plan.stitch_device.type == torch.device(device).type,
        plan.window_batch,
        plan.prompt_group,
        plan.decode_batch,
        plan.cache_windows,
    )


@given(
    which=st.integers(0, 2),
    n=st.integers(1, 12),
    device=st.sampled_from(["cpu", "cuda"]),
    extra=st.lists(st.integers(0, 4 * GB), min_size=2, max_size=2),
)
def test_accepted_plans_stay_within_budget_and_grow_with_it(official, crop_shapes, which, n, device, extra):
    crop = crop_shapes[which]
    low = _minimum(official, crop, n, device)
    budgets = sorted(low + e for e in extra)
    plans = [plan_fast(official, crop, n, b, device, baseline_bytes=BASELINE) for b in budgets]
    for plan, budget in zip(plans, budgets):
        assert plan.estimated_peak_bytes <= budget and plan.max_memory == budget
        total, _ = estimate(
            official,
            crop,
            n,
            device=device,
            baseline_bytes=BASELINE,
            window_batch=plan.window_batch,
            accumulator_dtype=plan.accumulator_dtype,
            stitch_device=plan.stitch_device,
            cache_windows=plan.cache_windows,
            decode_batch=plan.decode_batch,
            prompt_group=plan.prompt_group,
        )
        assert total == plan.estimated_peak_bytes  # the recorded estimate is the cost model's
    assert _key(plans[0], device) <= _key(plans[1], device)
    # one byte under the minimum is refused, the minimum itself is accepted
    with pytest.raises(BudgetError):
        plan_fast(official, crop, n, low - 1, device, baseline_bytes=BASELINE)
    assert plan_fast(official, crop, n, low, device, baseline_bytes=BASELINE).estimated_peak_bytes <= low


@given(which=st.integers(0, 2), n=st.integers(1, 12), zoom_in=st.booleans(), extra=st.integers(-GB, GB))
def test_exact_mode_accepts_exactly_the_budgets_above_its_estimate(official, crop_shapes, which, n, zoom_in, extra):
    crop = crop_shapes[which]
    need = plan_exact(official, crop, n, None, "cpu", zoom_in=zoom_in, baseline_bytes=BASELINE).estimated_peak_bytes
    budget = need + extra
    if budget < need:
        with pytest.raises(BudgetError) as info:
            plan_exact(official, crop, n, budget, "cpu", zoom_in=zoom_in, baseline_bytes=BASELINE)
        assert info.value.required == need and "mode='exact'" in str(info.value)
    else:
        plan = plan_exact(official, crop, n, budget, "cpu", zoom_in=zoom_in, baseline_bytes=BASELINE)
        assert plan.estimated_peak_bytes == need <= budget and plan.window_batch == plan.decode_batch == 1


@pytest.fixture(scope="module")
def full_model(data_dir):
    torch.manual_seed(0)
    m = SegVol(SegVolConfig(), tokenizer=data_dir / "clip_tokenizer").eval()
    m.weights_source = "test (random, full size)"
    return m


@pytest.mark.slow
@settings(max_examples=2)
@given(fraction=st.floats(0.0, 1.0), n=st.integers(1, 3))
def test_a_real_call_stays_within_an_accepted_budget(full_model, fraction, n):
    """Full-size model, small phantom: a budget drawn between the planner's minimum and 1 GB
    above it is met by the measured peak (process RSS) of the whole call."""
    vol, _, _ = make_phantom((64, 64, 24))
    organs = ["liver", "spleen", "stomach"][:n]
    with pytest.raises(BudgetError) as info:
        full_model.segment(vol, text=organs, max_memory=1, progress=False)
    # the baseline (process RSS) is measured again by the next call and drifts by a few MB
    budget = int(info.value.required + 20_000_000 + fraction * GB)
    res = full_model.segment(vol, text=organs, max_memory=budget, progress=False)
    assert res.plan["estimated_peak_bytes"] <= budget
    assert res.peak_memory_bytes <= budget
