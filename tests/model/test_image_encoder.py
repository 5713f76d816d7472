"""ImageEncoder against MONAI's ViT (the class SegVol uses) on identical random weights."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("monai")
pytest.importorskip("einops")

from bench.monai_vit import monai_grid, paired  # noqa: E402
from segevol_fast.errors import ShapeError  # noqa: E402
from segevol_fast.model.config import SegVolConfig  # noqa: E402
from segevol_fast.model.image_encoder import ImageEncoder  # noqa: E402
from tests.numerics import assert_matches_reference  # noqa: E402


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def test_matches_monai_tiny():
    cfg = SegVolConfig.tiny()
    ref, ours = paired(cfg)
    x = torch.rand(2, 1, *cfg.spatial_size)
    with torch.no_grad():
        out = ours(x)
        ref32 = monai_grid(ref, x, cfg)
        exact = monai_grid(copy.deepcopy(ref).double(), x.double(), cfg)
    assert out.shape == (2, cfg.hidden_size, *cfg.grid_size) and out.dtype == torch.float32
    err = rel_err(out, ref32)
    print(f"tiny: rel err vs MONAI fp32 {err:.2e}")
    assert err <= 1e-5
    assert_matches_reference(out, ref32, exact, "tiny image encoder")


@pytest.mark.slow  # ~30 s on 2 CPU cores (MONAI's forward alone is ~17 s)
def test_matches_monai_official_config():
    cfg = SegVolConfig()
    ref, ours = paired(cfg)
    assert sum(p.numel() for p in ours.parameters()) == 87_388_416  # docs/official-pipeline.md §1
    x = torch.rand(1, 1, *cfg.spatial_size)
    with torch.no_grad():
        out = ours(x)
        expected = monai_grid(ref, x, cfg)
    assert out.shape == (1, 768, 8, 16, 16)
    err = rel_err(out, expected)
    print(f"official config: rel err vs MONAI {err:.2e}")
    assert err <= 1e-5


def test_input_affine_is_fused():
    cfg = SegVolConfig.tiny()
    enc = ImageEncoder(cfg).eval()
    x = torch.rand(1, 1, *cfg.spatial_size)
    with torch.no_grad():
        assert rel_err(enc(x, input_scale=2.5, input_shift=-0.3), enc(x * 2.5 - 0.3)) <= 1e-5


@pytest.mark.parametrize("shape", [(1, 1, 8, 32, 16), (1, 2, 8, 32, 32), (1, 8, 32, 32), (1, 1, 12, 32, 32)])
def test_wrong_shape_raises(shape):
    enc = ImageEncoder(SegVolConfig.tiny())
    with pytest.raises(ShapeError, match="spatial_size"):
        enc(torch.rand(shape))


def test_backward_matches_monai_and_checkpointing():
    cfg = SegVolConfig.tiny()
    ref, ours = paired(cfg)
    x = torch.rand(2, 1, *cfg.spatial_size)
    w = torch.randn(2, cfg.hidden_size, *cfg.grid_size)

    def grads(fn, module):
        module.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        (fn(xi) * w).sum().backward()
        g = {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}
        return g, xi.grad

    g_ref, gx_ref = grads(lambda xi: monai_grid(ref, xi, cfg), ref)
    g_plain, gx_plain = grads(ours, ours)
    ours.gradient_checkpointing = True
    g_ckpt, gx_ckpt = grads(ours, ours)

    assert set(g_plain) == {k for k, _ in ours.named_parameters()}, "some parameter got no gradient"
    for k, g in g_plain.items():
        assert torch.isfinite(g).all(), k
        assert rel_err(g, g_ref[k]) <= 1e-5, f"{k}: grad differs from MONAI's"
        assert rel_err(g_ckpt[k], g) <= 1e-6, f"{k}: checkpointed grad differs"
    assert rel_err(gx_plain, gx_ref) <= 1e-5
    assert rel_err(gx_ckpt, gx_plain) <= 1e-6
