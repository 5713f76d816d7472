"""flash_attention: non-causal multi-head attention with per-batch key lengths, as one op.

    out[b, h] = softmax(scale * q[b, h] @ k[b, h]^T, keys j >= kv_len[b] masked) @ v[b, h]

Layout (B, H, S, D) like torch SDPA; the semantics (scale default, kv_len clamping, a row with no
valid key giving zeros) are those of `reference.py` next to this file, whose
`flash_attention_reference` is this op's `flash_attention_ref`.

The registered op `torch.ops.segevol_fast.flash_attention` returns two tensors, (out, lse): lse is
the softmax statistics of the forward, the row log-sum-exp (B, H, Sq), natural log, fp32 (fp64 for
fp64 inputs), -inf for a row with no valid key. The autograd formula saves out and lse, and the
backward kernels rebuild the probabilities from them, so no backward re-runs the forward. lse is not
differentiable. `flash_attention` returns out alone; `flash_attention_with_lse` both.

Backends: ref (scores materialised), native on CPU = ATen's fused CPU flash-attention kernels, the
ones PyTorch's SDPA runs on CPU (`flash_attention_cpu`; no C++ of ours could beat ATen's vectorised,
OpenMP-parallel flash kernel, so it is registered through `define_op(native_cpu=...)`), triton
(CUDA, or CPU under the interpreter). CUDA tensors go to Triton, else ref.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import _backend
from .._op import define_op, device_guard
from .reference import (
    check_attention_args,
    flash_attention_cpu,
    flash_attention_cpu_backward,
    flash_attention_reference,
    flash_attention_reference_with_lse,
    lse_like,
)

OP_NAME = "flash_attention"
SCHEMA = "(Tensor q, Tensor k, Tensor v, float? scale, Tensor? kv_len) -> (Tensor, Tensor)"

flash_attention_ref = flash_attention_reference


# ---------------------------------------------------------------------------- output layout
# Every backend returns `out` with the memory layout (B, Sq, H, D), viewed as (B, H, Sq, D): the
# layout ATen's CPU kernel writes, and the one attention's caller wants (heads merged back into
# the hidden size by a free transpose + view). The fake kernel promises the same strides, which
# torch.compile checks against the real output.
def _out_like(q: Tensor) -> Tensor:
    B, H, Sq, D = q.shape
    return q.new_empty((B, Sq, H, D)).transpose(1, 2)


def _in_out_layout(out: Tensor) -> Tensor:
    want = _out_like(out)
    return out if out.stride() == want.stride() or out.numel() == 0 else want.copy_(out)


def _layout(backend):
    @functools.wraps(backend)  # run.__wrapped__ is the backend
    def run(q, k, v, scale, kv_len):
        out, lse = backend(q, k, v, scale, kv_len)
        return _in_out_layout(out), lse

    return run


# ---------------------------------------------------------------------------- backends
def _triton_impl(q, k, v, scale, kv_len):
    from .triton_kernel import flash_attention_triton

    return flash_attention_triton(q, k, v, scale, kv_len, out=_out_like(q))


def _fake(q, k, v, scale, kv_len):
    return _out_like(q), lse_like(q)


# ---------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    q, k, v, scale, kv_len = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)  # a statistic of the forward, for the backward; no gradient
    ctx.save_for_backward(q, k, v, kv_len, out, lse)
    ctx.scale = scale
    # The backward uses the forward's backend, even if it runs outside the forward's use_backend.
    ctx.backend = _backend.select(OP_NAME, q.device.type)


def _triton_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float | None,
    kv_len: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    from .triton_kernel import flash_attention_triton_backward

    with device_guard(q.device):
        return flash_attention_triton_backward(grad_out, q, k, v, out, lse, scale, kv_len)


# A custom op of its own, so the backward graph stays traceable (torch.compile, opcheck): Triton
# launches cannot run on the fake tensors AOTAutograd traces the backward formula with. (The CPU
# backward needs none: ATen's kernels trace as they are.)
_TRITON_GRAD = torch.library.custom_op(
    "segevol_fast::flash_attention_triton_grad",
    _triton_backward,
    mutates_args=(),
    schema="(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float? scale, "
    "Tensor? kv_len) -> (Tensor, Tensor, Tensor)",
)


@_TRITON_GRAD.register_fake
def _triton_grad_fake(grad_out, q, k, v, out, lse, scale, kv_len):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _reference_backward(grad_out, q, k, v, scale, kv_len, needs):
    """Gradients of the ref backend: autograd through the reference's own math (the readable
    spec of the gradients too, so it is re-run here rather than given a hand-written backward)."""
    leaves = [t.detach().requires_grad_(n) for t, n in zip((q, k, v), needs)]
    with torch.enable_grad():
        out = flash_attention_reference(*leaves, scale, kv_len)
    wanted = [t for t in leaves if t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, grad_out.to(out.dtype)))
    return [next(grads) if t.requires_grad else None for t in leaves]


def _backward(ctx, grad_out, grad_lse):
    del grad_lse  # lse is marked non-differentiable: its gradient is always zero
    q, k, v, kv_len, out, lse = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    if not any(needs):
        return None, None, None, None, None
    device = q.device
    with torch.autocast(device_type=device.type, enabled=False), device_guard(device):
        if ctx.backend == "ref":
            grads = _reference_backward(grad_out, q, k, v, ctx.scale, kv_len, needs)
        else:
            # Both fused backwards compute dq, dk and dv in one pass from the saved out and lse.
            if ctx.backend == "triton":
                grads = _TRITON_GRAD(grad_out, q, k, v, out, lse, ctx.scale, kv_len)
            else:
                grads = flash_attention_cpu_backward(grad_out, q, k, v, out, lse, ctx.scale, kv_len)
            grads = [g if n else None for g, n in zip(grads, needs)]
    return (*grads, None, None)


# ---------------------------------------------------------------------------- registration
# the registered op (backends, torch custom op, autograd); spec.py hands it to the contract tests
OP = define_op(
    OP_NAME,
    SCHEMA,
    ref=_layout(flash_attention_reference_with_lse),
    native_cpu=_layout(flash_attention_cpu),
    triton=_triton_impl,
    fake=_fake,
    setup_context=_setup_context,
    backward=_backward,
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
        (B, H, Sq, D) in q's dtype, stored as (B, Sq, H, D) (so `out.transpose(1, 2)` merges the
        heads without a copy); kernels accumulate in float32 (float64 for float64).

    Differentiable with respect to q, k and v; traceable by torch.compile
    (`torch.ops.segevol_fast.flash_attention`, which returns (out, lse)).
    """
    return flash_attention_with_lse(q, k, v, scale, kv_len)[0]


def flash_attention_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None = None,
    kv_len: None | int | Tensor = None,
) -> tuple[Tensor, Tensor]:
    """`flash_attention`'s (out, lse): lse[b, h, i] is the log-sum-exp of row i's scaled scores over
    its valid keys, (B, H, Sq), natural log, float32 (float64 for float64 inputs), -inf for a row
    with no valid key. out is differentiable, lse is not."""
    check_attention_args(q, k, v, kv_len)
    if isinstance(kv_len, int):
        kv_len = torch.full((q.shape[0],), kv_len, dtype=torch.int64, device=q.device)
    return OP(q, k, v, None if scale is None else float(scale), kv_len)
