"""routed_lora_linear beyond the shared contract (tests/ops/test_op_contract.py): base-only
segments are the base layer exactly, one adapter everywhere is lora_linear, one-hot gates are
hard routing, the gates' gradient, empty segments, the frozen-W rule and the typed errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segevol_fast import ops
from segevol_fast.errors import InvalidArgumentError, ShapeError
from segevol_fast.ops import _backend
from tests.numerics import assert_matches_reference

F64 = torch.float64
BACKENDS = ["ref", "native"]


def _fast_backends():
    return [b for b in ("native", "triton") if _backend._REGISTRY["routed_lora_linear"][b].why_not("cpu") is None]


def _layer(lengths, K=19, N=23, r=3, E=3, dtype=F64):
    M = sum(lengths)
    x = torch.randn(M, K, dtype=dtype)
    W = torch.randn(N, K, dtype=dtype) / K**0.5
    A = torch.randn(E, r, K, dtype=dtype) / K**0.5
    B = torch.randn(E, N, r, dtype=dtype) / r**0.5
    segments = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return x, W, torch.randn(N, dtype=dtype), A, B, segments


def _cast(ts, dtype):
    return [t.to(dtype) if t.is_floating_point() else t for t in ts]


@pytest.mark.parametrize("backend", BACKENDS)
def test_base_only_segments_equal_the_base_linear_exactly(backend):
    x, W, b, A, B, seg = _cast(_layer((6, 5, 8)), torch.float32)
    idx = torch.tensor([-1, 1, -1])
    with ops.use_backend(backend):
        out = ops.routed_lora_linear(x, W, b, A, B, seg, adapter_idx=idx, scale=0.9)
    base = F.linear(x, W, b)
    assert torch.equal(out[:6], base[:6]) and torch.equal(out[11:], base[11:])
    assert not torch.allclose(out[6:11], base[6:11])  # the routed segment does get its adapter


@pytest.mark.parametrize("backend", ["ref", *_fast_backends()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_adapter_for_all_rows_equals_lora_linear(backend, dtype):
    exact = _layer((4, 0, 9, 3))
    x, W, b, A, B, seg = _cast(exact, dtype)
    idx = torch.tensor([2, 2, 2, 2])
    with ops.use_backend(backend):
        out = ops.routed_lora_linear(x, W, b, A, B, seg, adapter_idx=idx, scale=0.6)
    want = ops.lora_linear_ref(x, W, b, A[2], B[2], 0.6)
    want64 = ops.lora_linear_ref(exact[0], exact[1], exact[2], exact[3][2], exact[4][2], 0.6)
    assert_matches_reference(out, want, want64, f"routed {backend} {dtype} vs lora_linear")


@pytest.mark.parametrize("backend", ["ref", *_fast_backends()])
def test_one_hot_gates_equal_hard_routing(backend):
    x, W, b, A, B, seg = _cast(_layer((5, 0, 7, 2)), torch.float32)
    idx = torch.tensor([1, 0, -1, 2])
    gates = (idx[:, None] == torch.arange(3)).float()
    with ops.use_backend(backend):
        hard = ops.routed_lora_linear(x, W, b, A, B, seg, adapter_idx=idx, scale=1.3)
        soft = ops.routed_lora_linear(x, W, b, A, B, seg, gates=gates, scale=1.3)
    torch.testing.assert_close(soft, hard, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_float64_autograd_of_the_reference(backend):
    # the op's own backward (fp32) against autograd through the readable per-segment loop (fp64)
    exact = _layer((4, 0, 7, 5), K=13, N=17, r=2, E=3)
    gates64 = torch.softmax(torch.randn(4, 3, dtype=F64), -1)
    g64 = torch.randn(16, 17, dtype=F64)

    def grads(dtype, fn):
        x, W, b, A, B, seg = _cast(exact, dtype)
        leaves = [t.detach().requires_grad_() for t in (x, b, A, B, gates64.to(dtype))]
        x, b, A, B, gates = leaves
        out = fn(x, W, b, A, B, seg, None, gates, 0.8)
        return torch.autograd.grad(out, leaves, g64.to(dtype))

    with ops.use_backend(backend):
        got = grads(torch.float32, ops.routed_lora_linear)
    same = grads(torch.float32, ops.routed_lora_linear_ref)
    want = grads(F64, ops.routed_lora_linear_ref)
    for name, a, s, w in zip(("x", "bias", "A", "B", "gates"), got, same, want):
        assert_matches_reference(a, s, w, f"grad {name} {backend}")


def test_hard_routing_gives_no_gates_and_unused_adapters_zero_gradient():
    x, W, b, A, B, seg = _layer((3, 4))
    A.requires_grad_()
    out = ops.routed_lora_linear(x, W, b, A, B, seg, adapter_idx=torch.tensor([0, -1]))
    (gA,) = torch.autograd.grad(out.sum(), [A])
    assert gA[0].abs().sum() > 0 and torch.equal(gA[1:], torch.zeros_like(gA[1:]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_sizes_and_non_contiguous_inputs(backend):
    exact = _layer((1, 0, 0, 13, 2), K=31, N=29, r=5, E=2)
    x, W, b, A, B, seg = _cast(exact, torch.float32)
    gates = torch.rand(5, 2, dtype=F64)
    xt = x.t().contiguous().t()  # column-major rows
    Bt = B.transpose(1, 2).contiguous().transpose(1, 2)
    with ops.use_backend(backend):
        out = ops.routed_lora_linear(xt, W, b, A, Bt, seg, gates=gates.float(), scale=0.5)
    same = ops.routed_lora_linear_ref(x, W, b, A, B, seg, gates=gates.float(), scale=0.5)
    want = ops.routed_lora_linear_ref(*exact, gates=gates, scale=0.5)
    assert_matches_reference(out, same, want, f"odd sizes {backend}")


def test_frozen_weight_is_enforced():
    x, W, b, A, B, seg = _layer((3,))
    with pytest.raises(InvalidArgumentError, match="frozen"):
        ops.routed_lora_linear(x, W.requires_grad_(), b, A, B, seg, adapter_idx=torch.tensor([0]))


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(adapter_idx=None), InvalidArgumentError, "exactly one"),
        (dict(gates=torch.ones(2, 3, dtype=F64)), InvalidArgumentError, "exactly one"),
        (dict(adapter_idx=torch.tensor([0, 3])), InvalidArgumentError, r"\[-1, E\)"),
        (dict(adapter_idx=torch.tensor([0, -2])), InvalidArgumentError, r"\[-1, E\)"),
        (dict(adapter_idx=torch.tensor([0])), ShapeError, "adapter_idx"),
        (dict(segments=torch.tensor([0, 5, 6])), InvalidArgumentError, "offsets from 0"),
        (
            dict(segments=torch.tensor([0, 6, 4, 7]), adapter_idx=torch.tensor([0, -1, 0])),
            InvalidArgumentError,
            "non-decreasing",
        ),
        (dict(segments=torch.tensor([0.0, 7.0])), ShapeError, "integer"),
        (dict(A=torch.zeros(3, 2, 5, dtype=F64)), ShapeError, "lora_a"),
        (dict(B=torch.zeros(2, 23, 3, dtype=F64)), ShapeError, "lora_b"),
        (dict(b=torch.zeros(4, dtype=F64)), ShapeError, "bias"),
        (dict(x=torch.zeros(7, 19)), ShapeError, "dtype"),
    ],
)
def test_inconsistent_arguments_raise_typed_errors(change, error, match):
    x, W, b, A, B, seg = _layer((3, 4))
    args = dict(x=x, W=W, b=b, A=A, B=B, segments=seg, adapter_idx=torch.tensor([0, -1]), gates=None)
    args.update(change)
    with pytest.raises(error, match=match):
        ops.routed_lora_linear(
            args["x"],
            args["W"],
            args["b"],
            args["A"],
            args["B"],
            args["segments"],
            adapter_idx=args["adapter_idx"],
            gates=args["gates"],
        )
