"""Multi-head scaled dot-product attention, the single call site every model module goes through.

Kept behind one function so a fused kernel (`ops.flash_attention`, non-causal, head dim 64) can
replace the mask-free path later without touching the modules. Masked attention (the CLIP text
tower's causal + padding mask) stays on PyTorch's SDPA: it runs on 77 tokens at most and is cached.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """softmax(q·kᵀ · head_dim^-0.5 + mask) · v, the softmax taken over keys.

    Args:
        q: (B, heads, S_q, head_dim).
        k, v: (B, heads, S_k, head_dim), same dtype and device as q.
        mask: None, or an additive float mask broadcastable to (B, heads, S_q, S_k)
            (0 where allowed, a large negative number where not).

    Returns:
        (B, heads, S_q, head_dim) in q's dtype.
    """
    # SDPA's default scale is head_dim^-0.5, which is what MONAI's SABlock and CLIP use.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
