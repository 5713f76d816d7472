"""CPU patch_embed timings with pytest-benchmark: `make bench` (or `make demo`).

One SegVol window (1x1x32x256x256 fp32 -> 2048x768 tokens): the native C++ op against the
MONAI-style Rearrange+Linear+add path and the equivalent Conv3d, all in the same run.
"""

from __future__ import annotations

import pytest
import torch

from bench.harness import patch_embed_case, patch_embed_providers
from segevol_fast.ops import available_backends

CASE = patch_embed_case()
BACKENDS = [b for b in available_backends("patch_embed", "cpu") if b != "triton"]
PROVIDERS = patch_embed_providers(CASE, BACKENDS)


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_patch_embed_segvol_window(benchmark, provider):
    fn = PROVIDERS[provider]
    benchmark.group = "patch_embed 1x1x32x256x256 fp32 cpu"
    benchmark.extra_info["gflop"] = CASE.flops / 1e9
    with torch.inference_mode():
        out = benchmark.pedantic(fn, rounds=15, iterations=1, warmup_rounds=3)
    ref = PROVIDERS["monai_rearrange_linear"]()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)
