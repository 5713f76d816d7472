"""Triton lora_linear: base GEMM and LoRA shrink share one K-loop; the expand runs after it.

Each program owns a BLOCK_M rows x BLOCK_N columns tile of the (M, N) output. Every x tile it
loads feeds two dots: the base product with W^T and the rank-r shrink with A^T, whose
(BLOCK_M, BLOCK_R) result stays in registers. After the loop one small dot with B^T (only the
columns inside out_slice; the others load zeros) adds scale * t @ B^T, then the bias, and the
tile is stored once. x is read once per column tile, as in a plain GEMM; nothing rank-r touches
global memory. Semantics: `segevol_fast.ops.lora_linear.lora_linear_ref`.

routed_lora_linear runs the same kernel with all E adapters stacked as one rank-E*r LoRA and a
per-row weight for each adapter's rank block (one-hot, zero or the segment's gates), applied to
the shrink in registers before the expand: one GEMM launch for any mix of segments and adapters.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...errors import ShapeError
from .._triton import TiledKernel, gemm_configs, matmul_precision

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _lora_linear_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    a_ptr,
    b_ptr,
    rw_ptr,
    out_ptr,
    M,
    N,
    K,
    R,
    start,
    stop,
    scale,
    RANK,
    sxm,
    sxk,  # x viewed as (M, K)
    swn,
    swk,  # W (N, K)
    sbias,
    sar,
    sak,  # A (r, K)
    sbn,
    sbr,  # B (stop - start, r)
    srwm,
    srwe,  # row weights (M, R // RANK): routed_lora_linear's per-row adapter weights
    HAS_BIAS: tl.constexpr,
    HAS_ROW_WEIGHTS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: large M*K offsets
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < M
    n_ok = rn < N
    r_ok = rr < R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        xa = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rn[None, :] * swn + rk[:, None] * swk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        a = tl.load(a_ptr + rr[None, :] * sar + rk[:, None] * sak, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(xa, w, acc, input_precision=PRECISION)
        t = tl.dot(xa, a, t, input_precision=PRECISION)

    if HAS_ROW_WEIGHTS:
        # rank column c belongs to adapter c // RANK; each row scales every adapter's block
        rw = tl.load(
            rw_ptr + rm[:, None] * srwm + (rr // RANK)[None, :] * srwe, mask=m_ok[:, None] & r_ok[None, :], other=0.0
        )
        t = t * rw.to(tl.float32)
    # Expand: output column n uses row n - start of B when start <= n < stop.
    in_slice = (rn >= start) & (rn < stop) & n_ok
    bt = tl.load(
        b_ptr + (rn - start)[None, :] * sbn + rr[:, None] * sbr, mask=r_ok[:, None] & in_slice[None, :], other=0.0
    )
    # t is rounded to the input dtype before the expand, as the unfused path does
    lora = tl.dot(t.to(b_ptr.dtype.element_ty), bt, input_precision=PRECISION)
    acc += scale * lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn * sbias, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :]
    )


_kernel = TiledKernel(
    _lora_linear_kernel, gemm_configs(), key=["M", "N", "K", "BLOCK_R", "HAS_ROW_WEIGHTS", "PRECISION"]
)


def lora_linear_triton(x, weight, bias, lora_a, lora_b, scale: float, out_slice, row_weights=None):
    """(..., K) -> (..., N); arguments already validated by ops.lora_linear._check.

    row_weights (M, E) with lora_a's r = E * rank: row m scales rank block e (rank columns
    e*rank..(e+1)*rank of its shrink) by row_weights[m, e] before the expand (routed_lora_linear).
    """
    if x.dtype not in _SUPPORTED:
        raise ShapeError(
            f"the Triton lora_linear supports float32/float16/bfloat16, got {x.dtype}; "
            "cast the inputs, or use the 'native' or 'ref' backend (they accept float64)"
        )
    K, (N, _) = x.shape[-1], weight.shape
    x2 = x.reshape(-1, K)  # a view when the strides allow it; the kernel takes any 2-D strides
    M, R = x2.shape[0], lora_a.shape[0]
    start, stop = (int(s) for s in out_slice)
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return out.reshape(*x.shape[:-1], N)
    bias_arg = bias if bias is not None else out  # never read: HAS_BIAS compiles the load out
    rw = row_weights if row_weights is not None else out  # likewise HAS_ROW_WEIGHTS
    rank = R // row_weights.shape[1] if row_weights is not None else R
    # tl.dot needs every dimension >= 16
    block_r = max(16, triton.next_power_of_2(R))
    _kernel(
        M,
        N,
        x2,
        weight,
        bias_arg,
        lora_a,
        lora_b,
        rw,
        out,
        M,
        N,
        K,
        R,
        start,
        stop,
        float(scale),
        rank,
        x2.stride(0),
        x2.stride(1),
        weight.stride(0),
        weight.stride(1),
        bias_arg.stride(0),
        lora_a.stride(0),
        lora_a.stride(1),
        lora_b.stride(0),
        lora_b.stride(1),
        rw.stride(0),
        rw.stride(1),
        HAS_BIAS=bias is not None,
        HAS_ROW_WEIGHTS=row_weights is not None,
        PRECISION=matmul_precision(x.dtype),
        BLOCK_R=block_r,
    )
    return out.reshape(*x.shape[:-1], N)
