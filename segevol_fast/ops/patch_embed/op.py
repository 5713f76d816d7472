"""patch_embed: SegVol's "perceptron" patch embedding fused into one op.

    tokens[b, n, :] = weight @ patch(x * scale + shift)[b, n] + bias + pos_embed[n]

`x` is a channel-first volume (B, C, D, H, W). It is cut into non-overlapping patches of
`patch_size` = (pd, ph, pw); tokens are numbered row-major over the patch grid
(gd, gh, gw) = (D // pd, H // ph, W // pw) and each patch is flattened in (p1, p2, p3, c) order
with the channel fastest. This is MONAI's `Rearrange("b c (h p1) (w p2) (d p3) -> b (h w d)
(p1 p2 p3 c)")` followed by `Linear`, and equals `Conv3d(kernel = stride = patch_size)` with the
Linear weight reshaped to (E, pd, ph, pw, C) and permuted to (E, C, pd, ph, pw). As with that
Conv3d, voxels past the last whole patch along an axis do not contribute.

Implementations: `patch_embed_ref` (PyTorch), native C++ (CPU), CUDA, Triton (csrc/patch_embed/,
triton_kernel.py next to this file); dispatch, custom op and eager bypass come from `_op.define_op`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ShapeError
from .._op import define_op

OP_NAME = "patch_embed"
DEFAULT_PATCH = (4, 16, 16)


# ---------------------------------------------------------------------------- reference
def patchify(x: Tensor, patch_size: Sequence[int]) -> Tensor:
    """(B, C, D, H, W) -> (B, N, pd*ph*pw*C) in MONAI's token and within-patch order."""
    B, C, D, H, W = x.shape
    pd, ph, pw = patch_size
    gd, gh, gw = D // pd, H // ph, W // pw
    x = x[:, :, : gd * pd, : gh * ph, : gw * pw]
    x = x.reshape(B, C, gd, pd, gh, ph, gw, pw).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(B, gd * gh * gw, pd * ph * pw * C)


def unpatchify(p: Tensor, shape: Sequence[int], patch_size: Sequence[int]) -> Tensor:
    """Inverse of `patchify` onto a zero volume of `shape` (B, C, D, H, W); the remainder stays 0."""
    B, C, D, H, W = shape
    pd, ph, pw = patch_size
    gd, gh, gw = D // pd, H // ph, W // pw
    v = p.reshape(B, gd, gh, gw, pd, ph, pw, C).permute(0, 7, 1, 4, 2, 5, 3, 6)
    v = v.reshape(B, C, gd * pd, gh * ph, gw * pw)
    if (gd * pd, gh * ph, gw * pw) != (D, H, W):
        v = F.pad(v, (0, W - gw * pw, 0, H - gh * ph, 0, D - gd * pd))
    return v


def patch_embed_ref(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    pos_embed: Optional[Tensor] = None,
    patch_size: Sequence[int] = DEFAULT_PATCH,
    scale: float = 1.0,
    shift: float = 0.0,
) -> Tensor:
    """Plain-PyTorch definition of `patch_embed` (same arguments, same result)."""
    if scale != 1.0 or shift != 0.0:
        x = x * scale + shift
    out = F.linear(patchify(x, patch_size), weight, bias)
    if pos_embed is not None:
        out = out + pos_embed.reshape(1, out.shape[1], out.shape[2])
    return out


