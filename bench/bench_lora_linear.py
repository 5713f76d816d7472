"""CPU lora_linear timings with pytest-benchmark: `make bench`.

SegVol's fused qkv projection on one window with LoRA on all of it: 2048 tokens x 768 -> 2304,
r = 16, fp32. Our op against the base GEMM alone (the floor: target <= 5% over it), peft's
unfused path and the [W; A]-then-expand layout, forward and forward+backward (x, A, B grads).
"""

from __future__ import annotations

import pytest
import torch

from bench.harness import lora_linear_case, lora_linear_providers
from segevol_fast.ops import available_backends

CASE = lora_linear_case()
BACKENDS = [b for b in available_backends("lora_linear", "cpu") if b not in ("triton", "ref")]
PROVIDERS = lora_linear_providers(CASE, BACKENDS)


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_lora_linear_qkv_forward(benchmark, provider):
    fn = PROVIDERS[provider]
    benchmark.group = "lora_linear 2048x768->2304 r16 fp32 cpu forward"
    benchmark.extra_info["gflop"] = CASE.flops / 1e9
    with torch.inference_mode():
        out = benchmark.pedantic(fn, rounds=30, iterations=1, warmup_rounds=5)
        if provider != "base_gemm_only":
            torch.testing.assert_close(out, PROVIDERS["peft_unfused"](), rtol=1e-4, atol=1e-4)


def _train_step(fn):
    def step():
        for t in (CASE.x, CASE.lora_a, CASE.lora_b):
            t.grad = None
        fn().sum().backward()
    return step


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p in ("peft_unfused",) or p.startswith("segevol")])
def test_lora_linear_qkv_forward_backward(benchmark, provider):
    benchmark.group = "lora_linear 2048x768->2304 r16 fp32 cpu forward+backward (x, A, B)"
    for t in (CASE.x, CASE.lora_a, CASE.lora_b):
        t.requires_grad_(True)
    try:
        benchmark.pedantic(_train_step(PROVIDERS[provider]), rounds=10, iterations=1, warmup_rounds=2)
    finally:
        for t in (CASE.x, CASE.lora_a, CASE.lora_b):
            t.requires_grad_(False)
            t.grad = None
