"""SAM's TwoWayTransformer over 3-D image tokens, as SegVol's mask decoder uses it (docs/official-pipeline.md §3).

Prompt tokens and image tokens attend to each other: per layer self-attention on the tokens,
token→image cross-attention, an MLP (ReLU) on the tokens, then image→token cross-attention; all
post-norm and residual, except that layer 0's self-attention output replaces the tokens (no
residual, no PE). A final token→image attention and LayerNorm close the stack. Names equal the
official ones, so `state_dict()` keys match the checkpoint's `mask_decoder.transformer.*`.

Batch broadcasting: the image side may have batch 1 while the tokens have batch N (N prompts on
one image). Projections of batch-1 inputs are computed once and expanded (no copies), so the
image side only becomes per-prompt where it first depends on the prompt (layer 0's image→token
update).

`reassociate=True` (fast mode's zoom-in decoding) takes each cross-attention's products in the
order that is cheapest when the prompt side is a handful of tokens (`cross_attention.py`): the
image tokens never go through the q/k/v/out projections; the same function up to float rounding.
Off (the default, and exact mode) it is the official computation.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .attention import attention
from .cross_attention import few_keys_attention, few_queries_attention, reassociation_pays
from .layers import LayerNorm32


class Attention(nn.Module):
    """Multi-head attention whose q/k/v project to embed_dim // downsample_rate channels."""

    def __init__(self, embed_dim: int, num_heads: int, downsample_rate: int = 1):
        super().__init__()
        internal = embed_dim // downsample_rate
        if internal % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide the internal dim {internal}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embed_dim, internal)
        self.k_proj = nn.Linear(embed_dim, internal)
        self.v_proj = nn.Linear(embed_dim, internal)
        self.out_proj = nn.Linear(internal, embed_dim)

    def _heads(self, x: Tensor, batch: int) -> Tensor:
        """(b, S, internal) with b in {1, batch} -> (batch, heads, S, head_dim), expanded not copied."""
        b, s, c = x.shape
        return x.view(b, s, self.num_heads, c // self.num_heads).transpose(1, 2).expand(batch, -1, -1, -1)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, reassociate: bool = False) -> Tensor:
        """q (Bq, Sq, E), k and v (Bk, Sk, E), each batch 1 or B -> (B, Sq, E).

        softmax(q·kᵀ / sqrt(head_dim)) · v per head, through `model.attention.attention`; with
        `reassociate`, through `cross_attention.py` where that costs fewer operations.
        """
        if reassociate:
            side = reassociation_pays(self, q, k, v)
            if side == "queries":
                return few_queries_attention(self, q, k, v)
            if side == "keys":
                return few_keys_attention(self, q, k, v)
        batch = max(q.shape[0], k.shape[0], v.shape[0])
        out = attention(
            self._heads(self.q_proj(q), batch), self._heads(self.k_proj(k), batch), self._heads(self.v_proj(v), batch)
        )  # (B, heads, Sq, head_dim)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class MLPBlock(nn.Module):
    """lin1 -> ReLU -> lin2 (SAM's decoder MLP uses ReLU, not GELU)."""

    def __init__(self, embed_dim: int, mlp_dim: int):
        super().__init__()
        self.lin1 = nn.Linear(embed_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, S, E) -> (B, S, E)."""
        return self.lin2(F.relu(self.lin1(x)))


class TwoWayAttentionBlock(nn.Module):
    """One two-way layer; `skip_first_layer_pe` makes the self-attention replace the tokens."""

    def __init__(self, embed_dim: int, num_heads: int, mlp_dim: int, downsample_rate: int, skip_first_layer_pe: bool):
        super().__init__()
        self.skip_first_layer_pe = skip_first_layer_pe
        self.self_attn = Attention(embed_dim, num_heads)
        self.norm1 = LayerNorm32(embed_dim)
        self.cross_attn_token_to_image = Attention(embed_dim, num_heads, downsample_rate)
        self.norm2 = LayerNorm32(embed_dim)
        self.mlp = MLPBlock(embed_dim, mlp_dim)
        self.norm3 = LayerNorm32(embed_dim)
        self.norm4 = LayerNorm32(embed_dim)
        self.cross_attn_image_to_token = Attention(embed_dim, num_heads, downsample_rate)

    def forward(
        self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor, reassociate: bool = False
    ) -> tuple[Tensor, Tensor]:
        """queries/query_pe (B, T, E); keys (1 or B, S, E); key_pe (1, S, E) -> (queries (B, T, E),
        keys (B, S, E)). reassociate: see the module docstring."""
        if self.skip_first_layer_pe:
            # Official layer 0: the tokens ARE their PE here, so no PE is added and no residual kept.
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys, reassociate))
        queries = self.norm3(queries + self.mlp(queries))
        # Image tokens query the prompt tokens; this is where a batch-1 image side becomes per-prompt.
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, queries + query_pe, queries, reassociate))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """depth × TwoWayAttentionBlock, then a final token→image attention + norm_final_attn."""

    def __init__(self, depth: int, embed_dim: int, num_heads: int, mlp_dim: int, downsample_rate: int):
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(embed_dim, num_heads, mlp_dim, downsample_rate, skip_first_layer_pe=(i == 0))
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embed_dim, num_heads, downsample_rate)
        self.norm_final_attn = LayerNorm32(embed_dim)

    def forward(
        self, image: Tensor, image_pe: Tensor, tokens: Tensor, reassociate: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Run the two-way stack.

        Args:
            image: (1 or B, S, E) flattened image tokens (image embedding + dense prompt).
            image_pe: (1, S, E) their positional encoding.
            tokens: (B, T, E) output + prompt tokens; they also serve as their own PE.
            reassociate: the cross-attentions' cheap product order (module docstring).

        Returns:
            queries (B, T, E) and image tokens (B, S, E) after the stack.
        """
        queries, keys = tokens, image
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, image_pe, reassociate)
        attn = self.final_attn_token_to_image(queries + tokens, keys + image_pe, keys, reassociate)
        return self.norm_final_attn(queries + attn), keys
