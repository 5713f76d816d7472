"""Whole GPU check-and-time suite, in one call on a CUDA machine.

    python3 bench/gpu_suite.py [--out DIR]

For every op and every backend that can run on the GPU it (1) checks the result against a float64
reference with the same 2x rule the tests use, then (2) times it next to the baselines of
its spec (segevol_fast/ops/<op>/spec.py), and writes `<DIR>/<device>-<date>.json` (default DIR: bench/results) with the
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
from bench.harness import check, suite_backends  # noqa: E402
from segevol_fast import info  # noqa: E402
from segevol_fast.ops._spec import OpSpec, Provider, all_specs  # noqa: E402

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


def measure(row: dict, provider: Provider, flops: float, nbytes: float, peak: dict | None, timed: bool) -> dict:
    """Check the provider's output against the float64 reference (2x the same-dtype reference's
    error + floor), then time it; a provider that raises or fails the check is recorded and not
    timed. A provider without an expected answer (a floor computing something else, such as the
    base GEMM alone) is run and timed but not checked. `timed=False` checks only (what the CPU
    test of this suite runs)."""
    try:
        out = provider.fn()
        expected = provider.expected
        ok, err, ref_err = (True, None, None) if expected is None else check(out, expected.same, expected.exact)
    except Exception as exc:  # record, keep going: one broken provider must not hide the rest
        return {**row, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    row = {**row, "ok": ok, "checked": provider.expected is not None, "max_err": err, "same_dtype_ref_err": ref_err}
    if ok and timed:
        ms = median_ms(provider.fn)
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


def run_op(
    spec: OpSpec, peak: dict | None, device: str = "cuda", small: bool = False, timed: bool = True, dtypes=DTYPES
) -> list[dict]:
    """Every workload of the op's spec (its "tiny" size when `small`) x every provider: checked,
    then timed; ratios against the spec's baseline."""
    rows = []
    size = "tiny" if small else "gpu"
    for w in spec.workloads(device, size, dtypes, suite_backends(spec.name, device)):
        for name, provider in w.providers.items():
            row = {"op": spec.name, "provider": name, **w.row}
            rows.append(measure(row, provider, w.flops, w.min_bytes, peak, timed))
    ratios(rows, spec.baseline, speedup=spec.speedup)
    return rows


SPECS = {s.name: s for s in all_specs()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results"))
    parser.add_argument("--ops", nargs="+", default=list(SPECS), choices=list(SPECS))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA device; nothing measured.", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    peak = peak_for(name)
    rows = []
    for op in args.ops:
        rows += run_op(SPECS[op], peak)
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
        t = (
            f"{r['median_ms']:.3f} ms  {r['tflops']:.1f} TFLOP/s  {r['gb_s']:.0f} GB/s"
            if "median_ms" in r
            else r.get("error", "FAILED CHECK")
        )
        print(f"{r['op']:18s} {r['provider']:32s} {str(r['shape']):26s} {r['dtype']:15s} {r.get('passes', ''):16s} {t}")
    print(f"wrote {path}")
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
