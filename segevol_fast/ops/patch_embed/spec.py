"""patch_embed's spec: contract cases and benchmark workloads (see ops/_spec.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._backend import use_backend
from .._spec import Expected, OpSpec, Provider, Workload, cast_floats, seeded
from .op import OP, patch_embed, patch_embed_ref

# SegVol's window: one 32x256x256 volume, 4x16x16 patches -> 2048 tokens of width 768.
SEGVOL_WINDOW = {"shape": (1, 1, 32, 256, 256), "patch": (4, 16, 16), "embed": 768}

# (B, C, D, H, W), patch, E: a remainder on every axis, batch 3, C > 1, E not a block size, and one
# volume that is exactly one patch (no remainder, N = 1)
CASES = [((3, 1, 9, 35, 33), (4, 16, 16), 48), ((2, 2, 8, 20, 18), (2, 4, 3), 20), ((1, 1, 4, 16, 16), (4, 16, 16), 16)]


def make_args(case, device: str) -> tuple:
    """(x, weight, bias, pos_embed, patch_size, scale, shift), tensors in float64."""
    shape, patch, E = case
    _, C, D, H, W = shape
    N = (D // patch[0]) * (H // patch[1]) * (W // patch[2])
    K = patch[0] * patch[1] * patch[2] * C
    f64 = {"device": device, "dtype": torch.float64}
    x = torch.randn(shape, **f64)
    w = torch.randn(E, K, **f64) / K**0.5
    return (x, w, torch.randn(E, **f64), torch.randn(1, N, E, **f64), list(patch), 0.37, -1.25)


# ---------------------------------------------------------------------------- baselines
def monai_rearrange_linear(x, weight, bias, pos, patch):
    """MONAI's perceptron path: Rearrange (a permute copy), Linear with bias, then + pos."""
    B, C, D, H, W = x.shape
    pd, ph, pw = patch
    t = x.reshape(B, C, D // pd, pd, H // ph, ph, W // pw, pw).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return F.linear(t.reshape(B, -1, pd * ph * pw * C), weight, bias) + pos


def conv3d_weight(weight, patch, channels: int):
    """The Linear weight as the equivalent Conv3d(kernel = stride = patch)'s (E, C, pd, ph, pw)."""
    return weight.reshape(weight.shape[0], *patch, channels).permute(0, 4, 1, 2, 3).contiguous()


def conv3d(x, conv_w, bias, pos, patch):
    """The equivalent Conv3d(kernel = stride = patch), flattened to tokens, + pos."""
    return F.conv3d(x, conv_w, bias, stride=patch).flatten(2).transpose(1, 2) + pos


# ---------------------------------------------------------------------------- workloads
def workloads(device: str, size: str, dtypes, backends):
    """One SegVol window (and a batch of 4 on the GPU): the op per backend against MONAI's
    Rearrange + Linear + add and the equivalent Conv3d. FLOPs: the GEMM's 2*M*K*E (bias and
    position adds are noise next to it); bytes: read x, weight, bias, pos once, write the tokens."""
    shape, patch, embed = SEGVOL_WINDOW["shape"], SEGVOL_WINDOW["patch"], SEGVOL_WINDOW["embed"]
    if size == "tiny":
        shape, embed = (1, 1, 8, 32, 32), 32
    for batch in (1,) if size == "cpu" else (1, 4):
        B, C, D, H, W = (batch, *shape[1:])
        N = (D // patch[0]) * (H // patch[1]) * (W // patch[2])
        K = patch[0] * patch[1] * patch[2] * C
        for dtype in dtypes:
            mk = seeded(dtype, device)
            x, w, b, pos = mk(B, C, D, H, W), mk(embed, K) / K**0.5, mk(embed), mk(1, N, embed)
            args = (x, w, b, pos, patch)
            expected = Expected(lambda dt, args=args: patch_embed_ref(*cast_floats(args, dt)))
            conv_w = conv3d_weight(w, patch, C)
            providers = {
                "monai_rearrange_linear": Provider(lambda args=args: monai_rearrange_linear(*args), expected),
                "conv3d": Provider(lambda x=x, cw=conv_w, b=b, pos=pos: conv3d(x, cw, b, pos, patch), expected),
            }
            for bk in backends:
                providers[f"segevol_fast_{bk}"] = Provider(lambda bk=bk, args=args: _on(bk, args), expected)
            out = B * N * embed
            yield Workload(
                row={"shape": list(x.shape), "dtype": str(dtype)},
                flops=2.0 * B * N * K * embed,
                min_bytes=(x.numel() + w.numel() + b.numel() + pos.numel() + out) * x.element_size(),
                providers=providers,
                rounds=15,
            )


def _on(backend, args):
    with use_backend(backend):
        return patch_embed(*args)


SPEC = OpSpec(
    name="patch_embed",
    fn=patch_embed,
    ref=patch_embed_ref,
    op=OP,
    cases=CASES,
    make_args=make_args,
    grad_args=(0, 1, 2, 3),
    tiny_case=((2, 2, 5, 6, 7), (2, 3, 2), 6),
    workloads=workloads,
    baseline="monai_rearrange_linear",
    native_in_csrc=True,
)
