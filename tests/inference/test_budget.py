"""Memory limits: parsing, the cost model's monotonicity, and the planner's choices and failures.

The planner is exercised on the official architecture built on the meta device (sizes only, no
weights), with the baseline fixed, so the figures are realistic and independent of this process.
"""

from __future__ import annotations

import pytest
import torch

from segevol_fast import SegVol, SegVolConfig
from segevol_fast.errors import BudgetError, MemorySpecError, SegVolFastError
from segevol_fast.inference.budget import (
    Plan,
    estimate,
    format_bytes,
    parse_memory,
    plan_fast,
)

CROP = (120, 300, 300)


@pytest.fixture(scope="module")
def official():
    with torch.device("meta"):
        return SegVol(SegVolConfig())


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("2GB", 2_000_000_000),
        ("2 gb", 2_000_000_000),
        ("1.5G", 1_500_000_000),
        ("512MiB", 512 * 2**20),
        ("4GiB", 4 * 2**30),
        ("800 mb", 800_000_000),
        ("64k", 64_000),
        ("1e9", 1_000_000_000),
        ("123", 123),
        (123, 123),
        (2.5e9, 2_500_000_000),
        ("1TB", 10**12),
        ("100B", 100),
    ],
)
def test_parse_memory(spec, expected):
    assert parse_memory(spec) == expected


@pytest.mark.parametrize(
    "spec",
    ["", "GB", "two GB", "2 bananas", "1.5.2GB", "-1GB", "0", 0, -5, True, float("nan"), float("inf"), None, [2]],
)
def test_parse_memory_rejects_junk(spec):
    with pytest.raises(MemorySpecError, match="memory size"):
        parse_memory(spec)
    assert issubclass(MemorySpecError, (SegVolFastError, ValueError))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_estimate_is_monotone_in_crop_size_and_prompts(official, device):
    def total(crop, n, **kw):
        return estimate(official, crop, n, device=device, baseline_bytes=0, **kw)[0]

    crops = [(20, 100, 100), (60, 200, 200), (120, 300, 300), (300, 512, 512)]
    for kw in (dict(), dict(prompt_group=4, accumulator_dtype=torch.float32), dict(return_logits=True)):
        assert all(total(a, 3, **kw) < total(b, 3, **kw) for a, b in zip(crops, crops[1:]))
        assert all(total(CROP, n, **kw) < total(CROP, n + 1, **kw) for n in (1, 2, 5, 20))
    assert total(CROP, 2, window_batch=2) > total(CROP, 2, window_batch=1)
    assert total(CROP, 2, accumulator_dtype=torch.float32) > total(CROP, 2, accumulator_dtype=torch.float16)


def test_estimate_items_have_the_documented_sizes(official):
    _, items = estimate(
        official,
        CROP,
        2,
        device="cuda",
        baseline_bytes=0,
        accumulator_dtype=torch.float32,
        prompt_group=2,
        cache_windows=3,
    )
    voxels = 120 * 300 * 300
    assert items["weights"] == sum(p.numel() * 4 for p in official.parameters()) + sum(
        b.numel() * b.element_size() for b in official.buffers()
    )
    band = 32 * 300 * 300  # one window depth of D-rows over the whole crop
    assert items["accumulators"] == 2 * band * 4  # float32 row sums of the 2 prompts stitched together
    assert items["embedding_cache"] == 3 * 768 * 2048 * 4
    assert items["masks"] == items["output"] == 0  # on CUDA the results live in host memory
    assert "crop_image" not in items  # fast mode reads windows from the scan: no crop copy
    _, cpu = estimate(official, CROP, 2, device="cpu", baseline_bytes=0, output_voxels=2 * voxels)
    assert cpu["masks"] == 2 * voxels and cpu["output"] == 2 * 2 * voxels
    assert cpu["encoder"] == items["encoder"]  # no S×S attention term on either device
    _, probs = estimate(official, CROP, 2, device="cpu", baseline_bytes=0, return_logits=True)
    assert probs["logits"] == 2 * voxels * 2 and probs["output"] == 2 * voxels * 5  # fp16 sums; mask + fp32 prob


