"""Multi-head scaled dot-product attention, the single call site every model module goes through.

The mask-free path (image encoder self-attention, mask decoder attention) on the CPU runs
`ops.flash_attention`, whose CPU backend is PyTorch's fused SDPA, the very call this module made
before the op existed, so CPU results are unchanged bit for bit. CUDA tensors stay on PyTorch's
SDPA (flash / cuDNN kernels) until the op's Triton kernels have run on a GPU: they are tested only
under the Triton interpreter so far, and the model's default path must not be their first run.
Masked attention (the CLIP text tower's causal + padding mask, an additive float mask) stays on
PyTorch's SDPA: it runs on 77 tokens at most and is cached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q·kᵀ · head_dim^-0.5 + mask) · v, the softmax taken over keys.

    Args:
        q: (B, heads, S_q, head_dim).
        k, v: (B, heads, S_k, head_dim), same dtype and device as q.
        mask: None, or an additive float mask broadcastable to (B, heads, S_q, S_k)
            (0 where allowed, a large negative number where not).

    Returns:
        (B, heads, S_q, head_dim) in q's dtype.
    """
    if mask is not None or q.device.type == "cuda":  # CUDA: see the module docstring
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    device = q.device.type
    if torch.is_autocast_enabled(device):
        # Autocast runs SDPA in its low precision; the op computes in its inputs' dtype, so cast
        # as autocast would have (a no-op for the bf16 outputs of autocast's linear layers).
        low = torch.get_autocast_dtype(device)
        q, k, v = q.to(low), k.to(low), v.to(low)
    # head_dim^-0.5 is the op's (and SDPA's) default scale, which is what MONAI's SABlock and CLIP use.
    return ops.flash_attention(q, k, v)
