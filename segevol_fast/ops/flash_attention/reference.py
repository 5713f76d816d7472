"""Attention in plain PyTorch: the definition of correct for the flash-attention kernels.

Semantics (shared by every backend): q (B, H, Sq, D), k and v (B, H, Sk, D), non-causal,

    out[b, h] = softmax(scale * q[b, h] @ k[b, h]^T  with keys j >= kv_len[b] masked out) @ v[b, h]

`scale` defaults to 1/sqrt(D). `kv_len` is None (every key is valid), an int, or a (B,) integer
tensor; values are clamped to [0, Sk], so kv_len >= Sk masks nothing. A row that has no valid key
(kv_len 0) attends to nothing: its output is 0 and so are its gradients (softmax of an empty set
would be NaN; zeros keep a padded batch row from poisoning a loss).

Besides the output, every backend returns the softmax statistics of the forward, the row
log-sum-exp lse[b, h, i] = log(sum over valid keys j of exp(scale * q_i . k_j)) (natural log, shape
(B, H, Sq), fp32; fp64 for fp64 inputs; -inf for a row with no valid key): the backward rebuilds the
probabilities from it, P = exp(scale * q k^T - lse), instead of re-running the forward.

The functions here: `flash_attention_reference` / `flash_attention_reference_with_lse` (scores
materialised, softmax in fp32, the readable spec), `flash_attention_cpu` and
`flash_attention_cpu_backward` (the CPU backend: ATen's fused flash-attention kernels, forward and
backward, with the same key mask), and `flash_attention_sdpa` (the same forward through
`F.scaled_dot_product_attention`, recording SDPA's own autograd; kept as the baseline the benchmark
compares with).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils._python_dispatch as _python_dispatch

from ...errors import ArgumentTypeError, ShapeError

_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_attention_args(q, k, v, kv_len) -> None:
    """Shapes, dtypes and devices every backend needs; raises ShapeError / ArgumentTypeError."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ArgumentTypeError(f"flash_attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ShapeError(
                f"flash_attention: {name} must be (B, H, S, D) like torch SDPA, got shape {tuple(t.shape)}"
            )
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
        raise ArgumentTypeError(
            f"flash_attention: kv_len must be None, an int or a (B,) tensor, got {type(kv_len).__name__}"
        )
    if kv_len.shape != (B,) or kv_len.dtype.is_floating_point or kv_len.dtype.is_complex or kv_len.dtype == torch.bool:
        raise ShapeError(
            f"flash_attention: kv_len must be a ({B},) integer tensor, got {kv_len.dtype} {tuple(kv_len.shape)}"
        )


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
    return flash_attention_reference_with_lse(q, k, v, scale, kv_len)[0]


