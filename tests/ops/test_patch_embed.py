"""patch_embed's own checks: MONAI's perceptron and Conv3d equivalence, optional operands, the full
SegVol window, regressions, error messages, the CUDA kernels. The generic contract (every backend x
dtype x odd shapes x non-contiguous inputs, opcheck, gradcheck, torch.compile, autocast, the eager
bypass) runs in tests/ops/test_op_contract.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segevol_fast import ops
from segevol_fast.errors import BackendUnavailableError, ShapeError
from segevol_fast.ops import _backend
from segevol_fast.ops.patch_embed.op import patchify, unpatchify
from tests.numerics import assert_matches_reference


def _device_for(backend: str) -> str:
    return "cuda" if torch.cuda.is_available() and backend == "triton" else "cpu"


def _require(backend: str, device: str) -> None:
    reason = _backend._REGISTRY[ops.patch_embed.__name__][backend].why_not(device)
    if reason is not None:
        pytest.skip(f"{backend} unavailable on {device}: {reason}")


def _inputs(shape, patch, E, dtype, device, bias=True, pos=True, pos_3d=True):
    B, C, D, H, W = shape
    N = (D // patch[0]) * (H // patch[1]) * (W // patch[2])
    K = patch[0] * patch[1] * patch[2] * C
    x = torch.randn(shape, device=device, dtype=torch.float64)
    w = torch.randn(E, K, device=device, dtype=torch.float64) / K**0.5
    b = torch.randn(E, device=device, dtype=torch.float64) if bias else None
    p = torch.randn((1, N, E) if pos_3d else (N, E), device=device, dtype=torch.float64) if pos else None
    cast = [t if t is None else t.to(dtype) for t in (x, w, b, p)]
    return (x, w, b, p), cast


def _run(backend, *args, **kw):
    with ops.use_backend(backend):
        return ops.patch_embed(*args, **kw)


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("bias,pos,pos_3d", [(False, False, True), (True, False, True), (False, True, False)])
def test_optional_bias_and_pos(backend, bias, pos, pos_3d):
    device = _device_for(backend)
    _require(backend, device)
    exact_in, cast = _inputs((2, 1, 8, 32, 17), (4, 16, 16), 24, torch.float32, device, bias, pos, pos_3d)
    out = _run(backend, *cast)
    exact = ops.patch_embed_ref(*exact_in)
    assert_matches_reference(out, ops.patch_embed_ref(*cast), exact, backend)


def test_native_full_segvol_window_matches_reference():
    _require("native", "cpu")
    exact_in, cast = _inputs((1, 1, 32, 256, 256), (4, 16, 16), 768, torch.float32, "cpu")
    out = _run("native", *cast)
    assert out.shape == (1, 2048, 768)
    assert_matches_reference(out, ops.patch_embed_ref(*cast), ops.patch_embed_ref(*exact_in), "native full window")


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_batch_one_does_not_write_into_parameters(backend):
    # Regression: with B == 1 a broadcast "copy" of pos_embed can alias it; accumulating the GEMM
    # into that alias would silently corrupt the model's position embedding.
    device = _device_for(backend)
    _require(backend, device)
    _, (x, w, b, p) = _inputs((1, 1, 4, 16, 16), (4, 16, 16), 16, torch.float32, device)
    p_before, b_before = p.clone(), b.clone()
    out = _run(backend, x, w, b, p)
    assert torch.equal(p, p_before) and torch.equal(b, b_before)
    assert out.data_ptr() not in (p.data_ptr(), b.data_ptr())


def test_equals_conv3d_with_reshaped_weight():
    x = torch.randn(3, 2, 9, 35, 33, dtype=torch.float64)
    E, patch = 12, (4, 16, 8)
    w = torch.randn(E, 4 * 16 * 8 * 2, dtype=torch.float64)
    b = torch.randn(E, dtype=torch.float64)
    out = ops.patch_embed(x, w, b, patch_size=patch)
    # Linear weight rows are ordered (p1, p2, p3, c): reshape, then move c to the conv's channel axis.
    conv_w = w.reshape(E, *patch, 2).permute(0, 4, 1, 2, 3)
    ref = F.conv3d(x, conv_w, b, stride=patch).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_equals_monai_perceptron_patch_embedding():
    monai_blocks = pytest.importorskip("monai.networks.blocks")
    pytest.importorskip("einops")
    img, patch, E = (16, 32, 48), (4, 16, 16), 64
    kw = dict(in_channels=1, img_size=img, patch_size=patch, hidden_size=E, num_heads=4, dropout_rate=0.0)
    try:
        block = monai_blocks.PatchEmbeddingBlock(proj_type="perceptron", **kw)
    except TypeError:  # MONAI < 1.3 called it pos_embed
        block = monai_blocks.PatchEmbeddingBlock(pos_embed="perceptron", **kw)
    block = block.double().eval()
    with torch.no_grad():
        block.position_embeddings.normal_()
    lin = block.patch_embeddings[1]
    x = torch.randn(2, 1, *img, dtype=torch.float64)
    ours = ops.patch_embed(x, lin.weight, lin.bias, block.position_embeddings, patch_size=patch)
    torch.testing.assert_close(ours, block(x), rtol=1e-12, atol=1e-12)


def test_patchify_unpatchify_round_trip():
    x = torch.randn(2, 3, 9, 35, 33)
    p = patchify(x, (4, 16, 8))
    back = unpatchify(p, x.shape, (4, 16, 8))
    kept = (slice(None), slice(None), slice(0, 8), slice(0, 32), slice(0, 32))
    assert torch.equal(back[kept], x[kept])
    assert back[:, :, 8:].abs().sum() == 0 and back[..., 32:].abs().sum() == 0


@pytest.mark.parametrize(
    "shape,wshape,msg",
    [
        ((1, 32, 256, 256), (768, 1024), "(B, C, D, H, W)"),
        ((1, 1, 32, 256, 256), (768, 1000), "weight must be"),
        ((1, 1, 2, 256, 256), (768, 1024), "smaller than one patch"),
    ],
)
def test_bad_shapes_raise_shape_error(shape, wshape, msg):
    with pytest.raises(ShapeError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        ops.patch_embed(torch.zeros(shape), torch.zeros(wshape))


def test_bad_pos_bias_dtype_and_integer_input():
    x, w = torch.zeros(1, 1, 4, 16, 16), torch.zeros(8, 1024)
    with pytest.raises(ShapeError, match="pos_embed"):
        ops.patch_embed(x, w, pos_embed=torch.zeros(2, 8))
    with pytest.raises(ShapeError, match="bias"):
        ops.patch_embed(x, w, bias=torch.zeros(9))
    with pytest.raises(ShapeError, match="dtype"):
        ops.patch_embed(x, w.double())
    with pytest.raises(ShapeError, match="floating-point"):
        ops.patch_embed(x.to(torch.int16), w)


def test_native_checks_are_enforced_in_cpp_too():
    _require("native", "cpu")
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.segevol_fast_C.patch_embed(
            torch.zeros(1, 1, 4, 16, 16), torch.zeros(8, 10), None, None, [4, 16, 16], 1.0, 0.0
        )


def test_forced_unavailable_backend_names_the_fix(monkeypatch):
    monkeypatch.setattr(_backend, "triton_interpreter_on", lambda: False)
    if _backend.triton_import_error() is None and not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
            _run("triton", torch.zeros(1, 1, 4, 16, 16), torch.zeros(8, 1024))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 1, 33, 260, 250), (1, 1, 32, 256, 256)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_backends_match_reference(backend, dtype, shape):
    _require(backend, "cuda")
    exact_in, cast = _inputs(shape, (4, 16, 16), 768, dtype, "cuda")
    out = _run(backend, *cast, scale=0.5, shift=0.25)
    same = ops.patch_embed_ref(*cast, scale=0.5, shift=0.25)
    exact = ops.patch_embed_ref(*exact_in, scale=0.5, shift=0.25)
    assert_matches_reference(out, same, exact, f"{backend} cuda {dtype}")


@pytest.mark.gpu
def test_cuda_default_backend_is_native_cuda():
    import os

    if _backend.why_not_native("cuda") is not None and os.environ.get("SEGEVOL_FAST_REQUIRE_NATIVE") != "1":
        pytest.skip("extension built without CUDA")
    assert ops.select("patch_embed", "cuda") == "native"
