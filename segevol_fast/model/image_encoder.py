"""SegVol's image encoder: the MONAI 0.9 `ViT` as SegVol builds it (docs/official-pipeline.md §1).

Perceptron patch embedding with a learned position embedding, `num_layers` pre-norm transformer
blocks (qkv without bias, exact-erf GELU MLP), a final LayerNorm, no class token, no dropout.
Parameter names equal MONAI's, so `state_dict()` keys equal the official checkpoint's
`image_encoder.*` keys. The forward fuses patchify + Linear + bias + position embedding into one
`ops.patch_embed` call and routes attention through `model.attention.attention`.
"""

from __future__ import annotations

import contextvars
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..errors import ShapeError
from .attention import attention
from .config import SegVolConfig
from .layers import LayerNorm32, wide_dtype


class PatchEmbedding(nn.Module):
    """Holds the patch projection and position embedding under MONAI's names.

    `patch_embeddings` is a Sequential whose index 0 stands in for MONAI's parameter-free
    `Rearrange`, so the Linear's keys are `patch_embeddings.1.{weight,bias}` as in the checkpoint.
    """

    def __init__(self, config: SegVolConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.patch_embeddings = nn.Sequential(nn.Identity(), nn.Linear(config.patch_dim, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_patches, config.hidden_size))
        # MONAI initialises the position embedding with a truncated normal of std 0.02.
        nn.init.trunc_normal_(self.position_embeddings, std=0.02, a=-2.0, b=2.0)

    def forward(self, x: Tensor, scale: float = 1.0, shift: float = 0.0) -> Tensor:
        """x (B, C, D, H, W) -> tokens (B, N, hidden), with x*scale+shift applied first."""
        proj = self.patch_embeddings[1]
        # tokens start the residual stream: float32 under autocast whatever the weights' dtype
        # (the op takes one dtype for all its inputs: x comes in the same `wide_dtype`)
        dtype = wide_dtype(proj.weight)
        bias = None if proj.bias is None else proj.bias.to(dtype)
        pos = self.position_embeddings.to(dtype)
        return ops.patch_embed(x.to(dtype), proj.weight.to(dtype), bias, pos, self.patch_size, scale, shift)


class SelfAttention(nn.Module):
    """MONAI SABlock: qkv Linear without bias, split [q | k | v] each head-major, out_proj."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, S, hidden) -> (B, S, hidden)."""
        B, S, C = x.shape
        # (B, S, 3*C) -> (3, B, heads, S, head_dim): the 3*C axis is (qkv, head, head_dim).
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v)  # (B, heads, S, head_dim)
        return self.out_proj(out.transpose(1, 2).reshape(B, S, C))


class MLP(nn.Module):
    """MONAI MLPBlock: linear1 -> GELU (exact erf) -> linear2."""

    def __init__(self, hidden: int, mlp_dim: int):
        super().__init__()
        self.linear1 = nn.Linear(hidden, mlp_dim)
        self.linear2 = nn.Linear(mlp_dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, S, hidden) -> (B, S, hidden)."""
        return self.linear2(F.gelu(self.linear1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, config: SegVolConfig):
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self.norm1 = LayerNorm32(hidden, eps=eps)
        self.attn = SelfAttention(hidden, config.num_heads)
        self.norm2 = LayerNorm32(hidden, eps=eps)
        self.mlp = MLP(hidden, config.mlp_dim)
        # Adapter seams (segevol_fast.adapters): residual side branches, None = the official block.
        self.on_attn_out: Optional[nn.Module] = None  # a -> a + on_attn_out(a), a the attention output
        self.after_attn: Optional[nn.Module] = None  # x -> x + after_attn(x), after the attention residual
        self.beside_mlp: Optional[nn.Module] = None  # parallel to the MLP, on the same normed input

    def forward(self, x: Tensor) -> Tensor:
        """x (B, S, hidden) -> (B, S, hidden)."""
        if self.on_attn_out is None:
            x = x + self.attn(self.norm1(x))
        else:
            a = self.attn(self.norm1(x))
            x = x + (a + self.on_attn_out(a))
        if self.after_attn is not None:
            x = x + self.after_attn(x)
        h = self.norm2(x)
        out = x + self.mlp(h)
        if self.beside_mlp is not None:
            out = out + self.beside_mlp(h)
        return out


class ImageEncoder(nn.Module):
    """Volume (B, 1, D, H, W) -> feature grid (B, hidden, gd, gh, gw); officially
    (B, 1, 32, 256, 256) -> (B, 768, 8, 16, 16).

    Set `gradient_checkpointing = True` to recompute each block in the backward pass instead of
    storing its activations (only while autograd is recording). The recompute runs in the context
    variables of the forward call, so what adapters read from them (a mixture's route, the prompt
    context) is the same in both passes although backward runs after the caller's `with` blocks.
    """

    def __init__(self, config: SegVolConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.patch_embedding = PatchEmbedding(config)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_layers))
        self.norm = LayerNorm32(config.hidden_size, eps=config.layer_norm_eps)
        # Adapter seams, None = the official encoder. beside_patch_embed: (window, input_scale,
        # input_shift) -> (B, N, hidden) added to the patch tokens (a rotation-robust branch);
        # after_encoder: tokens (B, N, hidden) -> tokens, after the final norm (context priors).
        self.beside_patch_embed: Optional[nn.Module] = None
        self.after_encoder: Optional[nn.Module] = None

    def forward(self, x: Tensor, input_scale: float = 1.0, input_shift: float = 0.0) -> Tensor:
        """Encode a batch of volumes.

        Args:
            x: (B, in_channels, D, H, W) with (D, H, W) == config.spatial_size exactly (the
                position embedding has a fixed token count and is never interpolated).
                Converted to the encoder's parameter dtype (float32 under autocast).
            input_scale, input_shift: optional affine x*scale+shift fused into the patch
                embedding (e.g. an intensity normalisation), so it is never materialised.

        Returns:
            (B, hidden, gd, gh, gw), a view of the (B, N, hidden) tokens after the final norm
            (SegVol's transpose + view; not contiguous).
        """
        cfg = self.config
        expected = (cfg.in_channels, *cfg.spatial_size)
        if x.dim() != 5 or tuple(x.shape[1:]) != expected:
            raise ShapeError(
                f"image encoder expects a (B, {cfg.in_channels}, {', '.join(map(str, cfg.spatial_size))}) volume, "
                f"got shape {tuple(x.shape)}; resize or crop to config.spatial_size first"
            )
        x = x.to(wide_dtype(self.norm.weight))
        tokens = self.patch_embedding(x, input_scale, input_shift)  # (B, N, hidden)
        if self.beside_patch_embed is not None:
            # added after the fused position embedding: the sum is the same in either order, and
            # the patch embedding stays one fused op
            tokens = tokens + self.beside_patch_embed(x, input_scale, input_shift)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                # each block runs (now and in its recompute) in a snapshot of this call's context
                tokens = checkpoint(contextvars.copy_context().run, block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)
        tokens = self.norm(tokens)
        if self.after_encoder is not None:
            tokens = self.after_encoder(tokens)
        B, _, C = tokens.shape
        return tokens.transpose(1, 2).view(B, C, *cfg.grid_size)
