"""Interactive-session latency: the full-size model (random weights) on the shared CT.

    python bench/session_bench.py                  # (make bench-session) -> bench/results/cpu-session-<date>.json
    python bench/session_bench.py --device cuda    # -> <GPU name>-session-<date>.json ($OUT when set)

Opening a session (load, preprocess, zoom-out encoding), the first prompt (its zoom-in windows
encoded), then each further organ prompt and a refinement click answered from the cache, next to a
fresh `segment()` call with the same prompt, in the same process (one untimed warm-up first).
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
from bench.shared_data import DATA  # noqa: E402
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
    args = p.parse_args()
    torch.manual_seed(0)
    model = SegVol(SegVolConfig(), tokenizer=DATA / "clip_tokenizer").eval().to(args.device)
    model.weights_source = "random (benchmark)"
    ct = load_volume(DATA / "ct_abdomen_sm.nii.gz")
    segment(model, ct, text="liver", progress=False)  # warm-up: oneDNN primitives / CUDA kernels, text cache, allocator
    sess, t_open = _timed(lambda: model.session(ct))
    first, t_first = _timed(lambda: sess.segment(text=ORGANS[0]))
    cached, fresh = [], []
    for organ in ORGANS[1:]:
        _, t = _timed(lambda: sess.segment(text=organ))
        cached.append(t)
        _, t = _timed(lambda: segment(model, ct, text=organ, progress=False))
        fresh.append(t)
    _, t_refine = _timed(lambda: sess.refine(ORGANS[0], points=[[60, 50, 14]], point_labels=[1]))
    out = environment(
        device=device_slug(args.device),
        config="SegVolConfig() random weights",
        input="ct_abdomen_sm.nii.gz",
        open_s=t_open,
        first_prompt_s=t_first,
        first_prompt_windows=first.zoom_in_windows,
        cached_prompt_s=cached,
        fresh_segment_s=fresh,
        median_cached_s=statistics.median(cached),
        median_fresh_s=statistics.median(fresh),
        refine_s=t_refine,
        cache={"hits": sess.cache.hits, "misses": sess.cache.misses, "capacity": sess.cache.capacity},
    )
    print(json.dumps(out, indent=1))
    write_results(out, args.out, f"{device_slug(args.device)}-session")
    return 0


if __name__ == "__main__":
    sys.exit(main())
