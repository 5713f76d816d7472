"""Cross-attention between a few prompt tokens and many image tokens, with the products reordered.

In the mask decoder's two-way transformer a window's 2048 image tokens meet about 7 prompt tokens
(IoU, 4 mask tokens, the prompts). The official order projects every image token through q/k/v
(768 -> 384) and back through out_proj (384 -> 768): ~2 S·E·D multiply-adds per cross-attention,
nearly all of a cached prompt's decoder time. Matrix products associate, so per head h (W the
projection weights, x an image token, t a prompt token, d the head size):

* prompt tokens query the image ("few queries"): the score q_h(t) · (W_k,h x + b_k,h) is
  (q_h(t) W_k,h) · x plus a term that is the same for every key (softmax ignores it), and the
  output Σ_x p(t, x) (W_v,h x + b_v,h) is W_v,h (Σ_x p(t, x) x) + b_v,h (the weights sum to 1);
* the image queries the prompt tokens ("few keys"): the score (W_q,h x + b_q,h) · k_h(t) is
  x · (W_q,hᵀ k_h(t)) + b_q,h · k_h(t), and out_proj of the heads' outputs is Σ_t p_h(x, t)
  (W_o,h v_h(t)) + b_o.

Each costs ~2 S·E·(heads·T) instead: about 7x fewer operations at T = 7, 8 heads, D = 384. Same
function, different rounding (float32 tolerance against the official order, tested); it reads the
projections' weights, so it only runs on plain `nn.Linear` projections (an adapter that wraps
them keeps the official order).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


def _plain(attn: nn.Module) -> bool:
    """Whether every projection is a bare nn.Linear with a bias and no hooks (what the reordered
    products assume: they read weight and bias instead of calling the module)."""
    mods = (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj)
    return all(
        type(m) is nn.Linear and m.bias is not None and not m._forward_hooks and not m._forward_pre_hooks for m in mods
    )


def reassociation_pays(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor) -> Optional[str]:
    """ "queries" or "keys" when that reordering (module docstring) costs fewer multiply-adds than
    the official order for these shapes, else None (also None for wrapped projections)."""
    if not _plain(attn):
        return None
    (bq, sq, e), (bk, sk, _), bv = q.shape, k.shape, v.shape[0]
    batch, d_int, heads = max(bq, bk, bv), attn.q_proj.out_features, attn.num_heads
    q_proj, kv_proj, out_proj = bq * sq * e * d_int, (bk + bv) * sk * e * d_int, batch * sq * d_int * e
    costs = {
        None: q_proj + kv_proj + out_proj + 2 * batch * sq * sk * d_int,
        "queries": q_proj + bq * sq * d_int * e + 2 * batch * heads * sq * sk * e + 2 * out_proj,
        "keys": kv_proj + (bk + bv) * sk * d_int * e + 2 * batch * heads * sq * sk * e,
    }
    return min(costs, key=costs.get)


def _probabilities(scores: Tensor) -> Tensor:
    """softmax over the last axis, in at least float32 (as SDPA does), back in the scores' dtype."""
    return torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(scores.dtype)


def few_queries_attention(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """`attn(q, k, v)` for few queries: q (Bq, T, E); k, v (Bk / Bv, S, E); batches 1 or B -> (B, T, E)."""
    heads, (d_int, e) = attn.num_heads, attn.k_proj.weight.shape
    d = d_int // heads
    batch, t = max(q.shape[0], k.shape[0], v.shape[0]), q.shape[1]
    qh = attn.q_proj(q).view(q.shape[0], t, heads, d) * d**-0.5
    # (q_h W_k,h): each query as a vector of the image tokens' own space; q_h·b_k,h is dropped
    # (the same for every key: softmax is unchanged)
    reads = torch.einsum("bthd,hde->bhte", qh, attn.k_proj.weight.view(heads, d, e)).flatten(1, 2)
    p = _probabilities(torch.matmul(reads, k.transpose(1, 2)))  # (B, heads·T, S)
    mixed = torch.matmul(p, v).view(batch, heads, t, e)  # Σ_x p x: still in the image tokens' space
    out = torch.einsum("bhte,hde->bthd", mixed, attn.v_proj.weight.view(heads, d, e)) + attn.v_proj.bias.view(heads, d)
    return attn.out_proj(out.reshape(batch, t, d_int))


def few_keys_attention(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """`attn(q, k, v)` for few keys: q (Bq, S, E); k, v (Bk / Bv, T, E); batches 1 or B -> (B, S, E)."""
    heads, (d_int, e) = attn.num_heads, attn.q_proj.weight.shape
    d = d_int // heads
    batch, s, t = max(q.shape[0], k.shape[0], v.shape[0]), q.shape[1], k.shape[1]
    kh = attn.k_proj(k).view(k.shape[0], t, heads, d) * d**-0.5
    vh = attn.v_proj(v).view(v.shape[0], t, heads, d)
    # W_q,hᵀ k_h(t): each key as a vector of the image tokens' space, and b_q,h · k_h(t)
    reads = torch.einsum("hde,bthd->beht", attn.q_proj.weight.view(heads, d, e), kh).flatten(2)  # (Bk, E, heads·T)
    shift = torch.einsum("hd,bthd->bht", attn.q_proj.bias.view(heads, d), kh).flatten(1).unsqueeze(1)
    scores = torch.matmul(q, reads) + shift  # (B, S, heads·T)
    p = _probabilities(scores.view(batch, s, heads, t)).view(batch, s, heads * t)
    # W_o,h v_h(t): each value already through out_proj
    values = torch.einsum("bthd,ehd->bhte", vh, attn.out_proj.weight.view(e, heads, d)).flatten(1, 2)
    return torch.matmul(p, values) + attn.out_proj.bias
