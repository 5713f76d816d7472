"""ImageEncoder against MONAI's ViT (the class SegVol uses) on identical random weights."""

from __future__ import annotations

import copy
import inspect
import re

import pytest
import torch

pytest.importorskip("monai")
pytest.importorskip("einops")

from segevol_fast.errors import ShapeError  # noqa: E402
from segevol_fast.model.config import SegVolConfig  # noqa: E402
from segevol_fast.model.image_encoder import ImageEncoder  # noqa: E402
from tests.numerics import assert_matches_reference  # noqa: E402

# MONAI >= 1.2 builds a LayerNorm for cross-attention in every block even when cross-attention is
# off; it never runs and is absent from MONAI 0.9 and from SegVol's checkpoint.
UNUSED_MONAI_KEY = re.compile(r"blocks\.\d+\.norm_cross_attn\.(weight|bias)")


def monai_vit(cfg: SegVolConfig):
    """MONAI ViT configured as SegVol builds it (reference §1), across MONAI versions."""
    from monai.networks.nets import ViT

    params = inspect.signature(ViT).parameters
    kwargs = dict(
        in_channels=cfg.in_channels, img_size=cfg.spatial_size, patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size, mlp_dim=cfg.mlp_dim, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, classification=False, dropout_rate=0.0,
    )
    # MONAI renamed pos_embed -> proj_type in 1.3; qkv_bias appeared in 1.1 (0.9 had no bias).
    kwargs["proj_type" if "proj_type" in params else "pos_embed"] = "perceptron"
    if "qkv_bias" in params:
        kwargs["qkv_bias"] = False
    return ViT(**kwargs)


def paired(cfg: SegVolConfig):
    """(MONAI ViT, our ImageEncoder) holding the same random weights, both in eval mode."""
    ref = monai_vit(cfg).eval()
    with torch.no_grad():  # move LayerNorm affines and biases off their 1 / 0 initial values
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = ImageEncoder(cfg).eval()
    ref_sd = ref.state_dict()
    wanted = {k: v for k, v in ref_sd.items() if not UNUSED_MONAI_KEY.fullmatch(k)}
    assert set(ours.state_dict()) == set(wanted), "state-dict keys differ from MONAI's"
    for k, v in ours.state_dict().items():
        assert v.shape == wanted[k].shape, k
    ours.load_state_dict(wanted, strict=True)
    return ref, ours


def monai_grid(ref, x: torch.Tensor, cfg: SegVolConfig) -> torch.Tensor:
    """MONAI tokens (B, N, C) -> SegVol's (B, C, gd, gh, gw)."""
    tokens = ref(x)[0]
    return tokens.transpose(1, 2).reshape(x.shape[0], cfg.hidden_size, *cfg.grid_size)


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
    assert sum(p.numel() for p in ours.parameters()) == 87_388_416  # reference §1
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
