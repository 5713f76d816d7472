"""lora_linear's spec: contract cases and benchmark workloads (see ops/_spec.py)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .._backend import use_backend
from .._spec import Expected, OpSpec, Provider, Workload, cast_floats, seeded
from .op import OP, lora_linear, lora_linear_ref

# One ViT block's fused qkv projection on a SegVol window: 2048 tokens, 768 -> 2304, LoRA r=16.
LORA_QKV = {"tokens": 2048, "k": 768, "n": 2304, "rank": 16}

# ((leading dims), K, N, r, out_slice): odd K/N/rows, ranks 2/5/16 (rank 1 in test_lora_linear: a
# (n, 1) B cannot be made non-contiguous), a middle slice (the v third of a qkv-like output) and
# the whole output; W is frozen (not a grad arg)
CASES = [((2, 19), 37, 45, 5, (30, 45)), ((33,), 20, 18, 2, None), ((3, 2, 7), 24, 51, 16, (17, 34))]


def make_args(case, device: str) -> tuple:
    """(x, weight, bias, lora_a, lora_b, scale, out_slice), tensors in float64."""
    lead, K, N, r, out_slice = case
    f64 = {"device": device, "dtype": torch.float64}
    n = N if out_slice is None else out_slice[1] - out_slice[0]
    x = torch.randn(*lead, K, **f64)
    w = torch.randn(N, K, **f64) / K**0.5
    a = torch.randn(r, K, **f64) / K**0.5
    b = torch.randn(n, r, **f64) / r**0.5
    return (x, w, torch.randn(N, **f64), a, b, 0.7, list(out_slice or (0, N)))


# ---------------------------------------------------------------------------- baselines
def peft_unfused(x, weight, bias, lora_a, lora_b, scale):
    """peft's lora.Linear forward: base layer, then dropout(=id) -> A -> B -> * scale, added."""
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x, lora_a), lora_b)


def stacked_wa_then_expand(x, wa, bias, lora_b, scale):
    """The other fused CPU layout: one GEMM over [W; A] (N + r outputs), then the rank-r expand
    added into the output columns in place. Kept as a baseline for the one the op ships."""
    n = lora_b.shape[0]
    y = torch.addmm(torch.cat([bias, bias.new_zeros(wa.shape[0] - n)]), x, wa.t())
    out = y[:, :n]
    out.addmm_(y[:, n:], lora_b.t(), alpha=scale)
    return out


def qkv_inputs(tokens, k, n, rank, dtype, device):
    """(x, weight, bias, lora_a, lora_b, scale) of a qkv-like projection, reproducibly seeded."""
    mk = seeded(dtype, device)
    return mk(tokens, k), mk(n, k) / k**0.5, mk(n), mk(rank, k) / k**0.5, mk(n, rank) / rank**0.5, 2.0


# ---------------------------------------------------------------------------- workloads
def workloads(device: str, size: str, dtypes, backends):
    """The fused qkv projection of 1 window (and 4 on the GPU) with LoRA r=16 on all of it, forward
    (and forward + backward into x, A and B on the CPU): the op per backend against the base GEMM
    alone (the floor, another function: timed, not checked), peft's unfused path, the [W; A] +
    expand layout and merged weights (W + s*B@A folded once, outside the timing). FLOPs: the base
    GEMM's 2*M*K*N (the rank-r shrink and expand add 2*M*r*(K+N)); bytes: read x, W, b, A, B once,
    write the output."""
    dims = {"tokens": 64, "k": 48, "n": 96, "rank": 4} if size == "tiny" else dict(LORA_QKV)
    for windows in (1,) if size == "cpu" else (1, 4):
        for dtype in dtypes:
            args = qkv_inputs(windows * dims["tokens"], dims["k"], dims["n"], dims["rank"], dtype, device)
            yield from _qkv_workloads(args, backends, train=size == "cpu")


def _qkv_workloads(args, backends, train: bool):
    x, w, b, a, lb, scale = args
    expected = Expected(lambda dt: lora_linear_ref(*cast_floats(args, dt)))
    wa = torch.cat([w, a], 0)
    merged = w + scale * lb @ a
    # the ref backend is peft_unfused's formula again: timed once, as peft_unfused
    ours = {f"segevol_fast_{bk}": functools.partial(_on, bk) for bk in backends if bk != "ref"}
    forward = {
        "base_gemm_only": Provider(lambda: F.linear(x, w, b), None),
        "peft_unfused": Provider(lambda: peft_unfused(*args), expected),
        "stacked_wa_then_expand": Provider(lambda: stacked_wa_then_expand(x, wa, b, lb, scale), expected),
        "merged_weights": Provider(lambda: F.linear(x, merged, b), expected),
        **{name: Provider(functools.partial(f, *args), expected) for name, f in ours.items()},
    }
    row = {"shape": [x.shape[0], x.shape[1], w.shape[0]], "rank": a.shape[0], "dtype": str(x.dtype)}
    cost = {
        "flops": 2.0 * x.shape[0] * x.shape[1] * w.shape[0],
        "min_bytes": (sum(t.numel() for t in (x, w, b, a, lb)) + x.shape[0] * w.shape[0]) * x.element_size(),
    }
    yield Workload(row={**row, "passes": "forward"}, providers=forward, rounds=30, **cost)
    if train:
        steps = {
            name: Provider(_train_step(f, args), expected) for name, f in {"peft_unfused": peft_unfused, **ours}.items()
        }
        yield Workload(row={**row, "passes": "forward_backward"}, providers=steps, rounds=10, **cost)


def _on(backend, *args):
    with use_backend(backend):
        return lora_linear(*args)


def _train_step(f, args):
    """f's output after a backward of its sum into x, A and B (W and the bias frozen)."""
    x, w, b, a, lb, scale = args

    def step():
        leaves = [t.detach().requires_grad_(True) for t in (x, a, lb)]
        out = f(leaves[0], w, b, leaves[1], leaves[2], scale)
        out.sum().backward()
        return out.detach()

    return step


SPEC = OpSpec(
    name="lora_linear",
    fn=lora_linear,
    ref=lora_linear_ref,
    op=OP,
    cases=CASES,
    make_args=make_args,
    grad_args=(0, 2, 3, 4),
    tiny_case=((2, 3), 5, 7, 2, (2, 6)),
    workloads=workloads,
    baseline="base_gemm_only",
    speedup=False,
)
