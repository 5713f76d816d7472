"""Measure what the memory planner's encoder and decoder terms stand for, on this machine.

    python bench/calibrate_memory.py            # CPU, full-size SegVolConfig, random weights

Each case runs in a fresh Python process that builds the model, reads its resident set size, runs
ONE call (an encode of B windows, or a decode of N prompts against a random image embedding, so
the encoder's own peak cannot hide the decoder's) and reports ru_maxrss minus the RSS before the
call: the bytes that call added at its peak, allocator and library overheads included. The cost
model's term in segevol_fast/inference/cost_model.py plus its fixed slack must not be below the
measurement (the slack covers the first call's allocator and library overheads, which a
single-call process sees in full). The check that matters, the estimate of whole `segment()`
calls against their measured peaks, is `bench/calibrate_segment.py`.
Results go to bench/results/cpu-memory-terms-<date>.json.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the package and bench.* from this checkout, child or parent

from bench.environment import environment, write_results  # noqa: E402
from bench.fresh_process import report, run_child  # noqa: E402

CASES = [
    ("encode", 1),
    ("encode", 2),
    ("encode", 4),
    ("encode", 6),
    ("encode", 8),
    ("decode", 1),
    ("decode", 4),
    ("decode", 8),
]


def _child(kind: str, n: int) -> dict:
    import resource

    import torch

    from segevol_fast import SegVol, SegVolConfig
    from segevol_fast.inference.budget import estimate
    from segevol_fast.inference.memory import current_rss

    torch.manual_seed(0)
    model = SegVol(SegVolConfig()).eval()
    cfg = model.config
    with torch.inference_mode():
        if kind == "encode":
            x = torch.rand(n, 1, *cfg.spatial_size)
            before = current_rss()
            model.encode_image(x)
        else:
            emb = torch.randn(1, cfg.hidden_size, *cfg.grid_size)
            text = torch.randn(n, cfg.hidden_size)
            boxes = torch.tensor([[2.0, 30, 30, 20, 200, 200]] * n)
            before = current_rss()
            model.decode(emb, text_embedding=text, boxes=boxes)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kw = dict(window_batch=n) if kind == "encode" else dict(decode_batch=n)
    _, items = estimate(model, cfg.spatial_size, 1, device="cpu", baseline_bytes=0, **kw)
    return {
        "kind": kind,
        "n": n,
        "measured_bytes": peak - before,
        "model_bytes": items[kind + "r"],
        "rss_before_bytes": before,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        report(_child(args.child[0], int(args.child[1])))
        return 0

    rows = []
    for kind, n in CASES:
        row = run_child(__file__, ["--child", kind, str(n)], cwd=REPO)
        if "error" in row:
            print(row["error"], file=sys.stderr)
            return 1
        row["model_over_measured"] = row["model_bytes"] / max(1, row["measured_bytes"])
        rows.append(row)
        print(
            f"{kind} x{n}: measured {row['measured_bytes'] / 1e6:7.1f} MB, cost model {row['model_bytes'] / 1e6:7.1f} MB "
            f"({row['model_over_measured']:.2f}x)",
            flush=True,
        )
    out = environment(config="SegVolConfig() official size, random weights, float32", cases=rows)
    write_results(out, args.out, "cpu-memory-terms")
    from segevol_fast.inference.cost_model import FIXED_SLACK

    under = [r for r in rows if r["model_bytes"] + FIXED_SLACK < r["measured_bytes"]]
    if under:
        print(f"COST MODEL BELOW MEASUREMENT for {[(r['kind'], r['n']) for r in under]}", file=sys.stderr)
    return 1 if under else 0


if __name__ == "__main__":
    sys.exit(main())
