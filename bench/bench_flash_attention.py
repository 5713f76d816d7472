"""CPU flash_attention timings with pytest-benchmark: `make bench`.

SegVol's encoder attention on one window, 1 thread: 1 x 12 heads x 2048 tokens x head dim 64, fp32,
forward and forward+backward, without a key mask and with kv_len = 2000 (a padded batch row). The
op's CPU backend (PyTorch's fused SDPA) against the full-score reference (`flash_attention_ref`).
Run with one thread so the figure is the kernels', not the core count's.
"""

from __future__ import annotations

import pytest
import torch

from segevol_fast import ops
from segevol_fast.ops.flash_attention.reference import flash_attention_sdpa

SHAPE = (1, 12, 2048, 64)  # (B, H, S, D): 2048 tokens of one 32x256x256 window, 12 heads of 64
KV_LENS = {"full": None, "kv2000": 2000}
# "sdpa_autograd" is flash_attention_sdpa called directly, autograd recording SDPA itself: the
# baseline for the op's native backward, which runs ATen's fused backward from the saved out and lse.
# "monai_einsum" is MONAI's SABlock attention before its SDPA option (what the official encoder
# runs): einsum scores, softmax, einsum; it has no key mask, so it runs only without kv_len.
PROVIDERS = {"op_native_sdpa": "native", "reference": "ref", "sdpa_autograd": None, "monai_einsum": "monai"}


def _monai_einsum(q, k, v):
    att = (torch.einsum("bhxd,bhyd->bhxy", q, k) * q.shape[-1] ** -0.5).softmax(dim=-1)
    return torch.einsum("bhxy,bhyd->bhxd", att, v)


def _inputs(requires_grad: bool):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(SHAPE, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def _forward(backend, kv_len):
    q, k, v = _inputs(False)
    kv = None if kv_len is None else torch.tensor([kv_len])

    def run():
        if backend == "monai":
            with torch.inference_mode():
                return _monai_einsum(q, k, v)
        with torch.inference_mode(), ops.use_backend(backend):
            return ops.flash_attention(q, k, v, kv_len=kv)

    return run


def _forward_backward(backend, kv_len):
    q, k, v = _inputs(True)
    kv = None if kv_len is None else torch.tensor([kv_len])
    g = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))

    def run():
        if backend is None:
            out = flash_attention_sdpa(q, k, v, None, kv)
        elif backend == "monai":
            out = _monai_einsum(q, k, v)
        else:
            with ops.use_backend(backend):
                out = ops.flash_attention(q, k, v, kv_len=kv)
        return torch.autograd.grad(out, (q, k, v), g)[0]

    return run


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("kv", list(KV_LENS))
@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("passes", ["forward", "forward_backward"])
def test_flash_attention_segvol_window(benchmark, passes, provider, kv):
    if passes == "forward" and PROVIDERS[provider] is None:
        pytest.skip("without a backward, sdpa_autograd is op_native_sdpa")
    if PROVIDERS[provider] == "monai" and KV_LENS[kv] is not None:
        pytest.skip("MONAI's attention has no key mask")
    make = _forward if passes == "forward" else _forward_backward
    fn = make(PROVIDERS[provider], KV_LENS[kv])
    benchmark.group = f"flash_attention 1x12x2048x64 fp32 cpu 1 thread, {passes}, {kv}"
    got = benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    want = _forward("ref", KV_LENS[kv])() if passes == "forward" else _forward_backward("ref", KV_LENS[kv])()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
