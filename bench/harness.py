"""Shared benchmark harness: inputs, providers and cost models for every op.

CPU timings go through pytest-benchmark (`make bench`); GPU timings through bench/gpu_suite.py.
Both take their providers from here so the baselines never drift between the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from segevol_fast import ops

# SegVol's window: one 32x256x256 volume, 4x16x16 patches -> 2048 tokens of width 768.
SEGVOL_WINDOW = dict(shape=(1, 1, 32, 256, 256), patch=(4, 16, 16), embed=768)


@dataclass
class PatchEmbedCase:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    pos: torch.Tensor
    patch: tuple[int, int, int]

    @property
    def flops(self) -> float:
        """2*M*K*E for the GEMM; bias and position adds are noise next to it."""
        M = self.pos.shape[1] * self.x.shape[0]
        return 2.0 * M * self.weight.shape[1] * self.weight.shape[0]

    @property
    def min_bytes(self) -> float:
        """Compulsory traffic of a fully fused kernel: read x, weight, bias, pos; write tokens."""
        out = self.x.shape[0] * self.pos.shape[1] * self.weight.shape[0]
        n = self.x.numel() + self.weight.numel() + self.bias.numel() + self.pos.numel() + out
        return n * self.x.element_size()


def patch_embed_case(shape=SEGVOL_WINDOW["shape"], patch=SEGVOL_WINDOW["patch"], embed=SEGVOL_WINDOW["embed"],
                     dtype=torch.float32, device="cpu") -> PatchEmbedCase:
    B, C, D, H, W = shape
    N = (D // patch[0]) * (H // patch[1]) * (W // patch[2])
    K = patch[0] * patch[1] * patch[2] * C
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return PatchEmbedCase(mk(*shape), mk(embed, K) / K**0.5, mk(embed), mk(1, N, embed), tuple(patch))


def monai_style(c: PatchEmbedCase) -> torch.Tensor:
    """MONAI's perceptron path: Rearrange (a permute copy), Linear with bias, then + pos."""
    B, C, D, H, W = c.x.shape
    pd, ph, pw = c.patch
    t = c.x.reshape(B, C, D // pd, pd, H // ph, ph, W // pw, pw).permute(0, 2, 4, 6, 3, 5, 7, 1)
    t = t.reshape(B, -1, pd * ph * pw * C)
    return F.linear(t, c.weight, c.bias) + c.pos


def conv3d_weight(c: PatchEmbedCase) -> torch.Tensor:
    E = c.weight.shape[0]
    return c.weight.reshape(E, *c.patch, c.x.shape[1]).permute(0, 4, 1, 2, 3).contiguous()


def conv3d_style(c: PatchEmbedCase, conv_w: torch.Tensor) -> torch.Tensor:
    """The equivalent Conv3d(kernel = stride = patch), flattened to tokens, + pos."""
    return F.conv3d(c.x, conv_w, c.bias, stride=c.patch).flatten(2).transpose(1, 2) + c.pos


def ours(c: PatchEmbedCase, backend: str | None = None) -> torch.Tensor:
    with ops.use_backend(backend):
        return ops.patch_embed(c.x, c.weight, c.bias, c.pos, c.patch)


def patch_embed_providers(c: PatchEmbedCase, backends: list[str]) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> zero-argument callable; baselines first, then each segevol_fast backend."""
    conv_w = conv3d_weight(c)
    providers: dict[str, Callable[[], torch.Tensor]] = {
        "monai_rearrange_linear": lambda: monai_style(c),
        "conv3d": lambda: conv3d_style(c, conv_w),
    }
    for b in backends:
        providers[f"segevol_fast_{b}"] = lambda b=b: ours(c, b)
    return providers


# ---------------------------------------------------------------------------- lora_linear
# One ViT block's fused qkv projection on a SegVol window: 2048 tokens, 768 -> 2304, LoRA r=16.
LORA_QKV = dict(tokens=2048, k=768, n=2304, rank=16)


@dataclass
class LoraLinearCase:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float

    @property
    def flops(self) -> float:
        """The base GEMM's 2*M*K*N; the rank-r shrink and expand add 2*M*r*(K+N) on top."""
        return 2.0 * self.x.shape[0] * self.x.shape[1] * self.weight.shape[0]

    @property
    def min_bytes(self) -> float:
        """Compulsory traffic of a fused kernel: read x, W, b, A, B once; write the output."""
        n = sum(t.numel() for t in (self.x, self.weight, self.bias, self.lora_a, self.lora_b))
        return (n + self.x.shape[0] * self.weight.shape[0]) * self.x.element_size()


def lora_linear_case(tokens=LORA_QKV["tokens"], k=LORA_QKV["k"], n=LORA_QKV["n"], rank=LORA_QKV["rank"],
                     dtype=torch.float32, device="cpu") -> LoraLinearCase:
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return LoraLinearCase(mk(tokens, k), mk(n, k) / k**0.5, mk(n), mk(rank, k) / k**0.5, mk(n, rank) / rank**0.5,
                          scale=2.0)


def peft_unfused(c: LoraLinearCase) -> torch.Tensor:
    """peft's lora.Linear forward: base layer, then dropout(=id) -> A -> B -> * scale, added."""
    return F.linear(c.x, c.weight, c.bias) + c.scale * F.linear(F.linear(c.x, c.lora_a), c.lora_b)


def stacked_wa_then_expand(c: LoraLinearCase, wa: torch.Tensor) -> torch.Tensor:
    """The other fused CPU layout: one GEMM over [W; A] (N + r outputs), then the rank-r expand
    added into the output columns in place. Kept as a baseline for the one we ship."""
    n = c.weight.shape[0]
    y = torch.addmm(torch.cat([c.bias, c.bias.new_zeros(wa.shape[0] - n)]), c.x, wa.t())
    out = y[:, :n]
    out.addmm_(y[:, n:], c.lora_b.t(), alpha=c.scale)
    return out


def lora_linear_providers(c: LoraLinearCase, backends: list[str]) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> zero-argument callable: the base GEMM alone, peft's unfused path, [W; A] + expand,
    then each segevol_fast backend."""
    wa = torch.cat([c.weight, c.lora_a], 0)
    providers: dict[str, Callable[[], torch.Tensor]] = {
        "base_gemm_only": lambda: F.linear(c.x, c.weight, c.bias),
        "peft_unfused": lambda: peft_unfused(c),
        "stacked_wa_then_expand": lambda: stacked_wa_then_expand(c, wa),
    }
    for b in backends:
        providers[f"segevol_fast_{b}"] = lambda b=b: _lora_ours(c, b)
    return providers


def _lora_ours(c: LoraLinearCase, backend: str | None = None) -> torch.Tensor:
    with ops.use_backend(backend):
        return ops.lora_linear(c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.scale)


# ---------------------------------------------------------------------------- routed_lora_linear
# Four windows of a mixed batch (say CT, MR T1, MR T2, PET), each routed to its own LoRA adapter
# on the fused qkv projection: 4 x 2048 tokens, 768 -> 2304, r=16.
ROUTED = dict(segments=4, adapters=4)


@dataclass
class RoutedCase:
    one: LoraLinearCase  # x is all rows; lora_a/b are adapter 0
    lora_a: torch.Tensor  # (E, r, K)
    lora_b: torch.Tensor  # (E, N, r)
    segments: torch.Tensor  # (S + 1,) row offsets
    adapter_idx: torch.Tensor  # (S,) segment s -> adapter s % E
    gates: torch.Tensor  # (S, E) softmax gates


def routed_case(segments=ROUTED["segments"], adapters=ROUTED["adapters"], tokens=LORA_QKV["tokens"], k=LORA_QKV["k"],
                n=LORA_QKV["n"], rank=LORA_QKV["rank"], dtype=torch.float32, device="cpu") -> RoutedCase:
    one = lora_linear_case(tokens=segments * tokens, k=k, n=n, rank=rank, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(1)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    a = torch.cat([one.lora_a[None], mk(adapters - 1, rank, k) / k**0.5])
    b = torch.cat([one.lora_b[None], mk(adapters - 1, n, rank) / rank**0.5])
    offsets = torch.arange(segments + 1, dtype=torch.int64, device=device) * tokens
    idx = torch.arange(segments, dtype=torch.int64, device=device) % adapters
    gates = torch.softmax(torch.randn(segments, adapters, generator=g), dim=-1).to(device=device, dtype=dtype)
    return RoutedCase(one, a, b, offsets, idx, gates)


def routed_providers(c: RoutedCase, backends: list[str]) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> zero-argument callable: the base GEMM alone, every row through ONE adapter
    (lora_linear, the target's denominator), a per-segment Python loop of lora_linear calls (what
    serving without a routed op does), and the routed op, hard and soft, per backend."""
    o = c.one
    bounds = c.segments.tolist()

    def loop() -> torch.Tensor:
        out = o.x.new_empty((o.x.shape[0], o.weight.shape[0]))
        for s, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
            e = int(c.adapter_idx[s])
            out[lo:hi] = ops.lora_linear(o.x[lo:hi], o.weight, o.bias, c.lora_a[e], c.lora_b[e], o.scale)
        return out

    providers: dict[str, Callable[[], torch.Tensor]] = {
        "base_gemm_only": lambda: F.linear(o.x, o.weight, o.bias),
        "one_adapter_lora_linear": lambda: ops.lora_linear(o.x, o.weight, o.bias, o.lora_a, o.lora_b, o.scale),
        "per_segment_loop": loop,
    }
    for bk in backends:
        providers[f"segevol_fast_{bk}_hard"] = lambda bk=bk: _routed(c, bk, hard=True)
        providers[f"segevol_fast_{bk}_soft"] = lambda bk=bk: _routed(c, bk, hard=False)
    return providers


def _routed(c: RoutedCase, backend: str, hard: bool) -> torch.Tensor:
    o = c.one
    with ops.use_backend(backend):
        return ops.routed_lora_linear(o.x, o.weight, o.bias, c.lora_a, c.lora_b, c.segments,
                                      adapter_idx=c.adapter_idx if hard else None,
                                      gates=None if hard else c.gates, scale=o.scale)


# ---------------------------------------------------------------------------- flash_attention
@dataclass
class AttentionCase:
    q: torch.Tensor  # (B, H, Sq, D)
    k: torch.Tensor  # (B, H, Sk, D)
    v: torch.Tensor
    kv_len: torch.Tensor | None  # (B,) or None
    grad_out: torch.Tensor  # (B, H, Sq, D), for forward+backward providers

    @property
    def flops(self) -> float:
        """Forward: 4*B*H*Sq*Sk*D (QK^T and PV); a backward is counted as 2.5x that by callers."""
        B, H, Sq, D = self.q.shape
        return 4.0 * B * H * Sq * self.k.shape[2] * D

    @property
    def min_bytes(self) -> float:
        """Read q, k, v once, write out once."""
        return (2 * self.q.numel() + self.k.numel() + self.v.numel()) * self.q.element_size()

    def reference(self, dtype: torch.dtype) -> torch.Tensor:
        """flash_attention_ref on the inputs cast to dtype (float64: the exact answer)."""
        q, k, v = (t.detach().to(dtype) for t in (self.q, self.k, self.v))
        return ops.flash_attention_ref(q, k, v, kv_len=self.kv_len)


def attention_case(batch: int, heads: int, sq: int, sk: int, hd: int, kv_len: int | None,
                   dtype=torch.float32, device="cpu") -> AttentionCase:
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    kv = None if kv_len is None else torch.full((batch,), kv_len, dtype=torch.int64, device=device)
    return AttentionCase(mk(batch, heads, sq, hd), mk(batch, heads, sk, hd), mk(batch, heads, sk, hd), kv,
                         mk(batch, heads, sq, hd))


def attention_providers(c: AttentionCase, backends: list[str], passes: str) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> callable returning the attention output (after running the backward too, for
    passes="forward_backward"): the op per backend, and torch SDPA, per kernel on CUDA (flash,
    memory-efficient, cuDNN; the key mask as a boolean attn_mask)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mask = None
    if c.kv_len is not None:
        mask = (torch.arange(c.k.shape[2], device=c.k.device)[None, :] < c.kv_len[:, None])[:, None, None, :]

    def run(attend):
        if passes == "forward":
            with torch.no_grad():
                return attend(c.q, c.k, c.v)
        q, k, v = (t.detach().requires_grad_(True) for t in (c.q, c.k, c.v))
        out = attend(q, k, v)
        out.backward(c.grad_out)
        return out.detach()

    def op(backend):
        def attend(q, k, v):
            with ops.use_backend(backend):
                return ops.flash_attention(q, k, v, kv_len=c.kv_len)
        return attend

    def sdpa(kernel):
        def attend(q, k, v):
            if kernel is None:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            with sdpa_kernel([kernel]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return attend

    providers = {f"op_{b}": (lambda b=b: run(op(b))) for b in backends}
    if c.q.is_cuda:
        kernels = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}
        providers.update({name: (lambda k=k: run(sdpa(k))) for name, k in kernels.items()})
    else:
        providers["sdpa"] = lambda: run(sdpa(None))
    return providers
