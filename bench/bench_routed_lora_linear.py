"""CPU routed_lora_linear timings with pytest-benchmark: `make bench`.

A mixed batch of 4 SegVol windows (4 x 2048 tokens, 768 -> 2304, r = 16, fp32), each window
routed to its own of 4 LoRA adapters, against: every row through one adapter (`lora_linear`;
target: the mixed batch <= 1.1x this), a Python loop of one `lora_linear` call per window, and the
base GEMM alone; soft routing (every window a gate-weighted mix of the 4) too.
"""

from __future__ import annotations

import pytest
import torch

from bench.harness import routed_case, routed_providers
from segevol_fast.ops import available_backends

CASE = routed_case()
BACKENDS = [b for b in available_backends("routed_lora_linear", "cpu") if b not in ("triton", "ref")]
PROVIDERS = routed_providers(CASE, BACKENDS)


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_routed_lora_linear_mixed_batch_forward(benchmark, provider):
    benchmark.group = "routed_lora_linear 4x2048x768->2304 r16, 4 adapters, fp32 cpu forward"
    with torch.inference_mode():
        out = benchmark.pedantic(PROVIDERS[provider], rounds=20, iterations=1, warmup_rounds=3)
        if provider.endswith("_hard"):  # the routed op must equal the per-window loop it replaces
            torch.testing.assert_close(out, PROVIDERS["per_segment_loop"](), rtol=1e-4, atol=1e-4)
