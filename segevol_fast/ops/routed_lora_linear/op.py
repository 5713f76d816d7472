"""routed_lora_linear: one Linear layer with E LoRA adapters, each row segment routed to its own.

Rows of x (M, K) come in contiguous segments (one window, one volume). `segments` is the (S+1,)
int tensor of offsets: segment s is rows segments[s]:segments[s+1], segments[0] = 0 and
segments[S] = M (empty segments are allowed). Each segment either

  * hard routing, `adapter_idx` (S,) int in [-1, E): uses adapter adapter_idx[s]; -1 = base only;
  * soft routing, `gates` (S, E) float: a gate-weighted mix of all E adapters (the mixture's
    router learns through `gates`, which get a gradient);

exactly one of the two is given. With w_s the segment's adapter weights (one-hot, zero, or its
gates), row m in segment s gets

    y_m = x_m W.T + b + scale * sum_e w_se * (x_m A_e.T) B_e.T

A_stack (E, r, K) are the adapters' "down" (shrink) and B_stack (E, N, r) their "up" (expand)
matrices, as in `lora_linear` (which this equals when every segment uses one adapter).

Implementations (semantics: `routed_lora_linear_ref`):
  * ref: a readable per-segment loop over `lora_linear`'s reference formula.
  * native (CPU): no loop over segments or adapters, three GEMMs whatever the routing: the
    shrink with all E adapters at once t = x @ A_stack.reshape(E*r, K).T (M, E*r), each row's
    E rank-r blocks weighted by its segment's w, the expand as one GEMM over E*r accumulated
    onto the base GEMM. Hard routing uses the same path with one-hot weights, so it pays the
    shrink for all E adapters (E*r extra columns next to N; small for the few adapters of a
    SegVol model) but never gathers or sorts rows; a -1 row adds exact zeros, so it equals
    the base layer bit for bit.
  * triton (CUDA, or the interpreter): lora_linear's kernel with the same rank-E*r view, the
    row weights applied to the shrink in registers: one GEMM launch for any mix of segments. Like
    the native path it computes every adapter's shrink (no per-block adapter grouping yet).

Autograd: gradients for x, bias, A_stack, B_stack and gates. W is frozen, as in `lora_linear`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import InvalidArgumentError, ShapeError
from .._op import define_op
from ..lora_linear.op import lora_linear_ref

OP_NAME = "routed_lora_linear"


# ---------------------------------------------------------------------------- reference
def routed_lora_linear_ref(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    segments: Tensor,
    adapter_idx: Optional[Tensor] = None,
    gates: Optional[Tensor] = None,
    scale: float = 1.0,
) -> Tensor:
    """Plain-PyTorch definition of `routed_lora_linear`: a loop over segments (and adapters)."""
    # The base layer runs once over all rows (not per segment), so base-only rows are exactly
    # F.linear(x, W, b): GEMM blocking may differ between a row subset and the whole matrix.
    base = F.linear(x, weight, bias)
    bounds = [int(v) for v in segments.tolist()]
    deltas = []
    for s, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        xs = x[lo:hi]
        delta = base.new_zeros((hi - lo, base.shape[1]))
        for e in range(lora_a.shape[0]):
            w = _segment_weight(s, e, adapter_idx, gates)
            if w is not None:
                # lora_linear_ref with W = 0 and no bias is its LoRA term alone
                term = lora_linear_ref(xs, weight.new_zeros(weight.shape), None, lora_a[e], lora_b[e], scale)
                delta = delta + w * term
        deltas.append(delta)
    return base + torch.cat(deltas, 0)


def _segment_weight(s: int, e: int, adapter_idx: Optional[Tensor], gates: Optional[Tensor]):
    """Weight of adapter e in segment s: 1 / None (unused) for hard routing, gates[s, e] for soft."""
    if gates is not None:
        return gates[s, e]
    return 1.0 if int(adapter_idx[s]) == e else None


# ---------------------------------------------------------------------------- checks
def _check(x, weight, bias, lora_a, lora_b, segments, adapter_idx, gates) -> None:
    if x.dim() != 2 or not x.is_floating_point():
        raise ShapeError(f"x must be a floating-point (M, K) tensor, got {x.dtype} of shape {tuple(x.shape)}")
    M, K = x.shape
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ShapeError(f"weight must be (N, K) = (N, {K}), got {tuple(weight.shape)}")
    N = weight.shape[0]
    if lora_a.dim() != 3 or lora_a.shape[2] != K or min(lora_a.shape[:2]) < 1:
        raise ShapeError(f"lora_a must be (E, r, K) = (E, r, {K}) with E, r >= 1, got {tuple(lora_a.shape)}")
    E, r = lora_a.shape[:2]
    if tuple(lora_b.shape) != (E, N, r):
        raise ShapeError(f"lora_b must be (E, N, r) = ({E}, {N}, {r}), got {tuple(lora_b.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ShapeError(f"bias must be ({N},), got {tuple(bias.shape)}")
    if segments.dim() != 1 or segments.shape[0] < 2 or segments.is_floating_point() or segments.is_complex():
        raise ShapeError(
            f"segments must be (S+1,) integer offsets with S >= 1, got {segments.dtype} {tuple(segments.shape)}"
        )
    S = segments.shape[0] - 1
    if (adapter_idx is None) == (gates is None):
        raise InvalidArgumentError("give exactly one of adapter_idx (hard routing) and gates (soft routing)")
    if adapter_idx is not None and (tuple(adapter_idx.shape) != (S,) or adapter_idx.is_floating_point()):
        raise ShapeError(
            f"adapter_idx must be ({S},) integer (one per segment), got {adapter_idx.dtype} {tuple(adapter_idx.shape)}"
        )
    if gates is not None and tuple(gates.shape) != (S, E):
        raise ShapeError(f"gates must be (S, E) = ({S}, {E}), got {tuple(gates.shape)}")
    floats = {"weight": weight, "lora_a": lora_a, "lora_b": lora_b, "bias": bias, "gates": gates}
    for name, t in floats.items():
        if t is not None and t.dtype != x.dtype:
            raise ShapeError(f"{name} dtype {t.dtype} differs from x dtype {x.dtype}; cast one of them")
    for name, t in {**floats, "segments": segments, "adapter_idx": adapter_idx}.items():
        if t is not None and t.device != x.device:
            raise ShapeError(f"{name} is on {t.device} but x is on {x.device}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise InvalidArgumentError(
            "routed_lora_linear keeps the base weight frozen and computes no gradient for it; "
            "call weight.requires_grad_(False) (or pass weight.detach())"
        )
    if not torch.compiler.is_compiling():  # value checks read data: eager only (no graph break)
        _check_values(M, E, segments, adapter_idx)


def _check_values(M: int, E: int, segments: Tensor, adapter_idx: Optional[Tensor]) -> None:
    bounds = segments.tolist()
    if bounds[0] != 0 or bounds[-1] != M or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise InvalidArgumentError(f"segments must be non-decreasing offsets from 0 to M = {M}, got {bounds}")
    if adapter_idx is not None and adapter_idx.numel():
        lo, hi = int(adapter_idx.min()), int(adapter_idx.max())
        if lo < -1 or hi >= E:
            raise InvalidArgumentError(f"adapter_idx must lie in [-1, E) = [-1, {E}), got values in [{lo}, {hi}]")


# ---------------------------------------------------------------------------- the grouped formulation
def _row_weights(x: Tensor, E: int, segments: Tensor, adapter_idx, gates) -> tuple[Tensor, Tensor]:
    """(segment id per row (M,), adapter weights per row (M, E)). Static shapes (no data-dependent
    sizes), so the backward traces under torch.compile too."""
    rows = torch.arange(x.shape[0], device=x.device, dtype=segments.dtype)
    # row m is in segment s when segments[s] <= m < segments[s+1]: count the ends <= m
    seg = torch.searchsorted(segments[1:].contiguous(), rows, right=True)
    if gates is not None:
        return seg, gates[seg]
    ids = adapter_idx[seg]
    return seg, (ids[:, None] == torch.arange(E, device=x.device)).to(x.dtype)  # -1 -> all zeros


def _flat(lora_a: Tensor, lora_b: Tensor) -> tuple[Tensor, Tensor]:
    """A_stack -> (E*r, K) and B_stack -> (E*r, N): all adapters as one rank-E*r LoRA."""
    E, r, K = lora_a.shape
    return lora_a.reshape(E * r, K), lora_b.permute(0, 2, 1).reshape(E * r, -1)


def _native_cpu(x, weight, bias, lora_a, lora_b, segments, adapter_idx, gates, scale):
    E, r, _ = lora_a.shape
    _, w = _row_weights(x, E, segments, adapter_idx, gates)
    a_flat, b_flat = _flat(lora_a, lora_b)
    t = torch.mm(x, a_flat.t())  # (M, E*r): the shrink of every adapter in one GEMM
    p = (t.view(-1, E, r) * w[:, :, None]).view(-1, E * r)
    out = F.linear(x, weight, bias)
    return out.addmm_(p, b_flat, alpha=scale)  # the expand: one GEMM over E*r, onto the base


def _triton_impl(x, weight, bias, lora_a, lora_b, segments, adapter_idx, gates, scale):
    from ..lora_linear.triton_kernel import lora_linear_triton

    _, w = _row_weights(x, lora_a.shape[0], segments, adapter_idx, gates)
    a_flat, b_flat = _flat(lora_a, lora_b)
    return lora_linear_triton(x, weight, bias, a_flat, b_flat.t(), scale, [0, weight.shape[0]], row_weights=w)


def _fake(x, weight, bias, lora_a, lora_b, segments, adapter_idx, gates, scale):
    return x.new_empty((x.shape[0], weight.shape[0]))


# ---------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, segments, adapter_idx, gates, scale = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, segments, adapter_idx, gates)
    ctx.scale, ctx.has_bias = scale, bias is not None


def _backward(ctx, grad_out):
    # With t = x A_flat.T (M, E, r), w the row weights, p = t * w, y = base + scale p B_flat:
    #   dp = scale g B_flat.T,  dt = dp * w,  dx = g W + dt A_flat,  dA_flat = dt.T x,
    #   dB_flat = scale p.T g,  dw = sum_r dp * t  (summed per segment into dgates),  db = sum g.
    x, weight, lora_a, lora_b, segments, adapter_idx, gates = ctx.saved_tensors
    needs = ctx.needs_input_grad
    E, r, K = lora_a.shape
    seg, w = _row_weights(x, E, segments, adapter_idx, gates)
    a_flat, b_flat = _flat(lora_a, lora_b)
    g = grad_out
    t = torch.mm(x, a_flat.t()).view(-1, E, r)
    dp = torch.mm(g, b_flat.t()).mul_(ctx.scale).view(-1, E, r)
    dt = (dp * w[:, :, None]).view(-1, E * r)
    grad_x = torch.addmm(torch.mm(g, weight), dt, a_flat) if needs[0] else None
    grad_b = g.sum(0) if ctx.has_bias and needs[2] else None
    grad_a = torch.mm(dt.t(), x).view(E, r, K) if needs[3] else None
    grad_lb = None
    if needs[4]:
        p = (t * w[:, :, None]).view(-1, E * r)
        grad_lb = torch.mm(p.t(), g).mul_(ctx.scale).view(E, r, -1).permute(0, 2, 1)
    grad_gates = None
    if gates is not None and needs[7]:
        dw = (dp * t).sum(-1)  # (M, E)
        grad_gates = gates.new_zeros(gates.shape).index_add_(0, seg, dw)
    return grad_x, None, grad_b, grad_a, grad_lb, None, None, grad_gates, None


# ---------------------------------------------------------------------------- registration
SCHEMA = (
    "(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor segments, "
    "Tensor? adapter_idx, Tensor? gates, float scale) -> Tensor"
)
# the registered op (backends, torch custom op, autograd); spec.py hands it to the contract tests
OP = define_op(
    OP_NAME,
    SCHEMA,
    # "native" on CPU is a composition of ATen GEMMs (no csrc/ op)
    ref=routed_lora_linear_ref,
    native_cpu=_native_cpu,
    triton=_triton_impl,
    fake=_fake,
    setup_context=_setup_context,
    backward=_backward,
)


# ---------------------------------------------------------------------------- public entry point
def routed_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    segments: Tensor,
    adapter_idx: Optional[Tensor] = None,
    gates: Optional[Tensor] = None,
    scale: float = 1.0,
) -> Tensor:
    """Linear + per-segment LoRA adapters (hard routing or a soft mixture), see the module doc.

    Args:
        x: (M, K) float rows, any strides.
        weight: (N, K) frozen base weight (must not require grad while grad mode is on).
        bias: (N,) or None.
        lora_a: (E, r, K) the adapters' A matrices (E >= 1, r >= 1).
        lora_b: (E, N, r) the adapters' B matrices.
        segments: (S+1,) integer offsets, 0 = segments[0] <= ... <= segments[S] = M.
        adapter_idx: (S,) integer in [-1, E): hard routing (-1 = base layer only), or None.
        gates: (S, E) float in x's dtype: soft routing, or None. Exactly one of the two.
        scale: peft's lora_alpha / r.

    Returns:
        (M, N) in x's dtype. Differentiable in x, bias, lora_a, lora_b and gates; traceable by
        torch.compile (`torch.ops.segevol_fast.routed_lora_linear`).
    """
    _check(x, weight, bias, lora_a, lora_b, segments, adapter_idx, gates)
    return OP(x, weight, bias, lora_a, lora_b, segments, adapter_idx, gates, float(scale))
