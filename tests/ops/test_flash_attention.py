"""flash_attention as an op: what the contract test (test_op_contract.py) does not cover.

Gradients of every backend against float64 reference gradients (the contract gradchecks ref and
native only), the softmax statistics (lse) every backend returns and the backward reusing them
instead of re-running the forward, kv_len forms and errors, backend choice per device, the backward
keeping the forward's backend, and the model's attention staying bit-identical to the SDPA call it
replaced.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from segevol_fast import ops
from segevol_fast.errors import ArgumentTypeError, ShapeError
from segevol_fast.model.attention import attention
from segevol_fast.ops import _backend, _op
from segevol_fast.ops.flash_attention.reference import flash_attention_reference_with_lse
from tests.numerics import assert_matches_reference

pytestmark = pytest.mark.usefixtures("one_thread")
fa_module = importlib.import_module("segevol_fast.ops.flash_attention.op")


def _qkv(B, H, Sq, Sk, D, dtype=torch.float64):
    return [torch.randn(B, H, S, D, dtype=dtype) for S in (Sq, Sk, Sk)]


def _strided(t):
    """Same values, non-contiguous: (B, S, H, D) memory read as (B, H, S, D), as after a qkv split."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _grads(fn, inputs, grad_out, layout=lambda t: t):
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*[layout(t) for t in leaves])
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize(
    "backend,dtype",
    [
        ("native", torch.float32),
        ("native", torch.float16),
        ("native", torch.bfloat16),
        ("triton", torch.float32),
        ("triton", torch.float16),
    ],
    ids=str,
)
def test_gradients_of_each_backend_match_float64_reference(backend, dtype):
    reason = _backend._REGISTRY["flash_attention"][backend].why_not("cpu")
    if reason is not None:
        pytest.skip(reason)
    kv_len = torch.tensor([0, 13, 40])  # a row that sees nothing, one shorter than a block, one clamped
    exact = _qkv(3, 2, 21, 35, 24)
    cast = [t.to(dtype) for t in exact]
    g = torch.randn(3, 2, 21, 24, dtype=torch.float64)
    with ops.use_backend(backend):
        out, grads = _grads(lambda q, k, v: ops.flash_attention(q, k, v, 0.2, kv_len), cast, g, _strided)

    def ref(q, k, v):
        return ops.flash_attention_ref(q, k, v, 0.2, kv_len)

    same, same_grads = _grads(ref, cast, g)
    want, want_grads = _grads(ref, exact, g)
    assert_matches_reference(out, same, want, f"{backend} {dtype} out")
    for name, a, b, c in zip("qkv", grads, same_grads, want_grads):
        assert_matches_reference(a, b, c, f"{backend} {dtype} d{name}")
    assert not grads[0][0].any(), "a batch row with kv_len 0 must get zero gradients"


def _available(backend):
    reason = _backend._REGISTRY["flash_attention"][backend].why_not("cpu")
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize(
    "backend,dtype",
    [
        ("ref", torch.float32),
        ("native", torch.float64),
        ("native", torch.float32),
        ("native", torch.float16),
        ("native", torch.bfloat16),
        ("triton", torch.float32),
        ("triton", torch.float16),
    ],
    ids=str,
)
def test_lse_of_each_backend_matches_float64_reference(backend, dtype):
    _available(backend)
    kv_len = torch.tensor([0, 13, 40])  # a row that sees nothing, one shorter than a block, one clamped
    exact = _qkv(3, 2, 21, 35, 24)
    cast = [t.to(dtype) for t in exact]
    with ops.use_backend(backend):
        out, lse = fa_module.flash_attention_with_lse(*[_strided(t) for t in cast], 0.2, kv_len)
        assert torch.equal(out, ops.flash_attention(*[_strided(t) for t in cast], 0.2, kv_len))
    _, same = flash_attention_reference_with_lse(*cast, 0.2, kv_len)
    _, want = flash_attention_reference_with_lse(*exact, 0.2, kv_len)
    assert lse.shape == (3, 2, 21) and lse.is_contiguous() and not lse.requires_grad
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # kv_len 0: the log of an empty sum; the other rows within the usual bound
    assert torch.isneginf(lse[0]).all() and torch.isneginf(want[0]).all()
    assert_matches_reference(lse[1:], same[1:], want[1:], f"{backend} {dtype} lse")


def test_reference_lse_is_the_natural_log_of_the_softmax_denominator():
    q, k, v = _qkv(2, 2, 5, 9, 8)
    _, lse = flash_attention_reference_with_lse(q, k, v, 0.7, torch.tensor([9, 4]))
    scores = (q @ k.transpose(-2, -1) * 0.7).exp()
    torch.testing.assert_close(lse[0], scores[0].sum(-1).log())
    torch.testing.assert_close(lse[1], scores[1, :, :, :4].sum(-1).log())