# ---------------------------------------------------------------------------- checks
def _check(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Optional[Tensor], patch_size
) -> tuple[int, int, int]:
    """Validate shapes/dtypes/devices; return (B, N, E)."""
    if len(patch_size) != 3 or any(int(p) <= 0 for p in patch_size):
        raise ShapeError(f"patch_size must be three positive ints (pd, ph, pw), got {tuple(patch_size)}")
    if x.dim() != 5:
        raise ShapeError(f"x must be a (B, C, D, H, W) volume, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ShapeError(f"x must be a floating-point tensor, got {x.dtype}; convert with x.float()")
    B, C, D, H, W = x.shape
    pd, ph, pw = (int(p) for p in patch_size)
    grid = (D // pd, H // ph, W // pw)
    if min(grid) == 0:
        raise ShapeError(f"volume (D, H, W) = {(D, H, W)} is smaller than one patch {tuple(patch_size)}")
    N = math.prod(grid)
    K = pd * ph * pw * C
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ShapeError(
            f"weight must be (E, pd*ph*pw*C) = (E, {K}) for patch {tuple(patch_size)} and C={C}, got {tuple(weight.shape)}"
        )
    E = weight.shape[0]
    tensors = {"weight": weight}
    if bias is not None:
        if tuple(bias.shape) != (E,):
            raise ShapeError(f"bias must be ({E},), got {tuple(bias.shape)}")
        tensors["bias"] = bias
    if pos_embed is not None:
        if pos_embed.numel() != N * E or pos_embed.shape[-1] != E or pos_embed.dim() not in (2, 3):
            raise ShapeError(
                f"pos_embed must be (N, E) or (1, N, E) with N = {N} tokens for grid {grid} and E = {E}, "
                f"got {tuple(pos_embed.shape)}"
            )
        tensors["pos_embed"] = pos_embed
    for name, t in tensors.items():
        if t.dtype != x.dtype:
            raise ShapeError(f"{name} dtype {t.dtype} differs from x dtype {x.dtype}; cast one of them")
        if t.device != x.device:
            raise ShapeError(f"{name} is on {t.device} but x is on {x.device}")
    return B, N, E


# ---------------------------------------------------------------------------- backends
def _native_impl(x, weight, bias, pos_embed, patch_size, scale, shift):
    return torch.ops.segevol_fast_C.patch_embed(x, weight, bias, pos_embed, list(patch_size), scale, shift)


def _triton_impl(x, weight, bias, pos_embed, patch_size, scale, shift):
    from .triton_kernel import patch_embed_triton

    return patch_embed_triton(x, weight, bias, pos_embed, patch_size, scale, shift)


def _fake(x, weight, bias, pos_embed, patch_size, scale, shift):
    B, C, D, H, W = x.shape
    pd, ph, pw = patch_size
    return x.new_empty((B, (D // pd) * (H // ph) * (W // pw), weight.shape[0]))


# ---------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    x, weight, bias, pos_embed, patch_size, scale, shift = inputs
    ctx.save_for_backward(x, weight)
    ctx.patch_size = list(patch_size)
    ctx.scale, ctx.shift = scale, shift
    ctx.has_bias = bias is not None
    ctx.pos_shape = None if pos_embed is None else tuple(pos_embed.shape)


def _backward(ctx, grad_out):
    # Plain PyTorch: the backward is two GEMMs and a scatter, all bandwidth-friendly in ATen.
    x, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    E = weight.shape[0]
    g2 = grad_out.reshape(-1, E)
    grad_x = grad_w = grad_b = grad_pos = None
    if needs[1]:
        xs = x * ctx.scale + ctx.shift if (ctx.scale != 1.0 or ctx.shift != 0.0) else x
        grad_w = g2.t().matmul(patchify(xs, ctx.patch_size).reshape(g2.shape[0], -1))
    if needs[0]:
        gp = grad_out.matmul(weight)
        grad_x = unpatchify(gp, x.shape, ctx.patch_size)
        if ctx.scale != 1.0:
            grad_x = grad_x * ctx.scale
    if ctx.has_bias and needs[2]:
        grad_b = g2.sum(0)
    if ctx.pos_shape is not None and needs[3]:
        grad_pos = grad_out.sum(0).reshape(ctx.pos_shape)
    return grad_x, grad_w, grad_b, grad_pos, None, None, None


# ---------------------------------------------------------------------------- registration
SCHEMA = (
    "(Tensor x, Tensor weight, Tensor? bias, Tensor? pos_embed, int[] patch_size, float scale, float shift) -> Tensor"
)
# the registered op (backends, torch custom op, autograd); spec.py hands it to the contract tests
OP = define_op(
    OP_NAME,
    SCHEMA,
    ref=patch_embed_ref,
    native=_native_impl,
    triton=_triton_impl,
    fake=_fake,
    setup_context=_setup_context,
    backward=_backward,
)


# ---------------------------------------------------------------------------- public entry point
def patch_embed(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    pos_embed: Optional[Tensor] = None,
    patch_size: Sequence[int] = DEFAULT_PATCH,
    scale: float = 1.0,
    shift: float = 0.0,
) -> Tensor:
    """Volume -> patch tokens with bias and position embedding, in one pass.

    Args:
        x: (B, C, D, H, W) float32/float16/bfloat16/float64 volume, any strides.
        weight: (E, pd*ph*pw*C) Linear weight (MONAI `patch_embeddings.1.weight`), dtype of x.
        bias: (E,) or None.
        pos_embed: (N, E) or (1, N, E) learned position embedding, or None;
            N = (D//pd) * (H//ph) * (W//pw).
        patch_size: (pd, ph, pw); SegVol uses (4, 16, 16).
        scale, shift: fused input affine, applied as x * scale + shift before the projection
            (e.g. a min-max normalisation), so the normalised volume is never materialised.

    Returns:
        (B, N, E) tokens in x's dtype; kernels accumulate in float32 (float64 for float64).

    Differentiable with respect to x, weight, bias and pos_embed; traceable by torch.compile
    (`torch.ops.segevol_fast.patch_embed`).
    """
    _check(x, weight, bias, pos_embed, patch_size)
    return OP(x, weight, bias, pos_embed, [int(p) for p in patch_size], float(scale), float(shift))
