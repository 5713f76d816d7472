"""Triton patch_embed: patchify + Linear + bias + pos in one kernel.

Each program owns a BLOCK_M tokens x BLOCK_N outputs tile of the (B*N, E) token matrix. Rather
than materialising the (B*N, K) patch matrix (as the CUDA/C++ paths do), it gathers each
BLOCK_M x BLOCK_K slice of it straight from the strided volume, applies x*scale+shift in fp32,
and feeds it to tl.dot; bias and position embedding are added in the epilogue. The volume is
read once and the tokens written once. Semantics: `segevol_fast.ops.patch_embed.patch_embed_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...errors import ShapeError
from .._triton import TiledKernel, gemm_configs, matmul_precision

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _patch_embed_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    pos_ptr,
    out_ptr,
    M,
    N,
    E,
    K,
    gh,
    gw,
    pd,
    ph,
    pw,
    C,
    sxb,
    sxc,
    sxd,
    sxh,
    sxw,  # strides of x
    swe,
    swk,  # strides of weight (E, K)
    sb,  # stride of bias
    spn,
    spe,  # strides of pos viewed as (N, E)
    scale,
    shift,
    AFFINE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_POS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # Token rows of this tile; int64 so offsets into large (batched) volumes cannot overflow.
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < E
    rm64 = rm.to(tl.int64)
    # token -> (batch, grid cell i, j, k) -> offset of the patch's first voxel
    b = rm64 // N
    t = rm64 % N
    gi = t // (gh * gw)
    gj = (t // gw) % gh
    gk = t % gw
    row_base = b * sxb + gi * pd * sxd + gj * ph * sxh + gk * pw * sxw

    ck = ph * pw * C  # values per p1 slab
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        rk64 = rk.to(tl.int64)
        # within-patch index (p1, p2, p3, c), channel fastest -> voxel offset inside the patch
        p1 = rk64 // ck
        p2 = (rk64 // (pw * C)) % ph
        p3 = (rk64 // C) % pw
        c = rk64 % C
        col_off = p1 * sxd + p2 * sxh + p3 * sxw + c * sxc
        a_mask = m_ok[:, None] & k_ok[None, :]
        a = tl.load(x_ptr + row_base[:, None] + col_off[None, :], mask=a_mask, other=0.0)
        if AFFINE:
            # fp32 affine; keep padded lanes at 0 (shift would make them non-zero)
            a = tl.where(a_mask, a.to(tl.float32) * scale + shift, 0.0)
        a = a.to(w_ptr.dtype.element_ty)
        # weight tile as (BLOCK_K, BLOCK_N) = W^T slice
        w = tl.load(w_ptr + rn[None, :] * swe + rk64[:, None] * swk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)

    # Epilogue: bias[e] + pos[n, e] in fp32, then one store in the output dtype.
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn * sb, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mn_mask = m_ok[:, None] & n_ok[None, :]
    if HAS_POS:
        acc += tl.load(pos_ptr + t[:, None] * spn + rn[None, :] * spe, mask=mn_mask, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + rm64[:, None] * E + rn[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mn_mask)


# Autotune only when there is a real choice; the key covers what changes the best tile.
_kernel = TiledKernel(_patch_embed_kernel, gemm_configs((64, 64, 32, 2, 4)), key=["M", "E", "K", "PRECISION"])


def patch_embed_triton(x, weight, bias, pos_embed, patch_size, scale: float = 1.0, shift: float = 0.0):
    """(B,C,D,H,W) volume -> (B,N,E) tokens; arguments already validated by ops.patch_embed._check."""
    if x.dtype not in _SUPPORTED:
        raise ShapeError(
            f"the Triton patch_embed supports float32/float16/bfloat16, got {x.dtype}; "
            "cast x and the parameters, or use the 'native' or 'ref' backend (they accept float64)"
        )
    B, C, D, H, W = x.shape
    pd, ph, pw = (int(p) for p in patch_size)
    gd, gh, gw = D // pd, H // ph, W // pw
    N, E = gd * gh * gw, weight.shape[0]
    K = pd * ph * pw * C
    M = B * N
    out = torch.empty((B, N, E), device=x.device, dtype=x.dtype)
    if M == 0 or E == 0:
        return out
    # dummies for absent operands: never read (constexpr flags compile the loads out)
    b = bias if bias is not None else out
    pos = pos_embed.reshape(N, E) if pos_embed is not None else out.view(M, E)
    _kernel(
        M,
        E,
        x,
        weight,
        b,
        pos,
        out,
        M,
        N,
        E,
        K,
        gh,
        gw,
        pd,
        ph,
        pw,
        C,
        *x.stride(),
        weight.stride(0),
        weight.stride(1),
        b.stride(0),
        pos.stride(0),
        pos.stride(1),
        float(scale),
        float(shift),
        AFFINE=(scale != 1.0 or shift != 0.0),
        HAS_BIAS=bias is not None,
        HAS_POS=pos_embed is not None,
        PRECISION=matmul_precision(x.dtype),
    )
    return out
