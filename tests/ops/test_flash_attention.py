"""flash_attention as an op: what the contract test (test_op_contract.py) does not cover.

Gradients of every backend against float64 reference gradients (the contract gradchecks ref and
native only), kv_len forms and errors, backend choice per device, the backward keeping the
forward's backend, and the model's attention staying bit-identical to the SDPA call it replaced.
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
from tests.numerics import assert_matches_reference

pytestmark = pytest.mark.usefixtures("one_thread")
fa_module = importlib.import_module("segevol_fast.ops.flash_attention")  # ops.flash_attention is the function


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


@pytest.mark.parametrize("backend,dtype", [("native", torch.float32), ("native", torch.float16),
                                           ("native", torch.bfloat16), ("triton", torch.float32),
                                           ("triton", torch.float16)], ids=str)
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
    ref = lambda q, k, v: ops.flash_attention_ref(q, k, v, 0.2, kv_len)
    same, same_grads = _grads(ref, cast, g)
    want, want_grads = _grads(ref, exact, g)
    assert_matches_reference(out, same, want, f"{backend} {dtype} out")
    for name, a, b, c in zip("qkv", grads, same_grads, want_grads):
        assert_matches_reference(a, b, c, f"{backend} {dtype} d{name}")
    assert not grads[0][0].any(), "a batch row with kv_len 0 must get zero gradients"


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


@pytest.mark.parametrize("bad,error", [
    (lambda q, k, v: (q[0], k, v, None), ShapeError),                       # 3-D q
    (lambda q, k, v: (q, k[:, :, :, :4], v, None), ShapeError),            # head dims differ
    (lambda q, k, v: (q, k.half(), v, None), ShapeError),                  # dtypes differ
    (lambda q, k, v: (q, k, v, torch.tensor([3.0, 4.0])), ShapeError),    # float kv_len
    (lambda q, k, v: (q, k, v, torch.tensor([3])), ShapeError),           # kv_len not (B,)
    (lambda q, k, v: (q, k, v, [3, 4]), ArgumentTypeError),               # list kv_len
])
def test_bad_arguments_raise_typed_errors(bad, error):
    q, k, v = (t.float() for t in _qkv(2, 1, 3, 5, 8))
    with pytest.raises(error):
        ops.flash_attention(*bad(q, k, v)[:3], kv_len=bad(q, k, v)[3])


def test_backend_choice_per_device():
    impls = _backend._REGISTRY["flash_attention"]
    assert impls["native"].fn is fa_module.flash_attention_sdpa
    assert impls["native"].why_not("cpu") is None
    assert "triton" in impls["native"].why_not("cuda")  # CUDA tensors: Triton, else ref
    with _backend.use_backend(None):
        assert _backend.select("flash_attention", "cpu") == "native"
        if _backend.triton_import_error() is None:
            assert _backend.select("flash_attention", "cuda") == "triton"


def test_define_op_rejects_native_and_native_cpu_together():
    with pytest.raises(ValueError, match="native_cpu"):
        _op.define_op("never_registered", "(Tensor x) -> Tensor", ref=torch.neg, fake=torch.empty_like,
                      native=torch.neg, native_cpu=torch.neg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_model_attention_is_bit_identical_to_the_sdpa_call_it_replaced(dtype):
    # Exact mode promises the official re-run's bits; on CPU the op's backend is that same SDPA call.
    qkv = torch.randn(2, 37, 3, 4, 16).to(dtype).permute(2, 0, 3, 1, 4)  # a qkv split: non-contiguous
    q, k, v = qkv.unbind(0)
    with torch.no_grad():
        assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(attention(q.float(), k.float(), v), F.scaled_dot_product_attention(q.float(), k.float(), v))
    mask = torch.randn(2, 1, 37, 37, dtype=dtype)
    assert torch.equal(attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
