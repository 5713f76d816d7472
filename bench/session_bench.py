"""Interactive-session latency: the full-size model (random weights) on the shared CT.

    python bench/session_bench.py                  # (make bench-session) -> bench/results/cpu-session-<date>.json
    python bench/session_bench.py --device cuda    # -> <GPU name>-session-<date>.json ($OUT when set)
    python bench/session_bench.py --shape 120 126 164 --approximations none --precision fp32 --no-fresh
                                                   # the CT resampled to 10 zoom-in windows a prompt

Opening a session (load, preprocess, zoom-out encoding), the first prompt (its zoom-in windows
encoded), then each further organ prompt and a refinement click answered from the cache, next to a
fresh `segment()` call with the same prompt, in the same process (one untimed warm-up first).
`--shape X Y Z` resamples the CT (trilinear, same field of view) to that voxel grid first: the CT
as stored needs one zoom-in window, 120 x 126 x 164 gives a 164-slice crop and ten.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.environment import device_slug, environment, write_results  # noqa: E402
from bench.shared_data import DATA, resampled  # noqa: E402
from segevol_fast import SegVol, SegVolConfig, load_volume  # noqa: E402
from segevol_fast.inference import segment  # noqa: E402

ORGANS = ["liver", "spleen", "left kidney", "right kidney", "stomach", "pancreas"]


def _timed(fn):
    t = time.perf_counter()
    out = fn()  # results are host arrays: the device work is finished when it returns
    return out, time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results"))
    p.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), help="resample the CT to this grid")
    p.add_argument("--approximations", default="default", help="fast mode's zoom-in approximations (or none)")
    p.add_argument("--precision", default="auto", help="auto (bf16 on CPUs computing it natively), fp32, ...")
    p.add_argument("--no-fresh", action="store_true", help="skip the fresh segment() calls")
    p.add_argument("--rounds", type=int, default=1, help="times to prompt the organs from the cache")
    args = p.parse_args()
    torch.manual_seed(0)
    model = SegVol(SegVolConfig(), tokenizer=DATA / "clip_tokenizer").eval().to(args.device)
    model.weights_source = "random (benchmark)"
    ct = load_volume(DATA / "ct_abdomen_sm.nii.gz")
    if args.shape:
        ct = resampled(ct, args.shape, dtype=ct.array.dtype)
    kw = dict(approximations=args.approximations, precision=args.precision)
    segment(model, ct, text="liver", progress=False, **kw)  # warm-up: oneDNN / CUDA kernels, text cache, allocator
    sess, t_open = _timed(lambda: model.session(ct, **kw))
    first, t_first = _timed(lambda: sess.segment(text=ORGANS[0]))
    cached, fresh = [], []
    for _ in range(args.rounds):
        for organ in ORGANS[1:]:
            _, t = _timed(lambda: sess.segment(text=organ))
            cached.append(t)
    for organ in [] if args.no_fresh else ORGANS[1:]:
        _, t = _timed(lambda: segment(model, ct, text=organ, progress=False, **kw))
        fresh.append(t)
    _, t_refine = _timed(lambda: sess.refine(ORGANS[0], points=[[60, 50, 14]], point_labels=[1]))
    out = environment(
        device=device_slug(args.device),
        config="SegVolConfig() random weights",
        input="ct_abdomen_sm.nii.gz" + (f" resampled to {tuple(args.shape)}" if args.shape else ""),
        approximations=args.approximations,
        precision=args.precision,
        open_s=t_open,
        first_prompt_s=t_first,
        first_prompt_windows=first.zoom_in_windows,
        cached_prompt_s=cached,
        fresh_segment_s=fresh,
        median_cached_s=statistics.median(cached),
        median_fresh_s=statistics.median(fresh) if fresh else None,
        refine_s=t_refine,
        cache={"hits": sess.cache.hits, "misses": sess.cache.misses, "capacity": sess.cache.capacity},
    )
    print(json.dumps(out, indent=1))
    # runs of other shapes and precisions the same day keep their own files
    suffix = "-".join(([f"{args.shape[0]}x{args.shape[1]}x{args.shape[2]}"] if args.shape else []) + [args.precision])
    write_results(out, args.out, f"{device_slug(args.device)}-session", suffix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
