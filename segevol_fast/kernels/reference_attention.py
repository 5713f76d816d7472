"""Attention in plain PyTorch: the definition of correct for the flash-attention kernels.

Semantics (shared by every backend): q (B, H, Sq, D), k and v (B, H, Sk, D), non-causal,

    out[b, h] = softmax(scale * q[b, h] @ k[b, h]^T  with keys j >= kv_len[b] masked out) @ v[b, h]

`scale` defaults to 1/sqrt(D). `kv_len` is None (every key is valid), an int, or a (B,) integer
tensor; values are clamped to [0, Sk], so kv_len >= Sk masks nothing. A row that has no valid key
(kv_len 0) attends to nothing: its output is 0 and so are its gradients (softmax of an empty set
would be NaN; zeros keep a padded batch row from poisoning a loss).

Two functions live here: `flash_attention_reference` (scores materialised, softmax in fp32, the
readable spec) and `flash_attention_sdpa` (the CPU backend: PyTorch's fused attention with the same
key mask).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils._python_dispatch as _python_dispatch

from ..errors import ArgumentTypeError, ShapeError

_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_attention_args(q, k, v, kv_len) -> None:
    """Shapes, dtypes and devices every backend needs; raises ShapeError / ArgumentTypeError."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ArgumentTypeError(f"flash_attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ShapeError(f"flash_attention: {name} must be (B, H, S, D) like torch SDPA, got shape {tuple(t.shape)}")
    if q.dtype not in _FLOATS or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ShapeError(f"flash_attention: q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ShapeError(f"flash_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, _, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D or v.shape != k.shape:
        raise ShapeError(
            f"flash_attention: expected k and v of shape ({B}, {H}, Sk, {D}) for q {tuple(q.shape)}, "
            f"got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if kv_len is None or isinstance(kv_len, int) and not isinstance(kv_len, bool):
        return
    if not isinstance(kv_len, torch.Tensor):
        raise ArgumentTypeError(f"flash_attention: kv_len must be None, an int or a (B,) tensor, got {type(kv_len).__name__}")
    if kv_len.shape != (B,) or kv_len.dtype.is_floating_point or kv_len.dtype.is_complex or kv_len.dtype == torch.bool:
        raise ShapeError(f"flash_attention: kv_len must be a ({B},) integer tensor, got {kv_len.dtype} {tuple(kv_len.shape)}")


def kv_lengths(kv_len, batch: int, sk: int, device) -> torch.Tensor:
    """kv_len (None, int or (B,) tensor) -> (B,) int64 tensor on `device`, clamped to [0, Sk]."""
    if kv_len is None:
        return torch.full((batch,), sk, dtype=torch.int64, device=device)
    if isinstance(kv_len, int):
        return torch.full((batch,), min(max(kv_len, 0), sk), dtype=torch.int64, device=device)
    return kv_len.to(device=device, dtype=torch.int64).clamp(0, sk)


def key_mask(kv_len, batch: int, sk: int, device) -> torch.Tensor | None:
    """(B, 1, 1, Sk) bool, True where a key may be attended; None when every key is valid."""
    if kv_len is None:
        return None
    lengths = kv_lengths(kv_len, batch, sk, device)
    return (torch.arange(sk, device=device)[None, :] < lengths[:, None])[:, None, None, :]


def flash_attention_reference(q, k, v, scale: float | None = None, kv_len=None) -> torch.Tensor:
    """softmax(scale * q k^T, keys >= kv_len masked) v, computed in fp32 (fp64 for fp64 inputs)."""
    check_attention_args(q, k, v, kv_len)
    B, _, _, D = q.shape
    Sk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    # 16-bit inputs are computed in fp32, as the kernels accumulate in fp32.
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.to(work), k.to(work).transpose(-2, -1)) * scale
    mask = key_mask(kv_len, B, Sk, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        # A row with no valid key is all -inf and softmax gives NaN: define it as attending to nothing.
        probs = torch.where(mask.any(dim=-1, keepdim=True), probs, torch.zeros((), dtype=work, device=q.device))
    return torch.matmul(probs, v.to(work)).to(q.dtype)


def flash_attention_sdpa(q, k, v, scale: float | None = None, kv_len=None) -> torch.Tensor:
    """The CPU backend: torch's fused scaled_dot_product_attention with kv_len as a boolean key mask.

    On CPU, SDPA dispatches to ATen's flash-attention kernel (blocked online softmax, no Sq x Sk
    matrix, vectorised and OpenMP-parallel over batch x heads x query blocks, forward and backward,
    fp32/bf16/fp16 with fp32 accumulation), which also accepts a boolean mask.
    """
    check_attention_args(q, k, v, kv_len)
    B, _, _, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    k, v, kv_len = _drop_unused_keys(k, v, kv_len)
    mask = key_mask(kv_len, B, k.shape[2], q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if mask is not None:
        # Recent torch versions already zero fully masked rows; older ones return NaN: pin our semantics.
        out = torch.where(mask.any(dim=-1, keepdim=True), out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def _tracing(*tensors) -> bool:
    """True under torch.compile, a dispatch mode (make_fx, FakeTensorMode) or a tensor subclass."""
    if torch.compiler.is_compiling() or _python_dispatch._get_current_dispatch_mode() is not None:
        return True
    return any(isinstance(t, torch.Tensor) and type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors)


def _drop_unused_keys(k, v, kv_len):
    """Slice off the keys no batch row may see, and drop the mask if no row needs one.

    SDPA does not skip masked keys, it computes and discards them; a slice makes them free. Only
    for CPU tensors, where reading the lengths costs no device sync, and only in plain eager mode:
    under tracing (torch.compile, opcheck, the op's backward being traced) the slice length would be
    data-dependent, so the mask alone does the work there.
    """
    Sk = k.shape[2]
    if kv_len is None or k.device.type != "cpu" or k.shape[0] == 0 or _tracing(k, kv_len):
        return k, v, kv_len
    lengths = kv_lengths(kv_len, k.shape[0], Sk, k.device)
    longest = int(lengths.max())
    if longest == 0:  # every row attends to nothing: keep the mask, which zeroes them
        return k, v, kv_len
    k, v = k[:, :, :longest], v[:, :, :longest]
    return k, v, None if bool((lengths == longest).all()) else lengths
