"""Check the memory planner's estimate against the measured peak of whole `segment()` calls.

    python bench/calibrate_segment.py                 # every case, CPU, full-size SegVolConfig
    python bench/calibrate_segment.py --cases ct_text1 exact_text1

Each case runs in a fresh Python process: build the full-size model (random weights), run ONE
`segment()` call, and report the estimate the call planned with (`res.plan["estimated_peak_bytes"]`,
fast and exact mode alike) against the call's measured peak RSS: the larger of the peak `segment()`
samples (`res.peak_memory_bytes`) and the process's `ru_maxrss` when that grew during the call
(ru_maxrss cannot miss a spike; the sampler can). Both are absolute process figures, weights included,
like the estimate.

The planner's promise is estimate >= measured (a plan within its budget stays within it) and
estimate <= 1.25 x measured (it does not refuse budgets the call would meet). The script exits 1
when any case falls outside [1.0, 1.25]. Results: bench/results/cpu-memory-calibration-<date>.json.
Cases run one at a time: on a shared 2-core machine each takes 10-40 s.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the package and bench.* from this checkout, child or parent

from bench.environment import environment, write_results  # noqa: E402
from bench.fresh_process import report, run_child  # noqa: E402
from bench.shared_data import ABDOMINAL_ORGANS, DATA  # noqa: E402

ORGANS = ABDOMINAL_ORGANS[:10]
CT = "ct_abdomen_sm.nii.gz"  # 122 x 101 x 30 int16: one zoom-in window per prompt at most
BOXES = [[30, 20, 5, 80, 70, 25], [10, 10, 2, 60, 50, 20]]  # input voxels, inclusive
LOW, HIGH = 1.0, 1.25

# name -> (volume under DATA, segment() keyword arguments)
CASES = {
    "ct_text1": (CT, dict(text=ORGANS[:1])),
    "ct_text4": (CT, dict(text=ORGANS[:4])),
    "ct_text10": (CT, dict(text=ORGANS)),
    "ct_box2": (CT, dict(box=BOXES)),
    "ct_text4_no_zoom": (CT, dict(text=ORGANS[:4], zoom_in=False)),
    "ct_text4_probs": (CT, dict(text=ORGANS[:4], return_probabilities=True)),
    "dicom_text4": ("ct_abdomen_dicom", dict(text=ORGANS[:4])),
    "exact_text1": (CT, dict(text=ORGANS[:1], mode="exact")),
    "exact_text4": (CT, dict(text=ORGANS[:4], mode="exact")),
    "exact_box1": (CT, dict(box=BOXES[0], mode="exact")),
    "exact_text1_no_zoom": (CT, dict(text=ORGANS[:1], mode="exact", zoom_in=False)),
}
QUICK = ["ct_text1", "ct_text4", "ct_text10", "ct_box2", "ct_text4_no_zoom", "exact_text1", "exact_box1"]


def _child(name: str) -> dict:
    import resource

    import torch

    from segevol_fast import SegVol, SegVolConfig

    src, kw = CASES[name]
    torch.manual_seed(0)
    model = SegVol(SegVolConfig(), tokenizer=DATA / "clip_tokenizer").eval()
    model.weights_source = "random (calibration)"  # masks are meaningless; only memory is measured
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res = model.segment(DATA / src, progress=False, **kw)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    measured = max(res.peak_memory_bytes, after if after > before else 0)
    return {
        "case": name,
        "volume": src,
        "kwargs": kw,
        "estimate_bytes": res.plan["estimated_peak_bytes"],
        "measured_bytes": measured,
        "sampled_peak_bytes": res.peak_memory_bytes,
        "ru_maxrss_bytes": after,
        "ru_maxrss_before_call_bytes": before,
        "plan": res.plan,
        "zoom_in_windows": res.zoom_in_windows,
        "seconds": res.timings["total"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK}")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        report(_child(args.child))
        return 0

    rows, failed = [], []
    for name in QUICK if args.quick else args.cases:
        row = run_child(__file__, ["--child", name], cwd=REPO)
        if "error" in row:
            print(f"{name}: FAILED\n{row['error']}", file=sys.stderr)
            failed.append(name)
            continue
        row["estimate_over_measured"] = row["estimate_bytes"] / row["measured_bytes"]
        rows.append(row)
        ok = LOW <= row["estimate_over_measured"] <= HIGH
        print(
            f"{name:20s} measured {row['measured_bytes'] / 1e6:7.1f} MB  "
            f"estimate {row['estimate_bytes'] / 1e6:7.1f} MB  ratio {row['estimate_over_measured']:.3f} "
            f"{'ok' if ok else 'OUT OF [1.0, 1.25]'}",
            flush=True,
        )
        if not ok:
            failed.append(name)
    out = environment(
        bounds=[LOW, HIGH],
        cases=rows,
        config="SegVolConfig() official size, random weights, float32, whole segment() calls",
    )
    write_results(out, args.out, "cpu-memory-calibration")
    if failed:
        print(f"outside [{LOW}, {HIGH}] or failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
