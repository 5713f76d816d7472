"""Results that do not depend on the number of CPU threads.

Same input, same masks and probabilities, bit for bit, across runs and across torch thread counts.
Two things in a CPU torch build break that, and both are handled here:

* MKL's float32 GEMM picks its blocking from the thread count, so a Linear's sums are added in a
  different order with 1 and 2 threads (seen on the CLIP text tower: last-bit differences that
  reach the probabilities). MKL's strict Conditional Numerical Reproducibility mode makes ?gemm
  bitwise independent of the thread count, at no measurable cost here. MKL reads `MKL_CBWR` once,
  at its first call, so `configure_mkl()` runs when segevol_fast is imported; a process that ran an
  MKL GEMM before that import keeps its earlier mode (import segevol_fast first, or export
  MKL_CBWR=AUTO,STRICT yourself). A value the user set is never overridden.
* torch's elementwise kernels split a tensor into one chunk per thread and run SIMD code over
  each chunk with a scalar tail; SIMD `exp` and the scalar one differ in the last bit, so
  `torch.sigmoid` of a crop-sized tensor changes where the chunk edges move. `sigmoid()` below
  walks the tensor in fixed-size pieces, each below torch's parallel grain, so every element
  takes the same path whatever the thread count (and the values equal a 1-thread torch.sigmoid).
  The masks never needed this: sigmoid > 0.5 has the same threshold on both paths (tested).

The model's own elementwise ops run on sizes fixed by the architecture (tokens × width, window
shapes), whose per-thread chunks are whole SIMD blocks for 1, 2 and 4 threads.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

MKL_MODE = "AUTO,STRICT"
_PIECE = 1 << 14  # elements per sigmoid call: below torch's grain size (32768), so one thread runs it


def configure_mkl() -> None:
    """Ask MKL for thread-count-independent GEMMs, unless the user chose a mode (see module docstring)."""
    os.environ.setdefault("MKL_CBWR", MKL_MODE)


def sigmoid(x: Tensor) -> Tensor:
    """torch.sigmoid, bit-identical for every thread count (float32 in, float32 out).

    On CUDA the kernel's element-to-thread mapping does not depend on any setting: torch.sigmoid.
    """
    if x.device.type != "cpu" or x.numel() <= _PIECE:
        return torch.sigmoid(x)
    src = x.contiguous().view(-1)
    out = torch.empty_like(src)
    for s in range(0, src.numel(), _PIECE):  # ~5 µs of Python per piece: 25 ms for 80 M voxels
        torch.sigmoid(src[s : s + _PIECE], out=out[s : s + _PIECE])
    return out.view(x.shape)
