"""Flash-attention kernels (Triton, under the interpreter on CPU), the CPU backend (ATen's fused
flash kernels, forward and backward) and the SDPA path against the float64 reference
(`segevol_fast.ops.flash_attention.reference`), forward and backward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from segevol_fast.errors import ArgumentTypeError, ShapeError
from segevol_fast.ops.flash_attention.reference import (
    flash_attention_cpu,
    flash_attention_cpu_backward,
    flash_attention_reference,
    flash_attention_reference_with_lse,
    flash_attention_sdpa,
)
from tests.numerics import assert_matches_reference

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The Triton interpreter computes bf16 silently wrong: never test bf16 there.
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# (B, H, Sq, Sk, D, kv_len): tails of q and k (block 16), Sq != Sk both ways, one query, kv_len as an
# int below one block, equal to Sk, and per batch row (with 0: a row that attends to nothing).
CASES = [
    (1, 2, 17, 33, 32, None),
    (2, 2, 70, 17, 64, None),
    (2, 2, 1, 70, 32, 5),
    (1, 2, 33, 33, 64, 33),
    (2, 2, 33, 70, 32, "per-row"),
    (1, 1, 17, 17, 128, 9),
]


def _ids(case):
    B, H, Sq, Sk, D, kv = case
    return f"B{B}H{H}q{Sq}k{Sk}d{D}-kv{kv}"


def _fa():
    pytest.importorskip("triton")
    from segevol_fast.ops.flash_attention import triton_kernel as flash_attention

    return flash_attention


def _kv_len(kv, B, Sk):
    if kv == "per-row":  # one full row and one shorter than a block
        return torch.tensor([Sk, 3][:B] if B > 1 else [3], device=DEVICE)
    return kv


def _inputs(B, H, Sq, Sk, D, dtype):
    """float64 originals and their casts; the exact reference sees the originals."""
    exact = [torch.randn(B, H, S, D, device=DEVICE, dtype=torch.float64) for S in (Sq, Sk, Sk)]
    return exact, [t.to(dtype) for t in exact]


def _grads(fn, inputs, grad_out):
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def _dt(v):
    return str(v).replace("torch.", "")


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=_dt)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_triton_forward_and_backward_match_float64_reference(case, dtype):
    fa = _fa()
    B, H, Sq, Sk, D, kv = case
    kv_len = _kv_len(kv, B, Sk)
    exact_in, cast = _inputs(B, H, Sq, Sk, D, dtype)
    g = torch.randn(B, H, Sq, D, device=DEVICE, dtype=torch.float64)
    out, grads = _grads(lambda q, k, v: fa.FlashAttentionTriton.apply(q, k, v, None, kv_len), cast, g)
    same, same_grads = _grads(lambda q, k, v: flash_attention_reference(q, k, v, kv_len=kv_len), cast, g)
    exact, exact_grads = _grads(lambda q, k, v: flash_attention_reference(q, k, v, kv_len=kv_len), exact_in, g)
    assert_matches_reference(out, same, exact, f"out {dtype}")
    for name, a, s, e in zip(("dq", "dk", "dv"), grads, same_grads, exact_grads):
        assert_matches_reference(a, s, e, f"{name} {dtype}")


@pytest.mark.parametrize("block_m,block_n", [(16, 32), (32, 16)])
def test_triton_other_block_sizes_and_custom_scale(block_m, block_n):
    fa = _fa()
    exact_in, cast = _inputs(2, 1, 45, 37, 24, torch.float32)  # odd head dim: padded to 32 and masked
    g = torch.randn(2, 1, 45, 24, device=DEVICE, dtype=torch.float64)
    kv_len = torch.tensor([37, 20], device=DEVICE)

    # A custom scale (not 1/sqrt(24) = 0.20) at logits attention meets (std ~1.7). At 0.9 (std ~4.4)
    # the backward's P = exp2(s - lse) rounds relative to |s| (~20 in log2 units), and dv broke the
    # 2x rule against fp32 PyTorch's softmax on ~8% of seeds (5e-6 relative, the flash algorithm's
    # own rounding); at 0.35 none of 120 seeds did.
    def run(q, k, v):
        return fa.FlashAttentionTriton.apply(q, k, v, 0.35, kv_len, block_m, block_n)

    def ref(q, k, v):
        return flash_attention_reference(q, k, v, scale=0.35, kv_len=kv_len)

    out, grads = _grads(run, cast, g)
    same, same_grads = _grads(ref, cast, g)
    exact, exact_grads = _grads(ref, exact_in, g)
    assert_matches_reference(out, same, exact, "out")
    for name, a, s, e in zip(("dq", "dk", "dv"), grads, same_grads, exact_grads):
        assert_matches_reference(a, s, e, name)


def test_triton_non_contiguous_inputs_and_grad():
    fa = _fa()
    # (B, S, H, D) storage viewed as (B, H, S, D), as a fused qkv projection produces it.
    exact_in = [torch.randn(2, S, 2, 32, device=DEVICE, dtype=torch.float64).transpose(1, 2) for S in (19, 40, 40)]
    cast = [t.float() for t in exact_in]
    assert not any(t.is_contiguous() for t in cast)
    g = torch.randn(2, 19, 2, 32, device=DEVICE, dtype=torch.float64).transpose(1, 2)
    out, grads = _grads(lambda q, k, v: fa.FlashAttentionTriton.apply(q, k, v, None, 30), cast, g)
    same, same_grads = _grads(
        lambda q, k, v: flash_attention_reference(q, k, v, kv_len=30), [t.contiguous() for t in cast], g
    )
    exact, exact_grads = _grads(lambda q, k, v: flash_attention_reference(q, k, v, kv_len=30), exact_in, g)
    assert_matches_reference(out, same, exact, "strided out")
    for name, a, s, e in zip(("dq", "dk", "dv"), grads, same_grads, exact_grads):
        assert_matches_reference(a, s, e, f"strided {name}")


def test_triton_lse_is_the_row_log_sum_exp():
    fa = _fa()
    q, k, v = (torch.randn(2, 2, S, 32, device=DEVICE) for S in (21, 35, 35))
    kv_len = torch.tensor([35, 0], device=DEVICE)
    out, lse = fa.flash_attention_triton(q, k, v, 0.3, kv_len)
    scores = (q.double() @ k.double().transpose(-2, -1)) * 0.3
    expected = scores[0].logsumexp(-1)
    torch.testing.assert_close(lse[0].double(), expected, rtol=1e-5, atol=1e-5)
    # kv_len 0: an empty sum, output 0
    assert torch.isneginf(lse[1]).all() and out[1].abs().max() == 0


def test_triton_keys_past_kv_len_are_never_read():
    fa = _fa()
    q, k, v = (torch.randn(1, 2, S, 32, device=DEVICE) for S in (17, 40, 40))
    out, _ = fa.flash_attention_triton(q, k, v, None, 21)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 21:] = float("nan")
    v2[:, :, 21:] = float("inf")
    out2, lse2 = fa.flash_attention_triton(q, k2, v2, None, 21)
    assert torch.equal(out, out2)
    dq, dk, dv = fa.flash_attention_triton_backward(torch.ones_like(out), q, k2, v2, out2, lse2, None, 21)
    assert torch.isfinite(dq).all() and dk[:, :, 21:].abs().max() == 0 and dv[:, :, 21:].abs().max() == 0


def test_triton_kv_len_row_zero_and_clamping():
    fa = _fa()
    q, k, v = (torch.randn(3, 1, S, 32, device=DEVICE, requires_grad=True) for S in (18, 20, 20))
    kv_len = torch.tensor([0, 50, 20], device=DEVICE)  # nothing, clamped to Sk, exactly Sk
    out = fa.FlashAttentionTriton.apply(q, k, v, None, kv_len)
    out.sum().backward()
    assert out[0].abs().max() == 0
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all() and t.grad[0].abs().max() == 0
    full = flash_attention_reference(q.detach()[1:], k.detach()[1:], v.detach()[1:])
    torch.testing.assert_close(out[1:].detach(), full, rtol=1e-5, atol=1e-5)


def test_triton_rejects_what_it_cannot_run():
    fa = _fa()
    q = torch.randn(1, 1, 4, 32, device=DEVICE)
    with pytest.raises(ShapeError, match="float64"):
        fa.flash_attention_triton(q.double(), q.double(), q.double())
    big = torch.randn(1, 1, 4, 160, device=DEVICE)
    with pytest.raises(ShapeError, match="head dims up to 128"):
        fa.flash_attention_triton(big, big, big)
    with pytest.raises(ShapeError, match="block_m"):
        fa.flash_attention_triton(q, q, q, block_m=24)
    wide = torch.randn(1, 65536, 1, 16, device=DEVICE)
    with pytest.raises(ShapeError, match="split the batch"):
        fa.flash_attention_triton(wide, wide, wide)


# ---------------------------------------------------------------------- reference and CPU backend
def test_reference_kv_len_equals_truncated_keys():
    q, k, v = (torch.randn(2, 3, S, 16, dtype=torch.float64) for S in (7, 12, 12))
    out = flash_attention_reference(q, k, v, kv_len=torch.tensor([5, 12]))
    torch.testing.assert_close(out[:1], flash_attention_reference(q[:1], k[:1, :, :5], v[:1, :, :5]))
    # and the unmasked reference is textbook softmax attention
    naive = torch.softmax(q[1:] @ k[1:].transpose(-2, -1) / 4.0, dim=-1) @ v[1:]
    torch.testing.assert_close(out[1:], naive)


@pytest.mark.parametrize("kv_len", [None, 9, "per-row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=_dt)
def test_cpu_sdpa_path_matches_float64_reference(dtype, kv_len):
    # The CPU backend decision: torch's fused SDPA (flash kernel on CPU) with a boolean key mask.
    kv = torch.tensor([33, 4]) if kv_len == "per-row" else kv_len
    exact_in = [torch.randn(2, 3, S, 64, dtype=torch.float64) for S in (17, 33, 33)]
    cast = [t.to(dtype) for t in exact_in]
    g = torch.randn(2, 3, 17, 64, dtype=torch.float64)
    out, grads = _grads(lambda q, k, v: flash_attention_sdpa(q, k, v, kv_len=kv), cast, g)
    same, same_grads = _grads(lambda q, k, v: flash_attention_reference(q, k, v, kv_len=kv), cast, g)
    exact, exact_grads = _grads(lambda q, k, v: flash_attention_reference(q, k, v, kv_len=kv), exact_in, g)
    assert_matches_reference(out, same, exact, f"sdpa out {dtype}")
    for name, a, s, e in zip(("dq", "dk", "dv"), grads, same_grads, exact_grads):
        assert_matches_reference(a, s, e, f"sdpa {name} {dtype}")


def test_cpu_sdpa_path_is_torch_sdpa_with_a_key_mask():
    q, k, v = (torch.randn(2, 2, S, 32) for S in (10, 26, 26))
    mask = torch.zeros(2, 1, 1, 26, dtype=torch.bool)
    mask[0, ..., :26] = True
    mask[1, ..., :7] = True
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2)
    assert torch.equal(flash_attention_sdpa(q, k, v, scale=0.2, kv_len=torch.tensor([26, 7])), expected)
    assert torch.equal(flash_attention_sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(32)))
    # keys no row may see are sliced off rather than masked: the same attention, fewer keys computed
    mask[0, ..., 12:] = False
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2)
    torch.testing.assert_close(
        flash_attention_sdpa(q, k, v, scale=0.2, kv_len=torch.tensor([12, 7])), expected, rtol=1e-6, atol=1e-6
    )
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:1], scale=0.2)
    torch.testing.assert_close(flash_attention_sdpa(q, k, v, scale=0.2, kv_len=12), expected, rtol=1e-6, atol=1e-6)


def _cpu_grads(inputs, grad_out, scale=None, kv_len=None):
    """out, lse and (dq, dk, dv) of the CPU backend: its forward, then its backward from the saved
    out and lse (no autograd involved)."""
    with torch.no_grad():
        out, lse = flash_attention_cpu(*inputs, scale, kv_len)
        grads = flash_attention_cpu_backward(grad_out.to(out.dtype), *inputs, out, lse, scale, kv_len)
    return out, lse, grads


@pytest.mark.parametrize("kv_len", [None, 9, "per-row", "row0"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=_dt)
def test_cpu_backend_forward_and_backward_match_float64_reference(dtype, kv_len):
    # Default scale (scores of unit variance), as SegVol runs it: ATen's fp32 backward loses about
    # 3x the reference's precision on much sharper softmaxes (scale 0.3 at D 64), and so does SDPA's
    # own autograd, which is the same kernel (test_cpu_backend_is_torch_sdpa_bit_for_bit).
    kv = {"per-row": torch.tensor([33, 4]), "row0": torch.tensor([0, 20])}.get(kv_len, kv_len)
    exact_in = [torch.randn(2, 3, S, 64, dtype=torch.float64) for S in (17, 33, 33)]
    cast = [t.to(dtype) for t in exact_in]
    g = torch.randn(2, 3, 17, 64, dtype=torch.float64)
    out, lse, grads = _cpu_grads(cast, g, None, kv)

    def ref(q, k, v):
        return flash_attention_reference(q, k, v, scale=None, kv_len=kv)

    same, same_grads = _grads(ref, cast, g)
    exact, exact_grads = _grads(ref, exact_in, g)
    assert_matches_reference(out, same, exact, f"cpu out {dtype}")
    for name, a, s, e in zip(("dq", "dk", "dv"), grads, same_grads, exact_grads):
        assert_matches_reference(a, s, e, f"cpu {name} {dtype}")
    _, same_lse = flash_attention_reference_with_lse(*cast, None, kv)
    _, exact_lse = flash_attention_reference_with_lse(*exact_in, None, kv)
    rows = slice(1, None) if kv_len == "row0" else slice(None)
    assert_matches_reference(lse[rows], same_lse[rows], exact_lse[rows], f"cpu lse {dtype}")
    if kv_len == "row0":  # attends to nothing: out 0, lse -inf, zero gradients
        assert torch.isneginf(lse[0]).all() and out[0].abs().max() == 0
        assert all(torch.isfinite(t).all() and t[0].abs().max() == 0 for t in grads)


def test_cpu_backend_strided_inputs():
    # A non-contiguous head dim (ATen's kernels silently misread it) and a (B, S, H, D) layout.
    exact_in = [torch.randn(2, 2, S, 32, dtype=torch.float64) for S in (19, 40, 40)]
    head_dim_strided = [t.float().transpose(-2, -1).contiguous().transpose(-2, -1) for t in exact_in]
    seq_strided = [t.float().transpose(1, 2).contiguous().transpose(1, 2) for t in exact_in]
    g = torch.randn(2, 2, 19, 32, dtype=torch.float64)
    same, same_grads = _grads(
        lambda q, k, v: flash_attention_reference(q, k, v, kv_len=30), [t.float() for t in exact_in], g
    )
    exact, exact_grads = _grads(lambda q, k, v: flash_attention_reference(q, k, v, kv_len=30), exact_in, g)
    for inputs in (head_dim_strided, seq_strided):
        assert inputs[0].stride(-1) != 1 or not inputs[0].is_contiguous()
        out, _, grads = _cpu_grads(inputs, g.float().transpose(-2, -1).contiguous().transpose(-2, -1), None, 30)
        assert_matches_reference(out, same, exact, "strided out")
        for name, a, s, e in zip(("dq", "dk", "dv"), grads, same_grads, exact_grads):
            assert_matches_reference(a, s, e, f"strided {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dt)
def test_cpu_backend_is_torch_sdpa_bit_for_bit(dtype):
    # The model's exact mode relies on it: same kernel, same mask values, same output bits.
    q, k, v = (torch.randn(2, 2, S, 32).to(dtype) for S in (10, 26, 26))
    assert torch.equal(flash_attention_cpu(q, k, v)[0], F.scaled_dot_product_attention(q, k, v))
    mask = torch.zeros(2, 1, 1, 26, dtype=torch.bool)
    mask[0, ..., :26] = True
    mask[1, ..., :7] = True
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2)
    assert torch.equal(flash_attention_cpu(q, k, v, 0.2, torch.tensor([26, 7]))[0], expected)
    assert torch.equal(
        flash_attention_cpu(q, k, v, 0.2, torch.tensor([26, 7]))[0],
        flash_attention_sdpa(q, k, v, 0.2, torch.tensor([26, 7])),
    )
    # the backward too: SDPA's autograd runs the same fused backward kernel
    g = torch.randn(2, 2, 10, 32).to(dtype)
    _, sdpa_grads = _grads(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2), (q, k, v), g
    )
    _, _, grads = _cpu_grads((q, k, v), g, 0.2, torch.tensor([26, 7]))
    for a, b in zip(grads, sdpa_grads):
        assert torch.equal(a, b)


def test_cpu_backend_gradients_of_keys_nobody_sees_are_zero():
    # Keys past every row's kv_len are sliced off in eager mode; their gradients are zeros.
    q, k, v = (torch.randn(2, 2, S, 16) for S in (7, 30, 30))
    _, _, (_, dk, dv) = _cpu_grads((q, k, v), torch.randn(2, 2, 7, 16), None, torch.tensor([12, 5]))
    assert dk.shape == k.shape and dv.shape == v.shape
    assert dk[:, :, 12:].abs().max() == 0 and dv[:, :, 12:].abs().max() == 0
    assert dk[1, :, 5:].abs().max() == 0 and dk[0, :, :12].abs().max() > 0


@pytest.mark.parametrize("fn", [flash_attention_reference, flash_attention_sdpa], ids=lambda f: f.__name__)
def test_row_with_no_valid_key_is_zero_with_zero_gradients(fn):
    out, grads = _grads(
        lambda q, k, v: fn(q, k, v, kv_len=torch.tensor([0, 5])),
        [torch.randn(2, 1, S, 16) for S in (4, 6, 6)],
        torch.randn(2, 1, 4, 16),
    )
    assert out[0].abs().max() == 0 and torch.isfinite(out).all()
    assert all(torch.isfinite(t).all() and t[0].abs().max() == 0 for t in grads)


def test_argument_errors():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ShapeError, match=r"\(B, H, S, D\)"):
        flash_attention_reference(q[0], q[0], q[0])
    with pytest.raises(ShapeError, match="k and v"):
        flash_attention_reference(q, q[:, :1], q[:, :1])
    with pytest.raises(ShapeError, match="one float dtype"):
        flash_attention_reference(q, q.half(), q)
    with pytest.raises(ArgumentTypeError, match="kv_len"):
        flash_attention_reference(q, q, q, kv_len=2.5)
    with pytest.raises(ShapeError, match="kv_len"):
        flash_attention_reference(q, q, q, kv_len=torch.tensor([1, 2]))
