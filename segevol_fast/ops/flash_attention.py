"""flash_attention: non-causal multi-head attention with per-batch key lengths, as one op.

    out[b, h] = softmax(scale * q[b, h] @ k[b, h]^T, keys j >= kv_len[b] masked) @ v[b, h]

Layout (B, H, S, D) like torch SDPA; the semantics (scale default, kv_len clamping, a row with no
valid key giving zeros) are those of `kernels.reference_attention`, whose
`flash_attention_reference` is this op's `flash_attention_ref`.

Backends: ref (scores materialised), native on CPU = PyTorch's fused CPU attention
(`flash_attention_sdpa`; no C++ of ours could beat ATen's vectorised, OpenMP-parallel flash kernel,
so it is registered through `define_op(native_cpu=...)`), triton (CUDA, or CPU under the
interpreter). CUDA tensors go to Triton, else ref.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.reference_attention import (
    check_attention_args,
    flash_attention_reference,
    flash_attention_sdpa,
)
from . import _backend
from ._op import define_op, device_guard

OP_NAME = "flash_attention"
SCHEMA = "(Tensor q, Tensor k, Tensor v, float? scale, Tensor? kv_len) -> Tensor"

flash_attention_ref = flash_attention_reference


# ---------------------------------------------------------------------------- backends
def _triton_impl(q, k, v, scale, kv_len):
    from ..kernels.triton.flash_attention import flash_attention_triton

    return flash_attention_triton(q, k, v, scale, kv_len)[0]


def _fake(q, k, v, scale, kv_len):
    return q.new_empty(q.shape)


# ---------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    q, k, v, scale, kv_len = inputs
    ctx.save_for_backward(q, k, v, kv_len)
    ctx.scale = scale
    # The backward uses the forward's backend, even if it runs outside the forward's use_backend.
    ctx.backend = _backend.select(OP_NAME, q.device.type)


def _triton_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float | None,
                     kv_len: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels.triton.flash_attention import (
        flash_attention_triton,
        flash_attention_triton_backward,
    )

    # The forward op returns only `out`, so the softmax statistics (lse) are recomputed here: one
    # extra forward pass instead of an extra output every caller would carry.
    with device_guard(q.device):
        out, lse = flash_attention_triton(q, k, v, scale, kv_len)
        return flash_attention_triton_backward(grad_out, q, k, v, out, lse, scale, kv_len)


# A custom op of its own, so the backward graph stays traceable (torch.compile, opcheck): Triton
# launches cannot run on the fake tensors AOTAutograd traces the backward formula with.
_TRITON_GRAD = torch.library.custom_op(
    "segevol_fast::flash_attention_triton_grad", _triton_backward, mutates_args=(),
    schema="(Tensor grad_out, Tensor q, Tensor k, Tensor v, float? scale, Tensor? kv_len) -> (Tensor, Tensor, Tensor)",
)


@_TRITON_GRAD.register_fake
def _triton_grad_fake(grad_out, q, k, v, scale, kv_len):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _autograd_backward(fn, grad_out, q, k, v, scale, kv_len, needs):
    """Gradients by re-running a PyTorch backend under autograd: for SDPA this is ATen's fused
    flash backward (no Sq x Sk matrix); for the reference it is the reference's own math."""
    leaves = [t.detach().requires_grad_(n) for t, n in zip((q, k, v), needs)]
    with torch.enable_grad():
        out = fn(*leaves, scale, kv_len)
    wanted = [t for t in leaves if t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, grad_out.to(out.dtype)))
    return [next(grads) if t.requires_grad else None for t in leaves]


def _backward(ctx, grad_out):
    q, k, v, kv_len = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    if not any(needs):
        return None, None, None, None, None
    device = q.device
    with torch.autocast(device_type=device.type, enabled=False), device_guard(device):
        if ctx.backend == "triton":
            grads = _TRITON_GRAD(grad_out, q, k, v, ctx.scale, kv_len)
            grads = [g if n else None for g, n in zip(grads, needs)]
        else:
            fn = flash_attention_sdpa if ctx.backend == "native" else flash_attention_reference
            grads = _autograd_backward(fn, grad_out, q, k, v, ctx.scale, kv_len, needs)
    return (*grads, None, None)


# ---------------------------------------------------------------------------- registration
_OP = define_op(
    OP_NAME, SCHEMA,
    ref=flash_attention_reference, native_cpu=flash_attention_sdpa, triton=_triton_impl, fake=_fake,
    setup_context=_setup_context, backward=_backward,
)


# ---------------------------------------------------------------------------- public entry point
def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None = None,
    kv_len: None | int | Tensor = None,
) -> Tensor:
    """softmax(scale · q kᵀ, keys ≥ kv_len masked) · v without materialising the score matrix.

    Args:
        q: (B, H, Sq, D); k, v: (B, H, Sk, D); one float dtype and device, any strides.
        scale: softmax scale; None means D ** -0.5 (torch SDPA's default).
        kv_len: None (every key valid), an int, or a (B,) integer tensor: batch row b attends to
            keys 0 .. kv_len[b] - 1 (clamped to [0, Sk]); a row with kv_len 0 outputs zeros.

    Returns:
        (B, H, Sq, D) in q's dtype; kernels accumulate in float32 (float64 for float64).

    Differentiable with respect to q, k and v; traceable by torch.compile
    (`torch.ops.segevol_fast.flash_attention`).
    """
    check_attention_args(q, k, v, kv_len)
    if isinstance(kv_len, int):
        kv_len = torch.full((q.shape[0],), kv_len, dtype=torch.int64, device=q.device)
    return _OP(q, k, v, None if scale is None else float(scale), kv_len)
