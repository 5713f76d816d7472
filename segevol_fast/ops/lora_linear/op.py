"""lora_linear: a Linear layer plus its LoRA update in one op (on GPU one kernel reading x once).

    y = x @ W.T + b;   y[..., start:stop] += scale * (x @ A.T) @ B.T

W (N, K) is the frozen base weight, A (r, K) the LoRA "down" (shrink) and B (n, r) the "up"
(expand) matrix, n = stop - start. `out_slice` = (start, stop) adds the LoRA term to that column
range only (LoRA on the q third of a fused qkv projection); the default is every column.

Two disjoint slices (q and v of a fused qkv, each with its own A and B) are one call: stack the
two A's into A (2r, K) and give one slice from q's start to v's stop with a block-sparse B whose
q rows are [B_q, 0], v rows [0, B_v] and k rows zero (`stack_lora_slices` builds them). That is
exact; it costs a rank-2r expand over the combined width instead of two rank-r ones.

Implementations (semantics: `lora_linear_ref`):
  * ref: plain PyTorch, peft's formula.
  * native (CPU): a composition of ATen GEMMs, no C++ and no cached weight copies: the shrink
    t = x @ A.T (r << K), the expand scale * t @ B.T written into the output slice (the bias
    elsewhere), then the base GEMM accumulated onto it in place (addmm_, beta = 1). Versus the
    base GEMM alone this adds one small GEMM over x and a rank-r one over the slice. Two other
    layouts were measured (bench/harness.py): "one GEMM over [W; A], then the expand in place"
    (slower here, and its output is a column view of an (M, N + r) buffer whose strides would
    differ from the other backends' and the fake kernel's unless compacted by a copy), and one
    GEMM over the K-concatenation [x, t] @ [W, B'].T (needs a cached copy of every wrapped W
    and was no faster).
  * triton (CUDA, or the interpreter): one kernel whose K-loop feeds both the base tile and the
    rank-r shrink (kept in registers); the expand and the bias run after the loop.

Autograd: gradients for x, bias, A and B. W is frozen, as in LoRA fine-tuning: calling the op
with a W that requires grad while grad mode is on raises `InvalidArgumentError` rather than
silently leaving W's gradient empty (detach W, or set requires_grad_(False)).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import InvalidArgumentError, ShapeError
from .._op import define_op

OP_NAME = "lora_linear"


# ---------------------------------------------------------------------------- reference
def lora_linear_ref(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float = 1.0,
    out_slice: Optional[Sequence[int]] = None,
) -> Tensor:
    """Plain-PyTorch definition of `lora_linear` (peft's formula, unfused)."""
    N = weight.shape[0]
    start, stop = (0, N) if out_slice is None else (int(out_slice[0]), int(out_slice[1]))
    out = F.linear(x, weight, bias)
    delta = scale * F.linear(F.linear(x, lora_a), lora_b)
    return out + F.pad(delta, (start, N - stop))


def stack_lora_slices(
    pieces: Sequence[tuple[Tensor, Tensor, Sequence[int]]],
) -> tuple[Tensor, Tensor, list[int]]:
    """[(A_i, B_i, (start_i, stop_i)), ...] with disjoint slices -> (A, B, out_slice) for one call.

    A = cat(A_i) (sum r_i, K); B spans min(start_i)..max(stop_i) with B_i in its own rows and
    columns and zeros elsewhere, so x @ A.T @ B.T adds each piece's term to its own slice only.
    """
    if not pieces:
        raise InvalidArgumentError("stack_lora_slices needs at least one (A, B, slice) piece")
    spans = sorted((int(s), int(e)) for _, _, (s, e) in pieces)
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise InvalidArgumentError(f"slices ({s0}, {e0}) and ({s1}, {e1}) overlap; slices must be disjoint")
    lo = min(int(s[0]) for _, _, s in pieces)
    hi = max(int(s[1]) for _, _, s in pieces)
    A = torch.cat([a for a, _, _ in pieces], 0)
    B = A.new_zeros((hi - lo, A.shape[0]))
    r0 = 0
    for a, b, (s, e) in pieces:
        if b.shape != (int(e) - int(s), a.shape[0]):
            raise ShapeError(f"B of slice ({s}, {e}) must be ({int(e) - int(s)}, {a.shape[0]}), got {tuple(b.shape)}")
        B[int(s) - lo : int(e) - lo, r0 : r0 + a.shape[0]] = b
        r0 += a.shape[0]
    return A, B, [lo, hi]


# ---------------------------------------------------------------------------- checks
def _check(x: Tensor, weight: Tensor, bias, lora_a: Tensor, lora_b: Tensor, out_slice) -> list[int]:
    """Validate shapes/dtypes/devices; return the normalised [start, stop]."""
    if x.dim() < 1 or not x.is_floating_point():
        raise ShapeError(f"x must be a floating-point (..., K) tensor, got {x.dtype} of shape {tuple(x.shape)}")
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ShapeError(f"weight must be (N, K) = (N, {K}) for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    N = weight.shape[0]
    if out_slice is None:
        start, stop = 0, N
    else:
        if len(out_slice) != 2:
            raise ShapeError(f"out_slice must be (start, stop), got {tuple(out_slice)}")
        start, stop = int(out_slice[0]), int(out_slice[1])
        if not 0 <= start < stop <= N:
            raise ShapeError(f"out_slice ({start}, {stop}) must satisfy 0 <= start < stop <= N = {N}")
    if lora_a.dim() != 2 or lora_a.shape[1] != K or lora_a.shape[0] < 1:
        raise ShapeError(f"lora_a must be (r, K) = (r, {K}) with r >= 1, got {tuple(lora_a.shape)}")
    r = lora_a.shape[0]
    if tuple(lora_b.shape) != (stop - start, r):
        raise ShapeError(
            f"lora_b must be (stop - start, r) = ({stop - start}, {r}) for out_slice ({start}, {stop}), "
            f"got {tuple(lora_b.shape)}"
        )
    tensors = {"weight": weight, "lora_a": lora_a, "lora_b": lora_b}
    if bias is not None:
        if tuple(bias.shape) != (N,):
            raise ShapeError(f"bias must be ({N},), got {tuple(bias.shape)}")
        tensors["bias"] = bias
    for name, t in tensors.items():
        if t.dtype != x.dtype:
            raise ShapeError(f"{name} dtype {t.dtype} differs from x dtype {x.dtype}; cast one of them")
        if t.device != x.device:
            raise ShapeError(f"{name} is on {t.device} but x is on {x.device}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise InvalidArgumentError(
            "lora_linear keeps the base weight frozen and computes no gradient for it; "
            "call weight.requires_grad_(False) (or pass weight.detach())"
        )
    return [start, stop]


# ---------------------------------------------------------------------------- CPU composition
def _native_cpu(x, weight, bias, lora_a, lora_b, scale, out_slice):
    # The rank-r expand is written first, into the output buffer that the base GEMM then
    # accumulates onto (beta = 1): ATen's addmm(bias, ...) fills the output with the broadcast
    # bias before its GEMM anyway, so the LoRA term replaces that fill instead of costing a
    # separate read-modify-write pass after the GEMM.
    start, stop = out_slice
    K, N = x.shape[-1], weight.shape[0]
    if scale == 0.0:
        return F.linear(x, weight, bias)  # exactly the base layer
    x2 = x.reshape(-1, K)
    t = torch.mm(x2, lora_a.t())  # (M, r): the shrink, a small extra GEMM over x (r << K)
    if (start, stop) == (0, N):
        out = torch.addmm(bias, t, lora_b.t(), alpha=scale) if bias is not None else torch.mm(t, lora_b.t()).mul_(scale)
    else:
        out = bias.expand(x2.shape[0], N).contiguous() if bias is not None else x2.new_zeros((x2.shape[0], N))
        out[:, start:stop].addmm_(t, lora_b.t(), alpha=scale)
    out.addmm_(x2, weight.t())
    return out.reshape(*x.shape[:-1], N)


# ---------------------------------------------------------------------------- other backends
def _triton_impl(x, weight, bias, lora_a, lora_b, scale, out_slice):
    from .triton_kernel import lora_linear_triton

    return lora_linear_triton(x, weight, bias, lora_a, lora_b, scale, out_slice)


def _fake(x, weight, bias, lora_a, lora_b, scale, out_slice):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# ---------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, out_slice = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b)
    ctx.scale, ctx.out_slice, ctx.has_bias = scale, list(out_slice), bias is not None


def _backward(ctx, grad_out):
    # With g the output gradient, g_s its slice, t = x A^T and u = scale * g_s B:
    #   dx = g W + u A,   dA = u^T x,   dB = scale * g_s^T t,   db = sum g.
    x, weight, lora_a, lora_b = ctx.saved_tensors
    needs = ctx.needs_input_grad
    start, stop = ctx.out_slice
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    g = grad_out.reshape(x2.shape[0], -1)
    g_s = g[:, start:stop]
    u = torch.mm(g_s, lora_b).mul_(ctx.scale) if (needs[0] or needs[3]) else None
    grad_x = grad_b = grad_a = grad_lb = None
    if needs[0]:
        grad_x = torch.addmm(torch.mm(g, weight), u, lora_a).reshape(x.shape)  # [g, u] @ [W; A]
    if ctx.has_bias and needs[2]:
        grad_b = g.sum(0)
    if needs[3]:
        grad_a = torch.mm(u.t(), x2)
    if needs[4]:
        grad_lb = torch.mm(g_s.t(), torch.mm(x2, lora_a.t())).mul_(ctx.scale)
    return grad_x, None, grad_b, grad_a, grad_lb, None, None


# ---------------------------------------------------------------------------- registration
SCHEMA = "(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scale, int[] out_slice) -> Tensor"
# the registered op (backends, torch custom op, autograd); spec.py hands it to the contract tests
OP = define_op(
    OP_NAME,
    SCHEMA,
    # "native" on CPU is a composition of ATen GEMMs (no csrc/ op): define_op's native_cpu
    ref=lora_linear_ref,
    native_cpu=_native_cpu,
    triton=_triton_impl,
    fake=_fake,
    setup_context=_setup_context,
    backward=_backward,
)


# ---------------------------------------------------------------------------- public entry point
def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float = 1.0,
    out_slice: Optional[Sequence[int]] = None,
) -> Tensor:
    """Linear + LoRA: x @ W.T + b, plus scale * (x @ A.T) @ B.T on columns out_slice.

    Args:
        x: (..., K) float tensor, any strides.
        weight: (N, K) frozen base weight (must not require grad while grad mode is on).
        bias: (N,) or None.
        lora_a: (r, K), r >= 1 (peft's lora_A.weight).
        lora_b: (stop - start, r) (peft's lora_B.weight).
        scale: peft's lora_alpha / r. 0 gives exactly the base layer on the native backend.
        out_slice: (start, stop) output columns the LoRA term is added to; None = all N. For
            two disjoint slices (q and v) see `stack_lora_slices`.

    Returns:
        (..., N) in x's dtype. Differentiable in x, bias, lora_a and lora_b; traceable by
        torch.compile (`torch.ops.segevol_fast.lora_linear`).
    """
    sl = _check(x, weight, bias, lora_a, lora_b, out_slice)
    return OP(x, weight, bias, lora_a, lora_b, float(scale), sl)
