"""Numerical comparison rule used by every kernel test (FlashAttention / mamba style).

A kernel's error against a float64 reference must be at most 2x the error of the plain-PyTorch
reference computed in the kernel's own dtype, plus a small floor for that dtype.
"""

from __future__ import annotations

import torch

# Absolute floors, relative to the reference's max magnitude, per (device type, dtype). The Triton
# interpreter is exact fp32; on GPUs fp32 matmuls may run in TF32.
FLOOR = {
    ("cpu", torch.float64): 1e-12,
    ("cpu", torch.float32): 1e-6,
    ("cpu", torch.float16): 2e-3,
    ("cpu", torch.bfloat16): 1e-2,
    ("cuda", torch.float32): 2e-3,
    ("cuda", torch.float16): 2e-3,
    ("cuda", torch.bfloat16): 1e-2,
}


def assert_matches_reference(
    out: torch.Tensor, same_dtype_ref: torch.Tensor, exact_ref: torch.Tensor, what: str = "output"
):
    """Assert max|out - exact| <= 2 * max|same_dtype_ref - exact| + floor * max|exact|."""
    assert out.shape == exact_ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(exact_ref.shape)}"
    assert out.dtype == same_dtype_ref.dtype, f"{what}: dtype {out.dtype} != {same_dtype_ref.dtype}"
    exact = exact_ref.double().cpu()
    err = (out.double().cpu() - exact).abs()
    ref_err = (same_dtype_ref.double().cpu() - exact).abs().max().item()
    scale = exact.abs().max().item() or 1.0
    floor = FLOOR[(out.device.type, out.dtype)] * scale
    bound = 2 * ref_err + floor
    print(
        f"{what}: max err {err.max().item():.3e} mean {err.mean().item():.3e}; "
        f"same-dtype ref max err {ref_err:.3e}; bound {bound:.3e}"
    )
    assert err.max().item() <= bound, f"{what}: max error {err.max().item():.3e} exceeds {bound:.3e}"
