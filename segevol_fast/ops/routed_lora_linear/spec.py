"""routed_lora_linear's spec: contract cases and benchmark workloads (see ops/_spec.py)."""

from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F

from .._backend import use_backend
from .._spec import Expected, OpSpec, Provider, Workload, cast_floats
from ..lora_linear.op import lora_linear
from ..lora_linear.spec import LORA_QKV, qkv_inputs
from .op import OP, routed_lora_linear, routed_lora_linear_ref

# (segment lengths, K, N, r, E, "soft" or adapter per segment): soft mixtures (the first case and
# the tiny case, so gates are a grad arg everywhere) and hard routing with a base-only (-1) and an
# empty segment; odd K/N/rows
CASES = [((7, 0, 12), 37, 45, 5, 3, "soft"), ((5, 9, 0, 4), 20, 18, 2, 3, [2, -1, 0, 2]), ((33,), 24, 51, 16, 2, [1])]

# A mixed batch of four windows (say CT, MR T1, MR T2, PET), each routed to its own LoRA adapter.
ROUTED = {"segments": 4, "adapters": 4}


def make_args(case, device: str) -> tuple:
    """(x, weight, bias, lora_a, lora_b, segments, adapter_idx, gates, scale), floats in float64."""
    lengths, K, N, r, E, routing = case
    f64 = {"device": device, "dtype": torch.float64}
    M = sum(lengths)
    segments = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
    x = torch.randn(M, K, **f64)
    w = torch.randn(N, K, **f64) / K**0.5
    a = torch.randn(E, r, K, **f64) / K**0.5
    b = torch.randn(E, N, r, **f64) / r**0.5
    if routing == "soft":
        idx, gates = None, torch.softmax(torch.randn(len(lengths), E, **f64), -1)
    else:
        idx, gates = torch.tensor(routing, device=device), None
    return (x, w, torch.randn(N, **f64), a, b, segments, idx, gates, 0.7)


# ---------------------------------------------------------------------------- workloads
def workloads(device: str, size: str, dtypes, backends):
    """Four windows of a mixed batch, each routed to its own of four LoRA adapters (hard) or a
    gate-weighted mix of all four (soft), on the fused qkv projection (4 x 2048 tokens, 768 -> 2304,
    r = 16): the op per backend against every row through ONE adapter (`lora_linear`, the
    target's denominator: the mixed batch <= 1.1x it), a Python loop of one `lora_linear` call per
    window (what serving without a routed op does) and the base GEMM alone; the last two compute
    other functions and are timed, not checked. Cost model: lora_linear's on all rows."""
    dims = {"tokens": 32, "k": 48, "n": 96, "rank": 4} if size == "tiny" else dict(LORA_QKV)
    S, E, tokens, k, n, rank = (
        ROUTED["segments"],
        ROUTED["adapters"],
        dims["tokens"],
        dims["k"],
        dims["n"],
        dims["rank"],
    )
    for dtype in dtypes:
        x, w, b, a0, b0, scale = qkv_inputs(S * tokens, k, n, rank, dtype, device)
        g = torch.Generator().manual_seed(1)
        more_a = torch.randn(E - 1, rank, k, generator=g).to(device=device, dtype=dtype) / k**0.5
        more_b = torch.randn(E - 1, n, rank, generator=g).to(device=device, dtype=dtype) / rank**0.5
        lora_a, lora_b = torch.cat([a0[None], more_a]), torch.cat([b0[None], more_b])
        segments = torch.arange(S + 1, dtype=torch.int64, device=device) * tokens
        idx = torch.arange(S, dtype=torch.int64, device=device) % E
        gates = torch.softmax(torch.randn(S, E, generator=g), dim=-1).to(device=device, dtype=dtype)
        yield _mixed_batch((x, w, b, lora_a, lora_b, segments), idx, gates, scale, (a0, b0), backends)


def _mixed_batch(layer, idx, gates, scale, first_adapter, backends) -> Workload:
    """The workload of one mixed batch: `layer` = (x, W, b, A_stack, B_stack, segments)."""
    x, w, b, lora_a, lora_b, segments = layer
    a0, b0 = first_adapter
    hard = (*layer, idx, None, scale)
    soft = (*layer, None, gates, scale)
    hard_expected = Expected(lambda dt: routed_lora_linear_ref(*cast_floats(hard, dt)))
    soft_expected = Expected(lambda dt: routed_lora_linear_ref(*cast_floats(soft, dt)))
    bounds = segments.tolist()

    def per_segment_loop():
        out = x.new_empty((x.shape[0], w.shape[0]))
        for s, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            e = int(idx[s])
            out[lo:hi] = lora_linear(x[lo:hi], w, b, lora_a[e], lora_b[e], scale)
        return out

    providers = {
        "base_gemm_only": Provider(lambda: F.linear(x, w, b), None),
        "one_adapter_lora_linear": Provider(lambda: lora_linear(x, w, b, a0, b0, scale), None),
        "per_segment_loop": Provider(per_segment_loop, hard_expected),
    }
    for bk in backends:
        if bk == "ref":
            continue  # a loop over segments and adapters: the definition, not a contender
        providers[f"segevol_fast_{bk}_hard"] = Provider(functools.partial(_on, bk, hard), hard_expected)
        providers[f"segevol_fast_{bk}_soft"] = Provider(functools.partial(_on, bk, soft), soft_expected)
    M, K = x.shape
    N = w.shape[0]
    return Workload(
        row={"shape": [M, K, N], "adapters": lora_a.shape[0], "dtype": str(x.dtype)},
        flops=2.0 * M * K * N,
        min_bytes=(sum(t.numel() for t in (x, w, b, a0, b0)) + M * N) * x.element_size(),
        providers=providers,
        rounds=20,
    )


def _on(backend, args):
    with use_backend(backend):
        return routed_lora_linear(*args)


SPEC = OpSpec(
    name="routed_lora_linear",
    fn=routed_lora_linear,
    ref=routed_lora_linear_ref,
    op=OP,
    cases=CASES,
    make_args=make_args,
    grad_args=(0, 2, 3, 4, 7),
    tiny_case=((2, 0, 3), 5, 7, 2, 3, "soft"),
    workloads=workloads,
    baseline="one_adapter_lora_linear",
    speedup=False,
)
