"""Whole GPU check-and-time suite, in one call on a CUDA machine.

    python3 bench/gpu_suite.py [--out DIR]

For every op and every backend that can run on the GPU it (1) checks the result against a float64
reference with the same 2x rule the tests use, then (2) times it next to the baselines of
bench/harness.py, and writes `<DIR>/<device>-<date>.json` (default DIR: bench/results) with the
device name, versions, median times, TFLOP/s, GB/s and % of the device's peak. Nothing here is
extrapolated: a provider that fails its check is recorded as failed and not timed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pathlib
import platform
import sys

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.environment import device_slug  # noqa: E402
from bench.harness import (  # noqa: E402
    LORA_QKV,
    SEGVOL_WINDOW,
    attention_case,
    attention_providers,
    lora_linear_case,
    lora_linear_providers,
    patch_embed_case,
    patch_embed_providers,
    routed_case,
    routed_providers,
)
from segevol_fast import info, ops  # noqa: E402

# Dense tensor-core and HBM peaks (shared/reference/perf-and-style-anchors.md §1.1).
PEAKS = {
    "H100 SXM": {"tflops_16bit": 989.4, "tflops_fp32": 66.9, "tb_s": 3.35},
    "H100 PCIe": {"tflops_16bit": 756.0, "tflops_fp32": 51.0, "tb_s": 2.0},
    "H200": {"tflops_16bit": 989.4, "tflops_fp32": 66.9, "tb_s": 4.8},
}


def peak_for(name: str) -> dict | None:
    if "H200" in name:
        return PEAKS["H200"]
    if "H100" in name:
        return PEAKS["H100 PCIe" if "PCIe" in name else "H100 SXM"]
    return None


def median_ms(fn, warmup: int = 10, reps: int = 50) -> float:
    """Median of CUDA-event timings (L2 is not flushed: windows reuse weights in practice too)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def check(out: torch.Tensor, same: torch.Tensor, exact: torch.Tensor) -> tuple[bool, float, float]:
    err = (out.double() - exact).abs().max().item()
    ref_err = (same.double() - exact).abs().max().item()
    floor = (2e-3 if out.dtype == torch.float32 else 1e-2) * exact.abs().max().item()
    return err <= 2 * ref_err + floor, err, ref_err


