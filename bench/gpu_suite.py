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
import re
import sys

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import patch_embed_case, patch_embed_providers  # noqa: E402
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


def run_patch_embed(peak: dict | None) -> list[dict]:
    rows = []
    backends = [b for b in ops.available_backends("patch_embed", "cuda") if b != "ref"]
    for batch in (1, 4):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            c = patch_embed_case(shape=(batch, 1, 32, 256, 256), dtype=dtype, device="cuda")
            exact = ops.patch_embed_ref(c.x.double(), c.weight.double(), c.bias.double(), c.pos.double(), c.patch)
            same = ops.patch_embed_ref(c.x, c.weight, c.bias, c.pos, c.patch)
            for name, fn in patch_embed_providers(c, backends).items():
                row = {"op": "patch_embed", "provider": name, "shape": list(c.x.shape), "dtype": str(dtype)}
                try:
                    ok, err, ref_err = check(fn(), same, exact)
                except Exception as exc:  # record, keep going: one broken provider must not hide the rest
                    rows.append({**row, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
                    continue
                row.update(ok=ok, max_err=err, same_dtype_ref_err=ref_err)
                if ok:
                    ms = median_ms(fn)
                    tflops = c.flops / ms / 1e9
                    gbs = c.min_bytes / ms / 1e6
                    row.update(median_ms=ms, tflops=tflops, gb_s=gbs)
                    if peak:
                        key = "tflops_fp32" if dtype == torch.float32 else "tflops_16bit"
                        row.update(pct_peak_flops=100 * tflops / peak[key], pct_peak_bw=100 * gbs / (1000 * peak["tb_s"]))
                rows.append(row)
            base = {r["dtype"]: r for r in rows if r["provider"] == "monai_rearrange_linear" and r["shape"][0] == batch}
            for r in rows:
                b = base.get(r["dtype"])
                if r["shape"][0] == batch and b and "median_ms" in r and "median_ms" in b:
                    r["speedup_vs_monai"] = b["median_ms"] / r["median_ms"]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA device; nothing measured.", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    peak = peak_for(name)
    rows = run_patch_embed(peak)
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
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
    path = out_dir / f"{slug}-{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    for r in rows:
        t = f"{r['median_ms']:.3f} ms  {r['tflops']:.1f} TFLOP/s  {r['gb_s']:.0f} GB/s" if "median_ms" in r else r.get("error", "FAILED CHECK")
        print(f"{r['op']:12s} {r['provider']:28s} {str(r['shape']):22s} {r['dtype']:15s} {t}")
    print(f"wrote {path}")
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
