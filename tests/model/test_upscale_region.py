"""The decoder's upscaling over a region of the low-res grid and the region upsample, against the
whole computation cropped (float32 tolerance of tests/numerics.py, float64 as the exact result),
and the cached token-order parameters following weight changes and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from segevol_fast.errors import ShapeError
from segevol_fast.model.config import SegVolConfig
from segevol_fast.model.mask_decoder import MaskDecoder
from segevol_fast.model.region_upsample import low_res_box, upsample_box
from segevol_fast.model.upscale import upscale_project
from tests.model.test_mask_decoder import inputs, randomise
from tests.numerics import assert_matches_reference

CFG = SegVolConfig.tiny()
GRID = tuple(CFG.grid_size)
LOW = tuple(4 * g for g in GRID)


def _random_box(shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
    lo = [int(torch.randint(0, n, ())) for n in shape]
    hi = [int(torch.randint(a + 1, n + 1, ())) for a, n in zip(lo, shape)]
    return tuple(lo), tuple(hi)


def _crop(x, box):
    return x[(slice(None), slice(None)) + tuple(slice(a, b) for a, b in zip(*box))]


@pytest.fixture
def decoder():
    return randomise(MaskDecoder(CFG)).eval()


@pytest.mark.parametrize("trial", range(4))
def test_region_upscale_equals_the_whole_upscale_cropped(decoder, trial):
    B, S, C = 3, CFG.num_patches, CFG.hidden_size
    src, weights = torch.randn(B, S, C), torch.randn(B, C // 8)
    box = _random_box(LOW) if trial else ((0, 0, 0), LOW)
    with torch.no_grad():
        out = upscale_project(src, weights, decoder.output_upscaling, GRID, box)
        same = _crop(upscale_project(src, weights, decoder.output_upscaling, GRID), box)
        up64 = copy.deepcopy(decoder.output_upscaling).double()
        exact = _crop(upscale_project(src.double(), weights.double(), up64, GRID), box)
    assert_matches_reference(out, same, exact, "region upscale")


@pytest.mark.parametrize("small", [True, False])
def test_layernorm_statistics_from_the_gram_matrix(decoder, monkeypatch, small):
    """A box over under half the tokens takes the LayerNorm's statistics from the tokens' Gram
    matrix (no full ConvT1); a larger one from ConvT1's output. Both equal the whole path cropped."""
    from segevol_fast.model import upscale

    used, real = [], upscale._moments
    monkeypatch.setattr(upscale, "_moments", lambda *a: used.append(1) or real(*a))
    B, S, C = 2, CFG.num_patches, CFG.hidden_size
    src, weights = 3 * torch.randn(B, S, C) + 1, torch.randn(B, C // 8)  # a mean far from 0: no cancellation
    box = ((1, 0, 2), (4, 4, 6)) if small else ((0, 0, 0), (LOW[0], LOW[1], 5))
    with torch.no_grad():
        out = upscale_project(src, weights, decoder.output_upscaling, GRID, box)
        same = _crop(upscale_project(src, weights, decoder.output_upscaling, GRID), box)
        exact = _crop(
            upscale_project(src.double(), weights.double(), copy.deepcopy(decoder.output_upscaling).double(), GRID), box
        )
    assert bool(used) == small
    assert_matches_reference(out, same, exact, "region upscale, Gram statistics" if small else "region upscale")


def test_decoder_region_equals_the_module_reference_cropped(decoder):
    x = inputs(B=2, image_batch=2)
    box = _random_box(LOW)
    with torch.no_grad():
        fused = decoder(**x, region=box)
        decoder.fused_upscale = False
        module = decoder(**x, region=box)
        whole = _crop(decoder(**x), box)
    assert fused.shape == module.shape == whole.shape
    torch.testing.assert_close(module, whole, rtol=0, atol=0)
    torch.testing.assert_close(fused, module, rtol=1e-4, atol=1e-5)


def test_cached_layout_follows_in_place_weight_changes(decoder):
    B, S, C = 2, CFG.num_patches, CFG.hidden_size
    src, weights = torch.randn(B, S, C), torch.randn(B, C // 8)
    up = decoder.output_upscaling
    with torch.inference_mode():
        before = upscale_project(src, weights, up, GRID)
    with torch.no_grad():
        for p in (up[0].weight, up[1].weight, up[3].bias):
            p.mul_(1.5)
    with torch.inference_mode():
        after = upscale_project(src, weights, up, GRID)
        fresh = upscale_project(src, weights, copy.deepcopy(up), GRID)  # nothing cached for a copy
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh, rtol=0, atol=0)


def test_gradients_reach_every_upscaling_parameter(decoder):
    B, S, C = 2, CFG.num_patches, CFG.hidden_size
    src, weights = torch.randn(B, S, C, requires_grad=True), torch.randn(B, C // 8)
    with torch.inference_mode():
        upscale_project(src.detach(), weights, decoder.output_upscaling, GRID)  # a cached layout exists
    upscale_project(src, weights, decoder.output_upscaling, GRID).square().sum().backward()
    up = decoder.output_upscaling
    for p in (up[0].weight, up[0].bias, up[1].weight, up[1].bias, up[3].weight, up[3].bias, src):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("trial", range(6))
def test_region_upsample_equals_interpolate_cropped(trial):
    low_shape = (CFG.spatial_size[0], *LOW[1:]) if trial % 2 else (5, 7, 9)
    size = tuple(CFG.spatial_size) if trial % 2 else (13, 28, 9)
    low = torch.randn(2, 1, *low_shape)
    box = _random_box(size) if trial > 1 else ((0, 0, 0), size)
    lb = low_res_box(low_shape, size, box)
    out = upsample_box(_crop(low, lb), lb[0], low_shape, size, box)
    same = _crop(F.interpolate(low, size=size, mode="trilinear", align_corners=False), box)
    exact = _crop(F.interpolate(low.double(), size=size, mode="trilinear", align_corners=False), box)
    assert_matches_reference(out, same, exact, "region upsample")


@pytest.mark.parametrize("region", [((0, 0, 0), (0, 4, 4)), ((0, 0, 0), (LOW[0] + 1, 4, 4)), ((-1, 0, 0), (2, 2, 2))])
def test_a_region_outside_the_low_res_grid_is_refused(decoder, region):
    with pytest.raises(ShapeError, match="region"):
        decoder(**inputs(B=1), region=region)


@pytest.mark.parametrize("trial", range(3))
def test_network_decode_of_a_region_equals_the_whole_decode_cropped(trial):
    from segevol_fast.model.network import SegVolNetwork

    net = randomise(SegVolNetwork(CFG)).eval()
    emb = torch.randn(1, CFG.hidden_size, *GRID)
    boxes = torch.tensor([[1.0, 2, 3, 5, 20, 25], [0, 0, 0, 7, 31, 31]])
    size = tuple(CFG.spatial_size)
    box = _random_box(size) if trial else ((0, 0, 0), size)
    with torch.no_grad():
        out = net.decode(emb, boxes=boxes, region=box)
        same = _crop(net.decode(emb, boxes=boxes), box)
        with torch.autocast("cpu", enabled=False):
            net64 = copy.deepcopy(net).double()
            exact = _crop(net64.decode(emb.double(), boxes=boxes.double()), box)
    assert_matches_reference(out, same, exact.float(), "decode region")
    with pytest.raises(ValueError, match="upsample"):
        net.decode(emb, boxes=boxes, region=box, upsample=False)
