"""What every Triton kernel here shares at launch: interpreter detection, matmul precision, and
the GEMM tile configurations (autotuned on a GPU, one fixed small tile in the interpreter).

Kept in one place so that a new kernel does not grow its own copy, and so that the tile list and
the interpreter rule change together for every kernel.
"""

from __future__ import annotations

import os

import torch
import triton

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): tiles for tensor-core GEMM-like kernels;
# untuned beyond common Triton practice (none of these kernels has run on a GPU yet)
GEMM_TILES = ((128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 3))


def interpreted() -> bool:
    """True under TRITON_INTERPRET=1 (the CPU test mode)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def matmul_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: fp32 follows torch's TF32 switch (as torch's own matmuls do);
    16-bit operands ignore it ("tf32" is the backend default)."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"


def gemm_configs(*extra_tiles: tuple) -> list:
    """Autotune candidates on a GPU; in the interpreter (or without CUDA) one 16x16x16 tile, since
    the interpreter crashes on multi-config autotune and is slow."""
    if interpreted() or not torch.cuda.is_available():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in (*GEMM_TILES, *extra_tiles)
    ]


class TiledKernel:
    """A GEMM-like kernel over an (M, N) output grid with its tile configurations: autotuned (keyed
    on `key`) when there is a real choice, else launched with the single config's tile."""

    def __init__(self, kernel, configs: list, key: list[str]):
        self.configs = configs
        self.kernel = triton.autotune(configs=configs, key=key)(kernel) if len(configs) > 1 else kernel

    def __call__(self, M: int, N: int, *args, **kwargs):
        if len(self.configs) > 1:
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
        else:
            blk = self.configs[0]
            grid = (triton.cdiv(M, blk.kwargs["BLOCK_M"]), triton.cdiv(N, blk.kwargs["BLOCK_N"]))
            kwargs.update(blk.kwargs, num_warps=blk.num_warps, num_stages=blk.num_stages)
        return self.kernel[grid](*args, **kwargs)
