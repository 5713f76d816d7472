"""The cost model's figures, pinned: both modes' estimates on a few configurations (CPU and CUDA,
fp32 and reduced precision, with and without zoom-in / logits) must not move when the model's code
is reorganised. A deliberate change of the model updates these numbers with it.

The official architecture on the meta device (sizes only) with a fixed baseline, so the figures do
not depend on this process or machine.
"""

from __future__ import annotations

import pytest
import torch

from segevol_fast import SegVol, SegVolConfig
from segevol_fast.inference.budget import estimate, estimate_exact

VC = 120 * 300 * 300
SHARED = ("weights", "baseline", "autocast_weights", "zoom_out", "encoder")
FAST_ITEMS = SHARED + ("embedding_cache", "decoder", "coarse", "accumulators", "masks", "logits", "output")
EXACT_ITEMS = SHARED + ("decoder", "zoom_in", "results", "masks", "output")
WEIGHTS = 723564864  # the official architecture's parameters and buffers
AUTOCAST = 234662560  # half the encoder side: autocast's 16-bit copies

# (crop, prompts, precision, keyword arguments) -> total, the items (FAST_ITEMS / EXACT_ITEMS
# order), not_concurrent, slack
FAST = [
    (
        ((120, 300, 300), 3, "fp32"),
        dict(device="cpu", window_batch=6, accumulator_dtype=torch.float32, cache_windows=5, decode_batch=2),
        dict(prompt_group=2, return_logits=True, output_voxels=2 * VC),
        2182299635,
        (0, 8388608, 616562688, 31457280, 165675008, 37748736, 23040000, 32400000, 129600000, 324000000),
        (-165675008, 254537459),
    ),
    (
        ((40, 200, 180), 2, "bf16"),
        dict(device="cuda:0", stitch_device="cpu", window_batch=8, accumulator_dtype=torch.float16),
        dict(cache_windows=3, decode_batch=1, prompt_group=1),
        1986600342,
        (AUTOCAST, 16777216, 754974720, 18874368, 130023424, 0, 0, 0, 0, 0),
        (-130023424, 236746614),
    ),
    (
        ((40, 200, 180), 4, "fp32"),
        dict(device="cuda:0", window_batch=3, decode_batch=4),
        dict(prompt_group=4, return_logits=True),
        1378737843,
        (0, 16777216, 396361728, 0, 236978176, 50331648, 9216000, 0, 0, 0),
        (-236978176, 181486387),
    ),
]
EXACT = [
    (
        ((120, 300, 300), 3, "fp32"),
        dict(device="cpu", return_logits=True, output_voxels=2 * VC),
        2243557632,
        (0, 25165824, 132120576, 130023424, 572400000, 129600000, 75600000, 324000000),
        (-130023424, 260106368),
    ),
    (
        ((20, 100, 300), 0, "bf16"),
        dict(device="cpu", zoom_in=False),
        1299499580,
        (AUTOCAST, 25165824, 94371840, 130023424, 4800000, 2400000, 3000000, 600000),
        (-94371840, 174282908),
    ),
    (
        ((40, 200, 180), 2, "fp16"),
        dict(device="cuda:0"),
        1269164643,
        (AUTOCAST, 8388608, 94371840, 130023424, 0, 0, 0, 0),
        (-94371840, 171525187),
    ),
]


@pytest.fixture
def official():
    with torch.device("meta"):
        return SegVol(SegVolConfig())


def _expected(names, values, tail) -> dict[str, int]:
    out = dict(zip(names, (WEIGHTS, 1_000_000) + values, strict=True))
    out["not_concurrent"], out["slack"] = tail
    return out


@pytest.mark.parametrize("call,kw,plan,total,values,tail", FAST)
def test_fast_estimate_is_pinned(official, call, kw, plan, total, values, tail):
    crop, n, official.precision = call
    got = estimate(official, crop, n, baseline_bytes=1_000_000, **kw, **plan)
    assert got == (total, _expected(FAST_ITEMS, values, tail))


@pytest.mark.parametrize("call,kw,total,values,tail", EXACT)
def test_exact_estimate_is_pinned(official, call, kw, total, values, tail):
    crop, n, official.precision = call
    got = estimate_exact(official, crop, n, baseline_bytes=1_000_000, **kw)
    assert got == (total, _expected(EXACT_ITEMS, values, tail))


def test_weights_cast_by_the_user_have_no_autocast_copies(official):
    """Autocast copies fp32 weights into 16 bits; weights already in bf16 are used as they are."""
    official.precision = "bf16"
    _, fp32 = estimate(official, (40, 200, 180), 2, baseline_bytes=1_000_000, device="cpu")
    official.to(torch.bfloat16)
    _, cast = estimate(official, (40, 200, 180), 2, baseline_bytes=1_000_000, device="cpu")
    assert fp32["autocast_weights"] == AUTOCAST and cast["autocast_weights"] == 0
    assert cast["weights"] < 0.51 * fp32["weights"]  # halved, but for a few buffers kept in float32