def test_the_op_returns_out_and_a_non_differentiable_lse():
    q, k, v = (t.float().requires_grad_() for t in _qkv(2, 2, 6, 7, 8))
    out, lse = torch.ops.segevol_fast.flash_attention(q, k, v, None, None)
    assert out.requires_grad and not lse.requires_grad
    assert torch.equal(out, ops.flash_attention(q, k, v))
    out, lse = fa_module.flash_attention_with_lse(q, k, v, kv_len=3)  # public form: int kv_len
    (out.sum() + lse.sum()).backward()  # lse adds nothing to the gradients
    want = _grads(lambda q, k, v: ops.flash_attention_ref(q, k, v, None, 3), (q, k, v), torch.ones(2, 2, 6, 8))[1]
    for got, ref in zip((q.grad, k.grad, v.grad), want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def _aten_calls(fn):
    """How often fn ran ATen's CPU flash-attention forward and backward kernels."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events()]
    return (
        names.count("aten::_scaled_dot_product_flash_attention_for_cpu"),
        names.count("aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
    )


@pytest.mark.parametrize("kv_len", [None, torch.tensor([0, 9]), torch.tensor([5, 9])], ids=["none", "row0", "sliced"])
def test_cpu_backward_reuses_the_forward_statistics(kv_len):
    # One fused forward, one fused backward from the saved out and lse: the forward is not re-run.
    q, k, v = (t.float().requires_grad_() for t in _qkv(2, 3, 8, 11, 16))
    g = torch.randn(2, 3, 8, 16)

    def fwd_bwd():
        with ops.use_backend("native"):
            out = ops.flash_attention(q, k, v, None, kv_len)
        out.backward(g)

    assert _aten_calls(fwd_bwd) == (1, 1)
    want = _grads(lambda q, k, v: ops.flash_attention_ref(q, k, v, None, kv_len), (q, k, v), g)[1]
    for got, ref in zip((q.grad, k.grad, v.grad), want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_triton_backward_reuses_the_forward_statistics(monkeypatch):
    _available("triton")
    kernels = importlib.import_module("segevol_fast.ops.flash_attention.triton_kernel")
    q, k, v = (t.float().requires_grad_() for t in _qkv(1, 2, 9, 17, 16))
    with ops.use_backend("triton"):
        out = ops.flash_attention(q, k, v, None, torch.tensor([12]))
    monkeypatch.setattr(kernels, "flash_attention_triton", lambda *a, **kw: pytest.fail("forward re-run"))
    out.sum().backward()
    assert q.grad is not None and k.grad[:, :, 12:].abs().max() == 0


@pytest.mark.parametrize("shape", [(2, 2, 0, 5, 8), (2, 2, 4, 0, 8), (0, 2, 4, 5, 8)], ids=str)
def test_cpu_backend_takes_empty_sequences(shape):
    # ATen's kernels would crash on these: the backend answers them itself, with the reference's
    # semantics (an empty set of keys: out 0, lse -inf; empty sums: zero gradients)
    B, H, Sq, Sk, D = shape
    q, k, v = (t.float().requires_grad_() for t in _qkv(B, H, Sq, Sk, D))
    with ops.use_backend("native"):
        out, lse = fa_module.flash_attention_with_lse(q, k, v)
    assert out.shape == q.shape and lse.shape == (B, H, Sq)
    assert not out.any() and torch.isneginf(lse).all()
    out.sum().backward()
    assert not q.grad.any() and not k.grad.any() and not v.grad.any()


def test_backward_keeps_the_forward_backend(monkeypatch):
    q, k, v = (t.float().requires_grad_() for t in _qkv(1, 2, 9, 11, 8))
    with ops.use_backend("ref"):
        out = ops.flash_attention(q, k, v)
    seen = []
    real = fa_module.flash_attention_reference
    monkeypatch.setattr(fa_module, "flash_attention_reference", lambda *a: seen.append(1) or real(*a))
    out.sum().backward()  # outside use_backend: auto would pick native (SDPA) on CPU
    assert seen and q.grad is not None


def test_kv_len_int_tensor_and_none_agree():
    q, k, v = (t.float() for t in _qkv(2, 2, 7, 19, 16))
    full = ops.flash_attention(q, k, v)
    assert torch.equal(ops.flash_attention(q, k, v, kv_len=19), full)
    assert torch.equal(ops.flash_attention(q, k, v, kv_len=torch.tensor([99, 19], dtype=torch.int32)), full)
    short = ops.flash_attention(q, k, v, kv_len=5)
    torch.testing.assert_close(short, ops.flash_attention(q, k[:, :, :5], v[:, :, :5]))
    assert not ops.flash_attention(q, k, v, kv_len=0).any()


def test_scale_default_is_head_dim_rsqrt():
    q, k, v = (t.float() for t in _qkv(1, 3, 6, 9, 16))
    torch.testing.assert_close(ops.flash_attention(q, k, v), ops.flash_attention(q, k, v, scale=0.25))
    assert not torch.allclose(ops.flash_attention(q, k, v), ops.flash_attention(q, k, v, scale=1.0))


@pytest.mark.parametrize(
    "bad,error",
    [
        (lambda q, k, v: (q[0], k, v, None), ShapeError),  # 3-D q
        (lambda q, k, v: (q, k[:, :, :, :4], v, None), ShapeError),  # head dims differ
        (lambda q, k, v: (q, k.half(), v, None), ShapeError),  # dtypes differ
        (lambda q, k, v: (q, k, v, torch.tensor([3.0, 4.0])), ShapeError),  # float kv_len
        (lambda q, k, v: (q, k, v, torch.tensor([3])), ShapeError),  # kv_len not (B,)
        (lambda q, k, v: (q, k, v, [3, 4]), ArgumentTypeError),  # list kv_len
    ],
)
def test_bad_arguments_raise_typed_errors(bad, error):
    q, k, v = (t.float() for t in _qkv(2, 1, 3, 5, 8))
    with pytest.raises(error):
        ops.flash_attention(*bad(q, k, v)[:3], kv_len=bad(q, k, v)[3])


def test_backend_choice_per_device():
    impls = _backend._REGISTRY["flash_attention"]
    assert impls["native"].fn.__wrapped__ is fa_module.flash_attention_cpu
    assert impls["native"].why_not("cpu") is None
    assert "triton" in impls["native"].why_not("cuda")  # CUDA tensors: Triton, else ref
    with _backend.use_backend(None):
        assert _backend.select("flash_attention", "cpu") == "native"
        if _backend.triton_import_error() is None:
            assert _backend.select("flash_attention", "cuda") == "triton"


def test_define_op_rejects_native_and_native_cpu_together():
    with pytest.raises(ValueError, match="native_cpu"):
        _op.define_op(
            "never_registered",
            "(Tensor x) -> Tensor",
            ref=torch.neg,
            fake=torch.empty_like,
            native=torch.neg,
            native_cpu=torch.neg,
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_model_attention_is_bit_identical_to_the_sdpa_call_it_replaced(dtype):
    # Exact mode promises the official re-run's bits; on CPU the op's backend is that same SDPA call.
    qkv = torch.randn(2, 37, 3, 4, 16).to(dtype).permute(2, 0, 3, 1, 4)  # a qkv split: non-contiguous
    q, k, v = qkv.unbind(0)
    with torch.no_grad():
        assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(
                attention(q.float(), k.float(), v), F.scaled_dot_product_attention(q.float(), k.float(), v)
            )
    mask = torch.randn(2, 1, 37, 37, dtype=dtype)
    assert torch.equal(attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


@pytest.mark.parametrize("backend", ["ref", "native", "triton"])
@pytest.mark.parametrize("kv_len", [None, torch.tensor([0, 7])], ids=["none", "masked"])
def test_every_backend_returns_heads_interleaved(backend, kv_len):
    """out is stored (B, Sq, H, D) whatever the backend or q's strides, as the fake kernel says:
    torch.compile asserts the real strides equal the fake's, and the caller's head merge is free."""
    if backend == "triton":
        pytest.importorskip("triton")
    qkv = torch.randn(2, 9, 3, 2, 16)  # (B, S, qkv, H, D) as a fused projection lays it out
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    with ops.use_backend(backend):
        out = ops.flash_attention(q, k, v, kv_len=kv_len)
    fake = torch.empty((2, 9, 2, 16)).transpose(1, 2)
    assert out.stride() == fake.stride()
    assert out.transpose(1, 2).is_contiguous()


def test_compiled_attention_block_matches_eager():
    """The model's pattern (fused qkv permuted into heads, attention, heads merged) under
    torch.compile on the CPU backend: fake and real strides agree, results equal eager."""

    def block(x, w):
        B, S, C = x.shape
        q, k, v = (x @ w).view(B, S, 3, 2, C // 2).permute(2, 0, 3, 1, 4)
        return ops.flash_attention(q, k, v).transpose(1, 2).reshape(B, S, C)

    x, w = torch.randn(2, 33, 32), torch.randn(32, 96) / 32**0.5
    compiled = torch.compile(block, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(x, w), block(x, w), rtol=1e-5, atol=1e-5)
