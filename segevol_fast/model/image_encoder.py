"""SegVol's image encoder: the MONAI 0.9 `ViT` as SegVol builds it (docs/official-pipeline.md §1).

Perceptron patch embedding with a learned position embedding, `num_layers` pre-norm transformer
blocks (qkv without bias, exact-erf GELU MLP), a final LayerNorm, no class token, no dropout.
Parameter names equal MONAI's, so `state_dict()` keys equal the official checkpoint's
`image_encoder.*` keys. The forward fuses patchify + Linear + bias + position embedding into one
`ops.patch_embed` call and routes attention through `model.attention.attention`.

`ImageEncoder.encode_box` encodes only a box of the token grid (the tokens of a zoom-in window
that hold image, when the window is mostly zero padding): the same embedding and blocks, with the
position embeddings of the box's true grid positions, over fewer tokens.
"""

from __future__ import annotations

import contextvars
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..errors import AdapterError, ShapeError
from .attention import attention
from .config import SegVolConfig
from .layers import LayerNorm32, wide_dtype

Triple = tuple[int, int, int]
TokenBox = tuple[Triple, Triple]  # (lo, hi) of a box of the token grid, hi exclusive


class PatchEmbedding(nn.Module):
    """Holds the patch projection and position embedding under MONAI's names.

    `patch_embeddings` is a Sequential whose index 0 stands in for MONAI's parameter-free
    `Rearrange`, so the Linear's keys are `patch_embeddings.1.{weight,bias}` as in the checkpoint.
    """

    def __init__(self, config: SegVolConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.grid_size = config.grid_size
        self.patch_embeddings = nn.Sequential(nn.Identity(), nn.Linear(config.patch_dim, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_patches, config.hidden_size))
        # MONAI initialises the position embedding with a truncated normal of std 0.02.
        nn.init.trunc_normal_(self.position_embeddings, std=0.02, a=-2.0, b=2.0)

    def forward(self, x: Tensor, scale: float = 1.0, shift: float = 0.0, box: Optional[TokenBox] = None) -> Tensor:
        """x (B, C, D, H, W) -> tokens (B, N, hidden), with x*scale+shift applied first.

        box: None (x is the whole window), or the (lo, hi) token box x covers in the full token
            grid: its tokens get the position embeddings of those grid positions.
        """
        proj = self.patch_embeddings[1]
        # tokens start the residual stream: float32 under autocast whatever the weights' dtype
        # (the op takes one dtype for all its inputs: x comes in the same `wide_dtype`)
        dtype = wide_dtype(proj.weight)
        bias = None if proj.bias is None else proj.bias.to(dtype)
        pos = self.position_embeddings.to(dtype)
        if box is not None:
            lo, hi = box
            grid = pos.view(1, *self.grid_size, pos.shape[-1])
            pos = grid[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].reshape(1, -1, pos.shape[-1])
        return ops.patch_embed(x.to(dtype), proj.weight.to(dtype), bias, pos, self.patch_size, scale, shift)

    def zero_patch(self, scale: float, shift: float, device: torch.device) -> Tensor:
        """(1, 1, hidden): the embedding of an all-zero patch without position embedding, through
        the same op (with an input affine the padding is not zero to the Linear)."""
        proj = self.patch_embeddings[1]
        dtype = wide_dtype(proj.weight)
        bias = None if proj.bias is None else proj.bias.to(dtype)
        x = torch.zeros(
            (1, proj.in_features // math.prod(self.patch_size), *self.patch_size), dtype=dtype, device=device
        )
        return ops.patch_embed(x, proj.weight.to(dtype), bias, None, self.patch_size, scale, shift)


class SelfAttention(nn.Module):
    """MONAI SABlock: qkv Linear without bias, split [q | k | v] each head-major, out_proj."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, key_bias: Optional[Tensor] = None) -> Tensor:
        """x (B, S, hidden) -> (B, S, hidden); key_bias: None, or (B, S) added to every query's
        attention logits per key (log of how many tokens a key stands for; `encode_box`)."""
        B, S, C = x.shape
        # (B, S, 3*C) -> (3, B, heads, S, head_dim): the 3*C axis is (qkv, head, head_dim).
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if key_bias is None else key_bias[:, None, None, :].to(q.dtype)
        out = attention(q, k, v, mask)  # (B, heads, S, head_dim)
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

    def forward(self, x: Tensor, key_bias: Optional[Tensor] = None) -> Tensor:
        """x (B, S, hidden) -> (B, S, hidden); key_bias as for `SelfAttention`."""
        if self.on_attn_out is None:
            x = x + self.attn(self.norm1(x), key_bias)
        else:
            a = self.attn(self.norm1(x), key_bias)
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
        tokens = self._transform(tokens)
        if self.after_encoder is not None:
            tokens = self.after_encoder(tokens)
        B, _, C = tokens.shape
        return tokens.transpose(1, 2).view(B, C, *cfg.grid_size)

    @property
    def token_boxes_supported(self) -> bool:
        """Whether `encode_box` can run: not while an encoder-level adapter seam is set
        (`beside_patch_embed` reads the whole window, `after_encoder` the whole token grid)."""
        return self.beside_patch_embed is None and self.after_encoder is None

    def encode_box(
        self,
        x: Tensor,
        token_lo: Sequence[int] | Sequence[Sequence[int]],
        token_hi: Sequence[int] | Sequence[Sequence[int]],
        input_scale: float = 1.0,
        input_shift: float = 0.0,
        padding_groups: Optional[Tensor] = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Encode only a box of each window's token grid.

        The box's tokens are patch-embedded with the position embeddings of their true grid
        positions and run through the same blocks and final norm as `forward`, attending to each
        other only: the tokens outside the box are left out, not zero-filled. With the box equal
        to the whole grid the result equals `forward`'s bit for bit.

        With `padding_groups`, the tokens outside the box are taken to be zero padding and each
        group of them is represented by one summary token: a zero patch embedded at the mean of
        the group's position embeddings, whose attention weight counts as many times as the group
        has tokens (its logit + log(size)). The box tokens then attend to the padding much as in
        the full pass, exactly so if a group's position embeddings were all equal.

        Args:
            x: (B, in_channels, bd*pd, bh*ph, bw*pw): the voxels of the boxes, bd = hi - lo etc.
            token_lo, token_hi: the box [lo, hi) in the (gd, gh, gw) token grid, one triple for
                the whole batch or one per item (all the same size).
            input_scale, input_shift: as for `forward`.
            padding_groups: None, or (1 or B, K, N) non-negative weights over the N grid tokens,
                a row per group (0 / 1 membership of tokens outside the box; no empty row).

        Returns:
            (B, hidden, bd, bh, bw), a non-contiguous view as `forward`'s; with padding_groups
            also the K summary tokens after the final norm, (B, hidden, K): what the group's
            padding tokens come out as, on average.

        Raises:
            AdapterError: an encoder-level adapter seam is set (`token_boxes_supported`): encode
                the whole window with `forward` instead.
            ShapeError: a box outside the grid, boxes of different sizes, or x not their voxels.
        """
        if not self.token_boxes_supported:
            raise AdapterError(
                "encode_box cannot run with an encoder-level adapter (beside_patch_embed / after_encoder "
                "read the whole window): encode the whole window with forward()"
            )
        boxes = self._token_boxes(x, token_lo, token_hi)
        x = x.to(wide_dtype(self.norm.weight))
        if all(b == boxes[0] for b in boxes):
            tokens = self.patch_embedding(x, input_scale, input_shift, boxes[0])
        else:  # each item its own position embeddings; the embedding is cheap next to the blocks
            tokens = torch.cat(
                [self.patch_embedding(x[i : i + 1], input_scale, input_shift, b) for i, b in enumerate(boxes)]
            )
        B, S, C = tokens.shape
        size = tuple(h - lo for lo, h in zip(*boxes[0]))
        if padding_groups is None:
            return self._transform(tokens).transpose(1, 2).view(B, C, *size)
        summaries, key_bias = self._summary_tokens(x, padding_groups, input_scale, input_shift, B, S)
        tokens = self._transform(torch.cat([tokens, summaries], 1), key_bias)
        return tokens[:, :S].transpose(1, 2).view(B, C, *size), tokens[:, S:].transpose(1, 2)

    def _summary_tokens(self, x: Tensor, groups: Tensor, scale: float, shift: float, B: int, S: int):
        """The summary tokens (B, K, hidden) of `encode_box`'s padding groups and the key bias
        (B, S + K): 0 on the S box tokens, log(group size) on the summaries."""
        cfg, dtype = self.config, x.dtype
        groups = groups.to(x.device, dtype)
        if groups.dim() != 3 or groups.shape[0] not in (1, B) or groups.shape[2] != cfg.num_patches:
            raise ShapeError(f"padding_groups must be (1 or {B}, K, {cfg.num_patches}), got {tuple(groups.shape)}")
        sizes = groups.sum(-1)  # (1 or B, K)
        if bool((groups < 0).any() or (sizes <= 0).any()):
            raise ShapeError("padding_groups must hold non-negative weights and no empty group")
        zero = self.patch_embedding.zero_patch(scale, shift, x.device)
        mean_pos = groups @ self.patch_embedding.position_embeddings[0].to(dtype) / sizes[..., None]
        summaries = (zero + mean_pos).expand(B, -1, -1)
        key_bias = torch.cat([sizes.new_zeros(sizes.shape[0], S), sizes.log()], 1).expand(B, -1)
        return summaries, key_bias

    def _token_boxes(self, x: Tensor, token_lo, token_hi) -> list[TokenBox]:
        """The per-item (lo, hi) boxes of an `encode_box` call, checked against the grid and x."""
        cfg = self.config
        lo, hi = (torch.as_tensor(v, dtype=torch.int64) for v in (token_lo, token_hi))
        if lo.shape != hi.shape or lo.shape[-1:] != (3,) or lo.dim() > 2:
            raise ShapeError(
                f"token_lo and token_hi must be triples or (B, 3), got {tuple(lo.shape)}, {tuple(hi.shape)}"
            )
        lo, hi = lo.reshape(-1, 3), hi.reshape(-1, 3)
        grid = torch.tensor(cfg.grid_size)
        if bool((lo < 0).any() or (hi > grid).any() or (hi <= lo).any()):
            raise ShapeError(
                f"token boxes {lo.tolist()} .. {hi.tolist()} are not non-empty boxes of the grid {cfg.grid_size}"
            )
        size = hi - lo
        if bool((size != size[0]).any()):
            raise ShapeError(f"the token boxes of one call must have one size, got {size.tolist()}")
        voxels = (cfg.in_channels, *(int(n) * p for n, p in zip(size[0], cfg.patch_size)))
        if x.dim() != 5 or tuple(x.shape[1:]) != voxels or len(lo) not in (1, x.shape[0]):
            raise ShapeError(
                f"token box of size {tuple(size[0].tolist())} needs a (B, {', '.join(map(str, voxels))}) volume "
                f"and one box or B of them, got shape {tuple(x.shape)} and {len(lo)} boxes"
            )
        boxes = [(tuple(a.tolist()), tuple(b.tolist())) for a, b in zip(lo, hi)]
        return boxes * x.shape[0] if len(boxes) == 1 else boxes

    def _transform(self, tokens: Tensor, key_bias: Optional[Tensor] = None) -> Tensor:
        """The blocks and the final norm over (B, S, hidden) tokens, any S (key_bias: see
        `SelfAttention`)."""
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                # each block runs (now and in its recompute) in a snapshot of this call's context
                tokens = checkpoint(contextvars.copy_context().run, block, tokens, key_bias, use_reentrant=False)
            else:
                tokens = block(tokens, key_bias)
        return self.norm(tokens)
