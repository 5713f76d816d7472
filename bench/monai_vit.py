"""MONAI's ViT built as SegVol builds it (docs/official-pipeline.md §1), holding the same weights as our encoder.

The official image encoder is this MONAI class, so it is both the correctness reference
(tests/model/test_image_encoder.py) and the speed baseline (bench/cpu_encoder.py). MONAI is a
test/bench dependency only.
"""

from __future__ import annotations

import inspect
import re

import torch

from segevol_fast.model.config import SegVolConfig
from segevol_fast.model.image_encoder import ImageEncoder

# MONAI >= 1.2 builds a LayerNorm for cross-attention in every block even when cross-attention is
# off; it never runs and is absent from MONAI 0.9 and from SegVol's checkpoint.
UNUSED_MONAI_KEY = re.compile(r"blocks\.\d+\.norm_cross_attn\.(weight|bias)")


def monai_vit(cfg: SegVolConfig):
    """MONAI ViT configured as SegVol builds it, across MONAI versions."""
    from monai.networks.nets import ViT

    params = inspect.signature(ViT).parameters
    kwargs = dict(
        in_channels=cfg.in_channels,
        img_size=cfg.spatial_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size,
        mlp_dim=cfg.mlp_dim,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        classification=False,
        dropout_rate=0.0,
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
    wanted = {k: v for k, v in ref.state_dict().items() if not UNUSED_MONAI_KEY.fullmatch(k)}
    if set(ours.state_dict()) != set(wanted):
        raise AssertionError(f"state-dict keys differ from MONAI's: {sorted(set(ours.state_dict()) ^ set(wanted))[:6]}")
    ours.load_state_dict(wanted, strict=True)  # also checks every shape
    return ref, ours


def monai_grid(ref, x: torch.Tensor, cfg: SegVolConfig) -> torch.Tensor:
    """MONAI tokens (B, N, C) -> SegVol's (B, C, gd, gh, gw)."""
    tokens = ref(x)[0]
    return tokens.transpose(1, 2).reshape(x.shape[0], cfg.hidden_size, *cfg.grid_size)