def flash_attention_reference_with_lse(q, k, v, scale: float | None = None, kv_len=None):
    """(out, lse) of the reference: out as `flash_attention_reference`, lse the row log-sum-exp of
    the masked scores (B, H, Sq) in the working dtype (fp32, fp64 for fp64 inputs), -inf for a row
    with no valid key."""
    check_attention_args(q, k, v, kv_len)
    B, _, _, D = q.shape
    Sk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    # 16-bit inputs are computed in fp32, as the kernels accumulate in fp32.
    work = _accumulation_dtype(q.dtype)
    scores = torch.matmul(q.to(work), k.to(work).transpose(-2, -1)) * scale
    mask = key_mask(kv_len, B, Sk, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf for an all -inf (or empty) row
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        # A row with no valid key is all -inf and softmax gives NaN: define it as attending to nothing.
        probs = torch.where(mask.any(dim=-1, keepdim=True), probs, torch.zeros((), dtype=work, device=q.device))
    return torch.matmul(probs, v.to(work)).to(q.dtype), lse


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in, and the dtype of lse: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lse_like(q: torch.Tensor) -> torch.Tensor:
    """An empty lse for q (B, H, Sq, D): (B, H, Sq) contiguous in q's accumulation dtype."""
    return q.new_empty(q.shape[:3], dtype=_accumulation_dtype(q.dtype))


def flash_attention_sdpa(q, k, v, scale: float | None = None, kv_len=None) -> torch.Tensor:
    """torch's fused scaled_dot_product_attention with kv_len as a boolean key mask, out only.

    The former CPU backend, kept as a baseline: under autograd SDPA records its own graph. On CPU,
    SDPA dispatches to the ATen flash-attention kernels `flash_attention_cpu` calls directly.
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


# ATen's CPU flash-attention kernels, the ones SDPA itself dispatches to on CPU: the forward returns
# (out, logsumexp), logsumexp (B, H, Sq) natural log in the accumulation dtype; the backward takes
# both back, so nothing of the forward is recomputed but the score blocks.
_ATEN_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_ATEN_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def flash_attention_cpu(q, k, v, scale: float | None = None, kv_len=None):
    """The CPU backend: (out, lse) from ATen's fused flash-attention kernel, kv_len as a key mask.

    The kernel is blocked online softmax (no Sq x Sk matrix), vectorised and OpenMP-parallel over
    batch x heads x query blocks, fp64/fp32/bf16/fp16 (fp32 accumulation, fp64 for fp64). With a
    contiguous head dim and no mask it is exactly the kernel `F.scaled_dot_product_attention` runs
    on CPU, so `out` is SDPA's bit for bit (the model relies on it); with a mask it gets the
    additive form SDPA converts a boolean one to.
    """
    check_attention_args(q, k, v, kv_len)
    if _degenerate(q, k):
        # The kernel crashes on empty sequences (SDPA itself routes them to its math path).
        return flash_attention_reference_with_lse(q, k, v, scale, kv_len)
    B, _, _, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    k, v, kv_len = _drop_unused_keys(k, v, kv_len)
    mask = key_mask(kv_len, B, k.shape[2], q.device)
    out, lse = _ATEN_FORWARD(
        _unit_stride(q), _unit_stride(k), _unit_stride(v), attn_mask=_additive(mask, q.dtype), scale=scale
    )
    if mask is not None:
        # A row with no valid key: pin out 0 and lse -inf (the kernel reports lse 0 for it).
        has_key = mask.any(dim=-1)  # (B, 1, 1)
        out = torch.where(has_key[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device))
        lse = torch.where(has_key, lse, torch.full((), float("-inf"), dtype=lse.dtype, device=lse.device))
    # The kernel stores lse as (B, Sq, H) in memory; every backend returns it contiguous.
    return out, lse.contiguous()


def flash_attention_cpu_backward(grad_out, q, k, v, out, lse, scale: float | None = None, kv_len=None):
    """Gradients (dq, dk, dv) of `flash_attention_cpu` from its saved out and lse, by ATen's fused
    flash-attention backward; arguments as the forward's (already validated there)."""
    if _degenerate(q, k):
        # Empty sums on every path: no query, no key or no feature contributes anything.
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    B, _, _, D = q.shape
    Sk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    k, v, kv_len = _drop_unused_keys(k, v, kv_len)
    mask = key_mask(kv_len, B, k.shape[2], q.device)
    if mask is not None:
        # The kernel rebuilds P = exp(score + mask - lse); for a row with no valid key every score
        # is -inf and lse -inf would give NaN, while any finite lse gives P = 0: zero gradients.
        lse = torch.where(torch.isneginf(lse), torch.zeros((), dtype=lse.dtype, device=lse.device), lse)
    dq, dk, dv = _ATEN_BACKWARD(
        _unit_stride(grad_out.to(q.dtype)),
        _unit_stride(q),
        _unit_stride(k),
        _unit_stride(v),
        _unit_stride(out),
        lse,
        0.0,
        False,
        attn_mask=_additive(mask, q.dtype),
        scale=scale,
    )
    if dk.shape[2] < Sk:  # keys sliced off by _drop_unused_keys: nobody saw them, zero gradient
        dk, dv = (F.pad(t, (0, 0, 0, Sk - t.shape[2])) for t in (dk, dv))
    return dq, dk, dv


def _degenerate(q, k) -> bool:
    """An empty batch, head, sequence or head dim: the ATen kernels cannot take it."""
    return q.numel() == 0 or k.numel() == 0


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """t with a contiguous last (head) dim: the ATen kernels assume one and silently return
    garbage otherwise (SDPA checks it and falls back to its math path)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean key mask as the kernels take it: 0 where attended, -inf where not, in q's dtype
    (what SDPA converts a boolean mask to before calling them)."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


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
