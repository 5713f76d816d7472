"""lora_linear beyond the shared contract (tests/ops/test_op_contract.py): peft's formula,
output slices (q and v of a fused qkv), ranks 1 and 16, scale 0, the frozen-W rule, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segevol_fast import ops
from segevol_fast.errors import InvalidArgumentError, ShapeError
from segevol_fast.ops import _backend
from tests.numerics import assert_matches_reference

F64 = torch.float64


def _backends():
    return [b for b in ("native", "triton") if _backend._REGISTRY["lora_linear"][b].why_not("cpu") is None]


def _peft(x, W, b, pieces, scale):
    """peft's lora.Linear forward written out (dropout = identity), one term per output slice:
    result = base_layer(x); result[..., s:e] += lora_B(lora_A(x)) * scaling."""
    out = x @ W.t() + b
    for A, B, (s, e) in pieces:
        out[..., s:e] += (x @ A.t()) @ B.t() * scale
    return out


def _layer(M, K, N, r, n=None, dtype=F64):
    x = torch.randn(M, K, dtype=dtype)
    W = torch.randn(N, K, dtype=dtype) / K**0.5
    A = torch.randn(r, K, dtype=dtype) / K**0.5
    B = torch.randn(n or N, r, dtype=dtype) / r**0.5
    return x, W, torch.randn(N, dtype=dtype), A, B


@pytest.mark.parametrize("backend", ["ref", "native"])
@pytest.mark.parametrize("r", [1, 16])
def test_equals_peft_formula_in_float64(backend, r):
    x, W, b, A, B = _layer(23, 37, 41, r)
    with ops.use_backend(backend):
        got = ops.lora_linear(x, W, b, A, B, 1.7)
    torch.testing.assert_close(got, _peft(x, W, b, [(A, B, (0, 41))], 1.7), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", _backends())
def test_q_and_v_slices_of_a_fused_qkv_in_one_call(backend):
    # C = 13: q is columns 0..13, k 13..26 (no LoRA), v 26..39; ranks differ per piece
    C, K = 13, 21
    x, W, b, Aq, Bq = _layer(19, K, 3 * C, 3, n=C)
    Av, Bv = torch.randn(5, K, dtype=F64), torch.randn(C, 5, dtype=F64)
    pieces = [(Aq, Bq, (0, C)), (Av, Bv, (2 * C, 3 * C))]
    A, B, sl = ops.stack_lora_slices(pieces)
    assert tuple(A.shape) == (8, K) and tuple(B.shape) == (3 * C, 8) and sl == [0, 3 * C]
    exact = _peft(x, W, b, pieces, 0.5)
    cast = [t.float() for t in (x, W, b, A, B)]
    with ops.use_backend(backend):
        got = ops.lora_linear(*cast, 0.5, out_slice=sl)
    same = _peft(*cast[:3], [(Aq.float(), Bq.float(), (0, C)), (Av.float(), Bv.float(), (2 * C, 3 * C))], 0.5)
    assert_matches_reference(got, same, exact, f"lora_linear q+v {backend}")
    # the k third got no LoRA term: it is the base layer there
    torch.testing.assert_close(got[:, C : 2 * C], (cast[0] @ cast[1].t() + cast[2])[:, C : 2 * C])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("r,out_slice", [(1, (5, 12)), (16, None)])
def test_rank_one_and_sixteen_with_and_without_slice(backend, r, out_slice):
    N = 29
    n = N if out_slice is None else out_slice[1] - out_slice[0]
    x, W, b, A, B = _layer(17, 33, N, r, n=n)
    x = x.reshape(1, 17, 33)  # a leading batch dim
    exact = ops.lora_linear_ref(x, W, b, A, B, 2.0, out_slice)
    cast = [t.float() for t in (x, W, b, A, B)]
    with ops.use_backend(backend):
        got = ops.lora_linear(*cast, 2.0, out_slice=out_slice)
    assert got.shape == (1, 17, N)
    assert_matches_reference(got, ops.lora_linear_ref(*cast, 2.0, out_slice), exact, f"r={r} {backend}")


def test_scale_zero_is_exactly_the_base_layer():
    x, W, b, A, B = _layer(31, 19, 22, 4, dtype=torch.float32)
    for backend in ("ref", "native"):
        with ops.use_backend(backend):
            assert torch.equal(ops.lora_linear(x, W, b, A, B, 0.0), F.linear(x, W, b)), backend


@pytest.mark.parametrize("backend", ["native", "ref"])
def test_no_bias_and_gradients_through_a_slice_match_autograd_of_the_formula(backend):
    x, W, _, A, B = _layer(9, 11, 15, 3, n=6)
    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    with ops.use_backend(backend):
        out = ops.lora_linear(leaves[0], W, None, leaves[1], leaves[2], 0.8, out_slice=(4, 10))
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g)
    ref_leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    want = _peft(ref_leaves[0], W, torch.zeros(15, dtype=F64), [(ref_leaves[1], ref_leaves[2], (4, 10))], 0.8)
    torch.testing.assert_close(out, want.detach())
    for got, exp in zip(grads, torch.autograd.grad(want, ref_leaves, g)):
        torch.testing.assert_close(got, exp)


def test_a_trainable_base_weight_is_refused_while_grad_mode_is_on():
    x, W, b, A, B = _layer(4, 6, 5, 2)
    W.requires_grad_()
    with pytest.raises(InvalidArgumentError, match="frozen"):
        ops.lora_linear(x, W, b, A, B, 1.0)
    with torch.no_grad():  # inference with an unfrozen module is fine
        ops.lora_linear(x, W, b, A, B, 1.0)
    ops.lora_linear(x, W.detach(), b, A, B, 1.0)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(B=torch.zeros(5, 3)), "lora_b must be"),
        (dict(A=torch.zeros(2, 7)), "lora_a must be"),
        (dict(A=torch.zeros(0, 6)), "r >= 1"),
        (dict(W=torch.zeros(5, 7)), "weight must be"),
        (dict(b=torch.zeros(4)), "bias must be"),
        (dict(out_slice=(3, 9)), "out_slice"),
        (dict(out_slice=(3, 3)), "out_slice"),
        (dict(b=torch.zeros(5, dtype=F64)), "dtype"),
    ],
)
def test_bad_arguments_raise_shape_errors(change, match):
    args = dict(
        x=torch.zeros(4, 6),
        W=torch.zeros(5, 6),
        b=torch.zeros(5),
        A=torch.zeros(2, 6),
        B=torch.zeros(5, 2),
        out_slice=None,
    )
    args.update(change)
    with pytest.raises(ShapeError, match=match):
        ops.lora_linear(args["x"], args["W"], args["b"], args["A"], args["B"], 1.0, out_slice=args["out_slice"])


def test_stack_lora_slices_refuses_overlapping_slices():
    A, B = torch.randn(2, 6), torch.randn(4, 2)
    with pytest.raises(InvalidArgumentError, match="overlap"):
        ops.stack_lora_slices([(A, B, (0, 4)), (A, B, (2, 6))])
