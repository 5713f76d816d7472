"""What SegVol costs to run: wall time, peak memory and windows for S / M / L scans, 1 and 15
organs, segevol_fast's fast mode vs exact mode (the official algorithm).

    python bench/resource_table.py                          # (make bench-resources) every case
    python bench/resource_table.py --sizes S --timeout 900   # some cases; a case past the timeout is recorded as such
    python bench/resource_table.py --device cuda             # on a GPU: peak is then device memory

S is the shared abdominal CT (122x101x30), M and L are synthetic int16 CTs from `make_phantom`
(512x512x300 and 512x512x800), written to NIfTI first and read back as a user's scan would be.
Each case runs in a fresh process (`fresh_process.py`): its ru_maxrss is its own peak, reading
included. Full-size `SegVolConfig()` with random weights (the official weights are not available
here): coarse masks of random weights are large, so zoom-in window counts, which drive the time,
are recorded with every case. Results -> bench/results/<device>-resources-<date>.json ($OUT when
set, as on a lent GPU machine).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.environment import device_slug, environment, write_results  # noqa: E402
from bench.fresh_process import report, run_child  # noqa: E402
from bench.shared_data import ABDOMINAL_ORGANS, DATA  # noqa: E402

ORGANS = ABDOMINAL_ORGANS
SIZES = {"S": None, "M": (512, 512, 300), "L": (512, 512, 800)}


def _scan(size: str) -> pathlib.Path:
    if SIZES[size] is None:
        return DATA / "ct_abdomen_sm.nii.gz"
    shape = SIZES[size]
    path = pathlib.Path(tempfile.gettempdir()) / "segevol_fast_phantom_{}x{}x{}.nii.gz".format(*shape)
    if not path.exists():  # made in a process of its own: making it takes several GB
        subprocess.run([sys.executable, __file__, "--make", size], check=True, cwd=REPO)
    return path


def _make(size: str) -> None:
    from segevol_fast.io import save_nifti
    from segevol_fast.phantom import make_phantom

    shape = SIZES[size]
    vol, _, _ = make_phantom(shape=shape, seed=0)
    save_nifti(
        pathlib.Path(tempfile.gettempdir()) / "segevol_fast_phantom_{}x{}x{}.nii.gz".format(*shape),
        vol.array,
        vol.affine,
    )


def _case(size: str, organs: int, mode: str, device: str) -> dict:
    import torch

    from segevol_fast import SegVol, SegVolConfig

    torch.manual_seed(0)
    model = SegVol(SegVolConfig(), tokenizer=DATA / "clip_tokenizer").eval().to(device)
    model.weights_source = "random (benchmark)"
    scan = _scan(size)
    t = time.perf_counter()
    res = model.segment(scan, text=ORGANS[:organs], mode=mode, progress=False, device=device)
    wall = time.perf_counter() - t
    return {
        "size": size,
        "scan": scan.name,
        "organs": organs,
        "mode": mode,
        "device": device,
        "wall_s": wall,
        "peak_in_call_bytes": res.peak_memory_bytes,
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "windows": res.zoom_in_windows,
        "timings": res.timings,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--organs", nargs="+", type=int, default=[1, 15])
    p.add_argument("--modes", nargs="+", default=["fast", "exact"], choices=["fast", "exact"])
    p.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]; on CUDA the peak is device memory")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results"))
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--make", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.make:
        _make(args.make)
        return 0
    if args.child:
        size, organs, mode = args.child
        report(_case(size, int(organs), mode, args.device))
        return 0

    rows = []
    for size in args.sizes:
        _scan(size)  # make the phantom here, outside every case's timeout and timing
        for organs in args.organs:
            for mode in args.modes:
                t = time.perf_counter()
                try:
                    row = run_child(
                        __file__,
                        ["--child", size, str(organs), mode, "--device", args.device],
                        cwd=REPO,
                        timeout=args.timeout,
                    )
                except subprocess.TimeoutExpired:
                    row = {
                        "size": size,
                        "organs": organs,
                        "mode": mode,
                        "error": f"not finished within {args.timeout:.0f} s",
                    }
                row["case_wall_s"] = time.perf_counter() - t
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "timings"})[:300], flush=True)
    out = environment(config="SegVolConfig() official size, random weights", device=device_slug(args.device), rows=rows)
    cases = "".join(args.sizes)  # a subset of organs/modes gets its own file, never overwriting a full run
    if args.organs != [1, 15] or args.modes != ["fast", "exact"]:
        cases += "-" + "-".join(map(str, args.organs)) + "organs-" + "-".join(args.modes)
    write_results(out, args.out, f"{device_slug(args.device)}-resources", cases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