def test_accumulators_are_bounded_by_one_window_depth(official):
    def acc(crop):
        return estimate(official, crop, 1, device="cpu", baseline_bytes=0, accumulator_dtype=torch.float32)[1]

    assert acc((300, 512, 512))["accumulators"] == acc((32, 512, 512))["accumulators"] == 32 * 512 * 512 * 4
    assert acc((20, 512, 512))["accumulators"] == 20 * 512 * 512 * 4


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_no_limit_takes_the_largest_settings(official, device):
    plan = plan_fast(official, CROP, 3, None, device, baseline_bytes=0)
    assert (plan.window_batch, plan.accumulator_dtype, plan.prompt_group, plan.decode_batch) == (8, torch.float32, 3, 3)
    assert plan.stitch_device == torch.device(device)
    assert plan.cache_windows == 0  # one prompt group encodes each window once: a cache would never hit


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_smaller_budget_shrinks_the_batch_then_the_accumulators(official, device):
    def total(**kw):
        return estimate(official, CROP, 4, device=device, baseline_bytes=10**8, **kw)[0]

    fp32_min = total(accumulator_dtype=torch.float32)
    fp32_max = total(accumulator_dtype=torch.float32, window_batch=8)
    mid = (fp32_min + fp32_max) // 2
    plan = plan_fast(official, CROP, 4, mid, device, baseline_bytes=10**8)
    assert plan.accumulator_dtype == torch.float32 and 1 <= plan.window_batch < 8
    assert plan.estimated_peak_bytes <= mid
    assert sum(plan.breakdown.values()) == plan.estimated_peak_bytes

    plan = plan_fast(official, CROP, 4, fp32_min - 1, device, baseline_bytes=10**8)
    if device == "cuda":
        # stitching moves to the CPU (where the device budget does not count the accumulators)
        # before they lose precision
        assert plan.stitch_device == torch.device("cpu") and plan.accumulator_dtype == torch.float32
        assert plan.estimated_peak_bytes < fp32_min
    else:
        assert plan.accumulator_dtype == torch.float16
        assert total(accumulator_dtype=torch.float16) <= plan.estimated_peak_bytes < fp32_min


def test_the_cache_takes_what_is_left_when_prompts_stitch_in_groups(official):
    # room for 20 of 60 prompts' row sums plus one cached window, which is less than a 21st prompt;
    # decoding all 20 at once costs nothing extra: the decoder then needs less than the 8-window
    # encoder, and the two never run together
    n, window = 60, 768 * 2048 * 4
    fixed = dict(device="cuda", baseline_bytes=0, accumulator_dtype=torch.float32, window_batch=8, decode_batch=20)
    limit = estimate(official, CROP, n, prompt_group=20, **fixed)[0] + int(window * 1.1) + 1
    assert estimate(official, CROP, n, prompt_group=21, **fixed)[0] > limit
    plan = plan_fast(official, CROP, n, limit, "cuda", baseline_bytes=0)
    assert (plan.window_batch, plan.prompt_group, plan.decode_batch, plan.cache_windows) == (8, 20, 20, 1)
    assert (
        plan.estimated_peak_bytes <= limit < estimate(official, CROP, n, prompt_group=20, cache_windows=2, **fixed)[0]
    )


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_an_impossible_budget_fails_up_front_naming_the_minimum(official, device):
    need = estimate(
        official, CROP, 3, device=device, baseline_bytes=5 * 10**8, accumulator_dtype=torch.float16, stitch_device="cpu"
    )[0]
    with pytest.raises(BudgetError) as info:
        plan_fast(official, CROP, 3, "1GB", device, baseline_bytes=5 * 10**8)
    err = info.value
    assert isinstance(err, SegVolFastError) and isinstance(err, MemoryError)
    assert err.required == need and err.limit == 10**9
    msg = str(err)
    assert format_bytes(need) in msg and "1.00 GB" in msg and "Biggest items" in msg and "weights" in msg


def test_plan_validates_its_fields():
    with pytest.raises(ValueError):
        Plan(device="cpu", accumulator_dtype=torch.bfloat16)
    with pytest.raises(ValueError):
        Plan(device="cpu", window_batch=0)
    assert Plan(device="cpu").stitch_device == torch.device("cpu")


def test_planning_the_real_tiny_model_measures_the_process(monkeypatch):
    from segevol_fast.inference.memory import current_rss

    model = SegVol(SegVolConfig.tiny())
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))  # 6.8 MB
    rss_before = current_rss()
    plan = plan_fast(model, (20, 70, 90), 2, "100GB")
    rss_after = current_rss()
    # the baseline is this process's RSS less the weights (counted once, as their own item): a
    # baseline left at 0, or one that counts the weights twice, is off by more than the 1 MB slack
    slack = 1_000_000
    baseline = plan.breakdown["baseline"]
    assert min(rss_before, rss_after) - weights - slack <= baseline <= max(rss_before, rss_after) - weights + slack
    assert plan.breakdown["weights"] == weights
    assert plan.estimated_peak_bytes == sum(plan.breakdown.values())
    with pytest.raises(BudgetError):
        plan_fast(model, (20, 70, 90), 2, "1MB")