def measure(row: dict, fn, same, exact, flops: float, nbytes: float, peak: dict | None, timed: bool) -> dict:
    """Check `fn()` against the float64 `exact` (2x the same-dtype reference's error + floor), then
    time it; a provider that raises or fails the check is recorded and not timed. `same=None`: a
    baseline computing something else (the base GEMM alone), run and timed but not checked.
    `timed=False` checks only (what the CPU test of this suite runs)."""
    try:
        out = fn()
        ok, err, ref_err = (True, None, None) if same is None else check(out, same, exact)
    except Exception as exc:  # record, keep going: one broken provider must not hide the rest
        return {**row, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    row = {**row, "ok": ok, "checked": same is not None, "max_err": err, "same_dtype_ref_err": ref_err}
    if ok and timed:
        ms = median_ms(fn)
        tflops, gbs = flops / ms / 1e9, nbytes / ms / 1e6
        row.update(median_ms=ms, tflops=tflops, gb_s=gbs)
        if peak:
            key = "tflops_fp32" if row["dtype"] == str(torch.float32) else "tflops_16bit"
            row.update(pct_peak_flops=100 * tflops / peak[key], pct_peak_bw=100 * gbs / (1000 * peak["tb_s"]))
    return row


def ratios(rows: list[dict], baseline: str, speedup: bool = True) -> None:
    """Per case (op, shape, dtype, passes, kv_len): `speedup_vs_<baseline>` = baseline median / row
    median, or with speedup=False `time_vs_<baseline>` = row median / baseline median."""
    def case(r):
        return tuple(str(r.get(k)) for k in ("op", "shape", "dtype", "passes", "kv_len"))
    key = f"{'speedup' if speedup else 'time'}_vs_{baseline}"
    base = {case(r): r["median_ms"] for r in rows if r["provider"] == baseline and "median_ms" in r}
    for r in rows:
        if "median_ms" in r and case(r) in base:
            r[key] = base[case(r)] / r["median_ms"] if speedup else r["median_ms"] / base[case(r)]


DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _backends(op: str, device: str) -> list[str]:
    return [b for b in ops.available_backends(op, device) if b != "ref"]


def run_patch_embed(peak: dict | None, device: str = "cuda", small: bool = False, timed: bool = True,
                    dtypes=DTYPES) -> list[dict]:
    rows = []
    shape, embed = ((1, 1, 8, 32, 32), 32) if small else (SEGVOL_WINDOW["shape"], SEGVOL_WINDOW["embed"])
    for batch in (1, 4):
        for dtype in dtypes:
            c = patch_embed_case(shape=(batch, *shape[1:]), embed=embed, dtype=dtype, device=device)
            exact = ops.patch_embed_ref(c.x.double(), c.weight.double(), c.bias.double(), c.pos.double(), c.patch)
            same = ops.patch_embed_ref(c.x, c.weight, c.bias, c.pos, c.patch)
            for name, fn in patch_embed_providers(c, _backends("patch_embed", device)).items():
                row = {"op": "patch_embed", "provider": name, "shape": list(c.x.shape), "dtype": str(dtype)}
                rows.append(measure(row, fn, same, exact, c.flops, c.min_bytes, peak, timed))
    ratios(rows, "monai_rearrange_linear")
    return rows


def run_flash_attention(peak: dict | None, device: str = "cuda", small: bool = False, timed: bool = True,
                    dtypes=DTYPES) -> list[dict]:
    """Encoder attention of 1 and 4 windows (12 heads x 2048 x 64), and the context-prior case
    (2048 + 16 keys, kv_len masking the padding), forward and forward+backward, against SDPA's
    flash / memory-efficient / cuDNN kernels. FLOPs: 4*B*H*Sq*Sk*D forward, x3.5 forward+backward."""
    rows = []
    heads, seq, hd = (2, 40, 16) if small else (12, 2048, 64)
    cases = [(1, seq, None), (4, seq, None), (4, seq + 16, seq)]
    for batch, sk, kv in cases:
        for dtype in dtypes:
            c = attention_case(batch, heads, seq, sk, hd, kv, dtype=dtype, device=device)
            exact = c.reference(torch.float64)
            same = c.reference(dtype)
            for passes in ("forward", "forward_backward"):
                mult = 1.0 if passes == "forward" else 3.5
                for name, fn in attention_providers(c, _backends("flash_attention", device), passes).items():
                    row = {"op": "flash_attention", "provider": name, "shape": [batch, heads, seq, sk, hd],
                           "kv_len": kv, "dtype": str(dtype), "passes": passes}
                    rows.append(measure(row, fn, same, exact, mult * c.flops, c.min_bytes, peak, timed))
    ratios(rows, "sdpa_flash")
    return rows


def run_lora_linear(peak: dict | None, device: str = "cuda", small: bool = False, timed: bool = True,
                    dtypes=DTYPES) -> list[dict]:
    """The fused qkv projection of 1 and 4 windows with LoRA r=16 against the base GEMM alone (the
    floor), peft's unfused path and merged weights (W + s*B@A folded once, outside the timing)."""
    rows = []
    dims = dict(tokens=64, k=48, n=96, rank=4) if small else dict(LORA_QKV)
    for windows in (1, 4):
        for dtype in dtypes:
            c = lora_linear_case(**{**dims, "tokens": windows * dims["tokens"]}, dtype=dtype, device=device)
            exact = ops.lora_linear_ref(*(t.double() for t in (c.x, c.weight, c.bias, c.lora_a, c.lora_b)), c.scale)
            same = ops.lora_linear_ref(c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.scale)
            providers = lora_linear_providers(c, _backends("lora_linear", device))
            merged = c.weight + c.scale * c.lora_b @ c.lora_a
            providers["merged_weights"] = lambda c=c, merged=merged: torch.nn.functional.linear(c.x, merged, c.bias)
            for name, fn in providers.items():
                row = {"op": "lora_linear", "provider": name, "shape": [c.x.shape[0], c.x.shape[1], c.weight.shape[0]],
                       "rank": c.lora_a.shape[0], "dtype": str(dtype)}
                # the base GEMM alone is the floor, another function: timed, not checked
                ref = (same, exact) if name != "base_gemm_only" else (None, None)
                rows.append(measure(row, fn, *ref, c.flops, c.min_bytes, peak, timed))
    ratios(rows, "base_gemm_only", speedup=False)
    return rows


def run_routed_lora_linear(peak: dict | None, device: str = "cuda", small: bool = False, timed: bool = True,
                    dtypes=DTYPES) -> list[dict]:
    """4 windows, each routed to its own of 4 adapters (and soft gates over the 4), against the
    same batch through one adapter (target: <= 1.1x), a per-window loop and the base GEMM."""
    rows = []
    dims = dict(tokens=32, k=48, n=96, rank=4) if small else dict(LORA_QKV)
    for dtype in dtypes:
        c = routed_case(**dims, dtype=dtype, device=device)
        o = c.one
        d64 = [t.double() for t in (o.x, o.weight, o.bias, c.lora_a, c.lora_b)]
        exact = ops.routed_lora_linear_ref(*d64, c.segments, adapter_idx=c.adapter_idx, scale=o.scale)
        same = ops.routed_lora_linear_ref(o.x, o.weight, o.bias, c.lora_a, c.lora_b, c.segments,
                                          adapter_idx=c.adapter_idx, scale=o.scale)
        soft_exact = ops.routed_lora_linear_ref(*d64, c.segments, gates=c.gates.double(), scale=o.scale)
        soft_same = ops.routed_lora_linear_ref(o.x, o.weight, o.bias, c.lora_a, c.lora_b, c.segments, gates=c.gates,
                                               scale=o.scale)
        for name, fn in routed_providers(c, _backends("routed_lora_linear", device)).items():
            row = {"op": "routed_lora_linear", "provider": name, "shape": [o.x.shape[0], o.x.shape[1], o.weight.shape[0]],
                   "adapters": c.lora_a.shape[0], "dtype": str(dtype)}
            if name.endswith("_soft"):
                ref = (soft_same, soft_exact)
            elif name in ("base_gemm_only", "one_adapter_lora_linear"):
                ref = (None, None)  # other functions: timed as baselines, not checked here
            else:
                ref = (same, exact)
            rows.append(measure(row, fn, *ref, o.flops, o.min_bytes, peak, timed))
    ratios(rows, "one_adapter_lora_linear", speedup=False)
    return rows


RUNS = {"patch_embed": run_patch_embed, "flash_attention": run_flash_attention, "lora_linear": run_lora_linear,
        "routed_lora_linear": run_routed_lora_linear}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results"))
    parser.add_argument("--ops", nargs="+", default=list(RUNS), choices=list(RUNS))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA device; nothing measured.", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    peak = peak_for(name)
    rows = []
    for op in args.ops:
        rows += RUNS[op](peak)
    result = {
        "device": name,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "peak_assumed": peak,
        "info": info(),
        "results": rows,
    }
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{device_slug('cuda')}-{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    for r in rows:
        t = f"{r['median_ms']:.3f} ms  {r['tflops']:.1f} TFLOP/s  {r['gb_s']:.0f} GB/s" if "median_ms" in r else r.get("error", "FAILED CHECK")
        print(f"{r['op']:18s} {r['provider']:32s} {str(r['shape']):26s} {r['dtype']:15s} {r.get('passes', ''):16s} {t}")
    print(f"wrote {path}")
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
