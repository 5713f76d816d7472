"""End-to-end segment() benchmarks on the real volumes (full-size SegVolConfig, random weights).

    python bench/segment_bench.py                 # every case, results -> bench/results/
    python bench/segment_bench.py --cases ct fast_vs_exact

Each case runs in a fresh Python process, so its `ru_maxrss` is the peak of that case alone; the
in-call peak sampled by `segment()` is reported too. Random weights make the masks meaningless but
leave speed and memory representative (the number of zoom-in windows depends on the coarse masks,
so it is recorded with every run). Nothing here is extrapolated.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the package and bench.* from this checkout, child or parent

from bench.environment import environment, write_results  # noqa: E402
from bench.fresh_process import report, run_child  # noqa: E402
from bench.shared_data import ABDOMINAL_ORGANS, DATA  # noqa: E402

CT_ORGANS = ABDOMINAL_ORGANS[:10]


def _model(seed: int = 0):
    import torch

    from segevol_fast import SegVol, SegVolConfig

    torch.manual_seed(seed)
    model = SegVol(SegVolConfig(), tokenizer=DATA / "clip_tokenizer").eval()
    model.weights_source = "random (benchmark)"  # silence the notice: these runs measure speed only
    return model


def _run_segment(model, volume, **kw) -> dict:
    t = time.perf_counter()
    res = model.segment(volume, progress=False, **kw)
    return {
        "seconds": time.perf_counter() - t,
        "timings": res.timings,
        "peak_in_call_bytes": res.peak_memory_bytes,
        "volumes_ml": res.volumes_ml(),
        "mode": res.mode,
        "precision": res.precision,
        "zoom_in_windows": res.zoom_in_windows,
        "plan": res.plan,
    }


def case_volume(name: str) -> dict:
    """One fast call with several prompts on a real volume."""
    model = _model()
    if name == "ct":
        src, kw = DATA / "ct_abdomen_sm.nii.gz", dict(text=CT_ORGANS[:4])
    elif name == "dicom":
        src, kw = DATA / "ct_abdomen_dicom", dict(text=CT_ORGANS[:4])
    elif name == "mri_brain":
        src, kw = (
            DATA / "mr_brain_mni152_t1.nii.gz",
            dict(text=["brain", "gray matter", "white matter"], modality="mri"),
        )
    else:
        raise ValueError(name)
    return {"input": str(src), **_run_segment(model, src, **kw)}


SYNTHETIC_SHAPE = (512, 512, 300)


def _make_synthetic(path: pathlib.Path) -> None:
    from segevol_fast.io import save_nifti
    from segevol_fast.phantom import make_phantom

    vol, _, _ = make_phantom(shape=SYNTHETIC_SHAPE, seed=0)
    save_nifti(path, vol.array, vol.affine)


def case_synthetic512() -> dict:
    """segment() reads the phantom from a NIfTI file in a process that did nothing else before but
    build the model, so this process's ru_maxrss bounds the whole call, reading included (making
    the phantom takes ~3 GB: it runs in a process of its own)."""
    path = pathlib.Path(tempfile.gettempdir()) / "segevol_fast_phantom_{}x{}x{}.nii.gz".format(*SYNTHETIC_SHAPE)
    if not path.exists():
        subprocess.run([sys.executable, __file__, "--make-synthetic", str(path)], check=True, cwd=REPO)
    from segevol_fast.inference.memory import current_rss

    model = _model()
    rss_before = current_rss()
    out = _run_segment(model, path, text=["liver"], max_memory="2GB")
    return {
        "input": f"phantom {SYNTHETIC_SHAPE} int16 CT, read from {path.name}",
        "max_memory": "2GB",
        "rss_before_call_bytes": rss_before,
        **out,
    }


def case_fast_vs_exact() -> dict:
    src = DATA / "ct_abdomen_sm.nii.gz"
    model = _model()
    _run_segment(model, src, text=CT_ORGANS[0], zoom_in=False)  # warm-up (oneDNN/allocator first use), untimed
    fast10 = _run_segment(model, src, text=CT_ORGANS)
    exact10 = [_run_segment(model, src, text=organ, mode="exact") for organ in CT_ORGANS]
    fast1 = _run_segment(model, src, text=CT_ORGANS[0])
    exact_seconds = sum(r["seconds"] for r in exact10)
    return {
        "input": str(src),
        "organs": CT_ORGANS,
        "fast_10_in_one_call_s": fast10["seconds"],
        "exact_10_calls_s": exact_seconds,
        "ratio_10": exact_seconds / fast10["seconds"],
        "fast_1_s": fast1["seconds"],
        "exact_1_s": exact10[0]["seconds"],
        "ratio_1": exact10[0]["seconds"] / fast1["seconds"],
        "fast_precision": fast1["precision"],
        "fast_1_windows": fast1["zoom_in_windows"],
    }


def case_fast_vs_exact_mri() -> dict:
    """One structure on the brain MRI (197x233x189, several zoom-in windows), fast at default
    settings vs exact; `precision` records what "auto" picked on this machine."""
    src, kw = DATA / "mr_brain_mni152_t1.nii.gz", dict(text="white matter", modality="mri")
    model = _model()
    _run_segment(model, src, zoom_in=False, **kw)  # warm-up, untimed
    fast1 = _run_segment(model, src, **kw)
    exact1 = _run_segment(model, src, mode="exact", **kw)
    return {
        "input": str(src),
        "prompt": kw,
        "fast_1_s": fast1["seconds"],
        "exact_1_s": exact1["seconds"],
        "ratio_1": exact1["seconds"] / fast1["seconds"],
        "fast_precision": fast1["precision"],
        "fast_windows": fast1["zoom_in_windows"],
        "fast_timings": fast1["timings"],
        "exact_timings": exact1["timings"],
    }


def case_exact_vs_rerun() -> dict:
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "official_rerun.py"), "--full"], capture_output=True, text=True, cwd=REPO
    )
    return {"identical": out.returncode == 0, "stdout_tail": out.stdout[-2000:]}


CASES = {
    "ct": lambda: case_volume("ct"),
    "dicom": lambda: case_volume("dicom"),
    "mri_brain": lambda: case_volume("mri_brain"),
    "synthetic512": case_synthetic512,
    "fast_vs_exact": case_fast_vs_exact,
    "fast_vs_exact_mri": case_fast_vs_exact_mri,
    "exact_vs_rerun": case_exact_vs_rerun,
}


def _child(name: str) -> None:
    result = CASES[name]()
    result["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report(result)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--timeout", type=float, default=None, help="seconds per case (recorded as timed out)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--make-synthetic", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return 0
    if args.make_synthetic:
        _make_synthetic(pathlib.Path(args.make_synthetic))
        return 0

    results = {}
    for name in args.cases:
        t = time.perf_counter()
        try:
            results[name] = run_child(__file__, ["--child", name], cwd=REPO, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            results[name] = {"error": f"timed out after {args.timeout:.0f} s (not completed)"}
        results[name]["wall_s"] = time.perf_counter() - t
        print(name, json.dumps(results[name], default=str)[:400], flush=True)
    out = environment(config="SegVolConfig() official size, random weights", results=results)
    write_results(out, args.out, "cpu-segment", "-".join(args.cases))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
