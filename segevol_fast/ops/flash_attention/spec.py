"""flash_attention's spec: contract cases and benchmark workloads (see ops/_spec.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._backend import use_backend
from .._spec import Expected, OpSpec, Provider, Workload, seeded
from .op import OP, flash_attention, flash_attention_ref

# ((B, H, Sq, Sk, D), scale, kv_len per row): tails of every 16-block, Sq < Sk and Sq > Sk, one
# query, a row with no valid key (0) and one longer than Sk (clamped)
CASES = [((2, 3, 19, 37, 24), 0.3, [37, 5]), ((1, 2, 33, 17, 64), None, None), ((2, 1, 1, 40, 32), None, [0, 50])]


def make_args(case, device: str) -> tuple:
    """(q, k, v, scale, kv_len), q/k/v in float64."""
    (B, H, Sq, Sk, D), scale, kv = case
    f64 = {"device": device, "dtype": torch.float64}
    q, k, v = (torch.randn(B, H, S, D, **f64) for S in (Sq, Sk, Sk))
    kv_len = None if kv is None else torch.tensor(kv, device=device)
    return (q, k, v, scale, kv_len)


# ---------------------------------------------------------------------------- baselines
def monai_einsum(q, k, v):
    """MONAI's SABlock attention before its SDPA option (what the official encoder runs): einsum
    scores, softmax, einsum. It has no key mask."""
    att = (torch.einsum("bhxd,bhyd->bhxy", q, k) * q.shape[-1] ** -0.5).softmax(dim=-1)
    return torch.einsum("bhxy,bhyd->bhxd", att, v)


def _sdpa(kernel, mask):
    def attend(q, k, v):
        if kernel is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel([kernel]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return attend


# ---------------------------------------------------------------------------- workloads
def workloads(device: str, size: str, dtypes, backends):
    """Encoder attention, 12 heads x 2048 tokens x head dim 64: on the GPU 1 and 4 windows and the
    context-prior case (2048 + 16 keys, kv_len masking the padding); on the CPU one window with and
    without a padded key tail (kv_len 2000). Forward and forward+backward, the op per backend
    against torch SDPA (per kernel on CUDA: flash, memory-efficient, cuDNN; the key mask as a
    boolean attn_mask) and MONAI's einsum attention. FLOPs: 4*B*H*Sq*Sk*D forward, x3.5 forward +
    backward; bytes: read q, k, v once, write out once."""
    heads, seq, hd = (2, 40, 16) if size == "tiny" else (12, 2048, 64)
    if size == "cpu":
        cases = [(1, seq, None), (1, seq, seq - 48)]
    else:
        cases = [(1, seq, None), (4, seq, None), (4, seq + 16, seq)]
    for batch, sk, kv in cases:
        for dtype in dtypes:
            mk = seeded(dtype, device)
            q, k, v, grad_out = (
                mk(batch, heads, seq, hd),
                mk(batch, heads, sk, hd),
                mk(batch, heads, sk, hd),
                mk(batch, heads, seq, hd),
            )
            kv_len = None if kv is None else torch.full((batch,), kv, dtype=torch.int64, device=device)
            expected = Expected(
                lambda dt, t=(q, k, v), kv_len=kv_len: flash_attention_ref(
                    *(x.to(dt) if dt else x for x in t), kv_len=kv_len
                )
            )
            mask = (
                None
                if kv_len is None
                else (torch.arange(sk, device=device)[None, :] < kv_len[:, None])[:, None, None, :]
            )
            attends = {f"op_{bk}": _op_on(bk, kv_len) for bk in backends}
            if device.startswith("cuda"):
                from torch.nn.attention import SDPBackend

                attends.update(
                    {
                        "sdpa_flash": _sdpa(SDPBackend.FLASH_ATTENTION, mask),
                        "sdpa_efficient": _sdpa(SDPBackend.EFFICIENT_ATTENTION, mask),
                        "sdpa_cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION, mask),
                    }
                )
            else:
                attends["sdpa"] = _sdpa(None, mask)
            if kv_len is None:
                attends["monai_einsum"] = monai_einsum
            flops = 4.0 * batch * heads * seq * sk * hd
            for passes, mult in (("forward", 1.0), ("forward_backward", 3.5)):
                providers = {
                    name: Provider(_run(attend, passes, q, k, v, grad_out), expected)
                    for name, attend in attends.items()
                }
                yield Workload(
                    row={"shape": [batch, heads, seq, sk, hd], "kv_len": kv, "dtype": str(dtype), "passes": passes},
                    flops=mult * flops,
                    min_bytes=(2 * q.numel() + k.numel() + v.numel()) * q.element_size(),
                    providers=providers,
                    rounds=5,
                )


def _op_on(backend, kv_len):
    def attend(q, k, v):
        with use_backend(backend):
            return flash_attention(q, k, v, kv_len=kv_len)

    return attend


def _run(attend, passes, q, k, v, grad_out):
    """The attention output; for "forward_backward" after running the backward into q, k, v too."""

    def run():
        if passes == "forward":
            with torch.no_grad():
                return attend(q, k, v)
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = attend(*leaves)
        out.backward(grad_out)
        return out.detach()

    return run


SPEC = OpSpec(
    name="flash_attention",
    fn=flash_attention,
    ref=flash_attention_ref,
    op=OP,
    cases=CASES,
    make_args=make_args,
    grad_args=(0, 1, 2),
    tiny_case=((2, 1, 3, 5, 4), None, [5, 2]),
    workloads=workloads,
    baseline="sdpa_flash",
    cpu_threads=1,
)
