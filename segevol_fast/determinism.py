"""What makes results repeatable on a CPU, and how far that goes.

The guarantee, on every x86-64 CPU (AVX2 or AVX-512, Intel or AMD):

* Same input, same torch thread count: masks and probabilities bit-identical, run after run, in
  one process or in fresh ones, and whatever the window or decode batch the memory planner picks.
* Another thread count: probabilities within 1e-5 of each other (measured: ~6e-8), and a mask
  voxel can change only where its probability is that close to the 0.5 threshold (none has in
  the tests). Not bits: see the GEMMs below.

Two things in a CPU torch build change results with the thread count:

* MKL's float32 GEMM picks its blocking from the thread count, so a Linear's sums are added in a
  different order with 1 and 2 threads. MKL's strict Conditional Numerical Reproducibility mode
  (`MKL_CBWR=AUTO,STRICT`) removes that on the CPUs where MKL honours it (it made the whole
  pipeline bit-identical across 1, 2 and 4 threads on Intel AVX-512 machines, at no measurable
  cost), so `configure_mkl()` asks for it when segevol_fast is imported (MKL reads `MKL_CBWR`
  once, at its first call; a value the user set is never overridden). It is not honoured
  everywhere: on AMD EPYC CPUs, with or without AVX-512, small GEMMs such as the mask decoder's
  (14 x 32 by 32 x 16) still give other last bits at 2 threads than at 1. Only
  `MKL_CBWR=COMPATIBLE` removes that, and it makes the encoder's GEMMs about 3x slower (65 vs 200 ms
  for one qkv projection here), so it is the user's choice (export it), not the default.
* torch's elementwise kernels split a tensor into one chunk per thread and run SIMD code over
  each chunk with a scalar tail; SIMD `exp` and the scalar one differ in the last bit, so
  `torch.sigmoid` of a crop-sized tensor changes where the chunk edges move. `sigmoid()` below
  walks the tensor in fixed-size pieces, each below torch's parallel grain, so every element
  takes the same path whatever the thread count (and the values equal a 1-thread torch.sigmoid).
  The masks never needed this: sigmoid > 0.5 has the same threshold on both paths (tested).

tests/test_determinism.py checks all of this; `make test` runs the suite a second time with the
AVX2 code paths forced (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA), so an
assumption that holds on one instruction set only fails in CI.
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
