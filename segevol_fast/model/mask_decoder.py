"""SegVol's mask decoder (docs/official-pipeline.md §3): two-way transformer, 3-D upscaling, hypernetwork masks.

Tokens [iou_token, 4 mask tokens, sparse prompts] attend with the image tokens; the image side is
upscaled ×4 (two ConvTranspose3d, with a LayerNorm over the FULL (hidden/4, 2gd, 2gh, 2gw) shape
between them, exactly as officially), and mask token 0 through its hypernetwork MLP gives the
low-res logits. With text, a second text path adds txt_align(text) · upscaled features to the
logits (the text also entered as the last sparse token).

Speed notes: only mask token 0 is evaluated (the official output selects it; masks 1–3 and the
IoU head are discarded there), the IoU head runs only when asked, and the text map is folded into
the same product: (hyper_0 + txt_align(text)) · F equals hyper_0 · F + txt_align(text) · F.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ShapeError
from .config import SegVolConfig
from .layers import LayerNorm32
from .two_way_transformer import TwoWayTransformer
from .upscale import Box, upscale_project


class MLP(nn.Module):
    """`layers` Linear stack with ReLU between (not after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, depth: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (depth - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in_dim) -> (..., out_dim)."""
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MaskDecoder(nn.Module):
    """Image embedding + prompt embeddings -> low-res mask logits (B, 1, 4gd, 4gh, 4gw)."""

    def __init__(self, config: SegVolConfig):
        super().__init__()
        hidden = config.hidden_size
        self.hidden_size = hidden
        self.grid_size = config.grid_size
        self.num_mask_tokens = config.num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, hidden)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, hidden)
        self.transformer = TwoWayTransformer(
            config.decoder_depth,
            hidden,
            config.decoder_num_heads,
            config.decoder_mlp_dim,
            config.attention_downsample_rate,
        )
        up_grid = tuple(2 * g for g in config.grid_size)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(hidden, hidden // 4, kernel_size=2, stride=2),
            # Not channel-wise: normalises all (hidden/4)·2gd·2gh·2gw values of a sample, with an
            # elementwise affine of that shape (official; it also pins the input grid size).
            LayerNorm32((hidden // 4, *up_grid)),
            nn.GELU(),
            nn.ConvTranspose3d(hidden // 4, hidden // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(hidden, hidden, hidden // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(hidden, config.iou_head_hidden_dim, self.num_mask_tokens, config.iou_head_depth)
        self.txt_align_upscaled_embedding = nn.Linear(hidden, hidden // 8)
        # True: upscale + project in token order (model/upscale.py, ~4x faster on CPU for many
        # prompts); False: run `output_upscaling` as modules, literally as the official code does.
        self.fused_upscale = True
        # Adapter seam: (the two-way transformer's output tokens (B, 1 + M + T, hidden) [iou, M mask
        # tokens, prompt tokens], this call's image_embedding (1 or B, hidden, gd, gh, gw)) -> tokens,
        # before the hypernetwork MLPs read mask token 0 (context priors add their posterior to the
        # mask tokens here); None = the official decoder.
        self.after_transformer: Optional[nn.Module] = None

    def forward(
        self,
        image_embedding: Tensor,
        image_pe: Tensor,
        sparse: Tensor,
        dense: Tensor,
        text_embedding: Optional[Tensor] = None,
        return_iou: bool = False,
        region: Optional[Box] = None,
        reassociate: bool = False,
    ) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """Decode B prompts.

        Args:
            image_embedding: (1 or B, hidden, gd, gh, gw). Batch 1 with B prompts decodes all of
                them against that one image without copying it.
            image_pe: (1, hidden, gd, gh, gw), `PromptEncoder.get_dense_pe()`.
            sparse: (B, T, hidden) prompt tokens (T may be 0).
            dense: (1 or B, hidden, gd, gh, gw). A stride-0 batch axis (the no-mask embedding
                expanded) is treated as batch 1.
            text_embedding: None or (1 or B, hidden); the same vector that is the last sparse token.
            return_iou: also return the IoU head's score for mask 0.
            region: None, or (lo, hi) a box of the low-res grid (4gd, 4gh, 4gw), hi exclusive:
                only those logits are computed (the upscaling runs over the tokens covering it).
            reassociate: the two-way transformer's cross-attentions take their products in the
                cheaper order for a few prompt tokens (`cross_attention.py`): the same function
                up to float rounding; False is the official order.

        Returns:
            logits (B, 1, 4gd, 4gh, 4gw) of mask token 0 (plus the text map when text is given),
            (B, 1, *(hi - lo)) for a region; with return_iou, (logits, iou (B, 1)).
        """
        B, _, hidden = self._check(image_embedding, image_pe, sparse, dense, text_embedding)
        low = [4 * g for g in self.grid_size]
        if region is not None and any(not 0 <= a < b <= n for a, b, n in zip(*region, low)):
            raise ShapeError(f"region {region} must be a non-empty box of the low-res grid {tuple(low)} (hi exclusive)")
        if dense.shape[0] > 1 and dense.stride(0) == 0:
            dense = dense[:1]  # every batch entry is the same vector: add it once, on the image side
        # tokens-major copies: the image side's GEMMs on a transposed (channels-first) operand
        # run ~25% slower on the CPU, and layer 0 has three of them
        src = (image_embedding + dense).flatten(2).transpose(1, 2).contiguous()  # (1 or B, S, hidden)
        pos = image_pe.flatten(2).transpose(1, 2).contiguous()  # (1, S, hidden)
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens.to(sparse.dtype).expand(B, -1, -1), sparse], dim=1)  # (B, 1+M+T, hidden)

        hs, src = self.transformer(src, pos, tokens, reassociate)
        if self.after_transformer is not None:
            hs = self.after_transformer(hs, image_embedding)
        src = src.expand(B, -1, -1)  # only matters for depth 0, where the image side stays batch 1
        weights = self.output_hypernetworks_mlps[0](hs[:, 1])  # (B, hidden/8), mask token 0
        if text_embedding is not None:
            weights = weights + self.txt_align_upscaled_embedding(text_embedding.to(weights.dtype))
        if self.fused_upscale:  # same result without materialising (B, hidden/8, 4gd, 4gh, 4gw) maps
            logits = upscale_project(src, weights, self.output_upscaling, tuple(self.grid_size), region)
        else:  # the official module path, kept as the reference
            features = self.output_upscaling(src.transpose(1, 2).reshape(B, hidden, *self.grid_size))
            logits = torch.einsum("bc,bcdhw->bdhw", weights, features).unsqueeze(1)
            if region is not None:
                logits = logits[(slice(None), slice(None)) + tuple(slice(a, b) for a, b in zip(*region))]
        if not return_iou:
            return logits
        return logits, self.iou_prediction_head(hs[:, 0])[:, :1]

    def _check(self, image, pe, sparse, dense, text) -> tuple[int, int, int]:
        """Validate shapes; return sparse's (B, T, hidden)."""
        grid, hidden = tuple(self.grid_size), self.hidden_size
        if sparse.dim() != 3 or sparse.shape[2] != hidden:
            raise ShapeError(f"sparse prompt embeddings must be (B, T, {hidden}), got {tuple(sparse.shape)}")
        B = sparse.shape[0]
        for name, t, batches in (("image_embedding", image, (1, B)), ("image_pe", pe, (1,)), ("dense", dense, (1, B))):
            if t.dim() != 5 or tuple(t.shape[1:]) != (hidden, *grid) or t.shape[0] not in batches:
                want = " or ".join(str(b) for b in sorted(set(batches)))
                raise ShapeError(
                    f"{name} must be ({want}, {hidden}, {', '.join(map(str, grid))}), got {tuple(t.shape)}"
                )
        if text is not None and (text.dim() != 2 or text.shape[1] != hidden or text.shape[0] not in (1, B)):
            raise ShapeError(f"text_embedding must be (1 or {B}, {hidden}), got {tuple(text.shape)}")
        return tuple(sparse.shape)  # type: ignore[return-value]


def upsample_logits(low_res: Tensor, size: tuple[int, int, int]) -> Tensor:
    """The official in-model upsample: (B, C, d, h, w) -> (B, C, *size), trilinear, align_corners=False.

    Officially (B, 1, 32, 64, 64) -> (B, 1, 32, 256, 256); the result is still logits.
    """
    if low_res.dim() != 5:
        raise ShapeError(f"low-res logits must be (B, C, d, h, w), got {tuple(low_res.shape)}")
    return F.interpolate(low_res, size=tuple(int(s) for s in size), mode="trilinear", align_corners=False)
